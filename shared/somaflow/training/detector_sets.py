"""Detector training sets from the simulator: :func:`simulated_detector_set`
(movie or summary-image inputs with their targets, cropped), and
:func:`detection_summary_images` (the session's summary images of the
detection movie).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from somaflow.errors import ParameterError
from somaflow.frames import check_movie
from somaflow.nn.augment import random_crops
from somaflow.nn.images import mean_channel, summary_channels
from somaflow.nn.inputs import DetectorInputParams, detector_batch, pixel_statistics
from somaflow.nn.ood import input_statistics
from somaflow.nn.targets import centroid_target, union_target
from somaflow.params import RunParams
from somaflow.preprocess.pipeline import detection_movie
from somaflow.preprocess.summary import summary_images
from somaflow.simulate import simulate

log = logging.getLogger(__name__)


#: detector kinds :func:`simulated_detector_set` builds, and whether their input is a movie
DETECTOR_KINDS: dict[str, bool] = {
    "stneuronet": True,
    "convnet2p1d": True,
    "meanimage2d": False,
    "unet2d": False,
}


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

    check_movie(movie, "detection_summary_images", min_frames=2, why=" to estimate the noise")
    p = RunParams.for_movie(fps, modality, neuron_radius, shape=tuple(movie.shape))
    return summary_images(
        detection_movie(movie.assign_attrs(fps=float(fps)), p.preprocess), p.summary
    ).compute()


def simulate_session(
    preset: str, seed: int, n_frames: int | None, overrides: Mapping[str, Any] | None
) -> Any:

    kw = dict(overrides or {})
    if n_frames is not None:
        kw["n_frames"] = int(n_frames)
    kw.setdefault("motion", "none")
    return simulate(preset, int(seed), **kw)


def sim_movie(sim: Any) -> xr.DataArray:
    return xr.DataArray(
        sim.movie,
        dims=("frame", "y", "x"),
        attrs={"fps": float(sim.meta["fps"]), "modality": sim.meta["modality"]},
    )


def default_target(kind: str) -> str:
    return "centroid" if kind in ("convnet2p1d", "meanimage2d") else "union"


def detector_target(masks: np.ndarray, target: str) -> np.ndarray:
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
    target = target or default_target(kind)
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
    sim = simulate_session(preset, seed, n_frames, overrides)
    movie = sim_movie(sim)
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
            chans, detector_target(cells_used, spec.target), spec.crop, spec.n_crops, rng,
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
    fixed = detector_target(masks, target) if cells == "all" else None
    xs = np.empty((n_crops, t_ex, crop, crop), np.float32)
    ys = np.empty((n_crops, crop, crop), np.uint8)
    for i in range(n_crops):
        t0 = int(rng.integers(0, det.shape[0] - t_ex + 1))
        if fixed is None:
            active = spikes[:, t0 * k : (t0 + params.batch_frames) * k].sum(axis=1) > 0
            y = (
                detector_target(masks[active], target)
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

