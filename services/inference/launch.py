"""``somaflow serve`` from somaflow's own environment: find or create the service's environment, start it.

The service needs numpy < 2 (nvidia-pytriton), somaflow numpy 2, so the
service runs in an environment of its own:

* ``SOMAFLOW_SERVE_PYTHON`` — the path of that environment's ``python``
  (a container image that *is* the environment sets it); else
* ``SOMAFLOW_HOME/serve-env-KEY`` (``SOMAFLOW_HOME`` defaults to
  ``~/.somaflow``; KEY hashes ``requirements.txt`` and the Python version, so a
  change of either makes a new one), created on first use with one
  ``pip install -r requirements.txt`` — announced on stderr, built in a
  temporary folder and moved into place when complete, so an interrupted
  creation is never mistaken for an environment.

somaflow's code is not installed there: the server runs with ``PYTHONPATH``
pointing at a folder that links ``somaflow`` and ``somaflow_service`` to the
packages this process imports, so the service always runs the same code as the
client, and one environment serves every checkout. This module needs nothing
beyond the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import somaflow
from somaflow.errors import ParameterError, ServiceError

#: the service environment's requirements (also the container image's)
REQUIREMENTS = Path(__file__).with_name("requirements.txt")
#: written last into a complete environment
_MARKER = ".somaflow-serve-complete"


def home() -> Path:
    """``SOMAFLOW_HOME`` or ``~/.somaflow``."""
    return Path(os.environ.get("SOMAFLOW_HOME") or Path.home() / ".somaflow")


def env_dir() -> Path:
    """Where the default service environment lives."""
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:12]
    return home() / f"serve-env-{key}"


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def service_python(*, create: bool = True, say: object = print) -> Path:
    """The service environment's interpreter: ``SOMAFLOW_SERVE_PYTHON``, or the default environment
    (created when missing and ``create``).

    Raises
    ------
    ParameterError
        ``SOMAFLOW_SERVE_PYTHON`` is not an executable, or the environment is
        missing and ``create`` is False.
    """
    given = os.environ.get("SOMAFLOW_SERVE_PYTHON")
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ParameterError(f"SOMAFLOW_SERVE_PYTHON={given} is not an executable Python. Point it at the "
                                 "service environment's bin/python, or unset it to use the default environment.")
        return path
    env = env_dir()
    if (env / _MARKER).is_file():
        return _python(env)
    if not create:
        raise ParameterError(f"the inference service environment {env} does not exist yet. Run `somaflow serve` "
                             "once to create it.")
    return _python(create_env(env, say=say))


def create_env(env: Path, *, say: object = print) -> Path:
    """Create the service environment at ``env`` (a venv + one ``pip install -r requirements.txt``).

    Raises
    ------
    ServiceError
        venv or pip failed; the message ends with pip's last lines.
    """
    env.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=env.name + ".part-", dir=env.parent))
    say(f"somaflow serve: creating the inference service environment in {env} "  # type: ignore[operator]
        f"(python -m venv, then one `pip install -r {REQUIREMENTS}`: nvidia-pytriton, torch, numpy<2; "
        "a few minutes, once)", file=sys.stderr, flush=True)
    try:
        for cmd in ([sys.executable, "-m", "venv", str(tmp)],
                    [str(_python(tmp)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "-r", str(REQUIREMENTS)]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
                raise ServiceError(f"creating the inference service environment failed: {' '.join(cmd[:4])} "
                                        f"exited {proc.returncode}: {tail}. Fix the cause (network, disk) and rerun.")
        (tmp / _MARKER).write_text(REQUIREMENTS.read_text())
        try:
            tmp.rename(env)
        except OSError:  # another process finished first: use its environment
            if not (env / _MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    say(f"somaflow serve: service environment ready: {env}", file=sys.stderr, flush=True)  # type: ignore[operator]
    return env


def code_path() -> Path:
    """A folder whose ``somaflow`` and ``somaflow_service`` link to this process's packages
    (one per pair of package folders, under :func:`home`)."""
    targets = {"somaflow": Path(somaflow.__file__).resolve().parent,
               "somaflow_service": Path(__file__).resolve().parent}
    key = hashlib.sha256("\n".join(map(str, targets.values())).encode()).hexdigest()[:12]
    folder = home() / "serve-code" / key
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in targets.items():
        link = folder / name
        if not (link.is_symlink() and link.resolve() == target):
            tmp = folder / f".{name}.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(target, target_is_directory=True)
            tmp.replace(link)  # atomic: a concurrent start sees the old or the new link
    return folder


def server_command(python: Path, settings: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The command and environment that start the service with ``settings`` (``SOMAFLOW_SERVE_*``)."""
    env = dict(os.environ)
    env.update(settings)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(code_path()), env.get("PYTHONPATH")) if p)
    env.pop("PYTHONHOME", None)
    return [str(python), "-m", "somaflow_service"], env


def serve(settings: Mapping[str, str]) -> None:
    """Replace this process with the service (its signals, its exit status)."""
    cmd, env = server_command(service_python(), settings)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


def serve_environment(args: argparse.Namespace) -> dict[str, str]:
    """The ``serve`` options given, as ``SOMAFLOW_SERVE_*`` variables (they win over the environment's)."""
    settings = {"host": args.host, "http_port": args.http_port, "grpc_port": args.grpc_port,
                "metrics_port": args.metrics_port, "device": args.device, "precision": args.precision,
                "models": ",".join(args.models) if args.models else None,
                "weights": json.dumps(dict(_pair(w, "--weights") for w in args.weights)) if args.weights else None,
                "max_batch_size": args.max_batch_size, "max_queue_delay_us": args.max_queue_delay_us}
    return {f"SOMAFLOW_SERVE_{k.upper()}": str(v) for k, v in settings.items() if v is not None}


def cmd_serve(args: argparse.Namespace) -> int:
    """``somaflow serve``: find or create the service environment, then :func:`serve` there."""
    env = serve_environment(args)
    if args.print_python:
        print(service_python())
        return 0
    serve(env)
    return 0


def _pair(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise ParameterError(f"{option} takes MODEL=FILE, got {item!r}.")
    return key, value


#: what ``somaflow serve --help`` says
DESCRIPTION = (
    "Serve somaflow's CNNs with NVIDIA Triton Inference Server (Open Inference Protocol over HTTP and gRPC, "
    "Prometheus metrics), with dynamic batching. Runs in its own Python environment (SOMAFLOW_SERVE_PYTHON, or "
    "one created on first use under ~/.somaflow). Every setting can also come from SOMAFLOW_SERVE_* environment "
    "variables, e.g. SOMAFLOW_SERVE_TOKEN (inference requests must then carry it), "
    "SOMAFLOW_SERVE_PREFERRED_BATCH_SIZES, SOMAFLOW_SERVE_MAX_REQUEST_BYTES. Point runs at it with "
    "`somaflow run --inference http://HOST:PORT`.")


def serve_options(s: argparse.ArgumentParser) -> None:
    """The options of ``somaflow serve`` (and of ``python -m somaflow_service`` in the service environment)."""
    s.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)")
    s.add_argument("--http-port", type=int, help="HTTP port (default 8000)")
    s.add_argument("--grpc-port", type=int, help="gRPC port (default 8001)")
    s.add_argument("--metrics-port", type=int, help="Prometheus metrics port (default 8002)")
    s.add_argument("--models", nargs="+", metavar="MODEL", help="models to serve (default: every shipped one)")
    s.add_argument("--weights", action="append", metavar="MODEL=FILE",
                   help="serve MODEL with this safetensors checkpoint (path or URL) instead of the shipped one")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="cuda: one model instance per GPU; cpu; auto (default): cuda when torch sees a GPU")
    s.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="compute precision on GPUs (default fp32)")
    s.add_argument("--max-batch-size", type=int, metavar="N",
                   help="largest dynamic batch of every served model (default: per model, see docs/service.md)")
    s.add_argument("--max-queue-delay-us", type=int, metavar="US",
                   help="how long a request may wait for a fuller batch (default 2000 us)")


def add_serve_parser(sub: Any) -> None:
    """The ``serve`` subcommand of the ``somaflow`` command line."""
    s = sub.add_parser("serve", help="start the CNN inference service (NVIDIA Triton Inference Server)",
                       description=DESCRIPTION)
    serve_options(s)
    s.add_argument("--print-python", action="store_true",
                   help="create the service environment if needed, print its python and exit")
    s.set_defaults(func=cmd_serve)
