"""Applying shifts to a block of frames (rigid, or the interpolated piecewise field).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from somaflow.preprocess.motion.geometry import _spline_matrix
from somaflow.preprocess.motion.params import _BORDER_MODES, MotionParams


def _apply_block(
    block: np.ndarray,
    rigid: np.ndarray,
    patch: np.ndarray | None = None,
    *,
    p: MotionParams,
    centers: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """``blockwise`` kernel: one registered frame chunk, see :func:`_apply_frames`."""
    return _apply_frames(block, rigid, patch, p, centers)


def _apply_frames(
    frames: np.ndarray,
    rigid: np.ndarray,
    patch: np.ndarray | None,
    p: MotionParams,
    centers: tuple[np.ndarray, np.ndarray] | None,
) -> np.ndarray:
    """Resample frames at ``(y + dy, x + dx)``.

    Parameters
    ----------
    frames : ndarray, (n, Y, X) real
    rigid : ndarray, (n, 2)
        Used when ``patch`` is None.
    patch : ndarray, (n, gy, gx, 2) or None
        Patch-centre shifts; the field is the spline through ``centers``.
    p : MotionParams
        ``interpolation_order`` and ``border``.
    centers : (ndarray (gy,), ndarray (gx,)) or None
        Patch centres, px.

    Returns
    -------
    ndarray, (n, Y, X) float32
    """
    mode, cval = _BORDER_MODES[p.border]
    order = int(p.interpolation_order)
    n, ny, nx = frames.shape
    out = np.empty((n, ny, nx), dtype=np.float32)
    if patch is None:
        for b in range(n):
            ndimage.shift(
                np.asarray(frames[b], dtype=np.float32),
                -np.asarray(rigid[b], dtype=np.float64),
                output=out[b],
                order=order,
                mode=mode,
                cval=cval,
                prefilter=order > 1,
            )
        return out
    assert centers is not None
    my = _spline_matrix(np.asarray(centers[0], np.float64), np.arange(ny, dtype=np.float64))
    mx = _spline_matrix(np.asarray(centers[1], np.float64), np.arange(nx, dtype=np.float64))
    grid_y = np.arange(ny, dtype=np.float32)[:, None]
    grid_x = np.arange(nx, dtype=np.float32)[None, :]
    coords = np.empty((2, ny, nx), dtype=np.float32)
    for b in range(n):
        s = np.asarray(patch[b], dtype=np.float32)
        coords[0] = grid_y + my @ s[..., 0] @ mx.T
        coords[1] = grid_x + my @ s[..., 1] @ mx.T
        ndimage.map_coordinates(
            np.asarray(frames[b], dtype=np.float32),
            coords,
            output=out[b],
            order=order,
            mode=mode,
            cval=cval,
            prefilter=order > 1,
        )
    return out

