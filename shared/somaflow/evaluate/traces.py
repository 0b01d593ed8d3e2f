"""Comparing the activity of matched units: calcium traces and spikes.

Traces are compared with the Pearson correlation, which ignores the scale and
offset that separate a denoised fluorescence trace from the true calcium
concentration. Spikes are compared after smoothing both trains with the same
Gaussian kernel (``sigma`` in frames of the prediction; default
:data:`SPIKE_SIGMA_FRAMES`), because an inferred spike one frame early is
nearly right and a raw-train correlation would score it 0.

When the prediction has fewer frames than the truth because the pipeline
binned frames in time (STNeuroNet sums consecutive frames to 3-6 Hz), the true
series is averaged over the same bins first (:func:`bin_frames`).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.ndimage import gaussian_filter1d

from somaflow.errors import ParameterError

log = logging.getLogger(__name__)

#: SD of the Gaussian that smooths spike trains before correlating them, in
#: frames of the prediction (~0.3 s at 6 Hz, ~70 ms at 30 Hz).
SPIKE_SIGMA_FRAMES = 2.0


def binning_factor(n_true_frames: int, n_pred_frames: int) -> tuple[int | None, str | None]:
    """How many true frames make one predicted frame, if that is well defined.

    Parameters
    ----------
    n_true_frames, n_pred_frames : int
        Frame counts of the ground truth and of the prediction.

    Returns
    -------
    factor : int or None
        ``k`` such that binning the truth by ``k`` (dropping an incomplete last
        bin) yields ``n_pred_frames`` frames; 1 when the counts agree; None
        when no integer factor fits.
    note : str or None
        Why the traces cannot be compared, or what was done, for the report.
    """
    if n_pred_frames == n_true_frames:
        return 1, None
    if n_pred_frames <= 0 or n_true_frames <= 0 or n_pred_frames > n_true_frames:
        return None, (
            f"traces not compared: the prediction has {n_pred_frames} frames and the ground truth "
            f"{n_true_frames}; only temporal binning of the truth (fewer predicted frames) is handled."
        )
    k = n_true_frames // n_pred_frames
    if n_true_frames % n_pred_frames == 0:
        return k, f"ground-truth traces averaged over bins of {k} frames to match the prediction."
    if k >= 2 and n_true_frames - k * n_pred_frames < k:
        return k, (
            f"ground-truth traces averaged over bins of {k} frames; the last "
            f"{n_true_frames - k * n_pred_frames} frame(s) (an incomplete bin) were dropped."
        )
    return None, (
        f"traces not compared: {n_true_frames} ground-truth frames are not an integer multiple of "
        f"the prediction's {n_pred_frames} frames (ratio {n_true_frames / n_pred_frames:.3f})."
    )


def bin_frames(series: np.ndarray, factor: int) -> np.ndarray:
    """Average consecutive groups of ``factor`` frames along the last axis.

    Parameters
    ----------
    series : numpy.ndarray
        ``(..., frame)``.
    factor : int
        Frames per bin (>= 1); an incomplete last bin is dropped.

    Returns
    -------
    numpy.ndarray
        ``(..., frame // factor)`` float64.
    """
    if factor < 1:
        raise ParameterError(f"binning factor must be >= 1, got {factor}.")
    series = np.asarray(series, dtype=np.float64)
    n = series.shape[-1] // factor
    return series[..., : n * factor].reshape(*series.shape[:-1], n, factor).mean(axis=-1)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Pearson correlation of two ``(unit, frame)`` arrays.

    Returns
    -------
    numpy.ndarray
        ``(unit,)`` float64; NaN where either row is constant or not finite.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ParameterError(f"cannot correlate arrays of shapes {a.shape} and {b.shape}.")
    if a.shape[-1] < 2:
        return np.full(a.shape[:-1], np.nan)
    flat = (np.ptp(a, axis=-1) == 0) | (np.ptp(b, axis=-1) == 0)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    num = (a * b).sum(axis=-1)
    den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r = np.where(flat | ~np.isfinite(r), np.nan, r)
    return np.clip(r, -1.0, 1.0)


def trace_correlations(pred_traces: np.ndarray, true_traces: np.ndarray, factor: int = 1) -> np.ndarray:
    """Correlation of each predicted trace with its matched true calcium trace.

    Parameters
    ----------
    pred_traces : numpy.ndarray
        ``(pair, frame)`` predicted calcium of the matched units.
    true_traces : numpy.ndarray
        ``(pair, frame * factor)`` true calcium, in the same pair order.
    factor : int
        Temporal binning from :func:`binning_factor`.

    Returns
    -------
    numpy.ndarray
        ``(pair,)`` float64 Pearson r; NaN for constant traces.
    """
    truth = bin_frames(true_traces, factor) if factor != 1 else np.asarray(true_traces, np.float64)
    return pearson_rows(pred_traces, truth[..., : np.shape(pred_traces)[-1]])


def spike_correlations(
    pred_spikes: np.ndarray,
    true_spikes: np.ndarray,
    factor: int = 1,
    sigma: float = SPIKE_SIGMA_FRAMES,
) -> np.ndarray:
    """Correlation of Gaussian-smoothed predicted and true spike trains.

    Parameters
    ----------
    pred_spikes : numpy.ndarray
        ``(pair, frame)`` inferred spikes (counts or deconvolved amplitudes).
    true_spikes : numpy.ndarray
        ``(pair, frame * factor)`` true spike counts, in the same pair order.
    factor : int
        Temporal binning from :func:`binning_factor`.
    sigma : float
        Gaussian SD in predicted frames (> 0), applied to both trains.

    Returns
    -------
    numpy.ndarray
        ``(pair,)`` float64 Pearson r; NaN for units without spikes in either train.
    """
    if not sigma > 0:
        raise ParameterError(f"spike smoothing sigma must be > 0 frames, got {sigma}.")
    truth = bin_frames(true_spikes, factor) if factor != 1 else np.asarray(true_spikes, np.float64)
    truth = truth[..., : np.shape(pred_spikes)[-1]]
    pred = np.asarray(pred_spikes, dtype=np.float64)
    smooth_p = gaussian_filter1d(np.nan_to_num(pred), sigma, axis=-1, mode="constant")
    smooth_t = gaussian_filter1d(np.nan_to_num(truth), sigma, axis=-1, mode="constant")
    return pearson_rows(smooth_p, smooth_t)


def summarize(values: np.ndarray) -> dict[str, float | int | None]:
    """Median, mean and count of the finite values (None when there are none)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"median": None, "mean": None, "n": 0}
    return {"median": _f(np.median(v)), "mean": _f(v.mean()), "n": int(v.size)}


def _f(x: float) -> float | None:
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None
