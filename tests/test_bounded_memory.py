"""Bounded worker memory: STNeuroNet and CNMF finish on a movie at least 4x larger than each
worker's memory limit, with no worker restarted (benchmarks/bench_memory.py does the run).

Slow: a 4 GiB movie through the whole pipeline, twice. ``SOMAFLOW_TEST_MEMORY_GB`` and
``SOMAFLOW_TEST_MEMORY_LIMIT`` scale it (keep their ratio at 4 or more).
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


@pytest.mark.slow
def test_movie_detector_and_cnmf_fit_in_workers_a_quarter_of_the_movie():
    gb = float(os.environ.get("SOMAFLOW_TEST_MEMORY_GB", "4"))
    limit = os.environ.get("SOMAFLOW_TEST_MEMORY_LIMIT", "1GiB")
    assert gb * 2**30 >= 4 * parse_bytes(limit), "the movie must be at least 4x a worker's memory limit"
    proc = subprocess.run([sys.executable, str(Path(REPO) / "benchmarks" / "bench_memory.py"), "--gb", str(gb),
                           "--limit", limit, "--methods", "stneuronet", "cnmf", "--json"],
                          capture_output=True, text=True, timeout=8 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["input_over_limit"] >= 4
    for run in out["runs"]:
        assert run["exit"] == 0, run
        assert run["workers_restarted"] == 0, run
        assert run["n_units"] > 0, run
