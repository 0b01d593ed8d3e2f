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
3. Each session's result is compared with its movie's reference: every data
   variable equal.

Prints sessions run, faults injected (by kind), sessions completed, results lost
(seen complete after some round, not complete at the end), corrupted (complete
but different from the fault-free result), unfinished (never completed before
the time budget ran out), and whether any process of a killed archive outlived it.

Usage::

    python benchmarks/bench_soak.py [--sessions 24] [--movies 6] [--frames 60] [--seed 0]
                                    [--budget 900] [--mean-gap 10] [--archive-kills 3] [--method cnmf]
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
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import xarray as xr
from moto.server import ThreadedMotoServer

from somaflow.io import schema, stores
from somaflow.simulate import simulate, write_simulation
from somaflow.testing.s3proxy import Fault, S3FaultProxy

BIN = Path(sys.executable).parent
BUCKET = "soak"
#: attrs that differ between two runs of the same computation
VOLATILE_ATTRS = {"timings", "created", "provenance", "flow_run_id", "stage_hash"}


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
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    raise RuntimeError("the Prefect server did not start")


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


class Soak:
    def __init__(self, args: argparse.Namespace, proxy: S3FaultProxy, env: dict[str, str], tmp: Path) -> None:
        self.args, self.proxy, self.env, self.tmp = args, proxy, env, tmp
        self.rng = random.Random(args.seed)
        self.faults: dict[str, int] = {"worker-sigkill": 0, "s3-errors": 0, "archive-sigkill": 0}
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
        kind = self.rng.choices(kinds, weights=weights)[0]
        if kind == "worker-sigkill":
            workers = [p for p in _group(proc) if p.pid != proc.pid and "spawn_main" in " ".join(p.cmdline())]
            if len(workers) < 2:  # leave the cluster one worker while the nanny restarts the other
                return False
            os.kill(self.rng.choice(workers).pid, signal.SIGKILL)
        elif kind == "s3-errors":
            self.proxy.inject(Fault(self.rng.choice(["503", "500", "reset", "slow"]), first=self.rng.randint(2, 6),
                                    delay=1.0, seed=self.rng.randint(0, 10**6)))
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
            stores.filesystem(out)[0].invalidate_cache()
            self.seen_complete |= {s for s in sessions if schema.is_complete(f"{out}/{s}.zarr")}
            if killed:
                time.sleep(float(self.env["SOMAFLOW_LEASE_TTL"]) + 1)  # the killed run's leases expire
            elif all(schema.is_complete(f"{out}/{s}.zarr") for s in sessions):
                return


def _manifest(path: Path, sessions: list[tuple[str, int]]) -> str:
    rows = [{"session": s, "movie": f"s3://{BUCKET}/raw/m{m}.tif", "fps": 10} for s, m in sessions]
    path.write_text(json.dumps(rows))
    return str(path)


def _same(a: xr.Dataset, b: xr.Dataset) -> bool:
    if set(a.data_vars) != set(b.data_vars):
        return False
    return all(np.array_equal(a[v].values, b[v].values, equal_nan=a[v].dtype.kind == "f") for v in a.data_vars)


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
    ap.add_argument("--json", help="write the figures here too")
    args = ap.parse_args()
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
           "PREFECT_HOME": str(tmp / "prefect"), "SOMAFLOW_LEASE_TTL": "10"}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout's SIGTERM still cleans up below
    soak = Soak(args, proxy, env, tmp)
    try:
        fs, _ = stores.filesystem(f"s3://{BUCKET}")
        fs.mkdir(BUCKET)
        for m in range(args.movies):
            d = tmp / f"m{m}"
            write_simulation(simulate("2p-small", seed=100 + m, n_frames=args.frames), str(d))
            fs.put(str(d / "movie.tif"), f"{BUCKET}/raw/m{m}.tif")
        inputs_before = {m: fs.checksum(f"{BUCKET}/raw/m{m}.tif") for m in range(args.movies)}
        sessions = [(f"s{i:02d}", i % args.movies) for i in range(args.sessions)]

        t0 = time.time()
        ref = soak.archive(_manifest(tmp / "ref.yaml", [(f"ref{m}", m) for m in range(args.movies)]),
                           f"s3://{BUCKET}/ref", tmp / "ref.log")
        if ref.wait() != 0:
            raise SystemExit(f"the fault-free reference archive failed: {(tmp / 'ref.log').read_text()[-3000:]}")
        t_ref = time.time() - t0

        t0 = time.time()
        soak.run_until_complete(_manifest(tmp / "soak.yaml", sessions), f"s3://{BUCKET}/soak",
                                [s for s, _ in sessions], t0 + args.budget)
        t_soak = time.time() - t0
        proxy.clear()

        fs.invalidate_cache()
        completed, lost, unfinished, corrupted = [], [], [], []
        refs = {m: schema.open_result(f"s3://{BUCKET}/ref/ref{m}.zarr").load() for m in range(args.movies)}
        for s, m in sessions:
            url = f"s3://{BUCKET}/soak/{s}.zarr"
            if not schema.is_complete(url):
                (lost if s in soak.seen_complete else unfinished).append(s)
                continue
            completed.append(s)
            if not _same(schema.open_result(url).load(), refs[m]):
                corrupted.append(s)
        inputs_changed = [m for m in range(args.movies) if fs.checksum(f"{BUCKET}/raw/m{m}.tif") != inputs_before[m]]
        figures = {
            "sessions_run": len(sessions), "distinct_movies": args.movies, "frames": args.frames,
            "method": args.method, "faults_injected": sum(soak.faults.values()), "faults": soak.faults,
            "s3_requests_faulted": {k: v for k, v in proxy.counts().items() if k.startswith("fault_")},
            "archive_rounds": soak.rounds, "stalled_archives_restarted": soak.stalls, "sessions_completed": len(completed), "results_lost": len(lost),
            "results_corrupted": len(corrupted), "lost": lost, "corrupted": corrupted,
            "unfinished_when_the_budget_ran_out": unfinished,
            "inputs_changed": inputs_changed, "processes_outliving_a_killed_archive": soak.leaked,
            "seconds_reference": round(t_ref, 1), "seconds_soak": round(t_soak, 1),
            "seconds_total": round(time.time() - t_start, 1),
        }
        print(f"sessions run: {len(sessions)} ({args.movies} movies of {args.frames} frames, {args.method}); "
              f"archive rounds: {soak.rounds} (stalled and restarted: {soak.stalls})")
        print(f"faults injected: {figures['faults_injected']} {soak.faults}; S3 requests faulted: "
              f"{figures['s3_requests_faulted']}")
        print(f"sessions completed: {len(completed)} (unfinished when the budget ran out: {len(unfinished)}); "
              f"results lost: {len(lost)}; corrupted vs fault-free: {len(corrupted)}; inputs changed: "
              f"{len(inputs_changed)}; processes outliving a killed archive: {len(soak.leaked)}")
        print(f"time: reference {t_ref:.0f} s, soak {t_soak:.0f} s, total {figures['seconds_total']:.0f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        soak.stop()
        os.killpg(server.pid, signal.SIGTERM)
        proxy.stop()
        moto.stop()
    ok = not lost and not corrupted and not inputs_changed and not unfinished
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
