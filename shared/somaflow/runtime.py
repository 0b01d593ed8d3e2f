"""Process-level set-up for the CLI: Prefect's environment and the Dask cluster.

The library itself never starts clusters or servers; the CLI and the flows do,
through these helpers.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from somaflow.errors import ParameterError, StoreError

log = logging.getLogger(__name__)

#: environment defaults that keep Prefect's ephemeral mode offline, quiet and patient
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_UI_ENABLED": "false",
    "PREFECT_LOGGING_TO_API_ENABLED": "false",
}


def configure_prefect_env(debug: bool = False) -> None:
    """Set Prefect defaults in ``os.environ`` unless the user set them already.

    Must run before ``prefect`` is imported. ``PREFECT_HOME`` defaults to
    ``~/.somaflow/prefect`` so the SQLite database of the ephemeral server is
    reused between runs (its first start takes ~25 s on 2 cores). Without
    ``debug`` Prefect's console logs are limited to CRITICAL: a failing task
    must not print a traceback — the CLI prints the one-line error.
    """
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO" if debug else "CRITICAL")
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if "PREFECT_HOME" not in os.environ:
        home = Path(os.environ.get("SOMAFLOW_HOME", Path.home() / ".somaflow")) / "prefect"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def default_workers() -> int:
    """Worker processes for a local cluster: one per core."""
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def dask_client(cluster: str = "local", workers: int | None = None,
                memory_limit: str | None = None) -> Iterator[object]:
    """Start or connect to a Dask cluster and make it the default scheduler.

    Parameters
    ----------
    cluster : str
        ``"local"`` — a ``LocalCluster`` of worker processes with one thread
        each (torch and BLAS stay single-threaded per worker);
        ``"threads"`` — an in-process threaded cluster (tests, ``memory://``);
        ``"tcp://HOST:PORT"`` — an existing scheduler.
    workers : int, optional
        Worker count for ``local``/``threads`` (default: one per core).
    memory_limit : str, optional
        Per-worker memory limit for ``local`` (e.g. ``"2GiB"``; default: an even
        share of the machine).

    Yields
    ------
    distributed.Client
    """
    from distributed import Client, LocalCluster

    n = workers or default_workers()
    if not log.isEnabledFor(logging.DEBUG):
        # Prefect's logging config lets distributed's INFO chatter through to the console
        for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.core",
                     "distributed.http.proxy", "distributed.worker"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if cluster == "local" or cluster == "threads":
        processes = cluster == "local"
        kw = {"memory_limit": memory_limit} if memory_limit else {}
        with LocalCluster(
            n_workers=n, threads_per_worker=1, processes=processes,
            dashboard_address=":0", silence_logs=logging.ERROR, **kw,
        ) as lc, Client(lc) as client:
            log.info("local Dask cluster with %d workers; dashboard %s", n, client.dashboard_link)
            yield client
    elif cluster.startswith(("tcp://", "tls://")):
        try:
            client = Client(cluster, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise StoreError(
                f"cannot reach the Dask scheduler at {cluster}: {exc}. Start it or pass --cluster local."
            ) from exc
        with client:
            yield client
    else:
        raise ParameterError(
            f"unknown --cluster {cluster!r}. Use 'local', 'threads' or a scheduler address tcp://HOST:PORT."
        )
