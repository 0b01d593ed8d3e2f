"""Independent components to unit masks: upsampled filters, thresholded and cut into
connected pieces, duplicates dropped.
"""

from __future__ import annotations

import math

import numpy as np
import xarray as xr
from scipy import ndimage

from somaflow.extract.pca_ica.params import PcaIcaParams
from somaflow.robust import robust_sd


def upsample_filters(spatial: xr.DataArray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """IC images on the decomposition grid brought to the movie's pixel grid.

    Parameters
    ----------
    spatial : xarray.DataArray
        (ic, y', x') images on a grid downsampled by ``factor``.
    shape : (int, int)
        (y, x) of the movie.
    factor : int
        Spatial downsampling factor; 1 returns the images unchanged.

    Returns
    -------
    numpy.ndarray
        (ic, y, x) float64: bilinear interpolation between block centres (block
        ``i`` is centred on movie pixel ``i·factor + (factor − 1)/2``), edge
        values extended.
    """
    imgs = np.asarray(spatial.values, np.float64)
    if factor == 1:
        return imgs
    ny, nx = shape
    cy = (np.arange(ny) - (factor - 1) / 2) / factor
    cx = (np.arange(nx) - (factor - 1) / 2) / factor
    coords = np.stack(np.meshgrid(cy, cx, indexing="ij"))
    out = np.zeros((len(imgs), ny, nx))
    for i, img in enumerate(imgs):
        out[i] = ndimage.map_coordinates(img, coords, order=1, mode="nearest")
    return out


def segment_filters(filters: np.ndarray, skewness: np.ndarray, params: PcaIcaParams) -> xr.Dataset:
    """Masks from IC images: smooth, threshold, split, cut, area filter, de-duplicate.

    Parameters
    ----------
    filters : numpy.ndarray
        (ic, y, x) float IC images, signed so that cells are positive.
    skewness : numpy.ndarray
        (ic,) skewness of each IC's time course.
    params : PcaIcaParams
        Uses the segmentation parameters and ``min_skewness``.

    Returns
    -------
    xarray.Dataset
        ``masks`` (unit, y, x) bool; ``footprints`` (unit, y, x) float32 in
        [0, 1]; ``score`` (unit) float32; ``accepted`` (unit) bool;
        ``skewness`` (unit) float32; ``contrast`` (unit) float32;
        ``component`` (unit) int64, the IC each unit comes from. By decreasing
        score (see :func:`pca_ica`).
    """
    n_ic, ny, nx = filters.shape
    r = params.neuron_radius
    lo, hi = (f * math.pi * r * r for f in (params.min_area_fraction, params.max_area_fraction))
    masks: list[np.ndarray] = []
    footprints: list[np.ndarray] = []
    source: list[int] = []
    contrast: list[float] = []
    for i in range(n_ic):
        img = filters[i]
        smooth = ndimage.gaussian_filter(img, params.smooth_sigma, mode="nearest") \
            if params.smooth_sigma > 0 else img
        med = float(np.median(smooth))
        sd = float(robust_sd(smooth))
        if not sd > 0:
            continue
        labels, _ = ndimage.label(smooth > med + params.threshold * sd)
        for j, sl in enumerate(ndimage.find_objects(labels), start=1):
            region = labels[sl] == j
            mask, peak = _cut(smooth[sl], region, med, params.peak_fraction)
            if not lo <= int(mask.sum()) <= hi:
                continue
            full = np.zeros((ny, nx), bool)
            full[sl] = mask
            weights = np.zeros((ny, nx), np.float32)
            weights[sl] = np.where(region, np.clip(img[sl], 0, None), 0)
            top = float(weights.max())
            masks.append(full)
            footprints.append(weights / top if top > 0 else full.astype(np.float32))
            source.append(i)
            contrast.append((peak - med) / sd)
    src = np.asarray(source, np.int64)
    skew = np.asarray(skewness, np.float64)[src]
    positive = np.clip(skew, 0, None)
    score = positive / (positive + params.min_skewness)
    stack = np.asarray(masks, bool).reshape(-1, ny, nx)
    kept = _drop_duplicates(stack, score, params.duplicate_overlap)
    order = kept[np.argsort(-score[kept], kind="stable")]
    return xr.Dataset(
        {
            "masks": (("unit", "y", "x"), stack[order]),
            "footprints": (("unit", "y", "x"),
                           np.asarray(footprints, np.float32).reshape(-1, ny, nx)[order]),
            "score": (("unit",), score[order].astype(np.float32)),
            "accepted": (("unit",), skew[order] >= params.min_skewness),
            "skewness": (("unit",), skew[order].astype(np.float32)),
            "contrast": (("unit",), np.asarray(contrast, np.float32)[order]),
            "component": (("unit",), src[order]),
        }
    )


def _cut(smooth: np.ndarray, region: np.ndarray, base: float, fraction: float) -> tuple[np.ndarray, float]:
    """The part of ``region`` at or above ``base + fraction · (peak − base)`` that
    holds the region's peak, holes filled; and the peak value."""
    values = np.where(region, smooth, -np.inf)
    py, px = np.unravel_index(int(np.argmax(values)), values.shape)
    peak = float(smooth[py, px])
    labels, _ = ndimage.label(region & (smooth >= base + fraction * (peak - base)))
    return ndimage.binary_fill_holes(labels == labels[py, px]), peak


def _drop_duplicates(masks: np.ndarray, score: np.ndarray, max_overlap: float) -> np.ndarray:
    """Indices of the masks kept, greedily by decreasing score: a mask sharing
    more than ``max_overlap`` of the smaller mask's area with a kept one is dropped."""
    n = len(masks)
    if n == 0:
        return np.zeros(0, np.int64)
    flat = masks.reshape(n, math.prod(masks.shape[1:])).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    overlap = inter / np.maximum(np.minimum(area[:, None], area[None, :]), 1.0)
    kept: list[int] = []
    for i in np.argsort(-score, kind="stable"):
        if not kept or overlap[i, kept].max() <= max_overlap:
            kept.append(int(i))
    return np.asarray(kept, np.int64)

