"""Bounded soak: many sessions through ``somaflow archive`` while faults hit it; counts what is lost.

Everything is on loopback: a moto S3 server behind the fault-injecting proxy
(:class:`somaflow.testing.s3proxy.S3FaultProxy`), one Prefect API server, and
each ``somaflow archive`` with its local multi-process Dask cluster. Inputs,
manifest and results are on S3. Several sessions share a movie (sessions of
one archive computing the same input at once must not collide).

1. A fault-free archive over one session per distinct movie gives the reference results.
2. The soak archive over every session runs while a fault thread, at random
   times, SIGKILLs a Dask worker, makes the S3 proxy answer 503 / 500 / reset
   connections / answer slowly for a few requests, or SIGKILLs the whole archive
   (its process group: cluster included), which is then rerun, as is an archive
   that ended with failed sessions (it resumes), until every session is complete
   or the time budget is spent.
   With ``--service``, the runs send their CNN calls (``--inference``) to the
   inference service (``somaflow serve``, the reference archive's too) through a
   second fault-injecting proxy (:class:`somaflow.testing.s3proxy.FaultProxy`),
   and the faults include the service's: SIGKILLed mid-run (restarted after a
   random outage, on new ports behind the same proxy), slow answers, 503 / 500
   answers and reset connections.
3. Each session's result is compared with its movie's reference: every data
   variable equal.

Each archive's exit status is tallied, as is every failed session's cause (its
``exit_code`` in ``archive_summary.json``). A failure the faults explain (3: a
store that did not answer, 4: an inference service that did not answer, an
archive killed by the soak, 75: its local cluster did not start) is rerun: the
rerun resumes, nothing is lost. Any other (70 internal, 2 input, an archive exit
other than 0 / 1 / 3 / 4 / 75) is a defect the soak found: listed, and the soak
exits 1 even if a rerun completed it.

Prints sessions run, faults injected (by kind), sessions completed, results lost
(seen complete after some round, not complete at the end), corrupted (complete
but different from the fault-free result), unfinished (never completed before
the time budget ran out), archive exits and session failures by cause, and
whether any process of a killed archive (or service) outlived it.

Usage::

    python benchmarks/bench_soak.py [--sessions 24] [--movies 6] [--frames 60] [--seed 0]
                                    [--budget 900] [--mean-gap 10] [--archive-kills 3] [--method cnmf]
                                    [--service [--classifier 3cnet] [--service-kills 4] [--inference-deadline 60]]
                                    [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import xarray as xr
from moto.server import ThreadedMotoServer

from somaflow.io import schema, stores
from somaflow.simulate import simulate, write_simulation
from somaflow.testing.s3proxy import Fault, FaultProxy, S3FaultProxy

BIN = Path(sys.executable).parent
BUCKET = "soak"
#: attrs that differ between two runs of the same computation
VOLATILE_ATTRS = {"timings", "created", "provenance", "flow_run_id", "stage_hash"}
#: with --service: the largest difference of a float variable that is rounding, not corruption. The
#: service's dynamic batcher runs one client's request in one forward pass with whatever other
#: requests are queued, and a network's float32 output for an example changes in its last bits with
#: the batch it is computed in (measured without any fault: 3CNet scores up to 6e-8 apart between two
#: archives of the same sessions). Masks, verdicts and every integer stay exactly equal.
BATCHING_ROUNDING = 1e-6
#: failure causes the injected faults explain (somaflow.errors): a store or the inference service did not answer
FAULT_CODES = {3, 4}
#: the CNNs a method's runs call (cnmf: its morphology U-Net), the classifier's besides
SERVED = {"stneuronet": ["stneuronet"], "unet2d": ["unet2d"], "cnmf": ["unet2d"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect_server(home: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false"}
    log = open(home / "server.log", "w")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    _wait_ok(url + "/health", proc, 300, home / "server.log")
    return proc, url


def _wait_ok(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Return once ``url`` answers 200 (the server ``proc`` is up); RuntimeError if it exits or times out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout} s: {log.read_text()[-2000:]}")


def _group(proc: subprocess.Popen) -> list[psutil.Process]:
    """Every live process of the archive's process group (it runs in a session of its own)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == proc.pid:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


class Service:
    """``somaflow serve`` on free loopback ports, behind a :class:`FaultProxy` whose URL the runs use.

    :meth:`outage` SIGKILLs it (its process group: Triton and the model stubs) and, after a
    while, starts a new one on new ports and points the proxy there, in a thread of its own.
    """

    def __init__(self, models: list[str], log: Path) -> None:
        self.models, self.log = models, log
        self.proc: subprocess.Popen | None = None
        self.proxy: FaultProxy | None = None
        self.restarting = threading.Event()
        self.closed = False
        self.leaked: list[str] = []
        self.answered: Counter[str] = Counter()  # requests answered by the services stopped so far

    def start(self, timeout: float = 600) -> str:
        ports = [_free_port() for _ in range(3)]
        self.proc = subprocess.Popen(
            [str(BIN / "somaflow"), "serve", "--host", "127.0.0.1", "--http-port", str(ports[0]), "--grpc-port",
             str(ports[1]), "--metrics-port", str(ports[2]), "--device", "cpu", "--models", *self.models],
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
        self.metrics = f"http://127.0.0.1:{ports[2]}/metrics"
        url = f"http://127.0.0.1:{ports[0]}"
        _wait_ok(url + "/v2/health/ready", self.proc, timeout, self.log)
        if self.proxy is None:
            self.proxy = FaultProxy(url).start()
        self.proxy.set_upstream(url)
        return self.proxy.url

    def counts(self) -> Counter[str]:
        """Requests answered per model (Triton's nv_inference_request_success), this service and the
        ones before it."""
        total = Counter(self.answered)
        try:
            with urllib.request.urlopen(self.metrics, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return total
        for line in text.splitlines():
            if line.startswith("nv_inference_request_success{"):
                model = line.split('model="')[1].split('"')[0]
                total[model] += int(float(line.rsplit(" ", 1)[1]))
        return total

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.answered = self.counts()
        members = _group(self.proc)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        time.sleep(2)
        self.leaked += [" ".join(p.cmdline())[:120] for p in members
                        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def outage(self, seconds: float) -> None:
        """SIGKILL now; a new service in ``seconds`` (then ~15-60 s to load its models)."""
        self.restarting.set()
        self.kill()

        def back() -> None:
            try:
                time.sleep(seconds)
                if not self.closed:
                    self.start()
                if self.closed:  # the soak ended meanwhile
                    self.kill()
            finally:
                self.restarting.clear()

        threading.Thread(target=back, name="service-restart", daemon=True).start()

    def stop(self) -> None:
        """The soak is over: SIGTERM, so that the service removes its scratch and shared memory."""
        self.closed = True
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proxy is not None:
            self.proxy.stop()


class Soak:
    def __init__(self, args: argparse.Namespace, proxy: S3FaultProxy, env: dict[str, str], tmp: Path,
                 service: Service | None = None) -> None:
        self.args, self.proxy, self.env, self.tmp, self.service = args, proxy, env, tmp, service
        self.rng = random.Random(args.seed)
        self.faults: dict[str, int] = {"worker-sigkill": 0, "s3-errors": 0, "archive-sigkill": 0}
        if service is not None:
            self.faults.update({"service-sigkill": 0, "service-errors": 0, "service-slow": 0})
        #: exit statuses of the archive rounds (-9: killed by the soak)
        self.exits: Counter[int] = Counter()
        #: failed sessions by cause (their exit_code) over every round, and the ones no fault explains
        self.failures: Counter[int] = Counter()
        self.defects: list[str] = []
        self.leaked: list[str] = []
        self.rounds = 0
        #: sessions seen complete after some round: one that is not complete at the end was lost
        self.seen_complete: set[str] = set()
        #: archives whose log stood still for --stall seconds, killed and rerun (not counted as faults)
        self.stalls = 0
        self.current: subprocess.Popen | None = None

    def archive(self, manifest: str, out: str, log: Path) -> subprocess.Popen:
        cmd = [str(BIN / "somaflow"), "archive", manifest, "--out", out, "--cluster", "local", "--workers", "2",
               "--concurrency", str(self.args.concurrency), "--method", self.args.method]
        if self.service is not None:
            cmd += ["--inference", self.service.proxy.url]
        self.current = subprocess.Popen(cmd, env=self.env, stdout=open(log, "a"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                start_new_session=True)
        return self.current

    def stop(self) -> None:
        """Kill the archive in flight, if any (its own process group: cluster included)."""
        if self.current is not None and self.current.poll() is None:
            os.killpg(self.current.pid, signal.SIGKILL)
            self.current.wait()

    def inject(self, proc: subprocess.Popen) -> bool:
        """One random fault; True when it killed the archive."""
        kinds, weights = ["worker-sigkill", "s3-errors"], [0.5, 0.5]
        if self.faults["archive-sigkill"] < self.args.archive_kills and self.rounds > self.faults["archive-sigkill"]:
            kinds.append("archive-sigkill")  # at most one per round, so that the reruns get somewhere
            weights.append(0.25)
        if self.service is not None:
            kinds += ["service-errors", "service-slow"]
            weights += [0.35, 0.25]
            if not self.service.restarting.is_set() and self.faults["service-sigkill"] < self.args.service_kills:
                kinds.append("service-sigkill")
                weights.append(0.2)
        kind = self.rng.choices(kinds, weights=weights)[0]
        if kind == "worker-sigkill":
            workers = [p for p in _group(proc) if p.pid != proc.pid and "spawn_main" in " ".join(p.cmdline())]
            if len(workers) < 2:  # leave the cluster one worker while the nanny restarts the other
                return False
            os.kill(self.rng.choice(workers).pid, signal.SIGKILL)
        elif kind == "s3-errors":
            self.proxy.inject(Fault(self.rng.choice(["503", "500", "reset", "slow"]), first=self.rng.randint(2, 6),
                                    delay=1.0, seed=self.rng.randint(0, 10**6)))
        elif kind == "service-errors":
            self.service.proxy.inject(Fault(self.rng.choice(["503", "500", "reset"]), first=self.rng.randint(1, 5),
                                            seed=self.rng.randint(0, 10**6)))
        elif kind == "service-slow":
            self.service.proxy.inject(Fault("slow", first=self.rng.randint(1, 4), delay=self.rng.uniform(2, 10)))
        elif kind == "service-sigkill":
            # an outage shorter or longer than the runs' --inference deadline: they wait, or stop with exit 4
            self.service.outage(self.rng.uniform(0, 1.5 * self.args.inference_deadline))
        else:
            members = _group(proc)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            time.sleep(3)
            alive = [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            self.leaked += [" ".join(p.cmdline())[:120] for p in alive]
        self.faults[kind] += 1
        return kind == "archive-sigkill"

    def run_until_complete(self, manifest: str, out: str, sessions: list[str], deadline: float) -> None:
        log = self.tmp / "soak.log"
        while time.time() < deadline:
            self.rounds += 1
            proc = self.archive(manifest, out, log)
            killed = False
            next_fault = time.time() + self.rng.expovariate(1 / self.args.mean_gap)
            last_size, last_change = -1, time.time()
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
                size = log.stat().st_size
                if size != last_size:
                    last_size, last_change = size, time.time()
                elif time.time() - last_change > self.args.stall:
                    self.stalls += 1  # e.g. every worker gone and none restarted: the run waits forever
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed = True
                    break
                if time.time() >= next_fault and proc.poll() is None:
                    killed = self.inject(proc)
                    if killed:
                        break
                    next_fault = time.time() + self.rng.expovariate(1 / self.args.mean_gap)
            if proc.poll() is None:  # out of time
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            self.proxy.clear()
            if self.service is not None:
                self.service.proxy.clear()
            stores.filesystem(out)[0].invalidate_cache()
            self.tally(proc.returncode, killed, out)
            self.seen_complete |= {s for s in sessions if schema.is_complete(f"{out}/{s}.zarr")}
            while (self.service is not None and proc.returncode != 0 and self.service.restarting.is_set()
                   and time.time() < deadline):
                time.sleep(1)  # no rerun into an outage: its readiness check would only time out
            if killed:
                time.sleep(float(self.env["SOMAFLOW_LEASE_TTL"]) + 1)  # the killed run's leases expire
            elif all(schema.is_complete(f"{out}/{s}.zarr") for s in sessions):
                return


    def tally(self, rc: int, killed: bool, out: str) -> None:
        """Count the round's exit status and its failed sessions by cause; keep what no fault explains."""
        self.exits[-9 if killed else rc] += 1
        if killed:
            return
        if rc not in (0, 1, 75, *FAULT_CODES):  # 75: the local cluster did not start (a loaded machine)
            self.defects.append(f"round {self.rounds}: archive exit {rc}")
        fs, path = stores.filesystem(f"{out}/archive_summary.json")
        if rc != 1 or not fs.exists(path):
            return
        for row in json.loads(fs.cat_file(path))["sessions"]:
            if row["status"] == "failed":
                code = row.get("exit_code", 70)
                self.failures[code] += 1
                if code not in FAULT_CODES:
                    self.defects.append(f"round {self.rounds}: {row['session']} failed ({code}): {row['reason']}")


def _manifest(path: Path, sessions: list[tuple[str, int]], params: dict | None = None) -> str:
    rows = [{"session": s, "movie": f"s3://{BUCKET}/raw/m{m}.tif", "fps": 10, **({"params": params} if params else {})}
            for s, m in sessions]
    path.write_text(json.dumps(rows))
    return str(path)


def _within_rounding(a: xr.Dataset, b: xr.Dataset, diff: dict[str, str]) -> bool:
    """Every difference is in a float variable and at most :data:`BATCHING_ROUNDING`."""
    for v in diff:
        if v not in a or v not in b or a[v].dtype.kind != "f" or a[v].shape != b[v].shape:
            return False
        if not np.allclose(a[v].values, b[v].values, rtol=0, atol=BATCHING_ROUNDING, equal_nan=True):
            return False
    return True


def _differences(a: xr.Dataset, b: xr.Dataset) -> dict[str, str]:
    """Each data variable that differs: how (shape, or how many values and the largest difference)."""
    out = {v: "missing on one side" for v in set(a.data_vars) ^ set(b.data_vars)}
    for v in set(a.data_vars) & set(b.data_vars):
        x, y = a[v].values, b[v].values
        if x.shape != y.shape:
            out[v] = f"shape {x.shape} vs {y.shape}"
        elif not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
            bad = ~((x == y) | (np.isnan(x) & np.isnan(y)) if x.dtype.kind == "f" else x == y)
            big = float(np.nanmax(np.abs(x.astype(float) - y.astype(float)))) if x.dtype.kind in "fiub" else None
            out[v] = f"{int(bad.sum())} of {x.size} values" + (f", largest difference {big:.3g}" if big is not None else "")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=24)
    ap.add_argument("--movies", type=int, default=6, help="distinct movies the sessions share")
    ap.add_argument("--frames", type=int, default=60, help="frames per simulated movie (2p-small, 128x128)")
    ap.add_argument("--method", default="cnmf")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=900, help="seconds for the soak phase")
    ap.add_argument("--mean-gap", type=float, default=10.0, help="mean seconds between faults")
    ap.add_argument("--archive-kills", type=int, default=3, help="SIGKILLs of the whole archive (one per round)")
    ap.add_argument("--stall", type=float, default=150.0,
                    help="seconds without a new log line after which an archive is taken as stalled, killed, rerun")
    ap.add_argument("--service", action="store_true",
                    help="CNN calls through the inference service (somaflow serve), whose faults join the others")
    ap.add_argument("--classifier", choices=["none", "3cnet", "3cnet-plus"],
                    help="classify.classifier of every session (default with --service and cnmf: 3cnet)")
    ap.add_argument("--service-kills", type=int, default=4, help="SIGKILLs of the service (one outage at a time)")
    ap.add_argument("--inference-deadline", type=float, default=60.0,
                    help="SOMAFLOW_INFERENCE_DEADLINE of the runs: service outages last up to 1.5x this")
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
    if args.service and args.method not in SERVED:
        ap.error(f"--service needs a method that calls a CNN: {', '.join(SERVED)}")
    if args.classifier is None and args.service and args.method == "cnmf":
        args.classifier = "3cnet"
    params = {"classify": {"classifier": args.classifier}} if args.classifier else None
    t_start = time.time()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log

    tmp = Path(tempfile.mkdtemp(prefix="somaflow-soak-"))
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    proxy = S3FaultProxy(f"http://{host}:{port}").start()
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update({**creds, "SOMAFLOW_S3_ENDPOINT_URL": f"http://{host}:{port}"})
    (tmp / "prefect").mkdir()
    server, api = _prefect_server(tmp / "prefect")
    env = {**os.environ, **creds, "SOMAFLOW_S3_ENDPOINT_URL": proxy.url, "PREFECT_API_URL": api,
           "PREFECT_HOME": str(tmp / "prefect"), "SOMAFLOW_LEASE_TTL": "10",
           "SOMAFLOW_INFERENCE_DEADLINE": str(args.inference_deadline)}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still cleans up below
    service = None
    if args.service:
        models = SERVED[args.method] + ([args.classifier] if args.classifier not in (None, "none") else [])
        service = Service(models, tmp / "serve.log")
    soak = Soak(args, proxy, env, tmp, service)
    try:
        if service is not None:
            service.start()
        fs, _ = stores.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        for m in range(args.movies):
            d = tmp / f"m{m}"
            write_simulation(simulate("2p-small", seed=100 + m, n_frames=args.frames), str(d))
            fs.put(str(d / "movie.tif"), f"{BUCKET}/raw/m{m}.tif")
        inputs_before = {m: fs.checksum(f"{BUCKET}/raw/m{m}.tif") for m in range(args.movies)}
        sessions = [(f"s{i:02d}", i % args.movies) for i in range(args.sessions)]

        t0 = time.time()
        ref = soak.archive(_manifest(tmp / "ref.yaml", [(f"ref{m}", m) for m in range(args.movies)], params),
                           f"s3://{BUCKET}/ref", tmp / "ref.log")
        if ref.wait() != 0:
            raise SystemExit(f"the fault-free reference archive failed: {(tmp / 'ref.log').read_text()[-3000:]}")
        t_ref = time.time() - t0

        t0 = time.time()
        served_ref = service.counts() if service is not None else Counter()
        soak.run_until_complete(_manifest(tmp / "soak.yaml", sessions, params), f"s3://{BUCKET}/soak",
                                [s for s, _ in sessions], t0 + args.budget)
        t_soak = time.time() - t0
        proxy.clear()

        fs.invalidate_cache()
        completed, lost, unfinished, corrupted = [], [], [], []
        differences: dict[str, dict[str, str]] = {}
        rounding: dict[str, dict[str, str]] = {}
        refs = {m: schema.open_result(f"s3://{BUCKET}/ref/ref{m}.zarr").load() for m in range(args.movies)}
        for s, m in sessions:
            url = f"s3://{BUCKET}/soak/{s}.zarr"
            if not schema.is_complete(url):
                (lost if s in soak.seen_complete else unfinished).append(s)
                continue
            completed.append(s)
            got = schema.open_result(url).load()
            diff = _differences(got, refs[m])
            if diff and args.service and _within_rounding(got, refs[m], diff):
                rounding[s] = diff
            elif diff:
                corrupted.append(s)
                differences[s] = diff
        inputs_changed = [m for m in range(args.movies) if fs.checksum(f"{BUCKET}/raw/m{m}.tif") != inputs_before[m]]
        figures = {
            "sessions_run": len(sessions), "distinct_movies": args.movies, "frames": args.frames,
            "method": args.method, "faults_injected": sum(soak.faults.values()), "faults": soak.faults,
            "s3_requests_faulted": {k: v for k, v in proxy.counts().items() if k.startswith("fault_")},
            "archive_rounds": soak.rounds, "stalled_archives_restarted": soak.stalls, "sessions_completed": len(completed), "results_lost": len(lost),
            "results_corrupted": len(corrupted), "lost": lost, "corrupted": corrupted, "differences": differences,
            "float_rounding_from_service_batching": rounding,
            "unfinished_when_the_budget_ran_out": unfinished,
            "inputs_changed": inputs_changed, "processes_outliving_a_killed_archive": soak.leaked,
            "archive_exits": dict(soak.exits), "session_failures_by_cause": dict(soak.failures),
            "failures_no_fault_explains": soak.defects,
            "seconds_reference": round(t_ref, 1), "seconds_soak": round(t_soak, 1),
            "seconds_total": round(time.time() - t_start, 1),
        }
        print(f"sessions run: {len(sessions)} ({args.movies} movies of {args.frames} frames, {args.method}); "
              f"archive rounds: {soak.rounds} (stalled and restarted: {soak.stalls})")
        print(f"faults injected: {figures['faults_injected']} {soak.faults}; S3 requests faulted: "
              f"{figures['s3_requests_faulted']}")
        if service is not None:
            faulted = {k: v for k, v in service.proxy.counts().items() if k.startswith("fault_")}
            served = service.counts()
            figures.update({"service_requests_faulted": faulted, "service_answered_soak": dict(served - served_ref),
                            "processes_outliving_a_killed_service": service.leaked, "classifier": args.classifier})
            print(f"inference service: requests faulted {faulted}; inferences answered in the soak "
                  f"{dict(served - served_ref)}; processes outliving a killed service: {len(service.leaked)}")
        print(f"archive exits: {dict(soak.exits)} (-9: killed by the soak); failed sessions by cause: "
              f"{dict(soak.failures)}; failures no fault explains: {len(soak.defects)}")
        for d in soak.defects:
            print(f"  {d}")
        print(f"sessions completed: {len(completed)} (unfinished when the budget ran out: {len(unfinished)}); "
              f"results lost: {len(lost)}; corrupted vs fault-free: {len(corrupted)}; inputs changed: "
              f"{len(inputs_changed)}; processes outliving a killed archive: {len(soak.leaked)}")
        for s, diff in differences.items():
            print(f"  {s} differs from the fault-free result: {diff}")
        if args.service:
            print(f"float rounding (<= {BATCHING_ROUNDING:g}) from the service's cross-request batching, not "
                  f"counted as corrupted: {len(rounding)} sessions {sorted({v for d in rounding.values() for v in d})}")
        print(f"time: reference {t_ref:.0f} s, soak {t_soak:.0f} s, total {figures['seconds_total']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        soak.stop()
        if service is not None:
            service.stop()
        os.killpg(server.pid, signal.SIGTERM)
        proxy.stop()
        moto.stop()
    ok = not lost and not corrupted and not inputs_changed and not unfinished and not soak.defects
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
