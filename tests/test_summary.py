"""Summary images: the streaming dask reduction against an eager numpy reference."""

from __future__ import annotations

import math

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError
from scipy import ndimage

from somaflow.errors import InputError
from somaflow.preprocess.summary import SummaryParams, summary_images


def tiny_movie(seed: int = 0, n_frames: int = 90, shape: tuple[int, int] = (9, 11)) -> np.ndarray:
    """(frame, y, x) uint16: a correlated blob, independent noise, one constant pixel."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    blob = np.exp(-((yy - 4) ** 2 + (xx - 5) ** 2) / (2 * 1.5**2))
    signal = np.convolve(rng.random(n_frames) < 0.1, 0.8 ** np.arange(20))[:n_frames]
    movie = 200 + 80 * signal[:, None, None] * blob + rng.normal(0, 5, (n_frames, ny, nx))
    movie[:, 0, 10] = 321  # a constant pixel
    return np.round(movie).astype(np.uint16)


def reference_correlation(movie: np.ndarray) -> np.ndarray:
    """CaImAn local_correlations with 4 neighbours, one np.corrcoef per pair."""
    _, ny, nx = movie.shape
    m = movie.astype(np.float64)
    out = np.zeros((ny, nx))
    for i in range(ny):
        for j in range(nx):
            values = []
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a, b = i + di, j + dj
                if 0 <= a < ny and 0 <= b < nx:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        c = np.corrcoef(m[:, i, j], m[:, a, b])[0, 1]
                    values.append(0.0 if np.isnan(c) else c)
            out[i, j] = np.mean(values)
    return out


def reference_pnr(movie: np.ndarray, sigma: float) -> np.ndarray:
    """One-chunk PNR: (max − median) / (median|Δ| / (0.6745 √2)) of the smoothed movie."""
    s = movie.astype(np.float32)
    if sigma > 0:
        s = ndimage.gaussian_filter(s, sigma=(0, sigma, sigma), mode="nearest")
    noise = np.median(np.abs(np.diff(s, axis=0)), axis=0) / (0.6745 * math.sqrt(2))
    peak = s.max(axis=0) - np.median(s, axis=0)
    return np.where(noise > 0, np.maximum(peak, 0) / np.where(noise > 0, noise, 1), 0)


def as_movie(array: np.ndarray, chunks: tuple[int, ...] | None) -> xr.DataArray:
    data = array if chunks is None else da.from_array(array, chunks=chunks)
    return xr.DataArray(data, dims=("frame", "y", "x"))


@pytest.mark.parametrize("chunks", [None, (90, 9, 11), (33, 9, 11), (7, 9, 11), (1, 9, 11), (40, 4, 5)])
def test_moment_images_match_eager_reference(chunks):
    movie = tiny_movie()
    ds = summary_images(as_movie(movie, chunks), SummaryParams(pnr_smooth_sigma=0)).compute()
    m = movie.astype(np.float64)
    np.testing.assert_allclose(ds.mean_image, m.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.max_image, m.max(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std_image, m.std(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.correlation_image, reference_correlation(movie), atol=1e-5)
    for name in ds.data_vars:
        assert ds[name].dims == ("y", "x")
        assert ds[name].dtype == np.float32
        assert np.isfinite(ds[name]).all()


def test_correlation_image_sees_the_blob():
    ds = summary_images(as_movie(tiny_movie(), (30, 9, 11)), SummaryParams()).compute()
    corr = ds.correlation_image.values
    assert corr[4, 5] > 0.5
    assert abs(np.median(corr)) < 0.2
    pnr = ds.pnr_image.values
    assert pnr[4, 5] > 3 * np.median(pnr[[0, -1]])  # blob centre vs the top and bottom rows


@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_pnr_one_chunk_is_exact(sigma):
    movie = tiny_movie(seed=1)
    ds = summary_images(as_movie(movie, (90, 9, 11)), SummaryParams(pnr_smooth_sigma=sigma)).compute()
    np.testing.assert_allclose(ds.pnr_image, reference_pnr(movie, sigma), rtol=1e-4, atol=1e-4)


def test_pnr_chunked_is_close_to_one_chunk():
    movie = tiny_movie(seed=2, n_frames=400)
    exact = reference_pnr(movie, 1.0)
    ds = summary_images(as_movie(movie, (100, 9, 11)), SummaryParams(pnr_smooth_sigma=1.0)).compute()
    rel = np.abs(ds.pnr_image.values - exact) / exact
    assert np.median(rel) < 0.1


def test_constant_pixels_and_movie_give_zero_not_nan():
    movie = np.full((50, 6, 7), 1234, np.uint16)
    ds = summary_images(as_movie(movie, (16, 6, 7)), SummaryParams()).compute()
    assert np.all(ds.correlation_image.values == 0)
    assert np.all(ds.std_image.values == 0)
    assert np.all(ds.pnr_image.values == 0)
    np.testing.assert_array_equal(ds.mean_image, 1234)
    moving = tiny_movie()
    ds = summary_images(as_movie(moving, (30, 9, 11)), SummaryParams()).compute()
    assert ds.correlation_image.values[0, 10] == 0.0
    assert ds.std_image.values[0, 10] == 0.0


def test_bright_movie_keeps_precision():
    """uint16 near full scale with small noise: no cancellation in E[x²] − E[x]²."""
    rng = np.random.default_rng(3)
    shared = rng.normal(0, 2, (3000, 1, 1))
    movie = np.round(60000 + shared + rng.normal(0, 2, (3000, 5, 6))).astype(np.uint16)
    ds = summary_images(as_movie(movie, (500, 5, 6)), SummaryParams(pnr_smooth_sigma=0)).compute()
    np.testing.assert_allclose(ds.correlation_image, reference_correlation(movie), atol=1e-5)
    np.testing.assert_allclose(ds.std_image, movie.astype(np.float64).std(0), rtol=1e-5)


def test_one_pass_graph_holds_only_image_sized_partials():
    movie = as_movie(tiny_movie(n_frames=256), (32, 9, 11))
    ds = summary_images(movie, SummaryParams())
    graph = dict(ds.__dask_graph__())
    # one partial task per frame chunk; everything downstream is (y, x)-sized
    partial_tasks = [k for k in graph if isinstance(k, tuple) and str(k[0]).startswith("_chunk_partials")]
    assert len(partial_tasks) == 8
    (computed,) = dask.compute(ds)
    assert computed.sizes == {"y": 9, "x": 11}


def test_coords_are_kept():
    movie = xr.DataArray(tiny_movie(), dims=("frame", "y", "x"),
                         coords={"y": np.arange(9) * 0.5, "x": np.arange(11) * 0.5})
    ds = summary_images(movie, SummaryParams()).compute()
    np.testing.assert_array_equal(ds.y, movie.y)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="dims"):
        summary_images(xr.DataArray(np.zeros((4, 5, 3)), dims=("y", "x", "frame")), SummaryParams())
    with pytest.raises(InputError, match="at least 2 frames"):
        summary_images(xr.DataArray(np.zeros((1, 5, 3)), dims=("frame", "y", "x")), SummaryParams())
    with pytest.raises(InputError, match="real number"):
        summary_images(xr.DataArray(np.zeros((3, 5, 3), complex), dims=("frame", "y", "x")),
                       SummaryParams())


def test_params_are_frozen_validated_and_derived():
    p = SummaryParams.for_movie(30.0, "2p", 6.0)
    assert p == SummaryParams() and p.pnr_smooth_sigma == 0.0
    with pytest.raises(ValidationError):
        p.pnr_smooth_sigma = 2.0
    with pytest.raises(ValidationError):
        SummaryParams(pnr_smooth_sigma=-1)
    with pytest.raises(ValidationError):
        SummaryParams(unknown=1)
    assert SummaryParams.model_validate(p.model_dump()) == p
