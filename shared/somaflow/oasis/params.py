"""Parameters and result of the deconvolution (:class:`DeconvolutionParams`, :class:`DeconvolutionResult`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: fewest frames a trace may have (Welch PSD and autocovariance need a few)
MIN_FRAMES = 16






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
        most real traces); ``"penalty"`` (default): λ = ``penalty`` · σ.
        ``baseline="optimize"`` without an explicit ``sparsity`` selects
        ``"noise"``.
    penalty : float
        λ in noise SDs for ``sparsity="penalty"`` (0: non-negative
        deconvolution, the Suite2p choice); ignored with ``"noise"`` unless
        given explicitly.
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
    decay_correction_s : float or None
        ``τ_c``: an *estimated* decay time constant (per trace, or the shared
        one) is shortened to ``1 / (1/τ_est + 1/τ_c)``; ``None`` keeps the
        estimate. The autocovariance estimate of real ΔF/F follows slow
        drifts and bursts and runs long (median ~1.7 s on the spike ground
        truth), which smears the spikes over the following frames (OASIS's
        ``estimate_parameters`` shortens ``g`` by a factor 0.98 for the same
        reason). The prior ``tau_s`` is used as given.
    onset_shift_s : float
        The inferred ``spikes`` are moved this much earlier (linear
        interpolation between frames; ``calcium`` is not moved): an AR(1)
        kernel has no rise, so each spike lands where its transient has
        risen, a rise time after the action potential. 0 keeps ``spikes =
        G c`` exactly.

    The defaults of ``decay_correction_s``, ``onset_shift_s`` and
    ``sparsity``/``penalty`` were chosen on the electrophysiology ground truth
    (eleven datasets, ``benchmarks/bench_deconvolve.py --cv``, leave one
    dataset out): 2 s, 0.033 s and a penalty of 3 noise SDs. Held out, the
    median correlation of spikes and true spikes (30 Hz, both smoothed by a
    0.1 s Gaussian) rose from 0.751 to 0.815 over all neurons, against 0.791
    for the ``oasis-deconv`` package with its defaults (``docs/benchmarks.md``).
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
        "penalty", description="'noise': residual = noise level; 'penalty': lambda = penalty * sigma"
    )
    penalty: float = Field(3.0, ge=0, description="lambda in noise SDs (sparsity='penalty')")
    s_min: float = Field(0.0, ge=0, description="smallest spike kept (noise SDs); 0 = no minimum")
    baseline: Literal["percentile", "optimize", "zero"] = Field(
        "percentile", description="b from a low percentile and the noise, fitted jointly, or 0"
    )
    baseline_percentile: float = Field(8.0, gt=0, lt=50, description="percentile of the baseline estimate")
    max_iter: int = Field(10, ge=0, le=100, description="most re-solves while b and lambda are updated")
    decay_correction_s: float | None = Field(
        2.0, gt=0, description="estimated decay tau shortened to 1/(1/tau + 1/this) (s); None keeps it")
    onset_shift_s: float = Field(
        0.033, ge=0, le=1.0, description="spikes moved this much earlier (s): the rise an AR(1) kernel lacks")

    @model_validator(mode="before")
    @classmethod
    def _optimize_implies_noise(cls, data: object) -> object:
        """``baseline="optimize"`` needs the noise constraint: select it when ``sparsity`` is not given."""
        if isinstance(data, dict) and data.get("baseline") == "optimize" and "sparsity" not in data:
            return {**data, "sparsity": "noise"}
        return data

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
                             "b always fits as well); set sparsity: noise too, or use baseline "
                             "'percentile' or 'zero'")
        # penalty is not checked against sparsity: a partial section is filled from the defaults
        # (penalty 3), so sparsity: noise alone must stay valid; the noise constraint ignores it
        return self


class CalciumParams(BaseModel):
    """How the denoised calcium is deconvolved where it differs from the spikes' :class:`DeconvolutionParams`.

    The spike-inference defaults (a penalty of 3 noise SDs, the decay
    shortened by ``decay_correction_s``) were chosen for the spikes; the same
    fit's calcium follows the true calcium less closely at low SNR (the
    penalty flattens small transients, the shortened kernel cuts their
    tails). :meth:`apply` gives the parameters of a second OASIS pass whose
    calcium keeps the previous defaults' fit: noise-constrained ``λ``, the
    raw decay estimate (the kernel estimates of the first pass are reused).
    On the simulator's held-out seeds (``benchmarks/bench_deconv_traces.py``,
    CNMF, seeds 100-101) the spike defaults' own calcium lowered the median
    matched-trace correlation on 2p-lowsnr from 0.487 to 0.404 (and raised
    it by 0.003-0.007 on the other presets); with this pass ``traces`` is
    the previous one exactly (``docs/benchmarks.md``).

    Attributes
    ----------
    sparsity : {"noise", "penalty"}
        As :attr:`DeconvolutionParams.sparsity`, for the calcium.
    penalty : float
        As :attr:`DeconvolutionParams.penalty` (``sparsity="penalty"`` only).
    decay_correction_s : float or None
        As :attr:`DeconvolutionParams.decay_correction_s`; ``None`` keeps the
        estimated decay.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sparsity: Literal["noise", "penalty"] = Field(
        "noise", description="the calcium's sparsity: 'noise': residual = noise level; 'penalty': lambda = "
        "penalty * sigma")
    penalty: float = Field(0.0, ge=0, description="the calcium's lambda in noise SDs (sparsity='penalty')")
    decay_correction_s: float | None = Field(
        None, gt=0, description="the calcium's estimated decay tau shortened to 1/(1/tau + 1/this) (s); None "
        "keeps it")

    def apply(self, spikes: DeconvolutionParams) -> DeconvolutionParams:
        """``spikes`` with this sparsity and decay correction (no onset shift: it moves only spikes).

        Raises
        ------
        pydantic.ValidationError
            The combination is invalid (e.g. ``sparsity="penalty"`` with ``baseline="optimize"``).
        """
        update = self.model_dump()
        if self.sparsity != "penalty":
            update.pop("penalty")
        return DeconvolutionParams.model_validate(
            {**spikes.model_dump(exclude={"penalty"}), **update, "onset_shift_s": 0.0})


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

