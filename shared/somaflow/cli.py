"""The ``somaflow`` command line (CONTRACT.md).

Errors a user can cause end with one line on stderr naming the problem and the
fix, and a non-zero exit status; ``--debug`` shows the traceback.

The top of the layers (docs/architecture.md): the command line calls the
session API (:mod:`somaflow.session`) and the library, and imports the Prefect
flows (``somaflow_flows``) only to enter a flow run. It is the one module that
imports inside functions, on purpose: each command imports what it needs when
it runs, so ``somaflow --help`` and a bad option answer without loading
Prefect, Dask, xarray or torch (tests/test_layers.py holds every other module
to top-level imports).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from somaflow_service.launch import add_serve_parser

from somaflow import __version__
from somaflow.errors import ParameterError, SomaflowError, store_full
from somaflow.extract import METHODS

log = logging.getLogger("somaflow")


# ----------------------------------------------------------------------------- commands


def cmd_simulate(args: argparse.Namespace) -> int:
    from somaflow.simulate import list_presets, simulate, write_simulation

    if args.list_presets:
        for name, description in list_presets():
            print(f"{name:16s} {description}")
        return 0
    if not args.out_dir:
        raise ParameterError("simulate needs OUT_DIR (or --list-presets).")
    sim = simulate(args.preset, seed=args.seed)
    write_simulation(sim, args.out_dir, overwrite=args.overwrite)
    meta = sim.meta
    _emit(args, {"out": args.out_dir, "preset": meta["preset"], "seed": meta["seed"],
                 "n_units": meta["n_units"], "shape": list(meta["shape"]), "fps": meta["fps"],
                 "modality": meta["modality"], "neuron_radius": meta["neuron_radius"]},
          lambda d: f"wrote {d['out']}: preset {d['preset']}, seed {d['seed']}, {d['n_units']} units, "
                    f"movie {d['shape']} at {d['fps']} Hz ({d['modality']})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from somaflow.io.chunks import parse_memory
    from somaflow.io.config import check_movie_values
    from somaflow.io.ingest import ingest

    check_movie_values(args.fps)
    from somaflow.io import guard, lease

    t0 = time.perf_counter()
    guard.check_output_apart(args.out, [args.input])
    with lease.held(args.out):  # an unwritable --out, or one another ingest writes: exit 3 at once
        url = ingest(args.input, args.out, fps=args.fps, modality=args.modality, dataset=args.dataset,
                     axes=args.axes, memory_budget=parse_memory(args.memory_budget),
                     overwrite=args.overwrite)
    from somaflow.io.schema import open_movie

    movie = open_movie(url)
    _emit(args, {"out": url, "shape": list(movie.shape), "dtype": str(movie.dtype),
                 "fps": movie.attrs["fps"], "seconds": round(time.perf_counter() - t0, 2)},
          lambda d: f"wrote {d['out']}: {d['shape'][0]} frames of {d['shape'][1]}x{d['shape'][2]} "
                    f"{d['dtype']} at {d['fps']} Hz in {d['seconds']} s")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from somaflow.io.config import check_movie_values
    from somaflow.runtime import check_cluster_option, configure_prefect_env

    check_movie_values(args.fps, args.neuron_radius)
    configure_prefect_env(debug=args.debug)
    check_cluster_option(args.cluster, args.cluster_spec)
    from somaflow.io import stores
    from somaflow.io.config import load_params_file, merge_overrides
    from somaflow.session import check_session, session_params

    overrides = load_params_file(args.params) if args.params else {}
    overrides = _with_inference(overrides, args.inference)
    if args.classifier:
        overrides = merge_overrides(overrides, {"classify": {"classifier": args.classifier}})
    params = session_params(args.input, fps=args.fps, modality=args.modality,
                            neuron_radius=args.neuron_radius, overrides=overrides, method=args.method,
                            dataset=args.dataset, axes=args.axes)
    out = stores.normalize_url(args.out)
    check_session(args.input, out, inputs=[args.params])
    from somaflow.io import lease

    # the lease, before any plan or cluster: an unwritable --out, or one another run is writing,
    # is a one-line error at once (exit 3), and nothing at --out is touched
    with lease.held(out):
        return _run_leased(args, out, params)


def _run_leased(args: argparse.Namespace, out: str, params: Any) -> int:
    from somaflow import provenance
    from somaflow.io import stores
    from somaflow.runtime import console_progress, dask_client, start_prefect_server
    from somaflow.session import plan_session

    plan = None
    if not args.overwrite:
        plan = plan_session(args.input, out, params)
        if plan.status == "done":
            from somaflow.report import default_report_url

            summary = provenance.result_summary(out)
            if stores.exists(default_report_url(out)):
                summary["report"] = default_report_url(out)
            if not args.json:
                print(f"{out}: already done (skipped): complete for the same input, parameters and "
                      "somaflow version; pass --overwrite to recompute", file=sys.stderr)
            _emit(args, {**summary, "seconds": 0.0, "frames_per_second": None}, _format_run)
            return 0
    from somaflow_flows.session import session_flow  # the entry into the flow run (imports Prefect)

    start_prefect_server()  # dies with this process, SIGKILL included
    t0 = time.perf_counter()
    with console_progress(), dask_client(args.cluster, args.workers, spec_file=args.cluster_spec) as client:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        summary = session_flow(args.input, out, params, overwrite=args.overwrite, plan=plan)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    summary["frames_per_second"] = round(summary["n_frames"] / max(summary["seconds"], 1e-9), 1)
    if summary.get("work"):
        fs, path = stores.filesystem(summary["work"])
        summary["work_bytes"] = int(fs.du(path)) if fs.exists(path) else 0
    _emit(args, summary, _format_run)
    return 0


def _format_run(d: dict[str, Any]) -> str:
    statuses = d.get("stages", {})
    stages = ", ".join(f"{k} {v:.1f}s" + (" (skipped)" if statuses.get(k) == "skipped" else "")
                       for k, v in d["timings"].items())
    head = f"result: {d['result']}" + (" (already done: skipped)" if d.get("status") == "skipped" else "")
    lines = [head, f"units: {d['n_units']} ({d['n_accepted']} accepted) over {d['n_frames']} frames"]
    if d.get("motion"):
        m = d["motion"]
        dev = f" (non-rigid deviation {m['nonrigid_deviation']:.2f} px)" if "nonrigid_deviation" in m else ""
        lines.append(f"motion correction: {m['mode']}{dev}")
    if d.get("status") != "skipped":
        lines.append(f"time: {d['seconds']} s ({d['frames_per_second']} frames/s; {stages})")
    if d.get("report"):
        lines.append(f"report: {d['report']}")
    if d.get("work"):
        size = f" ({_human_bytes(d['work_bytes'])})" if d.get("work_bytes") is not None else ""
        lines.append(f"intermediates: {d['work']}{size}: they let a rerun resume or reuse unchanged stages; "
                     "delete the folder once you are done with this session")
    warnings = d.get("ood_warnings") or []
    if warnings:
        lines.append(f"warning: the movie is out of the training distribution of a model ({len(warnings)}); check "
                     "the units in the report, or fine-tune the model on labelled sessions like this one "
                     "(somaflow train MODEL --init default --data ...):")
        lines += [f"  - {w}" for w in warnings]
    return "\n".join(lines)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def cmd_archive(args: argparse.Namespace) -> int:
    from somaflow.io.config import check_movie_values
    from somaflow.runtime import check_cluster_option, configure_prefect_env

    check_movie_values(args.fps, args.neuron_radius)
    configure_prefect_env(debug=args.debug)
    check_cluster_option(args.cluster, args.cluster_spec)
    if args.concurrency < 1:
        raise ParameterError(f"--concurrency must be at least 1, got {args.concurrency}.")
    from somaflow.io import stores
    from somaflow.manifest import check_outputs_apart, format_summary, is_glob, read_manifest
    from somaflow.runtime import console_progress

    # a bad manifest, or results that would overwrite an input, fail here, before any server or cluster starts
    check_outputs_apart(read_manifest(args.manifest), stores.normalize_url(args.out),
                        (None if is_glob(args.manifest) else args.manifest, args.params))
    from somaflow.io import lease

    inference = _checked_inference(args.inference)  # exit 4 when the service does not answer
    lease.check_writable(stores.normalize_url(args.out))  # exit 3 at once, before any server or cluster
    from somaflow_flows.archive import archive_flow  # the entry into the flow run (imports Prefect)

    from somaflow.runtime import start_prefect_server

    start_prefect_server()  # dies with this process, SIGKILL included

    with console_progress(bars=False):
        summary = archive_flow(
            args.manifest, args.out, fps=args.fps, modality=args.modality,
            neuron_radius=args.neuron_radius, params_file=args.params, method=args.method,
            concurrency=args.concurrency, overwrite=args.overwrite, cluster=args.cluster,
            workers=args.workers, cluster_spec=args.cluster_spec, inference=inference,
        )
    _emit(args, summary, format_summary)
    return 1 if summary["counts"].get("failed") else 0


def _checked_inference(spec: str) -> str:
    """``--inference``: 'local', or the service's URL once it answers (ServiceError after the deadline)."""
    from somaflow.inference import RemoteBackend, check_spec

    spec = check_spec(spec)
    if spec != "local":
        RemoteBackend(spec).wait_ready()
    return spec


def _with_inference(overrides: dict[str, Any], spec: str) -> dict[str, Any]:
    """Parameter overrides that send every CNN call to ``--inference`` (checked first)."""
    from somaflow.params import inference_overrides, merge_overrides

    return merge_overrides(overrides, inference_overrides(_checked_inference(spec)))


def cmd_train(args: argparse.Namespace) -> int:
    from somaflow.runtime import default_workers
    from somaflow.training.recipes import train_model

    if args.threads is None:
        args.threads = default_workers()
    logging.getLogger("somaflow").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s", stream=sys.stderr)
    summary = train_model(
        args.model, args.out, data=args.data or ["simulator"], init=args.init, presets=args.presets,
        seeds=args.seeds, epochs=args.epochs, lr=args.lr, n_frames=args.frames, max_seconds=args.max_seconds,
        threads=args.threads, cache=args.cache, target=args.target, fps=args.fps, neuron_radius=args.neuron_radius, seed=args.seed,
        device=args.device, jobs=args.jobs, batch_size=args.batch_size, n_crops=args.crops,
        config=_model_config(args.config),
    )
    _emit(args, summary, _format_train)
    return 0


def _model_config(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` model constructor arguments (values parsed as JSON, else kept as text)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--config takes KEY=VALUE (e.g. width=12), got {item!r}.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _format_train(d: dict[str, Any]) -> str:
    m = d["metrics"]
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
             if k.startswith("val_") or k in ("threshold", "train_loss", "epochs")}
    return (f"wrote {d['out']}: {d['model']} trained on {d['n_examples']} examples in {d['seconds']} s\n"
            + "\n".join(f"  {k}: {v}" for k, v in shown.items()))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from somaflow.evaluate import evaluate, format_report

    metrics = evaluate(args.result, args.ground_truth, iou_threshold=args.iou,
                       allow_offset=not args.no_offset)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_report(metrics))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from somaflow.io import guard
    from somaflow.report import default_report_url, write_report

    out = args.out or default_report_url(args.result)
    guard.check_output_apart(out, [args.result, args.ground_truth])
    t0 = time.perf_counter()
    url = write_report(args.result, out, ground_truth=args.ground_truth, overwrite=args.overwrite)
    _emit(args, {"out": url, "seconds": round(time.perf_counter() - t0, 2)},
          lambda d: f"wrote {d['out']} (open it in a browser)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from somaflow.io import guard
    from somaflow.io.nwb_export import NwbMetadata, export_nwb

    guard.check_output_apart(args.nwb, [args.result, args.metadata], what="--nwb", fix="Choose an --nwb outside every input.")
    meta = NwbMetadata.from_yaml(args.metadata)
    t0 = time.perf_counter()
    url = export_nwb(args.result, args.nwb, metadata=meta, overwrite=args.overwrite)
    _emit(args, {"out": url, "seconds": round(time.perf_counter() - t0, 2), "subject": meta.subject is not None},
          lambda d: f"wrote {d['out']} in {d['seconds']} s" + (
              "" if d["subject"] else "\nnote: no subject given: NWB's best practices (nwbinspector) ask for one; "
                                      "add subject: {subject_id, species, sex, age} to a --metadata file"))
    return 0


# ----------------------------------------------------------------------------- plumbing


def _emit(args: argparse.Namespace, data: dict[str, Any], fmt: Any) -> None:
    if getattr(args, "json", False):
        print(json.dumps(data, default=str))
    else:
        print(fmt(data))


def _cluster_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--cluster", default="local", metavar="local|threads|kubernetes|ADDRESS",
                   help="'local' (worker processes sized to the machine, default), 'threads', "
                        "'kubernetes' (dask-kubernetes operator) or tcp://HOST:PORT of a running scheduler")
    s.add_argument("--cluster-spec", metavar="VALUES.yaml",
                   help="Kubernetes cluster description for --cluster kubernetes: the chart's values.yaml "
                        "(its dask: section) or the same keys at top level (default: built-in)")
    s.add_argument("--workers", type=int,
                   help="workers of a local cluster (default: one per core) or of a Kubernetes cluster")


def _inference_option(s: argparse.ArgumentParser) -> None:
    s.add_argument("--inference", default="local", metavar="local|URL",
                   help="where CNN models run: 'local' (in-process; a CUDA GPU when torch sees one, default) or "
                        "the inference service, http://HOST:PORT (`somaflow serve`); its token, if any, from "
                        "SOMAFLOW_INFERENCE_TOKEN, its deadline (s) from SOMAFLOW_INFERENCE_DEADLINE (300)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="somaflow", description="Calcium-imaging movies in, neurons out.")
    p.add_argument("--version", action="version", version=f"somaflow {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("simulate", help="write a synthetic movie with ground truth")
    s.add_argument("out_dir", nargs="?", metavar="OUT_DIR", help="folder or URL to write movie.tif, ground_truth.zarr, meta.json")
    s.add_argument("--preset", default="2p-small", help="simulation preset (see --list-presets)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    s.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("ingest", help="convert TIFF/HDF5/AVI/NWB/zarr/Suite2p .bin to a movie zarr")
    s.add_argument("input", metavar="INPUT", help="input file, folder or URL")
    s.add_argument("--out", required=True, metavar="MOVIE_URL", help="movie zarr to write")
    s.add_argument("--fps", type=float, help="frame rate in Hz (required when the file does not record it)")
    s.add_argument("--modality", choices=["2p", "1p"], help="imaging modality (default 2p)")
    s.add_argument("--dataset", metavar="PATH", help="HDF5/zarr array inside the input (guessed when unique)")
    s.add_argument("--axes", default="tyx", metavar="ORDER", help="input axis order, e.g. tyx (default) or yxt")
    s.add_argument("--memory-budget", default="256MiB", help="memory per chunk in flight (default 256MiB)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_ingest)

    s = sub.add_parser(
        "run", help="run the whole pipeline on one session (Prefect flow on Dask)",
        description="Run the whole pipeline on one session as a Prefect flow on a Dask cluster: ingest, "
                    "motion correction, summary images, source extraction, classification, traces and "
                    "spikes. Writes RESULT_URL (a zarr), its HTML report RESULT.report.html beside it, and "
                    "keeps the intermediates in RESULT_URL.work so that a rerun resumes. While it runs, "
                    "RESULT_URL.lease holds the result: a second run on the same --out stops at once (exit 3) "
                    "and touches nothing; the lease of a run that crashed expires after 60 s "
                    "(SOMAFLOW_LEASE_TTL, seconds). An --out that cannot be written is exit 3 before any "
                    "cluster starts.",
        epilog="Two numbers matter most and only you know them: the frame rate (--fps; TIFFs rarely "
               "record it) and the soma radius in pixels (--neuron-radius: half the diameter of a typical "
               "cell body in the movie, e.g. 5 for somata 10-12 px across). Example, the Neurofinder "
               "excerpt in ../shared/data/neurofinder_left (7 Hz, somata ~10-12 px): somaflow run "
               "movie.tif --fps 7 --neuron-radius 5 --out nf.zarr")
    s.add_argument("input", metavar="INPUT", help="any supported movie file or a movie zarr")
    s.add_argument("--out", required=True, metavar="RESULT_URL", help="result zarr to write")
    s.add_argument("--fps", type=float,
                   help="frame rate in Hz (required when the file does not record it: most TIFFs do not)")
    s.add_argument("--modality", choices=["2p", "1p"], help="imaging modality (default 2p)")
    s.add_argument("--neuron-radius", type=float, metavar="PX",
                   help="typical soma radius in pixels: half a cell body's diameter (default 5 for 2p, "
                        "6 for 1p; the defaults of every stage scale with it)")
    s.add_argument("--params", metavar="FILE.yaml", help="YAML overrides of any stage parameter")
    s.add_argument("--method", choices=list(METHODS),
                   help=f"source extraction method (default {METHODS[0]})")
    s.add_argument("--classifier", choices=["none", "3cnet", "3cnet-plus"],
                   help="cell/not-cell CNN folded into score and accepted (default none)")
    _cluster_options(s)
    _inference_option(s)
    s.add_argument("--dataset", metavar="PATH", help="HDF5/zarr array inside the input")
    s.add_argument("--axes", metavar="ORDER", help="input axis order (default tyx)")
    s.add_argument("--overwrite", action="store_true",
                   help="recompute every stage and replace whatever is at --out (without it: a result "
                        "complete for the same input and parameters is skipped, an interrupted run "
                        "resumes, a result for other parameters or anything else is an error); an "
                        "--out that is, holds or lies inside the input is refused either way")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "archive", help="process many sessions (a manifest or a glob) as one Prefect flow",
        description="Process many sessions as one Prefect flow on one Dask cluster. Each session's "
                    "result is PREFIX/SESSION.zarr; a session whose result is complete for the same "
                    "input and parameters is skipped, an interrupted one resumes. One session's failure "
                    "does not stop the others. Prints a table (done / skipped / failed with the reason) "
                    "and writes it to PREFIX/archive_summary.json. Exit status: 0 when every session is "
                    "done or skipped, 1 when any failed, 2 for a bad manifest or options.",
        epilog="MANIFEST: a YAML list of mappings or a CSV with columns session, movie, fps, modality "
               "and optionally neuron_radius and params (YAML: an inline mapping of parameter "
               "overrides; CSV: the path of a parameter file); relative movie paths are taken from "
               "the manifest's folder. Or a quoted glob ('raw/*.tif') with --fps/--modality for all; "
               "the session id is the file name without its extension.")
    s.add_argument("manifest", metavar="MANIFEST", help="YAML/CSV manifest, or a glob of movie files")
    s.add_argument("--out", required=True, metavar="PREFIX", help="folder or URL prefix of the results")
    s.add_argument("--fps", type=float, help="frame rate for sessions whose manifest row gives none")
    s.add_argument("--modality", choices=["2p", "1p"], help="modality for sessions whose row gives none")
    s.add_argument("--neuron-radius", type=float, metavar="PX", help="soma radius for rows that give none")
    s.add_argument("--params", metavar="FILE.yaml", help="YAML overrides for every session (a row's own win)")
    s.add_argument("--method", choices=list(METHODS), help=f"source extraction method (default {METHODS[0]})")
    s.add_argument("--concurrency", type=int, default=2, metavar="N",
                   help="sessions in flight at once (default 2); they share one Dask cluster")
    _cluster_options(s)
    _inference_option(s)
    s.add_argument("--overwrite", action="store_true", help="recompute every session from scratch")
    s.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    s.set_defaults(func=cmd_archive)

    s = sub.add_parser(
        "train", help="train or fine-tune a CNN (detector or classifier) and write its checkpoint",
        description="Train MODEL on simulated sessions and/or labelled real data and write a safetensors "
                    "checkpoint (weights + training recipe, metrics, input statistics). With --init, "
                    "fine-tune: start from existing weights ('default' = the shipped ones) at a lower "
                    "learning rate. Use the checkpoint with `somaflow run --params` "
                    "(cnn: {weights: {MODEL: FILE}} or classify: {weights: FILE}).",
        epilog="--data: 'simulator' (the recipe's presets and seeds), a folder with movie.tif + regions.json "
               "(Neurofinder labels), or a result zarr whose `accepted` a person curated; repeatable.")
    s.add_argument("model", choices=["stneuronet", "convnet2p1d", "unet2d", "meanimage2d", "3cnet",
                                     "3cnet-plus", "lstm"], metavar="MODEL",
                   help="stneuronet | convnet2p1d | unet2d | meanimage2d | 3cnet | 3cnet-plus | lstm")
    s.add_argument("--out", required=True, metavar="FILE", help="checkpoint to write (.safetensors)")
    s.add_argument("--data", action="append", metavar="SOURCE", help="training data (default: simulator)")
    s.add_argument("--init", metavar="WEIGHTS", help="fine-tune from these weights ('default': the shipped ones)")
    s.add_argument("--presets", nargs="+", metavar="PRESET", help="simulator presets (default: the recipe's)")
    s.add_argument("--seeds", nargs="+", type=int, metavar="N", help="simulator seeds (default: the recipe's)")
    s.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    s.add_argument("--lr", type=float, help="learning rate (default: the recipe's; lower with --init)")
    s.add_argument("--frames", type=int, help="simulated frames per session (default: the preset's)")
    s.add_argument("--max-seconds", type=float, help="stop training after this long")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: all cores)")
    s.add_argument("--cache", metavar="DIR", help="keep simulated classifier candidates here for reuse")
    s.add_argument("--target", choices=["union", "separated", "centroid"],
                   help="detector target per pixel (separated: touching cells kept 1 px apart)")
    s.add_argument("--fps", type=float, default=7.0, help="frame rate of labelled folders (default 7)")
    s.add_argument("--neuron-radius", type=float, default=5.0, help="soma radius of labelled folders, px")
    s.add_argument("--seed", type=int, default=0, help="seed of crops, split and initial weights")
    s.add_argument("--device", default="auto",
                   help="torch device: auto (a CUDA GPU if torch sees one, else cpu), cpu, cuda[:N]")
    s.add_argument("--jobs", type=int, default=1, help="simulated sessions prepared in parallel processes")
    s.add_argument("--batch-size", type=int, help="examples per optimiser step (default: the recipe's)")
    s.add_argument("--crops", type=int, help="training crops per simulated session (default: the recipe's)")
    s.add_argument("--config", action="append", metavar="KEY=VALUE",
                   help="model constructor argument over the recipe's, e.g. width=12 (repeatable)")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_train)

    add_serve_parser(sub)

    s = sub.add_parser(
        "report", help="write a self-contained HTML report of a result",
        description="Write one self-contained HTML file (figures embedded): the summary images with every "
                    "unit's outline coloured by score, accepted vs rejected, example traces with their "
                    "spikes, motion shifts, stage timings, parameters, out-of-distribution warnings and, "
                    "with --ground-truth, the evaluation table. `somaflow run` writes one next to every "
                    "result.")
    s.add_argument("result", metavar="RESULT_URL", help="result zarr")
    s.add_argument("--out", metavar="REPORT.html",
                   help="HTML file to write (default: RESULT.report.html next to the result)")
    s.add_argument("--ground-truth", metavar="GROUND_TRUTH_URL",
                   help="add the evaluation against this ground truth (as `somaflow evaluate` takes it)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing report")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser(
        "export", help="write a result as NWB (PlaneSegmentation, RoiResponseSeries)",
        description="Write the result as an NWB file (pynwb): the units' masks and footprints as a "
                    "PlaneSegmentation, traces / dF/F / spikes as RoiResponseSeries, the summary images, "
                    "the motion shifts and the parameters; readable by pynwb and roiextractors.",
        epilog="--metadata: a YAML file with what the result does not know, e.g. session_start_time: "
               "2024-05-02T10:31:00+02:00, experimenter: ['Doe, Jane'], institution: ..., subject: "
               "{subject_id: m12, species: Mus musculus, sex: F, age: P90D}, imaging_plane: {indicator: "
               "GCaMP6s, location: VISp, excitation_lambda: 920, emission_lambda: 510}.")
    s.add_argument("result", metavar="RESULT_URL", help="result zarr")
    s.add_argument("--nwb", required=True, metavar="OUT.nwb", help="NWB file to write")
    s.add_argument("--metadata", metavar="FILE.yaml", help="session, subject and imaging-plane metadata")
    s.add_argument("--overwrite", action="store_true", help="replace an existing file")
    s.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser(
        "evaluate", help="score a result against ground truth",
        description="Precision, recall and F1 of the result's accepted units against ground truth in three "
                    "conventions (IoU >= 0.5 with Hungarian matching; CaImAn's; neurofinder's), and the "
                    "correlation of matched units' traces and spikes. A global integer offset between the "
                    "two mask sets (up to 20 px) is searched for and undone when it adds matches; the "
                    "output says so. --no-offset turns that off.")
    s.add_argument("result", metavar="RESULT_URL", help="result zarr")
    s.add_argument("ground_truth", metavar="GROUND_TRUTH_URL",
                   help="result zarr, Neurofinder regions.json, or .npz with masks")
    s.add_argument("--iou", type=float, default=0.5, help="IoU threshold of the main convention (default 0.5)")
    s.add_argument("--no-offset", action="store_true",
                   help="do not search for a global offset between the mask sets (searched by default)")
    s.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    s.set_defaults(func=cmd_evaluate)
    return p


def _one_line(exc: BaseException) -> str:
    """An error's message on one line (a library's message may span several)."""
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``somaflow`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SomaflowError as exc:
        if args.debug:
            raise
        print(f"somaflow: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("somaflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (e.g. piped into head): not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if args.debug:
            raise
        from somaflow.io import stores

        full = store_full(exc)  # a disk full anywhere (a Dask task's write included): exit 3, not 70
        if full is not None:
            print(f"somaflow: error: {_one_line(full)}", file=sys.stderr)
            return full.exit_code
        if stores.is_transient(exc):  # a store that did not answer after its retries: exit 3, not 70
            err = stores.unavailable(getattr(args, "out", None) or getattr(args, "input", None) or "", exc)
            print(f"somaflow: error: {err}", file=sys.stderr)
            return err.exit_code
        print(f"somaflow: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(rerun with --debug for the traceback and report it)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
