"""The HTML report of a result (``somaflow report``; also written by every ``run``).

One self-contained HTML file — figures inlined as PNG data URIs, styles
inline, no script — holding: the mean / max / correlation images with every
unit's outline (accepted solid and coloured by score, rejected dashed), the
score distribution, a grid of example ΔF/F traces with their deconvolved
spikes, the motion shifts over time, per-stage timings, the parameters,
out-of-distribution warnings and, when ground truth is given, the evaluation
table (``somaflow evaluate``'s three conventions) with the truth's outlines.

:func:`build_report` turns an opened result into HTML text;
:func:`write_report` reads a result URL and writes the file atomically. A run's
report sits next to its result: ``RESULT.zarr`` -> ``RESULT.report.html``
(:func:`default_report_url`), outside the result zarr so the result schema is
untouched.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import jinja2
import numpy as np
import xarray as xr

from somaflow import __version__
from somaflow.evaluate import evaluate, load_truth
from somaflow.io import schema, stores
from somaflow.report import figures

#: how many example traces the report shows at most
N_EXAMPLE_TRACES = 12
#: suffix of a run's report next to its result
REPORT_SUFFIX = ".report.html"

_ENV = jinja2.Environment(loader=jinja2.PackageLoader("somaflow.report", "."),
                          autoescape=jinja2.select_autoescape(["html", "j2"]),
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def default_report_url(result_url: str) -> str:
    """``RESULT.zarr`` -> ``RESULT.report.html`` (next to the result, not inside it)."""
    url = stores.normalize_url(result_url)
    name = stores.basename(url)
    stem = name[: -len(".zarr")] if name.endswith(".zarr") else name
    return stores.sibling(url, stem + REPORT_SUFFIX)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def example_units(score: np.ndarray, accepted: np.ndarray, k: int = N_EXAMPLE_TRACES) -> np.ndarray:
    """Up to ``k`` accepted units spread over the accepted units' score ranking (best first),
    so the grid shows weak units as well as strong ones."""
    ranked = np.flatnonzero(accepted)[np.argsort(-score[accepted], kind="stable")]
    if len(ranked) <= k:
        return ranked
    return ranked[np.unique(np.linspace(0, len(ranked) - 1, k).round().astype(int))]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows += _flatten(value, name + ".")
        else:
            rows.append((name, json.dumps(value, default=str)))
    return rows


def _parameter_sections(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Top-level scalars first (open), then one folded section per stage."""
    scalars = [(k, json.dumps(v, default=str)) for k, v in params.items() if not isinstance(v, Mapping)]
    sections = [{"name": "run", "rows": scalars, "open": True}] if scalars else []
    for key, value in params.items():
        if isinstance(value, Mapping):
            sections.append({"name": key, "rows": _flatten(value), "open": False})
    return sections


def _evaluation_rows(ev: Mapping[str, Any]) -> dict[str, Any]:
    def f(x: Any) -> str:
        return "–" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    ca, nf = ev["caiman"], ev["neurofinder"]
    conventions = [
        (f"IoU ≥ {ev['iou_threshold']:g}, Hungarian", ev["precision"], ev["recall"], ev["f1"], ev["n_matched"]),
        ("CaImAn (IoU > 0.3, 10 px gate)", ca["precision"], ca["recall"], ca["f1"], ca["n_matched"]),
        ("neurofinder (centres < 5 px)", nf["precision"], nf["recall"], nf["combined"], nf["n_matched"]),
    ]
    tc, sc = ev["trace_correlation"], ev["spike_correlation"]
    extra = [("predicted / ground-truth units", f"{ev['n_pred']} / {ev['n_true']}"),
             ("mean IoU of matches", f(ev.get("mean_iou")))]
    dy, dx = ev["offset"]
    extra.append(("global offset undone", f"dy = {dy}, dx = {dx} px" if (dy, dx) != (0, 0) else "none"))
    if tc["n"]:
        extra.append(("trace correlation of matches", f"median {f(tc['median'])}, mean {f(tc['mean'])} (n = {tc['n']})"))
    if sc["n"]:
        extra.append(("spike correlation of matches", f"median {f(sc['median'])} (n = {sc['n']})"))
    return {"conventions": [(name, f(p), f(r), f(f1), k) for name, p, r, f1, k in conventions],
            "extra": extra, "notes": list(ev.get("notes", [])), "truth": ev.get("truth_source")}


def build_report(ds: xr.Dataset, *, evaluation: Mapping[str, Any] | None = None,
                 truth_masks: np.ndarray | None = None, title: str | None = None) -> str:
    """The report of one result as HTML text.

    Parameters
    ----------
    ds : xarray.Dataset
        A result (``somaflow.io.schema``); read lazily except the masks, the
        images, the shifts and the example units' traces.
    evaluation : mapping, optional
        :func:`somaflow.evaluate.evaluate`'s output, shown as a table.
    truth_masks : numpy.ndarray, optional
        (unit, y, x) bool ground truth, outlined on the images.
    title : str, optional
        Default: the result's file name.

    Returns
    -------
    str
        A self-contained HTML document.
    """
    a = ds.attrs
    fps = float(a["fps"])
    n = int(ds.sizes["unit"])
    n_frames = int(ds.sizes["frame"])
    score = np.asarray(ds["score"].values, np.float64)
    accepted = np.asarray(ds["accepted"].values, bool)
    params = json.loads(a.get("params", "{}"))
    method = str(a.get("method") or params.get("method", "?"))
    contours = figures.outlines(np.asarray(ds["masks"].values, bool))
    images = {"mean image": ds["mean_image"].values, "max image": ds["max_image"].values,
              "correlation image": ds["correlation_image"].values}
    truth_contours = figures.outlines(truth_masks) if truth_masks is not None else None
    time = np.arange(n_frames) / fps

    shown = example_units(score, accepted)
    traces_png = None
    if len(shown):
        dff = np.asarray(ds["dff"].isel(unit=shown).values, np.float32)
        spikes = np.asarray(ds["spikes"].isel(unit=shown).values, np.float32)
        snr = np.asarray(ds["snr"].isel(unit=shown).values) if "snr" in ds else None
        labels = [f"unit {int(u)} · score {score[u]:.2f}" + (f" · SNR {snr[i]:.1f}" if snr is not None else "")
                  for i, u in enumerate(shown)]
        traces_png = _data_uri(figures.trace_grid(time, dff, spikes, labels))

    shifts = np.asarray(ds["shifts"].values, np.float32)
    timings = dict(a.get("timings", {}) or {})
    provenance = a.get("provenance") if isinstance(a.get("provenance"), dict) else {}
    statuses = {k: v.get("status", "") for k, v in (provenance.get("stages") or {}).items()}
    total = sum(timings.values()) or 1.0
    context = {
        "title": title or "result",
        "version": __version__,
        "generated": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "facts": [
            ("source", str(a.get("source", "?"))),
            ("units", f"{n} ({int(accepted.sum())} accepted)"),
            ("movie", f"{n_frames} frames of {ds.sizes['y']} × {ds.sizes['x']} px at {fps:g} Hz "
                      f"({n_frames / fps:.1f} s), {a.get('modality', '?')}"),
            ("method", method),
            ("motion correction", str(a.get("motion_mode", "?"))
             + (f" (non-rigid deviation {a['motion_nonrigid_deviation']:.2f} px)"
                if "motion_nonrigid_deviation" in a else "")),
            ("neuron radius", f"{params['neuron_radius']:g} px" if "neuron_radius" in params else "?"),
            ("computed by", f"somaflow {a.get('somaflow_version', '?')}"
                            + (f" on {a['created'][:19].replace('T', ' ')} UTC" if a.get("created") else "")),
        ],
        "ood_warnings": json.loads(a.get("ood_warnings", "[]") or "[]"),
        "summary_png": _data_uri(figures.summary_figure(images, contours, score, accepted, truth_contours)),
        "histogram_png": _data_uri(figures.score_histogram(score, accepted)) if n else None,
        "traces_png": traces_png,
        "n_shown": len(shown),
        "motion_png": _data_uri(figures.motion_figure(time, shifts)),
        "motion_range": (f"{np.ptp(shifts[:, 0]):.2f}", f"{np.ptp(shifts[:, 1]):.2f}") if len(shifts) else ("0", "0"),
        "timings": [(k, f"{v:.1f}", statuses.get(k, ""), 100.0 * v / total) for k, v in timings.items()],
        "total_seconds": f"{sum(timings.values()):.1f}",
        "parameters": _parameter_sections(params),
        "evaluation": _evaluation_rows(evaluation) if evaluation else None,
    }
    return _ENV.get_template("report.html.j2").render(**context)


def write_report(result_url: str, out: str | None = None, *, ground_truth: str | None = None,
                 overwrite: bool = True) -> str:
    """Read a complete result, build its report and write it atomically.

    Parameters
    ----------
    result_url : str
        A complete result zarr.
    out : str, optional
        The HTML file; default :func:`default_report_url`.
    ground_truth : str, optional
        Anything ``somaflow evaluate`` takes as ground truth (result zarr,
        Neurofinder regions.json, .npz): adds the evaluation table and outlines.
    overwrite : bool
        Replace an existing ``out`` (a run rewrites its own report).

    Returns
    -------
    str
        The normalized URL written.

    Raises
    ------
    IncompleteResultError
        The result is unfinished.
    ResultExistsError
        ``out`` exists and ``overwrite`` is False.
    """
    result_url = stores.normalize_url(result_url)
    out = stores.normalize_url(out) if out else default_report_url(result_url)
    ds = schema.open_result(result_url)
    evaluation, truth_masks = None, None
    if ground_truth is not None:
        evaluation = evaluate(result_url, ground_truth)
        truth_masks = load_truth(ground_truth, shape=(int(ds.sizes["y"]), int(ds.sizes["x"]))).masks
    html = build_report(ds, evaluation=evaluation, truth_masks=truth_masks, title=stores.basename(result_url))
    with stores.atomic_output(out, overwrite=overwrite) as tmp:
        fs, path = stores.filesystem(tmp)
        with fs.open(path, "w", encoding="utf-8") as fh:
            fh.write(html)
    return out
