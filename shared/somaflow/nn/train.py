"""Training loops for the detectors and classifiers, on numpy example arrays.

The example arrays come from :mod:`somaflow.training` (simulator sessions,
Neurofinder labels, result zarrs a person curated); these loops only batch,
augment, optimise and validate. Everything is seeded, so a recipe reproduces
its weights on the same machine (up to float non-associativity across thread
counts).

* :func:`train_detector` — pixel-wise detectors (``stneuronet``,
  ``convnet2p1d``, ``meanimage2d``, ``unet2d``): soft Dice loss on the neuron
  class plus a small cross-entropy term that keeps early training stable,
  Adam, random 90° rotations and flips.
* :func:`train_classifier` — ``3cnet`` / ``3cnet-plus``: multiclass hinge loss
  (the paper's SVM loss), Adam, class-balanced sampling.
* :func:`train_lstm` — the LSTM seed classifier: binary cross-entropy.

Each returns a :class:`History` with the per-epoch training loss and the
validation metrics on a held-out fraction of the examples.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from somaflow.errors import ParameterError
from somaflow.nn import losses
from somaflow.nn.augment import augment

log = logging.getLogger(__name__)

#: the torch devices a training run accepts: auto, cpu, cuda, cuda:N
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


class TrainParams(BaseModel):
    """Optimisation settings of one training (or fine-tuning) run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(20, ge=1, description="passes over the training examples")
    batch_size: int = Field(8, ge=1, description="examples per optimiser step")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate (STNeuroNet: 5e-4; 3CNet: 1e-3)")
    weight_decay: float = Field(0.0, ge=0, description="Adam L2 weight decay")
    val_fraction: float = Field(
        0.15, ge=0, lt=0.9, description="fraction of examples held out for validation"
    )
    augment: bool = Field(
        True, description="random 90° rotations and flips (detectors; 3CNet image channel)"
    )
    ce_weight: float = Field(
        0.3, ge=0, description="weight of the cross-entropy term added to the Dice loss"
    )
    seed: int = Field(
        0, description="seed of the example split, the sampling and the initial weights"
    )
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads (default: torch's choice)"
    )
    max_seconds: float | None = Field(None, gt=0, description="stop after this much wall time (s)")
    device: str = Field(
        "auto", pattern=f"^({DEVICE_PATTERN})$",
        description="torch device: 'auto' (a CUDA GPU when there is one, else the CPU), 'cpu', 'cuda[:N]'",
    )


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device of ``device`` (``"auto"``: the first CUDA GPU if there is one, else the CPU).

    Raises
    ------
    ParameterError
        Not one of those names, or a CUDA device was asked for and torch sees none.
    """
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ParameterError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParameterError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu.")
    return torch.device(device)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@dataclass
class History:
    """What happened during training: per-epoch loss and validation metrics."""

    loss: list[float] = field(default_factory=list)
    val: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    n_train: int = 0
    n_val: int = 0
    stopped_early: bool = False

    def final(self) -> dict[str, Any]:
        """The last epoch's figures, for checkpoint metadata."""
        out: dict[str, Any] = {
            "epochs": len(self.loss),
            "train_loss": self.loss[-1] if self.loss else None,
            "seconds": round(self.seconds, 1),
            "n_train": self.n_train,
            "n_val": self.n_val,
        }
        if self.val:
            out.update({f"val_{k}": v for k, v in self.val[-1].items()})
        return out


def _split(n: int, params: TrainParams, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_val = int(round(n * params.val_fraction)) if n >= 4 else 0
    return order[n_val:], order[:n_val]


def _setup(
    model: torch.nn.Module, params: TrainParams
) -> tuple[torch.optim.Optimizer, np.random.Generator]:
    if params.threads:
        torch.set_num_threads(params.threads)
    torch.manual_seed(params.seed)
    dev = resolve_device(params.device)
    model.to(dev)
    if dev.type == "cuda":
        log.info("training on %s (%s)", dev, torch.cuda.get_device_name(dev))
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    return opt, np.random.default_rng(params.seed)


def _tensor(x: np.ndarray, device: torch.device, dtype: Any = np.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype)).to(device, non_blocking=True)


def _as_input(
    x: np.ndarray | tuple[np.ndarray, ...], device: torch.device | None = None
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    dev = device or torch.device("cpu")
    if isinstance(x, tuple):
        return tuple(_tensor(v, dev) for v in x)
    return _tensor(x, dev)


def _detector_tensor(x: np.ndarray, movie: bool, device: torch.device | None = None) -> torch.Tensor:
    t = _tensor(x, device or torch.device("cpu"))
    return t.unsqueeze(1) if movie else t


def dice_score(prob: np.ndarray, target: np.ndarray, threshold: float = 0.5) -> float:
    """Hard Dice coefficient of ``prob > threshold`` against a {0, 1} target (1.0 if both are empty)."""
    p = prob > threshold
    t = target > 0
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


def train_detector(
    model: torch.nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    params: TrainParams,
    *,
    movie_input: bool,
) -> History:
    """Train a pixel-wise detector in place.

    Parameters
    ----------
    model : torch.nn.Module
        A detector from :data:`somaflow.nn.MODELS`; logits ``(B, 2, H, W)``.
    x : ndarray
        Examples: ``(N, T, H, W)`` movie crops when ``movie_input`` (a channel
        axis is added), else ``(N, C, H, W)`` image channels; float32.
    y : ndarray, (N, H, W) uint8
        Targets: 1 on neuron (or centroid) pixels.
    params : TrainParams
    movie_input : bool
        Whether ``x`` holds movie crops (STNeuroNet, (2+1)D ConvNet).

    Returns
    -------
    History
        Per-epoch loss, validation Dice and soft-Dice loss.
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"need as many targets as examples (got {len(x)} and {len(y)}), at least one"
        )
    opt, rng = _setup(model, params)
    train, val = _split(len(x), params, rng)

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        xb, yb = x[idx], y[idx]
        if params.augment:
            pairs = [augment(xi, yi, rng) for xi, yi in zip(xb, yb, strict=True)]
            xb = np.stack([p[0] for p in pairs])
            yb = np.stack([p[1] for p in pairs])
        dev = _device_of(model)
        logits = model(_detector_tensor(xb, movie_input, dev))
        target = _tensor(yb, dev, np.int64)
        loss = losses.dice_loss(logits, target)
        if params.ce_weight:
            loss = loss + params.ce_weight * torch.nn.functional.cross_entropy(logits, target)
        return loss

    return _fit(model, opt, rng, params, train, val, batch_loss,
                lambda v: _validate_detector(model, x[v], y[v], movie_input, params.batch_size))


def _fit(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    params: TrainParams,
    train: np.ndarray,
    val: np.ndarray,
    batch_loss: Any,
    validate: Any,
    sample_p: np.ndarray | None = None,
) -> History:
    """The epoch loop every model shares: sample batches of ``train`` (uniformly without
    replacement, or with replacement by ``sample_p``), step on ``batch_loss(idx)``, run
    ``validate(val)`` after each epoch, stop early after ``params.max_seconds``."""
    hist = History(n_train=len(train), n_val=len(val))
    t0 = time.perf_counter()
    steps = math.ceil(len(train) / params.batch_size)
    size = min(params.batch_size, len(train))
    for epoch in range(params.epochs):
        model.train()
        total = 0.0
        for _ in range(steps):
            idx = (rng.choice(train, size=size, replace=False) if sample_p is None
                   else rng.choice(train, size=size, replace=True, p=sample_p))
            loss = batch_loss(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        hist.loss.append(total / steps)
        if len(val):
            hist.val.append(validate(val))
        log.info("epoch %d/%d: loss %.4f %s", epoch + 1, params.epochs, hist.loss[-1],
                 hist.val[-1] if hist.val else "")
        if params.max_seconds and time.perf_counter() - t0 > params.max_seconds:
            hist.stopped_early = epoch + 1 < params.epochs
            break
    hist.seconds = time.perf_counter() - t0
    model.eval()
    model.cpu()  # checkpoints, thresholds and inference are on the CPU
    return hist


@torch.no_grad()
def predict_detector(
    model: torch.nn.Module, x: np.ndarray, *, movie_input: bool, batch_size: int = 4
) -> np.ndarray:
    """Neuron probability ``(N, H, W)`` float32 for examples shaped as in :func:`train_detector`."""
    model.eval()
    dev = _device_of(model)
    out = []
    for start in range(0, len(x), batch_size):
        logits = model(_detector_tensor(x[start : start + batch_size], movie_input, dev))
        out.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
    return (
        np.concatenate(out).astype(np.float32) if out else np.zeros((0,) + x.shape[-2:], np.float32)
    )


def _validate_detector(
    model: torch.nn.Module, x: np.ndarray, y: np.ndarray, movie_input: bool, batch_size: int
) -> dict[str, float]:
    prob = predict_detector(model, x, movie_input=movie_input, batch_size=batch_size)
    with torch.no_grad():
        logits = torch.log(torch.from_numpy(np.stack([1 - prob, prob], 1)).clamp_min(1e-6))
        soft = float(losses.dice_loss(logits, torch.from_numpy(np.ascontiguousarray(y, np.int64))))
    return {
        "dice": float(np.mean([dice_score(p, t) for p, t in zip(prob, y, strict=True)])),
        "dice_loss": soft,
    }


def train_classifier(
    model: torch.nn.Module,
    x: np.ndarray | tuple[np.ndarray, np.ndarray],
    labels: np.ndarray,
    params: TrainParams,
) -> History:
    """Train a cell / not-cell classifier (3CNet or 3CNet+) in place with the multiclass hinge loss.

    Parameters
    ----------
    model : torch.nn.Module
        Logits ``(B, 2)``.
    x : ndarray (N, 2, 92, 92), or tuple of (N, 1, 92, 92) images and (N, L) traces
        Candidate inputs (:func:`somaflow.nn.features.cnet_input`, ``trace_vector``).
    labels : ndarray, (N,) int
        1 = cell, 0 = not a cell.
    params : TrainParams
        ``augment`` rotates/flips the image channel(s) only.

    Returns
    -------
    History
        Per-epoch loss and validation accuracy, precision, recall, F1.
    """
    labels = np.asarray(labels, np.int64)
    n = len(labels)
    parts = x if isinstance(x, tuple) else (x,)
    if any(len(p) != n for p in parts) or n == 0:
        raise ValueError("need one label per candidate and at least one candidate")
    opt, rng = _setup(model, params)
    train, val = _split(n, params, rng)
    # class-balanced sampling: each class drawn equally often
    weights = np.ones(len(train))
    for c in (0, 1):
        k = (labels[train] == c).sum()
        if k:
            weights[labels[train] == c] = 0.5 / k
    weights /= weights.sum()

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        batch = tuple(p[idx].copy() for p in parts)
        if params.augment:
            img = batch[0]
            k = rng.integers(0, 4, size=len(idx))
            flip = rng.random(len(idx)) < 0.5
            for i in range(len(idx)):
                # rotate/flip the image channel only: the trace channel is not an image
                img[i, 0] = np.rot90(img[i, 0], k[i])
                if flip[i]:
                    img[i, 0] = img[i, 0][:, ::-1]
        dev = _device_of(model)
        logits = model(_as_input(batch if len(batch) > 1 else batch[0], dev))
        return losses.multiclass_hinge_loss(logits, _tensor(labels[idx], dev, np.int64))

    def validate(v: np.ndarray) -> dict[str, float]:
        prob = predict_classifier(model, tuple(p[v] for p in parts) if len(parts) > 1 else parts[0][v])
        return binary_metrics(prob >= 0.5, labels[v] == 1)

    return _fit(model, opt, rng, params, train, val, batch_loss, validate, sample_p=weights)


@torch.no_grad()
def predict_classifier(
    model: torch.nn.Module, x: np.ndarray | tuple[np.ndarray, ...], batch_size: int = 256
) -> np.ndarray:
    """Probability ``(N,)`` float32 that each candidate is a cell (softmax of the 2 logits)."""
    model.eval()
    parts = x if isinstance(x, tuple) else (x,)
    n = len(parts[0])
    out = []
    for s in range(0, n, batch_size):
        inputs = _as_input(
            tuple(p[s : s + batch_size] for p in parts)
            if len(parts) > 1
            else parts[0][s : s + batch_size],
            _device_of(model),
        )
        logits = model(inputs)
        out.append(torch.softmax(logits, dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def binary_metrics(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of boolean predictions against boolean truth."""
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float((pred == truth).mean()) if len(pred) else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }


def train_lstm(
    model: torch.nn.Module, windows: np.ndarray, labels: np.ndarray, params: TrainParams
) -> History:
    """Train the LSTM seed classifier in place.

    Parameters
    ----------
    windows : ndarray, (N, W, 100) float32
        Each seed's trace cut into W z-scored 100-sample windows
        (:func:`somaflow.nn.features.lstm_windows`, padded to a common W).
    labels : ndarray, (N,)
        1 = the seed sits on an active cell.
    """
    labels = np.asarray(labels, np.float32)
    opt, rng = _setup(model, params)
    train, val = _split(len(labels), params, rng)
    pos = max(float(labels[train].sum()), 1.0)
    pos_weight = (len(train) - pos) / pos

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        dev = _device_of(model)
        logits = model(_tensor(windows[idx], dev))
        return losses.bce_loss(logits, _tensor(labels[idx], dev), pos_weight=pos_weight)

    @torch.no_grad()
    def validate(v: np.ndarray) -> dict[str, float]:
        model.eval()
        prob = torch.sigmoid(model(_tensor(windows[v], _device_of(model)))).cpu().numpy()
        return binary_metrics(prob >= 0.5, labels[v] == 1)

    return _fit(model, opt, rng, params, train, val, batch_loss, validate)
