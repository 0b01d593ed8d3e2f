"""The session flow: one movie in, one result zarr out.

Tasks only wire library calls (STYLE.md: flows only wire). Heavy array work is
done by Dask on whichever cluster is the default client when the flow runs;
Prefect tasks themselves run in this process.

Layout of a run, for ``--out RESULT``:

* ``RESULT`` — the result zarr (CONTRACT.md), moved into place when complete;
* ``RESULT.work/movie.zarr`` — the ingested movie (skipped when the input is
  already a movie zarr), reused by a rerun over the same source;
* ``RESULT.work/corrected.zarr`` — the motion-corrected movie (a movie zarr) and
  ``RESULT.work/motion.zarr`` — its shifts and template.
"""

from __future__ import annotations

import time
from typing import Any

import dask
import numpy as np
import xarray as xr
from prefect import flow, get_run_logger, task

from somaflow.assemble import assemble_result
from somaflow.extract import find_units
from somaflow.io import schema, stores
from somaflow.io.ingest import ingest, load_movie
from somaflow.params import RunParams
from somaflow.preprocess.motion import apply_shifts, compute_template, estimate_shifts
from somaflow.preprocess.pipeline import detection_movie
from somaflow.preprocess.summary import summary_images


def work_url(out_url: str) -> str:
    """Where a run keeps its intermediates."""
    return stores.normalize_url(out_url) + ".work"


@task(name="ingest")
def ingest_stage(input_url: str, out_url: str, fps: float, modality: str, p: RunParams) -> str:
    """Convert the input to a movie zarr (or reuse a complete one for the same source)."""
    log = get_run_logger()
    movie_url = stores.join(work_url(out_url), "movie.zarr")
    src = stores.normalize_url(input_url)
    if schema.is_complete(src):
        attrs = schema.read_attrs(src)
        if "fps" in attrs and "modality" in attrs:
            log.info("input is a movie zarr; no ingest needed")
            return src
    if schema.is_complete(movie_url):
        attrs = schema.read_attrs(movie_url)
        if attrs.get("source_checksum") == stores.checksum(src) and attrs.get("fps") == fps:
            log.info("reusing ingested movie %s", movie_url)
            return movie_url
    ingest(src, movie_url, fps=fps, modality=modality, dataset=p.ingest.dataset,
           axes=p.ingest.axes, memory_budget=p.ingest.memory_budget, overwrite=True)
    return movie_url


@task(name="motion-correction")
def motion_stage(movie_url: str, out_url: str, p: RunParams) -> tuple[str, xr.Dataset]:
    """Estimate shifts, write the corrected movie; returns its URL and the shifts."""
    mp = p.preprocess.motion
    movie = schema.open_movie(movie_url)
    if mp.mode == "none":
        zeros = np.zeros((movie.sizes["frame"], 2), np.float32)
        return movie_url, xr.Dataset({"shifts": (("frame", "axis"), zeros)})
    template = compute_template(movie, mp)
    shifts = estimate_shifts(movie, template, mp).compute()
    shifts["template"] = template.drop_vars(list(template.coords))
    corrected = apply_shifts(movie, shifts, mp)
    if movie.dtype.kind in "iu":  # keep the input's integer type: half the bytes of float32
        info = np.iinfo(movie.dtype)
        corrected = corrected.round().clip(info.min, info.max).astype(movie.dtype)
    corrected_url = stores.join(work_url(out_url), "corrected.zarr")
    a = movie.attrs
    ds = schema.make_movie_dataset(corrected.chunk({"frame": movie.chunks[0]}), fps=a["fps"],
                                   modality=a["modality"], source=a["source"],
                                   source_checksum=a["source_checksum"],
                                   extra_attrs={"motion_mode": mp.mode})
    schema.write_movie(ds, corrected_url, overwrite=True)
    schema.write_dataset(shifts, stores.join(work_url(out_url), "motion.zarr"), overwrite=True)
    return corrected_url, shifts


@task(name="summary-images")
def summary_stage(corrected_url: str, p: RunParams) -> tuple[xr.Dataset, xr.Dataset]:
    """Summary images of the detection movie, and mean/max of the corrected movie,
    in one pass over the corrected movie."""
    corrected = schema.open_movie(corrected_url)
    det = summary_images(detection_movie(corrected, p.preprocess), p.summary)
    plain = xr.Dataset({"mean_image": corrected.mean("frame", dtype=np.float64).astype(np.float32),
                        "max_image": corrected.max("frame").astype(np.float32)})
    det, plain = dask.compute(det, plain)
    return det, plain


@task(name="extract")
def extract_stage(corrected_url: str, images: xr.Dataset, p: RunParams) -> tuple[xr.Dataset, xr.Dataset]:
    """Units (masks, footprints, scores) and their traces, ΔF/F and spikes."""
    return find_units(schema.open_movie(corrected_url), images, p)


@task(name="write-result")
def write_stage(out_url: str, movie_url: str, images: xr.Dataset, units: xr.Dataset,
                traces: xr.Dataset, motion: xr.Dataset, p: RunParams, timings: dict[str, float],
                overwrite: bool) -> str:
    """Assemble and write the result zarr atomically; ``complete`` last."""
    attrs = schema.read_attrs(movie_url)
    extra = {"timings": timings, "method": p.method, "motion_mode": p.preprocess.motion.mode}
    ds = assemble_result(
        images, units, traces, n_frames=traces.sizes["frame"], params=p.model_dump(),
        source=attrs["source"], source_checksum=attrs["source_checksum"],
        fps=p.fps, modality=p.modality, shifts=np.asarray(motion["shifts"].values, np.float32),
        extra_attrs=extra,
    )
    if "patch_shifts" in motion:
        ds["patch_shifts"] = motion["patch_shifts"].drop_vars(["axis", "frame"], errors="ignore").astype(np.float32)
    return schema.write_result(ds, out_url, overwrite=overwrite)


@flow(name="somaflow-session", log_prints=False, validate_parameters=False)
def session_flow(input_url: str, out_url: str, params: RunParams, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole pipeline on one session and return a short summary."""
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 3)
        return out

    movie_url = timed("ingest", ingest_stage, input_url, out_url, params.fps, params.modality, params)
    corrected_url, motion = timed("motion", motion_stage, movie_url, out_url, params)
    det_images, plain_images = timed("summary", summary_stage, corrected_url, params)
    units, traces = timed("extract", extract_stage, corrected_url, det_images, params)
    images = det_images.assign(mean_image=plain_images["mean_image"], max_image=plain_images["max_image"])
    url = timed("write", write_stage, out_url, movie_url, images, units, traces, motion, params,
                timings, overwrite)
    n_frames = int(traces.sizes["frame"])
    return {
        "result": url,
        "n_units": int(units.sizes["unit"]),
        "n_accepted": int(units["accepted"].sum()) if "accepted" in units else int(units.sizes["unit"]),
        "n_frames": n_frames,
        "timings": timings,
    }


def resolve_movie_info(input_url: str, fps: float | None, modality: str | None,
                       dataset: str | None, axes: str) -> tuple[float, str, tuple[int, int, int]]:
    """Frame rate, modality and shape of an input, checked before the flow starts."""
    movie = load_movie(input_url, fps=fps, modality=modality, dataset=dataset, axes=axes,
                       with_checksum=False)
    return float(movie.attrs["fps"]), str(movie.attrs["modality"]), tuple(movie.shape)
