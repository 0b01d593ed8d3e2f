"""The CNNs of somaflow: detectors (probability maps) and classifiers (verdicts).

Every model is a small :class:`torch.nn.Module` whose constructor arguments are
its whole configuration (``model.config`` holds them, JSON-serialisable, so a
checkpoint can rebuild it through :data:`MODELS`). Widths default small so that
training on a 2-core CPU takes minutes; the papers' widths are reachable through
the same arguments. All inputs are float32 and batch first; shapes that break a
model's contract raise :class:`~somaflow.errors.InputError` with the fix.

Detectors (logits ``(B, 2, H, W)``, class 1 = neuron pixel):

* :class:`STNeuroNet` — DenseVNet-style 3D CNN + temporal max-pooling + 2D head
  (Soltanian-Zadeh et al. 2019, ``papers/002_*``), on ``(B, 1, T, H, W)``.
* :class:`ConvNet2p1D` — 2D convolutions per frame → max over time → pixelwise
  fully connected layers (Apthorpe et al. 2016, ``papers/001_*``).
* :class:`MeanImageConvNet` — the same network on the mean image (the paper's 2D
  comparison).
* :class:`UNet2D` — a 2D U-Net on summary images (mean, max, correlation, PNR).

Classifiers:

* :class:`CNet3` — 3CNet (``papers/000_*``), candidate image + reshaped central
  trace segment as two 92×92 channels → logits ``(B, 2)`` (class 1 = cell).
* :class:`CNet3Plus` — 3CNet's image branch plus a 1-D convolutional trace branch
  on a fixed-length resampled trace → logits ``(B, 2)``.
* :class:`LSTMTraceClassifier` — the seed classifier of sc-CNMF (``papers/003_*``):
  an LSTM over 100-sample windows; a trace is positive when any window is →
  logits ``(B,)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from somaflow.errors import ParameterError
from somaflow.nn.classifiers import CNet3, CNet3Plus, LSTMTraceClassifier
from somaflow.nn.detectors import ConvNet2p1D, MeanImageConvNet, STNeuroNet, UNet2D
from somaflow.nn.layers import count_parameters, to_channels_last

__all__ = [
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
    "to_channels_last",
]


#: registry name → model class; checkpoints store the name and the constructor kwargs
MODELS: dict[str, type[nn.Module]] = {
    "stneuronet": STNeuroNet,
    "convnet2p1d": ConvNet2p1D,
    "meanimage2d": MeanImageConvNet,
    "unet2d": UNet2D,
    "3cnet": CNet3,
    "3cnet-plus": CNet3Plus,
    "lstm": LSTMTraceClassifier,
}


def build_model(name: str, **config: Any) -> nn.Module:
    """Build the registered model ``name`` with constructor kwargs ``config``.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    **config
        Constructor arguments; missing ones take their defaults.

    Returns
    -------
    torch.nn.Module
        The model, freshly initialised, in training mode; ``model.config`` holds
        every constructor argument.

    Raises
    ------
    ParameterError
        Unknown name, unknown argument or invalid value.
    """
    if name not in MODELS:
        raise ParameterError(f"unknown model {name!r}. Use one of: {', '.join(MODELS)}.")
    try:
        return MODELS[name](**config)
    except TypeError as exc:  # an unknown keyword argument
        raise ParameterError(
            f"invalid configuration for model {name!r}: {exc}. Pass only the constructor arguments of {MODELS[name].__name__}."
        ) from exc

