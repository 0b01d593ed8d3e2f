"""Deconvolution of traces (:func:`deconvolve`): the kernel, the sparsity penalty that meets the
noise constraint, then OASIS, rows in batches.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np
from scipy.special import ndtri

from somaflow.errors import InputError
from somaflow.oasis.kernels import (
    _as_rows,
    _check_fps,
    _h,
    _kernel,
    _shift,
    _sum_h,
    _sum_h2,
    estimate_noise,
)
from somaflow.oasis.params import DeconvolutionParams, DeconvolutionResult
from somaflow.oasis.pools import _calcium, _Pools, _pools, _replace, _select

log = logging.getLogger(__name__)


#: float64 elements per batch of units solved together (bounds the memory to ~100 MiB)
_BATCH_ELEMENTS = 1 << 20

#: relative change of b and λ (in noise SDs) below which the (b, λ) iteration stops
_TOL = 1e-4


def deconvolve(trace: Any, fps: float, *, params: DeconvolutionParams | None = None) -> DeconvolutionResult:
    """Infer spikes and denoised calcium of one or many fluorescence traces (OASIS).

    Parameters
    ----------
    trace : array_like or xarray.DataArray
        (frame,) or (unit, frame) real values, e.g. ΔF/F or F; at least
        ``MIN_FRAMES`` frames, all finite. A DataArray needs a ``frame`` dim
        (and at most one other); a dask-backed one is computed.
    fps : float
        Frame rate (Hz).
    params : DeconvolutionParams, optional
        Defaults: AR(1), ``g`` estimated per trace (τ prior 0.7 s) and its
        decay shortened (``decay_correction_s``), a penalty of 3 noise SDs,
        percentile baseline, spikes moved 33 ms earlier (``onset_shift_s``).

    Returns
    -------
    DeconvolutionResult
        ``calcium`` and ``spikes`` shaped like ``trace``; per-trace
        ``baseline``, ``noise``, ``lam`` (scalars for a 1-D trace) and ``g``
        (…, ar_order). DataArrays in, DataArrays out (``g`` gets a ``lag`` dim).

    Raises
    ------
    InputError
        Wrong number of dims, no ``frame`` dim, too few frames, non-finite values.
    ParameterError
        ``fps`` not a positive finite number.
    """
    p = params or DeconvolutionParams()
    fps = _check_fps(fps)
    xr = sys.modules.get("xarray")
    if xr is not None and isinstance(trace, xr.DataArray):
        return _deconvolve_dataarray(trace, fps, p)
    y = _as_rows(np.asarray(trace))
    out = _deconvolve_rows(y, fps, p)
    if np.ndim(trace) == 1:
        return DeconvolutionResult(out.calcium[0], out.spikes[0], float(out.baseline[0]), out.g[0],
                                   float(out.noise[0]), float(out.lam[0]))
    return out


def _deconvolve_rows(y: np.ndarray, fps: float, p: DeconvolutionParams) -> DeconvolutionResult:
    n, t = y.shape
    out = {
        "calcium": np.zeros((n, t)), "spikes": np.zeros((n, t)), "baseline": np.zeros(n),
        "g": np.zeros((n, p.ar_order)), "noise": np.zeros(n), "lam": np.zeros(n),
    }
    rows_per_batch = max(1, _BATCH_ELEMENTS // t)
    for r0 in range(0, n, rows_per_batch):
        sl = slice(r0, r0 + rows_per_batch)
        for key, value in _solve(y[sl], fps, p).items():
            out[key][sl] = value
    return DeconvolutionResult(**out)


def _solve(y: np.ndarray, fps: float, p: DeconvolutionParams) -> dict[str, np.ndarray]:
    n, t = y.shape
    sn = estimate_noise(y, p.noise_band)
    d, r = _kernel(y, fps, sn, p)
    smin = p.s_min * sn
    q = p.baseline_percentile / 100
    # the q-quantile of baseline + N(0, σ²) lies ndtri(q) σ below the baseline
    b = np.zeros(n) if p.baseline == "zero" else np.percentile(y, 100 * q, axis=1) - ndtri(q) * sn
    lam = p.penalty * sn if p.sparsity == "penalty" else np.zeros(n)
    pools = _iterate(y, d, r, sn, smin, b, lam, p)
    calcium, spikes = _calcium(pools, d, r, y.shape)
    spikes = advance(spikes, p.onset_shift_s * fps)
    g = np.stack([d + r, -d * r], axis=1)[:, : p.ar_order]
    return {"calcium": calcium, "spikes": spikes, "baseline": b, "g": g, "noise": sn, "lam": lam}


def advance(s: np.ndarray, frames: float) -> np.ndarray:
    """Rows of ``s`` moved ``frames`` (≥ 0, fractional) earlier by linear interpolation, zeros at the end.

    Parameters
    ----------
    s : ndarray, (n, frame) float
    frames : float
        Shift in frames (``onset_shift_s · fps``).

    Returns
    -------
    ndarray, (n, frame) float64
        ``out_t = (1 − a) s_{t+k} + a s_{t+k+1}`` with ``k + a = frames``.
    """
    if frames <= 0:
        return s
    k = int(np.floor(frames))
    a = frames - k
    t = s.shape[1]
    z = np.concatenate([s, np.zeros((len(s), k + 2))], axis=1)
    return (1 - a) * z[:, k : k + t] + a * z[:, k + 1 : k + 1 + t]


def _iterate(y, d, r, sn, smin, b, lam, p: DeconvolutionParams) -> _Pools:
    """Pools for (b, λ), updating b and λ in place until they settle."""
    n, t = y.shape
    update = p.sparsity == "noise"  # the fitted baselines need it too (validated)
    active = np.arange(n)
    pools = _pools(y - b[:, None] - lam[:, None] * _shift(d, r, t), d, r, smin)
    for it in range(p.max_iter if update else 0):
        b_new, lam_new = _update(y[active], _select(pools, active), d[active], r[active], sn[active],
                                 b[active], lam[active], p)
        scale = np.maximum(sn[active], 1e-12 * np.abs(y[active]).max(axis=1) + 1e-300)
        moved = (np.abs(b_new - b[active]) > _TOL * scale) | (np.abs(lam_new - lam[active]) > _TOL * scale)
        b[active], lam[active] = b_new, lam_new
        active = active[moved]
        log.debug("deconvolve: iteration %d, %d of %d traces still moving", it + 1, active.size, n)
        if not active.size:
            break
        z = y[active] - b[active, None] - lam[active, None] * _shift(d[active], r[active], t)
        pools = _replace(pools, active, _pools(z, d[active], r[active], smin[active]))
    return pools


def _update(y, pools: _Pools, d, r, sn, b, lam, p: DeconvolutionParams) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form (b, λ) for fixed pools.

    λ meets the noise constraint (``sparsity="noise"``); b is fixed or, with
    ``baseline="optimize"``, the minimizer of the penalized objective.
    """
    n, t = y.shape
    u, length = pools.unit, pools.length
    du, ru = d[u], r[u]
    w = _sum_h2(du, ru, length)
    s1 = _sum_h(du, ru, length)
    last = pools.start + length == t
    kappa = 1 - (du + ru) + du * ru
    sk = kappa * s1 + last * (-du * ru * _h(du, ru, length - 2) + (du + ru - du * ru) * _h(du, ru, length - 1))
    sy = pools.hz + b[u] * s1 + lam[u] * sk  # Σ h y over the pool
    on = pools.value > 0  # clipped pools hold c = 0: pure residual
    q_yy = np.bincount(u, on * sy * sy / w, n)
    q_1y = np.bincount(u, on * s1 * sy / w, n)
    q_11 = np.bincount(u, on * s1 * s1 / w, n)
    q_kk = np.bincount(u, on * sk * sk / w, n)
    q_k1 = np.bincount(u, on * sk * s1 / w, n)
    rr = (y * y).sum(axis=1) - q_yy  # ‖r₀‖², r₀ = (I − P) y
    a11 = t - q_11  # ‖a₁‖², a₁ = (I − P) 1
    a1r = y.sum(axis=1) - q_1y  # ⟨a₁, r₀⟩

    def lam_for(rss: np.ndarray, curv: np.ndarray) -> np.ndarray:
        """λ ≥ 0 with rss + λ² curv = σ² T (the noise constraint)."""
        room = np.maximum(sn * sn * t - rss, 0.0)
        return np.where(curv > 0, np.sqrt(room / np.where(curv > 0, curv, 1.0)), lam)

    if p.baseline == "optimize":
        ok = a11 > 1e-9 * t
        safe = np.where(ok, a11, 1.0)
        b0 = np.where(ok, a1r / safe, b)  # least-squares b
        beta = np.where(ok, q_k1 / safe, 0.0)  # ∂b/∂λ: the penalty favours a higher b
        lam = lam_for(rr - 2 * b0 * a1r + b0 * b0 * a11, q_kk + beta * beta * a11)
        b = b0 + beta * lam
    elif p.sparsity == "noise":
        lam = lam_for(rr - 2 * b * a1r + b * b * a11, q_kk)
    return b, lam


def _deconvolve_dataarray(trace: Any, fps: float, p: DeconvolutionParams) -> DeconvolutionResult:
    import xarray as xr

    if "frame" not in trace.dims or trace.ndim not in (1, 2):
        raise InputError(f"deconvolve needs a DataArray with a 'frame' dim and at most one other, got "
                         f"dims {trace.dims}; rename the time dim to 'frame'")
    other = [dim for dim in trace.dims if dim != "frame"]
    ordered = trace.transpose(*other, "frame")
    out = _deconvolve_rows(_as_rows(np.asarray(ordered.values)), fps, p)
    lead = {dim: ordered.coords[dim] for dim in other if dim in ordered.coords}

    def per_trace(values: np.ndarray, extra: tuple[str, ...] = ()) -> xr.DataArray:
        if not other:
            values = values[0]
        return xr.DataArray(values, dims=(*other, *extra), coords=lead)

    def like(values: np.ndarray) -> xr.DataArray:
        return xr.DataArray(values.reshape(ordered.shape), dims=ordered.dims,
                            coords=ordered.coords).transpose(*trace.dims)

    return DeconvolutionResult(
        calcium=like(out.calcium), spikes=like(out.spikes), baseline=per_trace(out.baseline),
        g=per_trace(out.g, ("lag",)), noise=per_trace(out.noise), lam=per_trace(out.lam),
    )

