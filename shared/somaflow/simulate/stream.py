"""A simulated movie streamed chunk by chunk (:func:`iter_movie_chunks`) or as a lazy
dask array (:func:`as_dask_array`); both render frames independently of the chunking."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import dask
import dask.array as da
import numpy as np

from somaflow.errors import ParameterError
from somaflow.simulate.model import Simulation, simulate
from somaflow.simulate.render import BLOCK, render_frames

log = logging.getLogger(__name__)


def iter_movie_chunks(
    sim: Simulation | Any,
    seed: int = 0,
    frames_per_chunk: int = 4 * BLOCK,
) -> Iterator[np.ndarray]:
    """Yield the movie as consecutive (frames, y, x) uint16 chunks with bounded memory.

    Parameters
    ----------
    sim : Simulation, SimulationParams or preset name
        A simulation, or parameters from which one is built with ``seed``.
    seed : int
        Used only when ``sim`` is not already a :class:`Simulation`.
    frames_per_chunk : int
        Frames per yielded chunk (the last may be shorter). Multiples of
        :data:`BLOCK` avoid recomputing frames at chunk edges.

    Yields
    ------
    ndarray, (frames, y, x) uint16
        Identical, concatenated, to ``Simulation.movie``.
    """
    if not isinstance(sim, Simulation):
        sim = simulate(sim, seed=seed)
    if frames_per_chunk < 1:
        raise ParameterError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}.")
    T = sim.params.n_frames
    for start in range(0, T, frames_per_chunk):
        stop = min(start + frames_per_chunk, T)
        log.debug("rendering frames %d:%d of %d", start, stop, T)
        yield render_frames(sim, start, stop)


def as_dask_array(sim: Simulation, frames_per_chunk: int = 4 * BLOCK) -> da.Array:
    """The movie as a lazy dask array, (frame, y, x) uint16, chunked along frames.

    Each chunk renders independently (see the module notes), so the array can be
    computed in parallel on any scheduler and written to zarr chunk by chunk.
    """
    if frames_per_chunk < 1:
        raise ParameterError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}.")
    scene = dask.delayed(sim.scene, pure=True)
    T = sim.params.n_frames
    Y, X = sim.params.shape
    parts = []
    for start in range(0, T, frames_per_chunk):
        stop = min(start + frames_per_chunk, T)
        part = dask.delayed(render_frames, pure=True)(scene, start, stop)
        parts.append(da.from_delayed(part, shape=(stop - start, Y, X), dtype=np.uint16))
    return da.concatenate(parts, axis=0)
