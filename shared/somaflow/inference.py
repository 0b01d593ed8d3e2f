"""Where the CNNs run: the seam between the pipeline and a model server.

The pipeline never touches torch directly: detection and classification ask
an :class:`InferenceBackend` for probabilities, by model name and weights
reference. :class:`LocalBackend` runs the models in-process on the CPU (the
laptop default, ``--inference local``); a remote backend that calls the GPU
inference service over HTTP implements the same two methods.

Weights references are ``"default"`` (the file shipped in
``somaflow/nn/weights/<model>.safetensors``) or a local path / fsspec URL of a
``safetensors`` checkpoint written by ``somaflow train``.

This module imports torch only when a local model is first used.
"""

from __future__ import annotations

import functools
import logging
from importlib import resources
from typing import Any, Protocol

import numpy as np

from somaflow import nn
from somaflow.errors import InputError, ParameterError

log = logging.getLogger(__name__)

#: the models somaflow ships default weights for (registry names of :data:`somaflow.nn.MODELS`)
SHIPPED = ("stneuronet", "convnet2p1d", "meanimage2d", "unet2d", "3cnet", "3cnet-plus", "lstm")


def weights_path(model: str, weights: str = "default") -> str:
    """Resolve a weights reference to a path or URL.

    Raises
    ------
    InputError
        ``"default"`` for a model without shipped weights, or the file is missing.
    """
    if weights != "default":
        return weights
    ref = resources.files("somaflow.nn").joinpath("weights", f"{model}.safetensors")
    if not ref.is_file():
        raise InputError(
            f"no shipped weights for model {model!r} (looked for {ref}). Train them with "
            f"`somaflow train {model} --out FILE` and pass the file as the weights."
        )
    return str(ref)


class InferenceBackend(Protocol):
    """Runs a model on a batch of inputs and returns its class-1 probability."""

    def predict(self, model: str, weights: str, inputs: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        """Probability of the positive class.

        Parameters
        ----------
        model : str
            Registry name (:data:`SHIPPED`).
        weights : str
            ``"default"`` or a checkpoint path / URL.
        inputs : ndarray or tuple of ndarray
            A batch in the model's input contract (batch first, float32).

        Returns
        -------
        ndarray, float32
            ``(B, H, W)`` for detectors, ``(B,)`` for classifiers.
        """
        ...

    def metadata(self, model: str, weights: str) -> dict[str, Any]:
        """The checkpoint's metadata (training recipe, metrics, ``input_stats``, ``threshold``)."""
        ...


@functools.lru_cache(maxsize=8)
def _load(path: str) -> tuple[Any, dict[str, Any]]:
    model, meta = nn.load_checkpoint(path)
    log.info("loaded %s weights from %s", meta.get("model"), path)
    return model, meta


class LocalBackend:
    """In-process CPU inference; models are loaded once per process and cached.

    Parameters
    ----------
    threads : int, optional
        torch intra-op threads (default: leave torch's setting alone). Inside a
        Dask worker, 1 keeps one task per core.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def _model(self, model: str, weights: str) -> tuple[Any, dict[str, Any]]:
        net, meta = _load(weights_path(model, weights))
        if meta.get("model") != model:
            raise InputError(
                f"the weights {weights!r} are for model {meta.get('model')!r}, not {model!r}. "
                "Pass weights trained for this model."
            )
        return net, meta

    def predict(self, model: str, weights: str, inputs: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        net, _ = self._model(model, weights)
        parts = inputs if isinstance(inputs, tuple) else (inputs,)
        tensors = [torch.from_numpy(np.ascontiguousarray(p, np.float32)) for p in parts]
        with torch.no_grad():
            out = net(tensors[0] if len(tensors) == 1 else tuple(tensors))
        if out.ndim == 1:  # one logit per example (the LSTM)
            return torch.sigmoid(out).numpy().astype(np.float32)
        return torch.softmax(out, dim=1)[:, 1].numpy().astype(np.float32)

    def metadata(self, model: str, weights: str) -> dict[str, Any]:
        return dict(self._model(model, weights)[1])


def get_backend(spec: str = "local", threads: int | None = None) -> InferenceBackend:
    """The backend for ``--inference SPEC``.

    Raises
    ------
    ParameterError
        Anything but ``"local"``: the HTTP inference service is not part of
        this version.
    """
    if spec == "local":
        return LocalBackend(threads)
    raise ParameterError(
        f"--inference {spec!r}: only 'local' (in-process models) is available in this version. "
        "Drop the option."
    )


def tiled(
    fn: Any,
    x: np.ndarray,
    *,
    tile: int,
    margin: int,
    multiple: int = 8,
) -> np.ndarray:
    """Apply a fully convolutional ``fn`` to overlapping spatial tiles of ``x`` and stitch.

    Parameters
    ----------
    fn : callable
        ``(1, ..., h, w) -> (1, h, w)`` probability for a tile.
    x : ndarray, (1, ..., H, W)
        One example; the last two axes are space.
    tile : int
        Tile core size (px); each tile is read with ``margin`` px of context
        on every side, and only its core is kept, so stitching leaves no seams
        where the receptive field fits in the margin.
    margin : int
        Context (px) on each side.
    multiple : int
        Tile sizes are padded (reflect) to a multiple of this (the network's
        total down-sampling).

    Returns
    -------
    ndarray, (1, H, W) float32
    """
    H, W = x.shape[-2:]
    out = np.zeros((1, H, W), np.float32)
    for y0 in range(0, H, tile):
        for x0 in range(0, W, tile):
            y1, x1 = min(y0 + tile, H), min(x0 + tile, W)
            ya, xa = max(y0 - margin, 0), max(x0 - margin, 0)
            yb, xb = min(y1 + margin, H), min(x1 + margin, W)
            block = x[..., ya:yb, xa:xb]
            h, w = block.shape[-2:]
            ph, pw = (-h) % multiple, (-w) % multiple
            if ph or pw:
                pad = [(0, 0)] * (block.ndim - 2) + [(0, ph), (0, pw)]
                block = np.pad(block, pad, mode="reflect" if min(h, w) > max(ph, pw) else "edge")
            prob = fn(block)[..., :h, :w]
            out[..., y0:y1, x0:x1] = prob[..., y0 - ya:y0 - ya + (y1 - y0), x0 - xa:x0 - xa + (x1 - x0)]
    return out


#: test-time augmentation: the (rotation by k x 90 degrees, flip) pairs averaged for each allowed count
_TTA: dict[int, tuple[tuple[int, bool], ...]] = {
    1: ((0, False),),
    2: ((0, False), (0, True)),
    4: ((0, False), (1, False), (2, False), (3, False)),
    8: tuple((k, f) for k in range(4) for f in (False, True)),
}
TTA_COUNTS: tuple[int, ...] = tuple(_TTA)


def dihedral_mean(fn: Any, x: np.ndarray, n: int) -> np.ndarray:
    """Test-time augmentation: the mean of ``fn`` over ``n`` rotations/flips of ``x``.

    Each view of ``x`` is rotated by k × 90° and/or flipped (left-right) in
    its last two (spatial) axes, ``fn`` is applied, and its output is turned
    back before averaging, so the result is aligned with ``x``. The networks
    are trained with the same rotations and flips, so every view is an input
    they know.

    Parameters
    ----------
    fn : callable
        ``(..., h, w) -> (..., h, w)`` map of one view (``h, w`` swap for odd k).
    x : ndarray, (..., H, W)
    n : int
        Views: 1 (``fn(x)``), 2 (and its mirror image), 4 (the four
        rotations) or 8 (rotations of ``x`` and of its mirror image).

    Returns
    -------
    ndarray, (..., H, W) float32
    """
    if n not in _TTA:
        raise ParameterError(f"test-time augmentation takes {', '.join(map(str, TTA_COUNTS))} views, got {n}.")
    total: np.ndarray | None = None
    for k, flip in _TTA[n]:
        view = np.rot90(x, k, axes=(-2, -1))
        if flip:
            view = view[..., ::-1]
        out = np.asarray(fn(np.ascontiguousarray(view)), np.float32)
        if flip:
            out = out[..., ::-1]
        out = np.rot90(out, -k, axes=(-2, -1))
        total = out.copy() if total is None else total + out
    assert total is not None
    return total / np.float32(len(_TTA[n]))


def tiled_views(fn: Any, x: np.ndarray, *, tile: int, margin: int, views: int) -> np.ndarray:
    """One example's map: ``fn`` applied by :func:`tiled` to each of ``views`` rotations/flips of ``x``
    (:func:`dihedral_mean`), turned back and averaged.

    Parameters
    ----------
    fn : callable
        ``(1, ..., h, w) -> (1, h, w)`` probability for a tile, as for :func:`tiled`.
    x : ndarray, (..., H, W)
        One example without its batch axis; the last two axes are space.
    tile, margin : int
        As for :func:`tiled`.
    views : int
        1, 2, 4 or 8, as for :func:`dihedral_mean`.

    Returns
    -------
    ndarray, (H, W) float32
    """
    return dihedral_mean(lambda v: tiled(fn, v[None], tile=tile, margin=margin)[0], x, views)
