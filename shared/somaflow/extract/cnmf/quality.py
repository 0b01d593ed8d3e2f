"""Masks of CNMF footprints and the anatomical tests of a unit: :func:`masks_from_footprints`,
:func:`mask_contrast` (mask against a ring on the mean image), :func:`mask_width`
(narrowest extent).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from somaflow.extract.cnmf.params import CnmfParams


def masks_from_footprints(footprints: sp.csr_matrix, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """(unit, y, x) bool: footprint ≥ ``fraction`` × max, the component holding the max, holes filled.

    Each footprint is labelled inside the bounding box of its support (plus a
    one-pixel border), so the cost is the footprints' size, not units × frame.
    """
    n = footprints.shape[0]
    out = np.zeros((n,) + shape, bool)
    A = footprints.tocsr()
    for k in range(n):
        lo, hi = A.indptr[k], A.indptr[k + 1]
        if hi == lo:
            continue
        idx, val = A.indices[lo:hi], A.data[lo:hi]
        yy, xx = np.divmod(idx, shape[1])
        y0, x0 = max(int(yy.min()) - 1, 0), max(int(xx.min()) - 1, 0)
        y1, x1 = min(int(yy.max()) + 2, shape[0]), min(int(xx.max()) + 2, shape[1])
        img = np.zeros((y1 - y0, x1 - x0), np.float32)
        img[yy - y0, xx - x0] = val
        peak = np.unravel_index(np.argmax(img), img.shape)
        above = img >= fraction * img[peak]
        lab, _ = ndimage.label(above, structure=np.ones((3, 3)))
        out[k, y0:y1, x0:x1] = ndimage.binary_fill_holes(lab == lab[peak])
    return out


def _mask_pixels(masks: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(k, ys, xs)``: the pixel coordinates of every non-empty mask of a (unit, y, x) stack.

    One pass over the stack (sparse rows) instead of one full-frame scan per mask.
    """
    if not len(masks):
        return
    rows = sp.csr_matrix(masks.reshape(len(masks), int(np.prod(masks.shape[1:]))))
    for k in range(len(masks)):
        idx = rows.indices[rows.indptr[k]:rows.indptr[k + 1]]
        if len(idx):
            ys, xs = np.divmod(idx, masks.shape[2])
            yield k, ys, xs


def mask_contrast(masks: np.ndarray, image: np.ndarray, radius: float) -> np.ndarray:
    """Anatomical contrast of each mask on ``image`` (the mean image).

    ``(mean inside − mean of the ring) / SD of the ring``, the ring being the
    pixels 1 px to ``radius`` px outside the mask. Somata are brighter than
    their surround (doughnuts too, nucleus included: the mask is filled);
    neuropil fluctuations picked up as components are not.

    Parameters
    ----------
    masks : ndarray, (unit, y, x) bool
    image : ndarray, (y, x) float
    radius : float
        Soma radius r (px).

    Returns
    -------
    ndarray, (unit,) float64; NaN for an empty mask or ring.
    """
    out = np.full(len(masks), np.nan)
    steps = max(2, int(round(radius)))
    masks = np.asarray(masks, bool)
    for k, ys, xs in _mask_pixels(masks):
        m = masks[k]
        y0, y1 = max(0, ys.min() - steps - 1), min(m.shape[0], ys.max() + steps + 2)
        x0, x1 = max(0, xs.min() - steps - 1), min(m.shape[1], xs.max() + steps + 2)
        sub = m[y0:y1, x0:x1]
        ring = ndimage.binary_dilation(sub, iterations=steps) & ~ndimage.binary_dilation(sub, iterations=1)
        if ring.sum() < 3:
            continue
        img = image[y0:y1, x0:x1]
        sd = float(img[ring].std())
        out[k] = (float(img[sub].mean()) - float(img[ring].mean())) / max(sd, 1e-12)
    return out


def mask_width(masks: np.ndarray) -> np.ndarray:
    """Width of each mask across its narrowest axis: its second-moment ellipse's minor axis.

    ``4 √λ_min`` of the covariance of the mask's pixel coordinates
    (scikit-image's ``axis_minor_length``): a filled disk of radius r gives
    about 2 r, a line one pixel wide about 0. A soma is round, so a mask much
    thinner than a soma is a dendrite, a neuropil streak or a border artefact,
    whatever its area.

    Parameters
    ----------
    masks : ndarray, (unit, y, x) bool

    Returns
    -------
    ndarray, (unit,) float64
        Width in pixels; 0 for an empty mask.
    """
    masks = np.asarray(masks, bool)
    out = np.zeros(len(masks))
    for k, ys, xs in _mask_pixels(masks):
        if len(ys) < 2:
            continue
        cov = np.cov(np.stack([ys, xs]).astype(np.float64), bias=True)
        out[k] = 4.0 * math.sqrt(max(float(np.linalg.eigvalsh(cov)[0]), 0.0))
    return out


def _contrast_exempt(masks: np.ndarray, accepted: np.ndarray, active: np.ndarray, width: np.ndarray,
                     cp: CnmfParams) -> np.ndarray:
    """Units accepted on their activity alone although darker than their surround (``contrast_exempt_size``).

    ``active``: units that pass every criterion but contrast. Those whose mask
    is at least ``contrast_exempt_size`` times the nominal soma disk, in area
    (π r²) and in width (2 r), and which share less than
    ``morph_covered_iou`` of either mask with any accepted unit, are returned
    (bool, (unit,))."""
    n = len(masks)
    out = np.zeros(n, bool)
    r = cp.neuron_radius
    area = masks.reshape(n, math.prod(masks.shape[1:])).sum(axis=1)
    cand = (active & ~accepted & (area >= cp.contrast_exempt_size * math.pi * r**2)
            & (width >= cp.contrast_exempt_size * 2 * r))
    if not cand.any():
        return out
    flat = sp.csr_matrix(masks.reshape(n, math.prod(masks.shape[1:])), dtype=np.float32)
    c = np.flatnonzero(cand)
    frac_c, frac_a = _overlap_fractions(flat[c], flat[np.flatnonzero(accepted)])
    out[c[(np.maximum(frac_c, frac_a) < cp.morph_covered_iou).all(axis=1)]] = True
    return out


def _overlap_fractions(a: sp.csr_matrix, b: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Pixels shared by every pair of mask rows of ``a`` and ``b``, as fractions of each.

    Returns two (rows of a, rows of b) arrays: shared / area of the ``a`` row,
    and shared / area of the ``b`` row (an empty row shares nothing)."""
    inter = (a @ b.T).toarray() if a.shape[0] and b.shape[0] else np.zeros((a.shape[0], b.shape[0]))
    return (inter / np.maximum(np.asarray(a.sum(axis=1)), 1),
            inter / np.maximum(np.asarray(b.sum(axis=1)).ravel()[None, :], 1))

