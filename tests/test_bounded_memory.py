"""Bounded worker memory: STNeuroNet and CNMF finish on a movie at least 4x larger than each
worker's memory limit, with no worker restarted (benchmarks/bench_memory.py does the run).

Slow: a 4 GiB movie through the whole pipeline, one method per test. ``SOMAFLOW_TEST_MEMORY_GB``,
``SOMAFLOW_TEST_MEMORY_LIMIT`` and ``SOMAFLOW_TEST_MEMORY_SIZE`` (frame side, px) scale it (keep the
movie at 4 or more times the limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from dask.utils import parse_bytes

from conftest import REPO


def _bench(method: str, size: int) -> dict:
    gb = float(os.environ.get("SOMAFLOW_TEST_MEMORY_GB", "4"))
    limit = os.environ.get("SOMAFLOW_TEST_MEMORY_LIMIT", "1GiB")
    size = int(os.environ.get("SOMAFLOW_TEST_MEMORY_SIZE", size))
    assert gb * 2**30 >= 4 * parse_bytes(limit), "the movie must be at least 4x a worker's memory limit"
    proc = subprocess.run([sys.executable, str(Path(REPO) / "benchmarks" / "bench_memory.py"), "--gb", str(gb),
                           "--limit", limit, "--size", str(size), "--methods", method, "--json"],
                          capture_output=True, text=True, timeout=8 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["input_over_limit"] >= 4
    (run,) = out["runs"]
    assert run["exit"] == 0, run
    assert run["workers_restarted"] == 0, run
    assert run["n_units"] > 0, run
    return run


@pytest.mark.slow
def test_stneuronet_fits_in_workers_a_quarter_of_the_movie():
    # 256² frames: the batch tasks hold the binned batch and one forward pass of a 256² tile (the
    # shipped tile size), ~0.35 GB over a worker's ~0.3 GB with torch loaded
    run = _bench("stneuronet", 256)
    assert max(run["peak_mib"].values()) < 0.95 * parse_bytes(
        os.environ.get("SOMAFLOW_TEST_MEMORY_LIMIT", "1GiB")) / 2**20, run


@pytest.mark.slow
def test_cnmf_fits_in_workers_a_quarter_of_the_movie():
    # the default method; its bounded memory is worked on separately from the movie detectors'
    _bench("cnmf", 512)
