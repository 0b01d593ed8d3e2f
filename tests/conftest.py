"""Shared fixtures: a loopback S3 server, a shared Prefect API server, CLI runner."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

logging.getLogger("werkzeug").setLevel(logging.WARNING)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP endpoint on loopback (moto's server, as s3fs's tests use).

    Yields a dict of environment variables that point boto/s3fs at it.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "SOMAFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh bucket on the loopback S3 server; yields ``s3://NAME``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["SOMAFLOW_S3_ENDPOINT_URL"], skip_instance_cache=True)
    fs.mkdir(name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect API server for every CLI run of the session (STACK.md).

    Yields the environment (PREFECT_API_URL, PREFECT_HOME ...) to pass to
    ``somaflow run`` subprocesses.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
    })
    prefect = Path(sys.executable).with_name("prefect")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError("prefect server did not start in 240 s")
    yield {"PREFECT_API_URL": url, "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed ``somaflow`` console script in a subprocess."""
    exe = Path(sys.executable).with_name("somaflow")
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run([str(exe), *args], env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"somaflow {' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's real data folder; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_movie(tmp_path_factory):
    """Factory of small simulated sessions: ``make_movie(seed, n_frames=100, preset="2p-small")``.

    Writes ``movie.tif``, ``ground_truth.zarr`` and ``meta.json`` once per
    (preset, seed, n_frames) and returns the folder (a Path).
    """
    from somaflow.simulate import simulate, write_simulation

    root = tmp_path_factory.mktemp("movies")
    made: dict[tuple[str, int, int], Path] = {}

    def make(seed: int, n_frames: int = 100, preset: str = "2p-small") -> Path:
        key = (preset, seed, n_frames)
        if key not in made:
            out = root / f"{preset}-{seed}-{n_frames}"
            write_simulation(simulate(preset, seed=seed, n_frames=n_frames), str(out))
            made[key] = out
        return made[key]

    return make


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Kill a process started with ``start_new_session=True`` and all its children
    (``SIGKILL`` after 30 s if ``sig`` did not end it)."""
    for s in (sig, signal.SIGKILL):
        try:
            os.killpg(proc.pid, s)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
            return
        except subprocess.TimeoutExpired:
            continue


def prefect_records(env: dict[str, str], flow_run_id: str, wait: float = 15.0) -> tuple[list, list]:
    """The logs and artifacts the Prefect API at ``env`` holds for one flow run.

    Logs arrive from the run's process in batches: wait up to ``wait`` seconds
    for the first.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        deadline = time.time() + wait
        while True:
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            if logs or time.time() > deadline:
                break
            time.sleep(1)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return logs, artifacts


@pytest.fixture(scope="session")
def small_result(make_movie, tmp_path_factory):
    """A small complete result (from a simulated session's ground truth, with some units
    rejected, scores spread, timings and an out-of-distribution warning); returns its path."""
    import json

    import numpy as np

    from somaflow.io import schema

    gt = schema.open_result(str(make_movie(41, n_frames=80) / "ground_truth.zarr")).load()
    n = gt.sizes["unit"]
    rng = np.random.default_rng(0)
    variables = {name: gt[name] for name in schema.RESULT_VARIABLES}
    variables["score"] = rng.uniform(0.2, 1.0, n).astype(np.float32)
    variables["accepted"] = variables["score"] > 0.4
    variables["snr"] = gt["snr"]
    variables["kind"] = ("unit", np.array(["cnmf", "morphology"])[np.arange(n) % 2])
    ds = schema.make_result_dataset(
        variables, params={"fps": gt.attrs["fps"], "method": "cnmf", "traces": {"a": 1}},
        source="sim <movie>.tif", source_checksum="blake2b:0", fps=gt.attrs["fps"], modality="2p",
        extra_attrs={"timings": {"motion": 1.5, "extract": 3.25}, "method": "cnmf", "motion_mode": "rigid",
                     "ood_warnings": json.dumps(["noise level 0.7 is above the training range 0.02–0.24"]),
                     "created": "2026-01-02T03:04:05+00:00"})
    url = str(tmp_path_factory.mktemp("result") / "small.zarr")
    schema.write_result(ds, url)
    return url
