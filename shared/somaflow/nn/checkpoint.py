"""Model checkpoints: safetensors files with JSON metadata; nothing is ever unpickled.

A checkpoint is one ``.safetensors`` file (local path or fsspec URL) holding the
model's ``state_dict`` tensors and string metadata, each value a JSON document:

* ``format`` — ``"somaflow-checkpoint/1"``;
* ``model`` — the :data:`~somaflow.nn.models.MODELS` registry name;
* ``config`` — the constructor arguments (every one, defaults included);
* ``somaflow_version`` — the version that wrote the file;
* the caller's keys, e.g. ``training`` (data recipe, presets, seeds, epochs),
  ``metrics`` and ``input_stats`` (ranges of noise level, neuron radius, SNR
  seen in training, for the out-of-distribution check);
* ``sha256`` — a digest of every tensor (name, dtype, shape, bytes) and every
  other metadata item, which catches corrupted or edited files. It is an
  integrity check, not a signature: safety comes from never unpickling.

:func:`load_checkpoint` rebuilds the model from ``model`` + ``config`` and
refuses, with :class:`~somaflow.errors.InputError`, anything else: torch pickles
(``torch.save`` files) even when renamed, headers that do not parse, digests
that do not match, missing, unexpected or wrong-shape tensors, unknown models
and invalid configurations.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

import somaflow
from somaflow.errors import InputError, ParameterError, SomaflowError, StoreError
from somaflow.io import stores
from somaflow.nn.models import MODELS, build_model

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

#: value of the ``format`` metadata key
CHECKPOINT_FORMAT = "somaflow-checkpoint/1"
_RESERVED = ("format", "model", "config", "somaflow_version", "sha256")
_FIX = "Use a checkpoint written by somaflow.nn.save_checkpoint (or `somaflow train`), or re-train the model."


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over the sorted tensors (name, dtype, shape, bytes) and metadata items."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    for key in sorted(metadata):
        if key != "sha256":
            h.update(json.dumps([key, metadata[key]]).encode())
    return h.hexdigest()


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as independent contiguous CPU tensors (safetensors forbids shared storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    model: nn.Module,
    url_or_path: str,
    *,
    model_name: str,
    config: dict[str, Any],
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write ``model``'s weights and metadata to a safetensors file, atomically.

    Parameters
    ----------
    model : torch.nn.Module
        A model of the class registered as ``model_name``.
    url_or_path : str
        Destination: a local path or an fsspec URL (``s3://``, ``memory://`` ...);
        ``.safetensors`` is the conventional suffix.
    model_name : str
        Registry name (a key of :data:`~somaflow.nn.models.MODELS`).
    config : dict
        Constructor arguments that rebuild ``model`` (missing ones take their
        defaults; the file stores them all).
    metadata : dict, optional
        More metadata, each value JSON-serialisable: ``training``, ``metrics``,
        ``input_stats`` ... The keys ``format``, ``model``, ``config``,
        ``somaflow_version`` and ``sha256`` are written by this function.
    overwrite : bool
        Replace an existing file.
    storage_options : dict, optional
        fsspec options for remote URLs.

    Returns
    -------
    str
        The normalised URL written.

    Raises
    ------
    ParameterError
        Unknown model name, a ``config`` that does not rebuild ``model``, a
        reserved or non-JSON metadata value.
    ResultExistsError
        The file exists and ``overwrite`` is False.
    StoreError
        The destination cannot be written.
    """
    reference = build_model(model_name, **config)
    if type(model) is not type(reference):
        raise ParameterError(
            f"model_name {model_name!r} is {type(reference).__name__}, but the model is a "
            f"{type(model).__name__}. Pass the model's registry name."
        )
    full_config = dict(reference.config)
    if getattr(model, "config", None) != full_config:
        raise ParameterError(
            f"config {config} does not match the model's own configuration {getattr(model, 'config', None)}. "
            "Pass config=model.config."
        )
    extra = dict(metadata or {})
    reserved = sorted(set(extra) & set(_RESERVED))
    if reserved:
        raise ParameterError(
            f"metadata keys {reserved} are written by save_checkpoint. Rename them."
        )
    meta: dict[str, str] = {
        "format": json.dumps(CHECKPOINT_FORMAT),
        "model": json.dumps(model_name),
        "config": json.dumps(full_config, sort_keys=True),
        "somaflow_version": json.dumps(somaflow.__version__),
    }
    for key, value in extra.items():
        if not isinstance(key, str):
            raise ParameterError(f"metadata keys must be strings, got {key!r}. Use string keys.")
        try:
            meta[key] = json.dumps(value, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ParameterError(
                f"metadata[{key!r}] is not JSON-serialisable ({exc}). Convert it to plain "
                "lists, dicts, strings and finite numbers."
            ) from exc
    tensors = _state_tensors(model)
    meta["sha256"] = json.dumps(_digest(tensors, meta))
    payload = st_save(tensors, metadata=meta)

    url = stores.normalize_url(url_or_path)
    with stores.atomic_output(url, overwrite=overwrite, storage_options=storage_options) as tmp_url:
        fs, tmp = stores.filesystem(tmp_url, storage_options)
        try:
            with fs.open(tmp, "wb") as fh:
                fh.write(payload)
        except OSError as exc:
            raise StoreError(
                f"cannot write {url}: {exc}. Check the destination and its permissions."
            ) from exc
    log.info(
        "saved %s checkpoint (%d tensors, %d bytes) to %s",
        model_name,
        len(tensors),
        len(payload),
        url,
    )
    return url


def _looks_like_pickle(data: bytes) -> bool:
    """A zip archive (torch.save's default) or a raw pickle (protocol 2 to 5)."""
    return data[:4] == b"PK\x03\x04" or (
        data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    )


def _read_safetensors(path: str, url: str) -> tuple[dict[str, str] | None, dict[str, torch.Tensor]]:
    """The string metadata and the tensors of a safetensors file (``safe_open``: the header is
    validated by safetensors, nothing is unpickled)."""
    try:
        with safe_open(path, framework="pt") as fh:
            return fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        with open(path, "rb") as raw:
            head = raw.read(8)
        if _looks_like_pickle(head):
            raise InputError(
                f"{url} is a pickle (a torch.save file), not a safetensors file; somaflow never "
                "unpickles model files because a pickle can run arbitrary code. Convert trusted "
                "weights with safetensors.torch.save_file(torch.load(path, weights_only=True), out), "
                "or " + _FIX[0].lower() + _FIX[1:]
            ) from exc
        raise InputError(f"{url} is not a valid safetensors file: {exc}. {_FIX}") from exc


def _metadata(raw: dict[str, str] | None, url: str) -> tuple[dict[str, str], dict[str, Any]]:
    """The raw string metadata and its JSON-decoded values."""
    if not isinstance(raw, dict) or raw.get("format") != json.dumps(CHECKPOINT_FORMAT):
        raise InputError(
            f"{url} is a safetensors file but not a somaflow checkpoint (no format "
            f"{CHECKPOINT_FORMAT!r} in its metadata). {_FIX}"
        )
    decoded: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            raise InputError(f"{url}: metadata[{key!r}] is not a string. {_FIX}")
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InputError(f"{url}: metadata[{key!r}] is not JSON ({exc}). {_FIX}") from exc
    missing = [k for k in _RESERVED if k not in decoded]
    if missing:
        raise InputError(f"{url}: the metadata lacks {missing}. {_FIX}")
    return raw, decoded


def load_checkpoint(
    url_or_path: str, *, storage_options: dict[str, Any] | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a safetensors checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    url_or_path : str
        Local path or fsspec URL of the ``.safetensors`` file.
    storage_options : dict, optional
        fsspec options for remote URLs.

    Returns
    -------
    model : torch.nn.Module
        The model, on the CPU, in eval mode.
    metadata : dict
        Every metadata item, JSON-decoded: ``model`` (str), ``config`` (dict),
        ``somaflow_version``, ``format``, ``sha256`` and the caller's keys
        (``training``, ``metrics``, ``input_stats`` ...).

    Raises
    ------
    InputError
        The file is not a valid somaflow checkpoint: a pickle, a corrupt or
        edited file, tensors that do not fit the model, an unknown model or an
        invalid configuration.
    StoreError
        The file cannot be read.
    """
    url = stores.normalize_url(url_or_path)
    with stores.local_file(url, storage_options, what="checkpoint") as path:
        raw, tensors = _read_safetensors(path, url)
    raw_meta, meta = _metadata(raw, url)
    if _digest(tensors, raw_meta) != meta["sha256"]:
        raise InputError(
            f"{url} is corrupt or was edited: its content does not match its sha256 digest. "
            "Download or copy the checkpoint again, or re-train the model."
        )
    name, config = meta["model"], meta["config"]
    if name not in MODELS:
        raise InputError(
            f"{url} holds an unknown model {name!r} (known: {', '.join(MODELS)}). "
            "Upgrade somaflow to the version that wrote it "
            f"({meta['somaflow_version']}) or use another checkpoint."
        )
    if not isinstance(config, dict):
        raise InputError(f"{url}: its config is not a JSON object. {_FIX}")
    try:
        model = build_model(name, **config)
    except SomaflowError as exc:
        raise InputError(f"{url} has an invalid {name!r} configuration: {exc}") from exc
    _check_tensors(model, tensors, url)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    log.info("loaded %s checkpoint from %s", name, url)
    return model, meta


def _check_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], url: str) -> None:
    """Names, shapes, dtypes and finiteness of ``tensors`` against ``model``'s state dict."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"{url} does not fit its model: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. {_FIX}"
        )
    for key, ref in expected.items():
        t = tensors[key]
        if t.shape != ref.shape or t.dtype != ref.dtype:
            raise InputError(
                f"{url}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, the model expects "
                f"{ref.dtype} {tuple(ref.shape)}. {_FIX}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InputError(f"{url}: tensor {key!r} holds NaN or infinite values. {_FIX}")
