"""CNN post-processing: probability maps -> masks, centroid growth, neuron fusion, threshold, units."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pydantic
import pytest
import xarray as xr
from scipy import ndimage

from somaflow.detect.postprocess import (
    PostprocessParams,
    choose_threshold,
    fuse_batches,
    masks_from_centroids,
    probability_to_masks,
    threshold_scores,
    units_from_masks,
)
from somaflow.errors import InputError, ParameterError
from somaflow.evaluate import match_iou
from somaflow.evaluate.matching import as_sparse

SHAPE = (64, 64)


def disc(cy: float, cx: float, r: float, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def prob_map(masks: list[np.ndarray], value: float = 0.9, seed: int = 0,
             shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Background ~0.05 with noise, `value` inside the masks."""
    rng = np.random.default_rng(seed)
    p = 0.05 + 0.03 * rng.random(shape)
    for m in masks:
        p[m] = value
    return p


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def best_iou(masks: np.ndarray, truth: np.ndarray) -> float:
    return max(iou(m, truth) for m in masks)


PARAMS = PostprocessParams.for_movie(30.0, "2p", 5.0)


# ----------------------------------------------------------------------------- params


def test_params_scale_with_the_radius():
    p5, p10 = PostprocessParams.for_movie(30.0, "2p", 5.0), PostprocessParams.for_movie(7.5, "1p", 10.0)
    assert p5 == PostprocessParams()  # field defaults are for r = 5
    for name in ("peak_distance", "fusion_distance", "marker_radius", "grow_radius"):
        assert getattr(p10, name) == pytest.approx(2 * getattr(p5, name))
    for name in ("min_area", "min_marker_area"):
        assert getattr(p10, name) == pytest.approx(4 * getattr(p5, name))
    assert p5.fusion_overlap == 0.75 and p5.marker_radius == pytest.approx(4.0)
    with pytest.raises(pydantic.ValidationError):
        p5.threshold = 0.3  # frozen
    with pytest.raises(pydantic.ValidationError, match="grow_radius"):
        PostprocessParams(grow_radius=2.0, marker_radius=4.0)
    with pytest.raises(ParameterError, match="modality"):
        PostprocessParams.for_movie(30.0, "3p", 5.0)
    # the second pass is a 2p default; 1p maps keep grey background structures
    assert p5.rescue_threshold == 0.6 and p10.rescue_threshold is None


def test_import_does_not_pull_in_torch():
    code = "import sys, somaflow.detect.postprocess; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- probability_to_masks


def test_separated_discs_give_one_mask_each_with_their_areas():
    truth = [disc(15, 15, 5), disc(15, 45, 6), disc(45, 30, 4)]
    masks = probability_to_masks(prob_map(truth), PARAMS)
    assert masks.dtype == bool and masks.shape == (3, *SHAPE)
    for t in truth:
        match = [m for m in masks if (m & t).any()]
        assert len(match) == 1
        assert match[0].sum() == t.sum()  # exact: thresholding reproduces the disc
        assert np.array_equal(match[0], t)


def test_touching_discs_are_split_by_the_watershed():
    a, b = disc(32, 24, 6), disc(32, 35, 6)  # centres 11 px apart: the discs overlap
    prob = prob_map([a, b])
    _, n_comp = ndimage.label(prob >= PARAMS.threshold)
    assert n_comp == 1  # thresholding merges them
    masks = probability_to_masks(prob, PARAMS)
    assert len(masks) == 2
    assert best_iou(masks, a) > 0.8 and best_iou(masks, b) > 0.8
    assert not (masks[0] & masks[1]).any()
    assert np.array_equal(masks.any(0), a | b)  # the split loses no pixel
    # without the split (components never count as large) they stay one mask
    unsplit = probability_to_masks(prob, PARAMS.model_copy(update={"split_area_factor": 10.0}))
    assert len(unsplit) == 1


def test_a_single_large_neuron_is_not_split():
    big = disc(32, 32, 8)  # 2.6x the mean neuron area, one distance-transform peak
    masks = probability_to_masks(prob_map([big]), PARAMS)
    assert len(masks) == 1 and np.array_equal(masks[0], big)


def test_three_merged_discs_split_into_three():
    truth = [disc(20, 20, 6), disc(20, 31, 6), disc(30, 26, 6)]
    masks = probability_to_masks(prob_map(truth), PARAMS)
    assert len(masks) == 3
    assert all(best_iou(masks, t) > 0.7 for t in truth)


def test_tiny_specks_are_dropped():
    cell = disc(20, 20, 5)
    specks = np.zeros(SHAPE, bool)
    specks[50:52, 50:52] = True  # 4 px
    specks[5, 60] = True  # 1 px
    small = disc(45, 20, 2)  # 13 px < min_area (19.6)
    masks = probability_to_masks(prob_map([cell, specks, small]), PARAMS)
    assert len(masks) == 1 and np.array_equal(masks[0], cell)
    # lowering min_area keeps the small disc
    masks = probability_to_masks(prob_map([cell, specks, small]), PARAMS.model_copy(update={"min_area": 10}))
    assert len(masks) == 2


def test_second_pass_adds_grey_cells_clear_of_the_confident_ones():
    # a confident cell, a grey cell far from it, a grey cell touching it and a grey speck
    confident, far, near = disc(20, 20, 5), disc(45, 45, 5), disc(20, 31, 5)
    speck = disc(50, 10, 2)  # 13 px < min_area
    prob = prob_map([confident], 0.95)
    prob[far | speck] = 0.7
    prob[near & ~confident] = 0.7
    p = PARAMS.model_copy(update={"threshold": 0.85, "rescue_threshold": 0.6, "rescue_gap": 1})
    masks = probability_to_masks(prob, p)
    assert len(masks) == 3
    assert np.array_equal(masks[0], confident)  # the first pass comes first, unchanged
    # then the second pass's, in raster order: the touching grey cell without the ring of 1 px
    # around the confident cell, and the clear grey cell whole
    ring = ndimage.binary_dilation(confident, np.ones((3, 3), bool))
    assert np.array_equal(masks[1], near & ~ring)
    assert np.array_equal(masks[2], far)
    assert not (masks[0] & masks[1]).any()
    # a wider gap leaves less of it, and none once the rest is below min_area
    for gap in (3, 7, 9):
        rest = near & ~ndimage.binary_dilation(confident, np.ones((3, 3), bool), iterations=gap)
        wide = probability_to_masks(prob, p.model_copy(update={"rescue_gap": gap}))
        if rest.sum() >= p.min_area:
            assert len(wide) == 3 and np.array_equal(wide[1], rest)
        else:
            assert len(wide) == 2 and np.array_equal(wide[1], far)
    # off, or not below threshold: one pass
    for off in (None, 0.85, 0.9):
        only = probability_to_masks(prob, p.model_copy(update={"rescue_threshold": off}))
        assert len(only) == 1 and np.array_equal(only[0], confident)


def test_threshold_selects_pixels():
    cell = disc(30, 30, 6)
    prob = prob_map([cell], value=0.6)
    assert len(probability_to_masks(prob, PARAMS)) == 1
    assert len(probability_to_masks(prob, PARAMS.model_copy(update={"threshold": 0.7}))) == 1  # second pass
    one_pass = PARAMS.model_copy(update={"threshold": 0.7, "rescue_threshold": None})
    assert len(probability_to_masks(prob, one_pass)) == 0


# ----------------------------------------------------------------------------- centroid mode


def _cell_image(cells: list[np.ndarray], seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = 1.0 + 0.2 * ndimage.gaussian_filter(rng.normal(size=SHAPE), 8) + 0.05 * rng.normal(size=SHAPE)
    for c in cells:
        img[c] += 1.0
    return img


def test_centroid_disks_grow_to_the_cell_shapes_in_the_image():
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    ellipse = ((yy - 15) / 4.0) ** 2 + ((xx - 15) / 7.0) ** 2 <= 1  # elongated cell
    big = disc(15, 45, 7)
    doughnut = disc(45, 18, 6) & ~disc(45, 18, 2.5)  # dim nucleus
    left, right = disc(46, 40, 5), disc(46, 51, 5)  # touching neighbours (11 px apart)
    cells = [ellipse, big, doughnut, left, right]
    img = _cell_image(cells)
    img[disc(45, 18, 2.5)] -= 0.7  # the nucleus is darker than the cytoplasm
    centroids = [ndimage.center_of_mass(c | disc(45, 18, 2.5) if c is doughnut else c) for c in cells]
    prob = prob_map([disc(cy, cx, 4) for cy, cx in centroids])
    masks = masks_from_centroids(prob, img, PARAMS)
    assert masks.shape == (5, *SHAPE) and masks.dtype == bool
    filled_doughnut = doughnut | disc(45, 18, 2.5)
    for cell in (ellipse, big, filled_doughnut, left, right):
        assert best_iou(masks, cell) > 0.85
    assert masks.sum(0).max() == 1  # disjoint


def test_centroid_mode_splits_merged_markers_and_drops_specks():
    a, b = disc(30, 24, 5), disc(30, 32, 5)  # centroids 8 px apart: the 4-px disks touch
    img = _cell_image([a, b])
    speck = np.zeros(SHAPE, bool)
    speck[55:57, 55:57] = True
    prob = prob_map([disc(30, 24, 4), disc(30, 32, 4), speck])
    _, n_comp = ndimage.label(prob >= 0.5, structure=np.ones((3, 3)))
    assert n_comp == 2
    masks = masks_from_centroids(prob, img, PARAMS)
    assert len(masks) == 2
    assert best_iou(masks, a) > 0.7 and best_iou(masks, b) > 0.7


def test_centroid_marker_without_image_support_keeps_the_marker():
    img = _cell_image([])  # nothing drawn: the marker itself is the mask
    marker = disc(30, 30, 4)
    masks = masks_from_centroids(prob_map([marker]), img, PARAMS)
    assert len(masks) == 1 and iou(masks[0], marker) > 0.5


# ----------------------------------------------------------------------------- fusion


def test_one_neuron_in_three_batches_fuses_to_the_mean_size_mask():
    batches = [disc(30, 30, 5)[None], disc(31, 30, 6)[None], disc(30, 31, 7)[None]]
    areas = [int(b.sum()) for b in batches]
    out = fuse_batches(batches, PARAMS)
    assert out.shape == (1, *SHAPE)
    mean = np.mean(areas)
    closest = int(np.argmin(np.abs(np.array(areas) - mean)))
    assert closest == 1 and np.array_equal(out[0], batches[1][0])


def test_distinct_neighbours_are_both_kept():
    a1, a2 = disc(30, 24, 5), disc(30, 25, 5)
    b1, b2 = disc(30, 36, 5), disc(31, 36, 5)
    out = fuse_batches([np.stack([a1, b1]), np.stack([a2, b2])], PARAMS)
    assert len(out) == 2
    assert best_iou(out, a1) > 0.8 and best_iou(out, b1) > 0.8


def test_a_mask_covering_two_neurons_is_removed_and_they_are_kept():
    a, b = disc(30, 22, 5), disc(30, 38, 5)
    bridge = np.zeros(SHAPE, bool)
    bridge[28:33, 22:39] = True
    merged = a | b | bridge  # batch 0: both active, one merged mask
    out = fuse_batches([merged[None], a[None], b[None]], PARAMS)
    assert len(out) == 2
    assert any(np.array_equal(m, a) for m in out) and any(np.array_equal(m, b) for m in out)
    assert not any(np.array_equal(m, merged) for m in out)


def test_of_two_near_duplicates_exactly_one_is_kept():
    # centres 1 px apart but a fusion distance below that: only the overlap rule applies
    params = PARAMS.model_copy(update={"fusion_distance": 0.5})
    a, b = disc(30, 30, 6), disc(30, 31, 6)
    out = fuse_batches([a[None], b[None]], params)
    assert len(out) == 1
    # a mask covering less than 75% of the other is not removed
    c, d = disc(30, 30, 6), disc(30, 39, 6)
    assert len(fuse_batches([c[None], d[None]], params)) == 2


def test_fusion_does_not_chain_neighbours():
    # three masks 3 px apart in a row: a and c are 6 px apart (> 3.5), not one neuron
    a, b, c = disc(30, 27, 5), disc(30, 30, 5), disc(30, 33, 5)
    out = fuse_batches([a[None], b[None], c[None]], PARAMS.model_copy(update={"fusion_overlap": 1.0}))
    assert len(out) == 2


def test_fusion_of_many_masks_is_fast():
    rng = np.random.default_rng(3)
    shape = (256, 256)
    gy, gx = np.mgrid[8:256:21, 8:256:21]
    centres = np.stack([gy.ravel(), gx.ravel()], 1).astype(float)[:140]
    batches = []
    for _ in range(8):
        stack = np.zeros((len(centres), *shape), bool)
        jitter = centres + rng.uniform(-1, 1, centres.shape)
        radii = rng.uniform(4.5, 6, len(centres))
        for k, ((cy, cx), r) in enumerate(zip(jitter, radii, strict=True)):
            stack[k] = disc(cy, cx, r, shape)
        batches.append(stack)
    t0 = time.perf_counter()
    out = fuse_batches(batches, PARAMS)
    elapsed = time.perf_counter() - t0
    assert len(out) == len(centres)
    assert elapsed < 10.0, f"fusion of 1120 masks took {elapsed:.1f} s"


# ----------------------------------------------------------------------------- threshold


def test_choose_threshold_separates_signal_from_noise():
    rng = np.random.default_rng(5)
    probs, truths = [], []
    for s in range(2):
        cells = [disc(cy, cx, 5) for cy, cx in rng.uniform(8, 56, (3, 2))]
        cells = [c for i, c in enumerate(cells) if not any((c & o).any() for o in cells[:i])]
        noise = [disc(cy, cx, 5) for cy, cx in ((8, 56), (56, 8))]
        p = prob_map(cells, value=0.8, seed=s)
        for nmask in noise:
            p[nmask & ~np.any(cells, 0)] = 0.45
        probs.append(p)
        truths.append(np.stack(cells))
    one_pass = PARAMS.model_copy(update={"rescue_threshold": None})  # the second pass would find 0.8 at 0.9
    scores = threshold_scores(probs, truths, one_pass)
    t = choose_threshold(probs, truths, one_pass)
    assert 0.45 < t <= 0.8
    assert scores.max() == pytest.approx(1.0)
    assert scores[0] < 1.0  # at 0.3 the noise blobs count as neurons
    assert scores[-1] == 0.0  # at 0.9 nothing is found
    # (batch, y, x) maps are fused across batches first
    t_batched = choose_threshold([np.stack([p, p]) for p in probs], truths, one_pass)
    assert 0.45 < t_batched <= 0.8
    with pytest.raises(InputError, match="one probability map"):
        choose_threshold(probs, truths[:1], PARAMS)
    with pytest.raises(ParameterError, match="candidates"):
        choose_threshold(probs, truths, PARAMS, candidates=[0.5, 1.5])


# ----------------------------------------------------------------------------- units


def test_units_from_masks_matches_the_units_dataset():
    a, b = disc(20, 20, 5), disc(40, 40, 5)
    prob = prob_map([a, b])
    prob[b] = 0.95
    prob[40, 42] = 0.99
    da = xr.DataArray(prob, dims=("y", "x"), coords={"y": np.arange(64) * 2.0, "x": np.arange(64) * 2.0})
    masks = probability_to_masks(prob, PARAMS)
    units = units_from_masks(masks, da)
    assert units["masks"].dims == ("unit", "y", "x") and units["masks"].dtype == bool
    assert units["score"].dims == ("unit",) and units["score"].dtype == np.float32
    assert units["accepted"].dtype == bool and bool(units["accepted"].all())
    assert units["seed_y"].dtype == np.int64 and units["seed_x"].dtype == np.int64
    assert units["cnn_probability"].dims == ("y", "x") and units["cnn_probability"].dtype == np.float32
    np.testing.assert_array_equal(units["y"].values, da["y"].values)
    # ordered by decreasing score = mean probability in the mask
    assert units["score"].values[0] == pytest.approx(prob[b].mean(), rel=1e-6)
    assert units["score"].values[1] == pytest.approx(0.9)
    assert np.array_equal(units["masks"].values[0], b)
    assert (int(units["seed_y"][0]), int(units["seed_x"][0])) == (40, 42)
    assert units.sizes["unit"] == 2

    # same variable dims and dtypes as the local-maxima detector's units
    from somaflow.detect.local_maxima import LocalMaximaParams, detect_local_maxima

    img = _cell_image([a, b])
    images = xr.Dataset({"mean_image": (("y", "x"), img)})
    lm = detect_local_maxima(images, LocalMaximaParams(seed_image="mean"))
    for name in lm.data_vars:
        assert units[name].dims == lm[name].dims and units[name].dtype == lm[name].dtype


def test_fusion_of_sparse_batches_equals_dense():
    # detect_cnn hands fusion one SparseMasks per batch (built on the workers); the result and its
    # order must be those of the dense stacks
    rng = np.random.default_rng(5)
    batches = []
    for _ in range(5):
        n = int(rng.integers(0, 6))
        stack = np.zeros((n, *SHAPE), bool)
        for k in range(n):
            stack[k] = disc(*rng.uniform(8, 56, 2), rng.uniform(4, 7))
        batches.append(stack)
    dense = fuse_batches(batches, PARAMS)
    assert len(dense) >= 3
    for mixed in ([as_sparse(b) for b in batches], [as_sparse(b) if k % 2 else b for k, b in enumerate(batches)]):
        out = fuse_batches(mixed, PARAMS)
        assert out.dtype == bool and np.array_equal(out, dense)
    with pytest.raises(InputError, match="same field of view"):
        fuse_batches([as_sparse(batches[0]), np.zeros((1, 32, 32), bool)], PARAMS)


def test_empty_maps_give_zero_units():
    prob = np.full(SHAPE, 0.02)
    masks = probability_to_masks(prob, PARAMS)
    assert masks.shape == (0, *SHAPE) and masks.dtype == bool
    assert masks_from_centroids(prob, _cell_image([]), PARAMS).shape == (0, *SHAPE)
    assert fuse_batches([masks, masks], PARAMS).shape == (0, *SHAPE)
    units = units_from_masks(masks, prob)
    assert units.sizes == {"unit": 0, "y": SHAPE[0], "x": SHAPE[1]}
    assert units["masks"].dims == ("unit", "y", "x") and units["masks"].dtype == bool
    assert units["score"].dtype == np.float32 and units["accepted"].dtype == bool
    assert units["seed_y"].dtype == np.int64
    assert match_iou(masks, np.zeros((0, *SHAPE), bool)).f1 == 0.0


def test_bad_inputs_name_the_problem():
    with pytest.raises(InputError, match="logits"):
        probability_to_masks(np.full(SHAPE, 3.0), PARAMS)
    with pytest.raises(InputError, match="NaN"):
        probability_to_masks(np.full(SHAPE, np.nan), PARAMS)
    with pytest.raises(InputError, match="2-D"):
        probability_to_masks(np.zeros((2, *SHAPE)), PARAMS)
    with pytest.raises(InputError, match="same field of view"):
        masks_from_centroids(np.zeros(SHAPE), np.zeros((32, 32)), PARAMS)
    with pytest.raises(InputError, match="same field of view"):
        fuse_batches([np.zeros((1, *SHAPE), bool), np.zeros((1, 32, 32), bool)], PARAMS)
    with pytest.raises(InputError, match="at least one batch"):
        fuse_batches([], PARAMS)
    with pytest.raises(InputError, match="empty"):
        units_from_masks(np.zeros((1, *SHAPE), bool), np.zeros(SHAPE))
    with pytest.raises(InputError, match=r"\(unit, y, x\)"):
        units_from_masks(np.zeros((1, 32, 32), bool), np.zeros(SHAPE))
