"""The somaflow exception hierarchy.

Every error a user can cause derives from :class:`SomaflowError`. Messages
name the problem *and* the fix; the CLI prints them on one line.
"""

from __future__ import annotations


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


class ServiceError(SomaflowError):
    """The inference service failed or is unreachable."""

    exit_code = 4
