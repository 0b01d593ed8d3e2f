"""The Triton Python-backend model that serves one somaflow network.

Triton's dynamic batcher hands :meth:`TritonPythonModel.execute` every request
of a batch. Each request is checked against the model's signature
(:meth:`somaflow.nn.signatures.Signature.check`: names, float32, shapes and
their multiples, size limit, finite values) *before* any model code runs; a
request that fails gets HTTP 400 with one sentence saying why, and the others
run. Valid requests of equal shape are concatenated along the batch axis, run
in one forward pass (``torch.inference_mode``), and split back.

The answer is the class-1 probability (``probability``), as
:class:`somaflow.inference.LocalBackend` computes it. On a GPU the network may
run in fp16/bf16 (``precision``); inputs and outputs stay float32.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from somaflow.inference import probability, weights_path
from somaflow.nn import load_checkpoint
from somaflow.nn.signatures import OUTPUT, signature

log = logging.getLogger("somaflow_service")

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: prefix of an unexpected failure inside the model code (HTTP 500); clients do not retry it
MODEL_ERROR = "somaflow: internal error"


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    """One served network: loaded once per instance, on the instance's device."""

    def initialize(self, args: dict[str, Any]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.name = config["name"]
        gpu = args["model_instance_kind"] == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        self.dtype = _DTYPES[params.get("precision", "fp32")] if gpu else torch.float32
        net, meta = load_checkpoint(weights_path(self.name, params["weights"]))
        self.net = net.to(self.device, self.dtype).eval()
        self.signature = signature(self.name, meta["config"])
        self.max_bytes = int(params["max_request_bytes"])
        log.info("%s: %s weights on %s (%s)", self.name, params["weights"], self.device, self.dtype)

    def _inputs(self, request: Any) -> dict[str, np.ndarray] | str:
        arrays = {}
        for name in self.signature.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return f"{self.name} takes the inputs {list(self.signature.input_names)}; {name!r} is missing"
            arrays[name] = tensor.as_numpy()
        return self.signature.check(arrays, self.max_bytes) or arrays

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[Any, ...], list[tuple[int, dict[str, np.ndarray]]]] = {}
        for i, request in enumerate(requests):
            arrays = self._inputs(request)
            if isinstance(arrays, str):
                responses[i] = _error(arrays, pb_utils.TritonError.INVALID_ARG)
                continue
            key = tuple(arrays[n].shape[1:] for n in self.signature.input_names)
            groups.setdefault(key, []).append((i, arrays))
        for members in groups.values():
            try:
                parts = [np.concatenate([a[n] for _, a in members]) for n in self.signature.input_names]
                prob = self._forward(parts)
            except Exception as exc:  # noqa: BLE001 - an answer for every request, and the instance lives on
                log.exception("%s: forward pass failed", self.name)
                for i, _ in members:
                    responses[i] = _error(f"{MODEL_ERROR} in {self.name}: {type(exc).__name__}: {exc}",
                                          pb_utils.TritonError.INTERNAL)
                continue
            start = 0
            for i, arrays in members:
                n = arrays[self.signature.input_names[0]].shape[0]
                responses[i] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(OUTPUT, np.ascontiguousarray(prob[start:start + n]))])
                start += n
        return responses

    def _forward(self, parts: list[np.ndarray]) -> np.ndarray:
        tensors = [torch.from_numpy(p).to(self.device, self.dtype) for p in parts]
        with torch.inference_mode():
            out = self.net(tensors[0] if len(tensors) == 1 else tuple(tensors))
        prob = probability(out.float()).cpu().numpy().astype(np.float32)
        return prob.reshape(-1, 1) if self.signature.output_dims == (1,) else prob

    def finalize(self) -> None:
        self.net = None
