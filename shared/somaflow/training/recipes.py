"""Training recipes: which data, which settings, and how a checkpoint is made.

:func:`train_model` is what ``somaflow train MODEL`` runs. A recipe names the
simulator presets and seeds a model learns from (every preset with every
seed), the crop sizes and the optimiser settings; the shipped default weights
in ``somaflow/nn/weights/`` are exactly ``somaflow train MODEL --out
shared/somaflow/nn/weights/MODEL.safetensors`` with the defaults below (see
``benchmarks/train_weights.sh``).

Data sources (``--data``, repeatable):

* ``simulator`` — the recipe's presets and seeds (generated on the fly);
* a Neurofinder-style folder (``movie.tif`` + ``regions.json``) — real
  labelled cells, for the detectors;
* a result zarr whose ``accepted`` a person curated — real labels for the
  classifiers (every unit is a candidate, ``accepted`` is its label) and for
  the summary-image detectors (the accepted masks are the targets).

Fine-tuning is the same command with ``--init`` (a checkpoint or
``default``): training starts from those weights, with the recipe's
fine-tuning learning rate, and records both data recipes.

Detectors also get their probability threshold chosen for the best mean F1
on validation sessions (seeds the model did not train on; or the real
sessions themselves, when given), as STNeuroNet does; it is stored in the
checkpoint's ``metrics`` and used at inference unless overridden.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import xarray as xr

from somaflow.detect.cnn import CnnParams
from somaflow.detect.postprocess import PostprocessParams, choose_threshold, threshold_scores
from somaflow.errors import InputError, ParameterError
from somaflow.inference import tiled, weights_path
from somaflow.io import schema, stores
from somaflow.nn import build_model, load_checkpoint, save_checkpoint
from somaflow.nn.augment import random_crops
from somaflow.nn.features import candidate_examples, stack_windows
from somaflow.nn.images import mean_channel, summary_channels
from somaflow.nn.inputs import (
    DetectorInputParams,
    batch_plan,
    detector_movie,
    pad_batch,
    pixel_statistics,
)
from somaflow.nn.inputs import DetectorInputParams as _DetectorInputParams
from somaflow.nn.ood import input_statistics, summarize_statistics
from somaflow.nn.train import (
    TrainParams,
    resolve_device,
    train_classifier,
    train_detector,
    train_lstm,
)
from somaflow.simulate.presets import PRESETS
from somaflow.training.candidate_sets import simulated_candidate_set
from somaflow.training.detector_sets import (
    default_target,
    detection_summary_images,
    detector_target,
    sim_movie,
    simulate_session,
    simulated_detector_set,
)
from somaflow.training.labelled import neurofinder_set, read_examples, result_labels, write_examples

log = logging.getLogger(__name__)

TWO_P = ("2p-small", "2p-dense", "2p-lowsnr")
ONE_P = ("1p-small",)


@dataclass(frozen=True)
class Recipe:
    """The default data and settings of one model."""

    presets: tuple[str, ...]
    seeds: tuple[int, ...]
    val_seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    lr: float
    finetune_lr: float
    crop: int = 64
    n_crops: int = 32
    batch_frames: int | None = None
    n_frames: int | None = None
    target: str | None = None  # "union", "separated" (touching cells apart) or "centroid"; None: the kind's default
    config: dict[str, Any] = field(default_factory=dict)


#: training seeds start at 1000: far from the tests' (0-30) and the held-out benchmark seeds (100-102)
_IMAGE = Recipe(TWO_P + ONE_P, tuple(range(1000, 1008)), (1100, 1101), epochs=20, batch_size=16, lr=1e-3,
                finetune_lr=2e-4, n_crops=48)
_MOVIE = Recipe(TWO_P + ONE_P, tuple(range(1000, 1004)), (1100,), epochs=6, batch_size=4, lr=5e-4,
                finetune_lr=1e-4, crop=64, n_crops=24, batch_frames=32)
#: the classifiers learn from the candidates of 96 CNMF runs (4491 candidates; ~10 min of CNMF on 2 cores,
#: cached by --cache), then train in ~40 s on a GPU (~20 min on 2 CPU cores)
_CLASSIFIER = Recipe(TWO_P + ONE_P, tuple(range(1000, 1024)), (), epochs=20, batch_size=64, lr=1e-3,
                     finetune_lr=2e-4)
#: STNeuroNet and the U-Net learn "separated" targets (a 1-px gap between touching cells: the
#: post-processing's watershed then splits close pairs) from more sessions and epochs than the CPU
#: recipes above; sized for a GPU (each trained in ~6 min on one H100, see benchmarks/train_weights.sh)
RECIPES: dict[str, Recipe] = {
    "unet2d": replace(_IMAGE, seeds=tuple(range(1000, 1024)), epochs=80, batch_size=32, n_crops=64,
                      target="separated"),
    "meanimage2d": replace(_IMAGE, epochs=10),
    "stneuronet": replace(_MOVIE, seeds=tuple(range(1000, 1016)), val_seeds=(1100, 1101, 1102), epochs=40,
                          batch_size=16, lr=1e-3, n_crops=48, target="separated", config={"width": 16}),
    "convnet2p1d": _MOVIE,
    "3cnet": _CLASSIFIER,
    "3cnet-plus": _CLASSIFIER,
    "lstm": _CLASSIFIER,
}

#: binned frames per batch at inference; training crops are shorter
INFERENCE_BATCH_FRAMES: int = _DetectorInputParams.model_fields["batch_frames"].default

DETECTORS = ("stneuronet", "convnet2p1d", "unet2d", "meanimage2d")
MOVIE_KINDS = ("stneuronet", "convnet2p1d")
CLASSIFIERS = ("3cnet", "3cnet-plus", "lstm")


@dataclass
class Session:
    """One full-size labelled session for threshold selection / real-data training."""

    name: str
    inputs: np.ndarray  # (C, H, W) image channels, or (T, H, W) detector movie
    masks: np.ndarray  # (N, H, W) bool
    image: np.ndarray | None  # (H, W) correlation image for centroid-mode post-processing
    neuron_radius: float
    stats: dict[str, Any]


def _sim_session(kind: str, preset: str, seed: int, n_frames: int | None) -> Session:

    sim = simulate_session(preset, seed, n_frames, None)
    movie = sim_movie(sim)
    fps, modality, r = sim.meta["fps"], sim.meta["modality"], sim.meta["neuron_radius"]
    masks = np.asarray(sim.masks, bool)
    images = detection_summary_images(movie, fps, modality, r)
    return _session(kind, f"{preset}:{seed}", movie, images, masks, fps, modality, r)


def _session(
    kind: str,
    name: str,
    movie: xr.DataArray,
    images: xr.Dataset,
    masks: np.ndarray,
    fps: float,
    modality: str,
    r: float,
) -> Session:

    pstats = pixel_statistics(movie)
    if kind in MOVIE_KINDS:
        inputs = detector_movie(
            movie, pstats, DetectorInputParams.for_movie(fps, modality, r)
        )
    elif kind == "unet2d":
        inputs = summary_channels(images)
    else:
        inputs = mean_channel(images)
    stats = input_statistics(pstats, r, fps=fps, modality=modality, masks=masks, movie=movie)
    return Session(
        name, inputs, masks, np.asarray(images["mean_image"].values, np.float32), r, stats
    )


def _session_probability(model: Any, kind: str, s: Session, batch_frames: int) -> np.ndarray:
    """Full-session probability: (H, W), or (batches, H, W) for the movie kinds."""
    import torch


    def run(block: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = model(torch.from_numpy(np.ascontiguousarray(block, np.float32)))
        return torch.softmax(out, 1)[:, 1].numpy()


    tile, margin = (CnnParams.model_fields[k].default for k in ("tile", "margin"))  # as at inference
    if kind not in MOVIE_KINDS:
        return tiled(run, s.inputs[None], tile=tile, margin=margin)[0]
    # the inputs are binned already: batches of binned frames, split and padded as at inference
    plan = _DetectorInputParams(fps=1.0, bin_fps=None, batch_frames=batch_frames)
    probs = []
    for t0, t1 in batch_plan(s.inputs.shape[0], plan):
        b = pad_batch(s.inputs[t0:t1], plan.pad_multiple)
        probs.append(tiled(run, b[None, None], tile=tile, margin=margin)[0])
    return np.stack(probs) if kind == "stneuronet" else np.mean(probs, axis=0)


def _labelled_dirs(sources: Sequence[str]) -> list[str]:
    from pathlib import Path

    return [
        s
        for s in sources
        if s != "simulator" and Path(s).is_dir() and (Path(s) / "regions.json").exists()
    ]


def _result_sources(sources: Sequence[str]) -> list[str]:
    return [s for s in sources if s != "simulator" and s not in _labelled_dirs(sources)]


def train_model(
    model_name: str,
    out: str,
    *,
    data: Sequence[str] = ("simulator",),
    init: str | None = None,
    presets: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    n_frames: int | None = None,
    max_seconds: float | None = None,
    threads: int | None = None,
    cache: str | None = None,
    target: str | None = None,
    fps: float = 7.0,
    neuron_radius: float = 5.0,
    seed: int = 0,
    device: str = "auto",
    jobs: int = 1,
    batch_size: int | None = None,
    n_crops: int | None = None,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or fine-tune) ``model_name`` and write its checkpoint to ``out``.

    Parameters
    ----------
    model_name : str
        A key of :data:`RECIPES`.
    out : str
        Checkpoint path or URL (``.safetensors``); written atomically.
    data : sequence of str
        ``"simulator"``, Neurofinder-style folders, curated result zarrs.
    init : str, optional
        Start from these weights (``"default"`` = the shipped ones): fine-tuning.
    presets, seeds, epochs, lr, n_frames : optional
        Override the recipe.
    max_seconds : float, optional
        Stop training after this long (s).
    threads : int, optional
        torch CPU threads.
    target : {"union", "separated", "centroid"}, optional
        Detector target per pixel (default: the recipe's).
    cache : str, optional
        Folder/URL where simulated classifier candidates are kept (they take a
        CNMF run per session): reused by later runs with the same presets,
        seeds and frames, by every classifier.
    fps, neuron_radius : float
        Frame rate (Hz) and soma radius (px) of the Neurofinder folders.
    seed : int
        Seed of the crops, the split and the initial weights.
    device : str
        torch device of the optimisation (``"auto"``: a CUDA GPU when torch
        sees one, else the CPU); thresholds and the checkpoint are made on the CPU.
    jobs : int
        Simulated detector sessions prepared in parallel processes.
    batch_size, n_crops : int, optional
        Override the recipe (examples per step; crops per simulated session).
    config : dict, optional
        Model constructor arguments over the recipe's (e.g. ``{"width": 12}``);
        ignored when fine-tuning (``init``), whose checkpoint fixes them.

    Returns
    -------
    dict
        ``model``, ``out``, ``n_examples``, ``metrics`` (validation figures,
        ``threshold`` for detectors), ``seconds``.
    """

    if model_name not in RECIPES:
        raise ParameterError(f"unknown model {model_name!r}; use one of {', '.join(RECIPES)}.")
    resolve_device(device)  # a missing GPU is reported before any data is made
    recipe = RECIPES[model_name]
    if not data:
        raise ParameterError(
            "no training data: pass --data simulator and/or labelled folders / result zarrs."
        )
    presets = tuple(presets or recipe.presets)
    seeds = tuple(seeds if seeds is not None else recipe.seeds)
    t0 = time.perf_counter()
    if init is not None:

        model, init_meta = load_checkpoint(weights_path(model_name, init))
        config = (
            json.loads(init_meta.get("config", "{}"))
            if isinstance(init_meta.get("config"), str)
            else dict(init_meta.get("config") or {})
        )
    else:
        config = {**recipe.config, **(config or {})}
        import torch

        torch.manual_seed(seed)
        model = build_model(model_name, **config)
        init_meta = None
    params = TrainParams(
        epochs=epochs or recipe.epochs,
        batch_size=batch_size or recipe.batch_size,
        lr=lr or (recipe.finetune_lr if init else recipe.lr),
        seed=seed,
        threads=threads,
        max_seconds=max_seconds,
        device=device,
    )
    rng = np.random.default_rng(seed)
    use_sim = "simulator" in data
    dirs, results = _labelled_dirs(data), _result_sources(data)
    training: dict[str, Any] = {
        "data": list(data),
        "presets": list(presets) if use_sim else [],
        "seeds": list(seeds) if use_sim else [],
        "n_frames": n_frames or recipe.n_frames,
        "init": init,
        "params": params.model_dump(),
        "recipe": model_name,
        "target": target or recipe.target,
    }
    metrics: dict[str, Any] = {}
    session_stats: list[dict[str, Any]] = []

    if model_name in DETECTORS:
        movie_input = model_name in MOVIE_KINDS
        xs, ys = [], []
        if use_sim:
            x, y, st = simulated_detector_set(
                model_name,
                presets,
                seeds,
                crop=recipe.crop,
                n_crops=n_crops or recipe.n_crops,
                rng=rng,
                n_frames=n_frames or recipe.n_frames,
                batch_frames=recipe.batch_frames,
                target=target or recipe.target,
                jobs=jobs,
            )
            xs.append(x)
            ys.append(y)
            session_stats += st
        real: list[Session] = []
        for d in dirs:
            ls = neurofinder_set(d, fps=fps, neuron_radius=neuron_radius)
            real.append(
                _session(
                    model_name,
                    d,
                    ls.movie,
                    ls.images,
                    ls.masks,
                    ls.fps,
                    ls.modality,
                    ls.neuron_radius,
                )
            )
        for url in results:
            real.append(_result_session(model_name, url))
        for s in real:
            session_stats.append(s.stats)
            x, y = _real_crops(model_name, s, recipe, rng, target)
            xs.append(x)
            ys.append(y)
        if not xs:
            raise InputError(
                "no detector training examples: --data gave no simulator and no labelled sessions."
            )
        X, Y = np.concatenate(xs), np.concatenate(ys)
        log.info("%s: %d examples %s", model_name, len(X), X.shape[1:])
        hist = train_detector(model, X, Y, params, movie_input=movie_input)
        metrics.update(hist.final())
        # threshold for the best mean F1 on sessions the model did not train on (or the real ones)
        val = (
            [
                _sim_session(model_name, p, s, n_frames or recipe.n_frames)
                for p in presets
                for s in recipe.val_seeds
            ]
            if use_sim
            else []
        )
        val += real

        if val:
            model.eval()
            probs = [
                # the threshold is for inference, which sees whole batches of the inference length
                _session_probability(model, model_name, s, INFERENCE_BATCH_FRAMES) for s in val
            ]
            r = float(np.median([s.neuron_radius for s in val]))
            modality = val[0].stats.get("modality") or "2p"
            post = PostprocessParams.for_movie(10.0, modality, r)
            imgs = [s.image for s in val] if model_name in ("convnet2p1d", "meanimage2d") else None
            thr = choose_threshold(probs, [s.masks for s in val], post, images=imgs)
            f1 = threshold_scores(probs, [s.masks for s in val], post, [thr], images=imgs)[0]
            metrics.update(
                threshold=thr, val_session_f1=float(f1), val_sessions=[s.name for s in val]
            )
        n_examples = len(X)
    else:
        cands = []
        if use_sim:
            cands.append(_candidate_set(presets, seeds, n_frames or recipe.n_frames, cache, model_name))
            session_stats += cands[-1][4]
        for url in results:
            cands.append(_result_candidates(url, model_name))
        if not cands:
            raise InputError(
                "no classifier examples: pass --data simulator and/or curated result zarrs."
            )
        cands = [c[:4] for c in cands]
        images = np.concatenate([c[0] for c in cands])
        vectors = np.concatenate([c[1] for c in cands])
        windows = [w for c in cands for w in c[2]]
        labels = np.concatenate([c[3] for c in cands]).astype(np.int64)
        log.info("%s: %d candidates, %d positive", model_name, len(labels), int(labels.sum()))
        if model_name == "lstm":
            hist = train_lstm(model, stack_windows(windows, 20), labels, params)
        elif model_name == "3cnet":
            hist = train_classifier(model, images, labels, params)
        else:
            hist = train_classifier(model, (images[:, :1], vectors), labels, params)
        metrics.update(hist.final())
        metrics["positive_fraction"] = float(labels.mean())
        n_examples = len(labels)

    input_stats = summarize_statistics(session_stats) if session_stats else {}
    if init_meta is not None:
        training["init_training"] = init_meta.get("training")
    meta = {"training": training, "metrics": metrics, "input_stats": input_stats}
    save_checkpoint(model, out, model_name=model_name, config=config, metadata=meta, overwrite=True)
    return {
        "model": model_name,
        "out": out,
        "n_examples": int(n_examples),
        "metrics": metrics,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _candidate_set(presets: Sequence[str], seeds: Sequence[int], n_frames: int | None, cache: str | None,
                   model_name: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray,
                                             list[dict[str, Any]]]:
    """Simulated CNMF candidates (images, trace vectors, LSTM windows, labels, session stats),
    from ``cache`` when it holds the same recipe."""
    arrays, meta = candidate_arrays(presets, seeds, n_frames, cache)
    labels = arrays["active"] if model_name == "lstm" else arrays["labels"]
    stats = [{"modality": s.get("modality"), "n_frames": s.get("n_frames")} for s in meta["sessions"]]
    return arrays["images"], arrays["traces"], list(arrays["windows"]), np.asarray(labels, np.int64), stats


def candidate_arrays(presets: Sequence[str], seeds: Sequence[int], n_frames: int | None,
                     cache: str | None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The simulated CNMF candidate set as arrays (``images``, ``traces``, ``windows``, ``labels``,
    ``active``, ``best_iou``, ``evaluator_labels``; a cache written before the last two existed
    lacks them) and its meta,
    from ``cache`` when it holds the same recipe (else made, and kept there)."""
    import hashlib


    key = json.dumps({"presets": list(presets), "seeds": list(seeds), "n_frames": n_frames, "method": "cnmf"},
                     sort_keys=True)
    url = (stores.join(cache, "candidates-" + hashlib.blake2b(key.encode(), digest_size=8).hexdigest() + ".zarr")
           if cache else None)
    if url and schema.is_complete(url):
        arrays, meta = read_examples(url)
    else:
        cs = simulated_candidate_set(presets, seeds, n_frames=n_frames)
        windows = list(stack_windows(cs.windows))
        arrays = {"images": cs.images, "traces": cs.traces, "labels": cs.labels, "active": cs.active,
                  "best_iou": cs.best_iou, "evaluator_labels": cs.evaluator_labels,
                  "windows": np.stack(windows) if windows else np.zeros((0, 1, 100), np.float32)}
        meta = {"recipe": json.loads(key),
                "sessions": [{"modality": PRESETS[s["preset"]].modality, "preset": s["preset"], "seed": s["seed"],
                              "n_frames": n_frames or PRESETS[s["preset"]].n_frames} for s in cs.sessions]}
        if url:
            write_examples(url, arrays, meta, overwrite=True)
    return arrays, meta


def _real_crops(
    kind: str, s: Session, recipe: Recipe, rng: np.random.Generator, target_kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:

    target_kind = target_kind or recipe.target or default_target(kind)
    target = detector_target(s.masks, target_kind)
    n = recipe.n_crops * 4  # a real session is larger than a simulated one
    if kind in MOVIE_KINDS:
        T = recipe.batch_frames or 120
        xs, ys = [], []
        for _ in range(n):
            t0 = int(rng.integers(0, max(s.inputs.shape[0] - T, 0) + 1))
            block = s.inputs[t0 : t0 + T]
            if block.shape[0] < T:
                block = np.concatenate(
                    [block, np.zeros((T - block.shape[0],) + block.shape[1:], np.float32)]
                )
            x, y = random_crops(block, target, recipe.crop, 1, rng)
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)
    return random_crops(s.inputs, target, recipe.crop, n, rng)


def _result_session(kind: str, url: str) -> Session:
    """A curated result zarr as a labelled session (summary-image detectors only)."""

    if kind in MOVIE_KINDS:
        raise InputError(
            f"{url}: a result zarr holds no movie; train {kind} on Neurofinder-style folders "
            "(movie.tif + regions.json) or the simulator."
        )
    ds = schema.open_result(url)
    masks, accepted = result_labels(url)
    images = ds[
        [v for v in ("mean_image", "max_image", "correlation_image", "pnr_image") if v in ds]
    ].load()
    if "pnr_image" not in images:
        raise InputError(
            f"{url} has no pnr_image; rerun it with this somaflow version to train unet2d on it."
        )
    r = float(json.loads(ds.attrs.get("params", "{}")).get("neuron_radius", 5.0))
    inputs = summary_channels(images) if kind == "unet2d" else mean_channel(images)
    stats = {"neuron_radius": r, "modality": ds.attrs.get("modality"), "fps": ds.attrs.get("fps")}
    return Session(
        url, inputs, masks[accepted], np.asarray(images["mean_image"].values, np.float32), r, stats
    )


def _result_candidates(
    url: str, model_name: str
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Every unit of a curated result as a classifier example, labelled by ``accepted``."""

    ds = schema.open_result(url)
    masks, accepted = result_labels(url)
    keep = masks.reshape(len(masks), -1).any(axis=1)
    images, vectors, windows = candidate_examples(
        np.asarray(ds["footprints"].values, np.float32)[keep],
        masks[keep],
        np.asarray(ds["dff"].values, np.float32)[keep],
        fps=float(ds.attrs["fps"]),
    )
    return images, vectors, windows, accepted[keep].astype(np.int64)
