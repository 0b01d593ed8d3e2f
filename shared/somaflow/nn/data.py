"""Model inputs and training examples for the CNN detectors and classifiers (numpy only).

Everything a model sees is made here, by the same functions at training and
at inference time, so that a network never meets an input prepared
differently from the ones it learnt on. Nothing in this module imports torch.

Detector movie input (STNeuroNet, (2+1)D ConvNet)
    :class:`DetectorInputParams`, :func:`pixel_statistics` (per-pixel
    baseline and noise in one bounded-memory pass), :func:`detector_batch`
    (temporal binning → background compensation → whitening by the per-pixel
    noise → clipping) and :func:`detector_batches` (non-overlapping temporal
    batches over a whole, possibly dask-backed, movie).
Summary-image input (2D U-Net, mean-image ConvNet)
    :func:`detection_summary_images` (the session flow's summary images of the
    detection movie), :func:`summary_channels`, :func:`mean_channel`.
Targets
    :func:`union_target`, :func:`centroid_target` (Apthorpe's 4-px disks),
    :func:`boundary_weights` (U-Net weights between touching cells).
Crops and augmentation
    :func:`random_crops`, :func:`augment`.
Classifier candidates (3CNet, 3CNet+, LSTM)
    :func:`cnet_input` / :func:`cnet_inputs`, :func:`trace_vector`,
    :func:`lstm_windows` / :func:`stack_windows`, :func:`label_candidates`.
Training sets
    :func:`simulated_detector_set`, :func:`simulated_candidate_set` (the
    simulator), :func:`neurofinder_set` and :func:`result_labels` (labelled
    real data).
Out-of-distribution check
    :func:`input_statistics`, :func:`cell_snr`, :func:`summarize_statistics`,
    :func:`out_of_distribution`.
Cache
    :func:`write_examples` / :func:`read_examples`: example arrays as a zarr
    group, written atomically, ``complete`` last.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from somaflow.errors import IncompleteResultError, InputError, ParameterError

log = logging.getLogger(__name__)

#: MAD of first differences → SD of white noise: median(|Δx|) / (0.6745 √2), as the summary images
_MAD_DIFF = 0.6745 * math.sqrt(2.0)
#: MAD → SD of a normal distribution
_MAD_TO_SIGMA = 1.4826
#: 3CNet's input side (pixels) and trace samples (92²)
CNET_SIZE = 92
CNET_TRACE = CNET_SIZE * CNET_SIZE
#: detector kinds :func:`simulated_detector_set` builds, and whether their input is a movie
DETECTOR_KINDS: dict[str, bool] = {
    "stneuronet": True,
    "convnet2p1d": True,
    "meanimage2d": False,
    "unet2d": False,
}
#: statistics :func:`out_of_distribution` compares (positive numbers, compared on a ratio scale)
OOD_KEYS: dict[str, str] = {
    "noise_level": "noise level (median pixel noise SD / median baseline)",
    "neuron_radius": "neuron radius (px)",
    "median_snr": "median cell peak-to-noise ratio",
    "fps": "frame rate (Hz)",
}
#: float32 working memory of one row strip in :func:`pixel_statistics`
_STRIP_BYTES = 32 << 20


# ============================================================================= detector movie input


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


def _check_movie(movie: xr.DataArray, who: str) -> None:
    if not isinstance(movie, xr.DataArray) or tuple(movie.dims) != ("frame", "y", "x"):
        dims = tuple(movie.dims) if isinstance(movie, xr.DataArray) else type(movie).__name__
        raise InputError(
            f"{who} needs an xarray.DataArray with dims ('frame', 'y', 'x'), got {dims}. "
            "Wrap or transpose it: xr.DataArray(arr, dims=('frame', 'y', 'x'))."
        )
    if movie.sizes["frame"] < 2:
        raise InputError(
            f"{who} needs at least 2 frames to estimate the noise, got {movie.sizes['frame']}."
        )
    if movie.dtype.kind not in "iuf":
        raise InputError(
            f"{who}: movie dtype {movie.dtype} is not a real number type; convert it to float32."
        )


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
    _check_movie(movie, "pixel_statistics")
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
            out[1, y0 : y0 + rows] = np.median(np.abs(np.diff(strip, axis=0)), axis=0) / _MAD_DIFF
    return out


def bin_block(block: np.ndarray, factor: int) -> np.ndarray:
    """Sum every ``factor`` consecutive frames (STNeuroNet's binning).

    Parameters
    ----------
    block : numpy.ndarray
        (t, y, x) real.
    factor : int
        Frames per bin, ≥ 1.

    Returns
    -------
    numpy.ndarray
        (ceil(t / factor), y, x) float32 sums. A last, partial bin of
        ``m < factor`` frames is kept, its sum scaled by ``factor / m`` so it
        is on the scale of a full bin (its noise is ``sqrt(factor / m)``
        times larger).
    """
    t = block.shape[0]
    if factor <= 1:
        return np.asarray(block, np.float32)
    n_full = t // factor
    out = np.empty((math.ceil(t / factor),) + block.shape[1:], np.float32)
    for i in range(n_full):  # bin by bin: float32 copies of one bin at a time
        out[i] = np.asarray(block[i * factor : (i + 1) * factor], np.float32).sum(
            axis=0, dtype=np.float64
        )
    if t > n_full * factor:
        rest = np.asarray(block[n_full * factor :], np.float64)
        out[-1] = rest.sum(axis=0) * (factor / rest.shape[0])
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
    from somaflow.preprocess.filters import MorphParams, morphological_background

    mp = MorphParams(radius=params.opening_radius, downsample=params.opening_downsample)
    arr = xr.DataArray(frames, dims=("frame", "y", "x"))
    with dask.config.set(scheduler="synchronous"):
        return np.asarray(morphological_background(arr, mp).values, np.float32)


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
        (t, y, x) sums of ``params.factor`` frames (:func:`bin_block`).
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

    Binning (:func:`bin_block`), then :func:`compensate`. Every step works
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
    return compensate(bin_block(block, params.factor), stats, params)


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
    _check_movie(movie, "detector_batches")
    if stats is None:
        stats = pixel_statistics(movie, max_frames=params.stats_frames)
    k = params.factor
    step = max(k, (max(1, read_frames) // k) * k)
    for start, stop in batch_plan(int(movie.sizes["frame"]), params):
        pieces = [
            bin_block(np.asarray(movie.data[a : min(a + step, stop)]), k)
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


# ============================================================================= summary-image input


def detection_summary_images(
    movie: xr.DataArray, fps: float, modality: str, neuron_radius: float
) -> xr.Dataset:
    """Summary images of the detection movie, exactly as ``somaflow run`` makes them.

    ``summary_images(detection_movie(movie, p.preprocess), p.summary)`` with
    ``p = RunParams.for_movie(...)`` — binned to ~6 Hz (2p) or background-
    removed and denoised (1p) — computed.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) motion-corrected movie, numpy- or dask-backed.
    fps, modality, neuron_radius
        As for ``somaflow run``.

    Returns
    -------
    xarray.Dataset
        ``mean_image``, ``max_image``, ``std_image``, ``correlation_image``,
        ``pnr_image``, each (y, x) float32.
    """
    from somaflow.params import RunParams
    from somaflow.preprocess.pipeline import detection_movie
    from somaflow.preprocess.summary import summary_images

    _check_movie(movie, "detection_summary_images")
    p = RunParams.for_movie(fps, modality, neuron_radius, shape=tuple(movie.shape))
    return summary_images(
        detection_movie(movie.assign_attrs(fps=float(fps)), p.preprocess), p.summary
    ).compute()


#: channels of :func:`summary_channels`, in order
SUMMARY_CHANNELS = ("mean_image", "max_image", "correlation_image", "pnr_image")


def robust_normalize(img: np.ndarray, clip: float | None = 20.0) -> np.ndarray:
    """``(img − median) / (1.4826 · MAD)`` clipped to ``[-clip, clip]``, float32.

    The scale falls back to the SD when the MAD is 0, and to 1 when both are
    (a constant image becomes 0). Non-finite pixels become 0.
    """
    a = np.asarray(img, np.float64)
    finite = np.isfinite(a)
    vals = a[finite]
    if vals.size == 0:
        return np.zeros(a.shape, np.float32)
    med = float(np.median(vals))
    scale = _MAD_TO_SIGMA * float(np.median(np.abs(vals - med)))
    if not scale > 0:
        scale = float(vals.std()) or 1.0
    out = np.where(finite, (a - med) / scale, 0.0)
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return out.astype(np.float32)


def _image(images: xr.Dataset, name: str) -> np.ndarray:
    if name not in images:
        raise InputError(
            f"summary images lack {name!r}; pass the output of somaflow.preprocess.summary.summary_images "
            "(or detection_summary_images)."
        )
    img = np.asarray(images[name].values)
    if img.ndim != 2:
        raise InputError(f"{name} must be a (y, x) image, got shape {img.shape}.")
    return img


def summary_channels(images: xr.Dataset, *, clip: float | None = 20.0) -> np.ndarray:
    """The 2D U-Net's input: mean, max, correlation and PNR images, robustly normalised.

    Each image is mapped to robust z-scores (:func:`robust_normalize`:
    median 0, MAD-derived SD 1, clipped), so offsets and gains that differ
    between microscopes, labs and modalities vanish.

    Parameters
    ----------
    images : xarray.Dataset
        Summary images with ``mean_image``, ``max_image``,
        ``correlation_image``, ``pnr_image`` (y, x).
    clip : float or None
        Clip to ``[-clip, clip]`` robust SDs.

    Returns
    -------
    numpy.ndarray
        (4, H, W) float32 in the order of :data:`SUMMARY_CHANNELS`.
    """
    return np.stack([robust_normalize(_image(images, n), clip) for n in SUMMARY_CHANNELS])


def mean_channel(images: xr.Dataset, *, clip: float | None = 20.0) -> np.ndarray:
    """The mean-image ConvNet's input: (1, H, W) float32, the normalised mean image."""
    return robust_normalize(_image(images, "mean_image"), clip)[None]


# ============================================================================= targets


def _check_masks(masks: np.ndarray, who: str) -> np.ndarray:
    m = np.asarray(masks)
    if m.ndim != 3:
        raise InputError(f"{who} needs (unit, y, x) masks, got shape {m.shape}.")
    return m.astype(bool, copy=False)


def union_target(masks: np.ndarray, *, exclude_overlaps: bool = False, gap: int = 0) -> np.ndarray:
    """Pixel-wise neuron target: 1 where any mask is.

    Parameters
    ----------
    masks : numpy.ndarray
        (N, H, W) bool.
    exclude_overlaps : bool
        Set pixels covered by two or more masks to 0, so overlapping cells
        come apart in the target (and the post-processing's watershed).
    gap : int
        Also set to 0 the pixels within ``gap`` px of another cell (the
        U-Net paper's separation of touching cells, as a target instead of a
        loss weight): touching cells become separate components.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8 in {0, 1}.
    """
    m = _check_masks(masks, "union_target")
    count = m.sum(axis=0, dtype=np.uint16)
    out = count >= 1
    if exclude_overlaps or gap > 0:
        out &= count < 2
    if gap > 0 and len(m):
        from scipy import ndimage

        grown = np.zeros(m.shape[1:], np.uint16)
        for cell in m:
            grown += ndimage.binary_dilation(cell, iterations=int(gap))
        out &= grown < 2
    return out.astype(np.uint8)


def mask_centroids(masks: np.ndarray) -> np.ndarray:
    """(N, 2) float64 mean (row, col) of each mask; NaN for empty masks."""
    m = _check_masks(masks, "mask_centroids")
    n, ny, nx = m.shape
    area = m.sum(axis=(1, 2)).astype(np.float64)
    rows = (m.sum(axis=2) * np.arange(ny)).sum(axis=1)
    cols = (m.sum(axis=1) * np.arange(nx)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([rows / area, cols / area], axis=1) if n else np.zeros((0, 2))


def centroid_target(masks: np.ndarray, radius: float = 4.0) -> np.ndarray:
    """ROIs shrunk to disks at their centroids (Apthorpe et al.'s (2+1)D ConvNet target).

    Parameters
    ----------
    masks : numpy.ndarray
        (N, H, W) bool; empty masks are skipped.
    radius : float
        Disk radius (px); 4 in the paper.

    Returns
    -------
    numpy.ndarray
        (H, W) uint8: 1 within ``radius`` px of a mask's centroid (clipped at the border).
    """
    m = _check_masks(masks, "centroid_target")
    ny, nx = m.shape[1:]
    out = np.zeros((ny, nx), bool)
    k = int(math.ceil(radius))
    for cy, cx in mask_centroids(m):
        if not np.isfinite(cy):
            continue
        y0, y1 = max(0, int(np.floor(cy)) - k), min(ny, int(np.ceil(cy)) + k + 1)
        x0, x1 = max(0, int(np.floor(cx)) - k), min(nx, int(np.ceil(cx)) + k + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2 + 1e-9
    return out.astype(np.uint8)


def boundary_weights(masks: np.ndarray, *, w0: float = 10.0, sigma: float = 3.0) -> np.ndarray:
    """U-Net pixel weights that stress the background gap between touching cells.

    ``w = 1 + w0 · exp(−(d1 + d2)² / (2 σ²))`` on background pixels, with
    ``d1``, ``d2`` the distances (px) to the nearest and second-nearest cell
    (Ronneberger et al. 2015); 1 on cell pixels and where fewer than two
    cells are within reach. Distances are computed in a window of
    ``3 σ + 1`` px around each mask only.

    Parameters
    ----------
    masks : numpy.ndarray
        (N, H, W) bool.
    w0, sigma : float
        Peak extra weight and its width (px).

    Returns
    -------
    numpy.ndarray
        (H, W) float32 ≥ 1.
    """
    m = _check_masks(masks, "boundary_weights")
    ny, nx = m.shape[1:]
    d1 = np.full((ny, nx), np.inf)
    d2 = np.full((ny, nx), np.inf)
    margin = int(math.ceil(3 * sigma)) + 1
    for mask in m:
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            continue
        y0, y1 = max(0, ys.min() - margin), min(ny, ys.max() + margin + 1)
        x0, x1 = max(0, xs.min() - margin), min(nx, xs.max() + margin + 1)
        d = ndimage.distance_transform_edt(~mask[y0:y1, x0:x1])
        a, b = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        d2[y0:y1, x0:x1] = np.minimum(b, np.maximum(a, d))
        d1[y0:y1, x0:x1] = np.minimum(a, d)
    union = m.any(axis=0)
    with np.errstate(invalid="ignore"):
        extra = np.where(
            np.isfinite(d2) & ~union, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0
        )
    return (1.0 + extra).astype(np.float32)


# ============================================================================= crops and augmentation


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    py, px = max(0, size - a.shape[-2]), max(0, size - a.shape[-1])
    if not (py or px):
        return a
    return np.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, py), (0, px)])


def random_crops(
    x: np.ndarray,
    y: np.ndarray,
    size: int,
    n: int,
    rng: np.random.Generator,
    *,
    positive_fraction: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Random square crops of an input and its target, at the same place.

    Parameters
    ----------
    x : numpy.ndarray
        (..., H, W) input (channels and/or frames first).
    y : numpy.ndarray
        (H, W) target (or (H, W) weights).
    size : int
        Crop side (px). Frames smaller than that are zero-padded at their
        bottom/right first.
    n : int
        Number of crops.
    rng : numpy.random.Generator
    positive_fraction : float
        Fraction of the crops (rounded per crop at random) that contain a
        target pixel > 0: the crop is placed so a random positive pixel lies
        in it, uniformly at any position. The rest are placed uniformly at
        random. Without positive pixels every crop is uniform.

    Returns
    -------
    xs : numpy.ndarray
        (n, ..., size, size), ``x``'s dtype.
    ys : numpy.ndarray
        (n, size, size), ``y``'s dtype.
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if y.ndim != 2 or x.shape[-2:] != y.shape:
        raise InputError(
            f"random_crops needs x (..., H, W) and y (H, W) on the same grid; got {x.shape}, {y.shape}."
        )
    if size < 1 or n < 0:
        raise ParameterError(f"random_crops: size must be ≥ 1 and n ≥ 0, got size={size}, n={n}.")
    x, y = _pad_to(x, size), _pad_to(y, size)
    ny, nx = y.shape
    pos = np.argwhere(y > 0)
    xs = np.empty((n,) + x.shape[:-2] + (size, size), x.dtype)
    ys = np.empty((n, size, size), y.dtype)
    for i in range(n):
        if len(pos) and rng.random() < positive_fraction:
            py, px = pos[rng.integers(len(pos))]
            y0 = int(rng.integers(max(0, py - size + 1), min(py, ny - size) + 1))
            x0 = int(rng.integers(max(0, px - size + 1), min(px, nx - size) + 1))
        else:
            y0 = int(rng.integers(0, ny - size + 1))
            x0 = int(rng.integers(0, nx - size + 1))
        xs[i] = x[..., y0 : y0 + size, x0 : x0 + size]
        ys[i] = y[y0 : y0 + size, x0 : x0 + size]
    return xs, ys


def augment(
    x: np.ndarray, y: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A random element of the square's symmetry group, applied to input and target alike.

    A rotation by ``k · 90°`` (k uniform in 0..3) of the last two axes,
    then a left-right flip with probability 1/2: the 8 rotations and
    reflections of STNeuroNet's and Apthorpe's augmentation, equally likely.

    Parameters
    ----------
    x : numpy.ndarray
        (..., H, W).
    y : numpy.ndarray
        (..., H, W) — the same H, W.
    rng : numpy.random.Generator

    Returns
    -------
    x, y : numpy.ndarray
        Contiguous copies; H and W swap for odd k when they differ.
    """
    x, y = np.asarray(x), np.asarray(y)
    if x.shape[-2:] != y.shape[-2:]:
        raise InputError(
            f"augment needs x and y on the same (H, W) grid, got {x.shape} and {y.shape}."
        )
    k = int(rng.integers(4))
    flip = bool(rng.random() < 0.5)
    xo, yo = np.rot90(x, k, axes=(-2, -1)), np.rot90(y, k, axes=(-2, -1))
    if flip:
        xo, yo = xo[..., ::-1], yo[..., ::-1]
    return np.ascontiguousarray(xo), np.ascontiguousarray(yo)


# ============================================================================= input statistics and OOD


def trace_snr(traces: np.ndarray) -> np.ndarray:
    """Peak-to-noise ratio of each trace: ``(max − median) / noise``.

    ``noise`` is the white-noise SD from the first differences,
    ``median(|Δx|) / (0.6745 √2)``; a trace without noise gets 0.

    Parameters
    ----------
    traces : numpy.ndarray
        (N, T) fluorescence (any units), T ≥ 2.

    Returns
    -------
    numpy.ndarray
        (N,) float64.
    """
    t = np.asarray(traces, np.float64)
    if t.ndim != 2 or t.shape[1] < 2:
        raise InputError(
            f"trace_snr needs (unit, frame) traces with ≥ 2 frames, got shape {t.shape}."
        )
    noise = np.median(np.abs(np.diff(t, axis=1)), axis=1) / _MAD_DIFF
    peak = t.max(axis=1) - np.median(t, axis=1)
    return np.where(noise > 0, peak / np.where(noise > 0, noise, 1.0), 0.0)


def cell_snr(movie: xr.DataArray, masks: np.ndarray) -> np.ndarray:
    """Peak-to-noise ratio of each mask's mean trace (:func:`trace_snr`).

    The same measurement for ground-truth masks (training) and for the
    units a method found (inference), so the two are comparable.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), numpy- or dask-backed (one pass, streamed).
    masks : numpy.ndarray
        (N, H, W) bool.

    Returns
    -------
    numpy.ndarray
        (N,) float64; 0 for empty masks.
    """
    from somaflow.extract.seeds import project
    from somaflow.traces import sparse_masks

    _check_movie(movie, "cell_snr")
    m = _check_masks(masks, "cell_snr")
    if m.shape[1:] != tuple(movie.shape[1:]):
        raise InputError(
            f"masks are {m.shape[1:]} (y, x) but the movie is {tuple(movie.shape[1:])}."
        )
    if len(m) == 0:
        return np.zeros(0)
    rows = sparse_masks(m.astype(np.float64))
    area = np.asarray(rows.sum(axis=1)).ravel()
    rows = rows.multiply(1.0 / np.maximum(area, 1)[:, None]).tocsr().astype(np.float32)
    traces = project(movie, rows)
    if isinstance(traces, da.Array):
        traces = traces.compute()
    snr = trace_snr(np.asarray(traces))
    return np.where(area > 0, snr, 0.0)


def input_statistics(
    source: xr.DataArray | xr.Dataset,
    neuron_radius: float,
    *,
    fps: float | None = None,
    modality: str | None = None,
    masks: np.ndarray | None = None,
    snr: np.ndarray | None = None,
    movie: xr.DataArray | None = None,
) -> dict[str, Any]:
    """The statistics of one session that the out-of-distribution check compares.

    The same numbers are computed for every training session (from the
    simulation's truth) and for an unlabelled session at inference (from the
    units found), so they are comparable.

    Parameters
    ----------
    source : xarray.DataArray or xarray.Dataset
        The (frame, y, x) movie, or its :func:`pixel_statistics`.
    neuron_radius : float
        Soma radius (px): the preset's at training, ``--neuron-radius`` at inference.
    fps, modality : optional
        Default to the movie's ``fps`` / ``modality`` attrs.
    masks : numpy.ndarray, optional
        (N, H, W) bool cell masks (truth at training, units at inference);
        their :func:`cell_snr` gives ``median_snr``. Needs the movie.
    snr : numpy.ndarray, optional
        Per-cell peak-to-noise ratios already measured with :func:`cell_snr`.
    movie : xarray.DataArray, optional
        The movie, when ``source`` is its statistics and ``masks`` are given.

    Returns
    -------
    dict
        JSON-serialisable: ``noise_level`` (median pixel noise SD per frame /
        median baseline, dimensionless), ``neuron_radius`` (px),
        ``median_snr`` (or None), ``fps`` (Hz or None), ``modality`` (or None).
    """
    if isinstance(source, xr.DataArray):
        movie = source
        stats = pixel_statistics(source)
    elif isinstance(source, xr.Dataset) and "baseline" in source and "noise" in source:
        stats = source
    else:
        raise InputError(
            "input_statistics needs the (frame, y, x) movie or its pixel_statistics(movie); "
            "summary images carry no per-pixel noise estimate."
        )
    attrs = movie.attrs if movie is not None else {}
    fps = fps if fps is not None else attrs.get("fps")
    modality = modality if modality is not None else attrs.get("modality")
    base = float(np.median(stats["baseline"].values))
    noise = float(np.median(stats["noise"].values))
    if snr is None and masks is not None:
        if movie is None:
            raise InputError(
                "input_statistics: masks were given without the movie; pass movie=... too."
            )
        snr = cell_snr(movie, masks)
    median_snr = float(np.median(snr)) if snr is not None and len(snr) else None
    return {
        "noise_level": noise / base if base > 0 else float("inf"),
        "neuron_radius": float(neuron_radius),
        "median_snr": median_snr,
        "fps": float(fps) if fps is not None else None,
        "modality": modality,
    }


def summarize_statistics(sessions: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The training range of each statistic, for a checkpoint's ``input_stats``.

    Parameters
    ----------
    sessions : sequence of dict
        :func:`input_statistics` of every training session.

    Returns
    -------
    dict
        For each key of :data:`OOD_KEYS`: ``{"min", "max", "median", "n"}``
        over the sessions that have it; ``"modality"``: the sorted list of
        modalities seen; ``"n_sessions"``.
    """
    out: dict[str, Any] = {"n_sessions": len(sessions)}
    for key in OOD_KEYS:
        vals = [
            float(s[key]) for s in sessions if s.get(key) is not None and np.isfinite(float(s[key]))
        ]
        if vals:
            out[key] = {
                "min": min(vals),
                "max": max(vals),
                "median": float(np.median(vals)),
                "n": len(vals),
            }
    mods = sorted({str(s["modality"]) for s in sessions if s.get("modality")})
    if mods:
        out["modality"] = mods
    return out


def out_of_distribution(
    stats_now: Mapping[str, Any],
    training_stats: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    margin: float = 1.5,
    rate: Callable[[float], float] | None = None,
) -> list[str]:
    """Warnings for the statistics of a session that fall outside the training range.

    A positive statistic ``v`` is out of range when ``v < min / margin`` or
    ``v > max × margin`` (a ratio scale: noise levels, radii, SNRs and frame
    rates vary by factors, not offsets); a modality is out of range when no
    training session had it. Missing values are not judged.

    Parameters
    ----------
    stats_now : dict
        :func:`input_statistics` of the session.
    training_stats : dict or sequence of dict
        :func:`summarize_statistics` of the training sessions (a
        checkpoint's ``input_stats``), or the per-session dicts themselves.
    margin : float
        Tolerance factor beyond the training range, > 1.
    rate : callable, optional
        Maps a frame rate (Hz) to the rate the model actually sees, applied to
        the session's and the training range's alike. The summary-image
        detectors pass :func:`detection_rate`: their images come from the movie
        binned to ~6 Hz (2p), so a 30 Hz and a 10 Hz movie give them alike
        inputs and only the binned rate is judged.

    Returns
    -------
    list of str
        One human-readable line per statistic out of range; empty when the
        session looks like the training data.
    """
    if not margin >= 1:
        raise ParameterError(
            f"margin must be ≥ 1 (a factor beyond the training range), got {margin}."
        )
    summary = (
        training_stats
        if isinstance(training_stats, Mapping)
        else summarize_statistics(training_stats)
    )
    warnings: list[str] = []
    for key, label in OOD_KEYS.items():
        value = stats_now.get(key)
        rng = summary.get(key)
        if value is None or not isinstance(rng, Mapping):
            continue
        v, lo, hi = float(value), float(rng["min"]), float(rng["max"])
        if key == "fps" and rate is not None:
            v, lo, hi = rate(v), rate(lo), rate(hi)
            label = "frame rate after binning for the summary images (Hz)"
        if not np.isfinite(v):
            warnings.append(f"{label} is {v}: the input statistics could not be measured.")
        elif v < lo / margin or v > hi * margin:
            side = "below" if v < lo / margin else "above"
            warnings.append(
                f"{label} {v:.3g} is {side} the training range {lo:.3g}–{hi:.3g} (margin ×{margin:g})"
            )
    mods = summary.get("modality")
    if stats_now.get("modality") and mods and stats_now["modality"] not in mods:
        warnings.append(
            f"modality {stats_now['modality']} was not in the training data ({', '.join(mods)})"
        )
    return warnings


def detection_rate(fps: float, modality: str) -> float:
    """Frame rate (Hz) of the detection movie the summary images are made of.

    ``fps / factor`` with the default binning of ``somaflow run``
    (:meth:`BinParams.for_movie`): 2p movies are binned to ~6 Hz, 1p movies
    to ~10 Hz, never faster than recorded. Non-positive or non-finite rates
    are returned as they are (the caller reports them).
    """
    from somaflow.preprocess.temporal import BinParams

    f = float(fps)
    if not (np.isfinite(f) and f > 0):
        return f
    return f / BinParams.for_movie(f, modality, 1.0).factor(f)


# ============================================================================= classifier candidates


def robust_zscore(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``(x − median) / noise`` along ``axis``, float32.

    ``noise`` is the white-noise SD from first differences,
    ``median(|Δx|) / (0.6745 √2)`` — transients barely move it, so a trace
    is in units of its noise — falling back to 1.4826 · MAD of the values,
    then to 1, when it is 0.
    """
    a = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    med = np.median(a, axis=-1, keepdims=True)
    if a.shape[-1] > 1:
        scale = np.median(np.abs(np.diff(a, axis=-1)), axis=-1, keepdims=True) / _MAD_DIFF
    else:
        scale = np.zeros_like(med)
    mad = _MAD_TO_SIGMA * np.median(np.abs(a - med), axis=-1, keepdims=True)
    scale = np.where(scale > 0, scale, np.where(mad > 0, mad, 1.0))
    return np.moveaxis((a - med) / scale, -1, axis).astype(np.float32)


def resample(x: np.ndarray, length: int) -> np.ndarray:
    """Resample the last axis to ``length`` samples.

    Shorter outputs average the samples of ``length`` equal bins (no
    aliasing of transients); longer outputs interpolate linearly between
    sample centres. float64.
    """
    a = np.asarray(x, np.float64)
    n = a.shape[-1]
    if length < 1:
        raise ParameterError(f"resample length must be ≥ 1, got {length}.")
    if n == length:
        return a.copy()
    if n == 0:
        raise InputError("cannot resample an empty trace.")
    if length < n:
        edges = np.round(np.linspace(0, n, length + 1)).astype(int)
        csum = np.concatenate([np.zeros(a.shape[:-1] + (1,)), np.cumsum(a, axis=-1)], axis=-1)
        return (csum[..., edges[1:]] - csum[..., edges[:-1]]) / np.diff(edges)
    src = (np.arange(n) + 0.5) / n
    dst = (np.arange(length) + 0.5) / length
    flat = a.reshape(-1, n)
    return np.stack([np.interp(dst, src, row) for row in flat]).reshape(a.shape[:-1] + (length,))


def cnet_input(image: np.ndarray, mask: np.ndarray, trace: np.ndarray) -> np.ndarray:
    """One candidate as 3CNet's 92 × 92 × 2 input (Kim et al., channels first).

    Channel 0 — the candidate's ROI image (its footprint or spatial filter)
    cropped to 92 × 92 px centred on the mask's centroid, zero-padded where
    the window leaves the frame, and zero-centred: the mean of the in-frame
    pixels is subtracted; we also divide by their SD (not in the paper) so
    images in ADU, ΔF/F or footprint units look alike. Padding stays 0.

    Channel 1 — 8464 = 92² samples from the middle of the trace, robustly
    z-scored (:func:`robust_zscore`; the paper does not say how it scaled
    traces), reshaped row-major. A trace shorter than 8464 samples is
    repeated end to end (``numpy.resize``) up to 8464 — short simulator and
    lab sessions would otherwise be mostly padding.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W) real.
    mask : numpy.ndarray
        (H, W) bool, non-empty.
    trace : numpy.ndarray
        (T,) real, T ≥ 1.

    Returns
    -------
    numpy.ndarray
        (2, 92, 92) float32.
    """
    image = np.asarray(image, np.float64)
    mask = np.asarray(mask, bool)
    trace = np.asarray(trace, np.float64).ravel()
    if image.ndim != 2 or mask.shape != image.shape:
        raise InputError(
            f"cnet_input needs an (H, W) image and a mask of the same shape, got {image.shape}, {mask.shape}."
        )
    if not mask.any():
        raise InputError("cnet_input: the candidate's mask is empty; drop empty candidates first.")
    if trace.size == 0:
        raise InputError("cnet_input: the candidate's trace is empty.")
    out = np.zeros((2, CNET_SIZE, CNET_SIZE), np.float32)
    cy, cx = (int(round(v)) for v in mask_centroids(mask[None])[0])
    h = CNET_SIZE // 2
    y0, x0 = cy - h, cx - h
    ys0, ys1 = max(0, y0), min(image.shape[0], y0 + CNET_SIZE)
    xs0, xs1 = max(0, x0), min(image.shape[1], x0 + CNET_SIZE)
    patch = image[ys0:ys1, xs0:xs1]
    sd = float(patch.std())
    out[0, ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0] = (patch - patch.mean()) / (
        sd if sd > 0 else 1.0
    )
    z = robust_zscore(trace)
    if z.size >= CNET_TRACE:
        start = (z.size - CNET_TRACE) // 2
        z = z[start : start + CNET_TRACE]
    else:
        z = np.resize(z, CNET_TRACE)
    out[1] = z.reshape(CNET_SIZE, CNET_SIZE)
    return out


def masked_mean_images(mean: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """ROI images of units without footprints: the mean image near each mask.

    The mean image minus its median, inside each mask dilated by 2 px, 0
    elsewhere: what 3CNet's image channel shows for a detector's units, at
    inference (:func:`somaflow.classify.cnet.candidate_inputs`) and in
    training (:func:`simulated_candidate_set`).

    Parameters
    ----------
    mean : numpy.ndarray
        (H, W) mean image.
    masks : numpy.ndarray
        (N, H, W) bool.

    Returns
    -------
    numpy.ndarray
        (N, H, W) float32.
    """
    masks = _check_masks(masks, "masked_mean_images")
    mean = np.asarray(mean, np.float32)
    if mean.shape != masks.shape[1:]:
        raise InputError(f"masked_mean_images: a {mean.shape} mean image for {masks.shape[1:]} masks.")
    centred = mean - np.median(mean)
    out = np.zeros(masks.shape, np.float32)
    h, w = mean.shape
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(axis=1))[0], np.nonzero(m.any(axis=0))[0]
        if not ys.size:
            continue
        # dilate inside the mask's bounding box plus the 2-px reach, not the whole frame
        box = (slice(max(0, ys[0] - 2), min(h, ys[-1] + 3)), slice(max(0, xs[0] - 2), min(w, xs[-1] + 3)))
        near = ndimage.binary_dilation(m[box], iterations=2)
        out[i][box] = np.where(near, centred[box], 0)
    return out


def cnet_inputs(images: np.ndarray, masks: np.ndarray, traces: np.ndarray) -> np.ndarray:
    """:func:`cnet_input` of N candidates: (N, H, W) images (or one shared (H, W) image),
    (N, H, W) masks, (N, T) traces → (N, 2, 92, 92) float32."""
    masks = _check_masks(masks, "cnet_inputs")
    images = np.asarray(images)
    traces = np.asarray(traces)
    n = len(masks)
    if len(traces) != n or (images.ndim == 3 and len(images) != n):
        raise InputError(
            f"cnet_inputs: {n} masks but {len(traces)} traces / {images.shape} images."
        )
    out = np.zeros((n, 2, CNET_SIZE, CNET_SIZE), np.float32)
    for i in range(n):
        out[i] = cnet_input(images[i] if images.ndim == 3 else images, masks[i], traces[i])
    return out


def trace_vector(trace: np.ndarray, length: int = 512) -> np.ndarray:
    """The CNet3Plus trace branch's input: the whole trace at a fixed length, in noise units.

    Resampled to ``length`` samples (bin means when shorter, linear
    interpolation when longer: :func:`resample`), then robustly z-scored
    (:func:`robust_zscore`, after resampling so the unit is the noise of a
    resampled sample).

    Parameters
    ----------
    trace : numpy.ndarray
        (..., T) real.
    length : int
        Output samples.

    Returns
    -------
    numpy.ndarray
        (..., length) float32.
    """
    return robust_zscore(resample(trace, length))


def lstm_windows(
    trace: np.ndarray,
    window: int = 100,
    n_windows: int | None = None,
    *,
    fps: float | None = None,
    target_fps: float = 10.0,
) -> np.ndarray:
    """A trace cut into z-scored windows for the LSTM seed classifier (sc-CNMF).

    sc-CNMF classifies windows of T₀ = 100 samples at 10 Hz: with ``fps``
    given, the trace is first resampled to ``target_fps``. It is then
    robustly z-scored (:func:`robust_zscore`) as a whole and cut into
    windows of ``window`` samples: by default non-overlapping from the
    start, plus one window aligned to the end when a remainder is left, so
    every sample is in a window; with ``n_windows``, that many windows with
    evenly spaced starts (overlapping when needed). A trace shorter than a
    window is padded with zeros (its median) to one window.

    Parameters
    ----------
    trace : numpy.ndarray
        (T,) real.
    window : int
        Samples per window.
    n_windows : int, optional
        Number of windows.
    fps : float, optional
        The trace's frame rate (Hz); None: no resampling.
    target_fps : float
        Rate the windows are cut at (Hz).

    Returns
    -------
    numpy.ndarray
        (W, window) float32.
    """
    x = np.asarray(trace, np.float64).ravel()
    if x.size == 0:
        raise InputError("lstm_windows: the trace is empty.")
    if window < 1 or (n_windows is not None and n_windows < 1):
        raise ParameterError(
            f"lstm_windows: window and n_windows must be ≥ 1, got {window}, {n_windows}."
        )
    if fps is not None and not math.isclose(fps, target_fps):
        x = resample(x, max(1, int(round(x.size * target_fps / fps))))
    z = robust_zscore(x)
    if z.size < window:
        z = np.concatenate([z, np.zeros(window - z.size, np.float32)])
    last = z.size - window
    if n_windows is None:
        starts = list(range(0, last + 1, window))
        if starts[-1] != last:
            starts.append(last)
    else:
        starts = np.round(np.linspace(0, last, n_windows)).astype(int).tolist()
    return np.stack([z[s : s + window] for s in starts]).astype(np.float32)


def stack_windows(windows: Sequence[np.ndarray], n_windows: int | None = None) -> np.ndarray:
    """Windows of several traces as one (N, W, window) array.

    Traces with fewer windows than ``W`` (default: the most any trace has)
    repeat their own windows cyclically, which leaves a max over windows —
    the LSTM classifier's verdict — unchanged; traces with more keep their
    first ``W``.
    """
    if not len(windows):
        return np.zeros((0, n_windows or 1, 100), np.float32)
    w = n_windows or max(len(a) for a in windows)
    return np.stack([np.asarray(a, np.float32)[np.arange(w) % len(a)] for a in windows])


def label_candidates(
    candidate_masks: np.ndarray,
    truth_masks: np.ndarray,
    *,
    iou: float = 0.5,
    one_to_one: bool = True,
    containment: float | None = None,
) -> np.ndarray:
    """Label candidates 1 (a true cell) or 0 by matching them to ground truth.

    A candidate and a true cell match when their IoU is ≥ ``iou`` (and, with
    ``containment``, also when one lies inside the other: at least that
    fraction of the smaller mask's pixels inside the larger, STNeuroNet
    Eq. 13–14). With ``one_to_one`` the Hungarian assignment that maximises
    the number of such pairs, then their total IoU (with ``containment``,
    :func:`~somaflow.evaluate.match_iou`'s, where a contained pair costs 0),
    gives each true cell at most one candidate (a second candidate on the same cell is labelled 0,
    as an evaluation counts it a false positive).

    The shipped classifiers are trained on the default, IoU alone: a small
    candidate wholly inside a cell is 0. ``containment=1.0`` gives instead
    exactly the units :func:`somaflow.evaluate.evaluate` counts as true
    positives (its matching, :func:`~somaflow.evaluate.match_iou`, accepts
    exact containment at distance 0); ``bench_cnn.py`` reports accuracy
    against both.

    Parameters
    ----------
    candidate_masks : numpy.ndarray
        (N, H, W) bool.
    truth_masks : numpy.ndarray
        (M, H, W) bool, same H, W.
    iou : float
        IoU threshold in (0, 1].
    one_to_one : bool
        False: every candidate that matches some true cell is 1.
    containment : float or None
        Fraction in (0, 1] of the smaller mask inside the larger that makes a
        match regardless of IoU (1.0: exact containment, the evaluator's
        default). None (default): IoU alone.

    Returns
    -------
    numpy.ndarray
        (N,) int64 in {0, 1}.
    """
    from somaflow.evaluate import match_iou, overlaps

    if not 0 < iou <= 1:
        raise ParameterError(f"iou must be in (0, 1], got {iou}.")
    if containment is not None and not 0 < containment <= 1:
        raise ParameterError(f"containment must be in (0, 1] or None, got {containment}.")
    cand = _check_masks(candidate_masks, "label_candidates")
    truth = _check_masks(truth_masks, "label_candidates")
    labels = np.zeros(len(cand), np.int64)
    if len(cand) == 0 or len(truth) == 0:
        return labels
    if containment is not None and one_to_one:
        labels[np.asarray(match_iou(cand, truth, iou, containment=containment).pred, np.int64)] = 1
        return labels
    ov = overlaps(cand, truth)
    ok = ov.iou >= iou
    if containment is not None:
        ok |= ov.contained(containment)
    pred, true, score = ov.pred[ok], ov.true[ok], ov.iou[ok]
    if not one_to_one:
        labels[np.unique(pred)] = 1
        return labels
    if pred.size == 0:
        return labels
    rows, r_inv = np.unique(pred, return_inverse=True)
    cols, c_inv = np.unique(true, return_inverse=True)
    big = float(min(len(rows), len(cols)) + 1)  # any pair beats no pair
    cost = np.full((len(rows), len(cols)), big)
    cost[r_inv, c_inv] = 1.0 - score
    ri, ci = linear_sum_assignment(cost)
    labels[rows[ri[cost[ri, ci] < big]]] = 1
    return labels


# ============================================================================= simulated training sets


def _simulate(
    preset: str, seed: int, n_frames: int | None, overrides: Mapping[str, Any] | None
) -> Any:
    from somaflow.simulate import simulate

    kw = dict(overrides or {})
    if n_frames is not None:
        kw["n_frames"] = int(n_frames)
    kw.setdefault("motion", "none")
    return simulate(preset, int(seed), **kw)


def _sim_movie(sim: Any) -> xr.DataArray:
    return xr.DataArray(
        sim.movie,
        dims=("frame", "y", "x"),
        attrs={"fps": float(sim.meta["fps"]), "modality": sim.meta["modality"]},
    )


def _default_target(kind: str) -> str:
    return "centroid" if kind in ("convnet2p1d", "meanimage2d") else "union"


def _target(masks: np.ndarray, target: str) -> np.ndarray:
    if target == "union":
        return union_target(masks)
    if target == "separated":
        return union_target(masks, gap=1)
    if target == "centroid":
        return centroid_target(masks)
    raise ParameterError(f"target must be 'union', 'separated' or 'centroid', got {target!r}.")


def simulated_detector_set(
    kind: str,
    presets: Sequence[str],
    seeds: Sequence[int],
    *,
    crop: int = 64,
    n_crops: int = 16,
    rng: np.random.Generator | None = None,
    n_frames: int | None = None,
    batch_frames: int | None = None,
    target: str | None = None,
    cells: Literal["all", "active"] = "all",
    positive_fraction: float = 0.7,
    overrides: Mapping[str, Any] | None = None,
    jobs: int = 1,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Training examples for a detector from simulated sessions.

    Every (preset, seed) pair is simulated without motion
    (``somaflow.simulate.simulate(preset, seed, motion="none", ...)``) and
    prepared exactly as at inference:

    * ``stneuronet``, ``convnet2p1d`` — :func:`pixel_statistics` and
      :func:`detector_batch` of the whole movie with
      :meth:`DetectorInputParams.for_movie`; each example is a
      ``batch_frames``-frame window (binned frames) at a random start,
      cropped at random (zero-padded to ``batch_frames`` when the movie is
      shorter, and to a multiple of 4);
    * ``unet2d`` — :func:`summary_channels` of
      :func:`detection_summary_images`; ``meanimage2d`` —
      :func:`mean_channel` of them; crops of those.

    Parameters
    ----------
    kind : {"stneuronet", "convnet2p1d", "meanimage2d", "unet2d"}
    presets, seeds : sequence
        Every preset is simulated with every seed.
    crop : int
        Crop side (px).
    n_crops : int
        Crops per session.
    rng : numpy.random.Generator, optional
        Crop placement; default ``default_rng(0)``.
    n_frames : int, optional
        Override the presets' frame count (keeps sets small).
    batch_frames : int, optional
        Binned frames per example for the movie kinds (default 120).
    target : {"union", "separated", "centroid"}, optional
        Target per pixel; default ``union`` for STNeuroNet and the U-Net,
        ``centroid`` (4-px disks, Apthorpe et al.) for the (2+1)D and
        mean-image ConvNets.
    cells : {"all", "active"}
        Which true cells are targets: all (the ground truth the evaluation
        uses, silent cells included) or only firing ones — for the movie
        kinds the cells that spike within the example's frames (STNeuroNet's
        labels), for the image kinds those that spike at all.
    positive_fraction : float
        See :func:`random_crops`.
    overrides : mapping, optional
        More simulator parameter overrides (e.g. ``shape``, ``n_cells``).
    jobs : int
        Sessions prepared in parallel processes (1: in this process). Each
        session draws its crops from its own child of ``rng``, so the examples
        do not depend on ``jobs``.

    Returns
    -------
    X : numpy.ndarray
        float32: (N, T, crop, crop) for the movie kinds (the training loop
        adds the channel axis), (N, 4, crop, crop) for ``unet2d``,
        (N, 1, crop, crop) for ``meanimage2d``; N = sessions × n_crops.
    Y : numpy.ndarray
        (N, crop, crop) uint8 targets.
    stats : list of dict
        :func:`input_statistics` of every session (truth masks' SNR), plus
        ``preset``, ``seed`` and ``truth_median_snr`` (the simulator's own
        peak SNR); feed them to :func:`summarize_statistics`.
    """
    if kind not in DETECTOR_KINDS:
        raise ParameterError(
            f"unknown detector kind {kind!r}; use one of {', '.join(DETECTOR_KINDS)}."
        )
    if cells not in ("all", "active"):
        raise ParameterError(f"cells must be 'all' or 'active', got {cells!r}.")
    rng = rng if rng is not None else np.random.default_rng(0)
    target = target or _default_target(kind)
    sessions = [(str(p), int(s)) for p in presets for s in seeds]
    # one child generator per session: the same examples whether sessions run serially or in parallel
    spec = _CropSpec(target, cells, crop, n_crops, positive_fraction)
    jobs_args = [
        (kind, p, s, n_frames, overrides, batch_frames, spec, child)
        for (p, s), child in zip(sessions, rng.spawn(len(sessions)), strict=True)
    ]
    if jobs > 1 and len(sessions) > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        # spawn, not fork: the parent may hold torch / CUDA state and threads
        with cf.ProcessPoolExecutor(min(jobs, len(sessions)), mp_context=mp.get_context("spawn")) as ex:
            results = list(ex.map(_session_examples, *zip(*jobs_args, strict=True)))
    else:
        results = [_session_examples(*a) for a in jobs_args]
    xs = [r[0] for r in results]
    ys = [r[1] for r in results]
    return np.concatenate(xs), np.concatenate(ys), [r[2] for r in results]


@dataclass(frozen=True)
class _CropSpec:
    """What a training example is: target kind, which cells, crop side and count, positive share."""

    target: str
    cells: str
    crop: int
    n_crops: int
    positive_fraction: float


def _session_examples(
    kind: str,
    preset: str,
    seed: int,
    n_frames: int | None,
    overrides: Mapping[str, Any] | None,
    batch_frames: int | None,
    spec: _CropSpec,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Examples and statistics of one simulated session (see :func:`simulated_detector_set`)."""
    t0 = time.perf_counter()
    sim = _simulate(preset, seed, n_frames, overrides)
    movie = _sim_movie(sim)
    fps, modality, r = sim.meta["fps"], sim.meta["modality"], sim.meta["neuron_radius"]
    pstats = pixel_statistics(movie)
    masks = np.asarray(sim.masks, bool)
    if DETECTOR_KINDS[kind]:
        params = DetectorInputParams.for_movie(fps, modality, r)
        if batch_frames is not None:
            params = params.model_copy(update={"batch_frames": int(batch_frames)})
        x, y = _movie_examples(sim, movie, pstats, params, masks, spec, rng)
    else:
        images = detection_summary_images(movie, fps, modality, r)
        chans = summary_channels(images) if kind == "unet2d" else mean_channel(images)
        cells_used = masks if spec.cells == "all" else masks[np.asarray(sim.active, bool)]
        x, y = random_crops(
            chans, _target(cells_used, spec.target), spec.crop, spec.n_crops, rng,
            positive_fraction=spec.positive_fraction,
        )
    s = input_statistics(pstats, r, fps=fps, modality=modality, masks=masks, movie=movie)
    s.update(preset=str(preset), seed=int(seed), truth_median_snr=float(sim.meta["median_snr"]))
    log.info("%s examples from %s seed %d in %.1f s", kind, preset, seed, time.perf_counter() - t0)
    return x, y, s


def _movie_examples(
    sim: Any,
    movie: xr.DataArray,
    pstats: xr.Dataset,
    params: DetectorInputParams,
    masks: np.ndarray,
    spec: _CropSpec,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Spatio-temporal crops of one simulated session (see :func:`simulated_detector_set`)."""
    target, cells, crop, n_crops = spec.target, spec.cells, spec.crop, spec.n_crops
    det = detector_batch(np.asarray(movie.values), pstats, params)
    t_ex = params.batch_frames + (-params.batch_frames % params.pad_multiple)
    if det.shape[0] < t_ex:
        det = np.concatenate([det, np.zeros((t_ex - det.shape[0],) + det.shape[1:], np.float32)])
    k = params.factor
    spikes = np.asarray(sim.spikes)
    fixed = _target(masks, target) if cells == "all" else None
    xs = np.empty((n_crops, t_ex, crop, crop), np.float32)
    ys = np.empty((n_crops, crop, crop), np.uint8)
    for i in range(n_crops):
        t0 = int(rng.integers(0, det.shape[0] - t_ex + 1))
        if fixed is None:
            active = spikes[:, t0 * k : (t0 + params.batch_frames) * k].sum(axis=1) > 0
            y = (
                _target(masks[active], target)
                if active.any()
                else np.zeros(masks.shape[1:], np.uint8)
            )
        else:
            y = fixed
        x, yc = random_crops(
            det[t0 : t0 + t_ex], y, crop, 1, rng, positive_fraction=spec.positive_fraction
        )
        xs[i], ys[i] = x[0], yc[0]
    return xs, ys


@dataclass(frozen=True)
class CandidateSet:
    """Classifier examples: candidates a method found, labelled against ground truth.

    Iterating gives ``images, traces, windows, labels`` (so it unpacks as a
    4-tuple).

    Attributes
    ----------
    images : numpy.ndarray
        (N, 2, 92, 92) float32 :func:`cnet_input` (3CNet).
    traces : numpy.ndarray
        (N, L) float32 :func:`trace_vector` (the 3CNet+ trace branch).
    windows : list of numpy.ndarray
        N arrays (W_i, 100) of :func:`lstm_windows`; :func:`stack_windows`
        makes one array.
    labels : numpy.ndarray
        (N,) int64: 1 = matched a true cell (IoU ≥ 0.5, Hungarian).
    active : numpy.ndarray
        (N,) int64: 1 = matched a true cell that fires (the LSTM's label).
    session : numpy.ndarray
        (N,) int64 index into ``sessions`` (for splits by session).
    sessions : list of dict
        ``preset``, ``seed``, ``n_candidates``, ``n_truth``, ``method``.
    best_iou : numpy.ndarray
        (N,) float32, each candidate's highest IoU with any true cell (0 when
        it overlaps none): how far from the labels' 0.5 boundary it lies.
    evaluator_labels : numpy.ndarray
        (N,) int64: 1 = a true positive as :func:`somaflow.evaluate.evaluate`
        counts it (IoU ≥ 0.5 or exact containment; ``label_candidates(...,
        containment=1.0)``). Not used for training.
    """

    images: np.ndarray
    traces: np.ndarray
    windows: list[np.ndarray]
    labels: np.ndarray
    active: np.ndarray
    session: np.ndarray
    sessions: list[dict[str, Any]]
    best_iou: np.ndarray
    evaluator_labels: np.ndarray

    def __iter__(self) -> Iterator[Any]:
        return iter((self.images, self.traces, self.windows, self.labels))


def candidate_examples(
    footprints: np.ndarray,
    masks: np.ndarray,
    traces: np.ndarray,
    *,
    fps: float,
    trace_length: int = 512,
    window: int = 100,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Classifier inputs of N units: (N, 2, 92, 92), (N, trace_length), N × (W, window).

    Parameters
    ----------
    footprints : numpy.ndarray
        (N, H, W) the units' ROI images (footprints).
    masks : numpy.ndarray
        (N, H, W) bool, non-empty.
    traces : numpy.ndarray
        (N, T) their traces (``dff`` of a result).
    fps : float
        Frame rate of the traces (the LSTM windows are cut at 10 Hz).
    """
    masks = _check_masks(masks, "candidate_examples")
    traces = np.asarray(traces, np.float32)
    images = cnet_inputs(footprints, masks, traces)
    vectors = (
        trace_vector(traces, trace_length)
        if len(traces)
        else np.zeros((0, trace_length), np.float32)
    )
    windows = [lstm_windows(t, window, fps=fps) for t in traces]
    return images, vectors.astype(np.float32), windows


def simulated_candidate_set(
    presets: Sequence[str],
    seeds: Sequence[int],
    *,
    method: str = "cnmf",
    n_frames: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    iou: float = 0.5,
    trace_length: int = 512,
    window: int = 100,
) -> CandidateSet:
    """Classifier examples: the library's own extraction on simulated sessions.

    Each (preset, seed) is simulated without motion and run through
    :func:`somaflow.extract.find_units` with ``method`` and
    ``RunParams.for_movie`` defaults, on the summary images of the
    detection movie (:func:`detection_summary_images`), on dask's threaded
    scheduler. Every unit found — accepted or not — is a candidate: its ROI
    image is its footprint (for a method without footprints,
    :func:`masked_mean_images`, as at inference), its trace its ``dff``; labels come from
    :func:`label_candidates` against all true cells (``labels``) and against
    the firing ones (``active``).

    Parameters
    ----------
    presets, seeds : sequence
    method : {"cnmf", "local-maxima", "pca-ica"}
    n_frames : int, optional
        Override the presets' frame count.
    overrides : mapping, optional
        More simulator overrides.
    params : mapping, optional
        Run-parameter overrides (as ``somaflow run --params``) on top of the
        ``RunParams.for_movie`` defaults, e.g. ``{"cnmf": {"add_silent": False}}``.
    iou : float
        Matching threshold of a positive label.
    trace_length, window : int
        Lengths of :func:`trace_vector` and the :func:`lstm_windows`.

    Returns
    -------
    CandidateSet
        Unpacks as ``images, traces, windows, labels``.
    """
    from somaflow.extract import find_units
    from somaflow.params import RunParams

    imgs, vecs, wins, labels, active, session, sessions, best_iou, ev_labels = [], [], [], [], [], [], [], [], []
    for preset in presets:
        for seed in seeds:
            t0 = time.perf_counter()
            sim = _simulate(preset, seed, n_frames, overrides)
            fps, modality, r = sim.meta["fps"], sim.meta["modality"], sim.meta["neuron_radius"]
            movie = _sim_movie(sim).astype(np.float32)
            movie = movie.chunk({"frame": min(100, movie.sizes["frame"])})
            p = RunParams.for_movie(fps, modality, r, {**(params or {}), "method": method},
                                   shape=tuple(movie.shape))
            with dask.config.set(scheduler="threads"):
                images = detection_summary_images(movie, fps, modality, r)
                units, traces = find_units(movie, images, p)
            masks = np.asarray(units["masks"].values, bool)
            keep = masks.reshape(len(masks), -1).any(axis=1)
            masks = masks[keep]
            if "footprints" in units:
                fp = np.asarray(units["footprints"].values, np.float32)[keep]
            else:  # as classify.cnet.candidate_inputs does at inference
                fp = masked_mean_images(np.asarray(images["mean_image"].values, np.float32), masks)
            dff = np.asarray(traces["dff"].values, np.float32)[keep]
            im, vec, win = candidate_examples(
                fp, masks, dff, fps=fps, trace_length=trace_length, window=window
            )
            truth = np.asarray(sim.masks, bool)
            firing = np.asarray(sim.active, bool)
            imgs.append(im)
            vecs.append(vec)
            wins.extend(win)
            labels.append(label_candidates(masks, truth, iou=iou))
            best_iou.append(_best_iou(masks, truth))
            ev_labels.append(label_candidates(masks, truth, iou=iou, containment=1.0))
            active.append(label_candidates(masks, truth[firing], iou=iou))
            session.append(np.full(len(masks), len(sessions), np.int64))
            sessions.append(
                {
                    "preset": str(preset),
                    "seed": int(seed),
                    "method": method,
                    "n_candidates": int(len(masks)),
                    "n_truth": int(len(truth)),
                }
            )
            log.info(
                "%d %s candidates from %s seed %d (%d cells) in %.1f s",
                len(masks),
                method,
                preset,
                seed,
                int(labels[-1].sum()),
                time.perf_counter() - t0,
            )
    return CandidateSet(
        images=np.concatenate(imgs) if imgs else np.zeros((0, 2, CNET_SIZE, CNET_SIZE), np.float32),
        traces=np.concatenate(vecs) if vecs else np.zeros((0, trace_length), np.float32),
        windows=wins,
        labels=np.concatenate(labels) if labels else np.zeros(0, np.int64),
        active=np.concatenate(active) if active else np.zeros(0, np.int64),
        session=np.concatenate(session) if session else np.zeros(0, np.int64),
        sessions=sessions,
        best_iou=np.concatenate(best_iou) if best_iou else np.zeros(0, np.float32),
        evaluator_labels=np.concatenate(ev_labels) if ev_labels else np.zeros(0, np.int64),
    )


def _best_iou(candidate_masks: np.ndarray, truth_masks: np.ndarray) -> np.ndarray:
    """(N,) float32 highest IoU of each candidate with any true mask (0: overlaps none)."""
    from somaflow.evaluate import overlaps

    best = np.zeros(len(candidate_masks), np.float64)
    if len(candidate_masks) and len(truth_masks):
        ov = overlaps(candidate_masks, truth_masks)
        np.maximum.at(best, ov.pred, ov.iou)
    return best.astype(np.float32)


# ============================================================================= real labelled data


@dataclass(frozen=True)
class LabelledSession:
    """A real session with labelled cells, prepared as the detectors see it.

    Attributes
    ----------
    movie : xarray.DataArray
        (frame, y, x) lazy movie, attrs ``fps``, ``modality``.
    images : xarray.Dataset
        :func:`detection_summary_images`.
    channels : numpy.ndarray
        (4, H, W) float32 :func:`summary_channels`.
    masks : numpy.ndarray
        (N, H, W) bool labelled cells.
    target : numpy.ndarray
        (H, W) uint8 :func:`union_target`.
    fps, neuron_radius : float
    modality : str
    """

    movie: xr.DataArray
    images: xr.Dataset
    channels: np.ndarray
    masks: np.ndarray
    target: np.ndarray
    fps: float
    modality: str
    neuron_radius: float


def neurofinder_set(
    dataset_dir: str | Path,
    *,
    fps: float = 7.0,
    neuron_radius: float = 5.0,
    frames: slice | None = None,
) -> LabelledSession:
    """A Neurofinder-style folder (``movie.tif`` + ``regions.json``) as a labelled session.

    ``../shared/data/neurofinder_left`` is a registered 2p excerpt (600
    frames, 512 × 256 px) whose SOURCE.md says the frame rate was not
    recorded, about 7 Hz for the Neurofinder 00 sets (the default here, as
    in ``benchmarks/bench_real.py``); its regions are anatomical, so silent
    cells are included. The movie is read with the library's readers (no
    motion correction: Neurofinder movies are registered).

    Parameters
    ----------
    dataset_dir : str or Path
        Folder holding ``movie.tif`` and ``regions.json``.
    fps : float
        Frame rate (Hz).
    neuron_radius : float
        Soma radius (px).
    frames : slice, optional
        Use only these frames (e.g. a temporal split); default all.

    Returns
    -------
    LabelledSession
    """
    from somaflow.evaluate import masks_from_regions
    from somaflow.io.readers import open_input

    folder = Path(dataset_dir)
    movie_path, regions_path = folder / "movie.tif", folder / "regions.json"
    for path in (movie_path, regions_path):
        if not path.exists():
            raise InputError(
                f"{path} does not exist; a Neurofinder folder holds movie.tif and regions.json."
            )
    movie = open_input(str(movie_path))
    if frames is not None:
        movie = movie.isel(frame=frames)
    movie = movie.assign_attrs(fps=float(fps), modality="2p")
    try:
        regions = json.loads(regions_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{regions_path} is not valid JSON: {exc}") from exc
    masks, _, _ = masks_from_regions(regions, tuple(movie.shape[1:]), source=str(regions_path))
    images = detection_summary_images(movie, fps, "2p", neuron_radius)
    return LabelledSession(
        movie=movie,
        images=images,
        channels=summary_channels(images),
        masks=masks,
        target=union_target(masks),
        fps=float(fps),
        modality="2p",
        neuron_radius=float(neuron_radius),
    )


def result_labels(result_url: str) -> tuple[np.ndarray, np.ndarray]:
    """The units of a result zarr and a person's verdict on them.

    Parameters
    ----------
    result_url : str
        A complete result (``somaflow run``) whose ``accepted`` was edited.

    Returns
    -------
    masks : numpy.ndarray
        (N, H, W) bool.
    accepted : numpy.ndarray
        (N,) bool: True = a cell.

    Raises
    ------
    IncompleteResultError
        The result is unfinished.
    """
    from somaflow.io.schema import open_result

    ds = open_result(result_url)
    for name in ("masks", "accepted"):
        if name not in ds:
            raise InputError(f"{result_url} has no {name!r} variable; pass a somaflow result zarr.")
    return np.asarray(ds["masks"].values, bool), np.asarray(ds["accepted"].values, bool)


# ============================================================================= cache


def write_examples(
    url: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, overwrite: bool = False
) -> str:
    """Store example arrays (and what made them) as a zarr group, atomically.

    Written under a temporary name, moved into place, and marked
    ``complete`` last (:func:`somaflow.io.schema.write_dataset`), so a crash
    never leaves a cache that :func:`read_examples` would take.

    Parameters
    ----------
    url : str
        Any fsspec URL.
    arrays : mapping of str to numpy.ndarray
        Each stored as a variable of its own dims ``NAME_0, NAME_1, ...``,
        chunked along its first axis (≈ 64 MiB per chunk).
    meta : mapping
        JSON-serialisable description (recipe, presets, seeds, statistics).
    overwrite : bool
        Replace an existing cache.

    Returns
    -------
    str
        The normalized URL.

    Raises
    ------
    ResultExistsError
        ``url`` exists and ``overwrite`` is False.
    ParameterError
        ``meta`` is not JSON-serialisable or an array name is invalid.
    """
    from somaflow.io.schema import write_dataset

    try:
        meta_json = json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"write_examples: meta must be JSON-serialisable ({exc}).") from exc
    data_vars = {}
    for name, arr in arrays.items():
        if not name or "/" in name or name.startswith("."):
            raise ParameterError(f"write_examples: invalid array name {name!r}.")
        a = np.asarray(arr)
        dims = tuple(f"{name}_{i}" for i in range(a.ndim))
        var = xr.DataArray(a, dims=dims)
        if a.ndim and a.nbytes:
            per = max(1, int((64 << 20) // max(1, a.nbytes // max(1, a.shape[0]))))
            var = var.chunk({dims[0]: min(per, a.shape[0])})
        data_vars[name] = var
    ds = xr.Dataset(data_vars, attrs={"meta": meta_json, "kind": "somaflow-examples"})
    return write_dataset(ds, url, overwrite=overwrite)


def read_examples(url: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a cache written by :func:`write_examples`.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
    meta : dict

    Raises
    ------
    StoreError
        ``url`` does not exist.
    IncompleteResultError
        The cache is not marked complete (an interrupted write).
    """
    from somaflow.io import stores
    from somaflow.io.schema import is_complete, open_result

    if stores.exists(url) and not is_complete(url):
        raise IncompleteResultError(
            f"{url} is an incomplete example cache (an interrupted write); delete it and build it again."
        )
    ds = open_result(url)
    arrays = {name: np.asarray(ds[name].values) for name in ds.data_vars}
    return arrays, json.loads(ds.attrs.get("meta", "{}"))
