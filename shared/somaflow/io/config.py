"""Parameter and configuration files: YAML read from any fsspec URL, nested overrides merged, and the
bounds of the movie-level values a command line gives (frame rate, neuron radius)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import yaml

from somaflow.errors import InputError, ParameterError
from somaflow.io import stores

#: highest frame rate (Hz) and neuron radius (px) accepted: beyond them an input is a mistake
MAX_FPS = 10_000.0
MAX_NEURON_RADIUS = 256.0


def merge_overrides(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Nested parameter overrides: ``over`` wins over ``base``, mapping by mapping."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(url: str, what: str, fix: str = "") -> Any:
    """Parse the YAML file at ``url`` (any fsspec URL); empty files read as ``{}``.

    Raises
    ------
    InputError
        The file does not exist or is not YAML; ``what`` names it in the message
        and ``fix`` is appended to the missing-file message.
    """
    fs, path = stores.filesystem(url)
    if not fs.exists(path):
        raise InputError(f"{what} {url} does not exist.{' ' + fix if fix else ''}")
    with fs.open(path, "r") as fh:
        try:
            return yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise InputError(f"{what} {url} is not valid YAML{where}: {problem}. Fix the file.") from exc


def load_params_file(url: str) -> dict[str, Any]:
    """Read a YAML parameter file into a nested dict.

    Raises
    ------
    InputError
        The file is not YAML or its top level is not a mapping.
    """
    data = read_yaml(url, "parameter file")
    if not isinstance(data, dict):
        raise InputError(f"parameter file {url} must hold a mapping of stage -> parameters.")
    return data


def check_movie_values(fps: float | None = None, neuron_radius: float | None = None) -> None:
    """Refuse a frame rate or neuron radius given on the command line (None: not given) that
    :class:`MovieParams` would refuse: not positive, not finite, or above its bound; checked
    before any input is opened or any cluster starts.

    Raises
    ------
    ParameterError
        Naming the option and its range.
    """
    for option, value, top in (("--fps", fps, MAX_FPS), ("--neuron-radius", neuron_radius, MAX_NEURON_RADIUS)):
        if value is None:
            continue
        if not (math.isfinite(value) and 0 < value <= top):
            unit = "Hz" if option == "--fps" else "pixels"
            raise ParameterError(f"{option} {value:g} is out of range: give a finite number above 0 and at most "
                                 f"{top:g} ({unit}).")
