"""The somaflow exception hierarchy.

Every error a user can cause derives from :class:`SomaflowError`. Messages
name the problem *and* the fix; the CLI prints them on one line.
"""

from __future__ import annotations

import errno


class SomaflowError(Exception):
    """Base class of every error somaflow raises on purpose."""

    #: process exit status the CLI uses for this error class
    exit_code: int = 1


class InputError(SomaflowError):
    """The input is unusable: wrong format, corrupt, truncated, wrong dims, NaNs."""

    exit_code = 2


class ParameterError(SomaflowError, ValueError):
    """A parameter or a combination of options is invalid."""

    exit_code = 2


class StoreError(SomaflowError):
    """A store cannot be read or written: unreachable URL, missing object, permissions."""

    exit_code = 3


class StoreUnavailableError(StoreError):
    """A store did not answer (refused or reset connections, 5xx, timeouts) after every retry."""


class ResultExistsError(StoreError):
    """The output already exists and ``overwrite`` was not requested."""


class ResultLockedError(StoreError):
    """Another run holds the lease of the output (:mod:`somaflow.io.lease`)."""


class IncompleteResultError(StoreError):
    """A result exists but was never marked ``complete``: it is unfinished."""


class OutputConflictError(SomaflowError):
    """An output location somaflow must not write to: it is, holds or lies inside an
    input, or it is occupied by something that is not an unfinished somaflow result."""

    exit_code = 2


class ClusterStartError(SomaflowError):
    """The local Dask cluster did not start (the machine short of CPU, memory or processes):
    worth a retry later, not a defect (``EX_TEMPFAIL``)."""

    exit_code = 75


class ServiceError(SomaflowError):
    """The inference service failed or is unreachable."""

    exit_code = 4


#: errno values that mean the output's store is full or read-only: a store problem, not a defect
_STORE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def store_full(exc: BaseException, where: str = "") -> StoreError | None:
    """The :class:`StoreError` for an ``OSError`` saying that a store is full or read-only
    (``ENOSPC`` ... raised anywhere, a Dask task's write included), else None."""
    if not isinstance(exc, OSError) or exc.errno not in _STORE_ERRNOS:
        return None
    place = where or exc.filename or "the output"
    what = "full" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "read-only"
    return StoreError(
        f"cannot write {place}: {exc.strerror or exc} (the disk is {what}). Free space or choose another "
        "--out, then rerun: it resumes after the last finished stage."
    )


def exit_code(exc: BaseException) -> int:
    """The exit status for ``exc``, by cause: a somaflow error's own, 3 for a full or read-only
    store, 70 (internal) for anything else."""
    if isinstance(exc, SomaflowError):
        return exc.exit_code
    return 3 if store_full(exc) is not None else 70
