"""Tests of the calcium-movie simulator: determinism, realism and the written files."""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
import tifffile
from scipy import ndimage

from somaflow.errors import ParameterError, ResultExistsError
from somaflow.io.schema import RESULT_VARIABLES, open_result
from somaflow.io.stores import checksum
from somaflow.simulate import (
    BLOCK,
    PRESETS,
    SimulationParams,
    SummaryAccumulator,
    as_dask_array,
    iter_movie_chunks,
    list_presets,
    render_frames,
    simulate,
    write_simulation,
)
from somaflow.simulate import model as sim_model
from somaflow.simulate import write as sim_write

SHORT = 96  # frames for most tests: three render blocks


@pytest.fixture(scope="module")
def small():
    return simulate("2p-small", seed=3, n_frames=SHORT)


@pytest.fixture(scope="module")
def one_photon():
    return simulate("1p-small", seed=5, n_frames=SHORT)


# ----------------------------------------------------------------------------- presets and params


def test_presets_cover_the_required_set():
    required = {"2p-small", "2p-dense", "2p-lowsnr", "2p-nonrigid", "1p-small", "2p-large", "1p-large"}
    assert required <= set(PRESETS)
    listed = dict(list_presets())
    assert set(listed) == set(PRESETS)
    assert all(isinstance(d, str) and d and "\n" not in d for d in listed.values())
    for name, p in PRESETS.items():
        assert p.name == name
        assert p.modality in ("2p", "1p")
        assert p.fps > 0 and p.neuron_radius > 0 and p.n_cells > 0
    assert PRESETS["2p-large"].shape == (512, 512) and PRESETS["2p-large"].n_frames == 8000
    assert PRESETS["1p-small"].modality == "1p" and PRESETS["1p-small"].n_blobs > 1


def test_params_are_frozen_and_validated():
    p = PRESETS["2p-small"]
    with pytest.raises(AttributeError):
        p.n_cells = 3  # type: ignore[misc]
    with pytest.raises(ParameterError, match="modality"):
        SimulationParams(modality="3p")
    with pytest.raises(ParameterError, match="silent_fraction"):
        SimulationParams(silent_fraction=1.5)
    with pytest.raises(ParameterError, match="nonrigid_amplitude"):
        SimulationParams(motion="nonrigid", nonrigid_amplitude=0.0)
    assert SimulationParams(shape=[64, 80]).shape == (64, 80)  # lists from YAML become tuples
    json.dumps(p.to_dict())


def test_simulate_rejects_bad_requests():
    with pytest.raises(ParameterError, match="unknown simulation preset"):
        simulate("2p-huge")
    with pytest.raises(ParameterError, match="unknown simulation parameters"):
        simulate("2p-small", n_cellz=3)
    with pytest.raises(ParameterError, match="seed"):
        simulate("2p-small", seed=-1)
    with pytest.raises(ParameterError, match="do not fit"):
        simulate("2p-small", n_cells=400, min_distance=2.0, overlap_fraction=0.0, n_frames=8)


# ----------------------------------------------------------------------------- API shapes


def test_simulation_arrays_have_documented_shapes(small):
    n, T, (Y, X) = small.n_units, SHORT, small.params.shape
    assert n == small.params.n_cells
    assert small.movie.shape == (T, Y, X) and small.movie.dtype == np.uint16
    assert small.masks.shape == (n, Y, X) and small.masks.dtype == bool
    assert small.footprints.shape == (n, Y, X) and small.footprints.dtype == np.float32
    np.testing.assert_allclose(small.footprints.max(axis=(1, 2)), 1.0, rtol=1e-6)
    assert small.calcium.shape == (n, T) and small.calcium.dtype == np.float32
    assert small.spikes.shape == (n, T) and small.spikes.dtype == np.float32
    assert small.shifts.shape == (T, 2) and small.shifts.dtype == np.float32
    assert small.active.shape == (n,) and small.active.dtype == bool
    meta = small.meta
    for key in ("fps", "modality", "neuron_radius", "preset", "seed", "shape", "n_units", "params"):
        assert key in meta
    assert meta["preset"] == "2p-small" and meta["seed"] == 3 and meta["shape"] == [T, Y, X]
    assert meta["params"]["n_frames"] == T
    json.dumps(meta)
    # every mask is the footprint above threshold around its maximum (a nucleus hole filled)
    for fp, mask in zip(small.footprints, small.masks, strict=True):
        above = fp >= small.params.mask_threshold
        assert mask.flat[np.argmax(fp)]
        assert above[mask].mean() > 0.7
        assert not (above & ~mask & ndimage.binary_dilation(mask)).any()


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_movie_other_seed_different(small):
    again = simulate("2p-small", seed=3, n_frames=SHORT)
    np.testing.assert_array_equal(again.movie, small.movie)
    np.testing.assert_array_equal(again.masks, small.masks)
    np.testing.assert_array_equal(again.calcium, small.calcium)
    other = simulate("2p-small", seed=4, n_frames=SHORT)
    assert not np.array_equal(other.movie, small.movie)
    assert not np.array_equal(other.masks, small.masks)


def test_chunked_generation_equals_whole(small):
    chunks = list(iter_movie_chunks(small, frames_per_chunk=23))  # not a multiple of BLOCK
    assert [c.shape[0] for c in chunks] == [23, 23, 23, 23, 4]
    np.testing.assert_array_equal(np.concatenate(chunks), small.movie)
    np.testing.assert_array_equal(render_frames(small, 40, 71), small.movie[40:71])
    np.testing.assert_array_equal(as_dask_array(small, frames_per_chunk=BLOCK).compute(), small.movie)
    from_params = next(iter_movie_chunks(PRESETS["2p-small"], seed=3, frames_per_chunk=10))
    np.testing.assert_array_equal(from_params, render_frames(simulate("2p-small", seed=3), 0, 10))


def test_2p_small_generates_fast():
    t0 = time.perf_counter()
    sim = simulate("2p-small", seed=11)
    movie = sim.movie
    elapsed = time.perf_counter() - t0
    assert movie.shape == (300, 128, 128)
    assert elapsed < 5.0, f"2p-small took {elapsed:.1f} s"


def test_large_movie_is_not_built_in_memory(monkeypatch, small):
    monkeypatch.setattr(sim_model, "MAX_IN_MEMORY_BYTES", 1000)
    sim = simulate("2p-small", seed=3, n_frames=8)
    with pytest.raises(ParameterError, match="iter_movie_chunks"):
        _ = sim.movie
    assert next(iter_movie_chunks(sim, frames_per_chunk=4)).shape == (4, 128, 128)


# ----------------------------------------------------------------------------- realism


def _mask_traces(movie: np.ndarray, masks: np.ndarray) -> np.ndarray:
    flat = movie.reshape(movie.shape[0], -1).astype(np.float64)
    m = masks.reshape(masks.shape[0], -1).astype(np.float64)
    return (m @ flat.T) / m.sum(axis=1, keepdims=True)


def test_silent_cells_have_no_spikes_but_are_visible(small):
    silent = ~small.active
    assert silent.sum() >= 3 and small.active.sum() >= 20
    assert np.all(small.spikes[silent] == 0) and np.all(small.calcium[silent] == 0)
    assert np.all(small.footprints[silent].max(axis=(1, 2)) > 0)
    # visible in the mean image: brighter inside the mask than in a ring around it
    mean = render_frames(small, 0, SHORT, motion=False, noise=False).mean(axis=0)
    for i in np.flatnonzero(silent):
        mask = small.masks[i]
        ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
        ring &= ~small.masks.any(axis=0)
        assert mean[mask].mean() > mean[ring].mean() * 1.05


def test_activity_is_gcamp_like(small):
    act = small.active
    peaks = small.calcium[act].max(axis=1)
    fired = small.spikes[act].sum(axis=1) > 0
    assert np.all(small.spikes >= 0) and np.all(small.spikes == np.round(small.spikes))
    assert np.median(peaks[fired]) > 0.2 and peaks.max() < 10
    rates = small.spikes[act].sum(axis=1) / (SHORT / small.params.fps)
    assert rates.std() > 0.1  # varied firing rates
    # decay constants within the preset's range: AR(2) roots give tau = -1 / (fps log d)
    g = small.ar_coefficients.astype(np.float64)
    d = (g[:, 0] + np.sqrt(g[:, 0] ** 2 + 4 * g[:, 1])) / 2
    tau = -1 / (small.params.fps * np.log(d))
    lo, hi = small.params.tau_decay
    assert np.all((tau > lo * 0.99) & (tau < hi * 1.01))


def test_doughnut_cells_have_a_dark_filled_nucleus(small):
    assert small.doughnut.sum() >= 5 and (~small.doughnut).sum() >= 5
    for i in np.flatnonzero(small.doughnut):
        cy, cx = np.round(small.centers[i]).astype(int)
        assert small.footprints[i, cy, cx] < 0.6
        assert small.masks[i, cy, cx]  # the hole is filled in the mask
    assert simulate("1p-small", n_frames=8).doughnut.sum() == 0


def _overlapping_pairs(masks: np.ndarray) -> np.ndarray:
    flat = masks.reshape(masks.shape[0], -1).astype(np.int32)
    return np.argwhere(np.triu(flat @ flat.T, 1) > 0)


def test_dense_preset_has_partial_overlaps():
    sim = simulate("2p-dense", seed=0, n_frames=8)
    pairs = _overlapping_pairs(sim.masks)
    masks = sim.masks.reshape(sim.n_units, -1).astype(np.int32)
    inter = masks @ masks.T
    areas = masks.sum(axis=1)
    frac = inter / np.minimum(areas[:, None], areas[None, :])
    assert len(pairs) >= 10
    assert np.all(frac[pairs[:, 0], pairs[:, 1]] < 0.9)  # partial, not duplicates
    assert len(pairs) > len(_overlapping_pairs(simulate("2p-small", seed=0, n_frames=8).masks))


def test_sizes_and_shapes_vary(small):
    areas = small.masks.sum(axis=(1, 2))
    r = small.params.neuron_radius
    assert 0.5 * np.pi * r**2 < np.median(areas) < 2.0 * np.pi * r**2
    assert areas.std() / areas.mean() > 0.08
    # elongation from the second moments of each mask
    ratios = []
    for m in small.masks:
        yy, xx = np.nonzero(m)
        ev = np.linalg.eigvalsh(np.cov(np.stack([yy, xx])))
        ratios.append(np.sqrt(ev[1] / ev[0]))
    assert max(ratios) > 1.3 and min(ratios) < 1.15


def test_one_photon_background_is_strong_and_not_low_rank(one_photon):
    sim = one_photon
    off, gain = sim.params.offset, sim.params.gain
    bg = (render_frames(sim, 0, SHORT, components=("background",), noise=False) - off) / gain
    cells = (render_frames(sim, 0, SHORT, components=("cells",), noise=False) - off) / gain
    x = bg.reshape(SHORT, -1).astype(np.float64)
    centred = x - x.mean(axis=0)
    sv = np.linalg.svd(centred, compute_uv=False) ** 2
    assert sv[0] / sv.sum() < 0.9
    # the best rank-1 (CNMF-style) background leaves a residual larger than the cells' signal
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    residual = x - (u[:, :1] * s[:1]) @ vt[:1]
    c = cells.reshape(SHORT, -1)
    assert np.sqrt((residual**2).mean()) > np.sqrt(((c - c.mean(axis=0)) ** 2).mean())
    assert bg.mean() > 10 * cells.mean()
    assert bg.std(axis=0).mean() > 2 * cells.std(axis=0).mean()


def test_two_photon_has_neuropil_and_a_slow_background(small):
    off, gain = small.params.offset, small.params.gain
    npil = (render_frames(small, 0, SHORT, components=("neuropil",), noise=False, motion=False) - off) / gain
    outside = ~ndimage.binary_dilation(small.masks.any(axis=0), iterations=2)
    assert npil[:, outside].mean() > 0.5
    assert np.median(npil[:, outside].std(axis=0)) > 0.02 * npil[:, outside].mean()
    bg = (render_frames(small, 0, SHORT, components=("background",), noise=False, motion=False) - off) / gain
    x = bg.reshape(SHORT, -1).astype(np.float64)
    sv = np.linalg.svd(x, compute_uv=False) ** 2
    assert sv[:2].sum() / sv.sum() > 0.9999  # low rank (2) as CNMF assumes for 2p
    assert bg.mean() > 0


def test_lowsnr_preset_has_lower_snr(small):
    low = simulate("2p-lowsnr", seed=3, n_frames=SHORT)
    assert np.median(low.snr[low.active]) < 0.5 * np.median(small.snr[small.active])

    def fidelity(sim):
        tr = _mask_traces(sim.movie, sim.masks)
        act = sim.active & (sim.spikes.sum(axis=1) > 0)
        return np.median([np.corrcoef(tr[i], sim.calcium[i])[0, 1] for i in np.flatnonzero(act)])

    assert fidelity(low) < fidelity(small) - 0.1


def test_noise_is_poisson_plus_read_noise():
    sim = simulate("2p-small", seed=1, n_frames=64, motion="none", read_noise=10.0)
    expected = render_frames(sim, noise=False)
    movie = sim.movie.astype(np.float64)
    resid = movie - expected
    assert abs(resid.mean()) < 0.5
    lam = (expected - sim.params.offset) / sim.params.gain
    var = sim.params.gain**2 * lam + sim.params.read_noise**2 + 1 / 12
    z = resid / np.sqrt(var)
    assert 0.95 < z.std() < 1.05
    assert movie.min() >= 0 and movie.max() <= 65535


def test_recorded_rigid_shifts_register_the_movie():
    sim = simulate("2p-small", seed=2, n_frames=64, max_shift=4.0, motion_std=1.0)
    moved = render_frames(sim, noise=False)
    still = render_frames(sim, noise=False, motion=False)
    crop = (slice(None), slice(8, -8), slice(8, -8))
    back = np.stack([ndimage.shift(f, -d, order=1, mode="nearest") for f, d in zip(moved, sim.shifts, strict=True)])
    wrong = np.stack([ndimage.shift(f, d, order=1, mode="nearest") for f, d in zip(moved, sim.shifts, strict=True)])
    big = np.abs(sim.shifts).max(axis=1) > 0.5
    assert big.sum() >= 5
    err_raw = ((moved - still)[crop] ** 2).mean(axis=(1, 2))[big].mean()
    err_back = ((back - still)[crop] ** 2).mean(axis=(1, 2))[big].mean()
    err_wrong = ((wrong - still)[crop] ** 2).mean(axis=(1, 2))[big].mean()
    assert err_back < 0.2 * err_raw < err_wrong
    assert np.abs(np.median(sim.shifts, axis=0)).max() < 0.1
    assert np.abs(sim.shifts).max() <= 4.0


def test_nonrigid_patch_shifts_beat_the_rigid_shift():
    sim = simulate("2p-nonrigid", seed=0, n_frames=32)
    ps = sim.patch_shifts
    gy, gx = sim.params.nonrigid_grid
    assert ps.shape == (32, gy, gx, 2)
    # the rigid component is the frame mean: the residual field is not zero but averages out
    resid = ps - sim.shifts[:, None, None, :]
    assert np.abs(resid).max() > 0.5
    moved = render_frames(sim, noise=False)
    still = render_frames(sim, noise=False, motion=False)
    cy, cx = sim.meta["patch_centers"]
    half = 20
    err_rigid, err_patch = 0.0, 0.0
    for t in range(0, 32, 4):
        for i, y in enumerate(cy):
            for j, x in enumerate(cx):
                win = (slice(int(y) - half, int(y) + half), slice(int(x) - half, int(x) + half))
                ref = still[t][win]
                rig = ndimage.shift(moved[t], -sim.shifts[t], order=1, mode="nearest")[win]
                pat = ndimage.shift(moved[t], -ps[t, i, j], order=1, mode="nearest")[win]
                err_rigid += ((rig - ref) ** 2).mean()
                err_patch += ((pat - ref) ** 2).mean()
    assert err_patch < 0.5 * err_rigid


# ----------------------------------------------------------------------------- summaries and files


def test_summary_accumulator_matches_direct_computation(small):
    movie = small.movie
    acc = SummaryAccumulator()
    for start in range(0, SHORT, 40):
        acc.update(movie[start : start + 40])
    im = acc.images()
    x = movie.astype(np.float64)
    np.testing.assert_allclose(im["mean_image"], x.mean(axis=0), rtol=1e-5)
    np.testing.assert_array_equal(im["max_image"], x.max(axis=0))
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    down = (z[:, :-1] * z[:, 1:]).mean(axis=0)
    right = (z[:, :, :-1] * z[:, :, 1:]).mean(axis=0)
    assert abs(im["correlation_image"][10, 10] - (down[9, 10] + down[10, 10] + right[10, 9] + right[10, 10]) / 4) < 1e-4
    assert abs(im["correlation_image"][0, 0] - (down[0, 0] + right[0, 0]) / 2) < 1e-4
    # cells stand out in the correlation image
    ci = im["correlation_image"]
    active = small.masks[small.active].any(axis=0)
    assert ci[active].mean() > ci[~small.masks.any(axis=0)].mean()


def test_write_simulation_round_trip(tmp_path, small):
    out = tmp_path / "sim"
    write_simulation(small, str(out))
    assert sorted(p.name for p in out.iterdir()) == ["ground_truth.zarr", "meta.json", "movie.tif"]
    with tifffile.TiffFile(out / "movie.tif") as tif:
        movie = tif.asarray()
        assert tif.is_imagej and tif.imagej_metadata["fps"] == small.params.fps
    assert movie.dtype == np.uint16
    np.testing.assert_array_equal(movie, small.movie)
    ds = open_result(str(out / "ground_truth.zarr"))
    for name in RESULT_VARIABLES:
        assert name in ds
    np.testing.assert_array_equal(ds.masks.values, small.masks)
    np.testing.assert_array_equal(ds.footprints.values, small.footprints)
    np.testing.assert_allclose(ds.dff.values, small.calcium)
    np.testing.assert_allclose(ds.traces.values, small.baseline[:, None] * small.calcium, rtol=1e-6)
    np.testing.assert_array_equal(ds.spikes.values, small.spikes)
    np.testing.assert_array_equal(ds.shifts.values, small.shifts)
    assert ds.accepted.values.all() and np.all(ds.score.values == 1)
    np.testing.assert_array_equal(ds.active.values, small.active)
    np.testing.assert_allclose(ds.mean_image.values, small.movie.mean(axis=0), rtol=1e-5)
    assert ds.attrs["source"] == "simulate:2p-small:3"
    assert ds.attrs["source_checksum"] == checksum(str(out / "movie.tif"))
    assert ds.attrs["fps"] == small.params.fps and ds.attrs["modality"] == "2p"
    assert json.loads(ds.attrs["params"])["preset"] == "2p-small"
    meta = json.loads((out / "meta.json").read_text())
    for key in ("fps", "modality", "neuron_radius", "preset", "seed", "shape", "n_units", "params"):
        assert key in meta
    assert meta["neuron_radius"] == 5.0 and meta["n_units"] == small.n_units and meta["seed"] == 3


def test_write_simulation_refuses_to_overwrite(tmp_path, small):
    sim = simulate("2p-small", seed=3, n_frames=8)
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ResultExistsError, match="overwrite"):
        write_simulation(sim, str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]  # no partial output left behind
    write_simulation(sim, str(out), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["ground_truth.zarr", "meta.json", "movie.tif"]
    empty = tmp_path / "empty"
    empty.mkdir()
    write_simulation(sim, str(empty))  # an existing empty directory is fine
    assert (empty / "movie.tif").exists()


def test_write_simulation_to_an_fsspec_url():
    sim = simulate("1p-small", seed=0, n_frames=16)
    url = "memory://somaflow-test-sim/run1"
    fs = fsspec.filesystem("memory")
    try:
        write_simulation(sim, url)
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("/somaflow-test-sim/run1", detail=False))
        assert names == ["ground_truth.zarr", "meta.json", "movie.tif"]
        with fs.open("/somaflow-test-sim/run1/movie.tif", "rb") as fh:
            np.testing.assert_array_equal(tifffile.imread(fh), sim.movie)
        ds = open_result(url + "/ground_truth.zarr")
        assert ds.attrs["modality"] == "1p" and ds.sizes["unit"] == sim.n_units
        meta = json.loads(fs.cat("/somaflow-test-sim/run1/meta.json"))
        assert meta["modality"] == "1p" and meta["preset"] == "1p-small"
    finally:
        if fs.exists("/somaflow-test-sim"):
            fs.rm("/somaflow-test-sim", recursive=True)


def test_bigtiff_path_keeps_fps(tmp_path, monkeypatch):
    monkeypatch.setattr(sim_write, "BIGTIFF_BYTES", 0)
    sim = simulate("2p-nonrigid", seed=1, n_frames=12)
    write_simulation(sim, str(tmp_path / "big"), frames_per_chunk=5)
    with tifffile.TiffFile(tmp_path / "big" / "movie.tif") as tif:
        assert tif.is_bigtiff
        np.testing.assert_array_equal(tif.asarray(), sim.movie)
        assert tif.shaped_metadata[0]["fps"] == sim.params.fps
    ds = open_result(str(tmp_path / "big" / "ground_truth.zarr"))
    assert ds.patch_shifts.shape == (12, 3, 3, 2)
    np.testing.assert_allclose(ds.patch_shifts.values, sim.patch_shifts)


def _streaming_peak(n_frames: int) -> tuple[int, int]:
    sim = simulate("2p-small", seed=0, shape=(64, 64), n_frames=n_frames, n_cells=8)
    tracemalloc.start()
    n = sum(chunk.shape[0] for chunk in iter_movie_chunks(sim, frames_per_chunk=BLOCK))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == n_frames
    return peak, sim.params.movie_nbytes


def test_streaming_memory_is_bounded():
    short_peak, _ = _streaming_peak(2 * BLOCK)
    long_peak, long_bytes = _streaming_peak(64 * BLOCK)
    assert long_peak < 1.25 * short_peak  # memory does not grow with the movie's length
    assert long_peak < long_bytes / 2


@pytest.mark.slow
def test_large_preset_streams(tmp_path):
    sim = simulate("2p-large", seed=0)
    first = next(iter_movie_chunks(sim, frames_per_chunk=BLOCK))
    assert first.shape == (BLOCK, 512, 512) and first.dtype == np.uint16
    assert sim.masks.shape == (400, 512, 512)


def test_real_data_scale_is_comparable():
    """The 2p presets' raw statistics sit in the range of a real Neurofinder movie."""
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "neurofinder_left" / "movie.tif"
    if not data.exists():
        pytest.skip("shared/data is not available")
    real = tifffile.imread(data, key=range(100)).astype(np.float64)
    sim = simulate("2p-small", seed=0, n_frames=100).movie.astype(np.float64)
    # temporal noise relative to the mean brightness: photon-limited in both
    ratio_real = np.median(real.std(axis=0)) / np.median(real.mean(axis=0))
    ratio_sim = np.median(sim.std(axis=0)) / np.median(sim.mean(axis=0) - 200)
    assert 0.2 < ratio_sim / ratio_real < 5
