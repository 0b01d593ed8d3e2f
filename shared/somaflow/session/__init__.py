"""The session API: one movie in, one result out, stage by stage.

Above the algorithms and below the command line and the Prefect flows:
:mod:`~somaflow.session.plan` (parameters of a session, its plan, the checks
on its outputs), :mod:`~somaflow.session.layout` (where each stage writes),
:mod:`~somaflow.session.stages` (each stage as a library call from stores to
stores, and the runner that skips current ones) and
:mod:`~somaflow.session.extract` (the extraction methods, wired). The session
flow in ``flows/session.py`` calls these and nothing else.
"""

from __future__ import annotations

from somaflow.session.extract import find_units, morphology_units
from somaflow.session.layout import stage_outputs
from somaflow.session.plan import (
    check_session,
    end_failed_session,
    plan_session,
    resolve_movie_info,
    session_params,
    start_session,
)
from somaflow.session.stages import StageRunner

__all__ = [
    "StageRunner",
    "check_session",
    "end_failed_session",
    "find_units",
    "morphology_units",
    "plan_session",
    "resolve_movie_info",
    "session_params",
    "stage_outputs",
    "start_session",
]
