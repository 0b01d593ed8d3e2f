"""The cell classifiers: 3CNet (ROI image), 3CNet+ (ROI image and trace) and the LSTM on
trace windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from somaflow.errors import InputError, ParameterError
from somaflow.nn.layers import _check_input, _CRB2d, _positive_int


def _cnet3_features(cin: int, width: int) -> nn.Sequential:
    """[CRB]×2 (w) → MP → [CRB]×2 (2w) → MP → CRB (4w) → MP: 92×92 → 9×9."""
    return nn.Sequential(
        _CRB2d(cin, width),
        _CRB2d(width, width),
        nn.MaxPool2d(2),
        _CRB2d(width, 2 * width),
        _CRB2d(2 * width, 2 * width),
        nn.MaxPool2d(2),
        _CRB2d(2 * width, 4 * width),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )


#: side of 3CNet's input images; its central trace segment has SIDE² = 8464 samples
CNET3_SIDE = 92


_CNET3_FLAT = 9 * 9  # spatial size after the three valid-conv / pool stages on 92×92


class CNet3(nn.Module):
    """3CNet (``papers/000_*``): a cell / not-cell classifier on a 92×92×2 input.

    Layer table of the paper: [Conv 3×3 (no padding) - ReLU - BN]×2 (16) →
    maxpool 2 → [CRB]×2 (32) → maxpool 2 → CRB (64) → maxpool 2 → FC 72 → FC 72
    → FC 2 (ReLU after the hidden FC layers). Trained with the multiclass hinge
    loss (:func:`somaflow.nn.losses.multiclass_hinge_loss`).

    Parameters
    ----------
    trace_encoding : {"reshape", "none"}
        ``"reshape"`` (the paper): channel 1 holds the 8464 = 92² central samples
        of the candidate's trace, reshaped row-major. ``"none"``: the image
        channel only (an ablation).
    width : int
        Features of the first convolutions (16 in the paper; then 2×, 4×).
    hidden : int
        Units of the two hidden fully connected layers (72 in the paper).

    Input ``(B, 2, 92, 92)`` (``"reshape"``) or ``(B, 1, 92, 92)`` (``"none"``),
    float32; channel 0 is the candidate's ROI image cropped around its centroid
    and zero-centred. Output logits ``(B, 2)`` (class 1 = cell).
    """

    def __init__(self, trace_encoding: str = "reshape", width: int = 16, hidden: int = 72) -> None:
        super().__init__()
        if trace_encoding not in ("reshape", "none"):
            raise ParameterError(
                f"trace_encoding must be 'reshape' or 'none', got {trace_encoding!r}. "
                "Use 'reshape' (the paper) or the model '3cnet-plus' for a 1-D trace branch."
            )
        _positive_int("width", width)
        _positive_int("hidden", hidden)
        self.config = {"trace_encoding": trace_encoding, "width": width, "hidden": hidden}
        self.in_channels = 2 if trace_encoding == "reshape" else 1
        self.features = _cnet3_features(self.in_channels, width)
        self.classifier = nn.Sequential(
            nn.Linear(4 * width * _CNET3_FLAT, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2)`` of input ``(B, C, 92, 92)``."""
        _check_input(x, "CNet3", "(B, C, 92, 92)", (None, self.in_channels, CNET3_SIDE, CNET3_SIDE))
        return self.classifier(self.features(x))


class CNet3Plus(nn.Module):
    """3CNet with a better trace encoding: an image branch and a 1-D convolutional trace branch.

    * image branch: 3CNet's convolutional stack on the candidate's 92×92 ROI
      image → FC ``hidden``;
    * trace branch: four 1-D convolutions (kernels 7, 5, 5, 5; ``width``,
      ``2·width``, ``4·width``, ``4·width`` features; ReLU, batch norm, max-pool
      2 between them) on the whole normalised trace resampled to a fixed length
      (e.g. 512 samples), then global max- and mean-pooling over time, so a
      transient counts wherever it is (3CNet's central crop loses the rest of
      the trace, as its paper notes);
    * both concatenated → FC ``hidden`` → FC 2.

    Parameters
    ----------
    width : int
        Base features of both branches.
    hidden : int
        Units of the fully connected layers.

    Input: a pair ``(image, trace)`` or a mapping ``{"image": ..., "trace": ...}``
    with ``image (B, 1, 92, 92)`` and ``trace (B, L)`` float32, L ≥ 16. Output
    logits ``(B, 2)`` (class 1 = cell).
    """

    min_trace_length = 16

    def __init__(self, width: int = 16, hidden: int = 72) -> None:
        super().__init__()
        _positive_int("width", width)
        _positive_int("hidden", hidden)
        self.config = {"width": width, "hidden": hidden}
        self.image_features = _cnet3_features(1, width)
        self.image_fc = nn.Sequential(
            nn.Linear(4 * width * _CNET3_FLAT, hidden), nn.ReLU(inplace=True)
        )
        chans = [1, width, 2 * width, 4 * width, 4 * width]
        kernels = [7, 5, 5, 5]
        layers: list[nn.Module] = []
        for i, k in enumerate(kernels):
            if i:
                layers.append(nn.MaxPool1d(2))
            layers += [
                nn.Conv1d(chans[i], chans[i + 1], k, padding=k // 2),
                nn.ReLU(inplace=True),
                nn.BatchNorm1d(chans[i + 1]),
            ]
        self.trace_features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(hidden + 2 * chans[-1], hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, 2),
        )

    def forward(self, inputs: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``(B, 2)`` of ``(image (B, 1, 92, 92), trace (B, L))``."""
        if isinstance(inputs, Mapping):
            if set(inputs) != {"image", "trace"}:
                raise InputError(
                    f"CNet3Plus expects the keys 'image' and 'trace', got {sorted(inputs)}. Pass {{'image': ..., 'trace': ...}}."
                )
            image, trace = inputs["image"], inputs["trace"]
        elif isinstance(inputs, Sequence) and len(inputs) == 2:
            image, trace = inputs
        else:
            raise InputError(
                "CNet3Plus expects a pair (image (B, 1, 92, 92), trace (B, L)) or a dict with those keys. Pass both inputs together."
            )
        _check_input(image, "CNet3Plus", "image (B, 1, 92, 92)", (None, 1, CNET3_SIDE, CNET3_SIDE))
        _check_input(trace, "CNet3Plus", "trace (B, L)", (image.shape[0], None))
        if trace.shape[1] < self.min_trace_length:
            raise InputError(
                f"CNet3Plus: the trace has {trace.shape[1]} samples, fewer than {self.min_trace_length}. "
                "Resample traces to a fixed length such as 512."
            )
        img = self.image_fc(self.image_features(image))
        t = self.trace_features(trace.unsqueeze(1))
        tr = torch.cat([t.amax(dim=2), t.mean(dim=2)], dim=1)
        return self.classifier(torch.cat([img, tr], dim=1))


class LSTMTraceClassifier(nn.Module):
    """The seed classifier of sc-CNMF (``papers/003_*``): does a trace hold a calcium transient?

    Each window of ``window`` samples (100 at 10 Hz in the paper) is read by a
    one-layer LSTM; its last hidden state goes through a linear layer to a
    per-window logit (the paper's ``σ(V h_T0)`` before the sigmoid). A trace is
    positive when at least one window is, so its logit is the maximum over its
    windows.

    Parameters
    ----------
    hidden : int
        LSTM hidden units.
    window : int
        Samples per window.

    Input ``(B, W, window)`` float32: W windows of a z-scored trace (W ≥ 1).
    Output logits ``(B,)`` (positive = holds a transient);
    :meth:`window_logits` gives the per-window logits ``(B, W)``.
    """

    def __init__(self, hidden: int = 32, window: int = 100) -> None:
        super().__init__()
        _positive_int("hidden", hidden)
        _positive_int("window", window, 2)
        self.config = {"hidden": hidden, "window": window}
        self.lstm = nn.LSTM(input_size=1, hidden_size=hidden, num_layers=1, batch_first=True)
        self.fc = nn.Linear(hidden, 1)

    def window_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-window logits ``(B, W)`` of input ``(B, W, window)``."""
        _check_input(
            x, "LSTMTraceClassifier", "(B, W, window)", (None, None, self.config["window"])
        )
        b, w, n = x.shape
        if w == 0:
            raise InputError(
                "LSTMTraceClassifier got W = 0 windows. Pass traces at least one window long."
            )
        # a logit at every time step, max over time: a transient anywhere in the window counts
        # (reading only the last hidden state has to carry it to the window's end)
        out, _ = self.lstm(x.reshape(b * w, n, 1))
        return self.fc(out).amax(dim=1).reshape(b, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)``: the maximum of the per-window logits."""
        return self.window_logits(x).amax(dim=1)

