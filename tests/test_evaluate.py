"""Tests of somaflow.evaluate: loaders, the three matching conventions, offsets, traces."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from somaflow.errors import InputError, ParameterError, StoreError
from somaflow.evaluate import (
    Truth,
    bin_frames,
    estimate_offset,
    evaluate,
    format_report,
    load_prediction,
    load_truth,
    match_caiman,
    match_iou,
    match_neurofinder,
    pearson_rows,
    regions_from_masks,
    shift_masks,
    spike_correlations,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


# ----------------------------------------------------------------------------- helpers


def disks(shape=(128, 128), spacing=16, radius=(4.0, 5.5), margin=8, seed=0):
    """Non-overlapping disks on a jittered grid, at least ``margin`` px from the border."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    masks = []
    for cy in range(margin + 2, shape[0] - margin - 2, spacing):
        for cx in range(margin + 2, shape[1] - margin - 2, spacing):
            r = rng.uniform(*radius)
            y0, x0 = cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2)
            masks.append((yy - y0) ** 2 + (xx - x0) ** 2 <= r**2)
    return np.stack(masks)


def rect(shape, y0, y1, x0, x1):
    m = np.zeros(shape, dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def activity(n, frames=300, seed=1):
    """Poisson spikes and AR(1) calcium, (unit, frame) float32."""
    rng = np.random.default_rng(seed)
    spikes = rng.poisson(0.05, size=(n, frames)).astype(np.float32)
    calcium = np.zeros_like(spikes)
    for t in range(frames):
        calcium[:, t] = (0.9 * calcium[:, t - 1] if t else 0) + spikes[:, t]
    return calcium, spikes


def write_result(url, masks, accepted, traces, spikes):
    """A schema-valid result zarr with the given units."""
    from somaflow.io.schema import make_result_dataset, write_result

    n, y, x = masks.shape
    frames = traces.shape[1]
    img = np.zeros((y, x), np.float32)
    variables = {
        "masks": masks,
        "footprints": masks.astype(np.float32),
        "traces": traces,
        "dff": traces,
        "spikes": spikes,
        "accepted": np.asarray(accepted, bool),
        "score": np.where(accepted, 0.9, 0.1).astype(np.float32),
        "mean_image": img,
        "max_image": img,
        "correlation_image": img,
        "shifts": np.zeros((frames, 2), np.float32),
    }
    ds = make_result_dataset(variables, params={"test": True}, source="memory", source_checksum="x",
                             fps=10.0, modality="2p")
    return write_result(ds, str(url))


# ----------------------------------------------------------------------------- matching


def test_ground_truth_against_itself_scores_one_in_every_convention():
    masks = disks()
    calcium, spikes = activity(len(masks))
    truth = Truth(masks, traces=calcium, spikes=spikes)
    m = evaluate(truth, truth)
    assert m["n_true"] == m["n_pred"] == m["n_matched"] == len(masks)
    assert m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["caiman"]["f1"] == 1.0
    nf = m["neurofinder"]
    assert nf["precision"] == nf["recall"] == nf["combined"] == 1.0
    assert nf["inclusion"] == nf["exclusion"] == 1.0
    assert m["offset"] == [0, 0]
    assert m["trace_correlation"]["median"] == pytest.approx(1.0)
    assert m["trace_correlation"]["n"] == len(masks)
    assert m["spike_correlation"]["median"] == pytest.approx(1.0)
    json.dumps(m, allow_nan=False)


def test_global_offset_is_detected_and_undone():
    truth = disks(seed=2)
    pred = shift_masks(truth, 3, -2)
    assert estimate_offset(pred, truth) == (-3, 2)
    m = evaluate(Truth(pred), Truth(truth))
    assert m["offset"] == [-3, 2]
    assert m["f1"] == 1.0 and m["caiman"]["f1"] == 1.0 and m["neurofinder"]["combined"] == 1.0
    raw = evaluate(Truth(pred), Truth(truth), allow_offset=False)
    assert raw["offset"] == [0, 0]
    assert raw["f1"] < 0.5  # a 3.6 px shift of r~5 disks drops IoU below 0.5


def test_offset_is_found_despite_misses_and_false_positives():
    truth = disks(shape=(160, 160), seed=3)
    rng = np.random.default_rng(4)
    keep = rng.permutation(len(truth))[: len(truth) * 2 // 3]
    extra = shift_masks(disks(shape=(160, 160), seed=5)[:10], 8, 8)
    pred = shift_masks(np.concatenate([truth[keep], extra]), -4, 5)
    assert estimate_offset(pred, truth, max_shift=10) == (4, -5)
    m = evaluate(Truth(pred), Truth(truth))
    assert m["offset"] == [4, -5]
    assert m["n_matched"] == len(keep)


def test_offset_is_exact_when_predicted_masks_are_larger_or_smaller():
    truth = disks(shape=(160, 160), seed=11)
    sizes = [ndi.binary_dilation(m) if i % 2 else ndi.binary_erosion(m) for i, m in enumerate(truth)]
    pred = shift_masks(np.stack(sizes), 3, -2)
    m = evaluate(Truth(pred), Truth(truth))
    assert m["offset"] == [-3, 2]
    assert m["f1"] == 1.0


def test_offset_that_does_not_help_is_not_applied():
    truth = disks(seed=6)
    m = evaluate(Truth(truth), Truth(truth))
    assert m["offset"] == [0, 0] and m["offset_estimated"] == [0, 0]
    assert estimate_offset(truth[:0], truth) == (0, 0)
    # aligned but imperfect: grown masks, misses and false positives
    rng = np.random.default_rng(12)
    keep = rng.random(len(truth)) < 0.7
    grown = np.stack([ndi.binary_dilation(mk) for mk in truth[keep]])
    junk = disks(seed=13, spacing=37)
    m = evaluate(Truth(np.concatenate([grown, junk])), Truth(truth))
    assert m["offset"] == [0, 0]
    assert m["n_matched"] == keep.sum()
    # an unrelated prediction scores low whatever shift is tried
    other = disks(seed=7, spacing=23)
    assert evaluate(Truth(other), Truth(truth))["f1"] < 0.3


def test_empty_prediction_scores_zero_without_crashing():
    truth = disks()
    empty = Truth(np.zeros((0, *truth.shape[1:]), bool))
    m = evaluate(empty, Truth(truth))
    assert (m["precision"], m["recall"], m["f1"], m["n_pred"]) == (0.0, 0.0, 0.0, 0)
    assert m["caiman"]["f1"] == 0.0 and m["neurofinder"]["combined"] == 0.0
    assert m["trace_correlation"]["n"] == 0
    m = evaluate(Truth(truth), empty)
    assert (m["precision"], m["recall"], m["f1"], m["n_true"]) == (0.0, 0.0, 0.0, 0)
    m = evaluate(empty, empty)
    assert m["f1"] == 0.0
    json.dumps(m, allow_nan=False)
    assert "0 predicted units" in format_report(m)


def test_half_the_units_removed_gives_recall_half_precision_one():
    truth = disks(shape=(128, 160))
    n = len(truth) - len(truth) % 2
    truth = truth[:n]
    pred = truth[np.random.default_rng(7).permutation(n)[: n // 2]]
    m = evaluate(Truth(pred), Truth(truth))
    assert m["recall"] == 0.5 and m["precision"] == 1.0
    assert m["f1"] == pytest.approx(2 / 3, abs=1e-6)


def test_containment_counts_as_a_match():
    shape = (40, 40)
    big = rect(shape, 5, 20, 5, 20)  # 225 px
    small = rect(shape, 8, 12, 8, 12)  # 16 px, IoU 0.07
    m = match_iou(small[None], big[None])
    assert m.n_matched == 1 and m.iou[0] == pytest.approx(16 / 225)
    m = match_iou(big[None], small[None])
    assert m.n_matched == 1
    # one pixel outside: no longer contained at the default (exact) containment ...
    poke = small.copy()
    poke[4, 10] = True
    assert match_iou(poke[None], big[None]).n_matched == 0
    # ... but within a relaxed containment fraction
    assert match_iou(poke[None], big[None], containment=0.9).n_matched == 1


def test_hungarian_beats_greedy():
    # 1-D intervals as 3-px-high strips; IoUs: P1-T1 0.667, P1-T2 0.538, P2-T1 0.545, P2-T2 0.0625
    shape = (3, 30)
    t1, t2 = rect(shape, 0, 3, 5, 15), rect(shape, 0, 3, 10, 20)
    p1, p2 = rect(shape, 0, 3, 7, 17), rect(shape, 0, 3, 4, 11)
    pred, true = np.stack([p1, p2]), np.stack([t1, t2])
    # greedy by best IoU takes P1-T1 first and then P2 has nothing left
    iou = np.array([[(a & b).sum() / (a | b).sum() for b in true] for a in pred])
    assert iou.argmax() == 0 and iou[1, 1] < 0.5
    m = match_iou(pred, true)
    assert m.n_matched == 2
    assert dict(zip(m.pred.tolist(), m.true.tolist(), strict=True)) == {0: 1, 1: 0}


def test_caiman_convention_gates_on_iou_and_centroid_distance():
    shape = (40, 60)
    t = rect(shape, 10, 20, 10, 20)  # 100 px
    p = rect(shape, 10, 20, 14, 24)  # overlap 60, union 140: IoU 0.43
    assert match_iou(p[None], t[None]).n_matched == 0
    assert match_caiman(p[None], t[None]).n_matched == 1
    # IoU 0.54 but centroids 12 px apart: outside CaImAn's 10 px gate
    t_long = rect(shape, 10, 13, 5, 45)
    p_long = rect(shape, 10, 13, 17, 57)
    assert match_iou(p_long[None], t_long[None]).n_matched == 1
    assert match_caiman(p_long[None], t_long[None]).n_matched == 0


def test_neurofinder_convention_is_greedy_in_truth_order():
    shape = (30, 30)
    t0 = rect(shape, 10, 14, 10, 14)  # centre (11.5, 11.5)
    t1 = rect(shape, 10, 14, 13, 17)  # centre (11.5, 14.5)
    p = rect(shape, 10, 14, 14, 16)  # centre (11.5, 14.5): closer to t1
    m = match_neurofinder(p[None], np.stack([t0, t1]))
    assert m.n_matched == 1 and m.true.tolist() == [0]  # t0 comes first and takes it
    # inclusion = |t ∩ p| / |t|, exclusion = |t ∩ p| / |p|
    inner = rect(shape, 10, 12, 10, 14)
    m = match_neurofinder(inner[None], t0[None])
    assert m.inclusion[0] == pytest.approx(0.5) and m.exclusion[0] == pytest.approx(1.0)
    far = rect(shape, 20, 24, 20, 24)
    assert match_neurofinder(far[None], t0[None]).n_matched == 0


def test_different_fields_of_view_are_rejected():
    a = disks(shape=(64, 64))
    b = disks(shape=(64, 80))
    with pytest.raises(InputError, match="same field of view"):
        evaluate(Truth(a), Truth(b))
    with pytest.raises(InputError, match="same field of view"):
        match_iou(a, b)


def test_invalid_parameters_are_rejected():
    a = disks(shape=(64, 64))
    with pytest.raises(ParameterError):
        evaluate(Truth(a), Truth(a), iou_threshold=0)
    with pytest.raises(ParameterError):
        evaluate(Truth(a), Truth(a), max_shift=-1)


def test_matching_500_by_500_masks_of_512x512_is_fast():
    shape = (512, 512)
    rng = np.random.default_rng(8)
    centres = rng.uniform(10, 502, size=(500, 2))
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    truth = np.zeros((500, *shape), bool)
    for i, (cy, cx) in enumerate(centres):
        y0, x0 = int(cy) - 7, int(cx) - 7
        sub = (yy[y0 : y0 + 15] - cy) ** 2 + (xx[:, x0 : x0 + 15] - cx) ** 2 <= 36
        truth[i, y0 : y0 + 15, x0 : x0 + 15] = sub
    pred = shift_masks(truth, 1, 0)[rng.permutation(500)]
    start = time.perf_counter()
    m = match_iou(pred, truth)
    elapsed = time.perf_counter() - start
    print(f"match_iou 500 x 500 masks of 512x512: {elapsed:.3f} s")
    assert m.n_matched >= 490
    assert elapsed < 5.0  # ~0.1 s measured; loose for slow CI machines


# ----------------------------------------------------------------------------- activity


def test_trace_correlation_handles_constant_traces_and_binning():
    calcium, spikes = activity(4, frames=400)
    r = pearson_rows(calcium, calcium)
    assert np.allclose(r, 1.0)
    flat = calcium.copy()
    flat[1] = 3.0
    r = pearson_rows(flat, calcium)
    assert np.isnan(r[1]) and np.allclose(r[[0, 2, 3]], 1.0)
    masks = disks()[:4]
    truth = Truth(masks, traces=calcium, spikes=spikes)
    binned = Truth(masks, traces=bin_frames(calcium, 4), spikes=bin_frames(spikes, 4))
    m = evaluate(binned, truth)
    assert m["temporal_binning"] == 4
    assert m["trace_correlation"]["median"] == pytest.approx(1.0)
    assert m["spike_correlation"]["median"] == pytest.approx(1.0)
    m = evaluate(Truth(masks, traces=flat, spikes=spikes), truth)
    assert m["trace_correlation"]["n"] == 3
    assert any("constant" in n for n in m["notes"])
    odd = Truth(masks, traces=calcium[:, :77], spikes=spikes[:, :77])
    m = evaluate(odd, truth)
    assert m["trace_correlation"]["n"] == 0 and m["trace_correlation"]["median"] is None
    assert any("not an integer multiple" in n for n in m["notes"])
    json.dumps(m, allow_nan=False)


def test_spike_correlation_tolerates_one_frame_jitter_but_not_random_spikes():
    _, spikes = activity(6, frames=600, seed=9)
    late = np.roll(spikes, 1, axis=1)
    assert np.all(spike_correlations(late, spikes) > 0.8)
    noise = np.random.default_rng(10).permutation(spikes.T).T
    assert np.median(spike_correlations(noise, spikes)) < 0.3


# ----------------------------------------------------------------------------- loading


def test_regions_json_round_trip(tmp_path):
    masks = disks(shape=(96, 80))
    path = tmp_path / "regions.json"
    path.write_text(json.dumps(regions_from_masks(masks, ids=np.arange(len(masks)) + 100)))
    truth = load_truth(str(path), shape=(96, 80))
    assert truth.shape == (96, 80) and np.array_equal(truth.masks, masks)
    assert truth.ids.tolist() == list(range(100, 100 + len(masks)))
    guessed = load_truth(str(path))
    assert guessed.shape[0] <= 96 and guessed.shape[1] <= 80
    assert any("inferred" in n for n in guessed.notes)
    with pytest.raises(InputError, match="outside"):
        load_truth(str(path), shape=(40, 40))
    # evaluating a result against a regions.json rasterizes it on the prediction's grid
    m = evaluate(Truth(masks), str(path), include_matches=True)
    assert m["f1"] == 1.0 and m["matches"][0][1] == 100
    # a folder holding regions.json resolves to it
    assert load_truth(str(tmp_path), shape=(96, 80)).n == len(masks)


def test_npz_loading(tmp_path):
    masks = disks()
    calcium, spikes = activity(len(masks))
    path = tmp_path / "gt.npz"
    np.savez(path, masks=masks, traces=calcium, spikes=spikes)
    truth = load_truth(str(path))
    assert np.array_equal(truth.masks, masks) and np.array_equal(truth.traces, calcium)
    assert truth.spikes.shape == spikes.shape
    import fsspec

    with fsspec.open("memory://evaluate-test/gt.npz", "wb") as fh:
        np.savez(fh, masks=masks)
    assert load_truth("memory://evaluate-test/gt.npz").n == len(masks)
    np.savez(tmp_path / "bad.npz", footprints=masks)
    with pytest.raises(InputError, match="no 'masks'"):
        load_truth(str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "short.npz", masks=masks, traces=calcium[:3])
    with pytest.raises(InputError, match="one row per mask"):
        load_truth(str(tmp_path / "short.npz"))


def test_match_trace_correlations_follow_the_matches():
    """Each match's trace correlation sits at its match's position, whatever the unit order."""
    masks = disks()
    n = len(masks)
    calcium, _ = activity(n)
    rng = np.random.default_rng(5)
    order = rng.permutation(n)  # the prediction lists the cells in another order
    pred_traces = calcium[order].copy()
    noisy = order[:3]  # three cells whose predicted traces are mostly noise
    for k in range(3):
        pred_traces[k] = calcium[noisy[k]] + rng.normal(0, 3 * calcium[noisy[k]].std() + 1e-3, calcium.shape[1])
    m = evaluate(Truth(masks[order], traces=pred_traces), Truth(masks, traces=calcium), include_matches=True)
    r = dict(zip((p for p, _, _ in m["matches"]), m["match_trace_correlations"], strict=True))
    assert len(r) == n
    assert all(r[k] < 0.6 for k in range(3)) and all(r[k] == pytest.approx(1.0) for k in range(3, n))
    assert np.median(list(r.values())) == pytest.approx(m["trace_correlation"]["median"], abs=1e-6)
    # no traces to compare: one None per match
    m = evaluate(Truth(masks), Truth(masks, traces=calcium), include_matches=True)
    assert m["match_trace_correlations"] == [None] * n


def test_result_zarr_counts_accepted_units_only(tmp_path):
    masks = disks()
    calcium, spikes = activity(len(masks))
    n = len(masks)
    truth_url = write_result(tmp_path / "sim" / "ground_truth.zarr", masks, np.ones(n, bool), calcium, spikes)
    # prediction: every unit, plus junk units that are rejected
    junk = shift_masks(masks[:5], 5, 5)
    accepted = np.r_[np.ones(n, bool), np.zeros(5, bool)]
    pred_url = write_result(tmp_path / "result.zarr", np.concatenate([masks, junk]), accepted,
                            np.concatenate([calcium, calcium[:5]]), np.concatenate([spikes, spikes[:5]]))
    assert load_truth(truth_url).n == n
    pred = load_prediction(pred_url)
    assert pred.n == n and pred.fps == 10.0
    assert any("not accepted" in note for note in pred.notes)
    m = evaluate(pred_url, str(tmp_path / "sim"), include_matches=True)  # simulate's output folder
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["trace_correlation"]["median"] == pytest.approx(1.0)
    assert sorted(p for p, _, _ in m["matches"]) == list(range(n))
    # each match's trace correlation, in the matches' order; their median is the summary's
    r = m["match_trace_correlations"]
    assert len(r) == len(m["matches"]) and all(v is not None for v in r)
    assert np.median(r) == pytest.approx(m["trace_correlation"]["median"], abs=1e-6)
    json.dumps(m, allow_nan=False)
    report = format_report(m)
    assert "IoU >= 0.5" in report and "1.000" in report
    # nothing accepted: an empty prediction
    none_url = write_result(tmp_path / "rejected.zarr", masks, np.zeros(n, bool), calcium, spikes)
    m = evaluate(none_url, truth_url)
    assert (m["n_pred"], m["f1"], m["trace_correlation"]["n"]) == (0, 0.0, 0)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        load_truth(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_truth(str(tmp_path / "broken.json"))
    (tmp_path / "movie.tif").write_bytes(b"II*\x00")
    with pytest.raises(InputError, match="not a recognised ground truth"):
        load_truth(str(tmp_path / "movie.tif"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="neither a zarr"):
        load_truth(str(tmp_path / "empty"))
    (tmp_path / "obj.json").write_text(json.dumps({"coordinates": [[1, 2]]}))
    with pytest.raises(InputError, match="list"):
        load_truth(str(tmp_path / "obj.json"), shape=(4, 4))


def test_neurofinder_regions_load_on_the_movie_grid():
    path = SHARED_DATA / "neurofinder_left" / "regions.json"
    if not path.is_file():
        pytest.skip("../shared/data/neurofinder_left/regions.json is not present")
    truth = load_truth(str(path), shape=(512, 256))
    assert truth.shape == (512, 256)
    assert truth.n == len(json.loads(path.read_text()))
    assert truth.masks.reshape(truth.n, -1).any(axis=1).all()
    m = evaluate(truth, truth)
    assert m["f1"] == m["caiman"]["f1"] == m["neurofinder"]["combined"] == 1.0
