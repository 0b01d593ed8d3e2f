"""The Triton model repository the service serves: one Python-backend model per network.

For each served model, :func:`write_repository` loads its checkpoint once (so
bad weights stop the service before it starts, with one line), and writes

* ``MODEL/config.pbtxt`` — the tensors of :func:`somaflow.nn.signatures.signature`
  (float32, batch first), ``max_batch_size``, the dynamic batcher (preferred
  sizes, maximum queue delay), one instance per GPU (``KIND_GPU``) or one on
  the CPU, and parameters the client reads: ``weights`` (the reference),
  ``weights_sha256`` (the checkpoint's digest), ``max_request_bytes``,
  ``precision``;
* ``MODEL/1/model.py`` — one line that loads :mod:`somaflow_service.backend`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import somaflow_service
from somaflow_service.settings import ServeSettings

import somaflow
from somaflow import __version__
from somaflow.inference import weights_path
from somaflow.nn import load_checkpoint
from somaflow.nn.signatures import OUTPUT, signature


def _model_py() -> str:
    """A model's ``model.py``: the backend, imported from where this process imports somaflow (Triton's
    Python stub does not see ``PYTHONPATH``)."""
    roots = sorted({str(Path(p).parent) for p in (*somaflow.__path__, *somaflow_service.__path__)})
    return ('"""Triton Python-backend entry point of a somaflow model (written by somaflow_service.repository)."""\n\n'
            f"import sys\n\nfor root in {roots!r}:\n    if root not in sys.path:\n        sys.path.insert(0, root)\n\n"
            "from somaflow_service.backend import TritonPythonModel  # noqa: E402, F401\n")


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def model_config(name: str, config: dict[str, Any], settings: ServeSettings, *, weights: str,
                 sha256: str, gpu: bool) -> str:
    """``config.pbtxt`` (protobuf text format) of one served model."""
    sig = signature(name, config)
    limit = settings.batch_limit(name)
    inputs = ",\n".join(f'  {{ name: "{t.name}" data_type: TYPE_FP32 dims: {_dims(t.dims)} }}' for t in sig.inputs)
    preferred = settings.preferred_batch_sizes.get(name) or []
    batcher = f"max_queue_delay_microseconds: {settings.max_queue_delay_us}"
    if preferred:
        batcher = f"preferred_batch_size: {_dims(tuple(preferred))}\n  " + batcher
    params = {"weights": weights, "weights_sha256": sha256, "max_request_bytes": str(settings.max_request_bytes),
              "precision": settings.precision if gpu else "fp32", "somaflow_version": __version__}
    parameters = "\n".join(f'parameters {{ key: "{k}" value {{ string_value: {json.dumps(v)} }} }}'
                           for k, v in params.items())
    return (
        f'name: "{name}"\nbackend: "python"\nmax_batch_size: {limit}\n'
        f"input [\n{inputs}\n]\n"
        f'output [\n  {{ name: "{OUTPUT}" data_type: TYPE_FP32 dims: {_dims(sig.output_dims)} }}\n]\n'
        f"dynamic_batching {{\n  {batcher}\n}}\n"
        f"instance_group [ {{ kind: {'KIND_GPU' if gpu else 'KIND_CPU'} count: 1 }} ]\n"
        f"{parameters}\n"
    )


def write_repository(settings: ServeSettings, root: Path, *, gpu: bool) -> list[str]:
    """Write the model repository of ``settings.models`` under ``root``; returns the model names.

    Raises
    ------
    somaflow.errors.SomaflowError
        A checkpoint is missing, unreadable or not for its model.
    """
    for name in settings.models:
        ref = settings.weights.get(name, "default")
        path = weights_path(name, ref)
        _, meta = load_checkpoint(path)  # validates the whole file: digest, tensors, model
        if meta["model"] != name:
            from somaflow.errors import InputError

            raise InputError(f"the weights {path} are for model {meta['model']!r}, not {name!r}. "
                             f"Pass weights trained for {name}.")
        folder = root / name
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(
            model_config(name, meta["config"], settings, weights=ref, sha256=meta["sha256"], gpu=gpu))
        (folder / "1" / "model.py").write_text(_model_py())
    return list(settings.models)
