"""The session flow: one movie in, one result zarr out, resumable stage by stage.

Prefect wiring only (STYLE.md: flows only wire): each task is a library call of
:mod:`somaflow.session`, and this flow runs them in order. Heavy array work is
done by Dask on whichever cluster is the default client when the flow runs;
Prefect tasks themselves run in this process.

Every stage writes its output into the run's work store
(:mod:`somaflow.session.layout`), atomically and with ``complete=true`` last,
tagged with the stage's hash (:mod:`somaflow.provenance`). A stage whose
outputs are complete with the hash this run would write is skipped, so a rerun
after a crash resumes where it stopped, and a rerun of a finished session does
nothing. After the result, the HTML report is written beside it, and each
computed run publishes two Prefect artifacts on its flow run: a table of the
result's summary and a link to the report.
"""

from __future__ import annotations

import json
import re
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from somaflow import provenance, runtime
from somaflow.io import lease, schema, stores
from somaflow.params import RunParams
from somaflow.session import (
    check_session,
    end_failed_session,
    plan_session,
    stage_outputs,
    stages,
    start_session,
)


def stage_task(name: str) -> Any:
    """A Prefect task decorator for a stage: retried with exponential backoff (and jitter) when it
    failed on a store that did not answer (:func:`somaflow.session.stages.retry_transient`), never
    for an input or parameter error. The count and first delay come from ``SOMAFLOW_STAGE_RETRIES``
    and ``SOMAFLOW_STAGE_RETRY_DELAY`` (s) when the flow module is imported."""
    retries = stages.stage_retries()
    delay = stages.stage_retry_delay()
    return task(name=name, retries=retries,
                retry_delay_seconds=exponential_backoff(backoff_factor=delay) if retries and delay else 0,
                retry_jitter_factor=0.5 if delay else None, retry_condition_fn=stages.retry_transient)


plan_stage = stage_task("plan")(plan_session)
ingest_stage = stage_task("ingest")(stages.ingest)
motion_stage = stage_task("motion-correction")(stages.motion)
summary_stage = stage_task("summary-images")(stages.summary)
extract_stage = stage_task("extract")(stages.extract)
classify_stage = stage_task("classify")(stages.classify)
write_stage = stage_task("write-result")(stages.write)
report_stage = stage_task("report")(stages.report)


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


@flow(name="somaflow-session", log_prints=False, validate_parameters=False)
def session_flow(input_url: str, out_url: str, params: RunParams, overwrite: bool = False,
                 session: str | None = None, plan: provenance.RunPlan | None = None) -> dict[str, Any]:
    """Run (or resume) the whole pipeline on one session and return a short summary.

    ``plan``: the caller's :func:`~somaflow.session.plan_session` for the same
    arguments (the command line plans before it starts a cluster); planned
    here when None.

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
    check_session(input_url, out_url)
    with lease.held(out_url):  # one run at a time on a result (re-entrant: the CLI may hold it already)
        return _leased_session(name, input_url, out_url, params, overwrite, plan, run_id)


def _leased_session(name: str, input_url: str, out_url: str, params: RunParams, overwrite: bool,
                    plan: provenance.RunPlan | None, run_id: Any) -> dict[str, Any]:
    plog = runtime.progress_logger()
    if plan is None:
        plan = plan_stage(input_url, out_url, params, overwrite=overwrite)
    if plan.status == "done" and not overwrite:
        plog.info("[%s] already done (skipped): %s", name, out_url)
        return {**provenance.result_summary(out_url), "flow_run_id": run_id}
    if plan.status == "incomplete":
        plog.info("[%s] %s was never marked complete: resuming", name, out_url)
    start_session(input_url, out_url)
    try:
        return _run_stages(name, input_url, out_url, params, overwrite, plan, run_id)
    except BaseException:
        end_failed_session(out_url)  # a work store holding nothing reusable goes too
        raise


def _run_stages(name: str, input_url: str, out_url: str, params: RunParams, overwrite: bool,
                plan: provenance.RunPlan, run_id: Any) -> dict[str, Any]:
    plog = runtime.progress_logger()
    outputs = stage_outputs(out_url)
    runner = stages.StageRunner(name, overwrite, store=out_url)
    hashes = plan.hashes

    if provenance.is_movie_zarr(input_url):
        movie_url = stores.normalize_url(input_url)
        runner.skip("ingest", hashes["ingest"] if hashes else None)
    else:
        movie_url = outputs["ingest"][0]
        runner.run("ingest", hashes["ingest"] if hashes else None, [movie_url], ingest_stage,
                   input_url, out_url, params.fps, params.modality, params)
    if hashes is None:
        hashes = provenance.stage_hashes(provenance.recorded_source_checksum(movie_url),
                                         params.model_dump(mode="json"))

    motion_mode = params.preprocess.motion.mode
    corrected_url = movie_url if motion_mode == "none" else outputs["motion"][0]
    motion_outputs = outputs["motion"][1:] if motion_mode == "none" else outputs["motion"]
    runner.run("motion", hashes["motion"], motion_outputs, motion_stage, movie_url, out_url, params,
               stage_hash=hashes["motion"])
    motion = schema.open_result(outputs["motion"][1]).load()

    runner.run("summary", hashes["summary"], outputs["summary"], summary_stage, corrected_url, params,
               out_url=out_url, stage_hash=hashes["summary"])
    det_images, plain_images = (schema.open_result(u).load() for u in outputs["summary"])

    runner.run("extract", hashes["extract"], outputs["extract"], extract_stage, corrected_url, det_images,
               params, out_url=out_url, stage_hash=hashes["extract"])
    units, traces = (schema.open_result(u) for u in outputs["extract"])  # lazy: streamed into the result

    images = det_images.assign(mean_image=plain_images["mean_image"], max_image=plain_images["max_image"])
    runner.run("classify", hashes["classify"], outputs["classify"], classify_stage, units, traces, images,
               params, out_url=out_url, stage_hash=hashes["classify"])
    verdict = schema.open_result(outputs["classify"][0]).load()
    units = units.assign(score=verdict["score"], accepted=verdict["accepted"])
    if params.classify.classifier != "none":
        units = units.assign(cnn_score=verdict["cnn_score"])
    warnings = [*json.loads(units.attrs.get("ood_warnings", "[]")), *json.loads(verdict.attrs.get("ood_warnings", "[]"))]
    for w in warnings:  # into the flow run's log; the CLI prints them once, in its summary
        plog.warning("[%s] out of distribution: %s", name, w, extra={runtime.CONSOLE_FLAG: False})
    record = stages.result_record(input_url, movie_url, params, hashes, runner, warnings, run_id)
    runner.run("write", None, [], write_stage, out_url, movie_url, images, units, traces, motion, params,
               runner.timings(), overwrite or plan.status == "incomplete", record)
    runner.run("report", None, [], report_stage, out_url)
    summary = stages.run_summary(out_url, units, traces, motion, params, runner, warnings, run_id)
    publish_artifacts(name, summary)
    return summary
