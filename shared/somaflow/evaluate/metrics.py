"""``somaflow evaluate``: score a prediction against ground truth.

The headline numbers (top-level ``precision``, ``recall``, ``f1``) use the
IoU >= 0.5 + Hungarian convention of STNeuroNet (Eq. 10-14). CaImAn's and
neurofinder's conventions are reported alongside, so that numbers can be set
next to published ones. A global integer offset between the two mask sets is
estimated (cross-correlation of the summed mask images, refined locally) and
undone when that yields more IoU matches. Matched units' traces
and spikes are compared with the truth when both sides have them.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from somaflow.errors import InputError, ParameterError
from somaflow.evaluate import traces as tr
from somaflow.evaluate.groundtruth import Truth, load_prediction, load_truth
from somaflow.evaluate.matching import (
    CAIMAN_MIN_DIST,
    CAIMAN_THRESH_COST,
    NEUROFINDER_THRESHOLD,
    Matching,
    SparseMasks,
    match_caiman,
    match_iou,
    match_neurofinder,
)
from somaflow.evaluate.offset import estimate_offset, refine_offset

log = logging.getLogger(__name__)

#: the correlation peak is refined over shifts within this many pixels of it
OFFSET_REFINE_RADIUS = 2


@dataclass(frozen=True)
class EvaluateParams:
    """Parameters of :func:`evaluate`, validated when built.

    Attributes
    ----------
    iou_threshold : float
        Minimum IoU of a match in the main convention, in (0, 1].
    containment : float
        Fraction of the smaller mask inside the larger one that counts as
        containment (distance 0, Eq. 14); 1.0 = exact.
    allow_offset : bool
        Search for a global integer offset and undo it if it helps.
    max_shift : int
        Largest offset searched, pixels.
    spike_sigma : float
        Gaussian SD, in predicted frames, that smooths both spike trains.
    """

    iou_threshold: float = 0.5
    containment: float = 1.0
    allow_offset: bool = True
    max_shift: int = 20
    spike_sigma: float = tr.SPIKE_SIGMA_FRAMES

    def __post_init__(self) -> None:
        if not 0 < self.iou_threshold <= 1:
            raise ParameterError(f"iou_threshold must be in (0, 1], got {self.iou_threshold}. Use e.g. --iou 0.5.")
        if not 0 < self.containment <= 1:
            raise ParameterError(f"containment must be in (0, 1], got {self.containment}.")
        if int(self.max_shift) != self.max_shift or self.max_shift < 0:
            raise ParameterError(f"max_shift must be a non-negative integer (pixels), got {self.max_shift!r}.")
        if not self.spike_sigma > 0:
            raise ParameterError(f"spike_sigma must be > 0 frames, got {self.spike_sigma}.")


def _num(x: float | None) -> float | None:
    """A JSON-safe float (None for NaN/inf)."""
    if x is None:
        return None
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _scores(m: Matching) -> dict[str, Any]:
    return {
        "precision": _num(m.precision),
        "recall": _num(m.recall),
        "f1": _num(m.f1),
        "n_matched": m.n_matched,
    }


def _activity(
    pred: Truth, truth: Truth, m: Matching, sigma: float, notes: list[str]
) -> tuple[dict[str, Any], dict[str, Any], int | None, np.ndarray | None]:
    """Trace and spike correlations of the matched pairs (summaries, the binning factor,
    and each matched pair's trace correlation in ``m``'s order, or None)."""
    empty = {"median": None, "mean": None, "n": 0}
    trace_c: dict[str, Any] = dict(empty)
    spike_c: dict[str, Any] = dict(empty)
    factor: int | None = None
    trace_r: np.ndarray | None = None
    for name, out in (("traces", trace_c), ("spikes", spike_c)):
        p_arr, t_arr = getattr(pred, name), getattr(truth, name)
        if p_arr is None or t_arr is None:
            side = "prediction" if p_arr is None else "ground truth"
            notes.append(f"{name} not compared: the {side} has none.")
            continue
        if m.n_matched == 0:
            continue
        k, note = tr.binning_factor(t_arr.shape[1], p_arr.shape[1])
        if note and note not in notes:
            notes.append(note)
        if k is None:
            continue
        factor = k
        a, b = p_arr[m.pred], t_arr[m.true]
        if name == "traces":
            r = trace_r = tr.trace_correlations(a, b, k)
        else:
            r = tr.spike_correlations(a, b, k, sigma)
        out.update(tr.summarize(r))
        n_nan = int(np.sum(~np.isfinite(r)))
        if n_nan:
            notes.append(f"{n_nan} matched pair(s) with a constant {name[:-1]} series were left out of its correlation.")
    spike_c["sigma_frames"] = sigma
    return trace_c, spike_c, factor, trace_r


def evaluate(
    pred: Truth | str | os.PathLike[str],
    truth: Truth | str | os.PathLike[str],
    *,
    iou_threshold: float = 0.5,
    allow_offset: bool = True,
    include_matches: bool = False,
    max_shift: int = 20,
    spike_sigma: float = tr.SPIKE_SIGMA_FRAMES,
    containment: float = 1.0,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Compare predicted units with ground truth.

    Parameters
    ----------
    pred : Truth or str or os.PathLike
        The prediction, or a URL for :func:`load_prediction` (accepted units of
        a result zarr).
    truth : Truth or str or os.PathLike
        The ground truth, or a URL for :func:`load_truth`; a regions.json is
        rasterized on the prediction's ``(y, x)`` grid.
    iou_threshold : float
        Minimum IoU of the main convention (0.5).
    allow_offset : bool
        Estimate a global integer offset (at most ``max_shift`` pixels) and undo
        it when that gives more IoU matches.
    include_matches : bool
        Add ``matches``: ``[pred_id, true_id, iou]`` of every IoU match, where
        ids are :attr:`Truth.ids` (a result store's unit index).
    max_shift : int
        Offset search range, pixels.
    spike_sigma : float
        Gaussian SD in predicted frames used to smooth spike trains.
    containment : float
        Containment fraction of Eq. 14 (1.0 = exact).
    storage_options : dict, optional
        fsspec options for URLs.

    Returns
    -------
    dict
        JSON-serialisable: ``precision``, ``recall``, ``f1``, ``n_pred``,
        ``n_true``, ``n_matched``, ``mean_iou``, ``iou_threshold``, ``offset``
        ``[dy, dx]`` the shift applied to the prediction's masks (``[0, 0]``
        when none helped; a prediction displaced by ``(+3, -2)`` reports
        ``[-3, 2]``), ``offset_estimated`` (the best shift found, applied or
        not: correlation peak refined by :func:`refine_offset`),
        ``caiman`` {precision, recall, f1, n_matched, thresh_cost, min_dist},
        ``neurofinder`` {precision, recall, combined, inclusion, exclusion,
        n_matched, threshold}, ``trace_correlation`` {median, mean, n},
        ``spike_correlation`` {median, mean, n, sigma_frames},
        ``temporal_binning``, ``notes``, ``params``, ``pred_source``,
        ``truth_source`` and optionally ``matches`` with
        ``match_trace_correlations`` (each match's trace correlation, in the
        same order; None where traces were not compared). Undefined values
        are None.

    Raises
    ------
    InputError
        The two mask sets are on different ``(y, x)`` grids, or an input is malformed.
    StoreError
        An input URL cannot be read.
    ParameterError
        An invalid parameter.
    """
    params = EvaluateParams(
        iou_threshold=iou_threshold,
        containment=containment,
        allow_offset=allow_offset,
        max_shift=max_shift,
        spike_sigma=spike_sigma,
    )
    if not isinstance(pred, Truth):
        pred = load_prediction(str(pred), storage_options=storage_options)
    if not isinstance(truth, Truth):
        truth = load_truth(str(truth), shape=pred.shape, storage_options=storage_options)
    if pred.shape != truth.shape:
        raise InputError(
            f"the prediction's masks are {pred.shape[0]}x{pred.shape[1]} (y, x) pixels but the ground "
            f"truth's are {truth.shape[0]}x{truth.shape[1]}; both must cover the same field of view. "
            "Evaluate against ground truth of the same movie, or pass the movie's shape when "
            "loading a regions.json."
        )
    notes = [*truth.notes, *pred.notes]

    t_sp = SparseMasks.from_dense(truth.masks)
    p_sp = SparseMasks.from_dense(pred.masks)
    m_iou = match_iou(p_sp, t_sp, params.iou_threshold, containment=params.containment)

    estimated = (0, 0)
    applied = (0, 0)
    if params.allow_offset and pred.n and truth.n:
        coarse = estimate_offset(p_sp, t_sp, params.max_shift)
        estimated = refine_offset(
            p_sp, t_sp, coarse, OFFSET_REFINE_RADIUS, params.iou_threshold, containment=params.containment
        )
        if estimated != (0, 0):
            s_sp = p_sp.shifted(*estimated)
            m_shift = match_iou(s_sp, t_sp, params.iou_threshold, containment=params.containment)
            if m_shift.n_matched > m_iou.n_matched:
                notes.append(
                    f"the prediction was shifted by (dy, dx) = {estimated} pixels to undo a global "
                    f"offset: {m_shift.n_matched} IoU matches instead of {m_iou.n_matched}."
                )
                applied, p_sp, m_iou = estimated, s_sp, m_shift
            else:
                notes.append(
                    f"an offset of {estimated} pixels was estimated but not applied: it did not add IoU matches."
                )

    m_ca = match_caiman(p_sp, t_sp)
    m_nf = match_neurofinder(p_sp, t_sp)
    trace_c, spike_c, factor, trace_r = _activity(pred, truth, m_iou, params.spike_sigma, notes)

    out: dict[str, Any] = {
        "precision": _num(m_iou.precision),
        "recall": _num(m_iou.recall),
        "f1": _num(m_iou.f1),
        "n_pred": pred.n,
        "n_true": truth.n,
        "n_matched": m_iou.n_matched,
        "mean_iou": _num(m_iou.iou.mean()) if m_iou.n_matched else None,
        "iou_threshold": params.iou_threshold,
        "offset": [int(applied[0]), int(applied[1])],
        "offset_estimated": [int(estimated[0]), int(estimated[1])],
        "caiman": {**_scores(m_ca), "thresh_cost": CAIMAN_THRESH_COST, "min_dist": CAIMAN_MIN_DIST},
        "neurofinder": {
            "precision": _num(m_nf.precision),
            "recall": _num(m_nf.recall),
            "combined": _num(m_nf.f1),
            "inclusion": _num(m_nf.inclusion.mean()) if m_nf.n_matched else 0.0,
            "exclusion": _num(m_nf.exclusion.mean()) if m_nf.n_matched else 0.0,
            "n_matched": m_nf.n_matched,
            "threshold": NEUROFINDER_THRESHOLD,
        },
        "trace_correlation": trace_c,
        "spike_correlation": spike_c,
        "temporal_binning": factor,
        "notes": notes,
        "params": asdict(params),
        "pred_source": pred.source,
        "truth_source": truth.source,
    }
    if include_matches:
        out["matches"] = [
            [int(pred.ids[i]), int(truth.ids[j]), _num(v)]
            for i, j, v in zip(m_iou.pred, m_iou.true, m_iou.iou, strict=True)
        ]
        out["match_trace_correlations"] = (
            [_num(v) for v in trace_r] if trace_r is not None else [None] * m_iou.n_matched
        )
    log.info("evaluated %d predicted vs %d true units: F1 %.3f", pred.n, truth.n, m_iou.f1)
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_report(metrics: dict[str, Any]) -> str:
    """A short human-readable table of :func:`evaluate`'s output, for the CLI."""
    ca, nf = metrics["caiman"], metrics["neurofinder"]
    n_pred, n_true = metrics["n_pred"], metrics["n_true"]
    rows = [
        (f"IoU >= {metrics['iou_threshold']:g}, Hungarian", metrics["precision"], metrics["recall"],
         metrics["f1"], metrics["n_matched"]),
        ("CaImAn (IoU > 0.3, 10 px gate)", ca["precision"], ca["recall"], ca["f1"], ca["n_matched"]),
        ("neurofinder (centres < 5 px)", nf["precision"], nf["recall"], nf["combined"], nf["n_matched"]),
    ]
    w = max(len(r[0]) for r in rows)
    lines = [
        f"{n_pred} predicted units, {n_true} ground-truth units",
        f"{'convention':<{w}}  precision  recall     F1  matched",
    ]
    for name, p, r, f, k in rows:
        lines.append(f"{name:<{w}}  {_fmt(p):>9}  {_fmt(r):>6}  {_fmt(f):>5}  {k:>7}")
    lines.append(
        f"mean IoU of matches {_fmt(metrics.get('mean_iou'))}; neurofinder inclusion "
        f"{_fmt(nf['inclusion'])}, exclusion {_fmt(nf['exclusion'])}"
    )
    dy, dx = metrics["offset"]
    ey, ex = metrics["offset_estimated"]
    params = metrics.get("params", {})
    searched = f"searched up to {params.get('max_shift', 20)} px"
    if not params.get("allow_offset", True):
        lines.append("global offset: not searched (--no-offset)")
    elif (dy, dx) != (0, 0):
        lines.append(f"global offset: {searched}; undone by shifting the prediction dy={dy}, dx={dx} px "
                     "(--no-offset scores without it)")
    elif (ey, ex) != (0, 0):
        lines.append(f"global offset: {searched}; dy={ey}, dx={ex} px found but not applied (no more matches)")
    else:
        lines.append(f"global offset: {searched}; none found")
    tc, sc = metrics["trace_correlation"], metrics["spike_correlation"]
    if tc["n"]:
        lines.append(
            f"trace correlation of matched units: median {_fmt(tc['median'])}, mean {_fmt(tc['mean'])} (n={tc['n']})"
        )
    else:
        lines.append("trace correlation: not computed (no matched pair with a trace on both sides; see the notes)")
    if sc["n"]:
        lines.append(
            f"spike correlation (Gaussian sigma {sc.get('sigma_frames', '-')} frames): "
            f"median {_fmt(sc['median'])} (n={sc['n']})"
        )
    lines.extend(f"note: {n}" for n in metrics.get("notes", []))
    return "\n".join(lines)
