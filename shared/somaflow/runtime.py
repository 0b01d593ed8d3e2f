"""Process-level set-up for the CLI and the flows: Prefect's environment, the Dask
cluster, and progress on the console.

The library itself never starts clusters or servers; the CLI and the flows do,
through these helpers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from dask.system import CPU_COUNT
from distributed.diagnostics.progress import AllProgress

from somaflow import kube
from somaflow.errors import ClusterStartError, ParameterError, StoreError

log = logging.getLogger(__name__)

#: logger of the stage start/end lines the CLI prints on stderr
PROGRESS_LOGGER = "somaflow.progress"

#: environment defaults that keep Prefect's ephemeral mode offline, quiet and patient, and
#: send somaflow's logs (stage progress, library warnings) to the flow run's log in the
#: Prefect API: Prefect attaches its API handler to the "extra loggers"; a log record
#: outside a flow or task run (a Dask worker's, a script's) is not sent, silently
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "somaflow,somaflow.progress",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}

#: prctl option: the signal a child gets when its parent dies (linux/prctl.h)
_PR_SET_PDEATHSIG = 1

#: a log record with ``extra={CONSOLE_FLAG: False}`` goes to Prefect's run log but not to the
#: console (the CLI prints it once, in its summary)
CONSOLE_FLAG = "somaflow_console"

#: the ``--cluster`` values besides a scheduler address
CLUSTER_KINDS = ("local", "threads", "kubernetes")

#: scheduler task states that still have work ahead of them
_PENDING_STATES = frozenset({"waiting", "processing", "queued", "no-worker"})


def configure_prefect_env(debug: bool = False) -> None:
    """Set Prefect defaults in ``os.environ`` unless the user set them already.

    Must run before ``prefect`` is imported. ``PREFECT_HOME`` defaults to
    ``~/.somaflow/prefect`` so the SQLite database of the ephemeral server is
    reused between runs (its first start takes ~25 s on 2 cores). Without
    ``debug`` Prefect's console logs are limited to CRITICAL: a failing task
    must not print a traceback — the CLI prints the one-line error.

    With ``PREFECT_API_URL`` set (``prefect server start`` or Prefect Cloud),
    every run and every worker reports to that one server instead.

    Logs of the ``somaflow`` loggers emitted inside a flow or task run go to
    that run's log in the Prefect API (the flow run's page in the UI), the
    stage progress lines included.
    """
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if debug else "CRITICAL")
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "PREFECT_HOME" not in os.environ:
        home = Path(os.environ.get("SOMAFLOW_HOME", Path.home() / ".somaflow")) / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def _die_with_parent() -> None:
    """``preexec_fn`` of a child that must not outlive this process: Linux's
    ``PR_SET_PDEATHSIG`` sends it SIGTERM when its parent dies, SIGKILL included."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() == 1:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def start_prefect_server() -> str | None:
    """Start Prefect's ephemeral API server now, as a child that dies with this process.

    Without ``PREFECT_API_URL`` a flow run starts Prefect's ephemeral server
    (:class:`prefect.server.api.server.SubprocessASGIServer`), an uvicorn
    process that outlives a SIGKILLed parent. This starts the same server first,
    from the calling (main) thread, with ``PR_SET_PDEATHSIG`` set in it, and
    registers it as the instance Prefect's own code asks for (as Prefect's
    ``testing.utilities`` does). Call it right before a flow runs; a no-op with
    ``PREFECT_API_URL`` set, off Linux, or once the server runs.

    Returns
    -------
    str or None
        The server's API URL, or None when none was started here.
    """
    if os.environ.get("PREFECT_API_URL") or not sys.platform.startswith("linux"):
        return None
    from prefect.server.api.server import SubprocessASGIServer

    class _ServerDyingWithParent(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            from prefect.settings import get_current_settings

            # Prefect's own command (prefect.server.api.server.SubprocessASGIServer), plus the preexec_fn
            server_env = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
            return subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent),
                 "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                 "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, **server_env,
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=_die_with_parent)

    import prefect

    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None and existing.running:
        return None
    SubprocessASGIServer._instances.pop(None, None)
    server = _ServerDyingWithParent()
    server.start()
    return server.api_url


def default_workers() -> int:
    """Worker processes for a local cluster: one per core this process may use
    (:data:`dask.system.CPU_COUNT`, which distributed uses: CPU affinity and cgroup quotas respected)."""
    return max(1, int(CPU_COUNT))


def check_cluster_option(cluster: str, spec_file: str | None = None) -> None:
    """Validate ``--cluster`` / ``--cluster-spec`` before anything starts.

    Raises
    ------
    ParameterError
        Unknown cluster kind, or a spec file for a cluster that takes none.
    """
    if cluster not in CLUSTER_KINDS and not cluster.startswith(("tcp://", "tls://")):
        raise ParameterError(
            f"unknown --cluster {cluster!r}. Use 'local', 'threads', 'kubernetes' or a scheduler "
            "address tcp://HOST:PORT."
        )
    if spec_file and cluster != "kubernetes":
        raise ParameterError("--cluster-spec describes a Kubernetes cluster; pass it with --cluster kubernetes.")


def _not_shutdown_noise(record: logging.LogRecord) -> bool:
    """False for the nanny's note that it killed a worker slow to exit while the cluster
    closes (a busy machine at the end of a successful run: nothing for the user to do)."""
    return "still alive after" not in record.getMessage()


def _quiet_distributed() -> None:
    if not log.isEnabledFor(logging.DEBUG):
        # Prefect's logging config lets distributed's INFO chatter through to the console
        for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                     "distributed.http.proxy", "distributed.worker", "distributed.deploy.adaptive"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # a task's exception reaches the caller, which prints its one line: the worker's own
        # "Compute Failed" report with the task's traceback would be a second, longer one
        logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)
        nanny = logging.getLogger("distributed.nanny")
        if _not_shutdown_noise not in nanny.filters:
            nanny.addFilter(_not_shutdown_noise)


#: the workers' timeout to reach the scheduler on the second try of a local cluster's start (default 30 s)
SLOW_START_CONNECT = "180s"


def _local_cluster(**kw: Any) -> Any:
    """A ``LocalCluster``; a start that fails (a nanny or worker timing out on a loaded machine) is
    tried once more with longer timeouts, then is a :class:`ClusterStartError`, not an internal error."""
    import dask
    from distributed import LocalCluster

    # a nanny logs its worker's failed start with the traceback; the error raised here says it in one line
    nanny = logging.getLogger("distributed.nanny")
    level = nanny.level
    if not log.isEnabledFor(logging.DEBUG):
        nanny.setLevel(logging.CRITICAL)
    try:
        try:
            return LocalCluster(**kw)
        except (RuntimeError, TimeoutError, OSError) as exc:
            log.info("the local Dask cluster did not start (%s); trying once more with longer timeouts", exc)
        with dask.config.set({"distributed.comm.timeouts.connect": SLOW_START_CONNECT,
                              "distributed.comm.timeouts.tcp": SLOW_START_CONNECT}):
            return LocalCluster(**kw)
    except (RuntimeError, TimeoutError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__
        detail = f"{exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
        raise ClusterStartError(
            f"the local Dask cluster (--workers {kw.get('n_workers')}) did not start, twice: {detail}. "
            "The machine is short of CPU, memory or processes: rerun when it is less loaded, or with fewer "
            "--workers; a rerun resumes after the last finished stage."
        ) from exc
    finally:
        nanny.setLevel(level)


@contextlib.contextmanager
def dask_client(cluster: str = "local", workers: int | None = None,
                memory_limit: str | None = None, spec_file: str | None = None) -> Iterator[Any]:
    """Start or connect to a Dask cluster and make it the default scheduler.

    Parameters
    ----------
    cluster : str
        ``"local"`` — a ``LocalCluster`` of worker processes with one thread
        each (torch and BLAS stay single-threaded per worker), sized to the
        machine; ``"threads"`` — an in-process threaded cluster (tests,
        ``memory://``); ``"tcp://HOST:PORT"`` — an existing scheduler;
        ``"kubernetes"`` — a ``DaskCluster`` created through the dask-kubernetes
        operator from ``spec_file`` (see :mod:`somaflow.kube`), deleted on exit.
    workers : int, optional
        Worker count for ``local``/``threads`` (default: one per core) and
        ``kubernetes`` (default: the spec's).
    memory_limit : str, optional
        Per-worker memory limit for ``local`` (e.g. ``"2GiB"``; default: an even
        share of the machine).
    spec_file : str, optional
        Values file of the Kubernetes cluster (``kubernetes`` only).

    Yields
    ------
    distributed.Client
    """
    from distributed import Client

    check_cluster_option(cluster, spec_file)
    _quiet_distributed()
    if cluster in ("local", "threads"):
        n = workers or default_workers()
        processes = cluster == "local"
        kw = {"memory_limit": memory_limit} if memory_limit else {}
        with _local_cluster(
            n_workers=n, threads_per_worker=1, processes=processes,
            dashboard_address=":0", silence_logs=logging.ERROR if log.isEnabledFor(logging.DEBUG) else logging.CRITICAL,
            **kw,
        ) as lc, Client(lc) as client:
            log.info("local Dask cluster with %d workers; dashboard %s", n, client.dashboard_link)
            yield client
    elif cluster == "kubernetes":

        spec = kube.load_kube_spec(spec_file)
        if workers:
            spec = spec.model_copy(update={"workers": workers})
        with kube.start_cluster(spec) as kc, Client(kc) as client:
            yield client
    else:
        try:
            client = Client(cluster, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise StoreError(
                f"cannot reach the Dask scheduler at {cluster}: {exc}. Start it or pass --cluster local."
            ) from exc
        with client:
            yield client


# ----------------------------------------------------------------------------- progress


class _ProgressState:
    """Process-wide switch of the console progress bars (set by :func:`console_progress`)."""

    bars = False
    stream: TextIO | None = None


def progress_logger() -> logging.Logger:
    """The logger flows write stage start/end lines to.

    It does not propagate: its records reach the console only through
    :func:`console_progress`'s handler, and the Prefect API through the handler
    Prefect attaches to it (``PREFECT_LOGGING_EXTRA_LOGGERS`` in
    :data:`PREFECT_DEFAULTS`). Inside a flow or task run they become the run's
    log lines in the Prefect UI.
    """
    logger = logging.getLogger(PROGRESS_LOGGER)
    logger.propagate = False
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    return logger


def _on_console(record: logging.LogRecord) -> bool:
    return bool(getattr(record, CONSOLE_FLAG, True))


@contextlib.contextmanager
def console_progress(stream: TextIO | None = None, bars: bool | None = None) -> Iterator[None]:
    """Print progress lines (and, on a terminal, Dask progress bars) on ``stream``.

    Parameters
    ----------
    stream : file, optional
        Where to print; default ``sys.stderr`` (stdout stays machine-readable
        under ``--json``).
    bars : bool, optional
        Show a progress bar of the Dask tasks of each stage; default: when
        ``stream`` is a terminal.
    """
    stream = stream or sys.stderr
    logger = progress_logger()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_on_console)
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    _ProgressState.bars = stream.isatty() if bars is None else bars
    _ProgressState.stream = stream
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
        _ProgressState.bars = False
        _ProgressState.stream = None


def _scheduler_backlog(dask_scheduler: Any) -> int:
    """Tasks on the scheduler that have not finished yet (runs on the scheduler).

    Read from distributed's progress diagnostics (:class:`distributed.diagnostics.progress.AllProgress`,
    the plugin behind the dashboard's progress view: task keys by state and key prefix, kept
    up to date on every transition), registered on first use; no walk over every task.
    """
    plugin = dask_scheduler.plugins.get(AllProgress.name)
    if plugin is None:
        plugin = AllProgress(dask_scheduler)  # registers itself with the scheduler
    return sum(len(keys) for state in _PENDING_STATES for keys in plugin.state[state].values())


def bar_fraction(backlog: int, peak: int) -> float:
    """Fraction done of a stage whose task backlog peaked at ``peak`` and is now ``backlog``."""
    if peak <= 0:
        return 0.0
    return min(1.0, max(0.0, (peak - backlog) / peak))


@contextlib.contextmanager
def _task_bar(label: str, interval: float = 0.5) -> Iterator[None]:
    """A rich progress bar over the scheduler's backlog while the block runs."""
    from distributed import default_client
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        client = default_client()
    except ValueError:  # no distributed client: nothing to watch
        yield
        return
    stop = threading.Event()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[tasks]}"),
                        TimeElapsedColumn(), console=Console(file=_ProgressState.stream), transient=True)
    bar = progress.add_task(escape(label), total=1.0, tasks="")

    def poll() -> None:
        peak = 0
        while not stop.wait(interval):
            try:
                backlog = int(client.run_on_scheduler(_scheduler_backlog))
            except Exception:  # the cluster went away; the stage itself will report it
                return
            peak = max(peak, backlog)
            progress.update(bar, completed=bar_fraction(backlog, peak),
                            tasks=f"{peak - backlog}/{peak} tasks" if peak else "")

    thread = threading.Thread(target=poll, daemon=True)
    with progress:
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@contextlib.contextmanager
def stage_progress(session: str, stage: str) -> Iterator[None]:
    """Report a stage's start and end (with elapsed time) on the progress logger.

    With bars enabled (a terminal), a progress bar of the stage's Dask tasks is
    shown while it runs. A failing stage is reported as failed and re-raised.
    """
    plog = progress_logger()
    plog.info("[%s] %s: started", session, stage)
    t0 = time.perf_counter()
    try:
        if _ProgressState.bars:
            with _task_bar(f"[{session}] {stage}"):
                yield
        else:
            yield
    except BaseException:
        plog.info("[%s] %s: failed after %.1f s", session, stage, time.perf_counter() - t0)
        raise
    plog.info("[%s] %s: done in %.1f s", session, stage, time.perf_counter() - t0)
