"""Provenance of a run: stage hashes, source fingerprints, library versions.

A run's stages (:data:`STAGES`) each write a zarr whose attrs carry a
``stage_hash``: a digest of the source's content checksum, the parameters the
stage reads, the hashes of the stages upstream of it and the somaflow version.
A stage whose output is complete and carries the hash the current run would
write is skipped, so a rerun after a crash resumes where it stopped and a rerun
of a finished session does nothing.

Hashing a movie's content means reading all of it. To make the check of a
finished session cheap, outputs also record a **fingerprint** of the source —
size and modification time (or ETag) of every file, from a listing, without
reading data — and the source checksum is reused from an output whose
fingerprint matches the input's (the quick check of ``rsync`` and ``make``).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from somaflow import __version__
from somaflow.errors import OutputConflictError, ResultExistsError, StoreError
from somaflow.io import schema, stores

log = logging.getLogger(__name__)

#: the stages of ``somaflow run``, in order; each is skipped when its output is current
STAGES: tuple[str, ...] = ("ingest", "motion", "summary", "extract", "classify", "write")

#: parameter groups each stage reads (top-level keys of ``RunParams.model_dump()``);
#: ``None`` means every group but ``ingest`` and ``classify`` (``extract`` holds only the chosen method's)
STAGE_PARAMETERS: dict[str, tuple[str, ...] | None] = {
    "ingest": ("fps", "modality", "ingest"),
    "motion": ("preprocess.motion",),
    "summary": ("fps", "modality", "neuron_radius", "preprocess", "summary"),
    "extract": None,
    "classify": ("classify",),
    "write": None,
}

#: distributions whose versions every result records (torch only when it was imported)
VERSIONED = ("numpy", "scipy", "dask", "distributed", "xarray", "zarr", "fsspec", "prefect", "pydantic")

#: file-listing fields that change when a file's content changes, by fsspec backend
_FINGERPRINT_FIELDS = ("size", "mtime", "ETag", "etag", "LastModified", "md5Hash", "generation", "created")

ResultStatus = Literal["missing", "incomplete", "done", "stale", "foreign"]


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return "blake2b:" + hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _select(params: Mapping[str, Any], keys: tuple[str, ...] | None) -> dict[str, Any]:
    if keys is None:  # everything a stage may read; the classifier's settings only matter from "classify" on
        return {k: v for k, v in params.items() if k not in ("ingest", "classify")}
    out: dict[str, Any] = {}
    for key in keys:
        value: Any = params
        for part in key.split("."):
            value = value[part]
        out[key] = value
    return out


def stage_hashes(source_checksum: str, params: Mapping[str, Any]) -> dict[str, str]:
    """The hash of every stage's output for one source and one parameter set.

    Parameters
    ----------
    source_checksum : str
        Content checksum of the input (``stores.checksum``), as recorded in the
        movie's ``source_checksum`` attr.
    params : mapping
        ``RunParams.model_dump(mode="json")``.

    Returns
    -------
    dict
        Stage name (:data:`STAGES`) -> ``"blake2b:<hex>"``. Each hash covers the
        source checksum, the stage's parameters (:data:`STAGE_PARAMETERS`), the
        previous stage's hash and the somaflow version, so a change upstream
        invalidates everything after it.

    Raises
    ------
    ValueError
        ``source_checksum`` is empty (a source without a checksum cannot be
        matched to earlier outputs).
    """
    if not source_checksum:
        raise ValueError("a stage hash needs the source checksum; the movie records none")
    hashes: dict[str, str] = {}
    upstream: str | None = None
    for stage in STAGES:
        upstream = _digest({
            "stage": stage,
            "source_checksum": source_checksum,
            "params": _select(params, STAGE_PARAMETERS[stage]),
            "upstream": upstream,
            "somaflow_version": __version__,
        })
        hashes[stage] = upstream
    return hashes


def fingerprint_of_listing(listing: Sequence[Mapping[str, Any]], root: str) -> str:
    """Fingerprint of a source from its file listing (pure).

    Parameters
    ----------
    listing : sequence of mapping
        fsspec ``info`` dicts of every file of the source (``name`` plus
        whichever of size, mtime, ETag ... the backend reports).
    root : str
        The source's path; names are taken relative to it.

    Returns
    -------
    str
        ``"files:<hex>"``, equal for equal listings.
    """
    rows = []
    for info in listing:
        name = str(info.get("name", ""))
        rel = name[len(root):].lstrip("/") if name.startswith(root) else name
        rows.append([rel] + [str(info[f]) for f in _FINGERPRINT_FIELDS if info.get(f) is not None])
    rows.sort()
    return "files:" + _digest(rows).split(":", 1)[1]


def source_fingerprint(url: str) -> str:
    """Fingerprint of the file or directory at ``url`` from a listing (no data read).

    Raises
    ------
    StoreError
        ``url`` does not exist or cannot be listed.
    """
    fs, path = stores.filesystem(url)
    try:
        fs.invalidate_cache()
        if fs.isdir(path):
            listing = list(fs.find(path, detail=True).values())
        else:
            listing = [fs.info(path)]
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot list {url}: {exc}. Check that the input exists and is readable.") from exc
    return fingerprint_of_listing(listing, path)


def is_current(url: str, stage_hash: str) -> bool:
    """True when ``url`` is a complete zarr whose ``stage_hash`` attr equals ``stage_hash``."""
    if not schema.is_complete(url):
        return False
    return schema.read_attrs(url).get("stage_hash") == stage_hash


def result_status(url: str, expected_hash: str | None, work_url: str | None = None) -> ResultStatus:
    """State of the result at ``url`` for a run whose final hash is ``expected_hash``.

    Parameters
    ----------
    url : str
        The result's location (``--out``).
    expected_hash : str or None
        The ``write`` stage hash this run would record (None when unknown).
    work_url : str, optional
        The run's work store; an incomplete result is somaflow's own unfinished
        one only when this holds a run record (:func:`write_run_record`).

    Returns
    -------
    str
        ``"missing"`` — nothing there; ``"incomplete"`` — a somaflow result
        without ``complete=true`` whose run record is in ``work_url`` (an
        interrupted write: resumed, never taken for a finished result);
        ``"done"`` — complete with the expected hash; ``"stale"`` — a complete
        somaflow output for other inputs, parameters or somaflow version;
        ``"foreign"`` — anything else: a file, a folder, a zarr somaflow did
        not write, or an unfinished result no run record vouches for. Without
        ``--overwrite`` a run writes its result only where it is
        ``"missing"`` or ``"incomplete"``.
    """
    state = schema.output_state(url)
    if state in ("missing", "foreign"):
        return state
    if state == "unfinished":
        return "incomplete" if work_url is not None and work_status(work_url) == "ours" else "foreign"
    if expected_hash is not None and schema.read_attrs(url).get("stage_hash") == expected_hash:
        return "done"
    return "stale"


def work_url(out_url: str) -> str:
    """Where a run keeps its intermediates: ``RESULT.work`` next to the result."""
    return stores.normalize_url(out_url) + ".work"


#: name of the run record inside a run's work store: the mark that somaflow made that store
RUN_RECORD = "somaflow-run.json"

WorkStatus = Literal["missing", "ours", "foreign"]


def work_status(work_url: str) -> WorkStatus:
    """Whether a run's work store is absent, somaflow's own (it holds a run record) or something else."""
    if not stores.exists(work_url):
        return "missing"
    return "ours" if stores.exists(stores.join(work_url, RUN_RECORD)) else "foreign"


def write_run_record(work_url: str, input_url: str, out_url: str) -> str:
    """Mark ``work_url`` as a somaflow run's work store (creating it) and return the record's URL.

    The record names the input, the result, the somaflow version, the host and
    the time; its presence is what lets a later run resume an unfinished
    result (:func:`result_status`).
    """
    url = stores.join(work_url, RUN_RECORD)
    fs, path = stores.filesystem(url)
    record = {"somaflow_version": __version__, "input": stores.normalize_url(input_url),
              "result": stores.normalize_url(out_url), "host": platform.node(),
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        if stores.protocol_of(url) == "file":
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with fs.open(path, "w") as fh:
            json.dump(record, fh, indent=2)
    except OSError as exc:
        raise StoreError(f"cannot write {url}: {exc}. Check that --out is writable.") from exc
    return url


@dataclass(frozen=True)
class RunPlan:
    """What a run over one input and one parameter set has to do.

    Attributes
    ----------
    source_checksum : str or None
        The input's content checksum, when known without reading the input.
    hashes : dict or None
        :func:`stage_hashes` for that checksum (None when it is unknown).
    status : str
        :func:`result_status` of the result for these hashes.
    work : str
        :func:`work_status` of the run's work store.
    """

    source_checksum: str | None
    hashes: dict[str, str] | None
    status: ResultStatus
    work: WorkStatus = "missing"


def plan_run(input_url: str, out_url: str, params: Mapping[str, Any], movie_url: str | None = None,
             work_url: str | None = None) -> RunPlan:
    """Decide, cheaply, whether the result at ``out_url`` is done, stale, incomplete, foreign or missing.

    The input is read in full (to checksum it) only when a complete result
    exists whose recorded fingerprint no longer matches the input.

    Parameters
    ----------
    input_url, out_url : str
        The run's input and result.
    params : mapping
        ``RunParams.model_dump(mode="json")``.
    movie_url : str, optional
        Where the run keeps its ingested movie (a second place the checksum may
        be recorded).
    work_url : str, optional
        The run's work store (whose run record makes an unfinished result
        resumable).
    """
    work = work_status(work_url) if work_url else "missing"
    outputs = [out_url] + ([movie_url] if movie_url and work != "foreign" else [])
    checksum = known_source_checksum(input_url, outputs)
    if checksum is None and schema.is_complete(out_url):
        checksum = stores.checksum(input_url)
    hashes = stage_hashes(checksum, params) if checksum else None
    status = result_status(out_url, hashes["write"] if hashes else None, work_url)
    return RunPlan(source_checksum=checksum, hashes=hashes, status=status, work=work)


def check_plan(plan: RunPlan, out_url: str, work_url: str, overwrite: bool) -> None:
    """Refuse to start a run that would replace what it must not.

    Raises
    ------
    ResultExistsError
        A complete somaflow output for other inputs or parameters is at
        ``out_url`` and ``overwrite`` is False (exit status 3).
    OutputConflictError
        ``out_url`` or ``work_url`` holds something somaflow did not start
        (a user's folder or file, another tool's zarr) and ``overwrite`` is
        False (exit status 2).
    """
    if overwrite:
        return
    if plan.status == "stale":
        raise ResultExistsError(
            f"{out_url} already exists, computed from other inputs, parameters or somaflow version. "
            "Pass --overwrite to replace it, or choose another --out."
        )
    if plan.status == "foreign":
        raise OutputConflictError(
            f"{out_url} already exists and is not a somaflow result (nor one that a somaflow run "
            "left unfinished). Choose another --out, or pass --overwrite to replace it."
        )
    if plan.work == "foreign":
        raise OutputConflictError(
            f"{work_url} already exists and was not made by a somaflow run (it holds no {RUN_RECORD}); "
            "somaflow keeps the run's intermediates there. Move it away, choose another --out, or pass "
            "--overwrite to write into it."
        )


def _recorded_fingerprint(attrs: Mapping[str, Any]) -> str | None:
    if "source_fingerprint" in attrs:
        return str(attrs["source_fingerprint"])
    prov = attrs.get("provenance")
    if isinstance(prov, Mapping) and prov.get("source_fingerprint"):
        return str(prov["source_fingerprint"])
    return None


def is_movie_zarr(url: str) -> bool:
    """True when ``url`` is a complete somaflow movie zarr (it needs no ingest)."""
    if not schema.is_complete(url):
        return False
    attrs = schema.read_attrs(url)
    return "fps" in attrs and "modality" in attrs


def recorded_source_checksum(movie_url: str) -> str:
    """The ``source_checksum`` a movie zarr records (its own checksum when it records none)."""
    return str(schema.read_attrs(movie_url).get("source_checksum") or stores.checksum(movie_url))


def known_source_checksum(input_url: str, outputs: Sequence[str]) -> str | None:
    """The input's content checksum when it can be had without reading the input.

    A movie zarr records its source's checksum. For any other input, the first
    complete store in ``outputs`` (a result, an ingested movie) that recorded
    the input's current fingerprint gives it.

    Returns
    -------
    str or None
        None when the input must be read to know its checksum.
    """
    if is_movie_zarr(input_url):
        return recorded_source_checksum(input_url)
    fingerprint: str | None = None
    for url in outputs:
        if not schema.is_complete(url):
            continue
        attrs = schema.read_attrs(url)
        recorded = _recorded_fingerprint(attrs)
        if recorded is None or not attrs.get("source_checksum"):
            continue
        fingerprint = fingerprint or source_fingerprint(input_url)
        if recorded == fingerprint:
            return str(attrs["source_checksum"])
    return None


def remove_partial_outputs(folder: str) -> list[str]:
    """Delete the temporary outputs (``.NAME.partial-XXXX``) that interrupted writes left in ``folder``.

    ``stores.atomic_output`` removes its temporary output when a write fails,
    but a killed process leaves it behind. Call this only for a folder no other
    run is writing to (a run's work store).

    Returns
    -------
    list of str
        The paths removed.
    """
    fs, path = stores.filesystem(folder)
    fs.invalidate_cache()
    if not fs.exists(path):
        return []
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(".") and ".partial-" in name:
            fs.rm(entry, recursive=True)
            removed.append(entry)
    if removed:
        log.info("removed %d interrupted temporary outputs from %s", len(removed), folder)
    return removed


def versions() -> dict[str, str]:
    """Versions of Python, somaflow and the libraries a result depends on.

    torch is listed only when it is already imported (the library never imports
    it for the parts that do not need it).
    """
    out = {"python": platform.python_version(), "somaflow": __version__}
    names = list(VERSIONED) + (["torch"] if "torch" in sys.modules else [])
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def host() -> dict[str, str]:
    """Where a result was computed: host name and platform."""
    return {"node": platform.node(), "platform": platform.platform()}


def result_summary(url: str) -> dict[str, Any]:
    """The summary ``somaflow run`` prints, read back from a finished result.

    Raises
    ------
    IncompleteResultError
        The result is not marked complete.
    """
    ds = schema.open_result(url)
    n_units = int(ds.sizes.get("unit", 0))
    return {
        "result": stores.normalize_url(url),
        "status": "skipped",
        "n_units": n_units,
        "n_accepted": int(ds["accepted"].sum()) if n_units else 0,
        "n_frames": int(ds.sizes.get("frame", 0)),
        "timings": dict(ds.attrs.get("timings", {})),
        "stages": {s: "skipped" for s in STAGES},
    }
