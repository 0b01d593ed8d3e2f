"""Spatial fields: smooth random textures, neuropil patches, vessels, vignetting, blobs."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import expit


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise with zero mean and unit standard deviation.

    Filtering is done in the Fourier domain (periodic boundaries), so the cost
    does not grow with ``sigma``.

    Parameters
    ----------
    shape : (int, int)
        (y, x) size in pixels.
    sigma : float
        Correlation length (Gaussian sigma) in pixels.

    Returns
    -------
    ndarray, float32, ``shape``
    """
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    out = np.fft.irfft2(np.fft.rfft2(noise) * transfer, s=shape)
    out -= out.mean()
    sd = out.std()
    return (out / (sd if sd > 0 else 1.0)).astype(np.float32)


def neuropil_patches(
    rng: np.random.Generator, shape: tuple[int, int], k: int, scale: float
) -> np.ndarray:
    """``k`` smooth, non-negative weight maps that sum to about 1 at every pixel.

    A soft partition of the frame into regions of size ``~scale`` pixels; each
    region's neuropil fluctuates with its own time course.

    Returns
    -------
    ndarray, (k, y, x) float32
    """
    logits = np.stack([smooth_field(rng, shape, scale) for _ in range(k)])
    logits *= 2.0
    logits -= logits.max(axis=0, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=0, keepdims=True)
    return w.astype(np.float32)


def vessel_map(
    rng: np.random.Generator, shape: tuple[int, int], n: int, width: float
) -> np.ndarray:
    """Blood vessels as smooth random curves crossing the frame, in [0, 1].

    Parameters
    ----------
    n : int
        Number of vessels.
    width : float
        Typical vessel width in pixels (each vessel's is drawn in [0.6, 1.4] x width).

    Returns
    -------
    ndarray, (y, x) float32
        1 at a vessel's centre line, falling smoothly to 0 outside it.
    """
    out = np.zeros(shape, dtype=np.float32)
    h, w = shape
    for _ in range(n):
        acc = np.zeros(shape, dtype=np.float32)
        side = rng.integers(4)
        start = [(0.0, rng.uniform(0, w)), (h - 1.0, rng.uniform(0, w)),
                 (rng.uniform(0, h), 0.0), (rng.uniform(0, h), w - 1.0)][side]  # fmt: skip
        heading = [np.pi / 2, -np.pi / 2, 0.0, np.pi][side] + rng.uniform(-0.6, 0.6)
        n_steps = int(3 * (h + w))
        turns = np.cumsum(rng.normal(0, 0.04, n_steps))
        angles = heading + turns
        y = start[0] + np.cumsum(np.sin(angles) * 0.5)
        x = start[1] + np.cumsum(np.cos(angles) * 0.5)
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        idx_in = np.flatnonzero(inside)
        if idx_in.size == 0:
            continue
        s0 = idx_in[0]
        outs = np.flatnonzero(~inside[s0:])
        seg = slice(s0, s0 + outs[0] if outs.size else n_steps)
        yy = np.clip(np.round(y[seg]).astype(int), 0, h - 1)
        xx = np.clip(np.round(x[seg]).astype(int), 0, w - 1)
        acc[yy, xx] = 1.0
        vw = width * rng.uniform(0.6, 1.4)
        acc = ndimage.distance_transform_edt(acc == 0).astype(np.float32)
        out = np.maximum(out, expit((vw / 2 - acc) / 0.7).astype(np.float32))
    return out


def vignette(shape: tuple[int, int], strength: float) -> np.ndarray:
    """Quadratic radial fall-off: 1 at the centre, ``1 - strength`` at the corners.

    Returns
    -------
    ndarray, (y, x) float32
    """
    y = np.arange(shape[0]) - (shape[0] - 1) / 2
    x = np.arange(shape[1]) - (shape[1] - 1) / 2
    r2 = (y[:, None] ** 2 + x[None, :] ** 2) / ((shape[0] - 1) ** 2 / 4 + (shape[1] - 1) ** 2 / 4)
    return (1.0 - strength * r2).astype(np.float32)


def render_blobs(
    centers: np.ndarray, sigmas: np.ndarray, amplitudes: np.ndarray, shape: tuple[int, int]
) -> np.ndarray:
    """Sum of isotropic Gaussian blobs, frame by frame, as a batched outer product.

    Parameters
    ----------
    centers : ndarray, (B, K, 2)
        Blob centres (y, x) in pixels for each of B frames.
    sigmas : ndarray, (K,)
        Blob widths in pixels.
    amplitudes : ndarray, (B, K)
        Peak brightness per frame, photons.
    shape : (int, int)

    Returns
    -------
    ndarray, (B, y, x) float32
    """
    y = np.arange(shape[0], dtype=np.float32)
    x = np.arange(shape[1], dtype=np.float32)
    s = sigmas.astype(np.float32)[None, :, None]
    gy = np.exp(-0.5 * ((y[None, None, :] - centers[..., 0:1]) / s) ** 2)
    gx = np.exp(-0.5 * ((x[None, None, :] - centers[..., 1:2]) / s) ** 2)
    gy *= amplitudes[..., None].astype(np.float32)
    return np.matmul(gy.transpose(0, 2, 1), gx).astype(np.float32)
