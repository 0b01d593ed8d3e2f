"""Detecting and undoing a global integer offset between predicted and true masks.

Registration to a template can translate the whole field of view by a few
pixels relative to the frame the ground truth was drawn in. A constant
translation of every mask wrecks IoU matching while the segmentation itself is
fine, so the evaluator estimates it from the masks alone: the cross-correlation
of the two "how many masks cover this pixel" images, restricted to shifts of at
most ``max_shift`` pixels, peaks at the translation that best superimposes them.

That peak is flat to within a pixel or so when the predicted masks are
systematically larger or smaller than the true ones (a disk correlates equally
well with every position of a smaller disk inside it), so
:func:`refine_offset` then tries the shifts around it and keeps the one with
the most IoU matches.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import fft

from somaflow.errors import InputError, ParameterError
from somaflow.evaluate.matching import MaskLike, SparseMasks, as_sparse, match_iou

log = logging.getLogger(__name__)


def estimate_offset(pred_masks: MaskLike, true_masks: MaskLike, max_shift: int = 20) -> tuple[int, int]:
    """The integer shift that moves the predicted masks onto the true ones.

    Parameters
    ----------
    pred_masks, true_masks : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` bool masks in grids of the same ``(y, x)``.
    max_shift : int
        Largest ``|dy|`` and ``|dx|`` searched, in pixels (>= 0).

    Returns
    -------
    (dy, dx) : tuple of int
        Apply it with ``shift_masks(pred_masks, dy, dx)``: a prediction that
        is the truth moved by ``(+3, -2)`` gives ``(-3, +2)``. ``(0, 0)`` when
        either set is empty. Among equally good shifts the smallest one wins.

    Notes
    -----
    The summed-mask images are zero-padded by ``max_shift`` before the FFT, so
    the correlation is linear (no wrap-around) for every searched shift.
    """
    if int(max_shift) != max_shift or max_shift < 0:
        raise ParameterError(f"max_shift must be a non-negative integer (pixels), got {max_shift!r}.")
    p, t = as_sparse(pred_masks), as_sparse(true_masks)
    if p.shape != t.shape:
        raise InputError(
            f"cannot estimate an offset between masks of shape {p.shape} and {t.shape}; "
            "both must be in the same (y, x) grid."
        )
    a, b = t.image(), p.image()
    if not a.any() or not b.any():
        return 0, 0
    ny, nx = a.shape
    my, mx = min(int(max_shift), ny - 1), min(int(max_shift), nx - 1)
    shape = (fft.next_fast_len(ny + my, real=True), fft.next_fast_len(nx + mx, real=True))
    # corr[s] = sum_r a[r + s] * b[r]: the peak s makes a ≈ b moved by s
    corr = fft.irfft2(fft.rfft2(a, shape) * np.conj(fft.rfft2(b, shape)), shape)
    dys = np.arange(-my, my + 1)
    dxs = np.arange(-mx, mx + 1)
    window = corr[np.ix_(dys % shape[0], dxs % shape[1])]
    best = window.max()
    cand_y, cand_x = np.nonzero(window >= best - 1e-9 * max(abs(best), 1.0))
    dy, dx = dys[cand_y], dxs[cand_x]
    k = int(np.lexsort((np.abs(dx), np.abs(dy), dy**2 + dx**2))[0])
    log.debug("offset estimate (%d, %d), correlation %.3g", dy[k], dx[k], best)
    return int(dy[k]), int(dx[k])


def refine_offset(
    pred_masks: MaskLike,
    true_masks: MaskLike,
    start: tuple[int, int],
    radius: int = 2,
    iou_threshold: float = 0.5,
    *,
    containment: float = 1.0,
) -> tuple[int, int]:
    """The shift near ``start`` that gives the most IoU matches.

    Parameters
    ----------
    pred_masks, true_masks : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` bool masks in the same grid.
    start : (int, int)
        Initial ``(dy, dx)``, e.g. from :func:`estimate_offset`.
    radius : int
        Shifts with ``|dy - start_y|, |dx - start_x| <= radius`` are tried.
    iou_threshold, containment : float
        As in :func:`~somaflow.evaluate.matching.match_iou`.

    Returns
    -------
    (dy, dx) : tuple of int
        The shift with the most matches. Ties go to the shift that best
        centres the matched pairs (smallest component-wise median of the
        centroid differences: masks uniformly larger or smaller than the truth
        keep their IoU over a pixel or two of shift, but not their centroids),
        then to the highest total IoU, then to the shift closest to ``start``.
    """
    p, t = as_sparse(pred_masks), as_sparse(true_masks)
    best_key: tuple[float, ...] | None = None
    best = (int(start[0]), int(start[1]))
    for ddy in range(-radius, radius + 1):
        for ddx in range(-radius, radius + 1):
            shift = (int(start[0]) + ddy, int(start[1]) + ddx)
            moved = p.shifted(*shift)
            m = match_iou(moved, t, iou_threshold, containment=containment)
            if m.n_matched:
                residual = np.median(t.centroids[m.true] - moved.centroids[m.pred], axis=0)
                off_centre = float(np.hypot(*residual))
            else:
                off_centre = 0.0
            key = (m.n_matched, -round(off_centre, 6), float(m.iou.sum()), -(ddy * ddy + ddx * ddx))
            if best_key is None or key > best_key:
                best_key, best = key, shift
    return best


def shift_masks(masks: MaskLike, dy: int, dx: int) -> MaskLike:
    """Translate every mask by ``(dy, dx)`` pixels, filling with False.

    Parameters
    ----------
    masks : numpy.ndarray or SparseMasks
        ``(unit, y, x)`` bool.
    dy, dx : int
        Rows down and columns right; pixels moved out of the frame are lost.

    Returns
    -------
    numpy.ndarray or SparseMasks
        Same kind as ``masks``, a new object.
    """
    if isinstance(masks, SparseMasks):
        return masks.shifted(dy, dx)
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise InputError(f"masks must be (unit, y, x), got shape {masks.shape}.")
    dy, dx = int(dy), int(dx)
    out = np.zeros_like(masks)
    _, ny, nx = masks.shape
    if abs(dy) >= ny or abs(dx) >= nx:
        return out
    dst_y = slice(max(dy, 0), ny + min(dy, 0))
    src_y = slice(max(-dy, 0), ny + min(-dy, 0))
    dst_x = slice(max(dx, 0), nx + min(dx, 0))
    src_x = slice(max(-dx, 0), nx + min(-dx, 0))
    out[:, dst_y, dst_x] = masks[:, src_y, src_x]
    return out
