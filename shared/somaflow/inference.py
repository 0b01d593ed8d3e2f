"""Where the CNNs run: the seam between the pipeline and a model server.

The pipeline never touches torch directly: detection and classification ask
an :class:`InferenceBackend` for probabilities, by model name and weights
reference. :class:`LocalBackend` runs the models in-process (on a CUDA GPU
when torch sees one, else the CPU: ``--inference local``);
:class:`RemoteBackend` sends the same calls to the inference service
(``somaflow serve``: NVIDIA Triton Inference Server) over the Open Inference
Protocol (``--inference http://HOST:PORT``).

Backends are built inside each Dask task from the ``inference`` string of the
run's parameters (:func:`get_backend`), so nothing but that string travels to
the workers; the service's access token comes from the worker's
``SOMAFLOW_INFERENCE_TOKEN`` environment variable, never from the parameters
(which every result records).

Weights references are ``"default"`` (the file shipped in
``somaflow/nn/weights/<model>.safetensors``) or a local path / fsspec URL of a
``safetensors`` checkpoint written by ``somaflow train``.

This module imports torch only when a local model is first used, and the
HTTP client only when a remote one is.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import threading
import time
from importlib import resources
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
from safetensors import SafetensorError, safe_open

from somaflow import nn
from somaflow.errors import InputError, ParameterError, ServiceError
from somaflow.io import stores
from somaflow.nn.signatures import OUTPUT, Signature, as_named, signature

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


@functools.lru_cache(maxsize=8)
def _on_device(path: str, device: str) -> Any:
    """The model of ``path`` moved to ``device`` (a copy per device, loaded once per process)."""
    net, _ = _load(path)
    return net if device == "cpu" else copy.deepcopy(net).to(device)


def local_device() -> str:
    """``"cuda"`` when torch sees a CUDA GPU, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class LocalBackend:
    """In-process inference; models are loaded once per process and cached.

    Runs on the CUDA GPU when torch sees one (``--inference local`` on a GPU
    node needs no service), else on the CPU.

    Parameters
    ----------
    threads : int, optional
        torch intra-op threads (default: leave torch's setting alone). Inside a
        Dask worker, 1 keeps one task per core.
    device : str, optional
        ``"cpu"``, ``"cuda"`` (default: :func:`local_device`).
    """

    def __init__(self, threads: int | None = None, device: str | None = None) -> None:
        self.threads = threads
        self.device = device

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
        self._model(model, weights)  # checks that the weights are for this model
        device = self.device or local_device()
        net = _on_device(weights_path(model, weights), device)
        parts = inputs if isinstance(inputs, tuple) else (inputs,)
        tensors = [torch.from_numpy(np.ascontiguousarray(p, np.float32)).to(device) for p in parts]
        with torch.inference_mode():  # no autograd: the detectors take their lean inference path
            out = net(tensors[0] if len(tensors) == 1 else tuple(tensors))
        return probability(out).cpu().numpy().astype(np.float32)

    def metadata(self, model: str, weights: str) -> dict[str, Any]:
        return dict(self._model(model, weights)[1])


#: the HTTP header that carries the service's access token (Triton's restricted-API header)
TOKEN_HEADER = "somaflow-token"
#: 5xx statuses worth retrying (429 too): the server is overloaded, restarting or behind a proxy
_RETRY_STATUS = {"429", "500", "502", "503", "504"}
#: an internal error of the served model code (deterministic: not retried)
_MODEL_ERROR = "somaflow: internal error"


def checkpoint_metadata(path: str) -> dict[str, Any]:
    """A checkpoint's metadata, JSON-decoded, from its safetensors header only (no torch).

    The same dict :func:`somaflow.nn.load_checkpoint` returns as its metadata;
    its ``sha256`` names the weights.

    Raises
    ------
    InputError
        Not a somaflow checkpoint.
    StoreError
        The file cannot be read.
    """
    with stores.local_file(path, what="checkpoint") as local:
        try:
            with safe_open(local, framework="numpy") as fh:
                raw = fh.metadata()
            return {k: json.loads(v) for k, v in (raw or {}).items()} if raw else _no_metadata(path)
        except (SafetensorError, ValueError, TypeError) as exc:
            raise InputError(f"{path} is not a somaflow checkpoint ({exc}). Use a file written by "
                             "`somaflow train`.") from exc


def _no_metadata(path: str) -> dict[str, Any]:
    raise InputError(f"{path} is not a somaflow checkpoint (its header holds no metadata). Use a file "
                     "written by `somaflow train`.")


class RemoteBackend:
    """Inference on the service (``somaflow serve``) over HTTP with binary tensors.

    Every call is retried with exponential backoff on connection errors, 429
    and 5xx answers until ``deadline`` seconds have passed since it started;
    then, or at once on any other error answer, it raises
    :class:`~somaflow.errors.ServiceError` naming the URL. There is no
    fallback to local inference. Batches are split into requests the
    service accepts (its ``max_batch_size`` and request-size limit).

    Before its first call for a model, it checks that the service serves the
    same weights the run asks for (their ``sha256``), read from the local
    checkpoint's header; checkpoint metadata come from that header too.

    Parameters
    ----------
    url : str
        ``http(s)://HOST:PORT``.
    deadline : float, optional
        Seconds one call may keep retrying (default
        ``SOMAFLOW_INFERENCE_DEADLINE`` or 300).
    token : str, optional
        Access token (default ``SOMAFLOW_INFERENCE_TOKEN``, if set).
    """

    _local = threading.local()
    _configs: dict[tuple[str, str], dict[str, Any]] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, deadline: float | None = None, token: str | None = None) -> None:
        self.url = check_spec(url)
        if self.url == "local":
            raise ParameterError("RemoteBackend needs the service's URL, not 'local'.")
        env_deadline = os.environ.get("SOMAFLOW_INFERENCE_DEADLINE")
        self.deadline = float(deadline if deadline is not None else env_deadline or 300.0)
        self.token = token if token is not None else os.environ.get("SOMAFLOW_INFERENCE_TOKEN") or None

    # ------------------------------------------------------------------ transport

    def _client(self) -> Any:
        clients = self._local.__dict__.setdefault("clients", {})
        if self.url not in clients:
            import tritonclient.http as httpclient

            parts = urlsplit(self.url)
            clients[self.url] = httpclient.InferenceServerClient(
                parts.netloc, ssl=parts.scheme == "https", connection_timeout=10.0,
                network_timeout=max(self.deadline, 10.0))
        return clients[self.url]

    def _drop_client(self) -> None:
        client = self._local.__dict__.get("clients", {}).pop(self.url, None)
        if client is not None:
            try:
                client.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass

    def _call(self, what: str, fn: Any) -> Any:
        """``fn(client)``, retried on transient failures until the deadline."""
        from tritonclient.utils import InferenceServerException

        start = time.monotonic()
        delay, attempt = 0.25, 0
        while True:
            attempt += 1
            try:
                return fn(self._client())
            except InferenceServerException as exc:
                status, message = exc.status(), (exc.message() or "").strip()
                if status not in _RETRY_STATUS or message.startswith(_MODEL_ERROR):
                    raise ServiceError(f"inference service {self.url}: {what}: {message} (HTTP {status})") from exc
                reason = f"HTTP {status}: {message.splitlines()[0] if message else ''}"
            except (OSError, TimeoutError) as exc:  # refused, reset, DNS, timeouts (socket.timeout is OSError)
                reason = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # geventhttpclient's own errors on broken connections
                if type(exc).__module__.split(".")[0] not in ("geventhttpclient", "gevent"):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            self._drop_client()
            left = self.deadline - (time.monotonic() - start)
            if left <= 0:
                raise ServiceError(
                    f"inference service {self.url} did not answer {what} within {self.deadline:g} s "
                    f"({attempt} attempts; last: {reason}). Start or fix the service (`somaflow serve`), "
                    "or run with --inference local; rerunning resumes after the last finished stage."
                )
            log.info("inference service %s: %s failed (%s); retrying in %.1f s", self.url, what, reason,
                        min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 10.0)

    def _headers(self) -> dict[str, str] | None:
        return {TOKEN_HEADER: self.token} if self.token else None

    # ------------------------------------------------------------------ models

    def _served(self, model: str, weights: str) -> tuple[Signature, int, int]:
        """The model's signature, max batch size and request-size limit, once the service is
        known to serve the weights this run asks for."""
        ref = weights_path(model, weights)
        meta = self.metadata(model, weights)
        key = (self.url, model)
        with self._lock:
            config = self._configs.get(key)
        if config is None:
            def get(client: Any) -> Any:
                return client.get_model_config(model, headers=self._headers())

            config = self._call(f"the configuration of model {model!r}", get)
            with self._lock:
                self._configs[key] = config
        params = {k: v.get("string_value") for k, v in (config.get("parameters") or {}).items()}
        served = params.get("weights_sha256")
        if served != meta.get("sha256"):
            raise ServiceError(
                f"inference service {self.url} serves {model} with other weights (sha256 {str(served)[:12]}...) "
                f"than this run asks for ({weights}: {ref}, sha256 {str(meta.get('sha256'))[:12]}...). Start the "
                f"service with `--weights {model}=FILE` for these weights, or run with --inference local."
            )
        return signature(model, meta["config"]), int(config["max_batch_size"]), int(params["max_request_bytes"])

    def predict(self, model: str, weights: str, inputs: np.ndarray | tuple[np.ndarray, ...]) -> np.ndarray:
        import tritonclient.http as httpclient

        sig, max_batch, max_bytes = self._served(model, weights)
        named = as_named(sig, inputs)
        n = next(iter(named.values())).shape[0]
        per_example = sum(a[:1].nbytes for a in named.values())
        step = min(max_batch, max_bytes // max(per_example, 1))
        if step < 1:
            raise ParameterError(
                f"one {model} example is {per_example} bytes, over the inference service's request limit "
                f"({max_bytes} bytes). Lower cnn.tile, or raise the service's SOMAFLOW_SERVE_MAX_REQUEST_BYTES."
            )
        out = []
        for i in range(0, n, step):
            chunk = {k: a[i:i + step] for k, a in named.items()}
            request = []
            for name, a in chunk.items():
                t = httpclient.InferInput(name, list(a.shape), "FP32")
                t.set_data_from_numpy(a, binary_data=True)
                request.append(t)
            wanted = [httpclient.InferRequestedOutput(OUTPUT, binary_data=True)]

            def infer(client: Any, request: list[Any] = request, wanted: list[Any] = wanted) -> np.ndarray:
                return client.infer(model, request, outputs=wanted, headers=self._headers()).as_numpy(OUTPUT)

            out.append(self._call(f"{model} inference", infer))
        if not out:
            return np.zeros((0,) if sig.output_dims == (1,) else (0, 0, 0), np.float32)
        prob = np.concatenate(out)
        if sig.output_dims == (1,):
            prob = prob.reshape(-1)
        return prob.astype(np.float32, copy=False)

    def metadata(self, model: str, weights: str) -> dict[str, Any]:
        meta = _header_metadata(weights_path(model, weights))
        if meta.get("model") != model:
            raise InputError(
                f"the weights {weights!r} are for model {meta.get('model')!r}, not {model!r}. "
                "Pass weights trained for this model."
            )
        return dict(meta)

    def wait_ready(self) -> None:
        """Return once the service answers ``/v2/health/ready``; :class:`ServiceError` after the deadline."""
        def ready(client: Any) -> bool:
            if not client.is_server_ready(headers=self._headers()):
                raise ConnectionError("the service is up but not ready (models still loading)")
            return True

        self._call("the readiness check", ready)


@functools.lru_cache(maxsize=32)
def _header_metadata(path: str) -> dict[str, Any]:
    return checkpoint_metadata(path)


def probability(logits: Any) -> Any:
    """Class-1 probability of a model's output (torch): softmax over the two logits of dim 1,
    or the sigmoid of one logit per example (the LSTM)."""
    import torch

    if logits.ndim == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)[:, 1]


def check_spec(spec: str) -> str:
    """``spec`` when it is ``"local"`` or an ``http(s)://HOST:PORT`` URL.

    Raises
    ------
    ParameterError
        Anything else.
    """
    if spec == "local":
        return spec
    parts = urlsplit(spec)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
        raise ParameterError(
            f"--inference {spec!r}: use 'local' (in-process models) or the inference service's URL, "
            "http://HOST:PORT (see `somaflow serve`)."
        )
    return spec.rstrip("/")


def get_backend(spec: str = "local", threads: int | None = None) -> InferenceBackend:
    """The backend for ``--inference SPEC``: ``"local"`` or ``http(s)://HOST:PORT``.

    Raises
    ------
    ParameterError
        Any other spec.
    """
    if check_spec(spec) == "local":
        return LocalBackend(threads)
    return RemoteBackend(spec)


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
            block = np.ascontiguousarray(x[..., ya:yb, xa:xb])  # x may be a turned view (tiled_views)
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


def dihedral_mean(fn: Any, x: np.ndarray, n: int, *, copy: bool = True) -> np.ndarray:
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
    copy : bool
        Give ``fn`` each view as a contiguous copy; False: as a strided view
        of ``x`` (no copy of the whole input per view), for an ``fn`` that
        reads it by pieces.

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
        out = np.asarray(fn(np.ascontiguousarray(view) if copy else view), np.float32)
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
    # each view is read tile by tile: no copy of the whole input per view
    return dihedral_mean(lambda v: tiled(fn, v[None], tile=tile, margin=margin)[0], x, views, copy=False)
