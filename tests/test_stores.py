"""Stores: URLs, checksums, atomic outputs — local, memory:// and loopback S3."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

from somaflow.errors import IncompleteResultError, InputError, ResultExistsError, StoreError
from somaflow.io import schema, stores


def _result(n_units: int = 3, shape=(16, 20), frames: int = 12) -> xr.Dataset:
    rng = np.random.default_rng(0)
    masks = np.zeros((n_units, *shape), bool)
    for i in range(n_units):
        masks[i, 2 + i * 4: 5 + i * 4, 3:7] = True
    v = {
        "masks": masks,
        "footprints": masks.astype(np.float32),
        "traces": rng.normal(size=(n_units, frames)).astype(np.float32),
        "dff": rng.normal(size=(n_units, frames)).astype(np.float32),
        "spikes": np.abs(rng.normal(size=(n_units, frames))).astype(np.float32),
        "accepted": np.ones(n_units, bool),
        "score": np.full(n_units, 0.5, np.float32),
        "mean_image": rng.random(shape).astype(np.float32),
        "max_image": rng.random(shape).astype(np.float32),
        "correlation_image": rng.random(shape).astype(np.float32),
        "shifts": np.zeros((frames, 2), np.float32),
    }
    return schema.make_result_dataset(v, params={"a": 1}, source="x.tif", source_checksum="c",
                                      fps=10.0, modality="2p")


def test_normalize_and_join(tmp_path):
    assert stores.normalize_url("s3://b/k/") == "s3://b/k"
    assert stores.normalize_url("rel/x.zarr").startswith("/")
    assert stores.join("s3://b/k", "m.zarr") == "s3://b/k/m.zarr"
    assert stores.sibling("s3://b/k/r.zarr", ".r.tmp") == "s3://b/k/.r.tmp"
    assert stores.protocol_of(str(tmp_path)) == "file"


def test_checksum_file_and_dir(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"abc" * 1000)
    c1 = stores.checksum(str(f))
    f.write_bytes(b"abd" * 1000)
    st = f.stat()  # rewritten: a new modification time (set here: the clock may not tick between writes)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert stores.checksum(str(f)) != c1
    f.write_bytes(b"abd" * 1001)
    assert stores.checksum(str(f)) != c1  # a new size
    d = tmp_path / "d"
    d.mkdir()
    (d / "x").write_bytes(b"1")
    c2 = stores.checksum(str(d))
    (d / "y").write_bytes(b"2")
    assert stores.checksum(str(d)) != c2
    with pytest.raises(StoreError):
        stores.checksum(str(tmp_path / "missing"))


def test_atomic_output_failure_leaves_old(tmp_path):
    url = str(tmp_path / "r.zarr")
    schema.write_result(_result(2), url)
    with pytest.raises(RuntimeError), stores.atomic_output(url, overwrite=True) as tmp:
        schema.make_result_dataset  # noqa: B018
        (tmp_path / tmp.rsplit("/", 1)[-1]).mkdir()
        raise RuntimeError("crash while writing")
    ds = schema.open_result(url)
    assert ds.sizes["unit"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.zarr"]


def test_result_round_trip_and_overwrite(tmp_path):
    url = str(tmp_path / "r.zarr")
    ds = _result(3)
    schema.write_result(ds, url)
    assert schema.is_complete(url)
    back = schema.open_result(url)
    np.testing.assert_array_equal(back["masks"].values, ds["masks"].values)
    assert back.attrs["complete"] is True
    assert back.attrs["modality"] == "2p"
    with pytest.raises(ResultExistsError):
        schema.write_result(_result(1), url)
    assert schema.open_result(url).sizes["unit"] == 3
    schema.write_result(_result(1), url, overwrite=True)
    assert schema.open_result(url).sizes["unit"] == 1


def test_zero_units_result(tmp_path):
    url = str(tmp_path / "empty.zarr")
    schema.write_result(_result(0), url)
    assert schema.open_result(url).sizes["unit"] == 0


def test_incomplete_result_is_refused(tmp_path):
    url = str(tmp_path / "r.zarr")
    ds = _result(2)
    ds.to_zarr(url, mode="w", consolidated=False, zarr_format=3)
    assert not schema.is_complete(url)
    with pytest.raises(IncompleteResultError):
        schema.open_result(url)


def test_schema_validation():
    ds = _result(2).drop_vars("spikes")
    with pytest.raises(InputError, match="spikes"):
        schema.validate_result(ds)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        schema.open_result(str(tmp_path / "nope.zarr"))
    assert not schema.is_complete(str(tmp_path / "nope.zarr"))


def test_memory_store_round_trip():
    url = "memory://somaflow-tests/r.zarr"
    stores.remove(url)
    schema.write_result(_result(2), url)
    assert schema.open_result(url).sizes["unit"] == 2
    stores.remove(url)


def test_s3_result_round_trip(s3_bucket):
    url = f"{s3_bucket}/sessions/r.zarr"
    schema.write_result(_result(2), url)
    assert schema.is_complete(url)
    assert schema.open_result(url).sizes["unit"] == 2
    with pytest.raises(ResultExistsError):
        schema.write_result(_result(1), url)
    schema.write_result(_result(1), url, overwrite=True)
    assert schema.open_result(url).sizes["unit"] == 1
    fs, path = stores.filesystem(s3_bucket)
    leftovers = [p for p in fs.ls(path + "/sessions") if ".partial-" in p or ".old-" in p]
    assert leftovers == []


def test_unreachable_s3_endpoint(monkeypatch):
    monkeypatch.setenv("SOMAFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs, _ = stores.filesystem("s3://nowhere/x.zarr", {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    with pytest.raises(StoreError):
        stores.exists("s3://nowhere/x.zarr", {"config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}}})
    s3fs.S3FileSystem.clear_instance_cache()
