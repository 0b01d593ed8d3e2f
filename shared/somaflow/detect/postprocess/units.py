"""Masks to the units dataset of a detector (:func:`units_from_masks`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from somaflow.detect.postprocess.params import _PROB_TOL
from somaflow.errors import InputError
from somaflow.evaluate.matching import SparseMasks


def units_from_masks(masks: np.ndarray | xr.DataArray, prob: np.ndarray | xr.DataArray) -> xr.Dataset:
    """The units dataset of a CNN detector, as the rest of the pipeline expects it.

    Parameters
    ----------
    masks : numpy.ndarray or xarray.DataArray
        ``(unit, y, x)`` bool masks, none empty.
    prob : numpy.ndarray or xarray.DataArray
        ``(y, x)`` neuron probability in [0, 1] the masks came from; its
        ``y``/``x`` coordinates, if any, are kept.

    Returns
    -------
    xarray.Dataset
        ``masks`` (unit, y, x) bool
            ordered by decreasing score (stable).
        ``score`` (unit) float32
            mean probability inside the mask, in [0, 1].
        ``accepted`` (unit) bool
            all True (a classifier may overrule).
        ``seed_y``, ``seed_x`` (unit) int64
            the mask's pixel of highest probability (first in raster order on ties).
        ``cnn_probability`` (y, x) float32
            the probability map.

    Raises
    ------
    InputError
        ``masks`` is not 3-D, its ``(y, x)`` differs from ``prob``'s, a mask
        is empty, or ``prob`` is not a valid probability map.
    """
    p = _probability(prob)
    m = np.asarray(masks.values if isinstance(masks, xr.DataArray) else masks)
    if m.ndim != 3 or m.shape[1:] != p.shape:
        raise InputError(
            f"masks must be (unit, y, x) with (y, x) = {p.shape} like the probability map, "
            f"got shape {m.shape}; pass the masks found on this map."
        )
    m = m.astype(bool, copy=False)
    sm = SparseMasks.from_dense(m)
    empty = np.flatnonzero(sm.areas == 0)
    if empty.size:
        raise InputError(
            f"{empty.size} mask(s) are empty (first: unit {int(empty[0])}); drop empty masks first."
        )
    flat = p.ravel()
    n = sm.n
    score = np.zeros(n)
    seed = np.zeros(n, dtype=np.int64)
    if n:
        indptr, indices = sm.matrix.indptr, sm.matrix.indices
        values = flat[indices]
        score = np.add.reduceat(values, indptr[:-1]) / sm.areas
        seed = np.array(
            [indices[a + int(np.argmax(values[a:b]))] for a, b in zip(indptr[:-1], indptr[1:], strict=True)],
            dtype=np.int64,
        )
    order = np.argsort(-score, kind="stable")
    sy, sx = np.divmod(seed[order], p.shape[1])
    coords: dict[str, xr.DataArray] = {}
    if isinstance(prob, xr.DataArray):
        coords = {d: prob.coords[d] for d in ("y", "x") if d in prob.coords}
    return xr.Dataset(
        {
            "masks": (("unit", "y", "x"), m[order]),
            "score": (("unit",), np.clip(score[order], 0.0, 1.0).astype(np.float32)),
            "accepted": (("unit",), np.ones(n, dtype=bool)),
            "seed_y": (("unit",), sy.astype(np.int64)),
            "seed_x": (("unit",), sx.astype(np.int64)),
            "cnn_probability": (("y", "x"), p.astype(np.float32)),
        },
        coords=coords,
    )


def _finite_image(arr: np.ndarray | xr.DataArray, name: str) -> np.ndarray:
    """(y, x) float64 copy of a finite 2-D image."""
    if isinstance(arr, xr.DataArray):
        if tuple(arr.dims) != ("y", "x"):
            raise InputError(f"{name} must have dims ('y', 'x'), got {tuple(arr.dims)}; transpose it.")
        arr = arr.values
    img = np.asarray(arr, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"{name} must be a 2-D (y, x) image, got shape {img.shape}.")
    if not np.isfinite(img).all():
        raise InputError(f"{name} holds NaN or infinite values; recompute it.")
    return img


def _probability(prob: np.ndarray | xr.DataArray) -> np.ndarray:
    """(y, x) float64 probability map, validated to lie in [0, 1]."""
    p = _finite_image(prob, "the probability map")
    if p.size and (p.min() < -_PROB_TOL or p.max() > 1 + _PROB_TOL):
        raise InputError(
            f"the probability map spans [{p.min():.3g}, {p.max():.3g}], outside [0, 1]; pass the "
            "softmax probability of the neuron class, not the logits."
        )
    return np.clip(p, 0.0, 1.0)

