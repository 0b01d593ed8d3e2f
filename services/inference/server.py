"""Start NVIDIA Triton Inference Server (through nvidia-pytriton) on the model repository and serve.

``python -m somaflow_service`` (what ``somaflow serve`` runs in the service's
environment) reads :class:`~somaflow_service.settings.ServeSettings` from the
environment, writes the model repository into a temporary folder, and starts
Triton with:

* HTTP, gRPC and metrics on ``host`` and their ports; ``/v2/health/live``,
  ``/v2/health/ready`` (ready once every model is loaded: strict readiness),
  ``/v2/models/{name}`` and ``/v2/models/{name}/config`` open to all;
* model control off for clients: pytriton loads the repository at start, and
  the model-repository API (load/unload), shared memory, statistics, trace and
  logging APIs are restricted with a random token that only this process knows
  (pytriton's security configuration), so no request can load a model;
* with a ``token`` setting, inference also restricted: requests must carry it
  in the ``somaflow-token`` header (Triton's ``--http-restricted-api`` and
  ``--grpc-restricted-protocol``), else HTTP 403;
* Triton's Python backend stub finding this interpreter's ``libpython``
  (``LD_LIBRARY_PATH`` gets ``sysconfig``'s ``LIBDIR``).

SIGTERM and SIGINT stop Triton and remove the temporary files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from somaflow_service.repository import write_repository
from somaflow_service.settings import ServeSettings

from somaflow.errors import ParameterError, ServiceError, SomaflowError
from somaflow.inference import TOKEN_HEADER

log = logging.getLogger("somaflow_service")


def _device(settings: ServeSettings) -> bool:
    """True to serve on GPUs."""
    import torch

    if settings.device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("--device cuda: torch sees no CUDA GPU here. Use --device cpu, or run on a GPU node.")
    gpu = settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available())
    if not gpu and settings.precision != "fp32":
        raise ParameterError(f"--precision {settings.precision} needs a GPU; the CPU serves fp32. "
                             "Drop the option or use --device cuda.")
    return gpu


def _restrict_inference(triton: Any, token: str) -> None:
    """Add inference to the restricted APIs, behind its own header and token.

    pytriton already restricts the administrative APIs with its own random
    token; the inference token is a second, separate restriction, so holding it
    grants inference only.
    """
    config = triton._triton_server_config  # pytriton 0.7 keeps the server's arguments here
    for key, apis in (("http-restricted-api", "inference"), ("grpc-restricted-protocol", "inference")):
        admin = config[key]
        config[key] = [*([admin] if admin else []), f"{apis}:{TOKEN_HEADER}={token}"]


def _stop_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # pytriton's serve() stops Triton on KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_leftovers(tmp: Path | None = None, shm: Path = Path("/dev/shm")) -> list[Path]:
    """Remove what killed services left behind: their scratch folders (``somaflow-serve-PID-*``, ~22 MB:
    the repository and pytriton's copy of Triton) and the Python backend's shared memory
    (``pytrtionPID-*``), for processes that no longer run. Returns what it removed."""
    removed = []
    for folder, pattern in ((tmp or Path(tempfile.gettempdir()), r"somaflow-serve-(\d+)-"), (shm, r"pytrtion(\d+)-")):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            m = re.match(pattern, path.name)
            if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def serve(settings: ServeSettings) -> None:
    """Serve until Triton stops or the process is signalled."""
    from pytriton.triton import Triton, TritonConfig

    gpu = _device(settings)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)
    for path in sweep_leftovers():
        log.info("removed %s, left by a service that was killed", path)
    scratch = Path(tempfile.mkdtemp(prefix=f"somaflow-serve-{os.getpid()}-"))
    try:
        models = write_repository(settings, scratch / "models", gpu=gpu)
        config = TritonConfig(
            model_repository=scratch / "models", strict_readiness=True, exit_on_error=True,
            http_address=settings.host, http_port=settings.http_port,
            grpc_address=settings.host, grpc_port=settings.grpc_port,
            metrics_address=settings.host, metrics_port=settings.metrics_port,
            allow_gpu_metrics=gpu, log_verbose=settings.log_verbose or None,
        )
        triton = Triton(config=config, workspace=scratch / "pytriton")
        if settings.token is not None:
            _restrict_inference(triton, settings.token.get_secret_value())
        _stop_on_sigterm()
        from pytriton.client.exceptions import PyTritonClientTimeoutError

        host = settings.host if settings.host != "0.0.0.0" else "HOST"
        print(f"somaflow inference service: http://{host}:{settings.http_port} (gRPC {settings.grpc_port}, "
              f"metrics http://{host}:{settings.metrics_port}/metrics) on {'GPU' if gpu else 'CPU'}; "
              f"models: {', '.join(models)}; token: {'required' if settings.token else 'none'}",
              file=sys.stderr, flush=True)
        try:
            triton.serve()
        except PyTritonClientTimeoutError as exc:
            triton.stop()
            raise ServiceError(f"Triton did not become ready ({exc}): a model failed to load; its error is in "
                               "the log above.") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    """Entry point: settings from ``SOMAFLOW_SERVE_*``; one line and exit status 2 on bad settings."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pytriton").setLevel(logging.WARNING)
    try:
        settings = ServeSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        where = str(first["loc"][0]) if first["loc"] else ""
        msg = first["msg"].removeprefix("Value error, ")
        hint = f"bad setting {where}: {msg} (from --{where.replace('_', '-')} or SOMAFLOW_SERVE_{where.upper()})"
        print(f"somaflow serve: error: {hint if where else msg}.", file=sys.stderr)
        return 2
    try:
        serve(settings)
    except SomaflowError as exc:
        print(f"somaflow serve: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    return 0
