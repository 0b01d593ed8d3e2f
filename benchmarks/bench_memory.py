"""Workers' peak memory on a movie several times larger than each worker's memory limit.

Writes a synthetic uint16 BigTIFF of ``--gb`` gigabytes (``--size``² frames: a
noisy background with blinking Gaussian cells), starts a ``dask scheduler`` and
``dask worker --nworkers N --nthreads 1 --memory-limit LIMIT`` as separate
processes, and runs ``somaflow run --cluster tcp://…`` once per ``--methods``.
While each run goes, the workers' resident memory is sampled every
``--interval`` seconds (``client.run`` of the worker's process-memory
monitor); a worker that the nanny restarted shows up as a new address.

Prints, per method: seconds, exit status, each worker's peak memory (MiB:
``peak_mib`` sampled, ``peak_hwm_mib`` the kernel's high-water mark of the
workers that lived through the run, Linux), the limit, and the workers
restarted (should be 0).

    .venv/bin/python benchmarks/bench_memory.py --gb 4 --limit 1GiB --methods cnmf stneuronet
    .venv/bin/python benchmarks/bench_memory.py --gb 4 --size 256 --limit 1GiB --methods stneuronet
    .venv/bin/python benchmarks/bench_memory.py --gb 0.6 --limit 600MiB --methods cnmf --json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402

BIN = Path(sys.executable).parent


def write_movie(path: Path, gb: float, size: int, seed: int = 0, block: int = 64) -> int:
    """A (frames, size, size) uint16 BigTIFF of about ``gb`` GiB written block by block; returns frames."""
    import numpy as np
    import tifffile

    frames = max(2 * block, int(gb * 2**30 / (size * size * 2)))
    rng = np.random.default_rng(seed)
    n_cells = max(4, size * size // 900)
    yy, xx = np.mgrid[:size, :size]
    centers = rng.uniform(8, size - 8, (n_cells, 2))
    shapes = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 4.0**2)) for cy, cx in centers])
    shapes = shapes.reshape(n_cells, -1).astype(np.float32)
    movie = tifffile.memmap(path, shape=(frames, size, size), dtype=np.uint16, bigtiff=True)
    for i in range(0, frames, block):
        n = min(block, frames - i)
        activity = (rng.random((n, n_cells)) < 0.05).astype(np.float32) * rng.uniform(300, 900, (n, n_cells))
        frame = 500 + activity @ shapes + rng.normal(0, 30, (n, size * size))
        movie[i:i + n] = np.clip(frame, 0, 65535).astype(np.uint16).reshape(n, size, size)
    movie.flush()
    del movie
    return frames


def _reset_peak() -> None:
    """Restart the process's resident high-water mark (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _peak_rss() -> int:
    """The process's resident high-water mark (bytes; Linux ``VmHWM``), 0 where unknown: exact where
    the sampling every ``--interval`` seconds can miss a short peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples every worker's process memory (bytes) until stopped; keeps the peak per address."""

    def __init__(self, address: str, interval: float) -> None:
        from distributed import Client

        self.client = Client(address, timeout="60s")
        self.interval = interval
        self.peak: dict[str, int] = {}
        self.hwm: dict[str, int] = {}
        self.first = set(self.client.scheduler_info()["workers"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.client.run(lambda dask_worker: dask_worker.monitor.get_process_memory())
                for addr, value in rss.items():
                    self.peak[addr] = max(self.peak.get(addr, 0), int(value))
            except Exception:  # a worker going away mid-call: seen as a new address next time
                pass
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        try:  # the kernel's high-water mark restarts from the current resident size
            self.client.run(_reset_peak)
        except Exception:
            pass
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        try:
            self.hwm = {a: v for a, v in self.client.run(_peak_rss).items() if v}
        except Exception:
            self.hwm = {}

    def restarted(self) -> list[str]:
        """Worker addresses seen that were not there at the start (a restarted worker's new process)."""
        now = set(self.client.scheduler_info()["workers"]) | set(self.peak)
        return sorted(now - self.first)


def _parse_bytes(text: str) -> int:
    from dask.utils import parse_bytes

    return int(parse_bytes(text))


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        movie = Path(tmp) / "big.tif"
        t = time.perf_counter()
        frames = write_movie(movie, args.gb, args.size)
        size = movie.stat().st_size
        written = time.perf_counter() - t
        env = {**os.environ, "PREFECT_HOME": str(Path(tmp) / "prefect"), "DO_NOT_TRACK": "1",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
        port = 9786 + os.getpid() % 1000
        address = f"tcp://127.0.0.1:{port}"
        procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                   "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True)]
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", str(args.workers),
                                       "--nthreads", "1", "--memory-limit", args.limit, "--no-dashboard"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True))
        results = []
        try:
            from distributed import Client

            with Client(address, timeout="60s") as c:
                c.wait_for_workers(args.workers, timeout=180)
            for method in args.methods:
                out = Path(tmp) / f"{method}.zarr"
                cmd = [str(BIN / "somaflow"), "run", str(movie), "--out", str(out), "--fps", str(args.fps),
                       "--method", method, "--cluster", address, "--json"]
                with MemorySampler(address, args.interval) as sampler:
                    t0 = time.perf_counter()
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                    seconds = time.perf_counter() - t0
                restarted = sampler.restarted()
                results.append({
                    "method": method, "seconds": round(seconds, 1), "exit": proc.returncode,
                    "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None,
                    "n_units": json.loads(proc.stdout).get("n_units") if proc.returncode == 0 else None,
                    "peak_mib": {a: round(v / 2**20) for a, v in sorted(sampler.peak.items())},
                    "peak_hwm_mib": {a: round(v / 2**20) for a, v in sorted(sampler.hwm.items())},
                    "workers_restarted": len(restarted),
                })
                sampler.client.close()
                if out.exists():
                    subprocess.run(["rm", "-rf", str(out), str(out) + ".work"], check=False)
        finally:
            for p in procs:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(30)
    return {"input_bytes": size, "frames": frames, "frame_size": args.size, "write_seconds": round(written, 1),
            "workers": args.workers, "memory_limit_mib": round(_parse_bytes(args.limit) / 2**20),
            "input_over_limit": round(size / _parse_bytes(args.limit), 2), "runs": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=4.0, help="input size (GiB)")
    p.add_argument("--size", type=int, default=512, help="frame height and width (px)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--limit", default="1GiB", help="each worker's --memory-limit")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["cnmf", "stneuronet"])
    p.add_argument("--interval", type=float, default=1.0, help="seconds between memory samples")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per run")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = run(args)
    out["machine"] = machine()
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
