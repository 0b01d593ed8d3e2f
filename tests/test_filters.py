"""Per-frame preprocessing filters: dask results against eager numpy references."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from dask.callbacks import Callback
from pydantic import ValidationError
from scipy import ndimage
from skimage.morphology import disk
from skimage.morphology import opening as sk_opening

from somaflow.errors import InputError, ParameterError
from somaflow.preprocess.filters import (
    ContrastParams,
    HomomorphicParams,
    MorphParams,
    PeronaMalikParams,
    clip_contrast,
    difference_noise_sd,
    highpass,
    homomorphic,
    morphological_background,
    perona_malik,
    whole_frames,
)

SHAPE = (24, 33, 29)  # odd sizes: catch downsampling and border off-by-ones


def noisy_movie(seed: int = 0, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """(frame, y, x) uint16: a smooth gradient background, two blobs, Poisson-like noise."""
    rng = np.random.default_rng(seed)
    t, ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx]
    bg = 300 + 4 * yy + 2 * xx
    blobs = 200 * np.exp(-((yy - 10) ** 2 + (xx - 8) ** 2) / 8) + 150 * np.exp(-((yy - 22) ** 2 + (xx - 20) ** 2) / 8)
    gain = 1 + 0.3 * rng.random(t)[:, None, None]
    return np.round(bg + gain * blobs + rng.normal(0, 10, shape)).clip(0).astype(np.uint16)


def as_movie(array: np.ndarray, chunks: tuple[int, ...] | None = None, **attrs) -> xr.DataArray:
    data = array if chunks is None else da.from_array(array, chunks=chunks)
    t, ny, nx = array.shape
    return xr.DataArray(
        data, dims=("frame", "y", "x"),
        coords={"frame": np.arange(t), "y": np.arange(ny) * 0.5, "x": np.arange(nx) * 0.5},
        attrs={"fps": 30.0, "modality": "2p", **attrs},
    )


FILTERS = {
    "homomorphic": lambda m: homomorphic(m, HomomorphicParams(sigma=6.0)),
    "homomorphic_raw": lambda m: homomorphic(m, HomomorphicParams(sigma=6.0, normalize=False)),
    "morph": lambda m: morphological_background(m, MorphParams(radius=5, downsample=1)),
    "morph_ds2": lambda m: morphological_background(m, MorphParams(radius=5, downsample=2)),
    "perona_malik": lambda m: perona_malik(m, PeronaMalikParams(n_iter=4)),
    "perona_malik_kappa": lambda m: perona_malik(m, PeronaMalikParams(n_iter=3, kappa=20.0)),
    "clip": lambda m: clip_contrast(m, ContrastParams(sample_frames=10, max_samples=3000)),
    "highpass": lambda m: highpass(m, 2.5),
}


@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize("chunks", [(5, 33, 29), (24, 33, 29), (7, 10, 29), (1, 33, 29)])
def test_chunked_equals_single_numpy_block(name, chunks):
    movie = noisy_movie()
    eager = FILTERS[name](as_movie(movie)).compute()
    lazy = FILTERS[name](as_movie(movie, chunks))
    assert isinstance(lazy.data, da.Array)
    assert lazy.data.numblocks[1:] == (1, 1)  # whole frames per task
    assert lazy.dtype == np.float32
    out = lazy.compute()
    assert out.dims == ("frame", "y", "x")
    assert out.shape == movie.shape
    np.testing.assert_allclose(out.values, eager.values, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out.coords["y"], np.arange(SHAPE[1]) * 0.5)
    assert out.attrs["fps"] == 30.0 and out.attrs["modality"] == "2p"


def test_frame_chunks_are_kept_and_spatial_chunks_merged():
    movie = as_movie(noisy_movie(), (5, 33, 29))
    assert highpass(movie, 1.0).data.chunks == movie.data.chunks
    split = whole_frames(as_movie(noisy_movie(), (6, 11, 10)))
    assert split.numblocks[1:] == (1, 1)
    assert split.chunks[0][0] == max(1, 6 * 11 * 10 // (33 * 29))
    numpy_backed = whole_frames(as_movie(noisy_movie()))
    assert isinstance(numpy_backed, da.Array) and numpy_backed.numblocks[1:] == (1, 1)


# ----------------------------------------------------------------------------- references


def test_homomorphic_matches_direct_formula():
    movie = noisy_movie()
    out = homomorphic(as_movie(movie, (5, 33, 29)), HomomorphicParams(sigma=6.0)).compute()
    log_img = np.log(movie.astype(np.float64) + 1)
    ratio = np.stack([np.exp(f - ndimage.gaussian_filter(f, 6.0, mode="reflect")) for f in log_img])
    np.testing.assert_allclose(out.values, ratio / ratio.std(), rtol=1e-4)
    assert out.attrs["homomorphic_sd"] == pytest.approx(ratio.std(), rel=1e-5)
    raw = homomorphic(as_movie(movie, (5, 33, 29)), HomomorphicParams(sigma=6.0, normalize=False)).compute()
    np.testing.assert_allclose(raw.values, ratio, rtol=1e-4)


def test_homomorphic_cancels_multiplicative_illumination():
    rng = np.random.default_rng(3)
    ny, nx = 128, 128
    yy, xx = np.mgrid[:ny, :nx]
    cells = 1 + 0.8 * (((yy % 16 - 8) ** 2 + (xx % 16 - 8) ** 2) < 9)
    illumination = 100 * np.exp(2.0 * xx / nx + 1.0 * yy / ny)  # ~20x brighter in one corner
    movie = (illumination * cells)[None] * (1 + 0.01 * rng.normal(size=(4, ny, nx)))
    out = homomorphic(as_movie(movie.astype(np.float32), (2, ny, nx)), HomomorphicParams(sigma=12.0)).compute()
    mean = out.values.mean(axis=0)
    centres = (yy % 16 == 8) & (xx % 16 == 8)
    far = ((yy % 16 - 8) ** 2 + (xx % 16 - 8) ** 2) > 25
    inner = (yy >= 32) & (yy < 96) & (xx >= 32) & (xx < 96)  # > 2.5 sigma from the borders
    raw_cells = movie.mean(0)[centres & inner]
    assert raw_cells.max() / raw_cells.min() > 2.5
    filt_cells = mean[centres & inner]
    assert filt_cells.max() / filt_cells.min() < 1.05  # the illumination is gone
    assert filt_cells.mean() > 1.5 * mean[far & inner].mean()  # the cells are not


def test_morphology_matches_scipy_and_skimage_opening():
    movie = noisy_movie().astype(np.float32)
    out = morphological_background(as_movie(movie, (5, 33, 29)), MorphParams(radius=5, downsample=1)).compute()
    fp = disk(5).astype(bool)
    scipy_bg = np.stack([ndimage.grey_opening(f, footprint=fp, mode="reflect") for f in movie])
    np.testing.assert_allclose(out.values, movie - scipy_bg, atol=1e-3)
    # scikit-image pads differently at the border; the interior must agree exactly
    sk_bg = np.stack([sk_opening(f, disk(5)) for f in movie])
    np.testing.assert_allclose(out.values[:, 10:-10, 10:-10], (movie - sk_bg)[:, 10:-10, 10:-10], atol=1e-3)
    assert (out.values >= 0).all()


@pytest.mark.parametrize("downsample", [1, 2])
def test_morphology_removes_smooth_background_and_keeps_blobs(downsample):
    rng = np.random.default_rng(7)
    ny, nx, r = 96, 96, 4
    yy, xx = np.mgrid[:ny, :nx]
    background = 400 * np.exp(-((yy - 30) ** 2 + (xx - 60) ** 2) / (2 * 35.0**2)) + 100
    centres = [(int(a), int(b)) for a, b in rng.integers(10, 86, (12, 2))]
    blobs = sum(60 * np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / (2 * (r / 2) ** 2)) for a, b in centres)
    movie = (background + blobs + rng.normal(0, 5, (4, ny, nx))).astype(np.float32)
    out = morphological_background(
        as_movie(movie, (2, ny, nx)), MorphParams(radius=1.5 * r, downsample=downsample)
    ).compute().values
    far = blobs < 0.5

    def contrast(img: np.ndarray) -> float:
        peak = np.mean([img[:, a, b].mean() for a, b in centres])
        return (peak - np.median(img[:, far])) / img[:, far].std()

    before, after = contrast(movie), contrast(out)
    assert after > 5 * before  # the background's spread no longer drowns the blobs
    assert after > 8
    # most of each blob's peak survives
    kept = np.mean([out[:, a, b].mean() for a, b in centres]) / np.mean([blobs[a, b] for a, b in centres])
    assert kept > 0.6


def test_perona_malik_matches_loop_reference():
    movie = noisy_movie().astype(np.float32)
    params = PeronaMalikParams(n_iter=4, step=0.25)
    out = perona_malik(as_movie(movie, (5, 33, 29)), params).compute().values
    expected = np.empty_like(movie)
    for i, frame in enumerate(movie.astype(np.float64)):
        d = np.concatenate([np.diff(frame, axis=0).ravel(), np.diff(frame, axis=1).ravel()])
        kappa = 2.0 * 1.4826 * np.median(np.abs(d - np.median(d)))
        u = frame.copy()
        for _ in range(params.n_iter):
            p = np.pad(u, 1, mode="edge")  # zero flux across the border
            total = 0.0
            for nb in (p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]):
                g = nb - u
                total = total + np.exp(-((g / kappa) ** 2)) * g
            u = u + params.step * total
        expected[i] = u
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-3)


def test_perona_malik_smooths_flat_regions_and_keeps_a_step_edge():
    rng = np.random.default_rng(1)
    ny, nx = 64, 64
    clean = np.zeros((ny, nx), np.float32)
    clean[:, nx // 2:] = 10.0
    movie = (clean + rng.normal(0, 1, (6, ny, nx))).astype(np.float32)
    out = perona_malik(as_movie(movie, (3, ny, nx)), PeronaMalikParams(n_iter=10)).compute().values
    flat = (slice(None), slice(None), slice(4, nx // 2 - 8))
    band = (slice(None), slice(None), slice(nx // 2 - 4, nx // 2 + 4))
    assert out[flat].var() < 0.1 * movie[flat].var()
    # a Gaussian blur with the same noise reduction in the flat region
    lo, hi = 0.05, 8.0
    for _ in range(40):
        sigma = (lo + hi) / 2
        blurred = ndimage.gaussian_filter(movie, (0, sigma, sigma), mode="reflect")
        lo, hi = (sigma, hi) if blurred[flat].var() > out[flat].var() else (lo, sigma)
    rmse_pm = np.sqrt(((out - clean)[band] ** 2).mean())
    rmse_gauss = np.sqrt(((blurred - clean)[band] ** 2).mean())
    assert rmse_pm < 0.3 * rmse_gauss
    # the edge stays steep: the jump across the middle two columns is nearly the full step
    jump = (out[:, :, nx // 2] - out[:, :, nx // 2 - 1]).mean()
    assert jump > 8.0


def test_difference_noise_sd_is_robust():
    rng = np.random.default_rng(2)
    frames = rng.normal(0, 3, (4, 80, 80))
    frames[:, :, 40:] += 100  # an edge: few large differences
    np.testing.assert_allclose(difference_noise_sd(frames), 3 * np.sqrt(2), rtol=0.05)
    assert difference_noise_sd(np.ones((2, 1, 1))).tolist() == [0.0, 0.0]


def test_clip_contrast_matches_full_percentiles_when_sampling_everything():
    movie = noisy_movie()
    out = clip_contrast(as_movie(movie, (5, 33, 29)), ContrastParams(sample_frames=10_000, max_samples=10**7))
    lo, hi = np.percentile(movie.astype(np.float64), [3, 99])
    assert out.attrs["contrast_limits"] == pytest.approx([lo, hi])
    expected = (np.clip(movie, lo, hi) - lo) / (hi - lo)
    values = out.compute().values
    np.testing.assert_allclose(values, expected, atol=1e-6)
    assert values.min() == 0.0 and values.max() == 1.0
    assert np.isclose((values == 0).mean(), 0.03, atol=0.01)
    assert np.isclose((values == 1).mean(), 0.01, atol=0.01)


def test_clip_contrast_subsample_estimates_the_percentiles():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:40, :40]
    movie = np.round(300 + 3 * yy + xx + rng.exponential(40, (200, 40, 40))).astype(np.uint16)
    limits = clip_contrast(as_movie(movie, (50, 40, 40)), ContrastParams(sample_frames=40, max_samples=20_000))
    lo, hi = np.percentile(movie.astype(np.float64), [3, 99])
    spread = hi - lo
    assert abs(limits.attrs["contrast_limits"][0] - lo) < 0.05 * spread
    assert abs(limits.attrs["contrast_limits"][1] - hi) < 0.05 * spread


def test_highpass_matches_direct_formula_and_validates_sigma():
    movie = noisy_movie()
    out = highpass(as_movie(movie, (5, 33, 29)), 3.0).compute().values
    f = movie.astype(np.float64)
    expected = np.stack([fr - ndimage.gaussian_filter(fr, 3.0, mode="reflect") for fr in f])
    np.testing.assert_allclose(out, expected, atol=2e-3)
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(ParameterError, match="sigma"):
            highpass(as_movie(movie), bad)


# ----------------------------------------------------------------------------- robustness


@pytest.mark.parametrize("name", sorted(FILTERS))
@pytest.mark.parametrize("value", [0, 250])
def test_constant_movie_gives_finite_output(name, value):
    movie = np.full((6, 16, 17), value, np.uint16)
    out = FILTERS[name](as_movie(movie, (4, 16, 17))).compute().values
    assert np.isfinite(out).all()
    if name.startswith(("morph", "perona", "highpass")):
        np.testing.assert_allclose(out, value if name.startswith("perona") else 0.0, atol=1e-3)
    if name == "clip":
        assert (out == 0).all()
    if name.startswith("homomorphic"):
        np.testing.assert_allclose(out, 1.0, atol=1e-4)


@pytest.mark.parametrize(
    "func",
    [
        lambda m: homomorphic(m, HomomorphicParams()),
        lambda m: morphological_background(m, MorphParams()),
        lambda m: perona_malik(m, PeronaMalikParams()),
        lambda m: clip_contrast(m, ContrastParams()),
        lambda m: highpass(m, 1.0),
    ],
)
def test_bad_inputs_raise_input_error(func):
    with pytest.raises(InputError, match="dims"):
        func(xr.DataArray(np.zeros((4, 5, 6)), dims=("y", "x", "frame")))
    with pytest.raises(InputError, match="real number"):
        func(xr.DataArray(np.zeros((4, 5, 6), complex), dims=("frame", "y", "x")))
    with pytest.raises(InputError, match="empty"):
        func(xr.DataArray(np.zeros((0, 5, 6)), dims=("frame", "y", "x")))


def test_params_are_frozen_strict_and_validated():
    p = PeronaMalikParams()
    with pytest.raises(ValidationError):
        p.n_iter = 3  # type: ignore[misc]
    with pytest.raises(ValidationError):
        PeronaMalikParams(step=0.3)
    with pytest.raises(ValidationError):
        MorphParams(radius=5, typo=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="below high_percentile"):
        ContrastParams(low_percentile=99, high_percentile=3)
    with pytest.raises(ValidationError):
        HomomorphicParams(sigma=0)
    with pytest.raises(ParameterError, match="modality"):
        MorphParams.for_movie(30, "3p", 5)
    with pytest.raises(ParameterError, match="neuron_radius"):
        HomomorphicParams.for_movie(30, "2p", 0)


def test_for_movie_defaults_follow_the_neuron_radius():
    assert HomomorphicParams.for_movie(30, "2p", 7.5).sigma == 30.0  # ≈ STNeuroNet's 30 px on ABO
    morph = MorphParams.for_movie(20, "1p", 6)
    assert morph.radius == 9.0 and morph.downsample == 2
    assert MorphParams.for_movie(20, "1p", 2).downsample == 1
    pm_small, pm_big = PeronaMalikParams.for_movie(20, "1p", 4), PeronaMalikParams.for_movie(20, "1p", 12)
    assert 2 <= pm_small.n_iter < pm_big.n_iter
    assert np.sqrt(2 * pm_big.step * pm_big.n_iter) == pytest.approx(12 / 4, rel=0.2)
    assert ContrastParams.for_movie(30, "2p", 5) == ContrastParams()


# ----------------------------------------------------------------------------- memory


class PeakHeld(Callback):
    """Largest total size of task results the local scheduler holds at once."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        held = sum(getattr(v, "nbytes", 0) for v in state["cache"].values())
        self.peak = max(self.peak, held)


def test_long_movie_streams_with_memory_bounded_by_chunks():
    shape, frames_per_chunk = (4000, 128, 128), 50
    chunk_bytes = frames_per_chunk * 128 * 128 * 4
    movie = xr.DataArray(
        da.zeros(shape, dtype=np.float32, chunks=(frames_per_chunk, 128, 128)) + 7.0, dims=("frame", "y", "x")
    )
    meter = PeakHeld()
    with meter:  # the SD pass runs inside homomorphic(), also metered
        out = homomorphic(movie, HomomorphicParams(sigma=2.0))
        hp = highpass(out, 1.0)
        mean = float(hp.mean().compute(scheduler="sync"))
    assert mean == pytest.approx(0.0, abs=1e-5)
    assert meter.peak <= 3 * chunk_bytes, meter.peak / chunk_bytes
    assert meter.peak < movie.nbytes / 20
