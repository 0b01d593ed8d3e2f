"""A store that misbehaves: transient faults are retried (the result is the fault-free one), a store
that is gone stops the run with exit 3 naming it, a broken file is still exit 2; on S3 stage outputs
are written in place (no server-side COPY) and the source checksum comes from a listing.

Every run goes through :class:`somaflow.testing.s3proxy.S3FaultProxy` in front of the loopback
moto server, as a separate ``somaflow`` process.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tifffile

from conftest import run_cli
from somaflow.errors import StoreUnavailableError
from somaflow.io import schema, stores
from somaflow.testing.s3proxy import Fault, S3FaultProxy

#: what keeps a run fast here: the local-maxima method on two threads (no worker processes to start)
_RUN = ("--method", "local-maxima", "--cluster", "threads", "--workers", "2")
#: retry settings of these runs: few botocore attempts and short stage delays keep the "down" case short
_RETRY_ENV = {"SOMAFLOW_S3_MAX_ATTEMPTS": "3", "SOMAFLOW_STAGE_RETRY_DELAY": "1"}
#: how long a run against a store that is gone may take to give up, with _RETRY_ENV (s)
DOWN_DEADLINE = 90.0


@pytest.fixture()
def proxy(s3_server):
    with S3FaultProxy(s3_server["SOMAFLOW_S3_ENDPOINT_URL"]) as p:
        yield p


@pytest.fixture(scope="module")
def movie_file(tmp_path_factory):
    """A small simulated 2p movie (TIFF) and its metadata."""
    from somaflow.simulate import simulate, write_simulation

    out = tmp_path_factory.mktemp("faults") / "sim"
    write_simulation(simulate("2p-small", seed=5, n_frames=60, motion="none"), str(out))
    return out / "movie.tif", json.loads((out / "meta.json").read_text())


def _env(prefect_api, s3_server, proxy, **extra) -> dict[str, str]:
    return {**prefect_api, **s3_server, "SOMAFLOW_S3_ENDPOINT_URL": proxy.url, **_RETRY_ENV, **extra}


def _run(bucket, name, meta, env, check=True):
    args = ("run", f"{bucket}/raw/movie.tif", "--out", f"{bucket}/{name}.zarr", "--fps", str(meta["fps"]),
            "--neuron-radius", str(meta["neuron_radius"]), *_RUN)
    return run_cli(*args, env=env, check=check, timeout=300)


def _load(url):
    ds = schema.open_result(url).load()
    return {k: np.asarray(ds[k].values) for k in ("masks", "traces", "mean_image", "shifts")}


# ----------------------------------------------------------------------------- classification


def test_transient_failures_are_told_from_broken_inputs():
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    def client_error(status, code):
        return ClientError({"Error": {"Code": code, "Message": "m"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    for exc in (ConnectionClosedError(endpoint_url="http://x"), EndpointConnectionError(endpoint_url="http://x"),
                ReadTimeoutError(endpoint_url="http://x"), ConnectionResetError(104, "reset"),
                client_error(503, "SlowDown"), client_error(500, "InternalError"), TimeoutError()):
        assert stores.is_transient(exc), exc
    wrapped = OSError(5, "wrapped")
    wrapped.__cause__ = client_error(503, "ServiceUnavailable")  # as s3fs translates a 503
    assert stores.is_transient(wrapped)
    for exc in (FileNotFoundError("x"), PermissionError("denied"), client_error(403, "AccessDenied"),
                client_error(404, "NoSuchKey"), ValueError("TIFF page 3 is truncated"),
                tifffile.TiffFileError("not a TIFF file")):
        assert not stores.is_transient(exc), exc
    err = stores.unavailable("s3://bucket/x.zarr", ConnectionClosedError(endpoint_url="http://h:1"))
    assert isinstance(err, StoreUnavailableError) and err.exit_code == 3
    assert "the store s3://bucket" in str(err) and "did not answer after" in str(err) and "\n" not in str(err)


def test_s3_requests_use_botocore_retries(monkeypatch):
    monkeypatch.setenv("SOMAFLOW_S3_MAX_ATTEMPTS", "7")
    cfg = stores.storage_options_for("s3://b/k")["config_kwargs"]
    assert cfg["retries"] == {"max_attempts": 7, "mode": "standard"}
    assert cfg["connect_timeout"] > 0 and cfg["read_timeout"] > 0
    mine = stores.storage_options_for("s3://b/k", {"config_kwargs": {"retries": {"max_attempts": 2}}})
    assert mine["config_kwargs"]["retries"] == {"max_attempts": 2}  # the caller's win
    assert "config_kwargs" not in stores.storage_options_for("/local/path")


# ----------------------------------------------------------------------------- checksum from the listing


def test_source_checksum_reads_no_data(s3_bucket, proxy, monkeypatch, tmp_path):
    monkeypatch.setenv("SOMAFLOW_S3_ENDPOINT_URL", proxy.url)
    fs, _ = stores.filesystem(s3_bucket)
    payload = np.random.default_rng(0).bytes(4 << 20)
    fs.pipe(f"{s3_bucket}/in/a.bin", payload)
    proxy.reset_counts()
    c1 = stores.checksum(f"{s3_bucket}/in/a.bin")
    assert proxy.counts().get("bytes_out", 0) < 64 << 10  # a HEAD or a listing, not 4 MiB
    assert stores.checksum(f"{s3_bucket}/in/a.bin") == c1
    fs.pipe(f"{s3_bucket}/in/a.bin", payload[:-1] + b"\0" if payload[-1:] != b"\0" else payload[:-1] + b"\1")
    assert stores.checksum(f"{s3_bucket}/in/a.bin") != c1  # same size, new content: new ETag
    # local files: size and modification time (rsync's quick check)
    f = tmp_path / "m.bin"
    f.write_bytes(b"abc" * 100)
    c = stores.checksum(str(f))
    import os

    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert stores.checksum(str(f)) != c


# ----------------------------------------------------------------------------- runs through the proxy


def test_transient_faults_give_the_fault_free_result_and_no_copies(movie_file, s3_bucket, s3_server, proxy,
                                                                   prefect_api):
    tif, meta = movie_file
    fs, _ = stores.filesystem(s3_bucket)
    fs.put(str(tif), f"{s3_bucket}/raw/movie.tif")
    env = _env(prefect_api, s3_server, proxy, SOMAFLOW_S3_MAX_ATTEMPTS="8")
    proxy.reset_counts()
    _run(s3_bucket, "clean", meta, env)
    counts = proxy.counts()
    # stage outputs are written in place and committed by their complete marker: nothing is copied
    assert counts.get("COPY", 0) == 0, counts
    assert counts.get("PUT", 0) > 0
    proxy.reset_counts()
    # the first requests of the run: one in three gets a 503 Slow Down or a reset connection, and
    # ten answers take a second; 8 botocore attempts per request make a request that still fails
    # unlikely (3**-8), and a stage that does is retried by Prefect
    proxy.inject(Fault("503", first=25, probability=0.33, seed=1))
    proxy.inject(Fault("reset", first=15, probability=0.33, seed=3))
    proxy.inject(Fault("slow", first=10, delay=1.0))
    proc = _run(s3_bucket, "faulty", meta, env)
    hit = proxy.counts()
    assert hit.get("fault_503", 0) == 25 and hit.get("fault_reset", 0) == 15 and hit.get("fault_slow", 0) == 10
    assert "result:" in proc.stdout
    clean, faulty = _load(f"{s3_bucket}/clean.zarr"), _load(f"{s3_bucket}/faulty.zarr")
    for k in clean:
        np.testing.assert_allclose(faulty[k], clean[k], rtol=1e-6, atol=1e-6, err_msg=k)


def test_a_store_that_is_gone_stops_the_run_with_exit_3(movie_file, s3_bucket, s3_server, proxy, prefect_api):
    tif, meta = movie_file
    fs, _ = stores.filesystem(s3_bucket)
    fs.put(str(tif), f"{s3_bucket}/raw/movie.tif")
    proxy.inject(Fault("down"))
    t0 = time.monotonic()
    proc = _run(s3_bucket, "gone", meta, _env(prefect_api, s3_server, proxy), check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("somaflow: error:")]
    assert len(lines) == 1, proc.stderr
    assert f"the store {s3_bucket}" in lines[0] and proxy.url in lines[0] and "did not answer after" in lines[0]
    assert took < DOWN_DEADLINE, took


def test_a_truncated_file_on_s3_is_an_input_error(movie_file, s3_bucket, s3_server, proxy, prefect_api):
    tif, meta = movie_file
    fs, _ = stores.filesystem(s3_bucket)
    data = tif.read_bytes()
    fs.pipe(f"{s3_bucket}/raw/movie.tif", data[: len(data) // 2])
    proxy.inject(Fault("503", first=2))  # a flaky store (retried: 3 attempts a request) does not make a broken file a store problem
    proc = _run(s3_bucket, "trunc", meta, _env(prefect_api, s3_server, proxy), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "truncated" in proc.stderr
