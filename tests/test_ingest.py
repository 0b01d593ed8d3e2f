"""Ingest: every real movie in ../shared/data and the SIMA HDF5 convert correctly; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from somaflow.errors import InputError, OutputConflictError, StoreError
from somaflow.io import schema
from somaflow.io.ingest import ingest

REAL = {
    "neurofinder_left/movie.tif": ((600, 512, 256), None),
    "miniscope_1p/movie.tif": ((400, 480, 752), None),
    "thunder_mouse_2p/movie.tif": ((500, 64, 64), None),
    "sima_example/example.tif": ((20, 128, 256), None),
    "sima_example/example.h5": ((20, 128, 256), ("imaging", "yxt")),
}


@pytest.mark.parametrize("rel", list(REAL))
def test_real_movies_ingest(shared_data, tmp_path, rel):
    shape, h5 = REAL[rel]
    src = shared_data / rel
    kw = {"dataset": h5[0], "axes": h5[1]} if h5 else {}
    out = ingest(str(src), str(tmp_path / "m.zarr"), fps=10.0, memory_budget=64 << 20, **kw)
    movie = schema.open_movie(out)
    assert movie.shape == shape
    assert movie.attrs["fps"] == 10.0 and movie.attrs["source_checksum"].startswith("blake2b:")
    assert movie.chunks[1] == (shape[1],) and movie.chunks[2] == (shape[2],)
    if src.suffix == ".tif":
        with tifffile.TiffFile(src) as tf:
            last = tf.pages[shape[0] - 1].asarray()
            first = tf.pages[0].asarray()
        np.testing.assert_array_equal(movie[-1].values, last)
        np.testing.assert_array_equal(movie[0].values, first)


def test_sima_h5_equals_tif(shared_data, tmp_path):
    a = schema.open_movie(ingest(str(shared_data / "sima_example/example.tif"), str(tmp_path / "a.zarr"), fps=5))
    b = schema.open_movie(ingest(str(shared_data / "sima_example/example.h5"), str(tmp_path / "b.zarr"),
                                 fps=5, dataset="imaging", axes="yxt"))
    np.testing.assert_array_equal(a.values, b.values)


def test_constant_movie_is_refused(tmp_path):
    src = tmp_path / "const.tif"
    tifffile.imwrite(src, np.full((30, 8, 8), 7, np.uint16))
    with pytest.raises(InputError, match="constant"):
        ingest(str(src), str(tmp_path / "o.zarr"), fps=10)
    assert not (tmp_path / "o.zarr").exists()


def test_nan_late_in_movie_writes_nothing(tmp_path):
    data = np.random.default_rng(1).random((200, 8, 8)).astype(np.float32)
    data[171, 2, 2] = np.nan  # not among the sampled frames: found while writing
    src = tmp_path / "late_nan.tif"
    tifffile.imwrite(src, data)
    with pytest.raises(InputError, match="NaN"):
        ingest(str(src), str(tmp_path / "o.zarr"), fps=10, memory_budget=1 << 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late_nan.tif"]


def test_input_never_overwritten(tmp_path):
    src = tmp_path / "m.tif"
    tifffile.imwrite(src, np.random.default_rng(0).integers(0, 100, (10, 8, 8), dtype=np.uint16))
    before = src.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(OutputConflictError, match="is the input"):
            ingest(str(src), str(src), fps=10, overwrite=overwrite)
        with pytest.raises(OutputConflictError, match="contains the input"):
            ingest(str(src), str(tmp_path), fps=10, overwrite=overwrite)
    assert src.read_bytes() == before


def test_missing_s3_object(s3_bucket):
    with pytest.raises(StoreError, match="does not exist"):
        ingest(f"{s3_bucket}/nothing-here.tif", f"{s3_bucket}/o.zarr", fps=10)
