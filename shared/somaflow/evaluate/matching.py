"""Matching predicted neuron masks to ground-truth masks, in three conventions.

All three work on a sparse representation of the masks (:class:`SparseMasks`,
one CSR row of ``y * x`` pixels per unit), so that the pixel overlaps of
hundreds of 512 x 512 masks are one sparse product ``P @ T.T`` that only
touches overlapping pairs.

Conventions
-----------
``match_iou`` (STNeuroNet Eq. 13-14, Soltanian-Zadeh et al. 2019, after CaImAn)
    distance ``1 - IoU`` where ``IoU >= iou_threshold``; ``0`` where one mask
    contains the other; infinite otherwise. The Hungarian algorithm then picks
    the assignment with the **most** finite-distance pairs and, among those,
    the smallest total distance (the paper's "infinite" distance is realised
    as a cost larger than any sum of finite costs, and such pairs are dropped).
    Containment is exact by default, ``|p ∩ t| = min(|p|, |t|)`` (Eq. 14 says
    ``m ⊆ M``); ``containment < 1`` relaxes it to
    ``|p ∩ t| >= containment * min(|p|, |t|)``. When a pair both reaches the
    IoU threshold and is contained, the first case of Eq. 14 applies
    (distance ``1 - IoU``). Empty masks never match.
``match_caiman`` (``caiman.base.rois.nf_match_neurons_in_binary_masks`` with
    ``thresh_cost=0.7, min_dist=10``): distance ``1 - IoU`` between masks whose
    centroids are closer than ``min_dist`` pixels, 1 otherwise; Hungarian
    assignment minimising the total distance; an assigned pair is a match when
    its distance is below ``thresh_cost`` (IoU > 0.3).
``match_neurofinder`` (``neurofinder.match`` / ``centers`` / ``shapes``):
    greedy. Ground-truth regions are visited in their order; each takes the
    nearest still-unmatched predicted centroid if it is closer than
    ``threshold`` pixels (5 in neurofinder's ``evaluate``). Ties go to the
    lowest prediction index, as ``numpy.argmin`` does there.

Precision is ``n_matched / n_pred`` (0 when there are no predictions), recall
``n_matched / n_true`` (0 when there is no ground truth) and F1 their harmonic
mean (0 when both are 0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from somaflow.errors import InputError, ParameterError

log = logging.getLogger(__name__)

#: CaImAn's defaults in ``nf_match_neurons_in_binary_masks``
CAIMAN_THRESH_COST = 0.7
CAIMAN_MIN_DIST = 10.0
#: neurofinder's centre-distance threshold in ``neurofinder.evaluate``
NEUROFINDER_THRESHOLD = 5.0


# ----------------------------------------------------------------------------- masks


@dataclass(frozen=True, eq=False)
class SparseMasks:
    """Binary masks as a sparse (unit, pixel) matrix, with areas and centroids.

    Attributes
    ----------
    matrix : scipy.sparse.csr_array
        Shape ``(n_units, y * x)``, int32 ones at mask pixels (C order).
    shape : tuple of int
        The image ``(y, x)`` in pixels.
    areas : numpy.ndarray
        ``(n_units,)`` int64, pixels per mask.
    centroids : numpy.ndarray
        ``(n_units, 2)`` float64, mean (row, col) of each mask's pixels;
        NaN for empty masks.
    """

    matrix: sparse.csr_array
    shape: tuple[int, int]
    areas: np.ndarray
    centroids: np.ndarray

    @property
    def n(self) -> int:
        """Number of units."""
        return int(self.matrix.shape[0])

    @classmethod
    def from_dense(cls, masks: np.ndarray) -> SparseMasks:
        """Build from a dense ``(unit, y, x)`` array (nonzero = inside the mask).

        Raises
        ------
        InputError
            ``masks`` is not 3-D.
        """
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise InputError(
                f"masks must be a (unit, y, x) array, got shape {masks.shape}. "
                "Stack one 2-D mask per unit along the first axis."
            )
        n, y, x = masks.shape
        npix = y * x
        # flatnonzero on the flat array is ~10x faster than nonzero on 3-D, and sorted
        index = np.flatnonzero(masks)
        units = index // npix
        return cls._from_pixels(units, index - units * npix, n, (int(y), int(x)))

    @classmethod
    def _from_pixels(cls, units: np.ndarray, pix: np.ndarray, n: int, shape: tuple[int, int]) -> SparseMasks:
        """Build from (unit, flat pixel) pairs sorted by unit, without duplicates."""
        indptr = np.searchsorted(units, np.arange(n + 1)).astype(np.int64)
        matrix = sparse.csr_array(
            (np.ones(pix.size, dtype=np.int32), pix, indptr), shape=(n, shape[0] * shape[1])
        )
        areas = np.diff(indptr)
        rows, cols = np.divmod(pix, shape[1])
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = np.bincount(units, weights=rows, minlength=n) / areas
            cx = np.bincount(units, weights=cols, minlength=n) / areas
        return cls(matrix=matrix, shape=shape, areas=areas, centroids=np.stack([cy, cx], 1))

    def shifted(self, dy: int, dx: int) -> SparseMasks:
        """The masks translated by ``(dy, dx)`` pixels; pixels leaving the frame are lost."""
        ny, nx = self.shape
        units = np.repeat(np.arange(self.n), np.diff(self.matrix.indptr))
        rows, cols = np.divmod(self.matrix.indices.astype(np.int64), nx)
        rows, cols = rows + int(dy), cols + int(dx)
        keep = (rows >= 0) & (rows < ny) & (cols >= 0) & (cols < nx)
        return self._from_pixels(units[keep], rows[keep] * nx + cols[keep], self.n, self.shape)

    def image(self) -> np.ndarray:
        """The ``(y, x)`` float64 image of how many masks cover each pixel."""
        return np.asarray(self.matrix.sum(axis=0), dtype=np.float64).reshape(self.shape)


MaskLike = np.ndarray | SparseMasks


def as_sparse(masks: MaskLike) -> SparseMasks:
    """Return ``masks`` as :class:`SparseMasks` (no copy if it already is one)."""
    return masks if isinstance(masks, SparseMasks) else SparseMasks.from_dense(masks)


def _pair(pred: MaskLike, true: MaskLike) -> tuple[SparseMasks, SparseMasks]:
    p, t = as_sparse(pred), as_sparse(true)
    if p.shape != t.shape:
        raise InputError(
            f"predicted masks are {p.shape[0]}x{p.shape[1]} (y, x) pixels but the ground truth is "
            f"{t.shape[0]}x{t.shape[1]}: both must be in the same field of view. Evaluate against "
            "ground truth of the same movie (crop or pad one of them to match)."
        )
    return p, t


@dataclass(frozen=True)
class Overlaps:
    """Every overlapping (pred, true) pair of two mask sets.

    Attributes
    ----------
    pred, true : numpy.ndarray
        ``(k,)`` int64 unit indices of the overlapping pairs.
    intersection : numpy.ndarray
        ``(k,)`` int64 shared pixels (> 0).
    pred_area, true_area : numpy.ndarray
        ``(k,)`` int64 areas of the two masks of each pair.
    """

    pred: np.ndarray
    true: np.ndarray
    intersection: np.ndarray
    pred_area: np.ndarray
    true_area: np.ndarray

    @property
    def iou(self) -> np.ndarray:
        """``(k,)`` float64 intersection over union (Eq. 13)."""
        union = self.pred_area + self.true_area - self.intersection
        return self.intersection / union

    def contained(self, fraction: float = 1.0) -> np.ndarray:
        """``(k,)`` bool: at least ``fraction`` of the smaller mask lies inside the larger (Eq. 14)."""
        return self.intersection >= fraction * np.minimum(self.pred_area, self.true_area)


def overlaps(pred: MaskLike, true: MaskLike) -> Overlaps:
    """Pixel overlaps of every pair of masks that share at least one pixel.

    Parameters
    ----------
    pred, true : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` masks with the same ``(y, x)``.

    Returns
    -------
    Overlaps
    """
    p, t = _pair(pred, true)
    inter = sparse.coo_array(p.matrix @ t.matrix.T)
    keep = inter.data > 0
    rows = inter.row[keep].astype(np.int64)
    cols = inter.col[keep].astype(np.int64)
    return Overlaps(
        pred=rows,
        true=cols,
        intersection=inter.data[keep].astype(np.int64),
        pred_area=p.areas[rows],
        true_area=t.areas[cols],
    )


# ----------------------------------------------------------------------------- result


@dataclass(frozen=True)
class Matching:
    """A one-to-one assignment of predicted units to ground-truth units.

    Attributes
    ----------
    pred, true : numpy.ndarray
        ``(k,)`` int64 positions of the matched units in the prediction and
        the ground truth, sorted by ``true``.
    iou : numpy.ndarray
        ``(k,)`` float64 IoU of each matched pair.
    inclusion : numpy.ndarray
        ``(k,)`` float64 ``|p ∩ t| / |t|``: fraction of the true mask covered.
    exclusion : numpy.ndarray
        ``(k,)`` float64 ``|p ∩ t| / |p|``: fraction of the predicted mask
        inside the true one (neurofinder's names).
    n_pred, n_true : int
        Units in the prediction and the ground truth.
    """

    pred: np.ndarray
    true: np.ndarray
    iou: np.ndarray
    inclusion: np.ndarray
    exclusion: np.ndarray
    n_pred: int
    n_true: int

    @property
    def n_matched(self) -> int:
        """True positives."""
        return int(self.pred.size)

    @property
    def precision(self) -> float:
        """``n_matched / n_pred``; 0 when there are no predictions."""
        return self.n_matched / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        """``n_matched / n_true``; 0 when there is no ground truth."""
        return self.n_matched / self.n_true if self.n_true else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall (STNeuroNet Eq. 12); 0 when both are 0."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _matching(ov: Overlaps, sel: np.ndarray, n_pred: int, n_true: int) -> Matching:
    """A :class:`Matching` from the selected entries ``sel`` of ``ov``."""
    sel = np.asarray(sel, dtype=np.int64)
    order = np.argsort(ov.true[sel], kind="stable")
    sel = sel[order]
    inter = ov.intersection[sel].astype(np.float64)
    return Matching(
        pred=ov.pred[sel],
        true=ov.true[sel],
        iou=ov.iou[sel] if sel.size else np.zeros(0),
        inclusion=inter / ov.true_area[sel] if sel.size else np.zeros(0),
        exclusion=inter / ov.pred_area[sel] if sel.size else np.zeros(0),
        n_pred=n_pred,
        n_true=n_true,
    )


def _assign(pred: np.ndarray, true: np.ndarray, cost: np.ndarray, n_pred: int, n_true: int,
            *, max_cardinality: bool) -> np.ndarray:
    """Hungarian assignment over candidate pairs; returns indices of chosen pairs.

    The bipartite graph of candidate pairs is split into connected components
    and each is solved by :func:`scipy.optimize.linear_sum_assignment` on its
    own small dense matrix: exact, and linear in the number of components.
    Non-candidate pairs cost ``big``: with ``max_cardinality`` it exceeds any
    sum of candidate costs, so the most candidate pairs are chosen first;
    otherwise ``big`` is 1 (CaImAn: a non-candidate pair costs 1, and
    candidate costs are ``1 - IoU <= 1``).
    """
    if pred.size == 0:
        return np.zeros(0, dtype=np.int64)
    graph = sparse.coo_array(
        (np.ones(pred.size), (pred, n_pred + true)), shape=(n_pred + n_true, n_pred + n_true)
    )
    _, labels = connected_components(graph, directed=False)
    edge_label = labels[pred]
    order = np.argsort(edge_label, kind="stable")
    bounds = np.flatnonzero(np.diff(edge_label[order])) + 1
    chosen: list[np.ndarray] = []
    for edges in np.split(order, bounds):
        if edges.size == 1:
            chosen.append(edges)
            continue
        rows, r_inv = np.unique(pred[edges], return_inverse=True)
        cols, c_inv = np.unique(true[edges], return_inverse=True)
        big = float(min(rows.size, cols.size) + 1) if max_cardinality else 1.0
        sub = np.full((rows.size, cols.size), big)
        index = np.full((rows.size, cols.size), -1, dtype=np.int64)
        sub[r_inv, c_inv] = cost[edges]
        index[r_inv, c_inv] = edges
        ri, ci = linear_sum_assignment(sub)
        picked = index[ri, ci]
        chosen.append(picked[(picked >= 0) & (sub[ri, ci] < big)])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- conventions


def match_iou(
    pred_masks: MaskLike,
    true_masks: MaskLike,
    iou_threshold: float = 0.5,
    *,
    containment: float = 1.0,
) -> Matching:
    """Match masks by IoU with the Hungarian algorithm (STNeuroNet Eq. 13-14).

    Parameters
    ----------
    pred_masks, true_masks : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` bool masks in the same ``(y, x)`` pixel grid.
    iou_threshold : float
        Minimum IoU of a match, in (0, 1]. 0.5 in the paper.
    containment : float
        Fraction in (0, 1] of the smaller mask that must lie inside the larger
        one for the pair to count as "one contains the other" (distance 0).
        1.0 (default) is exact containment, as in Eq. 14.

    Returns
    -------
    Matching

    Raises
    ------
    InputError
        The two mask sets have different ``(y, x)`` shapes.
    ParameterError
        A threshold outside (0, 1].
    """
    if not 0 < iou_threshold <= 1:
        raise ParameterError(f"iou_threshold must be in (0, 1], got {iou_threshold}.")
    if not 0 < containment <= 1:
        raise ParameterError(f"containment must be in (0, 1], got {containment}.")
    p, t = _pair(pred_masks, true_masks)
    ov = overlaps(p, t)
    iou = ov.iou
    contained = ov.contained(containment)
    by_iou = iou >= iou_threshold
    valid = by_iou | contained
    cost = np.where(by_iou, 1.0 - iou, 0.0)
    cand = np.flatnonzero(valid)
    picked = _assign(ov.pred[cand], ov.true[cand], cost[cand], p.n, t.n, max_cardinality=True)
    return _matching(ov, cand[picked], p.n, t.n)


def match_caiman(
    pred_masks: MaskLike,
    true_masks: MaskLike,
    *,
    thresh_cost: float = CAIMAN_THRESH_COST,
    min_dist: float = CAIMAN_MIN_DIST,
) -> Matching:
    """CaImAn's convention: 1 - IoU within a centroid gate, Hungarian, IoU > 1 - thresh_cost.

    Reproduces ``caiman.base.rois.nf_match_neurons_in_binary_masks`` with
    ``enclosed_thr=None``: centroids are the masks' centres of mass; pairs whose
    centroids are ``min_dist`` pixels apart or more cost 1, others ``1 - IoU``;
    the assignment minimises the total cost; assigned pairs with cost below
    ``thresh_cost`` are matches.

    Parameters
    ----------
    pred_masks, true_masks : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` bool masks in the same pixel grid.
    thresh_cost : float
        Maximum ``1 - IoU`` of a match (0.7, i.e. IoU > 0.3).
    min_dist : float
        Centroid distance gate in pixels (10).

    Returns
    -------
    Matching
    """
    if not 0 < thresh_cost <= 1:
        raise ParameterError(f"thresh_cost must be in (0, 1], got {thresh_cost}.")
    if not min_dist > 0:
        raise ParameterError(f"min_dist must be > 0 pixels, got {min_dist}.")
    p, t = _pair(pred_masks, true_masks)
    ov = overlaps(p, t)
    dist = np.linalg.norm(p.centroids[ov.pred] - t.centroids[ov.true], axis=1)
    cost = 1.0 - ov.iou
    cand = np.flatnonzero(dist < min_dist)
    picked = _assign(ov.pred[cand], ov.true[cand], cost[cand], p.n, t.n, max_cardinality=False)
    picked = picked[cost[cand[picked]] < thresh_cost]
    return _matching(ov, cand[picked], p.n, t.n)


def match_neurofinder(
    pred_masks: MaskLike,
    true_masks: MaskLike,
    *,
    threshold: float = NEUROFINDER_THRESHOLD,
) -> Matching:
    """neurofinder's convention: greedy nearest-centroid matching in ground-truth order.

    Each ground-truth region in turn takes the nearest predicted centroid not
    yet taken, if it is strictly closer than ``threshold`` pixels. The
    centroid of a region is the mean of its pixel coordinates. The returned
    ``inclusion`` and ``exclusion`` are neurofinder's per-pair
    ``overlap(method='rates')``; pairs whose masks do not overlap have IoU,
    inclusion and exclusion 0.

    Parameters
    ----------
    pred_masks, true_masks : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` bool masks in the same pixel grid.
    threshold : float
        Centre distance in pixels below which a region is found (5).

    Returns
    -------
    Matching
    """
    if not threshold > 0:
        raise ParameterError(f"threshold must be > 0 pixels, got {threshold}.")
    from scipy.spatial import cKDTree

    p, t = _pair(pred_masks, true_masks)
    ok_p = np.flatnonzero(p.areas > 0)
    pairs_p: list[int] = []
    pairs_t: list[int] = []
    if ok_p.size and t.n:
        tree = cKDTree(p.centroids[ok_p])
        taken = np.zeros(p.n, dtype=bool)
        for j in range(t.n):
            if t.areas[j] == 0:
                continue
            near = np.asarray(tree.query_ball_point(t.centroids[j], r=threshold), dtype=np.int64)
            if near.size == 0:
                continue
            cand = ok_p[near]
            cand = cand[~taken[cand]]
            if cand.size == 0:
                continue
            d = np.linalg.norm(p.centroids[cand] - t.centroids[j], axis=1)
            inside = d < threshold
            cand, d = cand[inside], d[inside]
            if cand.size == 0:
                continue
            best = cand[np.lexsort((cand, d))[0]]
            taken[best] = True
            pairs_p.append(int(best))
            pairs_t.append(j)
    pp = np.asarray(pairs_p, dtype=np.int64)
    tt = np.asarray(pairs_t, dtype=np.int64)
    inter = np.zeros(pp.size, dtype=np.int64)
    if pp.size:
        inter = np.asarray(
            p.matrix[pp].multiply(t.matrix[tt]).sum(axis=1), dtype=np.int64
        ).ravel()
    ov = Overlaps(pred=pp, true=tt, intersection=inter, pred_area=p.areas[pp], true_area=t.areas[tt])
    return _matching(ov, np.arange(pp.size), p.n, t.n)
