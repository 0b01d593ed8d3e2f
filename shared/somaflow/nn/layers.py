"""Building blocks and checks shared by the models: argument and input checks, convolution
blocks, parameter counts, channels-last memory format.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from somaflow.errors import InputError, ParameterError


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


def _bn_relu_(block: nn.Sequential, y: torch.Tensor) -> torch.Tensor:
    """The batch norm and ReLU of a :class:`_ConvBlock3d` in eval mode (dropout: the identity), applied in
    place to its convolution's output ``y``."""
    bn = block[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    view = (1, -1) + (1,) * (y.ndim - 2)
    return y.mul_(scale.view(view)).add_(shift.view(view)).relu_()


def _block_lean(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` of a :class:`_ConvBlock3d` in eval mode with one output tensor (batch norm and ReLU
    in place). Equal to ``block(x)`` up to float rounding; for inference (no autograd)."""
    return _bn_relu_(block, block[0](x))


def _out_frames(conv: nn.Conv3d, n: int) -> int:
    """Output frames (dim 2) of ``conv`` on ``n`` input frames."""
    s, k, p, d = conv.stride[0], conv.kernel_size[0], conv.padding[0], conv.dilation[0]
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _in_range(conv: nn.Conv3d, n: int, o0: int, o1: int) -> tuple[int, int]:
    """The input frames ``[a, b)`` (within ``[0, n)``) that output frames ``[o0, o1)`` of ``conv`` read."""
    s, k, p, d = conv.stride[0], conv.kernel_size[0], conv.padding[0], conv.dilation[0]
    return max(0, s * o0 - p), min(n, s * (o1 - 1) - p + d * (k - 1) + 1)


def _conv_range(conv: nn.Conv3d, weight: torch.Tensor, bias: torch.Tensor | None, src: torch.Tensor,
                start: int, total: int, o0: int, o1: int) -> torch.Tensor:
    """Output frames ``[o0, o1)`` (dim 2) of ``conv``'s geometry with ``weight`` and ``bias``, from ``src``,
    frames ``[start, start + len)`` of an input of ``total`` frames (which must cover the frames read).

    The input's time padding is zeros beyond frames 0 and ``total`` only, so this equals the
    corresponding frames of the convolution of the whole input, up to float rounding.
    """
    s, k, p, d = conv.stride[0], conv.kernel_size[0], conv.padding[0], conv.dilation[0]
    a, b = s * o0 - p, s * (o1 - 1) - p + d * (k - 1) + 1
    lo, hi = max(0, a), min(total, b)
    if lo < start or hi > start + src.shape[2]:
        raise ValueError(f"frames [{lo}, {hi}) needed, [{start}, {start + src.shape[2]}) given")
    piece = src[:, :, lo - start:hi - start]
    if lo > a or hi < b:
        piece = F.pad(piece, (0, 0, 0, 0, lo - a, b - hi))
    return _conv3d(piece, weight, bias, (s,) + tuple(conv.stride[1:]), (0,) + tuple(conv.padding[1:]),
                   tuple(conv.dilation), conv.groups)


def _conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, ...],
            padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    """``F.conv3d``, by oneDNN on CPUs that have it whatever the input's size.

    For a float32 CPU input with ``N·C·D·H ≤ 20480`` and a kernel of side ≤ 3, PyTorch picks its
    im2col convolution, whose column buffer is ``C·k³`` times the output (~0.25 GB for a 16-channel,
    10-frame slab at 128²): the slabs of the lean passes are that small by design.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available():
        return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, list(padding), list(stride),
                                        list(dilation), groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def _block_range(block: nn.Sequential, src: torch.Tensor, start: int, total: int, o0: int,
                 o1: int) -> torch.Tensor:
    """Output frames ``[o0, o1)`` of a :class:`_ConvBlock3d` in eval mode (see :func:`_conv_range`)."""
    conv = block[0]
    return _bn_relu_(block, _conv_range(conv, conv.weight, conv.bias, src, start, total, o0, o1))


def _time_slabs(fn: Any, x: torch.Tensor, halo: int, slab: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """``fn(x)`` computed over overlapping slabs of ``slab`` frames of ``x`` (B, C, T, ...).

    ``fn`` must keep the time axis: stride-1 'same' convolutions reaching ``halo`` frames in all and
    pointwise operations. Each slab is read with ``halo`` frames of context on both sides, so the
    result equals ``fn(x)`` up to float rounding, while the convolutions' copies of their inputs and
    their outputs are slab-sized. Written into ``out`` when given, else into a new tensor.
    """
    n = x.shape[2]
    for t0 in range(0, n, slab):
        t1 = min(n, t0 + slab)
        a, b = max(0, t0 - halo), min(n, t1 + halo)
        y = fn(x[:, :, a:b])[:, :, t0 - a:t1 - a]
        if out is None:
            out = y.new_empty(tuple(y.shape[:2]) + (n,) + tuple(y.shape[3:]))
        out[:, :, t0:t1] = y
        del y
    assert out is not None
    return out


#: time slab (frames) of the inference-only lean passes
LEAN_SLAB = 16


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

    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for inference in eval mode, in less memory: the output is allocated once and
        each layer writes its features into it (no concatenated copies). ``x`` is copied in; the
        caller may drop it afterwards. Equal to :meth:`forward` up to float rounding."""
        cin = x.shape[1]
        out = x.new_empty((x.shape[0], self.out_channels) + tuple(x.shape[2:]))
        out[:, :cin] = x
        c = cin
        for layer in self.layers:
            g = layer[0].out_channels
            # by time slabs: a convolution's input copy and output are slab-sized; the layer reads
            # channels [:c] and writes [c:c + g], so writing into ``out`` cannot change what it reads
            _time_slabs(functools.partial(_block_lean, layer), out[:, :c], 1, LEAN_SLAB, out=out[:, c:c + g])
            c += g
        return out


def _dense_range(stack: _DenseStack3d, src: torch.Tensor, start: int, total: int, o0: int,
                 o1: int) -> torch.Tensor:
    """Output frames ``[o0, o1)`` of a dense stack in eval mode from ``src``, frames ``[start, start +
    len)`` of its input of ``total`` frames, which must cover ``[o0 - n, o1 + n)`` (``n`` layers, each a
    3×3×3 convolution reaching one frame) within ``[0, total)``."""
    n = len(stack.layers)
    feats, at = src, start
    for i, layer in enumerate(stack.layers):
        reach = n - 1 - i  # frames the later layers still read around [o0, o1)
        lo, hi = max(0, o0 - reach), min(total, o1 + reach)
        y = _block_range(layer, feats, at, total, lo, hi)
        feats, at = torch.cat([feats[:, :, lo - at:hi - at], y], dim=1), lo
    return feats[:, :, o0 - at:o1 - at]


def _upsample_frames(x: torch.Tensor, size: Sequence[int], lo: int, hi: int) -> torch.Tensor:
    """Frames ``[lo, hi)`` of ``F.interpolate(x, size, mode="trilinear", align_corners=False)``.

    Trilinear interpolation is separable: the coarse frames these output frames read are
    upsampled in space, then interpolated linearly in time with PyTorch's source indices. Equal
    to the slice of the whole upsampling up to float rounding.
    """
    n_in, n_out = x.shape[2], int(size[0])
    dst = torch.arange(lo, hi, dtype=torch.float32, device=x.device)
    src = ((dst + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w = (src - i0).view(1, 1, -1, 1, 1)
    a, b = int(i0.min()), int(i1.max()) + 1
    frames = F.interpolate(x[:, :, a:b], size=(b - a,) + tuple(size[1:]), mode="trilinear", align_corners=False)
    return frames[:, :, i0 - a] * (1 - w) + frames[:, :, i1 - a] * w


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


class _CRB2d(nn.Sequential):
    """3CNet's CRB unit: 3×3 convolution (no padding) → ReLU → batch norm (the paper's order)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3), nn.ReLU(inplace=True), nn.BatchNorm2d(cout))

