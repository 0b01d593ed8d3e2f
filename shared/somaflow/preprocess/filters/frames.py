"""Movies as dask arrays of whole frames, and per-frame maps over them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import dask.array as da
import numpy as np
import xarray as xr

from somaflow import frames
from somaflow.frames import check_movie
from somaflow.preprocess.filters.params import DEFAULT_MEMORY_BUDGET

log = logging.getLogger(__name__)


def whole_frames(movie: xr.DataArray, who: str = "this filter") -> da.Array:
    """A movie as a dask array chunked along frames only, each chunk whole frames.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), integer or floating dtype, dask- or numpy-backed.
    who : str
        The calling function's name, for error messages.

    Returns
    -------
    dask.array.Array
        (frame, y, x), the input's dtype. A dask array that already has
        single y and x chunks is returned as is; one split spatially is
        rechunked to whole frames with about the same bytes per chunk;
        numpy data gets frame chunks planned by
        :func:`somaflow.io.chunks.plan_frame_chunks` for
        :data:`DEFAULT_MEMORY_BUDGET` of float32 work.

    Raises
    ------
    InputError
        Wrong dims, no frames, or a non-real dtype.
    """
    check_movie(movie, who)
    return frames.whole_frames(movie, memory_budget=DEFAULT_MEMORY_BUDGET, keep_chunk_bytes=True)


def _like(data: da.Array, movie: xr.DataArray, **attrs: object) -> xr.DataArray:
    """``data`` wrapped with the dims, coords, name and attrs (updated by ``attrs``) of ``movie``."""
    return xr.DataArray(
        data, dims=movie.dims, coords=movie.coords, name=movie.name, attrs={**movie.attrs, **attrs}
    )


def _per_frame(func: Callable[..., np.ndarray], data: da.Array, **kwargs: object) -> da.Array:
    """``func(block, **kwargs)`` on every frame chunk, float32 out, same chunks."""
    return da.map_blocks(func, data, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32), **kwargs)

