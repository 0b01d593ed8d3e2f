"""The CNN detectors: STNeuroNet and the (2+1)D ConvNet on movies, the 2D U-Net and the
mean-image ConvNet on summary images; each returns per-pixel logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from somaflow.errors import InputError
from somaflow.nn.layers import (
    LEAN_SLAB,
    _block_lean,
    _block_range,
    _check_input,
    _check_multiple,
    _conv_range,
    _ConvBlock3d,
    _dense_range,
    _DenseStack3d,
    _DoubleConv2d,
    _FrameEncoder,
    _in_range,
    _out_frames,
    _PixelwiseHead,
    _positive_int,
    _probability,
    _upsample_frames,
)


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
        if not (torch.is_grad_enabled() or self.training):
            return self._forward_lean(x)
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

    #: skip features upsampled and fused at a time in :meth:`_forward_lean`
    lean_group = 16

    def _f1_range(self, x: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """Frames ``[a, b)`` of the first dense stack's output, from the input ``x`` (eval mode)."""
        n1 = _out_frames(self.stem[0], x.shape[2])
        reach = len(self.stack1.layers)
        sa, sb = max(0, a - reach), min(n1, b + reach)
        h = _block_range(self.stem, x, 0, x.shape[2], sa, sb)
        return _dense_range(self.stack1, h, sa, n1, a, b)

    def _forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for inference (eval mode, no autograd) in a fraction of the memory.

        The same operations, equal up to float rounding, arranged so that no tensor at the first
        stack's resolution (T/2, H/2, W/2) is ever whole: the stem and the first stack are computed
        by time slabs of ``LEAN_SLAB`` frames (each read with the frames its convolutions reach,
        :func:`~somaflow.nn.layers._conv_range`), twice: once feeding the down-sampling path (whose
        tensors are 8× and 32× smaller, computed whole), once feeding the skips and the fusing
        convolution, whose output is max-pooled over time slab by slab. The fusing convolution is
        linear in its input channels, so it is the sum of its slices' convolutions over the three
        skips, the coarse ones upsampled slab by slab (:func:`~somaflow.nn.layers._upsample_frames`):
        their concatenation is never formed. Batch norm and ReLU run in place. At 120 × 256 × 256
        with width 16 the pass takes ~0.1 GB over its input instead of ~1.2 GB, for ~30 % more
        arithmetic (the stem and first stack run twice).
        """
        n1 = _out_frames(self.stem[0], x.shape[2])
        slab = LEAN_SLAB
        # pass 1: the first stack slab by slab into the (small) down-sampled path
        down = self.down1[0]
        n2 = _out_frames(down, n1)
        step = max(1, slab // down.stride[0])
        h: torch.Tensor | None = None
        for o0 in range(0, n2, step):
            o1 = min(n2, o0 + step)
            a, b = _in_range(down, n1, o0, o1)
            y = _block_range(self.down1, self._f1_range(x, a, b), a, n1, o0, o1)
            if h is None:
                h = y.new_empty(tuple(y.shape[:2]) + (n2,) + tuple(y.shape[3:]))
            h[:, :, o0:o1] = y
            del y
        assert h is not None
        f2 = self.stack2.forward_lean(h)
        f3 = self.stack3.forward_lean(_block_lean(self.down2, f2))
        del h
        coarse = [_block_lean(self.skip2, f2), _block_lean(self.skip3, f3)]
        del f2, f3
        # pass 2: the first stack again, slab by slab, through skip 1 and the fusing convolution
        weight, bias = self.fuse.weight, self.fuse.bias
        c1 = self.skip1[0].out_channels
        parts = []  # (coarse skip, its channels [g, g + m), the fusing weights of these channels)
        c = c1
        for s in coarse:
            for g in range(0, s.shape[1], self.lean_group):
                m = min(self.lean_group, s.shape[1] - g)
                parts.append((s, g, m, weight[:, c + g:c + g + m].contiguous()))
            c += s.shape[1]
        w1 = weight[:, :c1].contiguous()
        pooled: torch.Tensor | None = None
        size: tuple[int, ...] | None = None
        for t0 in range(0, n1, slab):
            t1 = min(n1, t0 + slab)
            lo, hi = _in_range(self.fuse, n1, t0, t1)  # skip frames the fusing convolution reads
            fa, fb = _in_range(self.skip1[0], n1, lo, hi)  # first-stack frames skip 1 reads
            s1 = _block_range(self.skip1, self._f1_range(x, fa, fb), fa, n1, lo, hi)
            size = (n1,) + tuple(s1.shape[3:])
            acc = _conv_range(self.fuse, w1, bias, s1, lo, n1, t0, t1)
            del s1
            for s, g, m, w in parts:
                up = _upsample_frames(s[:, g:g + m], size, lo, hi)
                acc += _conv_range(self.fuse, w, None, up, lo, n1, t0, t1)
                del up
            part = acc.relu_().amax(dim=2)  # max over time: (B, 10, H/2, W/2)
            pooled = part if pooled is None else torch.maximum(pooled, part)
            del acc
        assert pooled is not None
        up = F.interpolate(pooled, size=x.shape[3:], mode="bilinear", align_corners=False)
        return self.head2(F.relu(self.head1(up)))


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
    max_pixels_per_chunk = 1 << 20

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

