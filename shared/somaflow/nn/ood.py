"""Out-of-distribution check of a movie against a model's training data.

:func:`input_statistics` (noise level, neuron radius, median cell SNR, frame
rate), :func:`cell_snr`, :func:`summarize_statistics` (over the training
sessions, stored in the checkpoint) and :func:`out_of_distribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from somaflow.errors import InputError, ParameterError
from somaflow.footprints import project, sparse_masks
from somaflow.frames import check_movie
from somaflow.nn.inputs import pixel_statistics
from somaflow.nn.targets import check_masks
from somaflow.preprocess.temporal import BinParams
from somaflow.robust import abs_diff_noise_sd

#: statistics :func:`out_of_distribution` compares (positive numbers, compared on a ratio scale)
OOD_KEYS: dict[str, str] = {
    "noise_level": "noise level (median pixel noise SD / median baseline)",
    "neuron_radius": "neuron radius (px)",
    "median_snr": "median cell peak-to-noise ratio",
    "fps": "frame rate (Hz)",
}


def trace_snr(traces: np.ndarray) -> np.ndarray:
    """Peak-to-noise ratio of each trace: ``(max − median) / noise``.

    ``noise`` is the white-noise SD from the first differences,
    ``median(|Δx|) / (0.6745 √2)``; a trace without noise gets 0.

    Parameters
    ----------
    traces : numpy.ndarray
        (N, T) fluorescence (any units), T ≥ 2.

    Returns
    -------
    numpy.ndarray
        (N,) float64.
    """
    t = np.asarray(traces, np.float64)
    if t.ndim != 2 or t.shape[1] < 2:
        raise InputError(
            f"trace_snr needs (unit, frame) traces with ≥ 2 frames, got shape {t.shape}."
        )
    noise = abs_diff_noise_sd(t, axis=1)
    peak = t.max(axis=1) - np.median(t, axis=1)
    return np.where(noise > 0, peak / np.where(noise > 0, noise, 1.0), 0.0)


def cell_snr(movie: xr.DataArray, masks: np.ndarray) -> np.ndarray:
    """Peak-to-noise ratio of each mask's mean trace (:func:`trace_snr`).

    The same measurement for ground-truth masks (training) and for the
    units a method found (inference), so the two are comparable.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), numpy- or dask-backed (one pass, streamed).
    masks : numpy.ndarray
        (N, H, W) bool.

    Returns
    -------
    numpy.ndarray
        (N,) float64; 0 for empty masks.
    """

    check_movie(movie, "cell_snr", min_frames=2, why=" to estimate the noise")
    m = check_masks(masks, "cell_snr")
    if m.shape[1:] != tuple(movie.shape[1:]):
        raise InputError(
            f"masks are {m.shape[1:]} (y, x) but the movie is {tuple(movie.shape[1:])}."
        )
    if len(m) == 0:
        return np.zeros(0)
    rows = sparse_masks(m.astype(np.float64))
    area = np.asarray(rows.sum(axis=1)).ravel()
    rows = rows.multiply(1.0 / np.maximum(area, 1)[:, None]).tocsr().astype(np.float32)
    traces = project(movie, rows)
    if isinstance(traces, da.Array):
        traces = traces.compute()
    snr = trace_snr(np.asarray(traces))
    return np.where(area > 0, snr, 0.0)


def input_statistics(
    source: xr.DataArray | xr.Dataset,
    neuron_radius: float,
    *,
    fps: float | None = None,
    modality: str | None = None,
    masks: np.ndarray | None = None,
    snr: np.ndarray | None = None,
    movie: xr.DataArray | None = None,
) -> dict[str, Any]:
    """The statistics of one session that the out-of-distribution check compares.

    The same numbers are computed for every training session (from the
    simulation's truth) and for an unlabelled session at inference (from the
    units found), so they are comparable.

    Parameters
    ----------
    source : xarray.DataArray or xarray.Dataset
        The (frame, y, x) movie, or its :func:`pixel_statistics`.
    neuron_radius : float
        Soma radius (px): the preset's at training, ``--neuron-radius`` at inference.
    fps, modality : optional
        Default to the movie's ``fps`` / ``modality`` attrs.
    masks : numpy.ndarray, optional
        (N, H, W) bool cell masks (truth at training, units at inference);
        their :func:`cell_snr` gives ``median_snr``. Needs the movie.
    snr : numpy.ndarray, optional
        Per-cell peak-to-noise ratios already measured with :func:`cell_snr`.
    movie : xarray.DataArray, optional
        The movie, when ``source`` is its statistics and ``masks`` are given.

    Returns
    -------
    dict
        JSON-serialisable: ``noise_level`` (median pixel noise SD per frame /
        median baseline, dimensionless), ``neuron_radius`` (px),
        ``median_snr`` (or None), ``fps`` (Hz or None), ``modality`` (or None).
    """
    if isinstance(source, xr.DataArray):
        movie = source
        stats = pixel_statistics(source)
    elif isinstance(source, xr.Dataset) and "baseline" in source and "noise" in source:
        stats = source
    else:
        raise InputError(
            "input_statistics needs the (frame, y, x) movie or its pixel_statistics(movie); "
            "summary images carry no per-pixel noise estimate."
        )
    attrs = movie.attrs if movie is not None else {}
    fps = fps if fps is not None else attrs.get("fps")
    modality = modality if modality is not None else attrs.get("modality")
    base = float(np.median(stats["baseline"].values))
    noise = float(np.median(stats["noise"].values))
    if snr is None and masks is not None:
        if movie is None:
            raise InputError(
                "input_statistics: masks were given without the movie; pass movie=... too."
            )
        snr = cell_snr(movie, masks)
    median_snr = float(np.median(snr)) if snr is not None and len(snr) else None
    return {
        "noise_level": noise / base if base > 0 else float("inf"),
        "neuron_radius": float(neuron_radius),
        "median_snr": median_snr,
        "fps": float(fps) if fps is not None else None,
        "modality": modality,
    }


def summarize_statistics(sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The training range of each statistic, for a checkpoint's ``input_stats``.

    Parameters
    ----------
    sessions : sequence of dict
        :func:`input_statistics` of every training session.

    Returns
    -------
    dict
        For each key of :data:`OOD_KEYS`: ``{"min", "max", "median", "n"}``
        over the sessions that have it; ``"modality"``: the sorted list of
        modalities seen; ``"n_sessions"``.
    """
    out: dict[str, Any] = {"n_sessions": len(sessions)}
    for key in OOD_KEYS:
        vals = [
            float(s[key]) for s in sessions if s.get(key) is not None and np.isfinite(float(s[key]))
        ]
        if vals:
            out[key] = {
                "min": min(vals),
                "max": max(vals),
                "median": float(np.median(vals)),
                "n": len(vals),
            }
    mods = sorted({str(s["modality"]) for s in sessions if s.get("modality")})
    if mods:
        out["modality"] = mods
    return out


def out_of_distribution(
    stats_now: Mapping[str, Any],
    training_stats: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    margin: float = 1.5,
    rate: Callable[[float], float] | None = None,
) -> list[str]:
    """Warnings for the statistics of a session that fall outside the training range.

    A positive statistic ``v`` is out of range when ``v < min / margin`` or
    ``v > max × margin`` (a ratio scale: noise levels, radii, SNRs and frame
    rates vary by factors, not offsets); a modality is out of range when no
    training session had it. Missing values are not judged.

    Parameters
    ----------
    stats_now : dict
        :func:`input_statistics` of the session.
    training_stats : dict or sequence of dict
        :func:`summarize_statistics` of the training sessions (a
        checkpoint's ``input_stats``), or the per-session dicts themselves.
    margin : float
        Tolerance factor beyond the training range, > 1.
    rate : callable, optional
        Maps a frame rate (Hz) to the rate the model actually sees, applied to
        the session's and the training range's alike. The summary-image
        detectors pass :func:`detection_rate`: their images come from the movie
        binned to ~6 Hz (2p), so a 30 Hz and a 10 Hz movie give them alike
        inputs and only the binned rate is judged.

    Returns
    -------
    list of str
        One human-readable line per statistic out of range; empty when the
        session looks like the training data.
    """
    if not margin >= 1:
        raise ParameterError(
            f"margin must be ≥ 1 (a factor beyond the training range), got {margin}."
        )
    summary = (
        training_stats
        if isinstance(training_stats, Mapping)
        else summarize_statistics(training_stats)
    )
    warnings: list[str] = []
    for key, label in OOD_KEYS.items():
        value = stats_now.get(key)
        rng = summary.get(key)
        if value is None or not isinstance(rng, Mapping):
            continue
        v, lo, hi = float(value), float(rng["min"]), float(rng["max"])
        if key == "fps" and rate is not None:
            v, lo, hi = rate(v), rate(lo), rate(hi)
            label = "frame rate after binning for the summary images (Hz)"
        if not np.isfinite(v):
            warnings.append(f"{label} is {v}: the input statistics could not be measured.")
        elif v < lo / margin or v > hi * margin:
            side = "below" if v < lo / margin else "above"
            warnings.append(
                f"{label} {v:.3g} is {side} the training range {lo:.3g}–{hi:.3g} (margin ×{margin:g})"
            )
    mods = summary.get("modality")
    if stats_now.get("modality") and mods and stats_now["modality"] not in mods:
        warnings.append(
            f"modality {stats_now['modality']} was not in the training data ({', '.join(mods)})"
        )
    return warnings


def detection_rate(fps: float, modality: str) -> float:
    """Frame rate (Hz) of the detection movie the summary images are made of.

    ``fps / factor`` with the default binning of ``somaflow run``
    (:meth:`BinParams.for_movie`): 2p movies are binned to ~6 Hz, 1p movies
    to ~10 Hz, never faster than recorded. Non-positive or non-finite rates
    are returned as they are (the caller reports them).
    """

    f = float(fps)
    if not (np.isfinite(f) and f > 0):
        return f
    return f / BinParams.for_movie(f, modality, 1.0).factor(f)

