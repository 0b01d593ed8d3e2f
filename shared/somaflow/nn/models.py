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

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from somaflow.errors import InputError, ParameterError

log = logging.getLogger(__name__)

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


# ----------------------------------------------------------------------------- checks


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(
            f"{name} must be an integer >= {minimum}, got {value!r}. Pass e.g. {name}={max(minimum, 8)}."
        )
    return value


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ParameterError(
            f"{name} must be a number in [0, 1), got {value!r}. Pass e.g. {name}=0.5."
        )
    return float(value)


def _check_input(x: Any, model: str, dims: str, expected: Sequence[int | None]) -> torch.Tensor:
    """Check that ``x`` is a floating tensor of shape ``expected`` (None = any size)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"{model} expects a torch.Tensor {dims}, got {type(x).__name__}. Convert with torch.as_tensor(x)."
        )
    if not x.is_floating_point():
        raise InputError(
            f"{model} expects a float32 tensor {dims}, got dtype {x.dtype}. Cast with x.float()."
        )
    if x.ndim != len(expected) or any(
        e is not None and s != e for s, e in zip(x.shape, expected, strict=False)
    ):
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise InputError(
            f"{model} expects input {dims} = {want}, got shape {tuple(x.shape)}. "
            "Reshape the input to the model's contract (see its docstring)."
        )
    return x


def _check_multiple(model: str, what: str, size: int, multiple: int) -> None:
    if size % multiple or size == 0:
        raise InputError(
            f"{model}: {what} = {size} is not a positive multiple of {multiple}. "
            f"Crop or pad {what} to a multiple of {multiple} before calling the model."
        )


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Number of scalar parameters of ``model`` (trainable ones by default)."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only))


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store ``model``'s 2D/3D convolution weights channels-last, in place, for faster CPU inference.

    oneDNN then runs the convolutions in the channels-last layout. Measured on
    one CPU thread at 512² (CPU time): STNeuroNet 1.5× faster, ConvNet2p1D
    1.4×, UNet2D 1.4×; ConvNet2p1D *training* is slower, so
    use it for inference only. Outputs are unchanged up to float rounding and
    checkpoints are unaffected.

    Returns
    -------
    torch.nn.Module
        ``model`` itself.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
            elif p.dim() == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return model


# ----------------------------------------------------------------------------- STNeuroNet


class _ConvBlock3d(nn.Sequential):
    """3D convolution → batch norm → ReLU → dropout (DenseVNet's convolutional unit)."""

    def __init__(
        self, cin: int, cout: int, kernel: int, stride: int | tuple[int, int, int], dropout: float
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm3d(cout),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class _DenseStack3d(nn.Module):
    """A dense feature stack: each layer sees the concatenation of the input and all earlier outputs.

    Output channels: ``cin + n_layers * growth`` (the input and every layer's output).
    """

    def __init__(self, cin: int, growth: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _ConvBlock3d(cin + i * growth, growth, 3, 1, dropout) for i in range(n_layers)
        )
        self.out_channels = cin + n_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1)))
        return torch.cat(feats, dim=1)


class STNeuroNet(nn.Module):
    """Spatiotemporal neuron segmentation: a DenseVNet-style 3D CNN, temporal max-pooling, a 2D head.

    Architecture (Soltanian-Zadeh et al. 2019, Fig. 2B and Methods; DenseVNet of
    Gibson et al. 2018 without spatial priors or dilations, as in the paper):

    1. a strided 5×5×5 convolution to ``width`` features at half resolution in
       time and space (T/2, H/2, W/2);
    2. three dense feature stacks of ``n_dense`` 3×3×3 layers with growth
       rates ``(width/2, width, 2·width)`` (DenseVNet's 4, 8, 16 at width 8),
       joined by strided 3×3×3 convolutions: stride 2 in time and space, then
       stride 2 in space only, so the stacks run at (T/2, H/2), (T/4, H/4) and
       (T/4, H/8);
    3. a skip convolution (3×3×3, ``width``, ``2·width``, ``2·width`` features)
       on each stack's output, trilinear upsampling of the coarser two to the
       first stack's resolution, concatenation, and DenseVNet's last
       convolution changed to 10 output channels (the paper's modification i);
    4. max over time, bilinear upsampling ×2 to the input resolution, a 2D 3×3
       convolution with 10 filters and a 2D 3×3 convolution with 2 filters
       (modification ii) → per-pixel logits.

    Every 3D convolution except the last has batch norm, ReLU and dropout
    (``dropout``, 0.5 in the paper). The paper upsamples then max-pools over
    time; here the max over time is taken before the final ×2 upsampling.
    Linear upsampling in time (corners aligned) never exceeds its samples, so
    taking the temporal max first is exact in time, and in space it halves
    the memory of the largest tensor. The paper's sizes are ``n_dense``
    5/10/10 with 24 initial features; the defaults are far smaller for CPUs.

    Parameters
    ----------
    in_channels : int
        Input channels (1: the whitened, background-compensated movie).
    width : int
        Base number of features (≥ 2).
    n_dense : int
        Layers per dense feature stack.
    dropout : float
        Dropout probability after every 3D convolution except the last.

    Input ``(B, in_channels, T, H, W)`` float32 with T a multiple of 4 (120 in
    production) and H, W multiples of 8. Output logits ``(B, 2, H, W)``; softmax
    over dim 1 gives the probability that a pixel belongs to an active neuron
    (class 1) in these T frames.
    """

    def __init__(
        self, in_channels: int = 1, width: int = 8, n_dense: int = 2, dropout: float = 0.5
    ) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("width", width, 2)
        _positive_int("n_dense", n_dense)
        _probability("dropout", dropout)
        self.config = {
            "in_channels": in_channels,
            "width": width,
            "n_dense": n_dense,
            "dropout": float(dropout),
        }
        growth = (width // 2, width, 2 * width)
        skips = (width, 2 * width, 2 * width)

        self.stem = _ConvBlock3d(in_channels, width, 5, 2, dropout)
        self.stack1 = _DenseStack3d(width, growth[0], n_dense, dropout)
        c1 = self.stack1.out_channels
        self.down1 = _ConvBlock3d(c1, c1, 3, 2, dropout)
        self.stack2 = _DenseStack3d(c1, growth[1], n_dense, dropout)
        c2 = self.stack2.out_channels
        self.down2 = _ConvBlock3d(c2, c2, 3, (1, 2, 2), dropout)
        self.stack3 = _DenseStack3d(c2, growth[2], n_dense, dropout)
        c3 = self.stack3.out_channels
        self.skip1 = _ConvBlock3d(c1, skips[0], 3, 1, dropout)
        self.skip2 = _ConvBlock3d(c2, skips[1], 3, 1, dropout)
        self.skip3 = _ConvBlock3d(c3, skips[2], 3, 1, dropout)
        self.fuse = nn.Conv3d(sum(skips), 10, 3, padding=1)
        self.head1 = nn.Conv2d(10, 10, 3, padding=1)
        self.head2 = nn.Conv2d(10, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2, H, W)`` of input ``(B, C, T, H, W)``."""
        _check_input(
            x, "STNeuroNet", "(B, C, T, H, W)", (None, self.config["in_channels"], None, None, None)
        )
        _check_multiple("STNeuroNet", "T (frames)", x.shape[2], 4)
        _check_multiple("STNeuroNet", "H", x.shape[3], 8)
        _check_multiple("STNeuroNet", "W", x.shape[4], 8)
        f1 = self.stack1(self.stem(x))
        f2 = self.stack2(self.down1(f1))
        f3 = self.stack3(self.down2(f2))
        size = f1.shape[2:]
        s1 = self.skip1(f1)
        s2 = F.interpolate(self.skip2(f2), size=size, mode="trilinear", align_corners=False)
        s3 = F.interpolate(self.skip3(f3), size=size, mode="trilinear", align_corners=False)
        fused = F.relu(self.fuse(torch.cat([s1, s2, s3], dim=1)))
        pooled = fused.amax(dim=2)  # max over time: (B, 10, H/2, W/2)
        up = F.interpolate(pooled, size=x.shape[3:], mode="bilinear", align_corners=False)
        return self.head2(F.relu(self.head1(up)))


# ----------------------------------------------------------------------------- (2+1)D ConvNet


class _FrameEncoder(nn.Module):
    """Four 2D convolutions with ReLU, 'same' padding: a 5×5 then 3×3 with dilations 2, 4, 8.

    Receptive field 5 + 4 + 8 + 16 = 33 px (the paper's 37 px came from four
    10×10 kernels); the first 5×5 kernel fills the dilation gaps, so every
    offset within ±16 px is reached.
    """

    receptive_field = 33

    def __init__(self, width: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv2d(1, width, 5, padding=2),
                nn.Conv2d(width, width, 3, padding=2, dilation=2),
                nn.Conv2d(width, width, 3, padding=4, dilation=4),
                nn.Conv2d(width, width, 3, padding=8, dilation=8),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = conv(x).relu_()
        return x


class _PixelwiseHead(nn.Sequential):
    """Two pixelwise fully connected layers (1×1 convolutions) → 2 logits per pixel."""

    def __init__(self, width: int) -> None:
        super().__init__(nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, 2, 1))


class ConvNet2p1D(nn.Module):
    """The (2+1)D ConvNet of Apthorpe et al. 2016: 2D convolutions per frame, max over time, pixelwise FC.

    Four 2D convolutional layers (shared across frames, 'same' padding,
    receptive field 33×33 px) run on every frame; their features are max-pooled
    over all T frames; two pixelwise fully connected layers (1×1 convolutions)
    give two logits per pixel (class 1 = "inside an ROI centroid disk" in the
    paper; "neuron pixel" here).

    Frames are encoded in chunks of at most ``max_pixels_per_chunk`` pixels
    with a running maximum, so memory does not grow with T (the result is the
    same as encoding all frames at once).

    Parameters
    ----------
    width : int
        Features of every convolutional layer. The default, 8, keeps CPU
        inference near 12 frames/s at 512² on one CPU thread (width 16 is
        about 2.5× slower).

    Input ``(B, 1, T, H, W)`` float32, any T ≥ 1, any H, W. Output logits
    ``(B, 2, H, W)``.
    """

    #: frames are encoded in chunks of at most this many pixels (B·t·H·W)
    max_pixels_per_chunk = 1 << 22

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        _positive_int("width", width)
        self.config = {"width": width}
        self.encoder = _FrameEncoder(width)
        self.head = _PixelwiseHead(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2, H, W)`` of input ``(B, 1, T, H, W)``."""
        _check_input(x, "ConvNet2p1D", "(B, 1, T, H, W)", (None, 1, None, None, None))
        b, _, t, h, w = x.shape
        if t == 0:
            raise InputError("ConvNet2p1D got T = 0 frames. Pass at least one frame.")
        step = max(1, self.max_pixels_per_chunk // max(1, b * h * w))
        pooled: torch.Tensor | None = None
        for start in range(0, t, step):
            chunk = x[:, 0, start : start + step]  # (B, t, H, W)
            n = chunk.shape[1]
            feats = self.encoder(chunk.reshape(b * n, 1, h, w))
            feats = feats.reshape(b, n, -1, h, w).amax(dim=1)
            pooled = feats if pooled is None else torch.maximum(pooled, feats)
        assert pooled is not None
        return self.head(pooled)


class MeanImageConvNet(nn.Module):
    """The 2D comparison network of Apthorpe et al. 2016: :class:`ConvNet2p1D`'s layers on the mean image.

    Parameters
    ----------
    width : int
        Features of every convolutional layer.

    Input ``(B, 1, H, W)`` float32 (the time-averaged movie). Output logits
    ``(B, 2, H, W)``.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        _positive_int("width", width)
        self.config = {"width": width}
        self.encoder = _FrameEncoder(width)
        self.head = _PixelwiseHead(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2, H, W)`` of input ``(B, 1, H, W)``."""
        _check_input(x, "MeanImageConvNet", "(B, 1, H, W)", (None, 1, None, None))
        return self.head(self.encoder(x))


# ----------------------------------------------------------------------------- U-Net


class _DoubleConv2d(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class UNet2D(nn.Module):
    """A 2D U-Net (Ronneberger et al. 2015) on summary images: the fast baseline (UNet2DS).

    ``depth`` max-pooling steps; features double at each level
    (``width · 2**level``); each level has two 3×3 convolutions with batch norm
    and ReLU; the decoder uses 2×2 transposed convolutions and concatenated
    skips; a 1×1 convolution gives 2 logits per pixel.

    Parameters
    ----------
    in_channels : int
        Summary images stacked as channels (4: mean, max, correlation, PNR).
    width : int
        Features at full resolution.
    depth : int
        Number of 2× downsamplings.

    Input ``(B, in_channels, H, W)`` float32 with H, W multiples of
    ``2**depth``. Output logits ``(B, 2, H, W)``.
    """

    def __init__(self, in_channels: int = 4, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("width", width)
        _positive_int("depth", depth)
        self.config = {"in_channels": in_channels, "width": width, "depth": depth}
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_DoubleConv2d(in_channels, chans[0])])
        self.down.extend(_DoubleConv2d(chans[i], chans[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.dec = nn.ModuleList(
            _DoubleConv2d(2 * chans[i], chans[i]) for i in reversed(range(depth))
        )
        self.out = nn.Conv2d(chans[0], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, 2, H, W)`` of input ``(B, C, H, W)``."""
        depth = self.config["depth"]
        _check_input(x, "UNet2D", "(B, C, H, W)", (None, self.config["in_channels"], None, None))
        _check_multiple("UNet2D", "H", x.shape[2], 2**depth)
        _check_multiple("UNet2D", "W", x.shape[3], 2**depth)
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([skips.pop(), up(x)], dim=1))
        return self.out(x)


# ----------------------------------------------------------------------------- 3CNet


class _CRB2d(nn.Sequential):
    """3CNet's CRB unit: 3×3 convolution (no padding) → ReLU → batch norm (the paper's order)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(cout))


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


# ----------------------------------------------------------------------------- LSTM


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


# ----------------------------------------------------------------------------- registry


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
