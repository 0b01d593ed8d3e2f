"""Movies as ``(frame, y, x)`` arrays of whole frames: one check and one chunking for the library.

:func:`check_movie` refuses what no stage can read (wrong dims, a non-real
dtype, too few frames or too small frames) with a message naming the stage;
:func:`whole_frames` returns the dask array of whole frames the per-frame
stages map over.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import xarray as xr

from somaflow.errors import InputError
from somaflow.io.chunks import plan_frame_chunks


def check_movie(movie: xr.DataArray, who: str, *, min_frames: int = 1, min_side: int = 1,
                why: str = "") -> None:
    """Refuse a movie ``who`` cannot read.

    Parameters
    ----------
    movie : xarray.DataArray
        Should be (frame, y, x), integer or floating.
    who : str
        The stage, for the messages.
    min_frames, min_side : int
        Fewest frames, smallest frame side (px).
    why : str
        What the frames are needed for (``" to estimate the noise"``).

    Raises
    ------
    InputError
    """
    if not isinstance(movie, xr.DataArray):
        raise InputError(f"{who} needs an xarray.DataArray with dims ('frame', 'y', 'x'), got "
                         f"{type(movie).__name__}. Wrap it: xr.DataArray(arr, dims=('frame', 'y', 'x')).")
    if tuple(movie.dims) != ("frame", "y", "x"):
        raise InputError(
            f"{who} needs a movie with dims ('frame', 'y', 'x'), got {tuple(movie.dims)}. "
            "Transpose or rename it (movie.transpose('frame', 'y', 'x'))."
        )
    if movie.size == 0:
        raise InputError(f"{who} got an empty movie of shape {movie.shape}; pass at least one frame.")
    if not (np.issubdtype(movie.dtype, np.integer) or np.issubdtype(movie.dtype, np.floating)):
        raise InputError(f"{who}: movie dtype {movie.dtype} is not a real number type; convert it to float32.")
    if movie.sizes["frame"] < min_frames:
        raise InputError(f"{who} needs at least {min_frames} frames{why}, got {movie.sizes['frame']}. "
                         "Pass a longer movie.")
    if min(movie.sizes["y"], movie.sizes["x"]) < min_side:
        raise InputError(f"{who} needs frames of at least {min_side}x{min_side} px, got "
                         f"{movie.sizes['y']}x{movie.sizes['x']}.")


def whole_frames(movie: xr.DataArray, *, memory_budget: int | None = None, keep_chunk_bytes: bool = False,
                 min_chunk_frames: int = 1) -> da.Array:
    """The movie as a dask array chunked along frames only, each chunk whole frames.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), dask- or numpy-backed (see :func:`check_movie`).
    memory_budget : int, optional
        Bytes of float32 work per chunk for numpy data: frame chunks planned by
        :func:`somaflow.io.chunks.plan_frame_chunks`; None: dask's ``"auto"``.
    keep_chunk_bytes : bool
        A dask array split spatially is rechunked to whole frames with about
        the bytes of its chunks (else its frame chunks are kept).
    min_chunk_frames : int
        Frame chunks shorter than this are merged (to the median chunk length,
        at least this many frames).

    Returns
    -------
    dask.array.Array
        (frame, y, x), the input's dtype; a dask array that already fits is
        returned as is.
    """
    data = movie.data
    n_frames, ny, nx = movie.shape
    if not isinstance(data, da.Array):
        frames = plan_frame_chunks((n_frames, ny, nx), 4, memory_budget) if memory_budget else "auto"
        return da.from_array(np.asarray(data), chunks=(frames, -1, -1))
    target: dict[int, int] = {}
    lengths = data.chunks[0]
    short = min(lengths[:-1]) if len(lengths) > 1 else n_frames
    if short < min(min_chunk_frames, n_frames):
        target[0] = min(n_frames, max(min_chunk_frames, int(np.median(lengths))))
    if data.numblocks[1] != 1 or data.numblocks[2] != 1:
        if keep_chunk_bytes:
            target[0] = max(1, min(n_frames, math.prod(data.chunksize) // (ny * nx)))
        target.update({1: -1, 2: -1})
    return data.rechunk(target) if target else data
