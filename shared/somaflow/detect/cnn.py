"""CNN detectors: STNeuroNet, the (2+1)D ConvNet and its mean-image variant, the 2D U-Net.

:func:`detect_cnn` turns a corrected movie (or its summary images) into units
with the same schema as every other method. The networks run through an
:class:`~somaflow.inference.InferenceBackend` (in-process CPU by default), so
this module does not import torch.

* ``stneuronet`` — the movie is background-compensated, whitened and binned
  (:mod:`somaflow.nn.inputs`), cut into non-overlapping batches of
  ``batch_frames``; each batch gives a probability map (one Dask task per
  batch, tiled in space), masks per batch (threshold, watershed, minimum
  area), and the masks of all batches are fused (STNeuroNet's neuron fusion).
* ``convnet2p1d`` — the same batches; the per-batch centroid probability maps
  are averaged, thresholded into markers and grown on the correlation image
  (Apthorpe's post-processing).
* ``unet2d`` / ``meanimage2d`` — one forward pass on the summary images
  (mean, max, correlation, PNR) or the mean image.

Every map is the mean over ``tta`` views of the network's input (rotations by
k × 90°, see :func:`somaflow.inference.dihedral_mean`), each turned back:
test-time augmentation with the transforms the networks were trained with
(default :data:`DEFAULT_TTA`: 4 views, 1 for the (2+1)D ConvNet).

Each checkpoint records the threshold chosen for the best F1 on its training
data and the statistics of its training inputs; when this movie's statistics
fall outside them the units carry an ``ood_warnings`` attr.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.core import flatten
from dask.optimization import cull
from pydantic import BaseModel, ConfigDict, Field, field_validator

from somaflow.detect.postprocess import (
    PostprocessParams,
    fuse_batches,
    masks_from_centroids,
    probability_to_masks,
    units_from_masks,
)
from somaflow.evaluate.matching import SparseMasks, as_sparse
from somaflow.inference import TTA_COUNTS, get_backend, tiled_views
from somaflow.nn.images import mean_channel, summary_channels
from somaflow.nn.inputs import (
    DetectorInputParams,
    batch_plan,
    compensate,
    pixel_statistics,
)
from somaflow.nn.ood import detection_rate, input_statistics, out_of_distribution
from somaflow.preprocess.temporal import sum_bins

log = logging.getLogger(__name__)

#: detectors by input: a movie (time batches) or summary images
MOVIE_DETECTORS = ("stneuronet", "convnet2p1d")
IMAGE_DETECTORS = ("unet2d", "meanimage2d")
DETECTORS = MOVIE_DETECTORS + IMAGE_DETECTORS
#: detectors whose map is a whole-neuron probability (probability_to_masks); the others mark centroids
WHOLE_NEURON_DETECTORS = ("stneuronet", "unet2d")
#: test-time augmentation views per model when ``CnnParams.tta`` is None, chosen on validation seeds
#: 1100-1102 (bench_accuracy.py, F1 with 1 / 4 views): STNeuroNet 2p-dense 0.855 / 0.865, 2p-nonrigid
#: 0.910 / 0.934, 2p-lowsnr 0.966 / 0.957, 2p-small 0.967 / 0.967; U-Net 2p-dense 0.844 / 0.858,
#: 2p-small 0.986 / 0.981; mean-image ConvNet (markers grown on the mean image) 2p-small 0.903 / 0.937,
#: 2p-dense 0.590 / 0.583, 2p-nonrigid 0.910 / 0.894; the (2+1)D ConvNet loses with 4 (2p-small
#: 0.851 / 0.815, 2p-dense 0.589 / 0.556, 2p-nonrigid 0.868 / 0.865)
DEFAULT_TTA: dict[str, int] = {"stneuronet": 4, "unet2d": 4, "meanimage2d": 4, "convnet2p1d": 1}
#: radius (px) of the centroid disks the (2+1)D and mean-image ConvNets are trained on
CENTROID_RADIUS = 4.0


class CnnParams(BaseModel):
    """CNN detection and classification settings of a run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inference: str = Field("local", exclude=True,
                           description="where models run: 'local' (in-process) or the inference service's "
                                       "http://HOST:PORT; a deployment choice, not a result parameter: left out "
                                       "of dumps, so of stage hashes and recorded parameters")
    weights: dict[str, str] = Field(
        default_factory=dict,
        description="model name -> checkpoint path/URL; models not listed use their shipped 'default' weights",
    )
    threshold: float | None = Field(
        None, gt=0, lt=1, description="neuron-probability threshold (default: the checkpoint's, chosen for best "
                                      "F1 on its training data)")
    tile: int = Field(256, ge=32, description="spatial tile core size for inference (px)")
    margin: int = Field(24, ge=0, description="context around each tile (px); ≥ the receptive-field radius")
    tta: int | None = Field(
        None, description="test-time augmentation: average the detector's map over this many rotations/flips of "
                          "its input (1, 2, 4 or 8; costs as many forward passes); None: the model's default "
                          "(DEFAULT_TTA)")
    input: DetectorInputParams
    postprocess: PostprocessParams
    classifier: str = Field("none", pattern="^(none|3cnet|3cnet-plus)$",
                            description="cell/not-cell classifier folded into score and accepted")
    classifier_threshold: float = Field(0.5, gt=0, lt=1, description="classifier probability needed to accept a unit")
    ood_check: bool = Field(True, description="warn when the inputs look unlike the models' training data")

    @field_validator("tta")
    @classmethod
    def _tta(cls, v: int | None) -> int | None:
        if v is not None and v not in TTA_COUNTS:
            raise ValueError(f"tta must be one of {', '.join(map(str, TTA_COUNTS))}")
        return v

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> CnnParams:
        """Defaults for a movie; distances scale with ``neuron_radius`` (px)."""
        post = PostprocessParams.for_movie(fps, modality, neuron_radius)
        # the centroid-mode models learn 4-px disks whatever the neuron size (Apthorpe et al.;
        # somaflow.nn.targets.centroid_target)
        post = post.model_copy(update={"marker_radius": CENTROID_RADIUS,
                                       "min_marker_area": 0.25 * np.pi * CENTROID_RADIUS**2})
        return cls(input=DetectorInputParams.for_movie(fps, modality, neuron_radius), postprocess=post)

    def weights_for(self, model: str) -> str:
        """The weights reference of ``model``."""
        return self.weights.get(model, "default")

    def views(self, model: str) -> int:
        """Test-time augmentation views of ``model``: ``tta``, or the model's default."""
        return self.tta if self.tta is not None else DEFAULT_TTA.get(model, 1)


def _threshold(p: CnnParams, meta: dict[str, Any]) -> float:
    if p.threshold is not None:
        return p.threshold
    metrics = _json(meta.get("metrics"))
    return float(metrics.get("threshold", 0.5)) if isinstance(metrics, dict) else 0.5


def _second_pass(post: PostprocessParams, stats: xr.Dataset, meta: dict[str, Any], method: str) -> PostprocessParams:
    """``post`` without its second pass when the movie's noise level is outside the model's training range.

    The second pass trusts the network's grey probability, which marks crowded cells only on inputs
    like the training data. On Neurofinder 00 (noise level 0.72, training range 0.025-0.24) the shipped
    STNeuroNet finds 464 masks for 196 cells with it (F1 0.091) and 156 without (0.142).
    """
    if post.rescue_threshold is None:
        return post
    now = {"noise_level": input_statistics(stats, post.neuron_radius)["noise_level"]}
    outside = out_of_distribution(now, _json(meta.get("input_stats")) or {})
    if not outside:
        return post
    # the cause is in the units' ood_warnings, the skip in their "cnn" attr (rescue_threshold null)
    log.info("%s: no second pass at probability %.2g: %s", method, post.rescue_threshold, outside[0])
    return post.model_copy(update={"rescue_threshold": None})


def _json(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _predict_image(model: str, weights: str, x: np.ndarray, p: CnnParams) -> np.ndarray:
    backend = get_backend(p.inference)
    return tiled_views(lambda b: backend.predict(model, weights, b), x, tile=p.tile, margin=p.margin,
                       views=p.views(model))


def _predict_batch(model: str, weights: str, batch: np.ndarray, p: CnnParams) -> np.ndarray:
    """(T, H, W) whitened batch -> (H, W) probability, tiled in space, averaged over the model's views."""
    backend = get_backend(p.inference, threads=1)
    return tiled_views(lambda b: backend.predict(model, weights, b), batch[None], tile=p.tile, margin=p.margin,
                       views=p.views(model))


#: raw frames read, binned and prepared at a time in a batch task (float32 bytes)
_PIECE_BYTES = 32 << 20


class _Frames:
    """A batch's raw frames, a dask slice handed to its task un-computed.

    Dask computes every collection passed to ``delayed`` into one in-memory argument; wrapped in this
    holder the slice travels as its (culled) graph instead, which for a movie on a store is only the
    readers of its chunks, and the task reads it a chunk at a time (:func:`_batch_input`). Array-like:
    ``shape``, slicing (lazy) and ``numpy.asarray`` (reads it all).
    """

    def __init__(self, frames: da.Array) -> None:
        # only the tasks these frames need (dask.optimize keeps whole layers, e.g. every chunk of a
        # concatenation)
        graph, _ = cull(dict(frames.__dask_graph__()), list(flatten(frames.__dask_keys__())))
        self.frames = da.Array(graph, frames.name, frames.chunks, meta=frames._meta)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.frames.shape)

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        return self.frames.chunks

    def __getitem__(self, key: Any) -> Any:
        return self.frames[key]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.asarray(_read(self.frames, 0, self.shape[0]), dtype)


def _read(frames: Any, a: int, b: int) -> np.ndarray:
    """Frames ``[a, b)`` of a numpy or dask array, in memory (a dask slice computed in this thread: a
    task reading its own frames, not a nested submission to the cluster)."""
    piece = frames[a:b]
    if isinstance(piece, da.Array):
        piece = piece.compute(scheduler="sync")
    return np.asarray(piece)


def _batch_input(frames: Any, stats: xr.Dataset, params: DetectorInputParams) -> np.ndarray:
    """The detector input of a batch's (T, H, W) raw frames, read and prepared piece by piece.

    Equal to ``pad_batch(detector_batch(frames, stats, params), params.pad_multiple)``: binning starts
    at the first frame and every later step works frame by frame, so preparing the frames by pieces
    of whole bins changes nothing. Memory: the (padded) binned batch, one chunk of raw frames (each
    read once; frames of a bin cut by a chunk boundary are carried over to the next) and one piece
    of ``_PIECE_BYTES`` in float32.
    """
    n, h, w = (int(v) for v in frames.shape)
    if n == 0:
        raise ValueError("a detector batch needs at least one frame")
    k = params.factor
    n_bins = -(-n // k)
    out = np.zeros((n_bins + (-n_bins % params.pad_multiple), h, w), np.float32)
    step = max(k, _PIECE_BYTES // (4 * h * w) // k * k)
    chunks = getattr(frames, "chunks", None)
    edges = np.cumsum((0,) + tuple(chunks[0])) if chunks else np.arange(0, n + step, step).clip(max=n)
    carry: np.ndarray | None = None
    done = 0  # raw frames binned so far (a multiple of k)
    for c0, c1 in zip(edges[:-1], edges[1:], strict=True):
        raw = _read(frames, int(c0), int(c1))
        if carry is not None and len(carry):
            raw = np.concatenate([carry, raw])
        usable = len(raw) if c1 >= n else len(raw) // k * k
        for a in range(0, usable, step):
            b = min(usable, a + step)
            i = (done + a) // k
            binned = compensate(sum_bins(raw[a:b], k), stats, params)
            out[i:i + len(binned)] = binned
        done += usable
        carry = raw[usable:]
        del raw
    return out


def _batch_task(model: str, weights: str, frames: Any, stats: xr.Dataset, p: CnnParams,
                post: PostprocessParams | None) -> _BatchResult:
    """One temporal batch: its probability map and, with ``post``, its masks (sparse).

    ``frames``: the batch's (T, H, W) raw frames: a numpy array, a dask slice ``movie.data[start:stop]``
    or its :class:`_Frames` holder, read a chunk at a time (:func:`_batch_input`), so the task reads
    only its own frames and holds one chunk of them at a time.
    """
    batch = _batch_input(frames, stats, p.input)
    prob = _predict_batch(model, weights, batch, p)
    del batch
    masks = [as_sparse(probability_to_masks(prob, post))] if post is not None else []
    return _BatchResult(masks, prob, 1)


@dataclass(frozen=True)
class _BatchResult:
    """Masks of ``count`` batches, in batch order, and their probability maps reduced to one."""

    masks: list[SparseMasks]
    prob: np.ndarray
    count: int


def _combine(a: _BatchResult, b: _BatchResult, op: Any) -> _BatchResult:
    return _BatchResult(a.masks + b.masks, op(a.prob, b.prob), a.count + b.count)


def _reduce_batches(tasks: list[Any], op: Any) -> _BatchResult:
    """Combine the batch tasks pairwise on the cluster with ``op`` on their maps (``np.maximum``,
    ``np.add``): the client receives one result, whatever the number of batches (a long movie's
    probability maps are never all held at once)."""
    level = list(tasks)
    while len(level) > 1:
        level = [dask.delayed(_combine)(level[i], level[i + 1], op) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
    return level[0].compute()


def detect_cnn(movie: xr.DataArray, images: xr.Dataset, method: str, p: CnnParams,
               neuron_radius: float) -> xr.Dataset:
    """Units found by the CNN detector ``method``.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) motion-corrected movie, dask-backed (not loaded).
    images : xarray.Dataset
        Summary images (``mean_image``, ``max_image``, ``correlation_image``,
        ``pnr_image``), (y, x).
    method : str
        One of :data:`DETECTORS`.
    p : CnnParams
    neuron_radius : float
        Soma radius (px), for the out-of-distribution check.

    Returns
    -------
    xarray.Dataset
        ``masks`` (unit, y, x) bool, ``score``, ``accepted`` (unit), and
        ``cnn_probability`` (y, x); attrs ``ood_warnings`` (JSON list) and
        ``cnn`` (model, weights, threshold, test-time views, second-pass
        threshold).
    """
    if method not in DETECTORS:
        raise ValueError(f"unknown detector {method!r}; use one of {', '.join(DETECTORS)}")
    weights = p.weights_for(method)
    backend = get_backend(p.inference)
    meta = backend.metadata(method, weights)
    thr = _threshold(p, meta)
    stats = pixel_statistics(movie, max_frames=p.input.stats_frames)
    post = p.postprocess.model_copy(update={"threshold": thr})
    # the second pass is a step of whole-neuron maps only; centroid maps grow their markers instead
    post = (_second_pass(post, stats, meta, method) if method in WHOLE_NEURON_DETECTORS
            else post.model_copy(update={"rescue_threshold": None}))
    if method in IMAGE_DETECTORS:
        x = summary_channels(images) if method == "unet2d" else mean_channel(images)
        prob = _predict_image(method, weights, x, p)
        masks = (probability_to_masks(prob, post) if method in WHOLE_NEURON_DETECTORS
                 else masks_from_centroids(prob, np.asarray(images["mean_image"].values, np.float32), post))
    else:
        starts = batch_plan(int(movie.sizes["frame"]), p.input)
        # STNeuroNet's per-batch post-processing runs in the batch's task
        per_batch = post if method == "stneuronet" else None
        # each task gets the dask slice of its frames un-computed, never the whole movie nor its batch in
        # one piece (dask would compute a collection handed to delayed into the task's argument): it reads
        # them a chunk at a time
        data = movie.data
        wrap = _Frames if isinstance(data, da.Array) else np.asarray
        # the (y, x) statistics once, as one key every batch task depends on (not a copy per task)
        shared = dask.delayed(stats, pure=True)
        tasks = [dask.delayed(_batch_task)(method, weights, wrap(data[s:e]), shared, p, per_batch)
                 for s, e in starts]
        res = _reduce_batches(tasks, np.maximum if method == "stneuronet" else np.add)
        log.info("%s: %d batches of %d frames", method, res.count, p.input.batch_frames)
        if method == "stneuronet":
            masks = fuse_batches(res.masks, post)
            prob = res.prob
        else:
            prob = (res.prob / res.count).astype(np.float32)
            masks = masks_from_centroids(prob, np.asarray(images["mean_image"].values, np.float32), post)
    units = units_from_masks(masks, prob)
    warnings: list[str] = []
    if p.ood_check:
        now = input_statistics(stats, neuron_radius, movie=movie,
                               masks=np.asarray(units["masks"].values, bool) if units.sizes["unit"] else None)
        # the image models see summary images of the binned movie: judge its rate, not the raw one
        rate = (functools.partial(detection_rate, modality=now.get("modality") or "2p")
                if method in IMAGE_DETECTORS else None)
        warnings = out_of_distribution(now, _json(meta.get("input_stats")) or {}, rate=rate)
        for w in warnings:  # returned in the ood_warnings attr: the caller reports them
            log.info("%s: %s", method, w)
    units.attrs["ood_warnings"] = json.dumps(warnings)
    units.attrs["cnn"] = json.dumps({"model": method, "weights": weights, "threshold": thr, "views": p.views(method),
                                     "rescue_threshold": post.rescue_threshold})
    return units
