"""Load on the inference service (`somaflow serve`, Triton): throughput, latency and batch size.

For each workload and each number of concurrent clients, clients send infer requests
over HTTP with binary tensors (tritonclient) for ``--seconds``; the script prints
requests/s, examples/s, p50/p99 request latency, and the mean batch size Triton's
dynamic batcher formed (``nv_inference_count`` / ``nv_inference_exec_count`` from its
metrics port). Workloads, as the pipeline sends them:

* ``stneuronet`` — one spatial tile of one temporal batch per request: (1, 1, T, 280, 280)
  float32 (T = 120 binned frames, a 512 x 512 frame's tile with its 24-px margin; one
  test-time view). "512² frames/s" converts it: 4 tiles per 512 x 512 batch, T binned
  frames = 5 T raw frames of a 30 Hz movie.
* ``3cnet`` — ``--crops`` candidate crops (N, 2, 92, 92) per request.

Without ``--url`` it starts the service on loopback ports (``somaflow serve --device auto``)
and stops it at the end; loopback only.

    python benchmarks/bench_service.py [--url http://127.0.0.1:8000] [--seconds 30]
        [--concurrency 1 4 16] [--workloads stneuronet 3cnet] [--frames 120] [--crops 16] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402

TILE = 280  # a 512-px frame's tile: 256-px core + 24-px margin, clipped at the frame's edge
RAW_PER_BINNED = 5  # a 30 Hz movie binned to 6 Hz


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(models: list[str], log: Path) -> tuple[subprocess.Popen, str, str]:
    """`somaflow serve` on free loopback ports; returns the process, its URL and metrics URL."""
    h, g, m = _port(), _port(), _port()
    exe = Path(sys.executable).with_name("somaflow")
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--http-port", str(h), "--grpc-port", str(g),
                             "--metrics-port", str(m), "--models", *models], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{h}", f"http://127.0.0.1:{m}/metrics"


def counters(metrics_url: str, model: str) -> tuple[int, int]:
    """Triton's (inference count, execution count) of ``model``: examples and batches run."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = []
    for name in ("nv_inference_count", "nv_inference_exec_count"):
        m = re.search(rf'{name}{{model="{re.escape(model)}",version="1"}} (\d+)', text)
        out.append(int(m.group(1)) if m else 0)
    return out[0], out[1]


def load(url: str, metrics_url: str, model: str, batch: np.ndarray, clients: int, seconds: float) -> dict:
    """``clients`` threads sending ``batch`` to ``model`` for ``seconds``."""
    import tritonclient.http as httpclient

    host = url.split("://", 1)[1]
    token = os.environ.get("SOMAFLOW_INFERENCE_TOKEN")
    headers = {"somaflow-token": token} if token else None
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        c = httpclient.InferenceServerClient(host, network_timeout=600, connection_timeout=30)
        inp = httpclient.InferInput("input", list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch, binary_data=True)
        out = [httpclient.InferRequestedOutput("probability", binary_data=True)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                c.infer(model, [inp], outputs=out, headers=headers).as_numpy("probability")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
        c.close()

    n0, e0 = counters(metrics_url, model)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n1, e1 = counters(metrics_url, model)
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"model": model, "clients": clients, "request_shape": list(batch.shape), "requests": len(latencies),
            "errors": len(errors), "first_error": errors[0] if errors else None, "seconds": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3),
            "examples_per_s": round(len(latencies) * batch.shape[0] / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1),
            "mean_batch": round((n1 - n0) / (e1 - e0), 2) if e1 > e0 else None,
            "request_mb": round(batch.nbytes / 2**20, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running service (default: start one on loopback)")
    ap.add_argument("--seconds", type=float, default=30.0, help="load per level (default 30)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--workloads", nargs="+", default=["stneuronet", "3cnet"], choices=["stneuronet", "3cnet"])
    ap.add_argument("--frames", type=int, default=120, help="binned frames per STNeuroNet request (default 120)")
    ap.add_argument("--crops", type=int, default=16, help="3CNet crops per request (default 16)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from somaflow.inference import RemoteBackend

    proc = None
    if args.url:
        url = args.url.rstrip("/")
        metrics_url = url.rsplit(":", 1)[0] + ":8002/metrics"
    else:
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_service-{os.getpid()}.log"
        proc, url, metrics_url = start_service(args.workloads, log)
    try:
        t0 = time.perf_counter()
        RemoteBackend(url, deadline=900).wait_ready()
        started = time.perf_counter() - t0
        with urllib.request.urlopen(url + "/v2/models/stneuronet/config" if "stneuronet" in args.workloads
                                    else url + "/v2/models/3cnet/config", timeout=10) as r:
            device = "GPU" if "KIND_GPU" in r.read().decode() else "CPU"
        rng = np.random.default_rng(0)
        batches = {"stneuronet": rng.normal(size=(1, 1, args.frames, TILE, TILE)).astype(np.float32),
                   "3cnet": rng.normal(size=(args.crops, 2, 92, 92)).astype(np.float32)}
        rows = []
        for model in args.workloads:
            load(url, metrics_url, model, batches[model], 1, min(args.seconds, 5.0))  # warm-up
            for c in args.concurrency:
                row = load(url, metrics_url, model, batches[model], c, args.seconds)
                if model == "stneuronet":
                    row["frames512_per_s"] = round(row["requests_per_s"] / 4 * args.frames * RAW_PER_BINNED, 1)
                rows.append(row)
                if not args.json:
                    print(f"{model:10s} clients {c:2d}: {row['requests_per_s']:8.2f} req/s "
                          f"{row['examples_per_s']:9.2f} examples/s  p50 {row['p50_ms']:8.1f} ms  "
                          f"p99 {row['p99_ms']:8.1f} ms  mean batch {row['mean_batch']}"
                          + (f"  512² frames/s {row['frames512_per_s']}" if model == "stneuronet" else "")
                          + (f"  errors {row['errors']}: {row['first_error']}" if row["errors"] else ""),
                          flush=True)
        summary = {"machine": machine(), "service_device": device, "url": url,
                   "service_ready_s": round(started, 1), "rows": rows}
        if args.json:
            print(json.dumps(summary))
        else:
            print(f"machine: {summary['machine']}; service on {device}; ready after {started:.1f} s")
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
