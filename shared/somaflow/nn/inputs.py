"""Detector movie input (STNeuroNet, (2+1)D ConvNet), numpy only.

:class:`DetectorInputParams`, :func:`pixel_statistics` (per-pixel baseline and
noise in one bounded-memory pass), :func:`detector_batch` (temporal binning →
background compensation → whitening by the per-pixel noise → clipping) and
:func:`detector_batches` (non-overlapping temporal batches over a whole,
possibly dask-backed, movie). The same functions prepare the input at training
and at inference time, so a network never meets an input prepared differently
from the ones it learnt on.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.frames import check_movie
from somaflow.preprocess.filters import MorphParams, morphological_background
from somaflow.preprocess.temporal import sum_bins
from somaflow.robust import abs_diff_noise_sd

#: float32 working memory of one row strip in :func:`pixel_statistics`
_STRIP_BYTES = 32 << 20


class DetectorInputParams(BaseModel):
    """How a movie becomes the input of a spatio-temporal detector.

    The order of operations (:func:`detector_batch`) is: sum ``factor``
    consecutive frames (temporal binning, STNeuroNet), remove the background,
    divide by the per-pixel noise SD of a binned frame (whitening), clip.

    Attributes
    ----------
    fps : float
        Frame rate of the input movie (Hz).
    bin_fps : float or None
        Target rate of the binning (Hz): ``factor = max(1, round(fps /
        bin_fps))`` frames are summed into one. None: no binning.
    batch_frames : int
        Binned frames per temporal batch (STNeuroNet: 120).
    pad_multiple : int
        Every batch is zero-padded at its end to a multiple of this many
        frames (STNeuroNet halves time twice: 4). Zero is the whitened
        resting level, i.e. "no activity".
    background : {"highpass", "baseline", "opening", "none"}
        ``"highpass"`` — per-frame spatial high-pass ``I − G_σ * I``: flat
        illumination, neuropil haze and drift go, the resting fluorescence of
        every soma stays (so silent cells, part of the ground truth, remain
        visible, as with STNeuroNet's homomorphic filter, which also keeps
        it); ``"baseline"`` — subtract the per-pixel temporal baseline
        (median), then the same spatial high-pass: only activity is left;
        ``"opening"`` — sc-CNMF's per-frame morphological opening with a flat
        disk (1p), :func:`somaflow.preprocess.filters.morphological_background`;
        ``"none"``.
    highpass_sigma : float
        SD (px) of the Gaussian low-pass subtracted by ``highpass`` /
        ``baseline``; 4 soma radii (as :class:`~somaflow.preprocess.filters.HomomorphicParams`).
    opening_radius : float
        Disk radius (px) of ``opening``; 1.5 soma radii (as
        :class:`~somaflow.preprocess.filters.MorphParams`).
    opening_downsample : int
        Open on a block-averaged frame (see ``MorphParams.downsample``).
    whiten : bool
        Divide by the per-pixel noise SD of a binned frame, ``sqrt(factor) ×``
        the per-frame noise of :func:`pixel_statistics`; pure white noise
        then has unit SD.
    clip : float or None
        Clip the whitened values to ``[-clip, clip]``; None keeps them.
    stats_frames : int
        Frames :func:`pixel_statistics` reads at most (evenly spaced
        segments) when no statistics are given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fps: float = Field(gt=0, description="input frame rate (Hz)")
    bin_fps: float | None = Field(
        6.0, gt=0, description="temporal binning target rate (Hz); None = no binning"
    )
    batch_frames: int = Field(120, ge=1, description="binned frames per temporal batch")
    pad_multiple: int = Field(
        4, ge=1, description="pad batches with zero frames to a multiple of this"
    )
    background: Literal["highpass", "baseline", "opening", "none"] = Field(
        "highpass", description="background compensation of each binned frame"
    )
    highpass_sigma: float = Field(
        20.0, gt=0, description="Gaussian low-pass SD (px) of the spatial high-pass"
    )
    opening_radius: float = Field(
        9.0, gt=0, description="flat disk radius (px) of the morphological opening"
    )
    opening_downsample: int = Field(
        2, ge=1, le=8, description="open a block-averaged frame (1 = full size)"
    )
    whiten: bool = Field(True, description="divide by the per-pixel noise SD of a binned frame")
    clip: float | None = Field(
        20.0, gt=0, description="clip whitened values to [-clip, clip] (noise SDs)"
    )
    stats_frames: int = Field(
        2000, ge=2, description="frames read for the per-pixel statistics at most"
    )

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> DetectorInputParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz).
        modality : str
            ``"2p"``: bin to 6 Hz (STNeuroNet), spatial high-pass;
            ``"1p"``: bin to 10 Hz, morphological opening (sc-CNMF).
        neuron_radius : float
            Typical soma radius (px): high-pass SD 4 r, opening disk 1.5 r.

        Returns
        -------
        DetectorInputParams
        """
        fps, modality, r = _check_movie_args(fps, modality, neuron_radius)
        opening = round(1.5 * r, 3)
        return cls(
            fps=fps,
            bin_fps=6.0 if modality == "2p" else 10.0,
            background="highpass" if modality == "2p" else "opening",
            highpass_sigma=round(4.0 * r, 3),
            opening_radius=opening,
            opening_downsample=2 if opening / 2 >= 2 else 1,
        )

    @property
    def factor(self) -> int:
        """Frames summed into one binned frame, ``max(1, round(fps / bin_fps))``."""
        if self.bin_fps is None:
            return 1
        return max(1, int(round(self.fps / self.bin_fps)))


def _check_movie_args(fps: float, modality: str, neuron_radius: float) -> tuple[float, str, float]:
    if modality not in ("2p", "1p"):
        raise ParameterError(
            f"modality must be '2p' or '1p', got {modality!r}. Pass --modality 2p or 1p."
        )
    if isinstance(fps, bool) or not (isinstance(fps, numbers.Real) and fps > 0):
        raise ParameterError(f"fps must be a positive frame rate in Hz, got {fps!r}. Pass --fps.")
    if isinstance(neuron_radius, bool) or not (
        isinstance(neuron_radius, numbers.Real) and neuron_radius > 0
    ):
        raise ParameterError(
            f"neuron_radius must be a positive number of pixels, got {neuron_radius!r}. Pass --neuron-radius."
        )
    return float(fps), modality, float(neuron_radius)



def pixel_statistics(
    movie: xr.DataArray, *, max_frames: int = 2000, segment_frames: int = 250
) -> xr.Dataset:
    """Per-pixel baseline and noise SD of a movie, in bounded memory.

    The movie is cut into segments of at most ``segment_frames`` consecutive
    frames; when it is longer than ``max_frames`` only ``max_frames //
    segment_frames`` segments, evenly spaced over the movie, are read. Each
    segment gives, per pixel, the temporal median (baseline) and the white
    noise SD from its first differences, ``median(|Δx|) / (0.6745 √2)``
    (the estimator of :mod:`somaflow.preprocess.summary`'s PNR image); the
    segment values are averaged, weighted by frames (differences). Each
    segment is one task (dask-backed movies are reduced by the current
    scheduler), so memory is a segment per thread or worker (processed in
    row strips) plus two (y, x) float64 results per segment, whatever the
    movie's length.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or float, numpy- or dask-backed, ≥ 2 frames.
    max_frames : int
        Frames read at most.
    segment_frames : int
        Frames per segment (the medians are taken within a segment).

    Returns
    -------
    xarray.Dataset
        ``baseline`` (y, x) float32 (movie units) and ``noise`` (y, x)
        float32 (movie units per frame); attrs ``frames_used``.

    Raises
    ------
    InputError
        Wrong dims or dtype, or fewer than 2 frames.
    """
    check_movie(movie, "pixel_statistics", min_frames=2, why=" to estimate the noise")
    n = int(movie.sizes["frame"])
    seg = max(2, min(int(segment_frames), int(max_frames), n))
    n_seg = max(1, math.ceil(n / seg))
    if n > max_frames:
        n_use = max(1, int(max_frames) // seg)
        starts = np.unique(np.round(np.linspace(0, n - seg, n_use)).astype(int))
        bounds = [(int(s), int(s) + seg) for s in starts]
    else:
        edges = np.round(np.linspace(0, n, n_seg + 1)).astype(int)
        bounds = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    data = movie.data
    if isinstance(data, da.Array):
        parts = [
            da.map_blocks(
                _segment_stats,
                data[a:b].rechunk(-1),
                chunks=((2,), (movie.sizes["y"],), (movie.sizes["x"],)),
                dtype=np.float64,
                meta=np.empty((0, 0, 0), np.float64),
            )
            for a, b in bounds
        ]
        parts = list(dask.compute(*parts))
    else:
        arr = np.asarray(data)
        parts = [_segment_stats(arr[a:b]) for a, b in bounds]
    frames = np.array([b - a for a, b in bounds], np.float64)
    baseline = sum(f * p[0] for f, p in zip(frames, parts, strict=True)) / frames.sum()
    noise = sum((f - 1) * p[1] for f, p in zip(frames, parts, strict=True)) / (frames - 1).sum()
    coords = {k: movie.coords[k] for k in ("y", "x") if k in movie.coords}
    return xr.Dataset(
        {
            "baseline": xr.DataArray(baseline.astype(np.float32), dims=("y", "x"), coords=coords),
            "noise": xr.DataArray(noise.astype(np.float32), dims=("y", "x"), coords=coords),
        },
        attrs={"frames_used": int(frames.sum())},
    )


def _segment_stats(block: np.ndarray) -> np.ndarray:
    """(t, y, x) → (2, y, x) float64: temporal median and difference-MAD noise SD per pixel."""
    t, ny, nx = block.shape
    out = np.zeros((2, ny, nx), np.float64)
    rows = max(1, _STRIP_BYTES // max(1, 4 * t * nx))
    for y0 in range(0, ny, rows):
        strip = np.asarray(block[:, y0 : y0 + rows], np.float32)
        out[0, y0 : y0 + rows] = np.median(strip, axis=0)
        if t > 1:
            out[1, y0 : y0 + rows] = abs_diff_noise_sd(strip, axis=0)
    return out



def _lowpass(frames: np.ndarray, sigma: float) -> np.ndarray:
    """Per-frame Gaussian low-pass of (t, y, x) float32, ``reflect`` borders.

    For ``sigma ≥ 8`` px the blur runs on frames block-averaged over
    ``d = floor(sigma / 4)`` pixels with SD ``sigma / d`` and is upsampled
    bilinearly: at most a few per cent of the low-pass differs from the
    full-resolution one (a Gaussian that wide carries no detail at the
    block scale), at ``d²`` times less work.
    """
    d = int(sigma // 4) if sigma >= 8 else 1
    if d <= 1:
        return ndimage.gaussian_filter(frames, sigma=(0, sigma, sigma), mode="reflect")
    t, ny, nx = frames.shape
    py, px = -ny % d, -nx % d
    padded = np.pad(frames, ((0, 0), (0, py), (0, px)), mode="reflect")
    small = padded.reshape(t, (ny + py) // d, d, (nx + px) // d, d).mean(
        axis=(2, 4), dtype=np.float32
    )
    small = ndimage.gaussian_filter(small, sigma=(0, sigma / d, sigma / d), mode="reflect")
    return _upsample(_upsample(small, d, ny, axis=1), d, nx, axis=2)


def _upsample(small: np.ndarray, d: int, n_out: int, axis: int) -> np.ndarray:
    """Linear interpolation of ``small`` to ``n_out`` samples along ``axis`` (pixel-centre
    aligned, ``d`` output pixels per input pixel, edges held: ``ndimage.zoom(order=1,
    grid_mode=True, mode="nearest")`` for one axis, by two gathers instead of a spline)."""
    n_in = small.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) / d - 0.5, 0, n_in - 1)
    i0 = np.floor(pos).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    shape = [1] * small.ndim
    shape[axis] = n_out
    w = (pos - i0).astype(np.float32).reshape(shape)
    a = np.take(small, i0, axis=axis)
    a *= 1 - w
    a += w * np.take(small, i1, axis=axis)
    return a


def _opening_foreground(frames: np.ndarray, params: DetectorInputParams) -> np.ndarray:
    """sc-CNMF's ``I − opening(I)`` per frame, by the library's own filter (synchronously)."""

    mp = MorphParams(radius=params.opening_radius, downsample=params.opening_downsample)
    arr = xr.DataArray(frames, dims=("frame", "y", "x"))
    # per call, not dask's process-wide config (other threads compute on a distributed client)
    return np.asarray(morphological_background(arr, mp).compute(scheduler="synchronous").values, np.float32)


def _check_stats(stats: xr.Dataset, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(stats, xr.Dataset) or "baseline" not in stats or "noise" not in stats:
        raise InputError(
            "stats must be the xarray.Dataset of pixel_statistics(movie) (baseline, noise)."
        )
    baseline = np.asarray(stats["baseline"].values, np.float32)
    noise = np.asarray(stats["noise"].values, np.float32)
    if baseline.shape != tuple(shape):
        raise InputError(
            f"pixel statistics are {baseline.shape} (y, x) but the frames are {tuple(shape)}; "
            "compute pixel_statistics on the same movie."
        )
    return baseline, noise


def compensate(binned: np.ndarray, stats: xr.Dataset, params: DetectorInputParams) -> np.ndarray:
    """Background compensation, whitening and clipping of already binned frames.

    Parameters
    ----------
    binned : numpy.ndarray
        (t, y, x) sums of ``params.factor`` frames (:func:`~somaflow.preprocess.temporal.sum_bins`).
    stats : xarray.Dataset
        :func:`pixel_statistics` of the unbinned movie.
    params : DetectorInputParams

    Returns
    -------
    numpy.ndarray
        (t, y, x) float32, in noise SDs of a binned frame when whitening.
    """
    x = np.array(binned, dtype=np.float32, copy=True)
    baseline, noise = _check_stats(stats, x.shape[1:])
    k = params.factor
    if params.background == "baseline":
        x -= np.float32(k) * baseline
    if params.background in ("baseline", "highpass"):
        x -= _lowpass(x, params.highpass_sigma)
    elif params.background == "opening":
        x = _opening_foreground(x, params)
    if params.whiten:
        med = float(np.median(noise))
        floor = 0.05 * med if med > 0 else 1.0
        x /= (np.sqrt(np.float32(k)) * np.maximum(noise, floor)).astype(np.float32)
    if params.clip is not None:
        np.clip(x, -params.clip, params.clip, out=x)
    return x


def detector_batch(block: np.ndarray, stats: xr.Dataset, params: DetectorInputParams) -> np.ndarray:
    """One temporal batch of raw frames → detector input.

    Binning (:func:`~somaflow.preprocess.temporal.sum_bins`), then :func:`compensate`. Every step works
    frame by frame or pixel by pixel with the movie-wide ``stats``, so a
    batch is prepared exactly as it would be as part of a longer movie
    (when its first frame starts a bin).

    Parameters
    ----------
    block : numpy.ndarray
        (T, H, W) raw frames (movie units), any real dtype.
    stats : xarray.Dataset
        :func:`pixel_statistics` of the movie.
    params : DetectorInputParams

    Returns
    -------
    numpy.ndarray
        (ceil(T / factor), H, W) float32 — not padded (see :func:`detector_batches`).

    Raises
    ------
    InputError
        ``block`` is not 3-D or does not match ``stats``.
    """
    block = np.asarray(block)
    if block.ndim != 3 or block.shape[0] == 0:
        raise InputError(f"detector_batch needs (frame, y, x) frames, got shape {block.shape}.")
    return compensate(sum_bins(block, params.factor), stats, params)


def batch_plan(n_frames: int, params: DetectorInputParams) -> list[tuple[int, int]]:
    """Raw-frame ranges ``[start, stop)`` of the non-overlapping temporal batches.

    Each batch holds ``batch_frames`` binned frames (``batch_frames ×
    factor`` raw frames). A remainder shorter than half a batch is merged
    into the last full batch (which then holds up to 1.5 batches); a longer
    one is a batch of its own. A movie shorter than one batch is one batch.
    The ranges cover every frame exactly once.
    """
    if n_frames <= 0:
        return []
    size = params.batch_frames * params.factor
    n_full = n_frames // size
    bounds = [(i * size, (i + 1) * size) for i in range(n_full)]
    rest = n_frames - n_full * size
    if rest:
        if bounds and rest < size / 2:
            bounds[-1] = (bounds[-1][0], n_frames)
        else:
            bounds.append((n_full * size, n_frames))
    return bounds


def detector_batches(
    movie: xr.DataArray,
    stats: xr.Dataset | None,
    params: DetectorInputParams,
    *,
    read_frames: int = 256,
) -> Iterator[tuple[int, np.ndarray]]:
    """The whole movie as detector inputs, one temporal batch at a time.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), numpy- or dask-backed (only one batch is in memory).
    stats : xarray.Dataset or None
        :func:`pixel_statistics` of the movie; None computes them (reading
        at most ``params.stats_frames`` frames).
    params : DetectorInputParams
    read_frames : int
        Raw frames read and binned at a time (a multiple of the bin factor is used).

    Yields
    ------
    start_frame : int
        The batch's first raw frame.
    batch : numpy.ndarray
        (T_b, H, W) float32 with T_b the batch's binned frames (see
        :func:`batch_plan`: ``batch_frames`` or up to 1.5× that for the last
        one) zero-padded at the end to a multiple of ``params.pad_multiple``.
    """
    check_movie(movie, "detector_batches", min_frames=2, why=" to estimate the noise")
    if stats is None:
        stats = pixel_statistics(movie, max_frames=params.stats_frames)
    k = params.factor
    step = max(k, (max(1, read_frames) // k) * k)
    for start, stop in batch_plan(int(movie.sizes["frame"]), params):
        pieces = [
            sum_bins(np.asarray(movie.data[a : min(a + step, stop)]), k)
            for a in range(start, stop, step)
        ]
        yield start, pad_batch(compensate(np.concatenate(pieces), stats, params), params.pad_multiple)


def pad_batch(batch: np.ndarray, multiple: int) -> np.ndarray:
    """Zero-pad a (T, H, W) detector batch at its end to a multiple of ``multiple`` frames.

    Zero is the whitened resting level, i.e. "no activity".
    """
    pad = -batch.shape[0] % multiple
    if not pad:
        return batch
    return np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])


def detector_movie(
    movie: xr.DataArray, stats: xr.Dataset | None, params: DetectorInputParams
) -> np.ndarray:
    """The whole movie's detector input in memory, without padding.

    Returns
    -------
    numpy.ndarray
        (ceil(frames / factor), H, W) float32: the batches of
        :func:`detector_batches` end to end, padding removed.
    """
    plan = batch_plan(int(movie.sizes["frame"]), params)
    return np.concatenate(
        [
            batch[: math.ceil((stop - start) / params.factor)]
            for (start, batch), (_, stop) in zip(
                detector_batches(movie, stats, params), plan, strict=True
            )
        ]
    )

