"""The session list of ``somaflow archive``: a YAML or CSV manifest, or a glob.

YAML — a list of mappings (or a mapping with a ``sessions:`` list)::

    - session: mouse1-day1
      movie: raw/mouse1_day1.tif          # relative to the manifest's folder, or any URL
      fps: 30
      modality: 2p
      neuron_radius: 6                    # optional
      params: {traces: {neuropil_coefficient: 0.6}}   # optional overrides

CSV — columns ``session,movie,fps,modality`` and optionally ``neuron_radius``
and ``params`` (the path of a YAML parameter file). A glob (``raw/*.tif``) makes
one session per match, named after the file without its extension.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from somaflow import provenance
from somaflow.errors import InputError, ParameterError, SomaflowError
from somaflow.io import guard, stores
from somaflow.io.config import (  # noqa: F401 - merge_overrides re-exported
    MAX_FPS,
    MAX_NEURON_RADIUS,
    check_movie_values,
    load_params_file,
    merge_overrides,
)

log = logging.getLogger(__name__)

#: manifest columns/keys; ``session`` and ``movie`` are required
FIELDS = ("session", "movie", "fps", "modality", "neuron_radius", "params")

#: name of the archive's summary, written next to the results
SUMMARY_NAME = "archive_summary.json"

_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GLOB_CHARS = set("*?[")


class SessionSpec(BaseModel):
    """One session of an archive run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    session: str = Field(pattern=_SESSION_ID.pattern, max_length=200,
                         description="session id; its result is PREFIX/SESSION.zarr")
    movie: str = Field(min_length=1, description="URL of the movie (any supported input)")
    fps: float | None = Field(None, gt=0, le=MAX_FPS, allow_inf_nan=False,
                              description="frame rate (Hz); None: the file's own")
    modality: str | None = Field(None, pattern="^(2p|1p)$")
    neuron_radius: float | None = Field(None, gt=0, le=MAX_NEURON_RADIUS, allow_inf_nan=False)
    params: dict[str, Any] = Field(default_factory=dict, description="parameter overrides of this session")


def _parent(url: str) -> str:
    url = stores.normalize_url(url)
    if stores.protocol_of(url) == "file":
        return os.path.dirname(url)
    return url.rsplit("/", 1)[0]


def _resolve(movie: str, base: str) -> str:
    """A manifest's movie path: URLs and absolute paths as they are, others from ``base``."""
    if "://" in movie or movie.startswith("/") or movie.startswith("~"):
        return stores.normalize_url(movie)
    if stores.protocol_of(base) == "file":
        return stores.join(base, movie)
    return posixpath.join(base, movie)


def _blank_to_none(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k.strip(): (v.strip() if isinstance(v, str) else v) or None
            for k, v in row.items() if k is not None and k.strip()}


def _session(row: Mapping[str, Any], where: str, base: str) -> SessionSpec:
    unknown = set(row) - set(FIELDS)
    if unknown:
        raise InputError(f"{where}: unknown column(s) {sorted(unknown)}; use {', '.join(FIELDS)}.")
    data = {k: v for k, v in row.items() if v is not None}
    if "movie" in data:
        data["movie"] = _resolve(str(data["movie"]), base)
    if "session" in data:
        data["session"] = str(data["session"])
    params = data.get("params")
    if isinstance(params, str):
        data["params"] = load_params_file(_resolve(params, base))
    try:
        return SessionSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InputError(f"{where}: bad {field or 'row'}: {first['msg']}. Fix the manifest.") from exc


def parse_manifest(text: str, kind: str, base: str, name: str = "manifest") -> list[SessionSpec]:
    """Sessions from the text of a manifest.

    Parameters
    ----------
    text : str
        The manifest's content.
    kind : {"yaml", "csv"}
    base : str
        Folder/prefix relative movie and parameter paths are taken from.
    name : str
        The manifest's name, for error messages.

    Raises
    ------
    InputError
        Malformed manifest, missing columns, bad values, duplicate or no sessions.
    """
    if kind == "csv":
        reader = csv.DictReader(io.StringIO(text))
        missing = {"session", "movie"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{name}: CSV lacks the column(s) {sorted(missing)}; the header needs "
                             "session,movie,fps,modality.")
        rows = [_blank_to_none(r) for r in reader]
        where = [f"{name} line {i + 2}" for i in range(len(rows))]
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{name} is not valid YAML: {exc}") from exc
        if isinstance(data, dict) and "sessions" in data:
            data = data["sessions"]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{name} must be a YAML list of mappings (session, movie, fps, modality ...).")
        rows = data
        where = [f"{name} entry {i + 1}" for i in range(len(rows))]
    sessions = [_session(r, w, base) for r, w in zip(rows, where, strict=True)]
    return _checked(sessions, name)


def _checked(sessions: list[SessionSpec], name: str) -> list[SessionSpec]:
    if not sessions:
        raise InputError(f"{name} lists no sessions.")
    seen: set[str] = set()
    for s in sessions:
        if s.session in seen:
            raise InputError(f"{name}: session {s.session!r} appears twice; session ids must be unique.")
        seen.add(s.session)
    return sessions


def is_glob(spec: str) -> bool:
    """True when ``spec`` is a glob pattern rather than a manifest file."""
    return any(c in _GLOB_CHARS for c in spec)


def sessions_from_glob(pattern: str) -> list[SessionSpec]:
    """One session per file matching ``pattern``, named after the file without its extension.

    Raises
    ------
    InputError
        Nothing matches, or two files give the same session id.
    """
    fs, path = stores.filesystem(pattern)
    protocol = stores.protocol_of(pattern)
    matches = sorted(fs.glob(path))
    specs = []
    for m in matches:
        url = m if protocol == "file" else f"{protocol}://{m}"
        stem = stores.basename(url).split(".", 1)[0]
        session = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-") or "session"
        specs.append(SessionSpec(session=session, movie=url))
    if not specs:
        raise InputError(f"no file matches {pattern}. Check the pattern (quote it so the shell does not expand it).")
    return _checked(specs, pattern)


def read_manifest(spec: str) -> list[SessionSpec]:
    """Sessions of a manifest file (``.yaml``/``.yml``/``.csv``) or a glob.

    Raises
    ------
    InputError
        Missing or malformed manifest; see :func:`parse_manifest`.
    ParameterError
        A manifest of another type.
    """
    if is_glob(spec):
        return sessions_from_glob(spec)
    lower = spec.lower()
    if lower.endswith((".yaml", ".yml")):
        kind = "yaml"
    elif lower.endswith(".csv"):
        kind = "csv"
    else:
        raise ParameterError(f"manifest {spec} is neither .yaml/.yml nor .csv nor a glob. "
                             "Rename it or pass a quoted glob like 'raw/*.tif'.")
    fs, path = stores.filesystem(spec)
    if not fs.exists(path):
        raise InputError(f"manifest {spec} does not exist. Check the path.")
    with fs.open(path, "r") as fh:
        text = fh.read()
    return parse_manifest(text, kind, _parent(spec), name=stores.basename(spec))


def with_defaults(s: SessionSpec, fps: float | None, modality: str | None,
                  neuron_radius: float | None) -> SessionSpec:
    """``s`` with the command line's fps/modality/radius where its row gives none."""
    check_movie_values(fps, neuron_radius)
    return s.model_copy(update={"fps": fps if s.fps is None else s.fps,
                                "modality": modality if s.modality is None else s.modality,
                                "neuron_radius": neuron_radius if s.neuron_radius is None else s.neuron_radius})




def result_url(prefix: str, session: str) -> str:
    """Where a session's result goes: ``PREFIX/SESSION.zarr``."""
    return stores.join(prefix, f"{session}.zarr")


def check_outputs_apart(sessions: list[SessionSpec], prefix: str, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse an archive whose results, their work stores or its summary would overlap any input.

    Parameters
    ----------
    sessions : list of SessionSpec
        The archive's sessions; each result ``PREFIX/SESSION.zarr`` is checked
        against that session's movie and against ``inputs``.
    prefix : str
        The results' folder or URL prefix.
    inputs : tuple of str
        Inputs every session reads (the manifest, a parameter file).

    Raises
    ------
    OutputConflictError
        A result or work store is, holds or lies inside an input (exit status 2).
    """
    fix = "Choose another --out prefix (or rename the session)."
    for s in sessions:
        out = result_url(prefix, s.session)
        for url in (out, provenance.work_url(out)):
            guard.check_output_apart(url, [s.movie, *inputs], what=f"session {s.session}'s result", fix=fix)
    guard.check_output_apart(stores.join(prefix, SUMMARY_NAME), [*inputs, *(s.movie for s in sessions)],
                             what="the archive summary", fix="Choose another --out prefix.")

def failure_reason(exc: BaseException) -> str:
    """One line saying why a session failed (somaflow's errors name the fix too)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, SomaflowError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def format_summary(d: dict[str, Any]) -> str:
    """The summary as a table for the console."""
    rows = [("session", "status", "units", "seconds", "reason")]
    for r in d["sessions"]:
        units = f"{r['n_accepted']}/{r['n_units']}" if "n_units" in r else "-"
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        rows.append((r["session"], r["status"], units, seconds, r["reason"] or ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4]
             for row in rows]
    c = d["counts"]
    lines.append(f"{c['done']} done, {c['skipped']} skipped, {c['failed']} failed in {d['seconds']} s; "
                 f"summary: {d['summary']}")
    return "\n".join(line.rstrip() for line in lines)
