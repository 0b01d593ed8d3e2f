"""The calcium kernel: noise and AR coefficients of traces (:func:`estimate_noise`,
:func:`estimate_ar`), per-trace estimates and one kernel shared by a session
(:func:`kernel_estimates`, :func:`shared_kernel`), and the closed forms of the AR(1)/AR(2) impulse
response used by the pools.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from scipy.signal import welch

from somaflow.errors import InputError, ParameterError
from somaflow.oasis.params import MIN_FRAMES, DeconvolutionParams

log = logging.getLogger(__name__)


def estimate_noise(y: np.ndarray, band: tuple[float, float] = (0.5, 1.0)) -> np.ndarray:
    """Noise SD of each row from its power spectral density (CaImAn's ``GetSn``, mean).

    Parameters
    ----------
    y : ndarray, (n, frame) float
        Traces.
    band : (float, float)
        Frequency band as fractions of the Nyquist frequency (0.5 cycles/frame).

    Returns
    -------
    ndarray, (n,) float64
        ``sqrt(mean(PSD / 2))`` over the band: σ for white noise (trace units).
    """
    y = np.asarray(y, dtype=np.float64)
    freq, psd = welch(y, nperseg=min(256, y.shape[-1]), axis=-1)
    keep = (freq > band[0] / 2) & (freq <= band[1] / 2)
    if not keep.any():
        keep = freq >= freq[-1]
    return np.sqrt(psd[..., keep].mean(axis=-1) / 2)


def estimate_ar(y: np.ndarray, order: int, noise: np.ndarray, lags: int = 10) -> np.ndarray:
    """AR coefficients of each row from its autocovariance, noise removed at lag 0.

    Solves the Yule-Walker equations ``γ_j = Σ_i g_i (γ_{j−i} − σ² δ_{ij})``
    for ``j = 1 … order + lags`` in the least-squares sense (CaImAn's
    ``estimate_time_constant``).

    Parameters
    ----------
    y : ndarray, (n, frame) float
        Traces.
    order : int
        AR order (1 or 2).
    noise : ndarray, (n,) float
        Noise SD of each row (see :func:`estimate_noise`).
    lags : int
        Extra lags beyond ``order``.

    Returns
    -------
    ndarray, (n, order) float64
        Raw estimates; not checked for stability (see :func:`deconvolve`).
    """
    y = np.asarray(y, dtype=np.float64)
    n, t = y.shape
    m = min(order + lags, t - 1)
    yc = y - y.mean(axis=1, keepdims=True)
    size = 1 << int(math.ceil(math.log2(2 * t)))
    spec = np.fft.rfft(yc, size, axis=1)
    acov = np.fft.irfft(spec * spec.conj(), size, axis=1)[:, : m + 1] / t
    j = np.arange(1, m + 1)[:, None]
    i = np.arange(1, order + 1)[None, :]
    a = acov[:, np.abs(j - i)] - (noise**2)[:, None, None] * (j == i)[None]
    rhs = acov[:, 1 : m + 1]
    ata = np.einsum("nji,njk->nik", a, a)
    atb = np.einsum("nji,nj->ni", a, rhs)
    ata += 1e-12 * np.trace(ata, axis1=1, axis2=2)[:, None, None] * np.eye(order)
    bad = ~np.isfinite(ata).all(axis=(1, 2)) | (np.abs(np.linalg.det(ata)) < 1e-300)
    ata[bad] = np.eye(order)
    atb[bad] = np.nan
    return np.linalg.solve(ata, atb[..., None])[..., 0]


def _kernel(y: np.ndarray, fps: float, sn: np.ndarray, p: DeconvolutionParams) -> tuple[np.ndarray, np.ndarray]:
    """(d, r): decay and rise roots of the AR polynomial per row, ``1 > d > r ≥ 0``."""
    n = len(y)
    if p.estimate_g and p.g_scope == "shared":
        p = shared_kernel(kernel_estimates(y, fps, p, noise=sn), fps, p)
    d_prior = math.exp(-1.0 / (p.tau_s * fps))
    r_prior = math.exp(-1.0 / (p.tau_rise_s * fps)) if p.ar_order == 2 else 0.0
    d = np.full(n, d_prior)
    r = np.full(n, r_prior)
    if p.estimate_g:
        est = _fit_roots(y, fps, sn, p.ar_order, p)
        ok = np.isfinite(est[:, 0])
        n_bad = int((~ok).sum())
        if n_bad:
            log.debug("deconvolve: %d of %d traces gave no stable AR estimate; using the prior", n_bad, n)
        d_est = _shorten(est[:, 0], fps, p.decay_correction_s)
        d = np.where(ok, d_est, d)
        r = np.where(ok, np.minimum(est[:, 1], d_est * d_est), r)
    return d, r


def _shorten(d: np.ndarray, fps: float, correction_s: float | None) -> np.ndarray:
    """Decay roots with 1/τ raised by 1/``correction_s`` (``decay_correction_s``); unchanged for None."""
    if correction_s is None:
        return d
    return d * math.exp(-1.0 / (correction_s * fps))


def _fit_roots(y: np.ndarray, fps: float, sn: np.ndarray, order: int, p: DeconvolutionParams) -> np.ndarray:
    """(n, 2) decay and rise roots of each row's AR(``order``) fit, clipped; NaN rows where unstable."""
    g = estimate_ar(y, order, sn, p.g_lags)
    if order == 1:
        d_est, r_est = g[:, 0], np.zeros(len(y))
    else:
        disc = g[:, 0] ** 2 + 4 * g[:, 1]
        root = np.sqrt(np.where(disc >= 0, disc, np.nan))
        d_est, r_est = (g[:, 0] + root) / 2, (g[:, 0] - root) / 2
    ok = np.isfinite(d_est) & np.isfinite(r_est) & (d_est > 0) & (d_est < 1)
    lo, hi = (math.exp(-1.0 / (tau * fps)) for tau in p.tau_range_s)
    d_est = np.clip(d_est, lo, hi)
    r_est = np.minimum(np.clip(r_est, 0.0, None), d_est * d_est)  # τ_rise ≤ τ_decay / 2: d − r ≫ 0
    return np.where(ok[:, None], np.stack([d_est, r_est], axis=1), np.nan)


def kernel_estimates(y: Any, fps: float, params: DeconvolutionParams | None = None, *,
                     noise: np.ndarray | None = None) -> np.ndarray:
    """Decay and rise roots of each trace's AR(2) fit, the input of :func:`shared_kernel`.

    Parameters
    ----------
    y : array_like, (n, frame) or (frame,) float
        Traces (e.g. ΔF/F), finite, at least ``MIN_FRAMES`` frames.
    fps : float
        Frame rate (Hz).
    params : DeconvolutionParams, optional
        ``g_lags``, ``tau_range_s`` (decay roots are clipped into it) and
        ``noise_band`` (the noise removed from lag 0).
    noise : ndarray, (n,) float, optional
        Noise SD of each row, if already known.

    Returns
    -------
    ndarray, (n, 2) float64
        ``(d, r)`` per trace, ``1 > d > r ≥ 0`` (per frame); NaN rows where the
        fit is unstable (complex roots, or a decay root outside (0, 1)).
    """
    p = params or DeconvolutionParams()
    y = _as_rows(np.asarray(y, dtype=np.float64))
    sn = estimate_noise(y, p.noise_band) if noise is None else noise
    return _fit_roots(y, _check_fps(fps), sn, 2, p)


def shared_kernel(estimates: np.ndarray, fps: float, params: DeconvolutionParams) -> DeconvolutionParams:
    """``params`` with the kernel fixed at the medians of per-trace root estimates.

    Parameters
    ----------
    estimates : ndarray, (n, 2) float
        :func:`kernel_estimates` of the traces (of one or several blocks).
    fps : float
        Frame rate (Hz).
    params : DeconvolutionParams
        Parameters to copy; the prior is kept when no trace has a stable fit.

    Returns
    -------
    DeconvolutionParams
        ``estimate_g=False`` and ``tau_s`` (and for AR(2) ``tau_rise_s``) from
        the median decay (and rise) root of the stable estimates, the decay
        shortened by ``params.decay_correction_s``.
    """
    est = np.asarray(estimates, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(est).all(axis=1)
    if not ok.any():
        log.info("deconvolve: no trace gave a stable AR fit; the kernel is the prior (tau %.3g s)", params.tau_s)
        return params.model_copy(update={"estimate_g": False})
    d, r = np.median(est[ok], axis=0)
    d = float(_shorten(np.asarray(d), fps, params.decay_correction_s))
    r = min(r, d * d)
    tau = -1.0 / (fps * math.log(d))
    update: dict[str, Any] = {"estimate_g": False, "tau_s": tau}
    if params.ar_order == 2:
        tau_rise = -1.0 / (fps * math.log(r)) if r > 0 else 1e-6
        update["tau_rise_s"] = float(np.clip(tau_rise, 1e-6, 0.999 * tau / 2))
    log.info("deconvolve: kernel shared by %d traces (%d stable fits): decay tau %.3g s",
             len(est), int(ok.sum()), tau)
    return params.model_copy(update=update)


def _roots(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decay and rise roots (d, r) of ``z² − g1 z − g2``; ParameterError unless ``1 > d > r ≥ 0``."""
    if g.ndim != 2 or g.shape[1] not in (1, 2):
        raise ParameterError(f"g must be (n, 1) or (n, 2) AR coefficients, got shape {g.shape}; "
                             "pass one row of coefficients per trace")
    if g.shape[1] == 1:
        d, r = g[:, 0], np.zeros(len(g))
    else:
        disc = g[:, 0] ** 2 + 4 * g[:, 1]
        root = np.sqrt(np.maximum(disc, 0))
        d, r = (g[:, 0] + root) / 2, (g[:, 0] - root) / 2
        if (disc < 0).any():
            raise ParameterError("g has complex AR roots (an oscillating kernel); pass g1, g2 with "
                                 "g1² + 4 g2 > 0, e.g. from time constants")
    if not ((d > r) & (r >= 0) & (d < 1) & (d > 0)).all():
        raise ParameterError("g must be a stable calcium kernel with roots 1 > d > r >= 0; "
                             "derive it from decay/rise time constants")
    return d, r


def _h(d: np.ndarray, r: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Impulse response h_k = (d^{k+1} − r^{k+1}) / (d − r) of the AR kernel (h_{−1} = 0)."""
    k = np.maximum(k, -1)  # h_{-2} is never used; this keeps 0 ** -1 out
    return (d ** (k + 1) - r ** (k + 1)) / (d - r)


def _geom(q: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Σ_{k<n} q^k."""
    return (1 - q**n) / (1 - q)


def _sum_h(d, r, n):
    """Σ_{k<n} h_k."""
    return (d * _geom(d, n) - r * _geom(r, n)) / (d - r)


def _sum_h2(d, r, n):
    """Σ_{k<n} h_k²."""
    return (d * d * _geom(d * d, n) - 2 * d * r * _geom(d * r, n) + r * r * _geom(r * r, n)) / (d - r) ** 2


def _pool_sums(d, r, n):
    """Σ_{k<n} h_k², Σ_{k<n} h_k h_{k−1}, h_{n−1}, h_{n−2}, h_{n−3} for pools of n ≥ 2 frames."""
    d2, r2 = d ** (n - 2), r ** (n - 2)
    dn, rn = d2 * d * d, r2 * r * r
    gap = d - r
    gdd, gdr, grr = (1 - dn * dn) / (1 - d * d), (1 - dn * rn) / (1 - d * r), (1 - rn * rn) / (1 - r * r)
    w = (d * d * gdd - 2 * d * r * gdr + r * r * grr) / gap**2
    x = (d * gdd - (d + r) * gdr + r * grr) / gap**2
    return w, x, (dn - rn) / gap, (d2 * d - r2 * r) / gap, (d2 - r2) / gap


def _shift(d: np.ndarray, r: np.ndarray, t: int) -> np.ndarray:
    """(n, t) κ with Σ_t s_t = κᵀc: 1 − g1 − g2, then 1 − g1, then 1."""
    g1, g2 = (d + r)[:, None], (-d * r)[:, None]
    kappa = np.broadcast_to(1 - g1 - g2, (len(d), t)).copy()
    kappa[:, -1] = 1.0
    if t > 1:
        kappa[:, -2] = (1 - g1)[:, 0]
    return kappa


def _check_fps(fps: Any) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ParameterError(f"deconvolve needs a positive, finite frame rate in Hz, got {fps!r}; "
                             "pass fps=<frames per second>")
    return value


def _as_rows(a: np.ndarray) -> np.ndarray:
    if a.ndim not in (1, 2):
        raise InputError(f"deconvolve takes a (frame,) trace or (unit, frame) traces, got an array "
                         f"with {a.ndim} dims and shape {a.shape}; reshape it")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise InputError(f"deconvolve needs real numbers, got dtype {a.dtype}; convert the traces to float")
    y = np.atleast_2d(a).astype(np.float64)
    if y.shape[1] < MIN_FRAMES:
        raise InputError(f"deconvolve needs at least {MIN_FRAMES} frames per trace, got {y.shape[1]}; "
                         "pass longer traces (frames on the last axis)")
    bad = ~np.isfinite(y)
    if bad.any():
        units = np.flatnonzero(bad.any(axis=1))
        raise InputError(f"the traces hold {int(bad.sum())} NaN/inf values (rows {units[:5].tolist()}"
                         f"{'…' if units.size > 5 else ''}); interpolate or drop them before deconvolving")
    return y

