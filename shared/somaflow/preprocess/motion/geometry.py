"""Patch geometry of piecewise registration: patch grid, tapers, band-pass, spline interpolation
of the patch shifts.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from somaflow.errors import ParameterError
from somaflow.preprocess.motion.params import MotionParams


@dataclass(frozen=True, eq=False)
class _Geometry:
    """Everything about the matching that depends only on the parameters and frame size.

    Lengths are in prepared (binned) pixels unless the name says otherwise.
    """

    k: int  # binning factor
    pshape: tuple[int, int]  # binned frame shape
    max_shift: float  # largest rigid shift
    radius: int  # coarse rigid search radius
    ramp: tuple[int, int]  # width of the frame's border taper along y, x
    patch_ramp: tuple[int, int]  # width of the patches' border taper along y, x
    weight: np.ndarray  # (Yp, Xp//2+1) float32, band-pass on the rfft2 grid
    patch: tuple[int, int]  # patch shape
    starts: tuple[np.ndarray, np.ndarray]  # patch start rows / columns
    centers: tuple[np.ndarray, np.ndarray]  # patch centres, full-resolution px (float32)
    patch_weight: np.ndarray  # (Py, Px//2+1) float32
    interp: tuple[np.ndarray, np.ndarray]  # (Yp, gy), (Xp, gx) spline weights, binned grid
    max_dev: float  # largest patch deviation from rigid
    dev_radius: int  # coarse patch search radius around the rigid shift


def _geometry(p: MotionParams, shape: tuple[int, int]) -> _Geometry:
    return _geometry_cached(p, (int(shape[0]), int(shape[1])))


@functools.lru_cache(maxsize=16)
def _geometry_cached(p: MotionParams, shape: tuple[int, int]) -> _Geometry:
    k = p.downsample
    yp, xp = shape[0] // k, shape[1] // k
    if min(yp, xp) < 8:
        raise ParameterError(
            f"frames of {shape[0]}x{shape[1]} px binned by downsample={k} leave fewer than 8 px; "
            "reduce downsample."
        )
    max_shift = p.max_shift / k
    radius = int(min(math.ceil(max_shift), (yp - 1) // 2, (xp - 1) // 2))
    ramp = (_ramp_width(yp, max_shift), _ramp_width(xp, max_shift))
    weight = _bandpass((yp, xp), p.smooth_sigma / k, p.highpass_sigma / k)

    py, px = min(p.patch_size // k, yp), min(p.patch_size // k, xp)
    patch_ramp = (_ramp_width(py, 0), _ramp_width(px, 0))
    stride = max(1, (p.patch_size - p.patch_overlap) // k)
    starts = (_patch_starts(yp, py, stride), _patch_starts(xp, px, stride))
    centers = tuple(
        (k * (s + (n - 1) / 2.0) + (k - 1) / 2.0).astype(np.float32)
        for s, n in zip(starts, (py, px), strict=True)
    )
    max_dev = p.max_deviation / k
    dev_radius = int(min(math.ceil(max_dev) + 1, (py - 1) // 2, (px - 1) // 2))
    patch_weight = _bandpass((py, px), p.smooth_sigma / k, p.highpass_sigma / k)
    interp = tuple(
        _spline_matrix(st + (n - 1) / 2.0, np.arange(length, dtype=np.float64))
        for st, n, length in zip(starts, (py, px), (yp, xp), strict=True)
    )
    return _Geometry(
        interp=interp,  # type: ignore[arg-type]
        k=k,
        pshape=(yp, xp),
        max_shift=max_shift,
        radius=radius,
        ramp=ramp,
        patch_ramp=patch_ramp,
        weight=weight,
        patch=(py, px),
        starts=starts,
        centers=centers,  # type: ignore[arg-type]
        patch_weight=patch_weight,
        max_dev=max_dev,
        dev_radius=dev_radius,
    )


def _patch_starts(length: int, size: int, stride: int) -> np.ndarray:
    """Start of each patch along one axis: evenly spread, the last one ending at the edge."""
    n = int(math.ceil((length - size) / stride)) + 1
    return np.round(np.linspace(0, length - size, n)).astype(np.int64)


def _ramp_width(n: int, width: float) -> int:
    """Taper ramp (px): ``width`` but at least an eighth and at most a quarter of the axis."""
    return int(max(1, min(max(math.ceil(width), n // 8), n // 4)))


def _taper(n: int, ramp: int, shift: np.ndarray) -> np.ndarray:
    """Border tapers along one axis, each moved by a (sub-pixel) shift.

    A raised-cosine ramp from 0 to 1 over ``ramp`` px at both ends of an axis of
    ``n`` px, evaluated at ``x - shift`` so it moves with the frame content
    (outside the moved axis it is 0).

    Returns
    -------
    ndarray, (len(shift), n) float32
    """
    u = np.arange(n)[None, :] - np.asarray(shift, dtype=np.float64)[:, None] + 0.5

    def rise(v: np.ndarray) -> np.ndarray:
        return 0.5 - 0.5 * np.cos(np.pi * np.clip(v / ramp, 0.0, 1.0))

    return (rise(u) * rise(n - u)).astype(np.float32)


def _taper2d(shape: tuple[int, int], ramp: tuple[int, int]) -> np.ndarray:
    """The border taper in place (shift 0), (Y, X) float32."""
    wy = _taper(shape[0], ramp[0], np.zeros(1))[0]
    wx = _taper(shape[1], ramp[1], np.zeros(1))[0]
    return np.outer(wy, wx)


def _bandpass(shape: tuple[int, int], smooth: float, highpass: float) -> np.ndarray:
    """Band-pass on the rfft2 grid (DC removed), float32."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f2 = fy**2 + fx**2
    w = np.exp(-2 * np.pi**2 * smooth**2 * f2)
    if highpass > 0:
        w = w * (1 - np.exp(-2 * np.pi**2 * highpass**2 * f2))
    w[0, 0] = 0.0
    return w.astype(np.float32)


def _multiplicity(nx: int) -> np.ndarray:
    """How often each rfft column appears in the full spectrum (1 for DC and Nyquist, else 2)."""
    mult = np.full(nx // 2 + 1, 2.0)
    mult[0] = 1.0
    if nx % 2 == 0:
        mult[-1] = 1.0
    return mult


def _spline_matrix(centers: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Interpolation weights (len(pos), len(centers)) from patch centres to positions.

    The patch-shift grid is upsampled as by ``scipy.ndimage.zoom``: a cubic
    B-spline (quadratic / linear with 3 / 2 centres, constant with 1) through
    the values at the centres, extended beyond the outermost centres with
    ``mode="nearest"`` (the grid is padded with its edge values, so the field
    levels off within about one patch spacing). Positions map to grid
    coordinates piecewise linearly between centres and linearly beyond them.
    Rows sum to 1 (a constant field stays constant).
    """
    g = len(centers)
    pos = np.asarray(pos, dtype=np.float64)
    if g == 1:
        return np.ones((len(pos), 1), dtype=np.float32)
    grid = np.arange(g, dtype=np.float64)
    u = np.interp(pos, centers, grid)
    lo, hi = pos < centers[0], pos > centers[-1]
    u[lo] = (pos[lo] - centers[0]) / (centers[1] - centers[0])
    u[hi] = g - 1 + (pos[hi] - centers[-1]) / (centers[-1] - centers[-2])
    order = min(3, g - 1)
    eye = np.eye(g)
    m = np.stack(
        [ndimage.map_coordinates(eye[j], u[None], order=order, mode="nearest") for j in range(g)],
        axis=1,
    )
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def _filter(images: np.ndarray, highpass: float) -> np.ndarray:
    """Images minus their Gaussian blur of σ ``highpass`` (mirrored at the edges), float32."""
    out = np.asarray(images, dtype=np.float32)
    if highpass > 0:
        out = out - ndimage.gaussian_filter(out, (0, highpass, highpass), mode="reflect")
    return out

