"""somaflow's neural networks (torch): models, losses, checkpoints.

The only part of somaflow that needs torch. Names load on first use, so that
``import somaflow.nn.inputs`` (numpy only) does not import torch::

    from somaflow.nn import MODELS, build_model, save_checkpoint, load_checkpoint, losses

    model = build_model("stneuronet", width=8)
    save_checkpoint(model, "stneuronet.safetensors", model_name="stneuronet",
                    config=model.config, metadata={"metrics": {"f1": 0.9}})
    model, meta = load_checkpoint("stneuronet.safetensors")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from somaflow.nn import losses
    from somaflow.nn.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
    from somaflow.nn.models import (
        MODELS,
        CNet3,
        CNet3Plus,
        ConvNet2p1D,
        LSTMTraceClassifier,
        MeanImageConvNet,
        STNeuroNet,
        UNet2D,
        build_model,
        count_parameters,
        to_channels_last,
    )

#: public name → module that defines it (imported lazily)
_LAZY = {
    "MODELS": "somaflow.nn.models",
    "build_model": "somaflow.nn.models",
    "count_parameters": "somaflow.nn.models",
    "to_channels_last": "somaflow.nn.models",
    "STNeuroNet": "somaflow.nn.models",
    "ConvNet2p1D": "somaflow.nn.models",
    "MeanImageConvNet": "somaflow.nn.models",
    "UNet2D": "somaflow.nn.models",
    "CNet3": "somaflow.nn.models",
    "CNet3Plus": "somaflow.nn.models",
    "LSTMTraceClassifier": "somaflow.nn.models",
    "save_checkpoint": "somaflow.nn.checkpoint",
    "load_checkpoint": "somaflow.nn.checkpoint",
    "CHECKPOINT_FORMAT": "somaflow.nn.checkpoint",
}

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODELS",
    "CNet3",
    "CNet3Plus",
    "ConvNet2p1D",
    "LSTMTraceClassifier",
    "MeanImageConvNet",
    "STNeuroNet",
    "UNet2D",
    "build_model",
    "count_parameters",
    "load_checkpoint",
    "losses",
    "save_checkpoint",
    "to_channels_last",
]


def __getattr__(name: str) -> Any:
    if name == "losses":
        return importlib.import_module("somaflow.nn.losses")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'somaflow.nn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
