"""``mode: auto``: measure a movie's non-rigid deviation (:func:`nonrigid_deviation`) and choose
rigid or piecewise registration (:func:`resolve_mode`); :func:`correct_motion` wires it with the
three registration steps; :func:`registration_model` reads back what a shifts dataset used.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from typing import Any

import numpy as np
import xarray as xr

from somaflow.preprocess.motion.params import AUTO_CONFIDENCE, AUTO_RUN_FRAMES, MotionParams
from somaflow.preprocess.motion.register import apply_shifts, compute_template, estimate_shifts

log = logging.getLogger(__name__)


def nonrigid_deviation(movie: xr.DataArray, template: xr.DataArray, p: MotionParams) -> float:
    """How far a movie's motion is from rigid: RMS of its persistent patch deviations (px).

    ``p.auto_frames`` frames, in runs of ``AUTO_RUN_FRAMES`` consecutive frames
    evenly spaced over the movie, are registered piecewise against
    ``template`` (patch matches, without the whole-field refinement). Each
    patch's shift has the frame's mean over its patches removed (a common
    shift is rigid motion, or the rigid match's own error), then its median
    over the sampled frames (the template's own geometry). The
    measure is the square root of the deviations' lag-one autocovariance:
    the mean over consecutive frame pairs of a run, and over patches that
    found a match in both (not ``patch_fallback``), of the dot product of
    the two frames' deviations. A deformation persists from one frame to the
    next and enters at its full RMS; a patch's matching error is independent
    from frame to frame and averages out, so a motionless movie, a rigid one
    or one without structure (pure noise) measures near 0 whatever its
    noise. The covariance is read ``AUTO_CONFIDENCE`` standard errors below
    its estimate (the runs' means are its independent samples), so a movie
    whose matches are mostly error (pure noise: several px each) does not
    measure a deformation by chance. A deformation that changes completely
    between consecutive frames is not seen (and piecewise registration could
    not follow it either). 0 when no pair of matches exists.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed.
    template : xarray.DataArray
        (y, x), e.g. the rigid :func:`compute_template`.
    p : MotionParams
        Stage parameters; the patch geometry and ``auto_frames`` are read.

    Returns
    -------
    float
        Deviation in pixels.
    """
    n = int(movie.sizes["frame"])
    run = min(AUTO_RUN_FRAMES, n)
    n_runs = max(1, min(p.auto_frames, n) // run)
    starts = np.unique(np.round(np.linspace(0, n - run, n_runs)).astype(np.int64))
    idx = (starts[:, None] + np.arange(run)[None, :]).ravel()
    # the patch matches alone: the whole-field refinement costs as much again and barely moves them
    # (0.84 against 0.86 px on a 512x512 2p-large movie, in 14 s instead of 23 s on 2 cores)
    check = p.model_copy(update={"mode": "piecewise", "refine_iterations": 0})
    ds = estimate_shifts(movie.isel(frame=idx), template, check).compute()
    dev = ds["patch_shifts"].values.astype(np.float64) - ds["shifts"].values[:, None, None, :]
    ok = ~ds["patch_fallback"].values
    if not ok.any():
        return 0.0
    dev = np.where(ok[..., None], dev, np.nan)
    with warnings.catch_warnings():  # a frame or patch without matches stays NaN and is left out below
        warnings.simplefilter("ignore", RuntimeWarning)
        # the frame's common part is a rigid shift (or the rigid match's own error), not a deformation
        dev = dev - np.nanmean(dev, axis=(1, 2), keepdims=True)
        dev = dev - np.nanmedian(dev, axis=0, keepdims=True)
    dev = dev.reshape(len(starts), run, *dev.shape[1:])
    ok = ok.reshape(len(starts), run, *ok.shape[1:])
    pair = ok[:, :-1] & ok[:, 1:]
    if not pair.any():
        return 0.0
    prod = np.where(pair, (dev[:, :-1] * dev[:, 1:]).sum(-1), 0.0)
    per_run = pair.reshape(len(pair), -1).sum(1)
    runs = per_run > 0
    cov = float(prod.sum() / per_run.sum())
    # runs lie far apart: their means are independent samples of the covariance
    run_cov = prod.reshape(len(prod), -1).sum(1)[runs] / per_run[runs]
    se = float(run_cov.std(ddof=1) / math.sqrt(runs.sum())) if runs.sum() > 1 else 0.0
    return float(np.sqrt(max(cov - AUTO_CONFIDENCE * se, 0.0)))


def resolve_mode(movie: xr.DataArray, p: MotionParams) -> tuple[MotionParams, xr.DataArray]:
    """The registration model a movie gets, and its template.

    For ``p.mode`` other than ``"auto"``: ``p`` and :func:`compute_template`.
    For ``"auto"``: the rigid template, then :func:`nonrigid_deviation`
    against it; above ``p.auto_threshold`` the parameters become
    ``"piecewise"`` and the template is recomputed as piecewise mode builds
    it, otherwise they become ``"rigid"`` and the template is kept. The
    template's attrs record ``nonrigid_deviation`` (px) and ``motion_mode``.

    Returns
    -------
    params : MotionParams
        ``p`` with ``mode`` resolved (never ``"auto"``).
    template : xarray.DataArray
        (y, x) float32, as :func:`compute_template` returns.
    """
    if p.mode != "auto":
        return p, compute_template(movie, p)
    rigid = p.model_copy(update={"mode": "rigid"})
    template = compute_template(movie, rigid)
    deviation = nonrigid_deviation(movie, template, rigid)
    chosen = rigid
    if deviation > p.auto_threshold:
        chosen = p.model_copy(update={"mode": "piecewise"})
        template = compute_template(movie, chosen)
    log.info("motion mode auto: non-rigid deviation %.2f px (threshold %.2f) -> %s",
             deviation, p.auto_threshold, chosen.mode)
    template.attrs.update(nonrigid_deviation=deviation, motion_mode=chosen.mode)
    return chosen, template


def registration_model(shifts_ds: xr.Dataset, default: str) -> dict[str, Any]:
    """The model a shifts dataset was estimated with (``"auto"`` resolved).

    Parameters
    ----------
    shifts_ds : xarray.Dataset
        :func:`estimate_shifts`' output (its ``motion_params`` attr), as stored.
    default : str
        The mode to report when the dataset does not record one (``"none"``).

    Returns
    -------
    dict
        ``{"mode": ...}``, plus ``"nonrigid_deviation"`` (px, 3 decimals) where
        ``auto`` measured it (a ``nonrigid_deviation`` attr).
    """
    out: dict[str, Any] = {"mode": default}
    if "motion_params" in shifts_ds.attrs:
        out["mode"] = json.loads(shifts_ds.attrs["motion_params"]).get("mode", default)
    if "nonrigid_deviation" in shifts_ds.attrs:
        out["nonrigid_deviation"] = round(float(shifts_ds.attrs["nonrigid_deviation"]), 3)
    return out


def correct_motion(movie: xr.DataArray, p: MotionParams) -> tuple[xr.DataArray, xr.Dataset]:
    """Template, shifts and registered movie in one call.

    The template is computed now (it reads ``p.template_frames`` frames); the
    shifts and the registered movie are lazy and share their graph, so
    computing both together (``dask.compute(corrected, shifts_ds)``, or writing
    the corrected movie after ``shifts_ds = shifts_ds.persist()``) reads every
    frame chunk once.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed.
    p : MotionParams
        Stage parameters.

    Returns
    -------
    corrected : xarray.DataArray
        (frame, y, x) float32, lazy; see :func:`apply_shifts`.
    shifts_ds : xarray.Dataset
        See :func:`estimate_shifts`; the template is added as ``template`` (y, x) float32.
    """
    p, template = resolve_mode(movie, p)
    shifts_ds = estimate_shifts(movie, template, p)
    corrected = apply_shifts(movie, shifts_ds, p)
    shifts_ds["template"] = template.drop_vars([c for c in template.coords if c not in ("y", "x")])
    return corrected, shifts_ds

