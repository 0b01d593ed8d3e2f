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

Modules: :mod:`~.params`, :mod:`~.kernels`, :mod:`~.pools`, :mod:`~.solve`, :mod:`~.blocks` (Dask).
"""

from __future__ import annotations

from somaflow.oasis.blocks import deconvolve_blocks
from somaflow.oasis.kernels import estimate_ar, estimate_noise, kernel_estimates, shared_kernel
from somaflow.oasis.params import (
    MIN_FRAMES,
    CalciumParams,
    DeconvolutionParams,
    DeconvolutionResult,
)
from somaflow.oasis.pools import oasis
from somaflow.oasis.solve import deconvolve

__all__ = [
    "CalciumParams",
    "DeconvolutionParams",
    "DeconvolutionResult",
    "MIN_FRAMES",
    "deconvolve",
    "deconvolve_blocks",
    "estimate_ar",
    "estimate_noise",
    "kernel_estimates",
    "oasis",
    "shared_kernel",
]
