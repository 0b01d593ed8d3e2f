"""Perona–Malik anisotropic diffusion, its noise scale (:func:`difference_noise_sd`).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from somaflow.preprocess.filters.frames import _like, _per_frame, whole_frames
from somaflow.preprocess.filters.params import PeronaMalikParams
from somaflow.robust import robust_sd


def perona_malik(movie: xr.DataArray, params: PeronaMalikParams) -> xr.DataArray:
    """Perona–Malik anisotropic diffusion of every frame (sc-CNMF's denoising).

    Explicit scheme on the 4-neighbourhood, zero flux across the frame's
    border::

        I ← I + λ Σ_{d ∈ N,S,E,W} c(∇_d I) ∇_d I,   c(g) = exp(−(g / κ)²)

    with ``∇_d I`` the difference to the neighbour in direction d, so flat,
    noisy regions are smoothed while differences well above κ (edges) barely
    diffuse. κ is ``params.kappa`` or, when None, estimated per frame from
    the input frame (see :class:`PeronaMalikParams`); a frame whose
    estimated noise is 0 (e.g. constant) is returned unchanged. All frames
    of a chunk are updated together (vectorised).

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), any real dtype, dask- or numpy-backed.
    params : PeronaMalikParams
        Stage parameters.

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32 in movie units, lazy; coords and attrs of ``movie``.

    Raises
    ------
    InputError
        Wrong dims or dtype, or an empty movie.
    """
    data = whole_frames(movie, "perona_malik")
    out = _per_frame(
        _perona_malik_block, data, n_iter=int(params.n_iter), step=float(params.step),
        kappa=None if params.kappa is None else float(params.kappa), kappa_factor=float(params.kappa_factor),
    )
    return _like(out, movie)


def difference_noise_sd(frames: np.ndarray) -> np.ndarray:
    """Robust SD of each frame's neighbour differences.

    Parameters
    ----------
    frames : numpy.ndarray
        (t, y, x) real.

    Returns
    -------
    numpy.ndarray
        (t,) float64: 1.4826 × the median absolute deviation of all vertical
        and horizontal neighbour differences of each frame; for white noise
        of SD σ this is ≈ √2 σ. 0 for frames of a single pixel.
    """
    frames = np.asarray(frames, dtype=np.float32)
    t = frames.shape[0]
    diffs = np.concatenate(
        [np.diff(frames, axis=1).reshape(t, -1), np.diff(frames, axis=2).reshape(t, -1)], axis=1
    )
    if diffs.shape[1] == 0:
        return np.zeros(t)
    return robust_sd(diffs, axis=1).astype(np.float64)


def _perona_malik_block(
    block: np.ndarray, *, n_iter: int, step: float, kappa: float | None, kappa_factor: float
) -> np.ndarray:
    """(t, y, x) → (t, y, x) float32 after ``n_iter`` Perona–Malik steps."""
    u = block.astype(np.float32, copy=True)
    t = u.shape[0]
    k = np.full(t, kappa) if kappa is not None else kappa_factor * difference_noise_sd(u)
    active = k > 0
    inv_k = np.where(active, 1.0 / np.where(active, k, 1.0), 0.0).astype(np.float32)[:, None, None]
    gate = active.astype(np.float32)[:, None, None]  # no diffusion at all where kappa is 0
    lam = np.float32(step)
    for _ in range(n_iter):
        gy = np.diff(u, axis=1)  # u[y+1] − u[y]
        gx = np.diff(u, axis=2)
        fy = gate * np.exp(-np.square(gy * inv_k)) * gy
        fx = gate * np.exp(-np.square(gx * inv_k)) * gx
        div = np.zeros_like(u)
        div[:, :-1] += fy
        div[:, 1:] -= fy
        div[:, :, :-1] += fx
        div[:, :, 1:] -= fx
        u += lam * div
    return u

