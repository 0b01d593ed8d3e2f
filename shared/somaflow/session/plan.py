"""Before a session runs: its parameters, and whether (and where) it may write.

:func:`session_params` opens the input lazily to learn its frame rate,
modality and shape and builds every parameter of the run;
:func:`plan_session` says whether the result is done, stale, unfinished or
missing for these inputs and parameters; :func:`check_session` refuses an
output that is, holds or lies inside an input, or that holds what a somaflow
run did not start; :func:`start_session` records the run in its work store.
The command line and the session flow both go through these, so a plan is
computed once and every refusal is worded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from somaflow import provenance
from somaflow.errors import InputError, ParameterError
from somaflow.io import guard, stores
from somaflow.io.ingest import load_movie
from somaflow.params import IngestParams, RunParams
from somaflow.session.layout import scratch_url, stage_outputs


def resolve_movie_info(input_url: str, fps: float | None, modality: str | None,
                       dataset: str | None, axes: str,
                       ingest: IngestParams | None = None) -> tuple[float, str, tuple[int, int, int]]:
    """Frame rate, modality and shape of an input, checked before the flow starts (its
    declared frame size against ``ingest``'s limits first)."""
    ingest = ingest or IngestParams()
    movie = load_movie(input_url, fps=fps, modality=modality, dataset=dataset, axes=axes,
                       with_checksum=False, memory_budget=ingest.memory_budget,
                       max_frame_pixels=ingest.max_frame_pixels)
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
    limits = {k: ingest_over[k] for k in ("memory_budget", "max_frame_pixels") if k in ingest_over}
    try:
        ingest = IngestParams.model_validate(limits)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ParameterError(f"bad parameter ingest.{first['loc'][0]}: {first['msg']}. Fix it in the "
                             "--params file.") from None
    fps, modality, shape = resolve_movie_info(input_url, fps, modality, dataset, axes, ingest)
    params = RunParams.for_movie(fps, modality, neuron_radius, over, shape=shape)
    check_movie_length(input_url, shape[0], params)
    return params


#: fewest frames the detection movie (binned to ``preprocess.binning.target_fps``) may have:
#: below it summary images, CNMF's temporal fit and deconvolution have too little to work on
MIN_DETECTION_FRAMES = 8


def check_movie_length(input_url: str, n_frames: int, p: RunParams) -> None:
    """Refuse, before any stage runs, a movie too short for the pipeline.

    Raises
    ------
    InputError
        Fewer than :data:`MIN_DETECTION_FRAMES` frames after the detection
        movie's binning.
    """
    b = p.preprocess.binning
    factor = b.factor(p.fps)
    n_bins = n_frames // factor + (1 if b.keep_partial and n_frames % factor else 0)
    if n_bins < MIN_DETECTION_FRAMES:
        binned = f" (binned {factor} to 1 for detection at {b.target_fps:g} Hz: {n_bins})" if factor > 1 else ""
        raise InputError(
            f"{stores.normalize_url(input_url)} holds {n_frames} frames at {p.fps:g} Hz{binned}; somaflow needs at "
            f"least {MIN_DETECTION_FRAMES * factor} frames. Point at the whole recording, or check --fps.")


def check_session(input_url: str, out_url: str, inputs: Sequence[str | None] = ()) -> None:
    """Refuse a result or work store that is, holds or lies inside ``input_url``
    or any of ``inputs`` (a parameter file, say), whatever ``--overwrite`` says.

    Raises
    ------
    OutputConflictError
    """
    out = stores.normalize_url(out_url)
    sources = [input_url, *inputs]
    guard.check_output_apart(out, sources)
    guard.check_output_apart(provenance.work_url(out), sources)


def plan_session(input_url: str, out_url: str, params: RunParams, *,
                 overwrite: bool = False) -> provenance.RunPlan:
    """Is the result done, stale, unfinished or missing for these inputs and
    parameters, and may this run write it?

    Returns
    -------
    provenance.RunPlan
        With ``status == "done"`` and ``overwrite`` False the caller skips the
        run.

    Raises
    ------
    ResultExistsError
        A complete result for other inputs or parameters is at ``out_url``
        and ``overwrite`` is False.
    OutputConflictError
        ``out_url`` or its work store holds something a somaflow run did not
        start and ``overwrite`` is False.
    """
    out = stores.normalize_url(out_url)
    work = provenance.work_url(out)
    plan = provenance.plan_run(input_url, out, params.model_dump(mode="json"),
                               movie_url=stage_outputs(out)["ingest"][0], work_url=work)
    if plan.status != "done" or overwrite:
        provenance.check_plan(plan, out, work, overwrite)
    return plan


def start_session(input_url: str, out_url: str) -> None:
    """Record the run in its work store (what makes an unfinished result
    resumable) and remove partial outputs and scratch a crash left there.

    Call it holding the result's lease (:mod:`somaflow.io.lease`): no other run
    may be writing into the work store."""
    work = provenance.work_url(stores.normalize_url(out_url))
    provenance.write_run_record(work, input_url, out_url)
    provenance.remove_partial_outputs(work)
    scratch = scratch_url(out_url)
    if stores.exists(scratch):
        stores.remove(scratch)


def end_failed_session(out_url: str) -> bool:
    """After a failed run: remove its work store when it holds nothing a rerun could reuse
    (only the run record, scratch and partial outputs), so a failure on a bad input leaves
    nothing at ``--out``; returns whether it was removed. Call it holding the lease."""
    work = provenance.work_url(stores.normalize_url(out_url))
    fs, path = stores.filesystem(work)
    fs.invalidate_cache()
    if not fs.exists(path):
        return False
    names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)}
    disposable = {provenance.RUN_RECORD, "scratch"}
    if any(n not in disposable and not (n.startswith(".") and ".partial-" in n) for n in names):
        return False
    stores.remove(work)
    return True
