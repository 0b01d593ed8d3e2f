"""Runs across machines that share nothing but the object store (issue 22).

A scheduler, two workers and the client run as separate processes, each with
its own private TMPDIR, HOME and working directory; input and result are
``s3://`` URLs on the loopback S3 server. Every process records any file it
opens under another process's private directory, the scheduler records every
task's pickled size, and dask's "large object in task graph" warning is an
error in the client. Each method's result must equal the same run on an
ordinary local cluster (shared disk, local paths).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import run_cli
from isolated_cluster import IsolatedCluster
from somaflow.extract import METHODS
from somaflow.io import schema

# two archives of 8 sessions in one fixture: ~5 min on a quiet 2-core machine, far more under load
pytestmark = [pytest.mark.integration, pytest.mark.timeout(2400)]

#: one task may carry at most this much (pickled run spec); array data travels through the store
TASK_LIMIT = 1 << 20

CASES = [(m, "2p-small") for m in METHODS] + [("cnmf", "1p-small")]


@pytest.fixture(scope="module")
def isolated(s3_server, tmp_path_factory, prefect_api):
    env = {**s3_server, "PREFECT_API_URL": prefect_api["PREFECT_API_URL"],
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    with IsolatedCluster(tmp_path_factory.mktemp("isolated"), env) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def runs(make_movie, s3_server, isolated, prefect_api, tmp_path_factory):
    """Every case as one session of an archive, run twice: on the isolated cluster (manifest,
    movies and results on S3) and on an ordinary local cluster (local paths). Returns the
    isolated run's client process, its archive summary, and the two result prefixes."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["SOMAFLOW_S3_ENDPOINT_URL"], skip_instance_cache=True)
    bucket = "multinode"
    fs.mkdir(bucket)
    root = tmp_path_factory.mktemp("multinode-local")
    local, remote = [], []
    for method, preset in CASES:  # each session its own movie file, as in an archive
        sim = make_movie(51, n_frames=120, preset=preset)
        meta = json.loads((sim / "meta.json").read_text())
        session = f"{method}-{preset}"
        movie = root / f"{session}.tif"
        shutil.copy(sim / "movie.tif", movie)
        url = f"s3://{bucket}/movies/{session}.tif"
        fs.put(str(movie), url)
        row = {"session": session, "fps": meta["fps"], "modality": meta["modality"],
               "neuron_radius": meta["neuron_radius"], "params": {"method": method}}
        local.append({**row, "movie": str(movie)})
        remote.append({**row, "movie": url})
    fs.pipe(f"s3://{bucket}/manifest.yaml", yaml.safe_dump(remote).encode())
    (root / "manifest.yaml").write_text(yaml.safe_dump(local))

    out = f"s3://{bucket}/results"
    proc = isolated.run_client(
        "archive", f"s3://{bucket}/manifest.yaml", "--out", out, "--cluster", isolated.address,
        "--concurrency", "2", "--json", timeout=1200,
        extra_env={"PYTHONWARNINGS": "error:Large object:UserWarning,error:Sending large graph:UserWarning"})
    ref = root / "results"
    run_cli("archive", str(root / "manifest.yaml"), "--out", str(ref), "--cluster", "local", "--workers", "2",
            "--concurrency", "2", "--json", env=prefect_api, timeout=1200)
    fs.invalidate_cache()
    return proc, out, ref


def test_nothing_but_the_store_is_shared(runs, isolated):
    proc, _, _ = runs
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{isolated.worker_logs()}"
    summary = json.loads(proc.stdout)
    assert summary["counts"] == {"done": len(CASES), "skipped": 0, "failed": 0}, summary["sessions"]
    assert isolated.violations() == {}, isolated.violations()
    largest, over = isolated.task_sizes()
    assert not over and 0 < largest < TASK_LIMIT, (largest, over[:5])


@pytest.mark.parametrize("method, preset", CASES)
def test_each_method_equals_its_run_on_a_local_cluster(method, preset, runs):
    proc, out, ref = runs
    assert proc.returncode == 0
    got = schema.open_result(f"{out}/{method}-{preset}.zarr")
    want = schema.open_result(str(ref / f"{method}-{preset}.zarr"))
    assert json.loads(got.attrs["params"])["extract"]["method"] == method
    assert got.sizes == want.sizes
    np.testing.assert_array_equal(got["masks"].values, want["masks"].values)
    np.testing.assert_array_equal(got["accepted"].values, want["accepted"].values)
    for name in ("traces", "dff"):
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["shifts"].values, want["shifts"].values, atol=1e-4)
    np.testing.assert_allclose(got["correlation_image"].values, want["correlation_image"].values, atol=1e-5)
