"""somaflow.nn inputs, targets, augmentation, features, OOD check; somaflow.training example cache."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pydantic
import pytest
import xarray as xr
import zarr

from somaflow.errors import IncompleteResultError, InputError, ParameterError, ResultExistsError
from somaflow.evaluate import match_iou
from somaflow.nn.augment import augment, random_crops
from somaflow.nn.features import (
    cnet_input,
    cnet_inputs,
    lstm_windows,
    robust_zscore,
    stack_windows,
    trace_vector,
)
from somaflow.nn.images import SUMMARY_CHANNELS, mean_channel, summary_channels
from somaflow.nn.inputs import (
    DetectorInputParams,
    batch_plan,
    detector_batch,
    detector_batches,
    detector_movie,
    pixel_statistics,
)
from somaflow.nn.ood import (
    cell_snr,
    detection_rate,
    input_statistics,
    out_of_distribution,
    summarize_statistics,
)
from somaflow.nn.targets import boundary_weights, centroid_target, union_target
from somaflow.training.candidate_sets import _best_iou, label_candidates, simulated_candidate_set
from somaflow.training.detector_sets import simulated_detector_set
from somaflow.training.labelled import neurofinder_set, read_examples, result_labels, write_examples

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY = {"shape": (64, 64), "n_cells": 9}


def _noise_movie(sigma: float, n: int = 240, shape: tuple[int, int] = (64, 64), seed: int = 0,
                 base: float = 100.0) -> xr.DataArray:
    rng = np.random.default_rng(seed)
    arr = (base + sigma * rng.standard_normal((n, *shape))).astype(np.float32)
    return xr.DataArray(arr, dims=("frame", "y", "x"), attrs={"fps": 20.0, "modality": "2p"})


def _disk(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_core_import_does_not_load_torch():
    code = "import sys, somaflow.nn.inputs, somaflow.nn.images, somaflow.nn.targets, somaflow.nn.augment, somaflow.nn.features, somaflow.nn.ood; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_params_for_movie_and_errors():
    p2 = DetectorInputParams.for_movie(30.0, "2p", 5.0)
    assert (p2.factor, p2.background, p2.highpass_sigma, p2.batch_frames) == (5, "highpass", 20.0, 120)
    p1 = DetectorInputParams.for_movie(20.0, "1p", 6.0)
    assert (p1.factor, p1.background, p1.opening_radius, p1.opening_downsample) == (2, "opening", 9.0, 2)
    assert DetectorInputParams(fps=30, bin_fps=None).factor == 1
    with pytest.raises(ParameterError):
        DetectorInputParams.for_movie(30.0, "3p", 5.0)
    with pytest.raises(ParameterError):
        DetectorInputParams.for_movie(30.0, "2p", 0)
    with pytest.raises(pydantic.ValidationError):
        p2.batch_frames = 3  # frozen


def test_pixel_statistics_any_backing_and_subsample():
    movie = _noise_movie(7.0, n=400, seed=1)
    ref = pixel_statistics(movie)
    lazy = pixel_statistics(movie.copy(data=da.from_array(movie.values, chunks=(37, 64, 64))))
    np.testing.assert_allclose(lazy["baseline"], ref["baseline"], rtol=1e-6)
    np.testing.assert_allclose(lazy["noise"], ref["noise"], rtol=1e-6)
    assert ref["baseline"].dtype == np.float32 and ref["noise"].shape == (64, 64)
    assert float(ref["baseline"].median()) == pytest.approx(100.0, abs=0.3)
    assert float(ref["noise"].median()) == pytest.approx(7.0, rel=0.03)
    sub = pixel_statistics(movie, max_frames=100, segment_frames=50)
    assert sub.attrs["frames_used"] == 100
    assert float(sub["noise"].median()) == pytest.approx(7.0, rel=0.05)
    with pytest.raises(InputError):
        pixel_statistics(movie.transpose("y", "x", "frame"))


@pytest.mark.parametrize("background", ["highpass", "baseline", "opening", "none"])
def test_whitening_gives_unit_noise(background):
    movie = _noise_movie(7.0, n=240)
    stats = pixel_statistics(movie)
    p = DetectorInputParams(fps=20.0, bin_fps=10.0, background=background, highpass_sigma=8.0,
                              opening_radius=6.0)
    out = detector_batch(movie.values, stats, p)
    assert out.shape == (120, 64, 64) and out.dtype == np.float32
    assert out.std() == pytest.approx(1.0, abs=0.05)
    if background in ("highpass", "baseline"):
        assert abs(out.mean()) < 0.05


def test_whitening_scales_and_clips_activity():
    movie = _noise_movie(5.0, n=40)
    arr = movie.values.copy()
    arr[10:12, 30:34, 30:34] += 1000.0  # a huge transient in one bin
    stats = pixel_statistics(movie)
    p = DetectorInputParams(fps=20.0, bin_fps=10.0, background="baseline", highpass_sigma=8.0, clip=20.0)
    out = detector_batch(arr, stats, p)
    assert out[5, 31, 31] == pytest.approx(20.0)  # clipped
    assert np.abs(out).max() <= 20.0


@pytest.mark.parametrize("n_frames", [250, 300, 50])
def test_batches_cover_all_frames_and_match_whole_movie(n_frames):
    movie = _noise_movie(5.0, n=n_frames, shape=(32, 40), seed=2)
    movie.values[::7, 10:14, 10:14] += 50.0
    p = DetectorInputParams(fps=20.0, bin_fps=10.0, batch_frames=40, highpass_sigma=8.0)
    stats = pixel_statistics(movie)
    plan = batch_plan(n_frames, p)
    covered = np.zeros(n_frames, int)
    for a, b in plan:
        covered[a:b] += 1
    assert (covered == 1).all()
    got = list(detector_batches(movie, stats, p, read_frames=30))
    assert [s for s, _ in got] == [a for a, _ in plan]
    for (a, b), (_, batch) in zip(plan, got, strict=True):
        assert batch.shape[0] % 4 == 0 and batch.shape[0] >= (b - a) / 2
        assert batch.shape[1:] == (32, 40)
    whole = detector_batch(movie.values, stats, p)  # the whole movie as one batch
    np.testing.assert_allclose(detector_movie(movie, stats, p), whole, atol=1e-5)
    if n_frames == 250:  # remainder of 10 frames (< half a batch) merged into the last batch
        assert plan[-1] == (160, 250)
    if n_frames == 300:  # remainder of 60 frames is its own batch, padded from 30 to 32 frames
        assert plan[-1] == (240, 300) and got[-1][1].shape[0] == 32
        assert not got[-1][1][30:].any()


def test_summary_channels_remove_offsets_and_gains():
    rng = np.random.default_rng(3)
    names = ("mean_image", "max_image", "correlation_image", "pnr_image", "std_image")
    images = xr.Dataset({n: (("y", "x"), rng.gamma(2.0, size=(40, 48)).astype(np.float32)) for n in names})
    scaled = images.copy()
    for n, (a, b) in zip(SUMMARY_CHANNELS, [(30.0, 500.0), (0.1, -3.0), (2.0, 0.0), (7.0, 1.0)], strict=True):
        scaled[n] = a * images[n] + b
    c = summary_channels(images)
    assert c.shape == (4, 40, 48) and c.dtype == np.float32
    np.testing.assert_allclose(summary_channels(scaled), c, atol=1e-4)
    assert np.allclose(np.median(c, axis=(1, 2)), 0, atol=1e-6)
    np.testing.assert_array_equal(mean_channel(images), c[:1])
    with pytest.raises(InputError):
        summary_channels(images.drop_vars("pnr_image"))


def test_targets():
    shape = (40, 40)
    a, b = _disk(shape, 10, 10, 5), _disk(shape, 10, 18, 5)  # overlapping pair
    c = _disk(shape, 30, 30, 4)
    masks = np.stack([a, b, c])
    u = union_target(masks)
    assert u.dtype == np.uint8 and u.sum() == (a | b | c).sum()
    sep = union_target(masks, exclude_overlaps=True)
    assert sep.sum() == u.sum() - (a & b).sum() and not sep[a & b].any()
    cen = centroid_target(masks, radius=4)
    assert cen.dtype == np.uint8 and cen[30, 30] == 1 and cen[30, 35] == 0
    assert (cen & _disk(shape, 30, 30, 4)).sum() == _disk(shape, 30, 30, 4).sum() == 49
    edge = centroid_target(_disk(shape, 0, 0, 2)[None], radius=4)
    assert edge[0, 0] == 1 and edge.sum() < 49  # clipped at the border
    w = boundary_weights(np.stack([_disk(shape, 10, 10, 4), _disk(shape, 10, 20, 4)]), w0=10, sigma=3)
    assert w.dtype == np.float32 and (w >= 1).all()
    assert w[10, 15] > 5  # the gap between the two cells
    assert w[35, 35] == 1 and w[10, 10] == 1  # far away, and inside a cell


def test_random_crops_positive_fraction_and_padding():
    rng = np.random.default_rng(4)
    y = np.zeros((50, 60), np.uint8)
    y[40:43, 5:8] = 1
    x = np.stack([np.arange(50 * 60, dtype=np.float32).reshape(50, 60)] * 3)
    xs, ys = random_crops(x, y, 16, 20, rng, positive_fraction=1.0)
    assert xs.shape == (20, 3, 16, 16) and ys.shape == (20, 16, 16)
    assert all(yc.any() for yc in ys)
    for xc, yc in zip(xs, ys, strict=True):  # crops of x and y come from the same place
        y0, x0 = divmod(int(xc[0, 0, 0]), 60)
        np.testing.assert_array_equal(yc, y[y0:y0 + 16, x0:x0 + 16])
    small_x, small_y = random_crops(x[:, :10, :12], y[:10, :12], 16, 2, rng)
    assert small_x.shape == (2, 3, 16, 16) and (small_x[:, :, 10:] == 0).all()


def test_augment_keeps_input_and_target_aligned():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, (24, 24)).astype(np.uint8)
    x = np.stack([y * (t + 1) + 0.5 * t for t in range(3)]).astype(np.float32)
    seen = set()
    for _ in range(64):
        xa, ya = augment(x, y, rng)
        for t in range(3):
            np.testing.assert_array_equal(xa[t], ya * (t + 1) + 0.5 * t)
        seen.add(ya.tobytes())
        assert xa.flags.c_contiguous
    assert len(seen) == 8  # all rotations and reflections occur


def test_cnet_input_centring_and_border_padding():
    shape = (120, 140)
    mask = _disk(shape, 60, 70, 5)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    image = np.exp(-((yy - 60) ** 2 + (xx - 70) ** 2) / 20.0) * 50 + 10 + np.random.default_rng(5).random(shape)
    trace = np.sin(np.arange(300) / 5.0) + np.random.default_rng(6).normal(0, 0.1, 300)
    out = cnet_input(image, mask, trace)
    assert out.shape == (2, 92, 92) and out.dtype == np.float32
    assert np.unravel_index(np.argmax(out[0]), (92, 92)) == (46, 46)
    assert out[0].mean() == pytest.approx(0, abs=1e-5) and out[0].std() == pytest.approx(1, abs=1e-4)
    flat = out[1].ravel()  # a short trace is repeated end to end
    np.testing.assert_allclose(flat[300:600], flat[:300])
    np.testing.assert_allclose(flat[:300], robust_zscore(trace), rtol=1e-5)
    # near the top-left corner: the window leaves the frame and is zero-padded there
    corner = cnet_input(image, _disk(shape, 3, 4, 2), trace)
    assert (corner[0, :43] == 0).all() and (corner[0, :, :42] == 0).all()
    inside = corner[0, 43:, 42:]
    assert inside.shape == (49, 50) and inside.mean() == pytest.approx(0, abs=1e-5) and inside.std() > 0
    # a long trace contributes its central 8464 samples
    long = np.arange(10000, dtype=np.float64)
    np.testing.assert_allclose(cnet_input(image, mask, long)[1].ravel(),
                               robust_zscore(long)[768:768 + 8464], rtol=1e-6)
    with pytest.raises(InputError):
        cnet_input(image, np.zeros(shape, bool), trace)
    many = cnet_inputs(np.stack([image, image]), np.stack([mask, mask]), np.stack([trace, trace]))
    assert many.shape == (2, 2, 92, 92)


def test_trace_vector_and_lstm_windows():
    rng = np.random.default_rng(7)
    trace = rng.normal(0, 1, 1000)
    trace[500:520] += 15
    v = trace_vector(trace, 512)
    assert v.shape == (512,) and v.dtype == np.float32
    assert abs(np.median(v)) < 0.1 and v.argmax() in range(250, 270)
    assert trace_vector(trace[:100], 512).shape == (512,)
    assert trace_vector(np.stack([trace, trace]), 64).shape == (2, 64)
    w = lstm_windows(trace)
    assert w.shape == (10, 100) and w.dtype == np.float32
    w2 = lstm_windows(trace[:250])  # 2 windows from the start + one ending at the last sample
    assert w2.shape == (3, 100)
    np.testing.assert_allclose(w2[-1], robust_zscore(trace[:250])[150:], rtol=1e-5)
    assert lstm_windows(trace, n_windows=4).shape == (4, 100)
    assert lstm_windows(trace, fps=20.0).shape == (5, 100)  # resampled to 10 Hz: 500 samples
    assert lstm_windows(trace[:30]).shape == (1, 100)
    stacked = stack_windows([w2, w])
    assert stacked.shape == (2, 10, 100)
    np.testing.assert_array_equal(stacked[0, 3], w2[0])  # cyclic repetition keeps the max


def test_label_candidates_on_hand_made_masks():
    shape = (60, 60)
    truth = np.stack([_disk(shape, 10, 10, 5), _disk(shape, 30, 30, 6), _disk(shape, 48, 12, 5)])
    cand = np.stack([
        truth[0],  # exact
        _disk(shape, 10, 11, 5),  # a second candidate on cell 0 (IoU ≈ 0.8)
        _disk(shape, 30, 30, 2),  # inside cell 1, IoU < 0.5
        _disk(shape, 48, 13, 5),  # cell 2, shifted by a pixel
        _disk(shape, 50, 50, 4),  # nothing there
    ])
    np.testing.assert_array_equal(label_candidates(cand, truth), [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(label_candidates(cand, truth, one_to_one=False), [1, 1, 0, 1, 0])
    np.testing.assert_array_equal(label_candidates(cand, truth, iou=0.1), [1, 0, 1, 1, 0])
    # the evaluator's convention: the small disk inside cell 1 is a match (exact containment)
    np.testing.assert_array_equal(label_candidates(cand, truth, containment=1.0), [1, 0, 1, 1, 0])
    np.testing.assert_array_equal(label_candidates(cand, truth, containment=1.0, one_to_one=False), [1, 1, 1, 1, 0])
    ev = match_iou(cand, truth)
    np.testing.assert_array_equal(np.flatnonzero(label_candidates(cand, truth, containment=1.0)), np.sort(ev.pred))
    half = _disk(shape, 30, 36, 3)  # straddles cell 1's edge: not contained, IoU < 0.5
    assert label_candidates(np.concatenate([cand, half[None]]), truth, containment=1.0)[-1] == 0
    assert label_candidates(np.concatenate([cand, half[None]]), truth, containment=0.3, one_to_one=False)[-1] == 1
    assert label_candidates(cand, truth[:0]).sum() == 0
    with pytest.raises(ParameterError):
        label_candidates(cand, truth, iou=0)
    with pytest.raises(ParameterError):
        label_candidates(cand, truth, containment=0)
    # each candidate's best IoU with any true cell, by the definition
    best = _best_iou(cand, truth)
    inter = (cand[:, None] & truth[None]).sum((2, 3))
    union = (cand[:, None] | truth[None]).sum((2, 3))
    np.testing.assert_allclose(best, (inter / union).max(1), rtol=1e-6)
    assert best.dtype == np.float32 and best[0] == 1 and best[4] == 0
    assert _best_iou(cand, truth[:0]).tolist() == [0] * 5 and _best_iou(cand[:0], truth).shape == (0,)


def test_out_of_distribution_flags_noise_and_radius():
    training = [input_statistics(_noise_movie(s, n=100, seed=i), 5.0, snr=np.array([6.0, 8.0]))
                for i, s in enumerate((5.0, 6.0))]
    summary = summarize_statistics(training)
    assert summary["n_sessions"] == 2 and summary["modality"] == ["2p"]
    assert summary["noise_level"]["min"] == pytest.approx(0.05, rel=0.05)
    same = input_statistics(_noise_movie(5.5, n=100, seed=9), 5.0, snr=np.array([7.0]))
    assert out_of_distribution(same, summary) == []
    assert out_of_distribution(same, training) == []  # per-session dicts work too
    noisy = input_statistics(_noise_movie(25.0, n=100, seed=9), 5.0, snr=np.array([7.0]))
    warn = out_of_distribution(noisy, summary)
    assert len(warn) == 1 and "noise level" in warn[0] and "above" in warn[0]
    big = dict(same, neuron_radius=15.0)
    warn = out_of_distribution(big, summary)
    assert len(warn) == 1 and "neuron radius" in warn[0]
    assert any("modality" in w for w in out_of_distribution(dict(same, modality="1p"), summary))


def test_cell_snr_sees_transients():
    movie = _noise_movie(2.0, n=200, shape=(32, 32), seed=8)
    cell = _disk((32, 32), 10, 10, 3)
    movie.values[50:55][:, cell] += 20.0
    snr = cell_snr(movie, np.stack([cell, _disk((32, 32), 25, 25, 3)]))
    assert snr[0] > 20 and snr[1] < 6


def test_example_cache_round_trip_and_incomplete(tmp_path):
    rng = np.random.default_rng(9)
    arrays = {"X": rng.random((5, 3, 8, 8)).astype(np.float32), "Y": rng.integers(0, 2, (5, 8, 8)).astype(np.uint8),
              "labels": np.arange(5)}
    meta = {"kind": "unet2d", "presets": ["2p-small"], "seeds": [1, 2]}
    url = str(tmp_path / "cache.zarr")
    write_examples(url, arrays, meta)
    got, got_meta = read_examples(url)
    assert got_meta == meta and set(got) == set(arrays)
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    with pytest.raises(ResultExistsError):
        write_examples(url, arrays, meta)
    write_examples("memory://nn-data-test/cache.zarr", arrays, meta, overwrite=True)
    np.testing.assert_array_equal(read_examples("memory://nn-data-test/cache.zarr")[0]["X"], arrays["X"])
    del zarr.open_group(url, mode="r+").attrs["complete"]  # as if the write had stopped before the end
    with pytest.raises(IncompleteResultError):
        read_examples(url)
    with pytest.raises(ParameterError):
        write_examples(str(tmp_path / "bad.zarr"), arrays, {"x": object()})


@pytest.mark.parametrize("kind", ["stneuronet", "unet2d", "meanimage2d"])
def test_simulated_detector_set_shapes(kind):
    x, y, stats = simulated_detector_set(kind, ["2p-small"], [1], crop=32, n_crops=3,
                                           rng=np.random.default_rng(0), n_frames=120,
                                           batch_frames=24, overrides=TINY)
    channels = {"stneuronet": 24, "unet2d": 4, "meanimage2d": 1}[kind]
    assert x.shape == (3, channels, 32, 32) and x.dtype == np.float32
    assert y.shape == (3, 32, 32) and y.dtype == np.uint8 and set(np.unique(y)) <= {0, 1}
    assert np.isfinite(x).all() and y.any()
    (s,) = stats
    assert s["modality"] == "2p" and s["neuron_radius"] == 5.0 and s["fps"] == 10.0
    assert s["noise_level"] > 0 and s["median_snr"] > 0 and s["preset"] == "2p-small"
    if kind == "meanimage2d":  # the (2+1)D family defaults to Apthorpe's centroid disks
        assert y.sum() < 3 * 32 * 32 * 0.5


def test_simulated_candidate_set_local_maxima():
    cs = simulated_candidate_set(["2p-small"], [2], method="local-maxima", n_frames=120, overrides=TINY)
    n = len(cs.labels)
    assert n > 3
    images, traces, windows, labels = cs
    assert images.shape == (n, 2, 92, 92) and traces.shape == (n, 512) and len(windows) == n
    assert windows[0].shape == (2, 100)  # 120 frames at 10 Hz
    assert labels.dtype == np.int64 and set(np.unique(labels)) <= {0, 1} and labels.sum() >= 1
    assert (cs.active <= cs.labels).all() and cs.sessions[0]["n_candidates"] == n
    assert cs.best_iou.shape == (n,) and (cs.best_iou[labels == 1] >= 0.5).all()
    # containment only adds valid pairs, and both assignments maximise the number of matches
    assert cs.evaluator_labels.shape == (n,) and cs.evaluator_labels.sum() >= labels.sum()


@pytest.mark.slow
def test_simulated_candidate_set_cnmf():
    cs = simulated_candidate_set(["2p-small"], [1])
    assert len(cs.labels) > 20 and 0.3 < cs.labels.mean() < 0.95


def test_result_labels_reads_masks_and_verdict(tmp_path):
    from somaflow.simulate import simulate, write_simulation

    sim = simulate("2p-small", 3, motion="none", n_frames=20, **TINY)
    write_simulation(sim, str(tmp_path / "sim"))
    masks, accepted = result_labels(str(tmp_path / "sim" / "ground_truth.zarr"))
    np.testing.assert_array_equal(masks, sim.masks)
    assert accepted.dtype == bool and accepted.all()


@pytest.mark.skipif(not (DATA / "neurofinder_left" / "regions.json").exists(), reason="no shared data")
def test_neurofinder_set():
    s = neurofinder_set(DATA / "neurofinder_left", frames=slice(0, 64))
    assert s.movie.shape == (64, 512, 256)
    assert s.channels.shape == (4, 512, 256) and s.channels.dtype == np.float32
    assert s.masks.shape[1:] == (512, 256) and len(s.masks) > 100
    assert s.target.dtype == np.uint8 and 0.02 < s.target.mean() < 0.3


def test_separated_target_keeps_touching_cells_apart():
    from scipy import ndimage

    masks = np.zeros((2, 20, 30), bool)
    masks[0, 5:15, 3:15] = True
    masks[1, 5:15, 15:27] = True  # touches cell 0 along a column
    joined = union_target(masks)
    assert ndimage.label(joined)[1] == 1
    apart = union_target(masks, gap=1)
    assert ndimage.label(apart)[1] == 2
    assert apart.sum() == joined.sum() - 2 * 10  # one column on each side of the contact


def test_image_detectors_judge_the_binned_frame_rate():
    """Summary images come from the movie binned to ~6 Hz (2p): a 30 Hz movie looks like the 10 Hz
    training sessions to an image model, a 2 Hz one does not; raw rates are judged otherwise."""
    import functools

    assert detection_rate(10.0, "2p") == pytest.approx(5.0)
    assert detection_rate(30.0, "2p") == pytest.approx(6.0)
    assert detection_rate(30.0, "1p") == pytest.approx(10.0)
    assert detection_rate(3.0, "2p") == pytest.approx(3.0)
    summary = {"fps": {"min": 10.0, "max": 10.0, "median": 10.0, "n": 4}, "modality": ["2p"]}
    rate = functools.partial(detection_rate, modality="2p")
    assert out_of_distribution({"fps": 30.0}, summary, rate=rate) == []
    assert out_of_distribution({"fps": 60.0}, summary, rate=rate) == []
    warn = out_of_distribution({"fps": 2.0}, summary, rate=rate)
    assert len(warn) == 1 and "after binning" in warn[0] and "below" in warn[0]
    assert "frame rate" in out_of_distribution({"fps": 30.0}, summary)[0]  # the movie models: raw rate
