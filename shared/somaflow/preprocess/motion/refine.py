"""Gauss–Newton refinement of the piecewise displacement field against the template.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from somaflow.preprocess.motion.geometry import _filter, _Geometry
from somaflow.preprocess.motion.params import _REFINE_RIDGE, MotionParams


@dataclass(frozen=True, eq=False)
class _RefineRef:
    """The template as the whole-field refinement uses it (binned pixels)."""

    tmpl: np.ndarray  # (Yp, Xp) high-passed template
    grad: np.ndarray  # (2, Yp, Xp) its gradient along y, x
    prods: np.ndarray  # (3, Yp, Xp) gradient products yy, yx, xx
    highpass: float  # σ of the high-pass (binned px)
    margin: float  # pixels sampled closer than this to the frame's edge are ignored


def _refine_reference(tmpl: np.ndarray, p: MotionParams, geom: _Geometry) -> _RefineRef:
    """High-passed template, its gradient and the gradient products, see :func:`_refine_field`."""
    highpass = p.refine_highpass / geom.k
    tf = _filter(tmpl[None], highpass)[0]
    grad = np.stack(np.gradient(tf)).astype(np.float32)
    prods = np.stack([grad[0] * grad[0], grad[0] * grad[1], grad[1] * grad[1]])
    return _RefineRef(tf, grad, prods, highpass, margin=2.0)


def _refine_field(
    frames: np.ndarray,
    rigid: np.ndarray,
    dev: np.ndarray,
    fixed: np.ndarray,
    ref: _RefineRef,
    geom: _Geometry,
    iterations: int,
) -> np.ndarray:
    """Gauss-Newton (Lucas-Kanade) refinement of the whole displacement field.

    The field is parameterised exactly as it is applied: its values at the
    patch centres, interpolated by the spline matrices ``geom.interp``. Each
    iteration warps the high-passed frame with the current field (bilinear,
    pixels sampled within ``ref.margin`` of the edge ignored), and solves the
    linearised least-squares problem ``min ||warped - T - ∇T · (M δ)||²`` over
    all pixels jointly, where ``T`` is the high-passed template and ``M`` the
    spline basis; ``field -= δ``. The Jacobian uses the template's gradient, so
    its only per-frame part is the validity mask. Parameters of patches that
    fell back to the rigid shift are held fixed (a large damping), the others
    get a small relative damping (:data:`_REFINE_RIDGE`).

    Parameters
    ----------
    frames : ndarray, (n, Yp, Xp) float32
        Binned, mean-subtracted frames.
    rigid : ndarray, (n, 2)
        Rigid shifts (binned px).
    dev : ndarray, (n, gy, gx, 2)
        Starting deviations from ``rigid`` at the patch centres (binned px).
    fixed : ndarray, (n, gy, gx) bool
        Patches whose value is not refined.
    ref, geom
        Template data and geometry.
    iterations : int
        Gauss-Newton steps.

    Returns
    -------
    ndarray, (n, gy, gx, 2) float64
        Refined deviations, clipped to ``max_deviation``.
    """
    n, ny, nx = frames.shape
    gy, gx = dev.shape[1:3]
    g = gy * gx
    my, mx = geom.interp
    my2 = (my[:, :, None] * my[:, None, :]).reshape(ny, gy * gy)
    mx2 = (mx[:, :, None] * mx[:, None, :]).reshape(nx, gx * gx)
    ff = _filter(frames, ref.highpass)
    field = rigid[:, None, None, :] + dev
    yy = np.arange(ny, dtype=np.float32)[:, None]
    xx = np.arange(nx, dtype=np.float32)[None, :]
    m = ref.margin
    damping = np.where(fixed.reshape(n, g), 1e6, _REFINE_RIDGE)
    damping = np.concatenate([damping, damping], axis=1)  # (n, 2g): y block, x block
    diag_idx = np.arange(2 * g)
    warped = np.empty_like(ff)
    for _ in range(iterations):
        dense = my @ np.moveaxis(field.astype(np.float32), -1, 1) @ mx.T  # (n, 2, Y, X)
        dense[:, 0] += yy
        dense[:, 1] += xx
        for b in range(n):
            ndimage.map_coordinates(ff[b], dense[b], output=warped[b], order=1, mode="nearest")
        valid = (
            (dense[:, 0] >= m)
            & (dense[:, 0] <= ny - 1 - m)
            & (dense[:, 1] >= m)
            & (dense[:, 1] <= nx - 1 - m)
        ).astype(np.float32)
        del dense
        r = valid * (warped - ref.tmpl)
        # J^T r, (n, 2, gy, gx): the gradient times the residual, projected on the basis
        jtr = np.stack(
            [
                np.matmul(my.T, ((r * ref.grad[c]).reshape(n * ny, nx) @ mx).reshape(n, ny, gx))
                for c in range(2)
            ],
            axis=1,
        )
        # J^T J, (n, 2g, 2g): blocks yy, yx, xx of sum w g_a g_b my_i my_k mx_j mx_l
        h = np.empty((n, 2, g, 2, g), dtype=np.float64)
        for c, (a, b2) in enumerate(((0, 0), (0, 1), (1, 1))):
            blk = ((valid * ref.prods[c]).reshape(n * ny, nx) @ mx2).reshape(n, ny, gx * gx)
            blk = np.matmul(my2.T, blk).reshape(n, gy, gy, gx, gx)
            blk = blk.transpose(0, 1, 3, 2, 4).reshape(n, g, g)
            h[:, a, :, b2, :] = blk
            if a != b2:
                h[:, b2, :, a, :] = np.swapaxes(blk, 1, 2)
        h = h.reshape(n, 2 * g, 2 * g)
        scale = np.einsum("nii->n", h)[:, None] / (2 * g) + np.finfo(np.float32).tiny
        h[:, diag_idx, diag_idx] += scale * damping
        step = np.linalg.solve(h, jtr.reshape(n, 2 * g, 1).astype(np.float64))[..., 0]
        step = np.moveaxis(step.reshape(n, 2, gy, gx), 1, -1)
        dev = np.clip(field - step - rigid[:, None, None, :], -geom.max_dev, geom.max_dev)
        field = rigid[:, None, None, :] + dev
    return field - rigid[:, None, None, :]


def _warp(
    frames: np.ndarray, field: np.ndarray, interp: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Frames sampled bilinearly at ``(y, x) + spline(field)``, edges clamped, float32.

    ``field`` is (n, gy, gx, 2) displacement at the patch centres; ``interp`` the
    (Y, gy) and (X, gx) spline weights.
    """
    n, ny, nx = frames.shape
    my, mx = interp
    dense = my @ np.moveaxis(field.astype(np.float32), -1, 1) @ mx.T  # (n, 2, Y, X)
    dense[:, 0] += np.arange(ny, dtype=np.float32)[:, None]
    dense[:, 1] += np.arange(nx, dtype=np.float32)[None, :]
    out = np.empty_like(frames)
    for b in range(n):
        ndimage.map_coordinates(frames[b], dense[b], output=out[b], order=1, mode="nearest")
    return out

