"""The inference service (NVIDIA Triton via nvidia-pytriton, `somaflow serve`) and its client.

The service runs in its own environment (numpy < 2): the first test session on a
machine creates it (~2-4 min, under ~/.somaflow, reused afterwards; see
docs/service.md). Every service here is the real one, started with `somaflow serve`
on loopback ports.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, kill_group, run_cli
from somaflow.io import schema

TOKEN = "test-token-0123"


# ----------------------------------------------------------------------------- helpers


def _http(url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
          timeout: float = 120) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Service:
    """A `somaflow serve` process on free loopback ports."""

    def __init__(self, log: Path, models: list[str], token: str | None = None,
                 ports: tuple[int, int, int] | None = None, env: dict[str, str] | None = None) -> None:
        self.ports = ports or (free_port(), free_port(), free_port())
        self.url = f"http://127.0.0.1:{self.ports[0]}"
        self.metrics_url = f"http://127.0.0.1:{self.ports[2]}/metrics"
        self.token, self.models, self.log = token, models, log
        self.env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> Service:
        env = dict(os.environ, **self.env)
        env.pop("SOMAFLOW_SERVE_TOKEN", None)
        if self.token:
            env["SOMAFLOW_SERVE_TOKEN"] = self.token
        exe = Path(sys.executable).with_name("somaflow")
        h, g, m = self.ports
        out = open(self.log, "a")
        self.proc = subprocess.Popen(
            [str(exe), "serve", "--host", "127.0.0.1", "--http-port", str(h), "--grpc-port", str(g),
             "--metrics-port", str(m), "--device", "cpu", "--models", *self.models],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"somaflow serve exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if _http(self.url + "/v2/health/ready", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the service was not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc, sig)

    def count(self, model: str) -> int:
        """Requests the model has answered (Triton's nv_inference_request_success)."""
        text = _http(self.metrics_url)[1].decode()
        m = re.search(rf'nv_inference_request_success{{model="{re.escape(model)}",version="1"}} (\d+)', text)
        return int(m.group(1)) if m else 0

    def infer(self, model: str, inputs: dict[str, np.ndarray], token: str | None = TOKEN,
              dtype: str = "FP32") -> tuple[int, dict]:
        """POST one binary-tensor infer request; (status, JSON header of the answer)."""
        header = {"inputs": [{"name": k, "shape": list(a.shape), "datatype": dtype,
                              "parameters": {"binary_data_size": a.nbytes}} for k, a in inputs.items()],
                  "outputs": [{"name": "probability", "parameters": {"binary_data": False}}]}
        head = json.dumps(header).encode()
        body = head + b"".join(np.ascontiguousarray(a).tobytes() for a in inputs.values())
        headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
        if token:
            headers["somaflow-token"] = token
        status, data = _http(f"{self.url}/v2/models/{model}/infer", body, headers)
        try:
            return status, json.loads(data)
        except ValueError:
            return status, {"raw": data[:200]}

    def ready(self) -> bool:
        return _http(self.url + "/v2/health/ready", timeout=10)[0] == 200


@pytest.fixture(scope="session")
def service_env():
    """The service environment's python (created once per machine: `somaflow serve --print-python`)."""
    t0 = time.perf_counter()
    proc = run_cli("serve", "--print-python", timeout=1800)
    python = proc.stdout.strip().splitlines()[-1]
    print(f"service environment {python} ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return python


@pytest.fixture(scope="session")
def service(service_env, tmp_path_factory):
    """One service with a token, serving the models the equivalence runs use."""
    log = tmp_path_factory.mktemp("service") / "serve.log"
    s = Service(log, ["stneuronet", "unet2d", "3cnet"], token=TOKEN).start()
    yield s
    s.stop()


def _run(movie: Path, out: Path, method: str, inference: str, env: dict[str, str], *extra: str,
         cluster: tuple[str, ...] = ("--cluster", "threads")) -> dict:
    proc = run_cli("run", str(movie / "movie.tif"), "--out", str(out), "--fps", "10", "--method", method,
                   "--inference", inference, *cluster, "--json", *extra, env=env)
    return json.loads(proc.stdout)


# ----------------------------------------------------------------------------- no service needed


def test_every_shipped_model_runs_on_its_smallest_signature_input():
    """The served signatures (somaflow.nn.signatures) describe what the models take."""
    from somaflow.inference import SHIPPED, LocalBackend, checkpoint_metadata, weights_path
    from somaflow.nn.classifiers import CNET3_SIDE
    from somaflow.nn.signatures import CNET3_SIDE as SIDE
    from somaflow.nn.signatures import as_named, signature

    assert SIDE == CNET3_SIDE
    backend = LocalBackend(threads=1)
    for model in SHIPPED:
        meta = checkpoint_metadata(weights_path(model))
        assert meta == backend.metadata(model, "default")
        sig = signature(model, meta["config"])
        x = tuple(np.random.default_rng(0).normal(size=(2, *t.minimum)).astype(np.float32) for t in sig.inputs)
        assert sig.check(as_named(sig, x if len(x) > 1 else x[0]), 1 << 30) is None
        prob = backend.predict(model, "default", x if len(x) > 1 else x[0])
        want = (2,) if sig.output_dims == (1,) else (2, *x[0].shape[-2:])
        assert prob.shape == want and np.all((prob >= 0) & (prob <= 1))


def test_signature_check_names_the_problem():
    from somaflow.nn.signatures import signature

    sig = signature("unet2d", {"in_channels": 4, "depth": 3})
    ok = np.zeros((1, 4, 16, 16), np.float32)
    assert sig.check({"input": ok}, 1 << 20) is None
    assert "float32" in sig.check({"input": ok.astype(np.float64)}, 1 << 20)
    assert "multiple of 8" in sig.check({"input": np.zeros((1, 4, 12, 16), np.float32)}, 1 << 20)
    assert "expected 4" in sig.check({"input": np.zeros((1, 3, 16, 16), np.float32)}, 1 << 20)
    assert "limit" in sig.check({"input": ok}, 100)
    bad = ok.copy()
    bad[0, 0, 0, 0] = np.nan
    assert "NaN" in sig.check({"input": bad}, 1 << 20)
    assert "inputs" in sig.check({"image": ok}, 1 << 20)


def test_the_client_retries_what_the_fault_proxy_injects_and_stops_at_its_deadline():
    """The soak's service faults (benchmarks/bench_soak.py --service) through FaultProxy: 503 / 500
    answers in Triton's JSON and reset connections are retried, a service gone (the proxy's 502 for a
    refused upstream) is waited for until the deadline, then it is the one-line ServiceError."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    from somaflow.errors import ServiceError
    from somaflow.inference import RemoteBackend
    from somaflow.testing.s3proxy import Fault, FaultProxy

    class Ready(BaseHTTPRequestHandler):  # a server's readiness endpoint, the only call wait_ready makes
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            self.send_response(200 if self.path == "/v2/health/ready" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            return

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Ready)
    Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        with FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}") as proxy:
            proxy.inject(Fault("503", first=2))
            proxy.inject(Fault("500", first=1))
            proxy.inject(Fault("reset", first=1))
            RemoteBackend(proxy.url, deadline=30).wait_ready()
            counts = proxy.counts()
            assert (counts["fault_503"], counts["fault_500"], counts["fault_reset"]) == (2, 1, 1), counts
            proxy.set_upstream(f"http://127.0.0.1:{free_port()}")  # the service killed: nothing listens
            t0 = time.perf_counter()
            with pytest.raises(ServiceError, match=f"inference service {proxy.url} did not answer"):
                RemoteBackend(proxy.url, deadline=2).wait_ready()
            assert time.perf_counter() - t0 < 20
    finally:
        upstream.shutdown()
        upstream.server_close()


def test_inference_option_is_checked_before_any_work(tmp_path, make_movie):
    movie = make_movie(0) / "movie.tif"
    bad = run_cli("run", str(movie), "--out", str(tmp_path / "r.zarr"), "--fps", "10", "--inference",
                  "ftp://example.org", check=False)
    assert bad.returncode == 2 and "--inference" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    down = run_cli("run", str(movie), "--out", str(tmp_path / "r.zarr"), "--fps", "10", "--inference", url,
                   check=False, env={"SOMAFLOW_INFERENCE_DEADLINE": "2"})
    assert down.returncode == 4, down.stderr
    assert down.stderr.strip().splitlines()[-1].startswith(f"somaflow: error: inference service {url} did not answer")
    assert len(down.stderr.strip().splitlines()) == 1
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "r.zarr").exists()


def test_inference_reaches_every_cnn_but_not_the_recorded_parameters(make_movie):
    """--inference sets the backend of the detectors, the classifier and the LSTM seed cleansing; it is
    left out of the parameter dump, so of the stage hashes and the result's recorded parameters."""
    from somaflow import provenance
    from somaflow.params import inference_overrides
    from somaflow.session.plan import session_params

    movie = str(make_movie(0) / "movie.tif")
    url = "http://inference.example:8000"
    local = session_params(movie, fps=10.0)
    remote = session_params(movie, fps=10.0, overrides=inference_overrides(url))
    assert remote.extract.cnn.inference == remote.classify.inference == remote.extract.cnmf.seeds.inference == url
    assert local.extract.cnn.inference == local.classify.inference == "local"
    assert "inference" not in json.dumps(remote.model_dump(mode="json"))
    assert provenance.stage_hashes("x", remote.model_dump(mode="json")) == \
        provenance.stage_hashes("x", local.model_dump(mode="json"))


def test_archive_checks_the_inference_service_first(tmp_path, make_movie):
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_cli("archive", str(make_movie(0) / "*.tif"), "--out", str(tmp_path / "out"), "--fps", "10",
                   "--inference", url, check=False, env={"SOMAFLOW_INFERENCE_DEADLINE": "2"})
    assert proc.returncode == 4 and url in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_serve_refuses_bad_settings_in_one_line(service_env):
    proc = run_cli("serve", "--models", "resnet50", "--http-port", str(free_port()), check=False, timeout=300)
    assert proc.returncode == 2
    assert "unknown model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- the real service


@pytest.mark.integration
@pytest.mark.parametrize("method,extra", [
    ("stneuronet", ()),
    # the U-Net also runs through the service in the cnmf case (its morphology units), asserted there
    pytest.param("unet2d", (), marks=pytest.mark.slow),
    ("cnmf", ("--classifier", "3cnet")),
], ids=["stneuronet", "unet2d", "cnmf-3cnet"])
def test_service_run_equals_local_run(service, make_movie, tmp_path, prefect_api, method, extra):
    """`somaflow run --inference URL` sends every CNN call to the service and gets the local result."""
    movie = make_movie(4)
    env = {**prefect_api, "SOMAFLOW_INFERENCE_TOKEN": TOKEN}
    # STNeuroNet's batches are Dask tasks: run them in worker processes, which build their own client.
    # Both runs on the same kind of cluster: the local pipeline's maps differ by up to ~1e-3 between
    # threads and processes (measured: 18 of 16384 pixels over 1e-4, masks equal)
    cluster = ("--cluster", "local", "--workers", "2") if method == "stneuronet" else ("--cluster", "threads")
    local = _run(movie, tmp_path / "local.zarr", method, "local", prefect_api, *extra, cluster=cluster)
    models = ["unet2d", "3cnet"] if method == "cnmf" else [method]
    before = {m: service.count(m) for m in models}
    remote = _run(movie, tmp_path / "remote.zarr", method, service.url, env, *extra, cluster=cluster)
    for m in models:  # the service answered: no silent local inference
        assert service.count(m) > before[m], m
    a, b = schema.open_result(str(tmp_path / "local.zarr")), schema.open_result(str(tmp_path / "remote.zarr"))
    assert local["n_units"] == remote["n_units"] > 0
    np.testing.assert_array_equal(a["masks"].values, b["masks"].values)
    np.testing.assert_array_equal(a["accepted"].values, b["accepted"].values)
    if "cnn_probability" in a:
        np.testing.assert_allclose(a["cnn_probability"].values, b["cnn_probability"].values, atol=1e-4, rtol=0)
    if method == "cnmf":
        np.testing.assert_allclose(a["cnn_score"].values, b["cnn_score"].values, atol=1e-4, rtol=0)
    np.testing.assert_allclose(a["score"].values, b["score"].values, atol=1e-4, rtol=0)
    # where the models ran is deployment, not a parameter: same recorded parameters, same stage hashes
    assert a.attrs["params"] == b.attrs["params"]


@pytest.mark.integration
def test_bad_requests_get_4xx_and_the_service_stays_up(service):
    ok = np.zeros((1, 1, 8, 16, 16), np.float32)
    assert service.infer("stneuronet", {"input": ok})[0] == 200
    cases = {
        "unknown model": service.infer("resnet50", {"input": ok}),
        "wrong channel count": service.infer("stneuronet", {"input": np.zeros((1, 2, 8, 16, 16), np.float32)}),
        "wrong rank": service.infer("stneuronet", {"input": np.zeros((1, 8, 16, 16), np.float32)}),
        "H not a multiple of 8": service.infer("stneuronet", {"input": np.zeros((1, 1, 8, 12, 16), np.float32)}),
        "T not a multiple of 4": service.infer("stneuronet", {"input": np.zeros((1, 1, 6, 16, 16), np.float32)}),
        "wrong dtype": service.infer("stneuronet", {"input": np.zeros((1, 1, 8, 16, 16), np.float64)}, dtype="FP64"),
        "wrong input name": service.infer("stneuronet", {"movie": ok}),
        "NaN": service.infer("stneuronet", {"input": np.full((1, 1, 8, 16, 16), np.nan, np.float32)}),
        "batch over the limit": service.infer("3cnet", {"input": np.zeros((257, 2, 92, 92), np.float32)}),
        "body over the size limit": service.infer("unet2d", {"input": np.zeros((1, 4, 2048, 2056), np.float32)}),
        "missing token": service.infer("stneuronet", {"input": ok}, token=None),
        "wrong token": service.infer("stneuronet", {"input": ok}, token="guess"),
    }
    for what, (status, answer) in cases.items():
        assert 400 <= status < 500, (what, status, answer)
        assert service.ready(), what
    assert cases["missing token"][0] == cases["wrong token"][0] == 403
    assert "multiple of 8" in cases["H not a multiple of 8"][1]["error"]
    assert "limit" in cases["body over the size limit"][1]["error"]
    # model control is off: loading or unloading models by request is refused
    for path in ("/v2/repository/index", "/v2/repository/models/unet2d/unload",
                 "/v2/repository/models/unet2d/load"):
        status, _ = _http(service.url + path, b"{}", {"somaflow-token": TOKEN})
        assert status == 403, path
    assert service.infer("stneuronet", {"input": ok})[0] == 200
    # Triton's own metadata and health endpoints
    assert _http(service.url + "/v2/health/live")[0] == 200
    meta = json.loads(_http(service.url + "/v2/models/3cnet")[1])
    assert meta["inputs"][0]["shape"] == [-1, 2, 92, 92]
    assert "nv_inference_request_success" in _http(service.metrics_url)[1].decode()


@pytest.mark.integration
def test_malformed_infer_bodies_never_reach_a_5xx_in_somaflow_code(service):
    """Property: whatever the body, the service answers, stays ready, and no 5xx comes from the model code."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    names = st.sampled_from(["input", "image", "trace", "x", ""])
    dtypes = st.sampled_from(["FP32", "FP64", "FP16", "INT32", "UINT8", "BOOL", "BYTES", "FP8", ""])
    shapes = st.lists(st.integers(-2, 40), min_size=0, max_size=6)
    tensor = st.fixed_dictionaries({"name": names, "datatype": dtypes, "shape": shapes},
                                   optional={"data": st.lists(st.floats(allow_nan=True), max_size=64)})
    json_bodies = st.builds(lambda ins: json.dumps({"inputs": ins}).encode(), st.lists(tensor, max_size=3))
    binary = st.builds(lambda shape, dtype, n, extra: (json.dumps(
        {"inputs": [{"name": "input", "shape": shape, "datatype": dtype,
                     "parameters": {"binary_data_size": n}}]}).encode(), extra),
        shapes, dtypes, st.integers(-1, 4096), st.binary(max_size=4096))
    model = st.sampled_from(["stneuronet", "unet2d", "3cnet"])
    triton_5xx: set[str] = set()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(model=model, body=st.one_of(json_bodies, binary, st.binary(max_size=512)))
    def check(model, body):
        headers = {"somaflow-token": TOKEN}
        if isinstance(body, tuple):
            head, payload = body
            headers["Inference-Header-Content-Length"] = str(len(head))
            body = head + payload
        status, data = _http(f"{service.url}/v2/models/{model}/infer", body, headers)
        text = data.decode("utf-8", "replace")
        if status >= 500:
            assert "somaflow" not in text, text  # the model code never fails on an accepted request
            triton_5xx.add(re.sub(r"\d+", "N", text)[:160])
        assert status != 200 or "probability" in text
        assert service.ready()

    check()
    if triton_5xx:  # Triton's own answers (its request parser), listed for the record
        print("5xx answers from Triton itself:\n  " + "\n  ".join(sorted(triton_5xx)), file=sys.stderr)


@pytest.mark.integration
def test_killing_the_service_mid_run(service_env, make_movie, tmp_path, prefect_api):
    """Killed after the run started: with no service back in the deadline the run stops with the
    ServiceError line and exit status 4 and no complete result; with the service back in time, the
    same command completes."""
    movie = make_movie(5)
    svc = Service(tmp_path / "serve.log", ["stneuronet"]).start()

    def run_and_kill(out: Path, deadline: str, restart: bool) -> subprocess.CompletedProcess:
        ingest = out.parent / (out.name + ".work") / "movie.zarr"
        exe = Path(sys.executable).with_name("somaflow")
        env = dict(os.environ, **prefect_api, SOMAFLOW_INFERENCE_DEADLINE=deadline)
        proc = subprocess.Popen([str(exe), "run", str(movie / "movie.tif"), "--out", str(out), "--fps", "10",
                                 "--method", "stneuronet", "--inference", svc.url, "--cluster", "threads"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        t0 = time.time()
        while not ingest.exists() and proc.poll() is None and time.time() - t0 < 300:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        svc.stop(signal.SIGKILL)  # mid-run: after the readiness check and ingest, before any inference
        if restart:
            svc.start()
        stdout, stderr = proc.communicate(timeout=600)
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    try:
        out = tmp_path / "back.zarr"
        back = run_and_kill(out, "240", restart=True)
        assert back.returncode == 0, back.stderr
        assert schema.is_complete(str(out)) and svc.count("stneuronet") > 0
        out = tmp_path / "down.zarr"
        down = run_and_kill(out, "5", restart=False)
        assert down.returncode == 4, down.stderr
        last = down.stderr.strip().splitlines()[-1]
        assert last.startswith(f"somaflow: error: inference service {svc.url} did not answer"), last
        assert not schema.is_complete(str(out))
    finally:
        svc.stop()
