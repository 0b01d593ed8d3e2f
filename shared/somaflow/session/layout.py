"""Where one session's stages write: the result and its work store.

For ``--out RESULT``:

* ``RESULT`` — the result zarr (CONTRACT.md), moved into place when complete;
* ``RESULT.work/movie.zarr`` — ingest: the input as a movie zarr (none when the
  input already is one);
* ``RESULT.work/corrected.zarr`` and ``motion.zarr`` — motion: the corrected
  movie (the ingested movie itself with ``motion.mode: none``), shifts and template;
* ``RESULT.work/summary.zarr`` and ``images.zarr`` — summary: images of the
  detection movie, mean/max of the corrected movie;
* ``RESULT.work/units.zarr`` and ``traces.zarr`` — extract: what
  :func:`somaflow.session.extract.find_units` returns;
* ``RESULT.work/verdict.zarr`` — classify: the per-unit verdict;
* ``RESULT.work/scratch`` — what a method keeps while it runs (CNMF's fit
  movie), removed after it and when a run starts;
* ``RESULT.report.html`` (``RESULT`` without ``.zarr``) — the HTML report
  (:mod:`somaflow.report`), written after the result, beside it (not inside:
  the result zarr keeps its schema).
"""

from __future__ import annotations

from somaflow import provenance
from somaflow.io import stores
from somaflow.report import default_report_url


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


def scratch_url(out_url: str) -> str:
    """The folder a method keeps its intermediates in while it runs (on the result's store)."""
    return stores.join(provenance.work_url(out_url), "scratch")
