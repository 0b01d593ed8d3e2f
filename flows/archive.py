"""The archive flow: many sessions, one Prefect flow, one Dask cluster.

Sessions come from a manifest or a glob (``somaflow.manifest``). Each runs as
the session flow (a subflow of this one, inside a task) on the one shared Dask
client; at most ``concurrency`` sessions are in flight. A session that fails is
recorded with its one-line reason and the others go on. A session whose result
is complete for the same input and parameters is skipped, an interrupted one
resumes (see ``flows/session.py``). The summary table is returned and written
to ``PREFIX/archive_summary.json``, and published as a Prefect table artifact
of the flow run (``somaflow-archive``). Each session's HTML report sits next to
its result (``PREFIX/SESSION.report.html``).

``archive_flow`` takes only JSON-able parameters, so it is also the entrypoint
of the scheduled Kubernetes deployment in ``prefect.yaml``.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from somaflow_flows.session import session_flow

from somaflow import runtime
from somaflow.errors import exit_code
from somaflow.io import stores
from somaflow.io.config import load_params_file
from somaflow.manifest import (
    SUMMARY_NAME,
    SessionSpec,
    check_outputs_apart,
    failure_reason,
    is_glob,
    merge_overrides,
    read_manifest,
    result_url,
    with_defaults,
)
from somaflow.params import inference_overrides
from somaflow.session import session_params


@task(name="session")
def session_task(spec: SessionSpec, prefix: str, overrides: dict[str, Any], method: str | None,
                 overwrite: bool) -> dict[str, Any]:
    """Parameters for one session, then its session flow (a subflow)."""
    params = session_params(spec.movie, fps=spec.fps, modality=spec.modality,
                            neuron_radius=spec.neuron_radius,
                            overrides=merge_overrides(overrides, spec.params), method=method)
    t0 = time.perf_counter()
    summary = session_flow(spec.movie, result_url(prefix, spec.session), params, overwrite=overwrite,
                           session=spec.session)
    return {**summary, "seconds": round(time.perf_counter() - t0, 2)}


@task(name="write-summary")
def write_summary_stage(summary: dict[str, Any], url: str) -> str:
    """Write the summary JSON atomically (temporary name, then moved into place)."""
    with stores.atomic_output(url, overwrite=True) as tmp:
        fs, path = stores.filesystem(tmp)
        with fs.open(path, "w") as fh:
            json.dump(summary, fh, indent=2, default=str)
    return url


def _row(spec: SessionSpec, prefix: str, future: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"session": spec.session, "movie": spec.movie,
                           "result": result_url(prefix, spec.session)}
    outcome = future.result(raise_on_failure=False)
    if isinstance(outcome, BaseException) or future.state.is_failed():
        reason = failure_reason(outcome) if isinstance(outcome, BaseException) else str(future.state.message)
        # the exit status `somaflow run` would give for it: by cause (somaflow.errors), 70 internal
        code = exit_code(outcome) if isinstance(outcome, BaseException) else 70
        return {**row, "status": "failed", "reason": reason, "exit_code": code, "seconds": None}
    return {**row, "status": outcome["status"], "reason": None, "seconds": outcome["seconds"],
            "n_units": outcome["n_units"], "n_accepted": outcome["n_accepted"],
            "n_frames": outcome["n_frames"], "stages": outcome.get("stages", {}),
            "flow_run_id": outcome.get("flow_run_id")}


@flow(name="somaflow-archive", log_prints=False, validate_parameters=False)
def archive_flow(manifest: str, out: str, fps: float | None = None, modality: str | None = None,
                 neuron_radius: float | None = None, params_file: str | None = None,
                 method: str | None = None, concurrency: int = 2, overwrite: bool = False,
                 cluster: str = "local", workers: int | None = None,
                 cluster_spec: str | None = None, inference: str = "local") -> dict[str, Any]:
    """Process every session of ``manifest`` into ``out``/SESSION.zarr.

    Parameters
    ----------
    manifest : str
        YAML/CSV manifest or a glob (see ``somaflow.manifest``).
    out : str
        Folder or URL prefix of the results and of ``archive_summary.json``.
    fps, modality, neuron_radius : optional
        For sessions whose manifest row gives none.
    params_file : str, optional
        YAML overrides for every session (a row's own ``params`` win).
    concurrency : int
        Sessions in flight at once.
    cluster, workers, cluster_spec
        The Dask cluster, as ``somaflow run --cluster`` (``runtime.dask_client``).
    inference : str
        Where every session's CNNs run: ``"local"`` or the inference service's
        ``http://HOST:PORT`` (``somaflow run --inference``).

    Returns
    -------
    dict
        ``sessions`` (one row per session: ``status`` done / skipped / failed,
        ``reason``, ``seconds``, unit counts, stages), ``counts``, ``seconds``,
        ``summary`` (the JSON's URL), ``flow_run_id``.
    """
    plog = runtime.progress_logger()
    run_id = flow_run.get_id()
    plog.info("Prefect flow run %s (somaflow-archive)", run_id)
    prefix = stores.normalize_url(out)
    sessions = [with_defaults(s, fps, modality, neuron_radius) for s in read_manifest(manifest)]
    overrides = merge_overrides(load_params_file(params_file) if params_file else {},
                                inference_overrides(inference))
    manifest_file = None if is_glob(manifest) else manifest
    check_outputs_apart(sessions, prefix, (manifest_file, params_file))
    summary_url = stores.join(prefix, SUMMARY_NAME)
    plog.info("%d sessions from %s -> %s, %d at a time", len(sessions), manifest, prefix, concurrency)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with runtime.dask_client(cluster, workers, spec_file=cluster_spec) as client:
        plog.info("Dask dashboard: %s", client.dashboard_link)
        with ThreadPoolTaskRunner(max_workers=concurrency) as runner:
            futures = [(s, runner.submit(session_task, parameters={
                "spec": s, "prefix": prefix, "overrides": overrides, "method": method,
                "overwrite": overwrite})) for s in sessions]
            for spec, future in futures:
                future.wait()
                rows.append(_row(spec, prefix, future))
                r = rows[-1]
                plog.info("[%s] %s%s", spec.session, r["status"], f": {r['reason']}" if r["reason"] else "")
    counts = {k: sum(r["status"] == k for r in rows) for k in ("done", "skipped", "failed")}
    summary = {"manifest": manifest, "out": prefix, "sessions": rows, "counts": counts,
               "seconds": round(time.perf_counter() - t0, 2), "summary": summary_url,
               "flow_run_id": str(run_id) if run_id else None}
    write_summary_stage(summary, summary_url)
    create_table_artifact(
        [{"session": r["session"], "status": r["status"],
          "units": f"{r['n_accepted']}/{r['n_units']}" if "n_units" in r else "",
          "seconds": r["seconds"], "reason": r["reason"] or "", "result": r["result"]} for r in rows],
        key="somaflow-archive",
        description=f"{counts['done']} done, {counts['skipped']} skipped, {counts['failed']} failed: "
                    f"{manifest} -> {prefix}")
    return summary
