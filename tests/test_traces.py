"""Traces, ΔF/F, spikes and SNR from masks: synthetic movies with known answers."""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.oasis import DeconvolutionParams, deconvolve
from somaflow.traces import (
    TraceParams,
    extract_traces,
    neuropil_masks,
    running_percentile,
    sparse_masks,
    weighted_traces,
)

FPS = 10.0
SHAPE = (40, 48)
CENTERS = [(10, 10), (10, 34), (29, 14), (28, 36)]


def disks(radius: float = 4.0) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    return np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 for cy, cx in CENTERS])


def calcium(rng: np.random.Generator, n: int, n_frames: int, g: float) -> np.ndarray:
    spikes = (rng.random((n, n_frames)) < 0.05) * rng.uniform(0.5, 2.0, (n, n_frames))
    return np.array([np.convolve(s, g ** np.arange(60))[:n_frames] for s in spikes])


def as_movie(array: np.ndarray, chunk: int | None = 64) -> xr.DataArray:
    data = array if chunk is None else da.from_array(array, chunks=(chunk, -1, -1))
    return xr.DataArray(data, dims=("frame", "y", "x"), attrs={"fps": FPS})


def as_masks(masks: np.ndarray) -> xr.DataArray:
    return xr.DataArray(masks, dims=("unit", "y", "x"))


def rings(masks: np.ndarray, p: TraceParams) -> np.ndarray:
    """Dense (unit, y, x) bool neuropil annuli."""
    return neuropil_masks(sparse_masks(masks), SHAPE, p).toarray().reshape(len(masks), *SHAPE)


@pytest.fixture(scope="module")
def scene():
    """Gaussian footprints × known traces + background + noise, (frame, y, x) float32."""
    rng = np.random.default_rng(0)
    n_frames = 300
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    fp = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 3.0**2)) for cy, cx in CENTERS])
    truth = 100 * (1 + calcium(rng, len(CENTERS), n_frames, math.exp(-1 / (0.7 * FPS))))
    movie = 20 + np.einsum("uyx,ut->tyx", fp, truth) + rng.normal(0, 2, (n_frames, *SHAPE))
    return movie.astype(np.float32), fp > 0.3, truth


def test_recovers_known_traces(scene):
    movie, masks, truth = scene
    ds = extract_traces(as_movie(movie), as_masks(masks), TraceParams(neuropil_coefficient=0, denoise=False)).compute()
    assert ds.traces.dims == ("unit", "frame") and ds.traces.dtype == np.float32
    assert ds.traces.shape == truth.shape
    for i in range(len(truth)):
        assert np.corrcoef(ds.traces.values[i], truth[i])[0, 1] > 0.99


def test_chunked_equals_eager_and_dense_reference(scene):
    movie, masks, _ = scene
    p = TraceParams(fps=FPS, denoise=False)
    chunked = extract_traces(as_movie(movie, 37), as_masks(masks), p).compute()
    eager = extract_traces(as_movie(movie, None), as_masks(masks), p).compute()
    for name in ("traces", "dff", "spikes", "snr"):
        np.testing.assert_allclose(chunked[name], eager[name], rtol=1e-5, atol=1e-5)
        assert chunked[name].dtype == np.float32
    # dense reference of F = mean over mask − c · mean over annulus
    ring = rings(masks, p)
    flat = movie.reshape(len(movie), -1).astype(np.float64)
    cell = flat @ masks.reshape(len(masks), -1).T / masks.reshape(len(masks), -1).sum(1)
    neuropil = flat @ ring.reshape(len(ring), -1).T / ring.reshape(len(ring), -1).sum(1)
    np.testing.assert_allclose(chunked.traces, (cell - 0.7 * neuropil).T, rtol=1e-5)


def test_traces_are_frame_chunked_like_the_movie(scene):
    movie, masks, _ = scene
    ds = extract_traces(as_movie(movie, 50), as_masks(masks), TraceParams(denoise=False))
    assert ds.traces.data.chunks[1] == (50,) * 6


def test_neuropil_annulus_geometry():
    masks = disks()
    p = TraceParams(neuropil_inner_gap=2, neuropil_width=4, min_neuropil_pixels=1)
    ring = rings(masks, p)
    assert not (ring & masks.any(0)).any()  # no unit's pixels
    dist = ndimage.distance_transform_edt(~masks[0])
    assert ring[0].any()
    assert dist[ring[0]].min() > 2 and dist[ring[0]].max() <= 6
    thin = rings(masks, TraceParams(neuropil_inner_gap=2, neuropil_width=1,
                                             min_neuropil_pixels=1))
    grown = rings(masks, TraceParams(neuropil_inner_gap=2, neuropil_width=1,
                                              min_neuropil_pixels=150))
    assert thin[0].sum() < 150 <= grown[0].sum()  # widened (1 → 4 px) to reach min_neuropil_pixels
    np.testing.assert_array_equal(grown[0], ring[0])


def test_neuropil_subtraction_removes_a_shared_background():
    rng = np.random.default_rng(1)
    n_frames = 200
    masks = disks()
    truth = 50 * (1 + calcium(rng, len(masks), n_frames, 0.85))
    neuropil = 30 + 20 * np.sin(np.arange(n_frames) / 7.0)
    movie = neuropil[:, None, None] + np.einsum("uyx,ut->tyx", masks.astype(float), truth)
    p = TraceParams(neuropil_coefficient=1.0, min_neuropil_pixels=1, denoise=False)
    ds = extract_traces(as_movie(movie.astype(np.float32)), as_masks(masks), p).compute()
    np.testing.assert_allclose(ds.traces, truth, rtol=1e-5)


def test_dff_of_constant_baseline_with_known_transient():
    n_frames = 400
    f = np.full(n_frames, 100.0)
    f[200:] += 50 * 0.9 ** np.arange(200)  # one transient of ΔF/F 0.5
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 2:6, 2:6] = True
    movie = np.broadcast_to(f[:, None, None], (n_frames, 8, 8)).astype(np.float32)
    exact = DeconvolutionParams(  # the true kernel, no sparsity, no baseline: an exact inversion
        tau_s=-1 / (FPS * math.log(0.9)), estimate_g=False, sparsity="penalty", penalty=0.0, baseline="zero",
        onset_shift_s=0.0,
    )
    p = TraceParams(fps=FPS, neuropil_coefficient=0, baseline_window_s=20.0, deconvolution=exact)
    ds = extract_traces(as_movie(movie), as_masks(masks), p).compute()
    np.testing.assert_allclose(ds.dff.values[0], (f - 100) / 100, atol=1e-4)
    assert ds.spikes.values[0, 200] == pytest.approx(0.5, rel=1e-4)  # the jump, s = c_t − g·c_{t−1}
    assert (ds.spikes.values[0, :200] == 0).all()
    assert (ds.spikes.values[0, 201:] < 1e-4).all()


def test_spikes_invert_the_ar1_model():
    n_frames = 300
    g = math.exp(-1 / (0.7 * FPS))
    spikes = np.zeros(n_frames)
    spikes[[30, 120, 121, 250]] = [1.0, 0.6, 0.8, 1.5]
    c = np.convolve(spikes, g ** np.arange(n_frames))[:n_frames]
    movie = (100 * (1 + c))[:, None, None] * np.ones((1, 6, 6))
    masks = np.ones((1, 6, 6), bool)
    exact = DeconvolutionParams(tau_s=0.7, estimate_g=False, sparsity="penalty", penalty=0.0, baseline="zero",
                                onset_shift_s=0.0)
    p = TraceParams(fps=FPS, neuropil_coefficient=0, baseline_window_s=5.0, deconvolution=exact)
    out = extract_traces(as_movie(movie.astype(np.float32)), as_masks(masks), p).compute()
    s = out.spikes.values[0]
    assert set(np.flatnonzero(s > 1e-4)) == {30, 120, 121, 250}
    # ΔF/F itself is off by up to 3e-3 where the running F0 sees a transient's tail
    np.testing.assert_allclose(s[[30, 120, 121, 250]], [1.0, 0.6, 0.8, 1.5], rtol=5e-4)
    assert (s >= 0).all()


def test_spikes_are_oasis_on_each_units_dff(scene):
    """Default spikes: deconvolve() of every unit's whole ΔF/F, whatever the chunking."""
    movie, masks, truth = scene
    p = TraceParams(fps=FPS, neuropil_coefficient=0)
    ds = extract_traces(as_movie(movie, 37), as_masks(masks), p).compute()
    ref = deconvolve(ds.dff.values.astype(np.float64), FPS, params=p.deconvolution).spikes
    np.testing.assert_allclose(ds.spikes.values, ref, rtol=1e-5, atol=1e-6)
    true_spikes = np.diff(truth, axis=1, prepend=truth[:, :1]).clip(min=0)
    for i in range(len(truth)):  # the transients' onsets, not noise
        assert np.corrcoef(ds.spikes.values[i], true_spikes[i])[0, 1] > 0.8


def test_shared_kernel_does_not_depend_on_the_unit_chunking():
    """The pipeline's kernel is shared by all units, not by the units of one chunk."""
    import dask.array as da

    from somaflow.traces import deconvolve_blocks

    rng = np.random.default_rng(5)
    t = 400
    calcium = np.stack([np.convolve((rng.random(t) < 0.05) * 1.0, 0.9 ** np.arange(60))[:t] for _ in range(9)])
    dff = calcium + 0.2 * rng.standard_normal(calcium.shape)
    p = TraceParams().deconvolution
    assert p.g_scope == "shared"
    whole = deconvolve_blocks(da.from_array(dff, chunks=(-1, -1)), FPS, p).compute()
    split = deconvolve_blocks(da.from_array(dff, chunks=(2, -1)), FPS, p).compute()
    np.testing.assert_allclose(split, whole, rtol=1e-10, atol=1e-12)
    ref = deconvolve(dff, FPS, params=p)
    np.testing.assert_allclose(whole[0], ref.calcium, rtol=1e-10, atol=1e-12)
    # a per-trace kernel would differ between rows
    own = deconvolve(dff, FPS, params=p.model_copy(update={"g_scope": "trace"}))
    assert np.ptp(own.g[:, 0]) > 0 and np.ptp(ref.g[:, 0]) == 0


def test_legacy_tau_moves_into_deconvolution():
    assert TraceParams(tau_s=1.3).deconvolution.tau_s == 1.3
    p = TraceParams.model_validate({"tau_s": 0.4, "deconvolution": {"ar_order": 2, "tau_rise_s": 0.05}})
    assert p.deconvolution.tau_s == 0.4 and p.deconvolution.ar_order == 2
    # fields a partial dict leaves out keep the stage's defaults (one kernel per movie)
    assert p.deconvolution.g_scope == "shared" and TraceParams(tau_s=1.3).deconvolution.g_scope == "shared"
    assert TraceParams(deconvolution={"tau_s": 1.1}).deconvolution.g_scope == "shared"
    assert TraceParams(deconvolution=DeconvolutionParams()).deconvolution.g_scope == "trace"


def test_snr_separates_active_from_silent(scene):
    movie, masks, _ = scene
    rng = np.random.default_rng(5)
    silent = np.zeros((1, *SHAPE), bool)
    silent[0, 18:22, 24:28] = True  # background pixels, noise only
    both = np.concatenate([masks, silent])
    noisy = movie + rng.normal(0, 2, movie.shape).astype(np.float32)
    ds = extract_traces(as_movie(noisy), as_masks(both), TraceParams(fps=FPS, neuropil_coefficient=0)).compute()
    assert ds.snr.dims == ("unit",)
    assert ds.snr.values[:4].min() > 3 * ds.snr.values[4]


def test_running_percentile_matches_scipy_and_interpolates():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 250))
    for window in (1, 5, 51):
        for q in (0.0, 8.0, 50.0, 100.0):
            exact = ndimage.percentile_filter(x, q, size=(1, window), mode="reflect")
            np.testing.assert_array_equal(running_percentile(x, window, q, samples=window), exact)
    drift = 10 + np.linspace(0, 3, 2000)[None] + 0.1 * rng.normal(size=(2, 2000))
    exact = ndimage.percentile_filter(drift, 8, size=(1, 301))
    approx = running_percentile(drift, 301, 8, samples=32)
    assert np.abs(approx - exact).max() < 0.05


def test_dff_floor_keeps_values_finite():
    """A neuropil-corrected baseline near 0 is floored at a fraction of the raw baseline."""
    n_frames = 120
    masks = disks()[:1]
    movie = np.full((n_frames, *SHAPE), 100.0, np.float32)  # cell == neuropil: F = 0 with c = 1
    movie[60:70][:, masks[0]] += 30
    p = TraceParams(fps=FPS, neuropil_coefficient=1.0, min_neuropil_pixels=1, min_baseline_fraction=0.1)
    ds = extract_traces(as_movie(movie), as_masks(masks), p).compute()
    assert np.isfinite(ds.dff).all()
    assert ds.dff.values[0, 65] == pytest.approx(30 / 10, rel=1e-5)


def test_sparse_weights_equal_dense_masks_and_weights(scene):
    """weighted_traces on a (unit, y*x) CSR matrix gives what extract_traces gives on the dense array."""
    import scipy.sparse as sp

    movie, masks, _ = scene
    p = TraceParams(fps=FPS)
    weights = masks * np.linspace(0.2, 1.0, SHAPE[1])[None, None, :]  # footprint-like, non-uniform
    for dense in (masks, weights):
        ref = extract_traces(as_movie(movie), as_masks(dense), p).compute()
        got = weighted_traces(as_movie(movie), sp.csr_matrix(dense.reshape(len(dense), -1)), p).compute()
        for name in ("traces", "dff", "spikes", "snr"):
            np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-7)
    # the weighted mean is the weights' mean, not the mask's
    raw = weighted_traces(as_movie(movie), sp.csr_matrix(weights.reshape(len(weights), -1)),
                          TraceParams(fps=FPS, neuropil_coefficient=0, denoise=False)).compute()
    flat = movie.reshape(len(movie), -1).astype(np.float64)
    w = weights.reshape(len(weights), -1)
    np.testing.assert_allclose(raw.traces, (flat @ w.T / w.sum(1)).T, rtol=1e-5)
    with pytest.raises(InputError, match="pixel columns"):
        weighted_traces(as_movie(movie), sp.csr_matrix(np.ones((1, 7))), p)
    with pytest.raises(InputError, match="negative"):
        weighted_traces(as_movie(movie), sp.csr_matrix(-w), p)


def test_zero_units():
    movie = as_movie(np.zeros((80, *SHAPE), np.float32), 32)
    masks = as_masks(np.zeros((0, *SHAPE), bool))
    ds = extract_traces(movie, masks, TraceParams(fps=FPS)).compute()
    for name in ("traces", "dff", "spikes"):
        assert ds[name].shape == (0, 80)
        assert ds[name].dtype == np.float32
    assert ds.snr.shape == (0,)


def test_bad_inputs():
    movie = as_movie(np.zeros((20, *SHAPE), np.float32))
    with pytest.raises(InputError, match="pixel grid"):
        extract_traces(movie, as_masks(np.ones((1, 5, 5), bool)), TraceParams())
    with pytest.raises(InputError, match="dims"):
        extract_traces(movie, xr.DataArray(disks(), dims=("unit", "x", "y")), TraceParams())
    with pytest.raises(InputError, match="negative"):
        extract_traces(movie, as_masks(-disks().astype(float)), TraceParams())
    bare = xr.DataArray(np.zeros((20, *SHAPE), np.float32), dims=("frame", "y", "x"))
    with pytest.raises(ParameterError, match="frame rate"):
        extract_traces(bare, as_masks(disks()), TraceParams())


def test_params_derive_and_validate():
    two = TraceParams.for_movie(30.0, "2p", 6.0)
    one = TraceParams.for_movie(20.0, "1p", 6.0)
    assert two.neuropil_coefficient == 0.7 and one.neuropil_coefficient == 0.0
    assert two.fps == 30.0 and two.neuropil_width == 12.0
    assert TraceParams.model_validate(two.model_dump()) == two
    with pytest.raises(ValidationError):
        TraceParams(baseline_percentile=120)
    with pytest.raises(ValidationError):
        TraceParams(extra_field=1)


def test_traces_are_the_denoised_calcium():
    """By default `traces` is OASIS's denoised fit of ΔF/F (CONTRACT: denoised calcium): closer
    to the true calcium than the noisy ΔF/F it came from."""
    rng = np.random.default_rng(3)
    T = 600
    spikes = (rng.random(T) < 0.03).astype(float)
    calcium = np.zeros(T)
    for t in range(1, T):
        calcium[t] = 0.9 * calcium[t - 1] + spikes[t]
    mask = np.zeros((1, 20, 20), bool)
    mask[0, 7:13, 7:13] = True
    movie = 100 + rng.normal(0, 40, (T, 20, 20))
    movie[:, mask[0]] += 20 * calcium[:, None]
    ds = extract_traces(as_movie(movie.astype(np.float32)), as_masks(mask),
                        TraceParams(fps=FPS, neuropil_coefficient=0)).compute()
    r_dff = np.corrcoef(ds.dff.values[0], calcium)[0, 1]
    r_trace = np.corrcoef(ds.traces.values[0], calcium)[0, 1]
    assert r_trace > r_dff + 0.02
    dff = ds.dff.values[0].astype(np.float64)
    p = TraceParams()
    # traces: the calcium pass (noise-constrained, raw decay); spikes: the spike settings
    assert p.calcium_deconvolution().sparsity == "noise" and p.calcium_deconvolution().decay_correction_s is None
    expected = deconvolve(dff, FPS, params=p.calcium_deconvolution()).calcium
    np.testing.assert_allclose(ds.traces.values[0], np.ravel(expected), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds.spikes.values[0], np.ravel(deconvolve(dff, FPS, params=p.deconvolution).spikes),
                               rtol=1e-4, atol=1e-5)
    # calcium=None: one pass, traces = the spike fit's own calcium
    one = extract_traces(as_movie(movie.astype(np.float32)), as_masks(mask),
                         TraceParams(fps=FPS, neuropil_coefficient=0, calcium=None)).compute()
    own = deconvolve(dff, FPS, params=p.deconvolution).calcium
    np.testing.assert_allclose(one.traces.values[0], np.ravel(own), rtol=1e-4, atol=1e-5)
    assert not np.allclose(one.traces.values[0], ds.traces.values[0], atol=1e-3)
    np.testing.assert_array_equal(one.spikes.values, ds.spikes.values)


def test_calcium_pass_reuses_the_shared_kernel_estimates():
    """The two passes' kernels come from one set of estimates, each with its own decay correction."""
    import dask.array as da

    from somaflow.traces import deconvolve_blocks

    rng = np.random.default_rng(6)
    t = 400
    calcium = np.stack([np.convolve((rng.random(t) < 0.05) * 1.0, 0.9 ** np.arange(60))[:t] for _ in range(7)])
    dff = calcium + 0.2 * rng.standard_normal(calcium.shape)
    p = TraceParams()
    out = deconvolve_blocks(da.from_array(dff, chunks=(3, -1)), FPS, p.deconvolution,
                            p.calcium_deconvolution()).compute()
    ref_c = deconvolve(dff, FPS, params=p.calcium_deconvolution())
    ref_s = deconvolve(dff, FPS, params=p.deconvolution)
    np.testing.assert_allclose(out[0], ref_c.calcium, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out[1], ref_s.spikes, rtol=1e-10, atol=1e-12)
    tau = lambda g: -1 / (FPS * np.log(g[0, 0]))  # noqa: E731
    assert 1 / tau(ref_s.g) == pytest.approx(1 / tau(ref_c.g) + 1 / p.deconvolution.decay_correction_s, rel=1e-9)


def test_calcium_params_validate_with_the_deconvolution():
    # partial sections are filled from the stage defaults (sparsity penalty, penalty 3)
    assert TraceParams(deconvolution={"sparsity": "noise"}).deconvolution.sparsity == "noise"
    assert TraceParams(deconvolution={"baseline": "optimize", "sparsity": "noise"}).deconvolution.baseline == "optimize"
    with pytest.raises(ValidationError, match="set sparsity: noise too"):
        TraceParams(deconvolution={"baseline": "optimize"})
    with pytest.raises(ValidationError, match="calcium"):
        TraceParams(deconvolution={"baseline": "optimize", "sparsity": "noise", "penalty": 0},
                    calcium={"sparsity": "penalty", "penalty": 1.0})
    p = TraceParams(calcium={"sparsity": "penalty", "penalty": 2.0, "decay_correction_s": 3.0})
    c = p.calcium_deconvolution()
    assert (c.sparsity, c.penalty, c.decay_correction_s, c.onset_shift_s) == ("penalty", 2.0, 3.0, 0.0)
    assert c.g_scope == p.deconvolution.g_scope and c.tau_s == p.deconvolution.tau_s
    assert TraceParams.model_validate(p.model_dump()) == p
    assert TraceParams(calcium=None).calcium_deconvolution() == TraceParams().deconvolution


def test_block_tasks_refer_to_the_pixel_weights_instead_of_carrying_them():
    """The units' pixel indices and weights are one key of the graph: a per-chunk task pickles to a
    few kB however many units there are (each carried a copy of the indices before)."""
    import pickle

    ny = nx = 256
    yy, xx = np.mgrid[:ny, :nx]
    centres = [(y, x) for y in range(8, ny - 8, 12) for x in range(8, nx - 8, 12)]  # 400 units
    masks = np.stack([(yy - cy) ** 2 + (xx - cx) ** 2 <= 16 for cy, cx in centres])
    movie = xr.DataArray(da.zeros((64, ny, nx), np.float32, chunks=(16, -1, -1)), dims=("frame", "y", "x"),
                         attrs={"fps": FPS})
    ds = extract_traces(movie, as_masks(masks), TraceParams.for_movie(FPS, "2p", 4.0))
    graph = dict(ds["traces"].data.__dask_graph__())
    sizes = sorted(len(pickle.dumps(task)) for task in graph.values())
    assert sizes[-1] > 100_000  # the weights themselves, once
    block_tasks = [len(pickle.dumps(t)) for k, t in graph.items() if "project_block" in str(k)]
    assert len(block_tasks) >= 4 and max(block_tasks) < 20_000
