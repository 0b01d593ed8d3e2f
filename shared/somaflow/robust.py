"""Robust scale estimates: the median absolute deviation, defined once for the library.

:func:`robust_sd` is :func:`scipy.stats.median_abs_deviation` scaled to the SD
of a normal distribution; :func:`diff_noise_sd` and :func:`abs_diff_noise_sd`
estimate the SD of white noise from first differences (transients barely move
them). Summaries that stream the median of ``|Δx|`` divide it by
:data:`DIFF_TO_SIGMA` themselves.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import median_abs_deviation, norm

#: Φ⁻¹(3/4) ≈ 0.6745, the median of |z| for a standard normal z
NORMAL_QUARTILE = float(norm.ppf(0.75))
#: median |Δx| of white noise of SD σ is σ · √2 · Φ⁻¹(3/4)
DIFF_TO_SIGMA = NORMAL_QUARTILE * math.sqrt(2.0)


def robust_sd(x: np.ndarray, axis: int | None = None, keepdims: bool = False) -> np.ndarray:
    """``median(|x − median(x)|) / Φ⁻¹(3/4)`` along ``axis`` (all values when None):
    the SD of normal data, unmoved by a minority of outliers."""
    out = np.asarray(median_abs_deviation(x, axis=axis, scale="normal"))
    if keepdims:
        out = np.expand_dims(out, axis if axis is not None else tuple(range(np.ndim(x))))
    return out


def diff_noise_sd(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """White-noise SD from the robust SD of the first differences along ``axis``, / √2."""
    return robust_sd(np.diff(x, axis=axis), axis=axis) / math.sqrt(2.0)


def abs_diff_noise_sd(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """White-noise SD from the median absolute first difference along ``axis``,
    ``median(|Δx|) / (Φ⁻¹(3/4) √2)`` (not centred: a drift does not lower it)."""
    return np.median(np.abs(np.diff(x, axis=axis)), axis=axis) / DIFF_TO_SIGMA
