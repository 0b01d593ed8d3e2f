"""Loaded by every process of an isolated-cluster test (PYTHONPATH): records any file this
process opens under another process's private directory.

``SOMAFLOW_AUDIT_FORBIDDEN``: the other processes' private directories (os.pathsep-separated);
``SOMAFLOW_AUDIT_LOG``: where to append one line per violation (opened before the hook exists).
"""

import os
import sys

_forbidden = tuple(os.path.realpath(d) + os.sep for d in os.environ.get("SOMAFLOW_AUDIT_FORBIDDEN", "").split(os.pathsep) if d)
_log = os.environ.get("SOMAFLOW_AUDIT_LOG")

if _forbidden and _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _busy = [False]

    def _hook(event, args):
        if event != "open" or _busy[0] or not args:
            return
        path = args[0]
        if isinstance(path, int):
            return
        try:
            path = os.fsdecode(os.fspath(path))
        except TypeError:
            return
        _busy[0] = True
        try:
            full = os.path.realpath(path) if os.path.isabs(path) else os.path.realpath(os.path.join(os.getcwd(), path))
            if (full + os.sep).startswith(_forbidden) or full.startswith(_forbidden):
                os.write(_fd, f"{os.getpid()} {full}\n".encode())
        finally:
            _busy[0] = False

    sys.addaudithook(_hook)
