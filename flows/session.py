"""The session flow: one movie in, one result zarr out, resumable stage by stage.

Tasks only wire library calls (STYLE.md: flows only wire). Heavy array work is
done by Dask on whichever cluster is the default client when the flow runs;
Prefect tasks themselves run in this process.

Every stage writes its output into the run's work store, atomically and with
``complete=true`` last, tagged with the stage's hash (``somaflow.provenance``:
source checksum + the stage's parameters + the upstream hashes + somaflow
version). A stage whose outputs are complete with the hash this run would
write is skipped, so a rerun after a crash resumes where it stopped, and a rerun
of a finished session does nothing. Layout for ``--out RESULT``:

* ``RESULT`` — the result zarr (CONTRACT.md), moved into place when complete;
* ``RESULT.work/movie.zarr`` — ingest: the input as a movie zarr (none when the
  input already is one);
* ``RESULT.work/corrected.zarr`` and ``motion.zarr`` — motion: the corrected
  movie (the ingested movie itself with ``motion.mode: none``), shifts and template;
* ``RESULT.work/summary.zarr`` and ``images.zarr`` — summary: images of the
  detection movie, mean/max of the corrected movie;
* ``RESULT.work/units.zarr`` and ``traces.zarr`` — extract: what
  ``somaflow.extract.find_units`` returns;
* ``RESULT.report.html`` (``RESULT`` without ``.zarr``) — the HTML report
  (``somaflow.report``), written after the result, beside it (not inside: the
  result zarr keeps its schema).

Each computed run publishes two Prefect artifacts on its flow run: a table of
the result's summary and a link to the report.

Downstream stages always read their inputs back from these stores, so a resumed
run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from typing import Any

import dask
import numpy as np
import xarray as xr
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run

from somaflow import provenance, runtime
from somaflow.assemble import assemble_result
from somaflow.classify.cnet import classify_units
from somaflow.extract import find_units
from somaflow.io import guard, schema, stores
from somaflow.io.ingest import checked, load_movie
from somaflow.params import RunParams
from somaflow.preprocess.motion import (
    apply_shifts,
    estimate_shifts,
    registration_model,
    resolve_mode,
)
from somaflow.preprocess.pipeline import detection_movie
from somaflow.preprocess.summary import summary_images
from somaflow.report import default_report_url, write_report


def stage_outputs(out_url: str) -> dict[str, list[str]]:
    """The stores each stage writes for the result ``out_url`` (``write``: the result)."""
    w = provenance.work_url(out_url)
    return {
        "ingest": [stores.join(w, "movie.zarr")],
        "motion": [stores.join(w, "corrected.zarr"), stores.join(w, "motion.zarr")],
        "summary": [stores.join(w, "summary.zarr"), stores.join(w, "images.zarr")],
        "extract": [stores.join(w, "units.zarr"), stores.join(w, "traces.zarr")],
        "classify": [stores.join(w, "verdict.zarr")],
        "write": [stores.normalize_url(out_url)],
        "report": [default_report_url(out_url)],
    }


def _tagged(ds: xr.Dataset, stage_hash: str | None) -> xr.Dataset:
    return ds.assign_attrs(stage_hash=stage_hash) if stage_hash else ds


@task(name="plan")
def plan_stage(input_url: str, out_url: str, p: RunParams) -> provenance.RunPlan:
    """Is the result done, stale, incomplete or missing for these inputs and parameters?"""
    return provenance.plan_run(input_url, out_url, p.model_dump(mode="json"),
                               movie_url=stage_outputs(out_url)["ingest"][0],
                               work_url=provenance.work_url(out_url))


@task(name="ingest")
def ingest_stage(input_url: str, out_url: str, fps: float, modality: str, p: RunParams) -> str:
    """Convert the input to ``RESULT.work/movie.zarr`` tagged with its stage hash and the
    source's fingerprint; returns its URL (the input's own when it is a movie zarr)."""
    src = stores.normalize_url(input_url)
    if provenance.is_movie_zarr(src):
        return src
    fingerprint = provenance.source_fingerprint(src)
    movie = load_movie(src, fps=fps, modality=modality, dataset=p.ingest.dataset, axes=p.ingest.axes,
                       memory_budget=p.ingest.memory_budget)
    a = movie.attrs
    stage_hash = provenance.stage_hashes(a["source_checksum"], p.model_dump(mode="json"))["ingest"]
    ds = schema.make_movie_dataset(checked(movie), fps=a["fps"], modality=a["modality"], source=a["source"],
                                   source_checksum=a["source_checksum"],
                                   extra_attrs={"stage_hash": stage_hash, "source_fingerprint": fingerprint,
                                                **({"pixel_size_um": a["pixel_size_um"]}
                                                   if "pixel_size_um" in a else {})})
    return schema.write_movie(ds, stage_outputs(out_url)["ingest"][0], overwrite=True)


@task(name="motion-correction")
def motion_stage(movie_url: str, out_url: str, p: RunParams,
                 stage_hash: str | None = None) -> tuple[str, xr.Dataset]:
    """Estimate shifts, write the corrected movie and ``motion.zarr``; returns the
    corrected movie's URL (the input's with ``mode: none``) and the shifts."""
    mp = p.preprocess.motion
    corrected_url, motion_url = stage_outputs(out_url)["motion"]
    movie = schema.open_movie(movie_url)
    if mp.mode == "none":
        zeros = np.zeros((movie.sizes["frame"], 2), np.float32)
        shifts = xr.Dataset({"shifts": (("frame", "axis"), zeros)})
        schema.write_dataset(_tagged(shifts, stage_hash), motion_url, overwrite=True)
        return movie_url, shifts
    mp, template = resolve_mode(movie, mp)
    shifts = estimate_shifts(movie, template, mp).compute()
    shifts["template"] = template.drop_vars(list(template.coords))
    if "nonrigid_deviation" in template.attrs:  # motion.mode auto: what chose the model
        shifts.attrs["nonrigid_deviation"] = float(template.attrs["nonrigid_deviation"])
    corrected = apply_shifts(movie, shifts, mp)
    if movie.dtype.kind in "iu":  # keep the input's integer type: half the bytes of float32
        info = np.iinfo(movie.dtype)
        corrected = corrected.round().clip(info.min, info.max).astype(movie.dtype)
    a = movie.attrs
    extra: dict[str, Any] = {"motion_mode": mp.mode}
    if stage_hash:
        extra["stage_hash"] = stage_hash
    ds = schema.make_movie_dataset(corrected.chunk({"frame": movie.chunks[0]}), fps=a["fps"],
                                   modality=a["modality"], source=a["source"],
                                   source_checksum=a["source_checksum"], extra_attrs=extra)
    schema.write_movie(ds, corrected_url, overwrite=True)
    schema.write_dataset(_tagged(shifts, stage_hash), motion_url, overwrite=True)
    return corrected_url, shifts


@task(name="summary-images")
def summary_stage(corrected_url: str, p: RunParams, out_url: str | None = None,
                  stage_hash: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """Summary images of the detection movie, and mean/max of the corrected movie,
    in one pass over the corrected movie; written to ``summary.zarr`` and
    ``images.zarr`` when ``out_url`` is given."""
    corrected = schema.open_movie(corrected_url)
    det = summary_images(detection_movie(corrected, p.preprocess), p.summary)
    plain = xr.Dataset({"mean_image": corrected.mean("frame", dtype=np.float64).astype(np.float32),
                        "max_image": corrected.max("frame").astype(np.float32)})
    det, plain = dask.compute(det, plain)
    if out_url is not None:
        summary_url, images_url = stage_outputs(out_url)["summary"]
        schema.write_dataset(_tagged(det, stage_hash), summary_url, overwrite=True)
        schema.write_dataset(_tagged(plain, stage_hash), images_url, overwrite=True)
    return det, plain


@task(name="extract")
def extract_stage(corrected_url: str, images: xr.Dataset, p: RunParams, out_url: str | None = None,
                  stage_hash: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """Units (masks, footprints, scores) and their traces, ΔF/F and spikes; written
    to ``units.zarr`` and ``traces.zarr`` when ``out_url`` is given."""
    scratch = stores.join(provenance.work_url(out_url), "scratch") if out_url is not None else None
    units, traces = find_units(schema.open_movie(corrected_url), images, p, scratch_url=scratch)
    if out_url is not None:
        units_url, traces_url = stage_outputs(out_url)["extract"]
        schema.write_dataset(_tagged(units, stage_hash), units_url, overwrite=True)
        schema.write_dataset(_tagged(traces, stage_hash), traces_url, overwrite=True)
    return units, traces


@task(name="classify")
def classify_stage(units: xr.Dataset, traces: xr.Dataset, images: xr.Dataset, p: RunParams,
                   out_url: str | None = None, stage_hash: str | None = None) -> xr.Dataset:
    """The classifier's per-unit verdict (``cnn_score``, ``score``, ``accepted``);
    written to ``verdict.zarr`` when ``out_url`` is given."""
    verdict = classify_units(units, traces, images, p.classify, modality=p.modality)
    if out_url is not None:
        schema.write_dataset(_tagged(verdict, stage_hash), stage_outputs(out_url)["classify"][0], overwrite=True)
    return verdict


@task(name="write-result")
def write_stage(out_url: str, movie_url: str, images: xr.Dataset, units: xr.Dataset,
                traces: xr.Dataset, motion: xr.Dataset, p: RunParams, timings: dict[str, float],
                overwrite: bool, extra_attrs: dict[str, Any] | None = None) -> str:
    """Assemble and write the result zarr atomically; ``complete`` last."""
    attrs = schema.read_attrs(movie_url)
    used = registration_model(motion, p.preprocess.motion.mode)
    extra = {"timings": timings, "method": p.method, "motion_mode": used["mode"], **(extra_attrs or {})}
    if "nonrigid_deviation" in used:
        extra["motion_nonrigid_deviation"] = used["nonrigid_deviation"]
    ds = assemble_result(
        images, units, traces, n_frames=traces.sizes["frame"], params=p.model_dump(),
        source=attrs["source"], source_checksum=attrs["source_checksum"],
        fps=p.fps, modality=p.modality, shifts=np.asarray(motion["shifts"].values, np.float32),
        extra_attrs=extra, pixel_size_um=attrs.get("pixel_size_um"),
    )
    if "patch_shifts" in motion:
        ds["patch_shifts"] = motion["patch_shifts"].drop_vars(["axis", "frame"], errors="ignore").astype(np.float32)
    return schema.write_result(ds, out_url, overwrite=overwrite)


@task(name="report")
def report_stage(out_url: str) -> str:
    """Write the result's HTML report next to it; returns its URL."""
    return write_report(out_url, stage_outputs(out_url)["report"][0], overwrite=True)


def _artifact_key(name: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) for a session."""
    return "somaflow-" + (re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "session")


def publish_artifacts(name: str, summary: dict[str, Any]) -> None:
    """The session's summary table and its report's location, as artifacts of the flow run."""
    rows = [{"item": "result", "value": summary["result"]},
            {"item": "units", "value": f"{summary['n_units']} ({summary['n_accepted']} accepted)"},
            {"item": "frames", "value": summary["n_frames"]},
            {"item": "motion correction", "value": summary["motion"].get("mode", "")},
            *({"item": f"{stage} (s)", "value": seconds} for stage, seconds in summary["timings"].items()),
            *({"item": "out of distribution", "value": w} for w in summary["ood_warnings"]),
            {"item": "report", "value": summary["report"]}]
    key = _artifact_key(name)
    create_table_artifact(rows, key=key, description=f"somaflow result of {name}")
    report = summary["report"]
    link = f"file://{report}" if stores.protocol_of(report) == "file" else report
    create_link_artifact(link, link_text=f"report of {name}", key=f"{key}-report",
                         description=f"HTML report of {name} (self-contained; open it in a browser)")


class _Stages:
    """Runs or skips the stages of one session and records what happened."""

    def __init__(self, session: str, overwrite: bool) -> None:
        self.session = session
        self.overwrite = overwrite
        self.records: dict[str, dict[str, Any]] = {}

    def run(self, stage: str, digest: str | None, outputs: list[str], fn: Any, *args: Any,
            **kwargs: Any) -> None:
        """Call ``fn(*args, **kwargs)`` unless every store in ``outputs`` is current for ``digest``."""
        t0 = time.perf_counter()
        current = (not self.overwrite and digest is not None and bool(outputs)
                   and all(provenance.is_current(u, digest) for u in outputs))
        if current:
            self.skip(stage, digest, t0)
            return
        with runtime.stage_progress(self.session, stage):
            fn(*args, **kwargs)
        self.records[stage] = {"status": "ran", "seconds": round(time.perf_counter() - t0, 3),
                               "hash": digest}

    def skip(self, stage: str, digest: str | None, t0: float) -> None:
        runtime.progress_logger().info("[%s] %s: skipped (output complete for the same inputs and "
                                       "parameters)", self.session, stage)
        self.records[stage] = {"status": "skipped", "seconds": round(time.perf_counter() - t0, 3),
                               "hash": digest}

    def timings(self) -> dict[str, float]:
        return {k: v["seconds"] for k, v in self.records.items()}

    def statuses(self) -> dict[str, str]:
        return {k: v["status"] for k, v in self.records.items()}


@flow(name="somaflow-session", log_prints=False, validate_parameters=False)
def session_flow(input_url: str, out_url: str, params: RunParams, overwrite: bool = False,
                 session: str | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline on one session and return a short summary.

    Returns
    -------
    dict
        ``result``, ``status`` (``"done"`` — computed now, ``"skipped"`` — the
        result was already complete for the same inputs and parameters),
        ``n_units``, ``n_accepted``, ``n_frames``, ``motion`` (the registration
        model used, :func:`~somaflow.preprocess.motion.registration_model`;
        computed runs only), ``timings`` and ``stages``
        (stage -> ``"ran"``/``"skipped"``), ``flow_run_id``.

    Raises
    ------
    ResultExistsError
        A complete result for other inputs or parameters exists and
        ``overwrite`` is False.
    OutputConflictError
        The result or its work store is, holds or lies inside the input
        (whatever ``overwrite`` says), or holds something somaflow did not
        start and ``overwrite`` is False.
    """
    name = session or stores.basename(out_url)
    plog = runtime.progress_logger()
    run_id = flow_run.get_id()
    plog.info("[%s] Prefect flow run %s", name, run_id)
    out_url = stores.normalize_url(out_url)
    work = provenance.work_url(out_url)
    guard.check_output_apart(out_url, [input_url])
    guard.check_output_apart(work, [input_url])
    outputs = stage_outputs(out_url)
    plan = plan_stage(input_url, out_url, params)
    if plan.status == "done" and not overwrite:
        plog.info("[%s] already done (skipped): %s", name, out_url)
        return {**provenance.result_summary(out_url), "flow_run_id": run_id}
    provenance.check_plan(plan, out_url, work, overwrite)
    if plan.status == "incomplete":
        plog.info("[%s] %s was never marked complete: resuming", name, out_url)
    provenance.write_run_record(work, input_url, out_url)
    provenance.remove_partial_outputs(work)
    stages = _Stages(name, overwrite)
    hashes = plan.hashes

    t0 = time.perf_counter()
    if provenance.is_movie_zarr(input_url):
        movie_url = stores.normalize_url(input_url)
        stages.skip("ingest", hashes["ingest"] if hashes else None, t0)
    else:
        movie_url = outputs["ingest"][0]
        stages.run("ingest", hashes["ingest"] if hashes else None, [movie_url], ingest_stage,
                   input_url, out_url, params.fps, params.modality, params)
    if hashes is None:
        hashes = provenance.stage_hashes(provenance.recorded_source_checksum(movie_url),
                                         params.model_dump(mode="json"))

    motion_mode = params.preprocess.motion.mode
    corrected_url = movie_url if motion_mode == "none" else outputs["motion"][0]
    motion_outputs = outputs["motion"][1:] if motion_mode == "none" else outputs["motion"]
    stages.run("motion", hashes["motion"], motion_outputs, motion_stage, movie_url, out_url, params,
               stage_hash=hashes["motion"])
    motion = schema.open_result(outputs["motion"][1]).load()

    stages.run("summary", hashes["summary"], outputs["summary"], summary_stage, corrected_url, params,
               out_url=out_url, stage_hash=hashes["summary"])
    det_images, plain_images = (schema.open_result(u).load() for u in outputs["summary"])

    stages.run("extract", hashes["extract"], outputs["extract"], extract_stage, corrected_url, det_images,
               params, out_url=out_url, stage_hash=hashes["extract"])
    units, traces = (schema.open_result(u) for u in outputs["extract"])  # lazy: streamed into the result

    images = det_images.assign(mean_image=plain_images["mean_image"], max_image=plain_images["max_image"])
    stages.run("classify", hashes["classify"], outputs["classify"], classify_stage, units, traces, images,
               params, out_url=out_url, stage_hash=hashes["classify"])
    verdict = schema.open_result(outputs["classify"][0]).load()
    units = units.assign(score=verdict["score"], accepted=verdict["accepted"])
    if params.classify.classifier != "none":
        units = units.assign(cnn_score=verdict["cnn_score"])
    warnings = [*json.loads(units.attrs.get("ood_warnings", "[]")), *json.loads(verdict.attrs.get("ood_warnings", "[]"))]
    for w in warnings:  # into the flow run's log; the CLI prints them once, in its summary
        plog.warning("[%s] out of distribution: %s", name, w, extra={runtime.CONSOLE_FLAG: False})
    record = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "stage_hash": hashes["write"],
        "provenance": {
            "parameters": params.model_dump(mode="json"),
            "versions": provenance.versions(),
            "host": provenance.host(),
            "source": stores.normalize_url(input_url),
            "source_checksum": provenance.recorded_source_checksum(movie_url),
            "source_fingerprint": schema.read_attrs(movie_url).get("source_fingerprint"),
            "stage_hashes": hashes,
            "stages": dict(stages.records),
            "flow_run_id": str(run_id) if run_id else None,
        },
        "ood_warnings": json.dumps(warnings),
    }
    stages.run("write", None, [], write_stage, out_url, movie_url, images, units, traces, motion, params,
               stages.timings(), overwrite or plan.status == "incomplete", record)
    stages.run("report", None, [], report_stage, out_url)
    summary = {
        "result": out_url,
        "status": "done",
        "n_units": int(units.sizes["unit"]),
        "n_accepted": int(units["accepted"].sum()) if "accepted" in units else int(units.sizes["unit"]),
        "n_frames": int(traces.sizes["frame"]),
        "motion": registration_model(motion, params.preprocess.motion.mode),
        "timings": stages.timings(),
        "stages": stages.statuses(),
        "flow_run_id": str(run_id) if run_id else None,
        "ood_warnings": warnings,
        "report": outputs["report"][0],
        "work": provenance.work_url(out_url),
    }
    publish_artifacts(name, summary)
    return summary


def resolve_movie_info(input_url: str, fps: float | None, modality: str | None,
                       dataset: str | None, axes: str) -> tuple[float, str, tuple[int, int, int]]:
    """Frame rate, modality and shape of an input, checked before the flow starts."""
    movie = load_movie(input_url, fps=fps, modality=modality, dataset=dataset, axes=axes,
                       with_checksum=False)
    return float(movie.attrs["fps"]), str(movie.attrs["modality"]), tuple(movie.shape)


def session_params(input_url: str, *, fps: float | None = None, modality: str | None = None,
                   neuron_radius: float | None = None, overrides: dict[str, Any] | None = None,
                   method: str | None = None, dataset: str | None = None,
                   axes: str | None = None) -> RunParams:
    """Every parameter of one session: defaults for the movie, then ``overrides``.

    ``dataset``/``axes``/``method`` given here win over the same keys in
    ``overrides``. Opens the input (lazily) to learn its frame rate, modality
    and shape.

    Raises
    ------
    InputError, StoreError
        The input cannot be opened as a movie.
    ParameterError
        Invalid overrides.
    """
    over = dict(overrides or {})
    ingest_over = over.get("ingest", {}) if isinstance(over.get("ingest"), dict) else {}
    dataset = dataset or ingest_over.get("dataset")
    axes = axes or ingest_over.get("axes", "tyx")
    over["ingest"] = {**ingest_over, "dataset": dataset, "axes": axes}
    if method:
        over["method"] = method
    fps, modality, shape = resolve_movie_info(input_url, fps, modality, dataset, axes)
    return RunParams.for_movie(fps, modality, neuron_radius, over, shape=shape)
