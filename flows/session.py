"""The session flow: one movie in, one result zarr out.

Tasks only wire library calls (STYLE.md: flows only wire). Heavy array work is
done by Dask on whichever cluster is the default client when the flow runs;
Prefect tasks themselves run in this process.

Layout of a run, for ``--out RESULT``:

* ``RESULT`` — the result zarr (CONTRACT.md), moved into place when complete;
* ``RESULT.work/movie.zarr`` — the ingested movie (skipped when the input is
  already a movie zarr), reused by a rerun over the same source.
"""

from __future__ import annotations

import time
from typing import Any

import xarray as xr
from prefect import flow, get_run_logger, task

from somaflow.assemble import assemble_result
from somaflow.detect.local_maxima import detect_local_maxima
from somaflow.io import schema, stores
from somaflow.io.ingest import ingest, load_movie
from somaflow.params import RunParams
from somaflow.preprocess.summary import summary_images
from somaflow.traces import extract_traces


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


@task(name="summary-images")
def summary_stage(movie_url: str, p: RunParams) -> xr.Dataset:
    """Mean, max, std, correlation and PNR images in one streaming pass."""
    return summary_images(schema.open_movie(movie_url), p.summary).compute()


@task(name="detect")
def detect_stage(images: xr.Dataset, p: RunParams) -> xr.Dataset:
    """Candidate units from the summary images."""
    return detect_local_maxima(images, p.detect)


@task(name="traces")
def traces_stage(movie_url: str, units: xr.Dataset, p: RunParams) -> xr.Dataset:
    """Fluorescence traces, ΔF/F and spikes of every unit."""
    return extract_traces(schema.open_movie(movie_url), units["masks"], p.traces).compute()


@task(name="write-result")
def write_stage(out_url: str, movie_url: str, images: xr.Dataset, units: xr.Dataset,
                traces: xr.Dataset, p: RunParams, timings: dict[str, float], overwrite: bool) -> str:
    """Assemble and write the result zarr atomically; ``complete`` last."""
    attrs = schema.read_attrs(movie_url)
    ds = assemble_result(
        images, units, traces, n_frames=traces.sizes["frame"], params=p.model_dump(),
        source=attrs["source"], source_checksum=attrs["source_checksum"],
        fps=p.fps, modality=p.modality, extra_attrs={"timings": timings, "method": "local-maxima"},
    )
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
    images = timed("summary", summary_stage, movie_url, params)
    units = timed("detect", detect_stage, images, params)
    traces = timed("traces", traces_stage, movie_url, units, params)
    url = timed("write", write_stage, out_url, movie_url, images, units, traces, params, timings, overwrite)
    n_frames = int(traces.sizes["frame"])
    return {
        "result": url,
        "n_units": int(units.sizes["unit"]),
        "n_accepted": int(units["accepted"].sum()) if "accepted" in units else int(units.sizes["unit"]),
        "n_frames": n_frames,
        "timings": timings,
    }


def resolve_movie_info(input_url: str, fps: float | None, modality: str | None,
                       dataset: str | None, axes: str) -> tuple[float, str]:
    """Frame rate and modality of an input, checked before the flow starts."""
    movie = load_movie(input_url, fps=fps, modality=modality, dataset=dataset, axes=axes,
                       with_checksum=False)
    return float(movie.attrs["fps"]), str(movie.attrs["modality"])
