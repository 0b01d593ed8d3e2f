"""Spike inference by non-negative deconvolution of calcium traces (OASIS).

Model (Friedrich, Zhou & Paninski 2017, *Fast online deconvolution of calcium
imaging data*, PLoS Comput Biol 13:e1005423; Vogelstein et al. 2010)::

    y_t = b + c_t + ε_t,    c_t = g_1 c_{t-1} + g_2 c_{t-2} + s_t,    s_t ≥ 0,    ε_t ~ N(0, σ²)

with ``c_{-1} = c_{-2} = 0``. For an AR kernel ``g``, a baseline ``b`` and a
sparsity penalty ``λ`` the calcium ``c`` solves the convex problem::

    minimize  ½‖y − b − c‖² + λ Σ_t s_t    subject to    s = G c ≥ 0

Because ``Σ_t s_t = κᵀc`` with ``κ_t = 1 − g_1 − g_2`` except at the last
two frames, the penalty is a shift of the data: the problem is the
non-negative deconvolution (λ = 0) of ``z = y − b − λ κ``.

Solvers
-------
* **AR(1), exact** — OASIS's pools are the level sets of a pool-adjacent-
  violators problem (with ``u_t = c_t / g^t`` the constraint is ``u_t ≥
  u_{t−1}``). Adjacent violating pools belong to one level set whatever the
  order in which they are found, so every violating pair of every unit is
  merged at once, round after round, in numpy (each round is O(pools)); the
  result is the unique optimum, the same as OASIS's sequential pass.
* **AR(2), the paper's greedy pooling** — a pool's calcium is ``c_{t_i+k} =
  v_i h_k + g_2 c_{t_i−1} h_{k−1}`` (``h`` the kernel's impulse response,
  ``c_{t_i−1}`` the previous pool's last value); a new frame becomes a pool,
  and pools are merged backwards while the spike at a pool's start is
  negative. Close to but not guaranteed the exact optimum (as in the paper).
  The frames are processed in order, every unit in lockstep (vectorized
  across units): a fixed cost per frame whatever the number of units, which
  makes AR(2) ~7× slower than AR(1) (500 traces × 10 000 frames: 13 s
  against 1.9 s CPU on one core, ``benchmarks/bench_deconvolve.py``).
* ``s_min > 0`` merges pools whose starting spike is below ``s_min`` noise
  SDs as well (OASIS's hard threshold; a greedy, non-convex variant).

Parameters estimated per trace
------------------------------
* noise ``σ``: the mean power spectral density (Welch) over the top half of
  the band (CaImAn/OASIS ``GetSn``, ``method="mean"``);
* AR kernel ``g``: from the prior time constants, or from the autocovariance
  with the noise removed from lag 0 (Yule-Walker over ``ar_order + g_lags``
  lags, CaImAn's ``estimate_time_constant``), roots clipped to ``tau_range_s``;
  with ``g_scope="shared"`` one kernel for all traces of the call, the
  medians of their AR(2) fits' roots (:func:`kernel_estimates`,
  :func:`shared_kernel`).
  (OASIS's refinement of ``g`` with pool boundaries fixed is not offered: here
  it drifted to ever shorter time constants when iterated, e.g. 9 % → 21 %
  error over 5 rounds on synthetic AR(1) traces, while the autocovariance
  estimate was within 1 %.)
* baseline ``b``: by default a low percentile of the trace moved up by the
  matching noise quantile; or fitted jointly (below); or 0;
* sparsity ``λ``: fixed (``penalty`` noise SDs), or such that the residual
  equals ``σ² T`` (the noise-constrained problem of OASIS's
  ``constrained_oasisAR1``). With pools fixed, ``c`` is linear in ``(b, λ)``
  and the residual is ``‖r₀ − b a₁‖² + λ² ‖Pκ‖²`` (``P`` the projection on
  pool-wise kernels, ``a₁ = (I − P)1``), so the constrained ``λ`` and the
  jointly optimal ``b`` have closed forms; pools are recomputed for the new
  ``(b, λ)`` until they settle (``max_iter``). For AR(2) the closed form
  neglects the coupling of a pool to its predecessor (the greedy solver's
  approximation) and the re-solves correct it.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.signal import lfilter, welch
from scipy.special import ndtri

from somaflow.errors import InputError, ParameterError

log = logging.getLogger(__name__)

#: fewest frames a trace may have (Welch PSD and autocovariance need a few)
MIN_FRAMES = 16
#: float64 elements per batch of units solved together (bounds the memory to ~100 MiB)
_BATCH_ELEMENTS = 1 << 20
#: relative change of b and λ (in noise SDs) below which the (b, λ) iteration stops
_TOL = 1e-4


class DeconvolutionParams(BaseModel):
    """Parameters of :func:`deconvolve`.

    Attributes
    ----------
    ar_order : {1, 2}
        Order of the calcium dynamics: 1 — instantaneous rise, exponential
        decay; 2 — finite rise (difference of exponentials). On the spike
        ground truth AR(2) puts spikes at the onsets of GCaMP transients
        (zero-lag median r 0.45 against 0.33 for GCaMP6s at 60 Hz) but is
        slower and scores lower once the rise delay is compensated.
    tau_s : float
        Prior decay time constant (s); the AR kernel when ``estimate_g`` is
        off, and the fallback when an estimate is unstable (a root ≥ 1 or
        complex roots).
    tau_rise_s : float
        Prior rise time constant (s), AR(2) only; below ``tau_s / 2``.
    estimate_g : bool
        Estimate ``g`` from the traces' autocovariance (else use the prior).
    g_scope : {"trace", "shared"}
        ``"trace"``: each trace gets the kernel of its own ``ar_order`` fit
        (the prior where the fit is unstable). ``"shared"``: all traces
        deconvolved together (one session's units, one indicator) get one
        kernel: the medians, over the traces with a stable fit, of the decay
        and rise roots of an AR(2) fit (:func:`kernel_estimates`,
        :func:`shared_kernel`). The AR(2) fit is used for either
        ``ar_order``: a finite rise biases an AR(1) fit's decay short (on the
        2p-lowsnr tuning movies median τ 0.35-0.55 s against true 0.4-0.9 s).
        On 300-frame traces one trace's fit is noisy; under ``somaflow run``
        (CNMF) the shared kernel raised the median correlation of matched
        ``traces`` with the true calcium, over all matched cells of the
        tuning seeds 1100-1102, from 0.935 / 0.888 / 0.404 / 0.912 to 0.935 /
        0.901 / 0.450 / 0.919 (2p-small / 2p-dense / 2p-lowsnr / 1p-small).
        ``somaflow run`` uses ``"shared"`` (:class:`somaflow.traces.TraceParams`).
    g_lags : int
        Extra autocovariance lags (beyond ``ar_order``) in the Yule-Walker fit.
    tau_range_s : (float, float)
        Estimated decay time constants are clipped into this range (s); the
        prior is used as given.
    noise_band : (float, float)
        Band, as fractions of the Nyquist frequency, whose mean power gives σ.
    sparsity : {"noise", "penalty"}
        ``"noise"``: λ such that ‖y − b − c‖² = σ² T (the constrained problem;
        λ = 0 where even the unpenalized fit leaves more than the noise, as on
        most real traces); ``"penalty"``: λ = ``penalty`` · σ.
    penalty : float
        λ in noise SDs for ``sparsity="penalty"`` (0: non-negative
        deconvolution, the Suite2p choice).
    s_min : float
        Smallest spike kept, in noise SDs (0: none; > 0: OASIS's greedy hard
        threshold).
    baseline : {"percentile", "optimize", "zero"}
        ``"percentile"``: ``b = P_q(y) − Φ⁻¹(q) σ``, the ``q``-th percentile
        of the trace corrected for the noise (exact for a trace at baseline
        most of the time); ``"optimize"``: ``b`` fitted jointly with ``c`` under
        the noise constraint (OASIS's ``optimize_b``; needs
        ``sparsity="noise"``); ``"zero"``: the trace is already
        baseline-subtracted. On the spike ground truth (real ΔF/F) the joint
        fit follows misfits of the model (b far below rest, dense spikes):
        median r 0.30 / 0.22 / 0.17 against 0.35 / 0.26 / 0.33 with
        ``"percentile"`` (DS03 / DS09 / DS14, ``benchmarks/bench_deconvolve.py``).
    baseline_percentile : float
        ``q`` (percent) of the ``"percentile"`` baseline.
    max_iter : int
        Most re-solves of the pools while ``b`` and ``λ`` are updated.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    ar_order: Literal[1, 2] = Field(1, description="AR order of the calcium dynamics (1 or 2)")
    tau_s: float = Field(0.7, gt=0, description="prior decay time constant (s)")
    tau_rise_s: float = Field(0.05, gt=0, description="prior rise time constant (s), AR(2) only")
    estimate_g: bool = Field(True, description="estimate g from each trace's autocovariance")
    g_scope: Literal["trace", "shared"] = Field(
        "trace", description="'trace': each trace's own estimated kernel; 'shared': one kernel for all traces "
        "deconvolved together (the medians of their AR(2) fits' decay and rise roots)")
    g_lags: int = Field(10, ge=0, le=1000, description="extra autocovariance lags of the g fit (frames)")
    tau_range_s: tuple[float, float] = Field(
        (0.1, 5.0), description="estimated decay time constants are clipped to this range (s)"
    )
    noise_band: tuple[float, float] = Field(
        (0.5, 1.0), description="PSD band for the noise level (fractions of the Nyquist frequency)"
    )
    sparsity: Literal["noise", "penalty"] = Field(
        "noise", description="'noise': residual = noise level; 'penalty': lambda = penalty * sigma"
    )
    penalty: float = Field(0.0, ge=0, description="lambda in noise SDs (sparsity='penalty')")
    s_min: float = Field(0.0, ge=0, description="smallest spike kept (noise SDs); 0 = no minimum")
    baseline: Literal["percentile", "optimize", "zero"] = Field(
        "percentile", description="b from a low percentile and the noise, fitted jointly, or 0"
    )
    baseline_percentile: float = Field(8.0, gt=0, lt=50, description="percentile of the baseline estimate")
    max_iter: int = Field(10, ge=0, le=100, description="most re-solves while b and lambda are updated")

    @model_validator(mode="after")
    def _consistent(self) -> DeconvolutionParams:
        lo, hi = self.tau_range_s
        if not 0 < lo < hi:
            raise ValueError(f"tau_range_s must be (low, high) seconds with 0 < low < high, got "
                             f"{self.tau_range_s}; fix the range")
        f0, f1 = self.noise_band
        if not 0 <= f0 < f1 <= 1:
            raise ValueError(f"noise_band must be (low, high) fractions of Nyquist with 0 <= low < "
                             f"high <= 1, got {self.noise_band}; e.g. use (0.5, 1.0)")
        if self.ar_order == 2 and not self.tau_rise_s < self.tau_s / 2:
            raise ValueError(f"tau_rise_s ({self.tau_rise_s}) must be below tau_s / 2 "
                             f"({self.tau_s / 2}); lower tau_rise_s or use ar_order=1")
        if self.baseline == "optimize" and self.sparsity != "noise":
            raise ValueError("baseline='optimize' needs sparsity='noise' (with a fixed penalty a lower "
                             "b always fits as well); use baseline='percentile' or 'zero'")
        if self.penalty > 0 and self.sparsity != "penalty":
            raise ValueError("penalty is used only with sparsity='penalty'; set sparsity='penalty' "
                             "or penalty=0")
        return self


@dataclass(frozen=True)
class DeconvolutionResult:
    """Output of :func:`deconvolve`; arrays mirror the input (numpy or xarray).

    Attributes
    ----------
    calcium : ndarray, (..., frame) float64
        Denoised calcium ``c`` (trace units, baseline removed).
    spikes : ndarray, (..., frame) float64
        Inferred activity ``s ≥ 0`` (trace units per frame: the calcium jump).
    baseline : ndarray, (...) float64
        Constant baseline ``b`` (trace units).
    g : ndarray, (..., ar_order) float64
        AR coefficients used.
    noise : ndarray, (...) float64
        Noise SD ``σ`` (trace units).
    lam : ndarray, (...) float64
        Sparsity penalty ``λ`` used (trace units).
    """

    calcium: Any
    spikes: Any
    baseline: Any
    g: Any
    noise: Any
    lam: Any


# ----------------------------------------------------------------------------- public API


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
        Defaults: AR(1), ``g`` estimated per trace (τ prior 0.7 s),
        noise-constrained sparsity, percentile baseline.

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


def oasis(z: np.ndarray, g: np.ndarray, s_min: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative deconvolution ``min ½‖z − c‖² s.t. G c ≥ 0`` of each row.

    The building block of :func:`deconvolve`, for a known kernel and no
    baseline; a penalty ``λ`` is applied by passing ``z − λ κ`` (see the
    module docstring).

    Parameters
    ----------
    z : ndarray, (n, frame) float
        Traces, baseline removed.
    g : ndarray, (n, 1) or (n, 2) float
        AR coefficients; AR(1) needs ``0 < g < 1``, AR(2) real roots
        ``1 > d > r ≥ 0``.
    s_min : float or ndarray (n,)
        Smallest spike kept (trace units).

    Returns
    -------
    calcium, spikes : ndarray, (n, frame) float64

    Raises
    ------
    InputError
        ``z`` not 2-D or not finite.
    ParameterError
        ``g`` not one stable kernel per row.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or not z.shape[1] or not np.isfinite(z).all():
        raise InputError(f"oasis needs finite (unit, frame) traces, got shape {z.shape}; pass a 2-D "
                         "array without NaN/inf")
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or len(g) != len(z):
        raise ParameterError(f"oasis needs one row of AR coefficients per trace: {len(z)} traces, g of "
                             f"shape {g.shape}; pass g with shape ({len(z)}, 1) or ({len(z)}, 2)")
    d, r = _roots(g)
    smin = np.broadcast_to(np.asarray(s_min, dtype=np.float64), (len(z),))
    pools = _pools(z, d, r, smin)
    return _calcium(pools, d, r, z.shape)


# ----------------------------------------------------------------------------- driver


@dataclass
class _Pools:
    """Pools of all units, flattened: unit, start frame, length, value, Σ h_k z_{start+k}."""

    unit: np.ndarray
    start: np.ndarray
    length: np.ndarray
    value: np.ndarray
    hz: np.ndarray
    spike: np.ndarray  # spike at the pool start, ≥ 0 after clipping


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
    g = np.stack([d + r, -d * r], axis=1)[:, : p.ar_order]
    return {"calcium": calcium, "spikes": spikes, "baseline": b, "g": g, "noise": sn, "lam": lam}


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


# ----------------------------------------------------------------------------- kernels


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
        d = np.where(ok, est[:, 0], d)
        r = np.where(ok, est[:, 1], r)
    return d, r


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
        the median decay (and rise) root of the stable estimates.
    """
    est = np.asarray(estimates, dtype=np.float64).reshape(-1, 2)
    ok = np.isfinite(est).all(axis=1)
    if not ok.any():
        log.info("deconvolve: no trace gave a stable AR fit; the kernel is the prior (tau %.3g s)", params.tau_s)
        return params.model_copy(update={"estimate_g": False})
    d, r = np.median(est[ok], axis=0)
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


# ----------------------------------------------------------------------------- pools


def _pools(z: np.ndarray, d: np.ndarray, r: np.ndarray, smin: np.ndarray) -> _Pools:
    if np.all(r == 0):
        return _pools_ar1(z, d, smin)
    return _pools_ar2(z, d, r, smin)


def _pools_ar1(z: np.ndarray, d: np.ndarray, smin: np.ndarray) -> _Pools:
    """Exact AR(1) pools by parallel pool-adjacent-violators rounds.

    A pool [a, a + l) holds ``c_{a+k} = v d^k`` with ``v = Σ d^k z / Σ d^{2k}``;
    pools j, j+1 violate when the spike at j+1's start, ``v_{j+1} − d^{l_j} v_j``,
    is below ``smin``. Every round merges all violating chains of pools (of
    all units at once, flattened) and recomputes only the merged pools.
    """
    n, t = z.shape
    start = np.tile(np.arange(t), n)
    unit = np.repeat(np.arange(n), t)
    length = np.ones(n * t, np.int64)
    hz = z.ravel().copy()  # Σ d^k z_{a+k}
    value = hz.copy()
    dec = d[unit]  # d^length
    logd = np.log(d)
    while True:
        viol = value[1:] < value[:-1] * dec[:-1] + smin[unit[1:]]
        viol &= start[1:] > 0
        if not viol.any():
            break
        keep = np.concatenate(([True], ~viol))
        head = np.flatnonzero(keep)
        size = np.diff(np.append(head, keep.size))
        grown = size > 1
        members = np.flatnonzero(np.repeat(grown, size))
        sizes = size[grown]
        at = np.cumsum(sizes) - sizes
        offset = start[members] - np.repeat(start[head[grown]], sizes)
        new_hz = np.add.reduceat(hz[members] * np.exp(logd[unit[members]] * offset), at)
        new_len = np.add.reduceat(length[members], at)
        start, unit, length, hz, dec, value = (a[head] for a in (start, unit, length, hz, dec, value))
        idx = np.flatnonzero(grown)
        lu = logd[unit[idx]]
        hz[idx], length[idx] = new_hz, new_len
        dec[idx] = np.exp(lu * new_len)
        value[idx] = new_hz * (1 - np.exp(2 * lu)) / (1 - dec[idx] ** 2)
    value = np.maximum(value, 0.0)
    spike = value.copy()
    spike[1:] -= np.where(start[1:] == 0, 0.0, value[:-1] * dec[:-1])
    return _Pools(unit, start, length, value, hz, np.maximum(spike, 0.0))


def _pools_ar2(z: np.ndarray, d: np.ndarray, r: np.ndarray, smin: np.ndarray) -> _Pools:
    """AR(2) pools by the paper's greedy backward merging, all units in lockstep over frames.

    Pool i of a unit starts at ``a_i`` with value ``v_i`` and holds ``c_{a_i+k} =
    v_i h_k + g_2 c_{a_i−1} h_{k−1}``; its last two calcium values are kept so
    that the spike at the next pool's start, ``v_{i+1} − g_1 c_last − g_2
    c_before_last``, is cheap to check. The first pool is clipped at 0.
    """
    n, t = z.shape
    g1, g2 = d + r, -d * r
    size = n * t
    start = np.zeros(size, np.int64)  # pool i of unit u lives at u * t + i
    length = np.zeros(size, np.int64)
    sd = np.zeros(size)  # Σ d^k z_{a+k}
    sr = np.zeros(size)  # Σ r^k z_{a+k}
    cp = np.zeros(size)  # calcium just before the pool
    value = np.zeros(size)
    c_last = np.zeros(size)
    c_prev = np.zeros(size)  # second-to-last calcium of the pool
    base = np.arange(n) * t
    top = base - 1  # flat index of each unit's last pool

    for f in range(t):
        top += 1
        zf = z[:, f]
        before = c_last[top - 1] if f else np.zeros(n)
        v = zf if f else np.maximum(zf, 0.0)  # c_0 = s_0 ≥ 0
        start[top], length[top], sd[top], sr[top] = f, 1, zf, zf
        cp[top], value[top], c_last[top] = before, v, v
        c_prev[top] = before
        if not f:
            continue
        cand = np.arange(n)
        while cand.size:
            i = top[cand]
            j = i - 1
            bad = value[i] - g1[cand] * c_last[j] - g2[cand] * c_prev[j] < smin[cand]
            cand, i, j = cand[bad], i[bad], j[bad]
            if not cand.size:
                break
            du, ru, lj = d[cand], r[cand], length[j]
            sd[j] += du**lj * sd[i]
            sr[j] += ru**lj * sr[i]
            lj = lj + length[i]
            length[j] = lj
            hz = (du * sd[j] - ru * sr[j]) / (du - ru)
            c0 = g2[cand] * cp[j]
            w, x, h1, h2, h3 = _pool_sums(du, ru, lj)
            v = (hz - c0 * x) / w
            v = np.where(j == base[cand], np.maximum(v, 0.0), v)  # the first pool starts with s ≥ 0
            value[j], c_last[j], c_prev[j] = v, v * h1 + c0 * h2, v * h2 + c0 * h3
            top[cand] = j
            cand = cand[j > base[cand]]
    counts = top - base + 1
    keep = (np.arange(t)[None, :] < counts[:, None]).ravel()
    unit = np.repeat(np.arange(n), counts)
    du, ru = d[unit], r[unit]
    hz = (du * sd[keep] - ru * sr[keep]) / (du - ru)
    p_start, p_val = start[keep], value[keep]
    spike = p_val.copy()
    spike[1:] -= np.where(p_start[1:] == 0, 0.0,
                          g1[unit[1:]] * c_last[keep][:-1] + g2[unit[1:]] * c_prev[keep][:-1])
    return _Pools(unit, p_start, length[keep], p_val, hz, np.maximum(spike, 0.0))


def _select(pools: _Pools, units: np.ndarray) -> _Pools:
    """The pools of ``units`` (sorted), renumbered 0 … len(units) − 1."""
    pos = np.full(int(pools.unit.max(initial=-1)) + 1, -1)
    pos[units] = np.arange(units.size)
    keep = pos[pools.unit] >= 0
    return _Pools(pos[pools.unit[keep]], pools.start[keep], pools.length[keep], pools.value[keep],
                  pools.hz[keep], pools.spike[keep])


def _replace(pools: _Pools, units: np.ndarray, new: _Pools) -> _Pools:
    """``pools`` with the pools of ``units`` replaced by ``new`` (numbered by position in units)."""
    keep = ~np.isin(pools.unit, units)
    parts = [
        np.concatenate([getattr(pools, name)[keep], units[new.unit] if name == "unit" else getattr(new, name)])
        for name in ("unit", "start", "length", "value", "hz", "spike")
    ]
    order = np.lexsort((parts[1], parts[0]))
    return _Pools(*(a[order] for a in parts))


def _calcium(pools: _Pools, d: np.ndarray, r: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(calcium, spikes) arrays from the spikes at the pool starts."""
    spikes = np.zeros(shape)
    spikes[pools.unit, pools.start] = pools.spike
    calcium = np.empty(shape)
    for i in range(shape[0]):
        calcium[i] = lfilter([1.0], [1.0, -(d[i] + r[i]), d[i] * r[i]], spikes[i])
    return calcium, spikes


# ----------------------------------------------------------------------------- inputs


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
