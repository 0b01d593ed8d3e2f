"""A Dask cluster whose processes share nothing but the object store (issue 22).

The scheduler, each worker and the client run as separate processes, each with
its own private ``TMPDIR``, ``HOME``, Dask temporary directory and working
directory. Every process loads ``isolation/sitecustomize.py``, whose audit hook
records any file it opens under another process's private directory; the
scheduler loads ``isolation/task_sizes.py``, which records the pickled size of
every task it receives. :meth:`IsolatedCluster.violations` and
:meth:`IsolatedCluster.task_sizes` read what they saw.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port, kill_group

ISOLATION = Path(__file__).resolve().parent / "isolation"


class IsolatedCluster:
    """``dask scheduler`` + ``n_workers`` × ``dask worker`` + private dirs for a client.

    Parameters
    ----------
    root : Path
        A folder for the processes' private directories and the observers' logs.
    env : dict
        Extra environment of every process (S3 endpoint and credentials ...).
    n_workers : int
        Worker processes (one thread each).
    memory_limit : str
        Each worker's ``--memory-limit``.
    """

    def __init__(self, root: Path, env: dict[str, str], n_workers: int = 2, memory_limit: str = "2GiB") -> None:
        self.root = root
        self.env = env
        self.names = ["scheduler", *(f"worker{i}" for i in range(n_workers)), "client"]
        self.private = {n: root / n for n in self.names}
        self.logs = root / "observers"
        self.memory_limit = memory_limit
        self.procs: list[subprocess.Popen] = []
        self.address = f"tcp://127.0.0.1:{free_port()}"

    def process_env(self, name: str) -> dict[str, str]:
        """The environment of process ``name``: private dirs, the audit hook, the extra env."""
        own = self.private[name]
        others = [str(p) for n, p in self.private.items() if n != name]
        env = {**os.environ, **self.env}
        env.update({
            "HOME": str(own), "TMPDIR": str(own / "tmp"), "TEMP": str(own / "tmp"), "TMP": str(own / "tmp"),
            "DASK_TEMPORARY_DIRECTORY": str(own / "tmp" / "dask"), "PREFECT_HOME": str(own / "prefect"),
            "XDG_CACHE_HOME": str(own / "cache"), "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ISOLATION), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "SOMAFLOW_AUDIT_FORBIDDEN": os.pathsep.join(others),
            "SOMAFLOW_AUDIT_LOG": str(self.logs / f"{name}.opens"),
        })
        return env

    def __enter__(self) -> IsolatedCluster:
        for p in [*self.private.values(), self.logs]:
            (p / "tmp" / "dask").mkdir(parents=True, exist_ok=True)
        bindir = Path(sys.executable).parent
        port = self.address.rsplit(":", 1)[1]
        env = self.process_env("scheduler")
        env["SOMAFLOW_TASK_SIZE_LOG"] = str(self.logs / "task_sizes.log")
        self._start("scheduler", [str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port,
                                  "--no-dashboard", "--preload", str(ISOLATION / "task_sizes.py")], env)
        for name in self.names[1:-1]:
            self._start(name, [str(bindir / "dask"), "worker", self.address, "--host", "127.0.0.1",
                               "--nthreads", "1", "--no-dashboard", "--name", name,
                               "--memory-limit", self.memory_limit], self.process_env(name))
        from distributed import Client

        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(len(self.names) - 2, timeout=180)
        return self

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(cmd, env=env, cwd=self.private[name], stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True))

    def __exit__(self, *exc: object) -> None:
        for p in self.procs[::-1]:
            kill_group(p, 15)

    def run_client(self, *args: str, timeout: float = 900, extra_env: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess:
        """Run ``somaflow ARGS`` as the client process, in its private directories."""
        env = {**self.process_env("client"), **(extra_env or {})}
        exe = Path(sys.executable).with_name("somaflow")
        return subprocess.run([str(exe), *args], env=env, cwd=self.private["client"], capture_output=True,
                              text=True, timeout=timeout)

    def violations(self) -> dict[str, list[str]]:
        """Files each process opened under another process's private directory."""
        out = {}
        for name in self.names:
            f = self.logs / f"{name}.opens"
            lines = f.read_text().splitlines() if f.exists() else []
            if lines:
                out[name] = lines
        return out

    def task_sizes(self) -> tuple[int, list[str]]:
        """The largest pickled task the scheduler received (bytes) and the tasks over the limit."""
        f = self.logs / "task_sizes.log"
        lines = f.read_text().splitlines() if f.exists() else []
        largest = max((int(line.split()[1]) for line in lines if line.startswith("largest")), default=0)
        return largest, [line for line in lines if line.startswith("over")]

    def worker_logs(self) -> str:
        return "\n".join((self.logs / f"{n}.log").read_text()[-3000:] for n in self.names[:-1])

    def wait_idle(self, seconds: float = 1.0) -> None:
        time.sleep(seconds)
