"""Parameter and configuration files: YAML read from any fsspec URL, nested overrides merged."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from somaflow.errors import InputError
from somaflow.io import stores


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
            raise InputError(f"{what} {url} is not valid YAML: {exc}") from exc


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
