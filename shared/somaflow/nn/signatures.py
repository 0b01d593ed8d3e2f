"""The tensor contract of each registered model when it is served: names, shapes, checks.

The inference service (``services/inference``) declares these tensors to
Triton, checks every request against them before any model code runs, and the
HTTP client (:class:`somaflow.inference.RemoteBackend`) names its tensors from
them. A signature depends on the checkpoint's ``config`` (input channels,
window length, U-Net depth), so it is built from the registry name and that
config. numpy only: no torch here.

Shapes leave the batch axis out (Triton's ``dims`` with ``max_batch_size``);
``-1`` is a size the request chooses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: the output every served model returns: the class-1 probability (softmax of the
#: two logits; sigmoid of the LSTM's one), ``(H, W)`` for detectors, ``(1,)`` for classifiers
OUTPUT = "probability"


@dataclass(frozen=True)
class TensorSpec:
    """One input tensor of a served model (batch axis excluded).

    Attributes
    ----------
    name : str
    dims : tuple of int
        ``-1`` where the request chooses the size.
    multiples : tuple of int
        Per axis, the size must be a positive multiple of this (1: any size ≥ 1).
    minimum : tuple of int
        Per axis, the smallest size accepted.
    """

    name: str
    dims: tuple[int, ...]
    multiples: tuple[int, ...]
    minimum: tuple[int, ...]


@dataclass(frozen=True)
class Signature:
    """Inputs and output of one served model.

    Attributes
    ----------
    model : str
        Registry name (:data:`somaflow.nn.models.MODELS`).
    inputs : tuple of TensorSpec
    output_dims : tuple of int
        ``(-1, -1)`` (a probability map the size of the input) or ``(1,)``.
    """

    model: str
    inputs: tuple[TensorSpec, ...]
    output_dims: tuple[int, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    def check(self, arrays: Mapping[str, np.ndarray], max_bytes: int) -> str | None:
        """Why a request cannot be run, or None when it can.

        Parameters
        ----------
        arrays : mapping
            Input name -> array with the batch axis first.
        max_bytes : int
            Largest total size of a request's inputs (bytes).

        Returns
        -------
        str or None
            One sentence naming the problem and the contract.
        """
        if set(arrays) != set(self.input_names):
            return f"{self.model} takes the inputs {list(self.input_names)}, got {sorted(arrays)}"
        total = sum(int(a.nbytes) for a in arrays.values())
        if total > max_bytes:
            return f"the request holds {total} bytes of tensors, more than the limit of {max_bytes}; send smaller batches"
        batch = {a.shape[0] if a.ndim else None for a in arrays.values()}
        if len(batch) != 1 or None in batch or 0 in batch:
            return f"{self.model}: every input needs the same batch size ≥ 1, got shapes {[a.shape for a in arrays.values()]}"
        for spec in self.inputs:
            a = arrays[spec.name]
            shape = a.shape[1:]
            if a.dtype != np.float32:
                return f"{self.model}: input {spec.name!r} must be float32 (FP32), got {a.dtype}"
            if len(shape) != len(spec.dims):
                return f"{self.model}: input {spec.name!r} has {len(shape)} axes after the batch, expected {len(spec.dims)}"
            for axis, (n, d, m, lo) in enumerate(zip(shape, spec.dims, spec.multiples, spec.minimum, strict=True)):
                if d != -1 and n != d:
                    return f"{self.model}: input {spec.name!r} axis {axis + 1} is {n}, expected {d}"
                if n < lo or n % m:
                    return (f"{self.model}: input {spec.name!r} axis {axis + 1} is {n}; it must be a multiple of {m} "
                            f"and at least {lo}")
            if not np.isfinite(a).all():
                return f"{self.model}: input {spec.name!r} holds NaN or infinite values"
        return None


def _detector(model: str, channels: int, time_axis: bool, multiple: int, t_multiple: int = 1) -> Signature:
    if time_axis:  # (C, T, H, W)
        spec = TensorSpec("input", (channels, -1, -1, -1), (1, t_multiple, multiple, multiple),
                          (channels, max(t_multiple, 1), multiple, multiple))
    else:  # (C, H, W)
        spec = TensorSpec("input", (channels, -1, -1), (1, multiple, multiple), (channels, multiple, multiple))
    return Signature(model, (spec,), (-1, -1))


#: side of 3CNet's input images (:data:`somaflow.nn.classifiers.CNET3_SIDE`, which imports torch)
CNET3_SIDE = 92
#: every detector's spatial sizes are padded to a multiple of this by :func:`somaflow.inference.tiled`
SPATIAL_MULTIPLE = 8


def signature(model: str, config: Mapping[str, Any]) -> Signature:
    """The served signature of ``model`` built with constructor arguments ``config``.

    Raises
    ------
    KeyError
        ``model`` is not a registered model.
    """
    side = CNET3_SIDE
    if model == "stneuronet":
        return _detector(model, int(config.get("in_channels", 1)), True, SPATIAL_MULTIPLE, 4)
    if model == "convnet2p1d":
        return _detector(model, 1, True, SPATIAL_MULTIPLE)
    if model == "meanimage2d":
        return _detector(model, 1, False, SPATIAL_MULTIPLE)
    if model == "unet2d":
        multiple = max(SPATIAL_MULTIPLE, 2 ** int(config.get("depth", 3)))
        return _detector(model, int(config.get("in_channels", 4)), False, multiple)
    if model == "3cnet":
        c = 2 if config.get("trace_encoding", "reshape") == "reshape" else 1
        return Signature(model, (TensorSpec("input", (c, side, side), (1, 1, 1), (c, side, side)),), (1,))
    if model == "3cnet-plus":
        return Signature(model, (TensorSpec("image", (1, side, side), (1, 1, 1), (1, side, side)),
                                 TensorSpec("trace", (-1,), (1,), (16,))), (1,))
    if model == "lstm":
        w = int(config.get("window", 100))
        return Signature(model, (TensorSpec("input", (-1, w), (1, 1), (1, w)),), (1,))
    raise KeyError(model)


def as_named(sig: Signature, inputs: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """The backend's positional inputs (one array, or a tuple in the model's order) by tensor name."""
    parts = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if len(parts) != len(sig.inputs):
        raise ValueError(f"{sig.model} takes {len(sig.inputs)} inputs, got {len(parts)}")
    return {spec.name: np.ascontiguousarray(p, np.float32) for spec, p in zip(sig.inputs, parts, strict=True)}
