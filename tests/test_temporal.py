"""Temporal binning and ΔF/F: dask results against eager numpy references."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.preprocess.temporal import BinParams, DffParams, bin_frames, dff


def movie_array(seed: int = 0, shape: tuple[int, int, int] = (53, 9, 7)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4000, size=shape).astype(np.uint16)


def as_movie(array: np.ndarray, chunks=None, fps: float | None = 30.0) -> xr.DataArray:
    data = array if chunks is None else da.from_array(array, chunks=chunks)
    t, ny, nx = array.shape
    attrs = {"modality": "2p"} if fps is None else {"fps": fps, "modality": "2p"}
    return xr.DataArray(
        data, dims=("frame", "y", "x"),
        coords={"frame": np.arange(t) * 10, "y": np.arange(ny), "x": np.arange(nx)}, attrs=attrs,
    )


# ----------------------------------------------------------------------------- binning


@pytest.mark.parametrize("chunks", [None, (53, 9, 7), (7, 9, 7), (4, 9, 7), (1, 9, 7), (11, 4, 3), (13, 9, 7)])
def test_binning_matches_reshape_sum_across_chunk_borders(chunks):
    movie = movie_array()  # 53 frames: factor 5 leaves 3 frames over
    out = bin_frames(as_movie(movie, chunks), BinParams(target_fps=6.0))
    assert isinstance(out.data, da.Array)
    assert out.dtype == np.float32
    result = out.compute()
    expected = movie[:50].astype(np.float64).reshape(10, 5, 9, 7).sum(axis=1)
    np.testing.assert_array_equal(result.values, expected.astype(np.float32))
    assert result.dims == ("frame", "y", "x")
    assert result.attrs["fps"] == pytest.approx(6.0)
    assert result.attrs["bin_factor"] == 5
    assert result.attrs["modality"] == "2p"
    np.testing.assert_array_equal(result.coords["frame"], np.arange(0, 500, 50))
    np.testing.assert_array_equal(result.coords["x"], np.arange(7))


def test_binning_chunks_hold_whole_bins():
    out = bin_frames(as_movie(movie_array(), (7, 9, 7)), BinParams(target_fps=6.0))
    # 7-frame chunks become 5-frame (one bin) chunks, whole frames
    assert out.data.numblocks[1:] == (1, 1)
    assert sum(out.data.chunks[0]) == 10
    out = bin_frames(as_movie(movie_array(shape=(400, 9, 7)), (100, 9, 7)), BinParams(target_fps=6.0))
    assert out.data.chunks[0] == (20,) * 4  # already aligned: no rechunk


def test_binning_keep_partial_scales_the_last_bin():
    movie = movie_array()
    out = bin_frames(as_movie(movie, (8, 9, 7)), BinParams(target_fps=6.0, keep_partial=True)).compute()
    assert out.sizes["frame"] == 11
    np.testing.assert_allclose(out.values[-1], movie[50:].astype(np.float64).sum(axis=0) * 5 / 3, rtol=1e-6)
    np.testing.assert_array_equal(out.coords["frame"], np.arange(0, 530, 50))


def test_binning_factor_rounds_and_never_upsamples():
    assert BinParams(target_fps=7.0).factor(30.0) == 4  # round(4.29)
    assert BinParams(target_fps=3.0).factor(7.0) == 2
    assert BinParams(target_fps=60.0).factor(30.0) == 1
    assert BinParams().factor(30.0) == 1
    movie = movie_array()
    out = bin_frames(as_movie(movie, (10, 9, 7)), BinParams(target_fps=50.0)).compute()
    np.testing.assert_array_equal(out.values, movie.astype(np.float32))
    assert out.attrs["fps"] == 30.0 and out.dtype == np.float32


def test_binning_uses_params_fps_over_attrs_and_accumulates_bin_factor():
    movie = as_movie(movie_array(), (10, 9, 7), fps=None)
    with pytest.raises(ParameterError, match="frame rate"):
        bin_frames(movie, BinParams(target_fps=6.0))
    once = bin_frames(movie, BinParams(target_fps=10.0, fps=20.0))  # factor 2
    twice = bin_frames(once, BinParams(target_fps=5.0))  # factor 2 on 10 Hz
    assert twice.attrs["bin_factor"] == 4 and twice.attrs["fps"] == 5.0
    expected = movie_array()[:52].astype(np.float64).reshape(13, 4, 9, 7).sum(axis=1)
    np.testing.assert_allclose(twice.values, expected, rtol=1e-6)


def test_binning_too_short_movie_raises():
    with pytest.raises(InputError, match="fewer than one bin"):
        bin_frames(as_movie(movie_array(shape=(3, 4, 4))), BinParams(target_fps=6.0))
    out = bin_frames(as_movie(movie_array(shape=(3, 4, 4))), BinParams(target_fps=6.0, keep_partial=True))
    assert out.shape == (1, 4, 4)


def test_bin_params_for_movie():
    assert BinParams.for_movie(30.0, "2p", 5).target_fps == 6.0
    assert BinParams.for_movie(30.0, "2p", 5).factor(30.0) == 5
    assert BinParams.for_movie(20.0, "1p", 6).factor(20.0) == 2
    assert BinParams.for_movie(5.0, "2p", 5).factor(5.0) == 1
    with pytest.raises(ParameterError, match="modality"):
        BinParams.for_movie(30.0, "widefield", 5)
    with pytest.raises(ValidationError):
        BinParams(target_fps=-1)
    with pytest.raises(ValidationError):
        BinParams(target_fps=6, factor=3)  # type: ignore[call-arg]


# ----------------------------------------------------------------------------- ΔF/F


def traces_array(seed: int = 0, n_units: int = 5, n_frames: int = 400) -> np.ndarray:
    """(unit, frame) positive traces: drifting baseline plus sparse decaying transients."""
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames)
    baseline = 100 + 30 * np.sin(2 * np.pi * t / 300)[None] + 20 * rng.random((n_units, 1))
    spikes = rng.random((n_units, n_frames)) < 0.03
    kernel = 0.9 ** np.arange(40)
    transients = np.stack([np.convolve(s, kernel)[:n_frames] for s in spikes]) * 40
    return baseline + transients + rng.normal(0, 2, (n_units, n_frames))


def reference_dff(f: np.ndarray, window: int, percentile: float) -> np.ndarray:
    f0 = ndimage.percentile_filter(f, percentile, size=(1, window), mode="reflect")
    return (f - f0) / f0


@pytest.mark.parametrize("chunks", [None, (5, 400), (2, 100), (1, 37)])
def test_dff_of_traces_matches_scipy_percentile_filter(chunks):
    f = traces_array()
    data = f if chunks is None else da.from_array(f, chunks=chunks)
    traces = xr.DataArray(data, dims=("unit", "frame"), attrs={"fps": 10.0})
    params = DffParams(window_s=6.1, percentile=10, samples_per_window=1000)  # 61 frames, exact
    out = dff(traces, params)
    assert out.dtype == np.float32 and out.dims == ("unit", "frame")
    np.testing.assert_allclose(out.values, reference_dff(f, 61, 10), rtol=1e-5, atol=1e-6)
    assert out.attrs["fps"] == 10.0


def test_sparse_running_percentile_is_close_to_the_exact_one():
    f = traces_array(n_frames=3000)
    traces = xr.DataArray(f, dims=("unit", "frame"))
    exact = reference_dff(f, 301, 8)
    fast = dff(traces, DffParams(fps=10.0, window_s=30.1, percentile=8, samples_per_window=32)).values
    err = np.abs(fast - exact)  # ΔF/F units; transients reach ~1, the baseline swings ±25 %
    assert err.mean() < 0.002
    assert np.percentile(err, 99) < 0.02
    assert err.max() < 0.15  # where a burst enters or leaves the window between two samples
    exact_movie = dff(traces, DffParams(fps=10.0, window_s=30.1, percentile=8, samples_per_window=301))
    np.testing.assert_allclose(exact_movie.values, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunks", [(60, 9, 7), (13, 9, 7), (20, 4, 3)])
@pytest.mark.parametrize("budget", [256 << 20, 200 * 8 * 4 * 5])
def test_dff_of_a_movie_matches_per_pixel_traces(chunks, budget):
    rng = np.random.default_rng(4)
    f = traces_array(n_units=63, n_frames=200)[rng.permutation(63)]
    movie = f.T.reshape(200, 9, 7)
    params = DffParams(fps=10.0, window_s=4.0, memory_budget=budget)
    out = dff(as_movie(movie, chunks), params)
    assert out.dims == ("frame", "y", "x") and out.dtype == np.float32
    assert out.data.numblocks[0] == 1  # whole traces per task
    if budget < (1 << 20):
        assert out.data.numblocks[1] * out.data.numblocks[2] > 1  # several pixel tiles
    single = dff(as_movie(movie), params).values
    per_unit = dff(xr.DataArray(f, dims=("unit", "frame")), params).values
    np.testing.assert_allclose(out.values, single, rtol=1e-6)
    np.testing.assert_allclose(out.values, per_unit.T.reshape(200, 9, 7), rtol=1e-6)
    np.testing.assert_array_equal(out.coords["frame"], np.arange(200) * 10)


def test_dff_is_finite_for_constant_zero_and_negative_baselines():
    f = np.stack([np.zeros(120), np.full(120, 50.0), np.full(120, -5.0), np.linspace(-1, 1, 120)])
    out = dff(xr.DataArray(f, dims=("unit", "frame")), DffParams(fps=10.0, window_s=3.0)).values
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:3], 0.0)
    movie = dff(as_movie(np.zeros((30, 4, 4), np.uint16), (7, 4, 4)), DffParams(window_s=1.0)).values
    assert np.isfinite(movie).all() and (movie == 0).all()


def test_dff_window_is_capped_at_the_trace_length():
    f = traces_array(n_frames=50)
    out = dff(xr.DataArray(f, dims=("unit", "frame")), DffParams(fps=10.0, window_s=600.0, samples_per_window=500))
    np.testing.assert_allclose(out.values, reference_dff(f, 49, 8), rtol=1e-5, atol=1e-6)


def test_dff_bad_inputs():
    with pytest.raises(InputError, match="dims"):
        dff(xr.DataArray(np.ones((3, 4)), dims=("frame", "unit"), attrs={"fps": 1.0}), DffParams())
    with pytest.raises(ParameterError, match="frame rate"):
        dff(xr.DataArray(np.ones((3, 4)), dims=("unit", "frame")), DffParams())
    with pytest.raises(InputError, match="no frames"):
        dff(xr.DataArray(np.ones((3, 0)), dims=("unit", "frame")), DffParams(fps=1.0))
    with pytest.raises(ValidationError):
        DffParams(percentile=120)


def test_dff_params_for_movie():
    two_p, one_p = DffParams.for_movie(30.0, "2p", 5), DffParams.for_movie(20.0, "1p", 6)
    assert two_p.fps == 30.0 and two_p.window_s == 30.0 and two_p.percentile == 8.0
    assert one_p.fps == 20.0 and one_p.window_s < two_p.window_s
    with pytest.raises(ParameterError, match="fps"):
        DffParams.for_movie(0.0, "2p", 5)
