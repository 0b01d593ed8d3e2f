"""Rigid and non-rigid brain motion, and the warp that applies it.

Convention: a displacement ``d = (dy, dx)`` is the motion of the tissue in a
frame relative to the ground-truth (reference) coordinates, so that
``frame(y, x) = reference(y - dy, x - dx)``; registering a frame means sampling
it at ``(y + dy, x + dx)``, i.e. ``scipy.ndimage.shift(frame, -d)`` for rigid motion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from somaflow.simulate.activity import ar1_process
from somaflow.simulate.params import SimulationParams


@dataclass(frozen=True)
class Motion:
    """Displacements of one movie.

    Attributes
    ----------
    rigid : ndarray, (T, 2) float32
        Frame-wide displacement (dy, dx), px; for non-rigid motion the spatial mean
        of the full field.
    control : ndarray, (T, gy, gx, 2) float32 or None
        Non-rigid residual at the control points (patch centres), zero spatial mean;
        None for rigid or no motion.
    patch_centers : (ndarray (gy,), ndarray (gx,))
        Pixel coordinates of the control points along y and x.
    interp_y, interp_x : ndarray, (Y, gy) and (X, gx) float32
        Cubic-spline interpolation matrices from control points to pixels.
    """

    rigid: np.ndarray
    control: np.ndarray | None
    patch_centers: tuple[np.ndarray, np.ndarray]
    interp_y: np.ndarray
    interp_x: np.ndarray

    @property
    def patch_shifts(self) -> np.ndarray | None:
        """Total displacement at the control points, (T, gy, gx, 2) float32, or None."""
        if self.control is None:
            return None
        return (self.control + self.rigid[:, None, None, :]).astype(np.float32)

    def field(self, frames: slice) -> np.ndarray:
        """Dense displacement field of ``frames``, (B, 2, Y, X) float32."""
        rigid = self.rigid[frames]
        B, Y, X = rigid.shape[0], self.interp_y.shape[0], self.interp_x.shape[0]
        if self.control is None:
            out = np.empty((B, 2, Y, X), dtype=np.float32)
            out[...] = rigid[:, :, None, None]
            return out
        out = np.einsum("yi,bija,xj->bayx", self.interp_y, self.control[frames], self.interp_x, optimize=True)
        out += rigid[:, :, None, None]
        return out.astype(np.float32, copy=False)


def spline_matrix(n_fine: int, n_coarse: int) -> np.ndarray:
    """Cubic-spline interpolation weights from ``n_coarse`` patch centres to ``n_fine`` pixels.

    Patch ``i`` has its centre at pixel ``(i + 0.5) n_fine / n_coarse - 0.5``.

    Returns
    -------
    ndarray, (n_fine, n_coarse) float32
        Rows sum to 1 (constants are reproduced).
    """
    if n_coarse == 1:
        return np.ones((n_fine, 1), dtype=np.float32)
    u = (np.arange(n_fine) + 0.5) * n_coarse / n_fine - 0.5
    order = min(3, n_coarse - 1)
    cols = [
        ndimage.map_coordinates(np.eye(n_coarse)[i], [u], order=order, mode="nearest")
        for i in range(n_coarse)
    ]
    m = np.stack(cols, axis=1)
    return (m / m.sum(axis=1, keepdims=True)).astype(np.float32)


def patch_centers(n_fine: int, n_coarse: int) -> np.ndarray:
    """Pixel coordinate of each patch centre along one axis."""
    return ((np.arange(n_coarse) + 0.5) * n_fine / n_coarse - 0.5).astype(np.float32)


def simulate_motion(rng: np.random.Generator, p: SimulationParams) -> Motion:
    """Rigid jitter and movement bouts, plus a smooth non-rigid field if requested.

    The rigid part is a fast AR(1) jitter (0.3 s, sd ``p.motion_std``) plus
    movement bouts (Poisson, ``p.motion_bout_rate``) that move the tissue by up to
    ``p.max_shift`` px, hold 0.5-3 s and relax back. Its median is 0 (the
    reference position is the resting one) and it is clipped to ``p.max_shift``.
    The non-rigid part is an AR(1) (1 s) displacement at each control point,
    sd ``p.nonrigid_amplitude``, interpolated with cubic splines and with its
    spatial mean removed so that ``rigid`` is the mean displacement of the frame.
    """
    T, fps = p.n_frames, p.fps
    Y, X = p.shape
    gy, gx = p.nonrigid_grid if p.motion == "nonrigid" else (1, 1)
    iy, ix = spline_matrix(Y, gy), spline_matrix(X, gx)
    centers = (patch_centers(Y, gy), patch_centers(X, gx))
    if p.motion == "none":
        return Motion(np.zeros((T, 2), np.float32), None, centers, iy, ix)

    jitter = p.motion_std * ar1_process(rng, (2, T), 0.3 * fps).T
    bouts = np.zeros((T, 2))
    t = np.arange(T)
    n_bouts = rng.poisson(p.motion_bout_rate * T / fps)
    for _ in range(n_bouts):
        t0 = rng.uniform(0, T)
        hold = rng.uniform(0.5, 3.0) * fps
        rise, relax = 0.15 * fps, rng.uniform(0.3, 1.0) * fps
        dt = t - t0
        onset = 1 - np.exp(-np.maximum(dt, 0) / rise)
        release = (1 - np.exp(-hold / rise)) * np.exp(-np.maximum(dt - hold, 0) / relax)
        env = np.where(dt < 0, 0.0, np.where(dt < hold, onset, release))
        ang = rng.uniform(0, 2 * np.pi)
        mag = rng.uniform(0.3, 0.9) * p.max_shift
        bouts += env[:, None] * mag * np.array([np.sin(ang), np.cos(ang)])[None, :]
    rigid = jitter + bouts
    rigid -= np.median(rigid, axis=0, keepdims=True)
    rigid = np.clip(rigid, -p.max_shift, p.max_shift).astype(np.float32)

    control = None
    if p.motion == "nonrigid":
        c = p.nonrigid_amplitude * ar1_process(rng, (gy, gx, 2, T), 1.0 * fps)
        c = np.moveaxis(c, -1, 0)  # (T, gy, gx, 2)
        wy, wx = iy.mean(axis=0), ix.mean(axis=0)
        mean = np.einsum("tija,i,j->ta", c, wy, wx)
        control = (c - mean[:, None, None, :]).astype(np.float32)
    return Motion(rigid, control, centers, iy, ix)


def warp(canvas: np.ndarray, motion: Motion, frames: slice, pad: int, order: int) -> np.ndarray:
    """Apply the motion of ``frames`` to clean canvas frames and crop the field of view.

    Parameters
    ----------
    canvas : ndarray, (B, Y + 2 pad, X + 2 pad) float32
        Clean frames in tissue coordinates, with a margin of ``pad`` px.
    motion : Motion
    frames : slice
        The frames ``canvas`` holds.
    pad : int
        Margin of the canvas.
    order : int
        Spline order of the interpolation (rigid motion with order 0 or 1 takes a
        fast path of shifted slices, identical to ``map_coordinates``).

    Returns
    -------
    ndarray, (B, Y, X) float32
        Frame ``b`` sampled at ``(y + pad - dy, x + pad - dx)``.
    """
    B = canvas.shape[0]
    Y, X = canvas.shape[1] - 2 * pad, canvas.shape[2] - 2 * pad
    if motion.control is None and order <= 1:
        out = np.empty((B, Y, X), dtype=np.float32)
        for b, (dy, dx) in enumerate(motion.rigid[frames]):
            out[b] = _shift_slices(canvas[b], pad - float(dy), pad - float(dx), Y, X, order)
        return out
    field = motion.field(frames)
    gy = np.arange(Y, dtype=np.float32)[:, None] + pad
    gx = np.arange(X, dtype=np.float32)[None, :] + pad
    out = np.empty((B, Y, X), dtype=np.float32)
    for b in range(B):
        coords = np.stack([gy - field[b, 0], gx - field[b, 1]])
        out[b] = ndimage.map_coordinates(
            canvas[b], coords, order=order, mode="nearest", prefilter=order > 1
        )
    return out


def _shift_slices(img: np.ndarray, sy: float, sx: float, Y: int, X: int, order: int) -> np.ndarray:
    """``img`` sampled on the grid ``(sy + y, sx + x)`` (nearest or bilinear), edges clamped."""
    H, W = img.shape
    if order == 0:
        iy, ix = int(np.floor(sy + 0.5)), int(np.floor(sx + 0.5))
        return img[np.clip(np.arange(iy, iy + Y), 0, H - 1)][:, np.clip(np.arange(ix, ix + X), 0, W - 1)]
    iy, ix = int(np.floor(sy)), int(np.floor(sx))
    fy, fx = np.float32(sy - iy), np.float32(sx - ix)
    rows = np.clip(np.arange(iy, iy + Y + 1), 0, H - 1)
    cols = np.clip(np.arange(ix, ix + X + 1), 0, W - 1)
    if 0 <= iy and iy + Y < H and 0 <= ix and ix + X < W:
        win = img[iy : iy + Y + 1, ix : ix + X + 1]
    else:
        win = img[rows][:, cols]
    top = win[:-1, :-1] * (1 - fx) + win[:-1, 1:] * fx
    bottom = win[1:, :-1] * (1 - fx) + win[1:, 1:] * fx
    return top * (1 - fy) + bottom * fy
