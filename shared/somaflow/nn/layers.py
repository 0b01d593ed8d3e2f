"""Building blocks and checks shared by the models: argument and input checks, convolution
blocks, parameter counts, channels-last memory format.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
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


def _block_lean(block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` of a :class:`_ConvBlock3d` in eval mode with one output tensor: batch norm, ReLU
    (and the eval-mode dropout, the identity) applied in place to the convolution's output.

    Equal to ``block(x)`` up to float rounding; for inference (no autograd)."""
    conv, bn = block[0], block[1]
    y = conv(x)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    view = (1, -1) + (1,) * (y.ndim - 2)
    return y.mul_(scale.view(view)).add_(shift.view(view)).relu_()


def _time_slabs(fn: Any, x: torch.Tensor, halo: int, slab: int, out: torch.Tensor | None = None,
                add: bool = False) -> torch.Tensor:
    """``fn(x)`` computed over overlapping slabs of ``slab`` frames of ``x`` (B, C, T, ...).

    ``fn`` must keep the time axis: stride-1 'same' convolutions reaching ``halo`` frames in all
    (e.g. 2 for two stacked 3×3×3 convolutions) and pointwise operations. Each slab is read with
    ``halo`` frames of context on both sides, so the result equals ``fn(x)`` up to float rounding,
    while the convolutions' copies of their inputs and their outputs are slab-sized. Written into
    ``out`` (added to it with ``add``) when given, else into a new tensor.
    """
    n = x.shape[2]
    for t0 in range(0, n, slab):
        t1 = min(n, t0 + slab)
        a, b = max(0, t0 - halo), min(n, t1 + halo)
        y = fn(x[:, :, a:b])[:, :, t0 - a:t1 - a]
        if out is None:
            out = y.new_empty(tuple(y.shape[:2]) + (n,) + tuple(y.shape[3:]))
        if add:
            out[:, :, t0:t1] += y
        else:
            out[:, :, t0:t1] = y
        del y
    assert out is not None
    return out


#: time slab (frames) of the inference-only lean passes (:func:`_time_slabs`)
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

