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

import numpy as np
import pytest

from conftest import run_cli
from isolated_cluster import IsolatedCluster
from somaflow.extract import METHODS
from somaflow.io import schema, stores

pytestmark = pytest.mark.integration

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
def movies(make_movie, s3_server):
    """The small movies, put on S3 once: preset -> (local folder, s3 URL of movie.tif)."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_server["SOMAFLOW_S3_ENDPOINT_URL"], skip_instance_cache=True)
    bucket = "multinode-movies"
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    out = {}
    for preset in ("2p-small", "1p-small"):
        sim = make_movie(51, n_frames=120, preset=preset)
        url = f"s3://{bucket}/{preset}/movie.tif"
        fs.put(str(sim / "movie.tif"), url)
        out[preset] = (sim, url)
    return out


def _meta(sim) -> dict:
    return json.loads((sim / "meta.json").read_text())


def _args(sim, method: str) -> list[str]:
    m = _meta(sim)
    return ["--fps", str(m["fps"]), "--modality", m["modality"], "--neuron-radius", str(m["neuron_radius"]),
            "--method", method, "--json"]


@pytest.mark.parametrize("method, preset", CASES)
def test_every_method_runs_with_nothing_shared_but_the_store(method, preset, isolated, movies, s3_bucket,
                                                             s3_server, tmp_path, prefect_api):
    sim, movie = movies[preset]
    out = f"{s3_bucket}/results/{method}-{preset}.zarr"
    proc = isolated.run_client("run", movie, "--out", out, "--cluster", isolated.address, *_args(sim, method),
                               extra_env={"PYTHONWARNINGS": "error:Large object:UserWarning,"
                                                           "error:Sending large graph:UserWarning"})
    assert proc.returncode == 0, f"{proc.stderr[-4000:]}\n{isolated.worker_logs()}"
    assert json.loads(proc.stdout)["status"] == "done"
    assert isolated.violations() == {}, isolated.violations()
    largest, over = isolated.task_sizes()
    assert not over and largest < TASK_LIMIT, (largest, over[:5])

    ref = tmp_path / "ref.zarr"
    run_cli("run", str(sim / "movie.tif"), "--out", str(ref), "--cluster", "local", "--workers", "2",
            *_args(sim, method), env=prefect_api)
    stores.filesystem(out)[0].invalidate_cache()
    got, want = schema.open_result(out), schema.open_result(str(ref))
    assert got.sizes == want.sizes
    np.testing.assert_array_equal(got["masks"].values, want["masks"].values)
    np.testing.assert_array_equal(got["accepted"].values, want["accepted"].values)
    for name in ("traces", "dff"):
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got["shifts"].values, want["shifts"].values, atol=1e-4)
    np.testing.assert_allclose(got["correlation_image"].values, want["correlation_image"].values, atol=1e-5)
