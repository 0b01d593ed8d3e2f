"""The whole CNMF method on one session (:func:`cnmf_units`): fit, morphology units,
full-rate traces, quality and acceptance (steps 5-7 of :mod:`somaflow.extract.cnmf`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import xarray as xr
from scipy import ndimage

from somaflow.extract.cnmf.fit import RegionReader, cnmf, fit_bin_factor, fit_movie
from somaflow.extract.cnmf.params import CnmfParams
from somaflow.extract.cnmf.patch import _snr
from somaflow.extract.cnmf.quality import (
    _contrast_exempt,
    _overlap_fractions,
    mask_contrast,
    mask_width,
    masks_from_footprints,
)
from somaflow.extract.cnmf.temporal import full_rate_traces, neuropil_traces, temporal_outputs
from somaflow.footprints import dense_footprints, sparse_footprints
from somaflow.traces import TraceParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MorphologyUnits:
    """Units of an anatomical detector, handed to CNMF as its morphology units.

    Attributes
    ----------
    masks : numpy.ndarray
        (n, y, x) bool.
    score : numpy.ndarray
        (n,) float, the detector's confidence.
    detector : str
        Which detector made them (``local-maxima`` or a CNN detector's name).
    fell_back : bool
        ``morphology: auto`` fell back to local maxima because the movie is
        outside the CNN's training distribution.
    notes : list of str
        Out-of-distribution notes to carry into the result.
    """

    masks: np.ndarray
    score: np.ndarray
    detector: str = "local-maxima"
    fell_back: bool = False
    notes: tuple[str, ...] = ()


def cnmf_units(
    movie: xr.DataArray,
    images: xr.Dataset,
    cp: CnmfParams,
    tp: TraceParams,
    *,
    fps: float,
    morphology: MorphologyUnits | None = None,
    fit_data: xr.DataArray | None = None,
    read: RegionReader | None = None,
) -> tuple[xr.Dataset, xr.Dataset]:
    """The whole CNMF method: fit, silent cells, full-rate traces, quality.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) trace movie (motion-corrected; background-removed for
        1p), dask-backed.
    images : xarray.Dataset
        Summary images of the detection movie (``mean_image`` for the
        contrast test and the silent cells' footprints).
    cp : CnmfParams
    tp : TraceParams
        ΔF/F and deconvolution of the units' traces.
    fps : float
        Frame rate of ``movie`` (Hz).
    morphology : MorphologyUnits, optional
        The anatomical detector's units (``add_silent``, ``seed_morphology``);
        None: none.
    fit_data, read : optional
        The fit movie (:func:`fit_movie` of ``movie``, e.g. read back from a
        scratch store) and its region reader (see :func:`cnmf`); default:
        ``fit_movie(movie, cp)`` in memory.

    Returns
    -------
    units, traces : xarray.Dataset
        ``units``: ``masks``, ``footprints``, ``score``, ``accepted``,
        ``spatial_correlation``, ``contrast``, ``width`` and ``kind``
        (``cnmf`` or ``morphology``); ``traces``: ``traces``, ``dff``,
        ``spikes``, ``raw`` (unit, frame) and ``snr`` (unit).
    """
    ny, nx = int(movie.sizes["y"]), int(movie.sizes["x"])
    if fit_data is None:
        fit_data = fit_movie(movie, cp)
    k = fit_bin_factor(int(movie.sizes["frame"]), cp)
    detector = morphology.detector if morphology is not None else "local-maxima"
    fell_back = morphology.fell_back if morphology is not None else False
    notes = list(morphology.notes) if morphology is not None else []
    priority = cp.priority if cp.priority != "auto" else ("cnmf" if detector == "local-maxima" else "morphology")
    lm_masks = (np.asarray(morphology.masks, bool) if morphology is not None
                else np.zeros((0, ny, nx), bool))
    lm_score = np.asarray(morphology.score, np.float64) if morphology is not None else np.zeros(0)
    # the seed traces are on the binned fit movie: k frames per sample
    fit = cnmf(fit_data, cp, fps=fps / k, read=read, morph_masks=lm_masks if cp.seed_morphology else None)
    A = fit.footprints
    masks = masks_from_footprints(A, (ny, nx), cp.mask_fraction)
    # components seeded from a morphology mask keep that (anatomical) mask unless
    # the fit found an active cell there (the detector's masks are often too small)
    area = masks.reshape(len(masks), math.prod(masks.shape[1:])).sum(axis=1)
    r2 = math.pi * cp.neuron_radius**2
    size_ok = (area >= cp.min_area_fraction * r2) & (area <= cp.max_area_fraction * r2)
    is_m = fit.origin >= 0
    det_area = np.zeros(len(area))
    det_area[is_m] = lm_masks[fit.origin[is_m]].sum(axis=(1, 2))
    fitted = (size_ok & (fit.snr >= cp.min_snr) & (fit.spatial_corr >= cp.min_spatial_correlation)
              & (det_area < cp.morph_small_fraction * r2) & (area > det_area))
    use_det = is_m & ~fitted
    masks[use_det] = lm_masks[fit.origin[use_det]]
    ok = size_ok | use_det
    A, masks, rval, origin = A[np.flatnonzero(ok)], masks[ok], fit.spatial_corr[ok], fit.origin[ok]
    contrast = mask_contrast(masks, np.asarray(images["mean_image"], np.float32), cp.neuron_radius)
    width = mask_width(masks)
    kind = ["morphology" if o >= 0 else "cnmf" for o in origin]
    extra_score: list[float] = [float(lm_score[o]) for o in origin if o >= 0]
    if cp.add_silent:
        seeded = np.zeros(len(lm_masks), bool)
        seeded[origin[origin >= 0]] = True
        # sparse mask rows: a dense (unit, pixel) product of a 512x512 field costs seconds
        mine = sp.diags((contrast >= cp.min_contrast).astype(np.float32)) @ sp.csr_matrix(
            masks.reshape(len(masks), math.prod(masks.shape[1:])), dtype=np.float32)
        cand = sp.csr_matrix(lm_masks.reshape(len(lm_masks), math.prod(lm_masks.shape[1:])), dtype=np.float32)
        frac_m, frac_c = _overlap_fractions(cand, mine)
        if priority == "morphology" and frac_m.size:
            # a CNMF unit overlapping a morphology unit is that cell: keep the morphology mask
            same = (np.maximum(frac_c, frac_m) >= 0.3).any(axis=0)
            same &= origin < 0
            A, masks, rval, contrast, width = (A[np.flatnonzero(~same)], masks[~same], rval[~same], contrast[~same],
                                               width[~same])
            origin = origin[~same]
            kind = ["morphology" if o >= 0 else "cnmf" for o in origin]
            new = ~seeded
        else:
            new = frac_m.max(axis=1) < 0.3 if frac_m.shape[1] else np.ones(len(lm_masks), bool)
            new &= ~seeded
        if new.any():
            add_masks = lm_masks[new]
            A = sp.vstack([A, sparse_footprints(add_masks, images["mean_image"].values)]).tocsr()
            masks = np.concatenate([masks, add_masks])
            kind += ["morphology"] * int(new.sum())
            extra_score += [float(s) for s in lm_score[new]]
            rval = np.concatenate([rval, np.full(int(new.sum()), np.nan)])
            contrast = np.concatenate([contrast, np.full(int(new.sum()), np.nan)])
            width = np.concatenate([width, mask_width(add_masks)])
    raw, under = full_rate_traces(movie, A.astype(np.float32), fit.background)
    if cp.traces == "demixed":
        calcium, spikes, dff = temporal_outputs(raw, raw + under, fps, tp)
    else:
        calcium, spikes, dff = neuropil_traces(movie, A, masks, tp)
    snr = _snr(ndimage.uniform_filter1d(raw, 3, axis=-1)) * math.sqrt(3) if raw.shape[0] else np.zeros(0)
    snr = np.where(np.isfinite(snr), snr, 0)
    kind_arr = np.array(kind, dtype=object).astype(str)
    is_cnmf = kind_arr == "cnmf"
    s_snr = snr / (snr + cp.min_snr)
    s_r = np.clip(np.nan_to_num(rval, nan=0.0), 0, 1)
    score = np.where(is_cnmf, 0.5 * s_snr + 0.5 * s_r, 0.0)
    # every CNMF criterion but the anatomical contrast (see contrast_exempt_size)
    active = (is_cnmf & (snr >= cp.min_snr) & (np.nan_to_num(rval, nan=-1) >= cp.min_spatial_correlation)
              & (width >= cp.min_width_radii * cp.neuron_radius))
    accepted = active & (np.nan_to_num(contrast, nan=-np.inf) >= cp.min_contrast)
    if extra_score:
        score[~is_cnmf] = extra_score
        m_area = masks[~is_cnmf].sum(axis=(1, 2))
        accepted[~is_cnmf] = (m_area >= cp.morph_min_area_fraction * r2) & (m_area <= cp.max_area_fraction * r2)
    if fell_back and not cp.accept_fallback_morphology and (~is_cnmf).any():
        accepted[~is_cnmf] = False
        notes.append(f"cnmf.morphology auto: used local-maxima, whose {int((~is_cnmf).sum())} morphology units "
                     "are kept but not accepted (cnmf.accept_fallback_morphology)")
    if cp.contrast_exempt_size is not None:
        accepted |= _contrast_exempt(masks, accepted, active, width, cp)
    units = xr.Dataset({
        "masks": (("unit", "y", "x"), masks.astype(bool)),
        # lazy: densified block by block when written (a 512x512 field of 900 units is 0.9 GB dense)
        "footprints": (("unit", "y", "x"), dense_footprints(A, (ny, nx))),
        "score": ("unit", np.clip(score, 0, 1).astype(np.float32)),
        "accepted": ("unit", accepted.astype(bool)),
        "spatial_correlation": ("unit", np.asarray(rval, np.float32)),
        "contrast": ("unit", np.asarray(contrast, np.float32)),
        "width": ("unit", np.asarray(width, np.float32)),
        "kind": ("unit", kind_arr),
    }, attrs={"n_seeds": int(fit.seeds.sizes["seed"])})
    units.attrs["morphology_detector"] = detector
    if notes:
        units.attrs["ood_warnings"] = json.dumps(notes)
    traces = xr.Dataset({
        "traces": (("unit", "frame"), calcium),
        "dff": (("unit", "frame"), dff),
        "spikes": (("unit", "frame"), spikes),
        "snr": ("unit", snr.astype(np.float32)),
        "raw": (("unit", "frame"), raw.astype(np.float32)),
    })
    return units, traces

