"""Training crops and augmentation: :func:`random_crops`, :func:`augment`.
"""

from __future__ import annotations

import numpy as np

from somaflow.errors import InputError, ParameterError


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    py, px = max(0, size - a.shape[-2]), max(0, size - a.shape[-1])
    if not (py or px):
        return a
    return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, py), (0, px)])


def random_crops(
    x: np.ndarray,
    y: np.ndarray,
    size: int,
    n: int,
    rng: np.random.Generator,
    *,
    positive_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Random square crops of an input and its target, at the same place.

    Parameters
    ----------
    x : numpy.ndarray
        (..., H, W) input (channels and/or frames first).
    y : numpy.ndarray
        (H, W) target (or (H, W) weights).
    size : int
        Crop side (px). Frames smaller than that are zero-padded at their
        bottom/right first.
    n : int
        Number of crops.
    rng : numpy.random.Generator
    positive_fraction : float
        Fraction of the crops (rounded per crop at random) that contain a
        target pixel > 0: the crop is placed so a random positive pixel lies
        in it, uniformly at any position. The rest are placed uniformly at
        random. Without positive pixels every crop is uniform.

    Returns
    -------
    xs : numpy.ndarray
        (n, ..., size, size), ``x``'s dtype.
    ys : numpy.ndarray
        (n, size, size), ``y``'s dtype.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 2 or x.shape[-2:] != y.shape:
        raise InputError(
            f"random_crops needs x (..., H, W) and y (H, W) on the same grid; got {x.shape}, {y.shape}."
        )
    if size < 1 or n < 0:
        raise ParameterError(f"random_crops: size must be ≥ 1 and n ≥ 0, got size={size}, n={n}.")
    x, y = _pad_to(x, size), _pad_to(y, size)
    ny, nx = y.shape
    pos = np.argwhere(y > 0)
    xs = np.empty((n,) + x.shape[:-2] + (size, size), x.dtype)
    ys = np.empty((n, size, size), y.dtype)
    for i in range(n):
        if len(pos) and rng.random() < positive_fraction:
            py, px = pos[rng.integers(len(pos))]
            y0 = int(rng.integers(max(0, py - size + 1), min(py, ny - size) + 1))
            x0 = int(rng.integers(max(0, px - size + 1), min(px, nx - size) + 1))
        else:
            y0 = int(rng.integers(0, ny - size + 1))
            x0 = int(rng.integers(0, nx - size + 1))
        xs[i] = x[..., y0 : y0 + size, x0 : x0 + size]
        ys[i] = y[y0 : y0 + size, x0 : x0 + size]
    return xs, ys


def augment(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random element of the square's symmetry group, applied to input and target alike.

    A rotation by ``k · 90°`` (k uniform in 0..3) of the last two axes,
    then a left-right flip with probability 1/2: the 8 rotations and
    reflections of STNeuroNet's and Apthorpe's augmentation, equally likely.

    Parameters
    ----------
    x : numpy.ndarray
        (..., H, W).
    y : numpy.ndarray
        (..., H, W) — the same H, W.
    rng : numpy.random.Generator

    Returns
    -------
    x, y : numpy.ndarray
        Contiguous copies; H and W swap for odd k when they differ.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[-2:] != y.shape[-2:]:
        raise InputError(
            f"augment needs x and y on the same (H, W) grid, got {x.shape} and {y.shape}."
        )
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    xo, yo = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    if flip:
        xo, yo = xo[..., ::-1], yo[..., ::-1]
    return np.ascontiguousarray(xo), np.ascontiguousarray(yo)

