"""``dask scheduler --preload`` module: measures every task the scheduler receives as the
pickled size of its run spec, and appends ``largest BYTES KEY`` (whenever the record grows) and
``over BYTES KEY`` (for each task over ``SOMAFLOW_TASK_SIZE_LIMIT``, default 1 MiB) lines to
``SOMAFLOW_TASK_SIZE_LOG``."""

import os

import cloudpickle
from distributed.diagnostics.plugin import SchedulerPlugin

LIMIT = int(os.environ.get("SOMAFLOW_TASK_SIZE_LIMIT", str(1 << 20)))


class TaskSizes(SchedulerPlugin):
    name = "somaflow-task-sizes"

    def __init__(self, path: str) -> None:
        self.path = path
        self.largest = 0

    def update_graph(self, scheduler, *, tasks=(), **kwargs) -> None:
        lines = []
        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is None or ts.run_spec is None:
                continue
            size = len(cloudpickle.dumps(ts.run_spec, protocol=5))
            if size > self.largest:
                self.largest = size
                lines.append(f"largest {size} {key!r}")
            if size > LIMIT:
                lines.append(f"over {size} {key!r}")
        lines.append(f"graph {len(tasks)}")
        with open(self.path, "a") as fh:
            fh.write("\n".join(lines) + "\n")


def dask_setup(scheduler) -> None:
    path = os.environ.get("SOMAFLOW_TASK_SIZE_LOG")
    if path:
        scheduler.add_plugin(TaskSizes(path))
