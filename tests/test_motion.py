"""Tests of somaflow.preprocess.motion: sign convention, accuracy, laziness, dask == eager."""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from pydantic import ValidationError
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.preprocess.motion import (
    MotionParams,
    apply_shifts,
    compute_template,
    correct_motion,
    crop_border,
    estimate_shifts,
    nonrigid_deviation,
    resolve_mode,
    shifts_at,
)


# ----------------------------------------------------------------------------- helpers
def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A 2p-like image: smoothed noise plus bright Gaussian blobs, float32, > 0."""
    rng = np.random.default_rng(seed)
    img = 20.0 + 10.0 * ndimage.gaussian_filter(rng.standard_normal(shape), 3.0) * 8.0
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for _ in range(shape[0] * shape[1] // 250):
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        r = rng.uniform(2.0, 4.0)
        img += rng.uniform(30, 80) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return np.clip(img, 1.0, None).astype(np.float32)


def _rigid_movie(
    template: np.ndarray, shifts: np.ndarray, seed: int, photons: float | None = 20.0
) -> np.ndarray:
    """Frames ``template(y - dy, x - dx)`` (the simulator's convention), Poisson noise."""
    frames = np.stack([ndimage.shift(template, s, order=3, mode="nearest") for s in shifts])
    if photons is None:
        return frames.astype(np.float32)
    rng = np.random.default_rng(seed)
    scale = photons / template.mean()
    return (rng.poisson(np.clip(frames, 0, None) * scale) / scale).astype(np.float32)


def _warped_movie(template: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Frames with a smooth non-rigid displacement field (rigid part up to 2 px)."""
    rng = np.random.default_rng(seed)
    ny, nx = template.shape
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    out = []
    for t in range(n):
        a, b = rng.uniform(-2, 2, 2)
        dy = a + 0.8 * np.sin(2 * np.pi * xx / nx + t)
        dx = b + 0.8 * np.cos(2 * np.pi * yy / ny + t)
        out.append(ndimage.map_coordinates(template, [yy - dy, xx - dx], order=3, mode="nearest"))
    return np.stack(out).astype(np.float32)


def _movie(arr: np.ndarray) -> xr.DataArray:
    return xr.DataArray(arr, dims=("frame", "y", "x"))


def _rms(est: np.ndarray, true: np.ndarray) -> float:
    """RMS length of the (dy, dx) error after removing its temporal mean (per patch)."""
    d = np.asarray(est, np.float64) - np.asarray(true, np.float64)
    d = d - d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=-1).mean()))


# ----------------------------------------------------------------------------- parameters
def test_params_are_frozen_and_validated():
    p = MotionParams()
    with pytest.raises(ValidationError):
        p.max_shift = 3.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        MotionParams(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="patch_overlap"):
        MotionParams(patch_size=32, patch_overlap=32)
    with pytest.raises(ValidationError, match="max_deviation"):
        MotionParams(mode="piecewise", patch_size=16, patch_overlap=8, max_deviation=5)
    with pytest.raises(ValidationError):
        MotionParams(mode="affine")  # type: ignore[arg-type]


def test_for_movie_derives_defaults():
    p2 = MotionParams.for_movie(30.0, "2p", 6.0, (1000, 512, 512))
    p1 = MotionParams.for_movie(20.0, "1p", 6.0, (512, 512))
    assert p2.mode == "piecewise" and p1.mode == "rigid"
    assert p2.highpass_sigma == 0 and p1.highpass_sigma == pytest.approx(12.0)
    assert p2.patch_whitening < p1.patch_whitening
    assert p2.patch_size % 8 == 0 and p2.patch_size <= 512
    assert p2.patch_overlap == p2.patch_size // 4
    assert p2.max_deviation <= p2.patch_size / 4
    small = MotionParams.for_movie(10.0, "2p", 5.0, (100, 40, 200))
    assert small.patch_size <= 40
    assert MotionParams.for_movie(10.0, "2p", 5.0, (10, 64, 64), mode="rigid").mode == "rigid"
    with pytest.raises(ParameterError, match="modality"):
        MotionParams.for_movie(10.0, "3p", 5.0, (64, 64))
    with pytest.raises(ParameterError, match="neuron_radius"):
        MotionParams.for_movie(10.0, "2p", 0.0, (64, 64))


# ----------------------------------------------------------------------------- synthetic
def test_sign_convention_and_registration():
    """shifts = displacement of the frame; applying -shift gives the template back."""
    tmpl = _texture((96, 96), seed=1)
    true = np.random.default_rng(2).uniform(-3.0, 3.0, (24, 2)).astype(np.float32)
    movie = _movie(_rigid_movie(tmpl, true, seed=3, photons=None))
    p = MotionParams(mode="rigid", max_shift=6)
    ds = estimate_shifts(movie, xr.DataArray(tmpl, dims=("y", "x")), p).compute()
    est = ds["shifts"].values
    assert ds["shifts"].dims == ("frame", "axis") and list(ds["axis"].values) == ["y", "x"]
    assert ds["shifts"].dtype == np.float32
    # not only small after removing an offset: the same sign and no offset
    assert np.abs(est - true).max() < 0.05
    registered = apply_shifts(movie, ds, p).compute().values
    inner = np.s_[:, 8:-8, 8:-8]
    raw_err = np.abs(movie.values[inner] - tmpl[None][inner]).mean()
    reg_err = np.abs(registered[inner] - tmpl[None][inner]).mean()
    assert reg_err < 0.02 * raw_err


def test_rigid_accuracy_with_noise_and_template():
    tmpl = _texture((96, 96), seed=4)
    true = np.random.default_rng(5).uniform(-2.5, 2.5, (60, 2)).astype(np.float32)
    movie = _movie(_rigid_movie(tmpl, true, seed=6, photons=10.0))
    p = MotionParams(mode="rigid", max_shift=6, template_frames=30)
    template = compute_template(movie, p)
    assert template.dims == ("y", "x") and template.dtype == np.float32
    assert template.attrs["template_frames"] == 30
    ds = estimate_shifts(movie, template, p).compute()
    assert _rms(ds["shifts"].values, true) < 0.1
    assert float(ds["correlation"].min()) > 0.2


def test_max_shift_limits_the_search():
    tmpl = _texture((96, 96), seed=7)
    true = np.array([[5.0, -5.0], [1.0, 1.0]], dtype=np.float32)
    movie = _movie(_rigid_movie(tmpl, true, seed=0, photons=None))
    ds = estimate_shifts(movie, xr.DataArray(tmpl, dims=("y", "x")), MotionParams(max_shift=2.0))
    est = ds["shifts"].values
    assert np.all(np.abs(est) <= 2.0 + 1e-6)
    np.testing.assert_allclose(est[1], true[1], atol=0.05)


def test_downsampled_estimate_is_in_full_resolution_pixels():
    tmpl = _texture((128, 128), seed=8)
    true = np.random.default_rng(9).uniform(-4.0, 4.0, (20, 2)).astype(np.float32)
    movie = _movie(_rigid_movie(tmpl, true, seed=10, photons=None))
    p = MotionParams(mode="rigid", max_shift=8, downsample=2)
    ds = estimate_shifts(movie, xr.DataArray(tmpl, dims=("y", "x")), p).compute()
    assert np.abs(ds["shifts"].values - true).max() < 0.25


def test_piecewise_recovers_a_smooth_field():
    tmpl = _texture((128, 128), seed=11)
    movie = _movie(_warped_movie(tmpl, 12, seed=12))
    p = MotionParams(mode="piecewise", patch_size=48, patch_overlap=24, max_shift=6)
    ds = estimate_shifts(movie, xr.DataArray(tmpl, dims=("y", "x")), p).compute()
    assert ds["patch_shifts"].dims == ("frame", "patch_y", "patch_x", "axis")
    cy, cx = ds["patch_y"].values, ds["patch_x"].values
    assert cy[0] == pytest.approx(23.5) and cx[-1] == pytest.approx(128 - 24.5)
    rng = np.random.default_rng(12)
    yy, xx = np.meshgrid(cy, cx, indexing="ij")
    true = []
    for t in range(12):
        a, b = rng.uniform(-2, 2, 2)
        true.append(
            np.stack(
                [a + 0.8 * np.sin(2 * np.pi * xx / 128 + t), b + 0.8 * np.cos(2 * np.pi * yy / 128 + t)],
                axis=-1,
            )
        )
    true = np.stack(true)
    err_piecewise = np.sqrt(((ds["patch_shifts"].values - true) ** 2).sum(-1).mean())
    err_rigid = np.sqrt(((ds["shifts"].values[:, None, None, :] - true) ** 2).sum(-1).mean())
    assert err_piecewise < 0.25 < err_rigid
    # shifts_at reproduces the patch values at the centres
    at = shifts_at(ds, cy, cx).values
    np.testing.assert_allclose(at, ds["patch_shifts"].values, atol=1e-4)
    # registration removes the deformation: the registered movie is close to the template
    reg = apply_shifts(movie, ds, p).compute().values
    inner = np.s_[:, 10:-10, 10:-10]
    raw_err = np.abs(movie.values[inner] - tmpl[None][inner]).mean()
    assert np.abs(reg[inner] - tmpl[None][inner]).mean() < 0.25 * raw_err


# ----------------------------------------------------------------------------- simulator
@pytest.mark.parametrize("preset", ["2p-small", "1p-small"])
def test_rigid_accuracy_on_simulated_presets(preset):
    sim_mod = pytest.importorskip("somaflow.simulate")
    sim = sim_mod.simulate(preset, seed=0)
    movie = _movie(sim.movie)
    meta = sim.meta
    p = MotionParams.for_movie(
        meta["fps"], meta["modality"], meta["neuron_radius"], movie.shape, mode="rigid"
    )
    corrected, ds = correct_motion(movie, p)
    # the simulator records the same sign (see somaflow.simulate.SHIFT_CONVENTION);
    # the acceptance target is 0.1 px, the test allows 0.2 so it cannot flake
    assert _rms(ds["shifts"].values, sim.shifts) < 0.2
    assert corrected.dtype == np.float32 and corrected.shape == movie.shape


def test_piecewise_accuracy_on_simulated_nonrigid_preset():
    sim_mod = pytest.importorskip("somaflow.simulate")
    sim = sim_mod.simulate("2p-nonrigid", seed=0, n_frames=120)
    movie = _movie(sim.movie)
    meta = sim.meta
    p = MotionParams.for_movie(meta["fps"], meta["modality"], meta["neuron_radius"], movie.shape)
    assert p.mode == "piecewise"
    template = compute_template(movie, p)
    ds = estimate_shifts(movie, template, p).compute()
    cy, cx = (np.asarray(c, dtype=np.float64) for c in meta["patch_centers"])
    est = shifts_at(ds, cy, cx).values  # (frame, 3, 3, axis) at the simulator's patch centres
    true = sim.patch_shifts
    # RMS over frames and patches after removing each patch's constant offset;
    # the acceptance target is 0.25 px; measured 0.19 here (0.21-0.22 on seeds 100-102 at
    # 300 frames, 0.24 before the whole-field refinement), the test allows 0.3 so it cannot flake
    per_patch = _rms(est, true)
    rigid_only = _rms(np.broadcast_to(ds["shifts"].values[:, None, None, :], true.shape), true)
    assert per_patch < 0.3
    assert per_patch < 0.5 * rigid_only
    # the rigid part is the spatial mean of the field, as the simulator's shifts
    assert _rms(ds["shifts"].values, sim.shifts) < 0.2


def test_auto_mode_registers_piecewise_only_non_rigid_movies():
    sim_mod = pytest.importorskip("somaflow.simulate")
    chosen = {}
    for preset in ("2p-nonrigid", "2p-small"):
        sim = sim_mod.simulate(preset, seed=3, n_frames=120)
        movie = _movie(sim.movie)
        meta = sim.meta
        p = MotionParams.for_movie(meta["fps"], "2p", meta["neuron_radius"], movie.shape, mode="auto")
        with pytest.raises(ParameterError, match="auto"):
            estimate_shifts(movie, compute_template(movie, p.model_copy(update={"mode": "rigid"})), p)
        resolved, template = resolve_mode(movie, p)
        deviation = template.attrs["nonrigid_deviation"]
        assert template.attrs["motion_mode"] == resolved.mode
        chosen[preset] = (resolved.mode, deviation)
        corrected, ds = correct_motion(movie, p)  # the same choice in one call
        assert ("patch_shifts" in ds) == (resolved.mode == "piecewise")
        assert corrected.shape == movie.shape
    # measured on 300-frame tuning seeds: 1.14-1.22 px against 0-0.04 (threshold 0.4)
    assert chosen["2p-nonrigid"][0] == "piecewise" and chosen["2p-nonrigid"][1] > 0.8
    assert chosen["2p-small"][0] == "rigid" and chosen["2p-small"][1] < 0.25


def test_auto_mode_keeps_a_structureless_movie_rigid():
    # pure noise: every patch match is an error of several px, none persists from frame to frame
    # (this movie measures 0.0 px, a 300-frame 128x128 one 0.12; the earlier RMS of smoothed
    # deviations read 0.83 and 1.09 px on them, and the covariance alone 0.50 on the second)
    rng = np.random.default_rng(5)
    movie = _movie(rng.normal(100.0, 10.0, (200, 96, 96)).astype(np.float32))
    p = MotionParams.for_movie(10.0, "2p", 5.0, movie.shape, mode="auto")
    resolved, template = resolve_mode(movie, p)
    assert resolved.mode == "rigid"
    assert template.attrs["nonrigid_deviation"] < p.auto_threshold


def test_nonrigid_deviation_reads_a_persistent_field_and_not_matching_noise():
    # one quadrant of textured frames displaced by +2 px along x for the first half of the movie
    # and -2 px for the second: a persistent deformation; the same frames undeformed read ~0
    tmpl = _texture((96, 96), seed=21)
    p = MotionParams(mode="rigid", patch_size=32, patch_overlap=16, max_shift=5, template_frames=60,
                     auto_frames=100)
    rng = np.random.default_rng(3)
    still = np.stack([tmpl] * 120).astype(np.float32)
    warped = still.copy()
    for t in range(120):
        warped[t, :48, :48] = np.roll(tmpl, 2 if t < 60 else -2, axis=1)[:48, :48]
    noise = rng.normal(0, 0.05 * float(tmpl.std()), still.shape).astype(np.float32)
    template = xr.DataArray(tmpl.astype(np.float32), dims=("y", "x"))
    assert nonrigid_deviation(_movie(still + noise), template, p) < 0.1
    assert nonrigid_deviation(_movie(warped + noise), template, p) > 0.5


# ----------------------------------------------------------------------------- dask
@pytest.mark.parametrize("mode", ["rigid", "piecewise"])
def test_dask_equals_eager_across_chunk_boundaries(mode):
    tmpl = _texture((64, 64), seed=13)
    frames = _warped_movie(tmpl, 23, seed=14)
    p = MotionParams(mode=mode, patch_size=32, patch_overlap=16, max_shift=5, template_frames=10)
    eager = _movie(frames)  # numpy: one chunk
    lazy = _movie(da.from_array(frames, chunks=(7, 32, 64)))  # frame and spatial chunks
    template = compute_template(eager, p)
    np.testing.assert_allclose(compute_template(lazy, p).values, template.values, rtol=1e-6)
    ds_e = estimate_shifts(eager, template, p)
    ds_l = estimate_shifts(lazy, template, p)
    assert isinstance(ds_l["shifts"].data, da.Array)
    assert ds_l["shifts"].data.numblocks[0] == 4
    ds_e, ds_l = ds_e.compute(), ds_l.compute()
    for name in ds_e.data_vars:
        np.testing.assert_allclose(ds_l[name].values, ds_e[name].values, atol=1e-4)
    out_e = apply_shifts(eager, ds_e, p)
    out_l = apply_shifts(lazy, ds_l, p)
    assert out_l.data.chunks[0] == (7, 7, 7, 2)
    np.testing.assert_allclose(out_l.values, out_e.values, rtol=1e-5, atol=1e-3)


class _ChunkLog:
    """A dask movie whose chunk reads are recorded (thread-safe)."""

    def __init__(self, frames: np.ndarray, chunk: int):
        self.frames, self.chunk = frames, chunk
        self.read: set[int] = set()
        self.lock = threading.Lock()

    def movie(self) -> xr.DataArray:
        n = self.frames.shape[0]
        blocks = []
        for i, start in enumerate(range(0, n, self.chunk)):
            stop = min(start + self.chunk, n)
            blocks.append(
                da.from_delayed(
                    dask.delayed(self._load)(i, start, stop),
                    shape=(stop - start, *self.frames.shape[1:]),
                    dtype=self.frames.dtype,
                )
            )
        return _movie(da.concatenate(blocks, axis=0))

    def _load(self, i: int, start: int, stop: int) -> np.ndarray:
        with self.lock:
            self.read.add(i)
        return self.frames[start:stop]


def test_template_reads_only_its_frames_and_estimation_is_lazy():
    tmpl = _texture((64, 64), seed=15)
    true = np.random.default_rng(16).uniform(-2, 2, (100, 2))
    log = _ChunkLog(_rigid_movie(tmpl, true, seed=17), chunk=10)
    movie = log.movie()
    p = MotionParams(mode="rigid", template_frames=3, max_shift=5)
    template = compute_template(movie, p)
    assert log.read == {0, 5, 9}  # frames 0, 50 and 99
    ds = estimate_shifts(movie, template, p)
    corrected = apply_shifts(movie, ds, p)
    assert log.read == {0, 5, 9}  # nothing computed yet
    corrected, ds = dask.compute(corrected, ds)
    assert log.read == set(range(10))
    assert _rms(ds["shifts"].values, true) < 0.2


# ----------------------------------------------------------------------------- options
def test_mode_none_passes_the_movie_through():
    frames = (np.arange(4 * 16 * 16) % 7).reshape(4, 16, 16).astype(np.uint16)
    movie = _movie(frames)
    p = MotionParams(mode="none", patch_size=8, patch_overlap=4)
    corrected, ds = correct_motion(movie, p)
    assert corrected.dtype == np.float32
    np.testing.assert_array_equal(corrected.values, frames.astype(np.float32))
    assert not ds["shifts"].values.any()


def test_border_fill_and_crop():
    tmpl = _texture((64, 64), seed=18)
    true = np.array([[2.4, -1.2], [-0.5, 0.3]], dtype=np.float32)
    movie = _movie(_rigid_movie(tmpl, true, seed=0, photons=None))
    p = MotionParams(mode="rigid", border="nan", max_shift=4)
    ds = estimate_shifts(movie, xr.DataArray(tmpl, dims=("y", "x")), p)
    reg = apply_shifts(movie, ds, p).values
    # frame 0 is sampled at y + 2.4: its last rows come from outside the frame
    assert np.isnan(reg[0, -1]).all() and not np.isnan(reg[0, :60, 2:60]).any()
    cropped = crop_border(movie, ds)
    assert cropped.attrs["crop"] == [3, 2]
    assert cropped.shape == (2, 64 - 6, 64 - 4)
    zero = apply_shifts(movie, ds, p.model_copy(update={"border": "zero"})).values
    assert (zero[0, -1] == 0).all()


def test_errors_name_the_problem():
    movie = _movie(np.zeros((3, 32, 32), np.float32))
    p = MotionParams(mode="rigid")
    with pytest.raises(InputError, match="dims"):
        compute_template(movie.transpose("y", "x", "frame"), p)
    with pytest.raises(InputError, match="template"):
        estimate_shifts(movie, xr.DataArray(np.zeros((16, 16)), dims=("y", "x")), p)
    ds = estimate_shifts(movie, xr.DataArray(np.ones((32, 32)), dims=("y", "x")), p)
    with pytest.raises(ParameterError, match="patch_shifts"):
        apply_shifts(movie, ds, MotionParams(mode="piecewise", patch_size=16, patch_overlap=8))
    with pytest.raises(InputError, match="frames"):
        apply_shifts(movie.isel(frame=slice(0, 2)), ds, p)


def test_patches_without_signal_fall_back_to_rigid():
    tmpl = _texture((128, 128), seed=19)
    true = np.random.default_rng(20).uniform(-2, 2, (6, 2)).astype(np.float32)
    frames = _rigid_movie(tmpl, true, seed=21, photons=10.0)
    # the top-left corner of every frame loses its signal (e.g. a shadow)
    frames[:, :48, :48] = np.random.default_rng(22).poisson(10.0, (6, 48, 48)) * tmpl.mean() / 10
    p = MotionParams(mode="piecewise", patch_size=48, patch_overlap=24, max_shift=6)
    ds = estimate_shifts(_movie(frames), xr.DataArray(tmpl, dims=("y", "x")), p).compute()
    fallback = ds["patch_fallback"].values
    assert fallback[:, 0, 0].all() and not fallback[:, 2:, 2:].any()
    np.testing.assert_allclose(
        ds["patch_shifts"].values[:, 0, 0], ds["shifts"].values, atol=0.3
    )
