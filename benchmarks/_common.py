"""Helpers shared by the benchmark scripts: peak-memory sampling, simulated movie zarrs."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil


def machine() -> str:
    """One line describing this machine."""
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB"


class PeakRSS:
    """Samples the resident memory of this process and of Dask's worker processes."""

    def __init__(self, client=None, interval: float = 0.2) -> None:
        self.client = client
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._procs: dict[str, psutil.Process] = {"client": psutil.Process()}
        if client is not None:
            pids = client.run(os.getpid)
            for addr, pid in pids.items():
                self._procs[f"worker {addr.rsplit(':', 1)[-1]}"] = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, proc in self._procs.items():
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.peaks[name] = max(self.peaks.get(name, 0), rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> str:
        return ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in sorted(self.peaks.items()))

    def worker_peak(self) -> int:
        return max((v for k, v in self.peaks.items() if k.startswith("worker")), default=0)


@contextmanager
def timer() -> Iterator[list[float]]:
    out: list[float] = []
    t0 = time.perf_counter()
    yield out
    out.append(time.perf_counter() - t0)


class TreePeak:
    """Peak of the resident memory summed over a process and all its descendants."""

    def __init__(self, pid: int, interval: float) -> None:
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
