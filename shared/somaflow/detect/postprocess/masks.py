"""Probability maps and centroids to instance masks (:func:`probability_to_masks`,
:func:`masks_from_centroids`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import xarray as xr
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from somaflow.detect.postprocess.params import _EIGHT, PostprocessParams
from somaflow.detect.postprocess.units import _finite_image, _probability
from somaflow.errors import InputError

log = logging.getLogger(__name__)


def probability_to_masks(prob: np.ndarray | xr.DataArray, params: PostprocessParams) -> np.ndarray:
    """Neuron masks from a whole-neuron probability map (STNeuroNet post-processing).

    Parameters
    ----------
    prob : numpy.ndarray or xarray.DataArray
        ``(y, x)`` float neuron (class-1 softmax) probability in [0, 1].
    params : PostprocessParams
        ``threshold``, ``neuron_radius``, ``split_area_factor``,
        ``peak_distance``, ``min_area``, ``rescue_threshold`` and
        ``rescue_gap`` are used.

    Returns
    -------
    numpy.ndarray
        ``(n, y, x)`` bool, disjoint masks of at least ``min_area`` pixels:
        the first pass's in raster order of their first pixel, then the
        second pass's.

    Raises
    ------
    InputError
        ``prob`` is not 2-D, holds NaN/inf, or values outside [0, 1].
    """
    p = _probability(prob)
    split_area = params.split_area_factor * math.pi * params.neuron_radius**2
    labels = _instances(p >= params.threshold, split_area, params.peak_distance, params.min_area)
    masks = _masks_from_labels(labels, params.min_area)
    low = params.rescue_threshold
    if low is not None and low < params.threshold:
        taken = masks.any(axis=0)
        if params.rescue_gap:
            taken = ndimage.binary_dilation(taken, _EIGHT, iterations=params.rescue_gap)
        extra = _masks_from_labels(
            _instances((p >= low) & ~taken, split_area, params.peak_distance, params.min_area), params.min_area
        )
        log.debug("probability_to_masks: %d + %d masks at thresholds %.3g, %.3g", len(masks), len(extra),
                  params.threshold, low)
        return np.concatenate([masks, extra]) if len(extra) else masks
    log.debug("probability_to_masks: %d masks at threshold %.3g", len(masks), params.threshold)
    return masks


def masks_from_centroids(
    prob: np.ndarray | xr.DataArray, image: np.ndarray | xr.DataArray, params: PostprocessParams
) -> np.ndarray:
    """Cell masks from a centroid probability map, grown on a summary image.

    Parameters
    ----------
    prob : numpy.ndarray or xarray.DataArray
        ``(y, x)`` float probability in [0, 1] that a pixel lies in a cell's
        centroid disk (the (2+1)D ConvNet's output).
    image : numpy.ndarray or xarray.DataArray
        ``(y, x)`` float summary image the cells are bright in (correlation or
        mean image), same shape as ``prob``.
    params : PostprocessParams
        ``threshold``, ``min_marker_area``, ``marker_radius``,
        ``split_area_factor``, ``peak_distance``, ``grow_radius``,
        ``grow_fraction`` and ``min_area`` are used.

    Returns
    -------
    numpy.ndarray
        ``(n, y, x)`` bool, disjoint masks of at least ``min_area`` pixels,
        at most one per marker, in raster order of their first pixel.

    Raises
    ------
    InputError
        ``prob`` or ``image`` is not 2-D or not finite, their shapes differ,
        or ``prob`` has values outside [0, 1].
    """
    p = _probability(prob)
    img = _finite_image(image, "image")
    if img.shape != p.shape:
        raise InputError(
            f"image is {img.shape[0]}x{img.shape[1]} but the probability map is "
            f"{p.shape[0]}x{p.shape[1]} (y, x); pass the summary image of the same field of view."
        )
    split_area = params.split_area_factor * math.pi * params.marker_radius**2
    markers = _instances(p >= params.threshold, split_area, params.peak_distance, params.min_marker_area)
    markers = _relabel(markers, params.min_marker_area)
    n = int(markers.max())
    if n == 0:
        return np.zeros((0, *p.shape), dtype=bool)
    idx = np.arange(1, n + 1)
    centres = np.asarray(ndimage.center_of_mass(np.ones(p.shape), markers, idx)).reshape(n, 2)
    peaks = ndimage.maximum(img, markers, idx)

    # every pixel within grow_radius of some marker centre (plus the markers themselves)
    seeds = np.ones(p.shape, dtype=bool)
    cy = np.clip(np.rint(centres[:, 0]).astype(int), 0, p.shape[0] - 1)
    cx = np.clip(np.rint(centres[:, 1]).astype(int), 0, p.shape[1] - 1)
    seeds[cy, cx] = False
    reach = (ndimage.distance_transform_edt(seeds) <= params.grow_radius + 1.0) | (markers > 0)
    basins = watershed(-img, markers=markers, mask=reach, connectivity=2)

    ny, nx = p.shape
    half = int(math.ceil(params.grow_radius))
    labels = np.zeros(p.shape, dtype=np.int64)
    for i in range(n):
        y0, x0 = centres[i]
        ys = slice(max(0, int(math.floor(y0)) - half), min(ny, int(math.ceil(y0)) + half + 1))
        xs = slice(max(0, int(math.floor(x0)) - half), min(nx, int(math.ceil(x0)) + half + 1))
        basin = basins[ys, xs] == i + 1
        marker = markers[ys, xs] == i + 1
        yy, xx = np.mgrid[ys, xs]
        disk = (yy - y0) ** 2 + (xx - x0) ** 2 <= params.grow_radius**2
        win = img[ys, xs]
        base = float(np.median(win))
        own = _grown(basin & disk, marker, win, base, float(peaks[i]), params.grow_fraction)
        labels[ys, xs][own] = i + 1
    masks = _masks_from_labels(labels, params.min_area)
    log.debug("masks_from_centroids: %d markers, %d masks", n, len(masks))
    return masks


def _grown(allowed: np.ndarray, marker: np.ndarray, win: np.ndarray, base: float, peak: float,
           fraction: float) -> np.ndarray:
    """The part of ``allowed`` above the growth threshold that holds the marker, holes filled.

    Always joined with the marker (within ``allowed``); the marker alone when
    the image shows no cell there (peak at or below the local median, or no
    pixel of the marker above the threshold).
    """
    fallback = marker & allowed
    if peak <= base:
        return fallback
    above = allowed & (win >= base + fraction * (peak - base))
    lab, n = ndimage.label(above, structure=_EIGHT)
    if n == 0:
        return fallback
    hits = np.bincount(lab[marker], minlength=n + 1)
    hits[0] = 0
    if hits.max() == 0:
        return fallback
    region = (lab == int(np.argmax(hits))) | fallback
    return ndimage.binary_fill_holes(region) & allowed


def _instances(binary: np.ndarray, split_area: float, peak_distance: float,
               min_fragment: float) -> np.ndarray:
    """(y, x) int64 label image: components of ``binary``, the large ones split.

    Components with more than ``split_area`` pixels are split by a watershed
    of the negated distance transform from its local maxima at least
    ``peak_distance`` apart; fragments below ``min_fragment`` pixels are merged
    into their neighbour with the longest shared border.
    """
    comp, n = ndimage.label(binary, structure=_EIGHT)
    comp = comp.astype(np.int64)
    if n == 0:
        return comp
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    big = np.flatnonzero(areas[1:] > split_area) + 1
    if big.size == 0:
        return comp
    big_mask = np.isin(comp, big)
    big_labels = np.where(big_mask, comp, 0)
    dist = ndimage.distance_transform_edt(binary)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(round(peak_distance))), labels=big_labels,
        exclude_border=False, p_norm=2,
    )
    markers = np.zeros(binary.shape, dtype=np.int64)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    # a component without a marker (cannot happen for a finite maximum, but be safe)
    missing = np.setdiff1d(big, comp[peaks[:, 0], peaks[:, 1]])
    for k, lab in enumerate(missing, start=len(peaks) + 1):
        flat = int(np.argmax(np.where(comp == lab, dist, -1.0)))
        markers.flat[flat] = k
    split = watershed(-dist, markers=markers, mask=big_mask, connectivity=2)
    out = np.where(big_mask, 0, comp)
    next_label = n + 1
    boxes = ndimage.find_objects(comp)
    for lab in big:
        box = boxes[lab - 1]
        inside = comp[box] == lab
        parts = _merge_fragments(np.where(inside, split[box], 0), min_fragment)
        ids = np.unique(parts[parts > 0])
        if ids.size <= 1:
            out[box][inside] = lab
            continue
        sub = out[box]
        for pid in ids:
            sub[parts == pid] = next_label
            next_label += 1
    return out


def _merge_fragments(parts: np.ndarray, min_fragment: float) -> np.ndarray:
    """Merge fragments below ``min_fragment`` pixels into the neighbour sharing the most border."""
    parts = parts.copy()
    while True:
        ids, counts = np.unique(parts[parts > 0], return_counts=True)
        if ids.size <= 1:
            return parts
        small = np.flatnonzero(counts < min_fragment)
        if small.size == 0:
            return parts
        frag = int(ids[small[np.argmin(counts[small])]])
        this = parts == frag
        ring = ndimage.binary_dilation(this, structure=_EIGHT) & ~this
        neigh = parts[ring]
        neigh = neigh[neigh > 0]
        if neigh.size == 0:  # not touching any other fragment (8-connected, so unlikely)
            return parts
        vals, touch = np.unique(neigh, return_counts=True)
        parts[this] = int(vals[np.argmax(touch)])


def _relabel(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Labels 1..k of the regions with at least ``min_area`` pixels, in label order; others 0."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    lut = np.zeros(areas.size, dtype=np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


def _masks_from_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """(n, y, x) bool masks of the labels with at least ``min_area`` pixels, in raster order."""
    labels = _relabel(labels, min_area)
    # order by each region's first pixel (raster order)
    flat = labels.ravel()
    firsts = np.flatnonzero(flat)
    _, first_index = np.unique(flat[firsts], return_index=True)
    order = np.argsort(firsts[first_index], kind="stable") + 1
    masks = np.zeros((order.size, *labels.shape), dtype=bool)
    boxes = ndimage.find_objects(labels)
    for i, lab in enumerate(order):
        box = boxes[lab - 1]
        masks[i][box] = labels[box] == lab
    return masks

