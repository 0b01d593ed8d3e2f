"""Detector training targets from ground-truth masks: :func:`union_target`,
:func:`centroid_target` (Apthorpe's 4-px disks), :func:`boundary_weights`
(U-Net weights between touching cells).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from somaflow.errors import InputError


def check_masks(masks: np.ndarray, who: str) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 3:
        raise InputError(f"{who} needs (unit, y, x) masks, got shape {m.shape}.")
    return m.astype(bool, copy=False)


def union_target(masks: np.ndarray, *, exclude_overlaps: bool = False, gap: int = 0) -> np.ndarray:
    """Pixel-wise neuron target: 1 where any mask is.

    Parameters
    ----------
    masks : numpy.ndarray
        (N, H, W) bool.
    exclude_overlaps : bool
        Set pixels covered by two or more masks to 0, so overlapping cells
        come apart in the target (and the post-processing's watershed).
    gap : int
        Also set to 0 the pixels within ``gap`` px of another cell (the
        U-Net paper's separation of touching cells, as a target instead of a
        loss weight): touching cells become separate components.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 in {0, 1}.
    """
    m = check_masks(masks, "union_target")
    count = m.sum(axis=0, dtype=np.uint16)
    out = count >= 1
    if exclude_overlaps or gap > 0:
        out &= count < 2
    if gap > 0 and len(m):
        from scipy import ndimage

        grown = np.zeros(m.shape[1:], np.uint16)
        for cell in m:
            grown += ndimage.binary_dilation(cell, iterations=int(gap))
        out &= grown < 2
    return out.astype(np.uint8)


def mask_centroids(masks: np.ndarray) -> np.ndarray:
    """(N, 2) float64 mean (row, col) of each mask; NaN for empty masks."""
    m = check_masks(masks, "mask_centroids")
    n, ny, nx = m.shape
    area = m.sum(axis=(1, 2)).astype(np.float64)
    rows = (m.sum(axis=2) * np.arange(ny)).sum(axis=1)
    cols = (m.sum(axis=1) * np.arange(nx)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([rows / area, cols / area], axis=1) if n else np.zeros((0, 2))


def centroid_target(masks: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """ROIs shrunk to disks at their centroids (Apthorpe et al.'s (2+1)D ConvNet target).

    Parameters
    ----------
    masks : numpy.ndarray
        (N, H, W) bool; empty masks are skipped.
    radius : float
        Disk radius (px); 4 in the paper.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8: 1 within ``radius`` px of a mask's centroid (clipped at the border).
    """
    m = check_masks(masks, "centroid_target")
    ny, nx = m.shape[1:]
    out = np.zeros((ny, nx), bool)
    k = int(math.ceil(radius))
    for cy, cx in mask_centroids(m):
        if not np.isfinite(cy):
            continue
        y0, y1 = max(0, int(np.floor(cy)) - k), min(ny, int(np.ceil(cy)) + k + 1)
        x0, x1 = max(0, int(np.floor(cx)) - k), min(nx, int(np.ceil(cx)) + k + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 + 1e-9
    return out.astype(np.uint8)


def boundary_weights(masks: np.ndarray, *, w0: float = 10.0, sigma: float = 3.0) -> np.ndarray:
    """U-Net pixel weights that stress the background gap between touching cells.

    ``w = 1 + w0 · exp(−(d1 + d2)² / (2 σ²))`` on background pixels, with
    ``d1``, ``d2`` the distances (px) to the nearest and second-nearest cell
    (Ronneberger et al. 2015); 1 on cell pixels and where fewer than two
    cells are within reach. Distances are computed in a window of
    ``3 σ + 1`` px around each mask only.

    Parameters
    ----------
    masks : numpy.ndarray
        (N, H, W) bool.
    w0, sigma : float
        Peak extra weight and its width (px).

    Returns
    -------
    numpy.ndarray
        (H, W) float32 ≥ 1.
    """
    m = check_masks(masks, "boundary_weights")
    ny, nx = m.shape[1:]
    d1 = np.full((ny, nx), np.inf)
    d2 = np.full((ny, nx), np.inf)
    margin = int(math.ceil(3 * sigma)) + 1
    for mask in m:
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            continue
        y0, y1 = max(0, ys.min() - margin), min(ny, ys.max() + margin + 1)
        x0, x1 = max(0, xs.min() - margin), min(nx, xs.max() + margin + 1)
        d = ndimage.distance_transform_edt(~mask[y0:y1, x0:x1])
        a, b = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        d2[y0:y1, x0:x1] = np.minimum(b, np.maximum(a, d))
        d1[y0:y1, x0:x1] = np.minimum(a, d)
    union = m.any(axis=0)
    with np.errstate(invalid="ignore"):
        extra = np.where(
            np.isfinite(d2) & ~union, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0
        )
    return (1.0 + extra).astype(np.float32)

