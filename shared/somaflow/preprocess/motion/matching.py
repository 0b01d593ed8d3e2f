"""Shift estimation of a block of frames: whitened cross-correlation against the template,
coarse and sub-pixel peaks, per patch for piecewise registration.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

from somaflow.preprocess.motion.geometry import (
    _Geometry,
    _geometry,
    _multiplicity,
    _taper,
    _taper2d,
)
from somaflow.preprocess.motion.params import _BATCH_BYTES, _PATCH_ROUNDS, MotionParams
from somaflow.preprocess.motion.refine import _refine_field, _refine_reference, _warp


def _estimate_block(block: np.ndarray, template: np.ndarray, *, p: MotionParams) -> np.ndarray:
    """``blockwise`` kernel: packed shifts of one frame chunk, see :func:`_estimate_frames`."""
    return _estimate_frames(block, template, p)


def _estimate_frames(frames: np.ndarray, template: np.ndarray, p: MotionParams) -> np.ndarray:
    """Register frames to a template.

    Parameters
    ----------
    frames : ndarray, (n, Y, X) real
    template : ndarray, (Y, X) real
    p : MotionParams
        ``mode`` is ``"rigid"`` or ``"piecewise"``.

    Returns
    -------
    ndarray, (n, 3) or (n, 3 + 3 gy gx) float32
        Per frame: rigid (dy, dx) px (piecewise: the field's spatial mean),
        whole-frame peak height, then for every patch (row-major) its (dy, dx)
        px and a fallback flag (1.0 = rigid used).
    """
    geom = _geometry(p, frames.shape[1:])
    tmpl = _bin(np.asarray(template, dtype=np.float32)[None], geom.k)[0]
    tmpl -= tmpl.mean()
    tspec = np.conj(scipy.fft.rfft2(tmpl * _taper2d(geom.pshape, geom.ramp)))
    piecewise = p.mode == "piecewise"
    if piecewise:
        tpatch = _patches(tmpl[None], geom)[0]
        tpatch -= tpatch.mean(axis=(-2, -1), keepdims=True)
        tpatch_spec = np.conj(scipy.fft.rfft2(tpatch * _taper2d(geom.patch, geom.patch_ramp)))
        energy = np.einsum("ijyx,yx->ij", np.abs(tpatch_spec) ** 2, geom.patch_weight)
        flat = energy < p.min_patch_contrast * np.median(energy)
        refine = _refine_reference(tmpl, p, geom) if p.refine_iterations else None
    gy, gx = len(geom.starts[0]), len(geom.starts[1])
    n_frames = frames.shape[0]
    out = np.zeros((n_frames, 3 + (3 * gy * gx if piecewise else 0)), dtype=np.float32)
    yp, xp = geom.pshape
    overlap = (gy * geom.patch[0] * gx * geom.patch[1]) / (yp * xp) if piecewise else 0.0
    refine_arrays = 8 if (piecewise and p.refine_iterations) else 0
    per_frame = yp * xp * 4 * (6 + 3 * overlap + refine_arrays) * geom.k**2
    batch = max(1, int(_BATCH_BYTES // per_frame))
    for b0 in range(0, n_frames, batch):
        sl = slice(b0, min(b0 + batch, n_frames))
        fb = _bin(np.asarray(frames[sl], dtype=np.float32), geom.k)
        fb -= fb.mean(axis=(1, 2), keepdims=True)
        n = fb.shape[0]
        rigid, peak = _match(
            fb,
            tspec,
            geom.weight,
            geom.ramp,
            np.zeros((n, 2)),
            geom.radius,
            p.upsample_factor,
            p.whitening,
            follow=True,
        )
        rigid = np.clip(rigid, -geom.max_shift, geom.max_shift)
        out[sl, :2] = rigid * geom.k
        out[sl, 2] = peak
        if not piecewise:
            continue
        dev, ppeak = _patch_deviations(fb, tpatch_spec, rigid, geom, p)
        fallback = flat[None] | (ppeak < p.min_patch_correlation * peak[:, None, None])
        dev[fallback] = 0.0
        if refine is not None:
            dev = _refine_field(fb, rigid, dev, fallback, refine, geom, p.refine_iterations)
        total = rigid[:, None, None, :] + dev
        # the rigid part of a piecewise estimate is the spatial mean of its field
        out[sl, :2] = geom.k * np.einsum("nijc,i,j->nc", total, *(m.mean(axis=0) for m in geom.interp))
        packed = np.concatenate([total * geom.k, fallback[..., None].astype(np.float64)], axis=-1)
        out[sl, 3:] = packed.reshape(n, -1)
    return out


def _match(
    images: np.ndarray,
    tconj: np.ndarray,
    weight: np.ndarray,
    ramp: tuple[int, int],
    guess: np.ndarray,
    radius: int,
    upsample_factor: int,
    whitening: float,
    follow: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Shift of each image relative to its template, within ``radius`` of a guess.

    The templates are expected tapered with the same border taper at shift 0.
    Each image's taper is placed at the guess; with ``follow`` a second pass
    repeats the match with the taper moved by the first estimate, so that both
    tapers sit on the same content and the windowed correlation is symmetric
    about the true shift (a taper fixed in the frame biases the shift toward
    the guess).

    Parameters
    ----------
    images : ndarray, (..., H, W) float32
        Mean-subtracted images.
    tconj : ndarray, complex, broadcastable to (..., H, W//2+1)
        Conjugate spectra of the tapered templates.
    weight : ndarray, (H, W//2+1) float32
        Band-pass.
    ramp : (int, int)
        Taper widths along each axis.
    guess : ndarray, (..., 2) float
        Expected shifts (px).
    radius : int
        Integer search radius around the rounded guess in the first pass.
    upsample_factor : int
        Sub-pixel steps per pixel.
    whitening : float
        Exponent of the cross-power normalisation, see :func:`_whiten`.
    follow : bool
        Run the second pass with the taper moved by the first estimate.

    Returns
    -------
    shifts : ndarray, (..., 2) float64
    peak : ndarray, (...) float64
        Normalised correlation peak, see :func:`_refine_peak`.
    """
    lead, shape = images.shape[:-2], images.shape[-2:]
    est = np.asarray(guess, dtype=np.float64).reshape(-1, 2)
    centre = np.round(est).astype(np.int64)
    passes = (min(upsample_factor, 4), upsample_factor) if follow else (upsample_factor,)
    for upsample in passes:
        wy = _taper(shape[0], ramp[0], est[:, 0]).reshape(*lead, shape[0], 1)
        wx = _taper(shape[1], ramp[1], est[:, 1]).reshape(*lead, 1, shape[1])
        rw = _whiten(scipy.fft.rfft2(images * wy * wx) * tconj, weight, whitening)
        rw = rw.reshape(-1, *rw.shape[-2:])
        coarse = _coarse_peak(rw, shape, centre, radius)
        est, peak = _refine_peak(rw, shape, coarse, upsample)
        centre, radius = np.round(est).astype(np.int64), 1
        del rw
    return est.reshape(*lead, 2), peak.reshape(lead)


def _bin(frames: np.ndarray, k: int) -> np.ndarray:
    """Mean over k x k pixel blocks, (n, Y, X) -> (n, Y // k, X // k) float32 (a copy)."""
    if k == 1:
        return np.array(frames, dtype=np.float32, copy=True)
    n, ny, nx = frames.shape
    yk, xk = ny // k, nx // k
    cut = frames[:, : yk * k, : xk * k].reshape(n, yk, k, xk, k)
    return cut.mean(axis=(2, 4), dtype=np.float32)


def _patches(frames: np.ndarray, geom: _Geometry) -> np.ndarray:
    """All patches of each frame, (n, Y, X) -> (n, gy, gx, Py, Px) float32 (a copy)."""
    (sy, sx), (py, px) = geom.starts, geom.patch
    rows = sy[:, None] + np.arange(py)  # (gy, py)
    cols = sx[:, None] + np.arange(px)  # (gx, px)
    return frames[:, rows[:, None, :, None], cols[None, :, None, :]]


def _patch_deviations(
    frames: np.ndarray,
    tpatch_spec: np.ndarray,
    rigid: np.ndarray,
    geom: _Geometry,
    p: MotionParams,
) -> tuple[np.ndarray, np.ndarray]:
    """Deviation of every patch's shift from the rigid shift, refined by warping.

    A patch match measures the displacement averaged over the patch, weighted by
    its texture; where the field varies within a patch that is not the value at
    the centre (it flattens the field by ~20 % for fields that vary over a few
    patches). So the estimate is refined: the frame is warped with the current
    field (bilinear, on the binned grid), the residual displacement of every
    patch is measured and added, :data:`_PATCH_ROUNDS` times; the residual
    shrinks each round, and with it the averaging error.

    Parameters
    ----------
    frames : ndarray, (n, Yp, Xp) float32
        Binned, mean-subtracted frames.
    tpatch_spec : ndarray, (gy, gx, Py, Px//2+1) complex
        Conjugate spectra of the template's tapered patches.
    rigid : ndarray, (n, 2)
        Rigid shifts (binned px).
    geom, p
        Geometry and parameters.

    Returns
    -------
    dev : ndarray, (n, gy, gx, 2) float64
        Deviation from ``rigid`` at each patch centre (binned px), clipped to
        ``max_deviation``.
    peak : ndarray, (n, gy, gx) float64
        Normalised correlation peak of each patch in the last round.
    """
    n = frames.shape[0]
    gy, gx = len(geom.starts[0]), len(geom.starts[1])
    field = np.broadcast_to(rigid[:, None, None, :], (n, gy, gx, 2)).astype(np.float64)
    radius = geom.dev_radius
    for _ in range(_PATCH_ROUNDS):
        patches = _patches(_warp(frames, field, geom.interp), geom)
        patches -= patches.mean(axis=(-2, -1), keepdims=True)
        res, peak = _match(
            patches,
            tpatch_spec,
            geom.patch_weight,
            geom.patch_ramp,
            np.zeros((n, gy, gx, 2)),
            radius,
            p.upsample_factor,
            p.patch_whitening,
            follow=False,
        )
        del patches
        dev = np.clip(field + res - rigid[:, None, None, :], -geom.max_dev, geom.max_dev)
        field = rigid[:, None, None, :] + dev
        radius = min(radius, 2)
    return field - rigid[:, None, None, :], peak


def _whiten(cross: np.ndarray, weight: np.ndarray, exponent: float) -> np.ndarray:
    """Cross-power spectrum divided by its magnitude ** exponent, times the band-pass (complex64)."""
    mag = np.abs(cross) ** exponent
    eps = 1e-6 * mag.mean(axis=(-2, -1), keepdims=True) + np.finfo(np.float32).tiny
    return (cross / (mag + eps) * weight).astype(np.complex64, copy=False)


def _coarse_peak(
    rw: np.ndarray, shape: tuple[int, int], centre: np.ndarray, radius: int
) -> np.ndarray:
    """Integer argmax of the correlation within ``radius`` of ``centre``.

    ``rw`` is (n, Y, X//2+1) (weighted, whitened cross-power); ``centre`` (n, 2) int.
    Returns (n, 2) int64 shifts (unwrapped, i.e. possibly negative).
    """
    corr = scipy.fft.irfft2(rw, s=shape)
    n = corr.shape[0]
    d = np.arange(-radius, radius + 1)
    rows = (centre[:, :1] + d) % shape[0]  # (n, w)
    cols = (centre[:, 1:] + d) % shape[1]
    win = corr[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    flat = win.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, win.shape[1:])
    return centre + np.stack([d[iy], d[ix]], axis=1)


def _refine_peak(
    rw: np.ndarray, shape: tuple[int, int], coarse: np.ndarray, upsample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel peak by an upsampled DFT around the integer peak.

    The correlation is evaluated on a (U, U) grid of step ``1/upsample`` px
    spanning ±0.75 px around ``coarse`` (Guizar-Sicairos et al. 2008), directly
    from the half spectrum ``rw`` with two batched matrix products.

    Returns
    -------
    shifts : ndarray, (n, 2) float64
    peak : ndarray, (n,) float64
        Correlation at the peak over its largest possible value (all phases
        aligned), in [-1, 1]; 1 for a perfect match.
    """
    half = math.ceil(0.75 * upsample) if upsample > 1 else 0
    off = np.arange(-half, half + 1) / upsample
    fy = np.fft.fftfreq(shape[0])
    fx = np.fft.rfftfreq(shape[1])
    py = coarse[:, :1] + off  # (n, U)
    px = coarse[:, 1:] + off
    ky = np.exp(2j * np.pi * py[:, :, None] * fy).astype(np.complex64)  # (n, U, Y)
    kx = np.exp(2j * np.pi * px[:, None, :] * fx[:, None]) * _multiplicity(shape[1])[:, None]
    kx = kx.astype(np.complex64)  # (n, Xh, U): the half spectrum stands for the full one
    corr = np.real(ky @ rw @ kx)  # (n, U, U)
    # every phase aligned would give the sum of the magnitudes: peaks are in [-1, 1]
    bound = np.einsum("nyx,x->n", np.abs(rw), _multiplicity(shape[1]).astype(np.float32))
    n, u = corr.shape[0], corr.shape[1]
    flat = corr.reshape(n, -1).argmax(axis=1)
    iy, ix = np.unravel_index(flat, (u, u))
    rows = np.arange(n)
    shifts = np.stack([py[rows, iy], px[rows, ix]], axis=1)
    if u >= 3:
        # a parabola through the fine-grid maximum and its two neighbours, per axis
        step = np.arange(-1, 2)
        iyc, ixc = np.clip(iy, 1, u - 2), np.clip(ix, 1, u - 2)
        along_y = corr[rows[:, None], iyc[:, None] + step, ix[:, None]]
        along_x = corr[rows[:, None], iy[:, None], ixc[:, None] + step]
        for axis, (i, ic, tri) in enumerate(((iy, iyc, along_y), (ix, ixc, along_x))):
            lo, mid, hi = tri.T
            curvature = lo - 2 * mid + hi
            ok = (i == ic) & (curvature < 0)
            frac = np.where(ok, 0.5 * (lo - hi) / np.where(ok, curvature, -1.0), 0.0)
            shifts[:, axis] += np.clip(frac, -0.5, 0.5) / upsample
    return shifts, corr.reshape(n, -1)[rows, flat] / np.maximum(bound, np.finfo(np.float32).tiny)

