"""The stages of one session, each a library call from stores to stores.

Every stage reads its inputs back from the run's work store
(:mod:`somaflow.session.layout`) and writes its outputs there, atomically and
tagged with the stage's hash (:mod:`somaflow.provenance`), so a resumed run
computes exactly what an uninterrupted one does. :class:`StageRunner` skips a
stage whose outputs are current for the hash this run would write. The
session flow (``flows/session.py``) only wires these calls as Prefect tasks.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Callable
from typing import Any

import dask
import numpy as np
import xarray as xr

from somaflow import provenance, runtime
from somaflow.assemble import assemble_result
from somaflow.classify.cnet import classify_units
from somaflow.errors import InputError, SomaflowError
from somaflow.io import schema, stores
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
from somaflow.report import write_report
from somaflow.session.extract import find_units
from somaflow.session.layout import scratch_url, stage_outputs

#: default retries of a stage that failed on a store that did not answer, and the first delay (s);
#: each retry waits twice as long as the one before (flows/session.py: Prefect's exponential backoff)
STAGE_RETRIES = 2
STAGE_RETRY_DELAY = 10.0


def stage_retries() -> int:
    """Retries of a stage after a transient store failure: ``SOMAFLOW_STAGE_RETRIES`` or :data:`STAGE_RETRIES`."""
    return max(0, int(os.environ.get("SOMAFLOW_STAGE_RETRIES") or STAGE_RETRIES))


def stage_retry_delay() -> float:
    """Seconds before a stage's first retry: ``SOMAFLOW_STAGE_RETRY_DELAY`` or :data:`STAGE_RETRY_DELAY`."""
    return max(0.0, float(os.environ.get("SOMAFLOW_STAGE_RETRY_DELAY") or STAGE_RETRY_DELAY))


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn`` of the stages: retry only when the store did not answer
    (:func:`somaflow.io.stores.is_transient`); never for a bad input, bad parameters or a bug, which
    would fail the same way again."""
    try:
        state.result()
    except Exception as exc:  # the stage's own exception, re-raised from its state
        return stores.is_transient(exc)
    return False


def _tagged(ds: xr.Dataset, stage_hash: str | None) -> xr.Dataset:
    return ds.assign_attrs(stage_hash=stage_hash) if stage_hash else ds


def ingest(input_url: str, out_url: str, fps: float, modality: str, p: RunParams) -> str:
    """Convert the input to ``RESULT.work/movie.zarr`` tagged with its stage hash and the
    source's fingerprint; returns its URL (the input's own when it is a movie zarr)."""
    src = stores.normalize_url(input_url)
    if provenance.is_movie_zarr(src):
        return src
    fingerprint = provenance.source_fingerprint(src)
    movie = load_movie(src, fps=fps, modality=modality, dataset=p.ingest.dataset, axes=p.ingest.axes,
                       memory_budget=p.ingest.memory_budget, max_frame_pixels=p.ingest.max_frame_pixels)
    a = movie.attrs
    stage_hash = provenance.stage_hashes(a["source_checksum"], p.model_dump(mode="json"))["ingest"]
    ds = schema.make_movie_dataset(checked(movie), fps=a["fps"], modality=a["modality"], source=a["source"],
                                   source_checksum=a["source_checksum"],
                                   extra_attrs={"stage_hash": stage_hash, "source_fingerprint": fingerprint,
                                                **({"pixel_size_um": a["pixel_size_um"]}
                                                   if "pixel_size_um" in a else {})})
    return schema.write_movie(ds, stage_outputs(out_url)["ingest"][0], overwrite=True)


def motion(movie_url: str, out_url: str, p: RunParams,
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


def summary(corrected_url: str, p: RunParams, out_url: str | None = None,
            stage_hash: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """Summary images of the detection movie, and mean/max of the corrected movie,
    in one pass over the corrected movie; written to ``summary.zarr`` and
    ``images.zarr`` when ``out_url`` is given."""
    corrected = schema.open_movie(corrected_url)
    det = summary_images(detection_movie(corrected, p.preprocess), p.summary)
    plain = xr.Dataset({"mean_image": corrected.mean("frame", dtype=np.float64).astype(np.float32),
                        "max_image": corrected.max("frame").astype(np.float32)})
    det, plain = dask.compute(det, plain)
    bad = [str(n) for ds in (det, plain) for n, v in ds.data_vars.items()
           if v.dtype.kind == "f" and not np.isfinite(v.values).all()]
    if bad:  # never written (so never marked complete): a rerun after the fix recomputes them
        raise InputError(
            f"the summary images ({', '.join(bad)}) hold NaN or infinite values: the movie "
            f"{corrected.attrs.get('source', corrected_url)} has NaN/inf pixels. Fix or drop the bad frames "
            "in the input and rerun.")
    if out_url is not None:
        summary_url, images_url = stage_outputs(out_url)["summary"]
        schema.write_dataset(_tagged(det, stage_hash), summary_url, overwrite=True)
        schema.write_dataset(_tagged(plain, stage_hash), images_url, overwrite=True)
    return det, plain


def extract(corrected_url: str, images: xr.Dataset, p: RunParams, out_url: str | None = None,
            stage_hash: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """Units (masks, footprints, scores) and their traces, ΔF/F and spikes; written
    to ``units.zarr`` and ``traces.zarr`` when ``out_url`` is given."""
    scratch = scratch_url(out_url) if out_url is not None else None
    units, traces = find_units(schema.open_movie(corrected_url), images, p, scratch_url=scratch)
    if out_url is not None:
        units_url, traces_url = stage_outputs(out_url)["extract"]
        schema.write_dataset(_tagged(units, stage_hash), units_url, overwrite=True)
        schema.write_dataset(_tagged(traces, stage_hash), traces_url, overwrite=True)
    return units, traces


def classify(units: xr.Dataset, traces: xr.Dataset, images: xr.Dataset, p: RunParams,
             out_url: str | None = None, stage_hash: str | None = None) -> xr.Dataset:
    """The classifier's per-unit verdict (``cnn_score``, ``score``, ``accepted``);
    written to ``verdict.zarr`` when ``out_url`` is given."""
    verdict = classify_units(units, traces, images, p.classify, modality=p.modality)
    if out_url is not None:
        schema.write_dataset(_tagged(verdict, stage_hash), stage_outputs(out_url)["classify"][0], overwrite=True)
    return verdict


def write(out_url: str, movie_url: str, images: xr.Dataset, units: xr.Dataset,
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


def report(out_url: str) -> str:
    """Write the result's HTML report next to it (:func:`somaflow.report.write_report`);
    returns its URL."""
    return write_report(out_url, stage_outputs(out_url)["report"][0], overwrite=True)


class StageRunner:
    """Runs or skips the stages of one session and records what happened."""

    def __init__(self, session: str, overwrite: bool, store: str = "") -> None:
        self.session = session
        self.overwrite = overwrite
        self.store = store  # the result's URL: names the store when one did not answer
        self.records: dict[str, dict[str, Any]] = {}

    def run(self, stage: str, digest: str | None, outputs: list[str], fn: Callable[..., Any], *args: Any,
            **kwargs: Any) -> None:
        """Call ``fn(*args, **kwargs)`` unless every store in ``outputs`` is current for ``digest``."""
        t0 = time.perf_counter()
        current = (not self.overwrite and digest is not None and bool(outputs)
                   and all(provenance.is_current(u, digest) for u in outputs))
        if current:
            self.skip(stage, digest, t0)
            return
        with runtime.stage_progress(self.session, stage):
            try:
                fn(*args, **kwargs)
            except SomaflowError:
                raise
            except Exception as exc:  # still failing after the store's and the stage's retries: exit 3
                if stores.is_transient(exc):
                    raise stores.unavailable(self.store, exc) from exc
                raise
        self.records[stage] = {"status": "ran", "seconds": round(time.perf_counter() - t0, 3),
                               "hash": digest}

    def skip(self, stage: str, digest: str | None, t0: float | None = None) -> None:
        """Record ``stage`` as skipped (its outputs are current); ``t0``: when the check began."""
        t0 = time.perf_counter() if t0 is None else t0
        runtime.progress_logger().info("[%s] %s: skipped (output complete for the same inputs and "
                                       "parameters)", self.session, stage)
        self.records[stage] = {"status": "skipped", "seconds": round(time.perf_counter() - t0, 3),
                               "hash": digest}

    def timings(self) -> dict[str, float]:
        """Seconds per stage run or skipped so far."""
        return {k: v["seconds"] for k, v in self.records.items()}

    def statuses(self) -> dict[str, str]:
        """``"ran"`` or ``"skipped"`` per stage so far."""
        return {k: v["status"] for k, v in self.records.items()}


def result_record(input_url: str, movie_url: str, params: RunParams, hashes: dict[str, str],
                  stages: StageRunner, warnings: list[str], flow_run_id: Any = None) -> dict[str, Any]:
    """The result's provenance attrs: parameters, versions, host, source, stage hashes and records."""
    return {
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
            "flow_run_id": str(flow_run_id) if flow_run_id else None,
        },
        "ood_warnings": json.dumps(warnings),
    }


def run_summary(out_url: str, units: xr.Dataset, traces: xr.Dataset, motion: xr.Dataset, params: RunParams,
                stages: StageRunner, warnings: list[str], flow_run_id: Any = None) -> dict[str, Any]:
    """What ``somaflow run`` prints (and returns with ``--json``) for a computed session."""
    return {
        "result": out_url,
        "status": "done",
        "n_units": int(units.sizes["unit"]),
        "n_accepted": int(units["accepted"].sum()) if "accepted" in units else int(units.sizes["unit"]),
        "n_frames": int(traces.sizes["frame"]),
        "motion": registration_model(motion, params.preprocess.motion.mode),
        "timings": stages.timings(),
        "stages": stages.statuses(),
        "flow_run_id": str(flow_run_id) if flow_run_id else None,
        "ood_warnings": warnings,
        "report": stage_outputs(out_url)["report"][0],
        "work": provenance.work_url(out_url),
    }
