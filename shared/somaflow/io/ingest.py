"""Convert any supported input into the movie schema (``somaflow ingest``)."""

from __future__ import annotations

import logging
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from somaflow.errors import InputError, OutputConflictError, ResultExistsError, StoreError
from somaflow.io import guard, stores
from somaflow.io.chunks import plan_frame_chunks
from somaflow.io.readers import check_finite_sample, open_input
from somaflow.io.readers.base import MAX_FRAME_PIXELS
from somaflow.io.schema import make_movie_dataset, output_state, write_movie

log = logging.getLogger(__name__)

#: default per-chunk memory budget of ingest (bytes)
DEFAULT_MEMORY_BUDGET = 256 << 20


def load_movie(
    url: str,
    *,
    fps: float | None = None,
    modality: str | None = None,
    dataset: str | None = None,
    axes: str = "tyx",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    storage_options: dict[str, Any] | None = None,
    with_checksum: bool = True,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
) -> xr.DataArray:
    """Open any supported input lazily as a checked (frame, y, x) movie.

    ``fps`` and ``modality`` given here win over what the file records. The
    returned array carries attrs ``fps``, ``modality``, ``source`` and
    ``source_checksum`` (:func:`somaflow.io.stores.checksum`: from the store's
    listing, no data read on the client) and is rechunked to frame-contiguous chunks
    planned from ``memory_budget``. A zarr input is a somaflow movie, a bare array or
    an array of a group (``dataset``), as :func:`~somaflow.io.readers.open_input`
    reads it; declared frame sizes above ``max_frame_pixels`` or the memory budget
    are refused before anything is read.

    Raises
    ------
    InputError
        Unsupported or malformed input, unknown frame rate, non-finite or
        constant samples.
    StoreError
        ``url`` does not exist or cannot be read.
    """
    url = stores.normalize_url(url)
    if not stores.exists(url, storage_options):
        raise StoreError(f"{url} does not exist. Check the path or URL.")
    movie = open_input(url, dataset=dataset, axes=axes, memory_budget=memory_budget,
                       storage_options=storage_options, max_frame_pixels=max_frame_pixels)
    attrs = dict(movie.attrs)
    fps = fps if fps is not None else attrs.get("fps")
    if fps is None:
        raise InputError(f"{url} does not record a frame rate. Pass --fps (in Hz).")
    modality = modality or attrs.get("modality") or "2p"
    if movie.sizes["frame"] < 2:
        raise InputError(f"{url} holds {movie.sizes['frame']} frame(s); a movie needs at least 2.")
    check_finite_sample(movie)
    frames = plan_frame_chunks(tuple(movie.shape), movie.dtype.itemsize, memory_budget)
    movie = movie.chunk({"frame": frames, "y": -1, "x": -1})
    checksum = attrs.get("source_checksum") or (
        stores.checksum(url, storage_options) if with_checksum else ""
    )
    movie.attrs = {
        "fps": float(fps),
        "modality": modality,
        "source": attrs.get("source", url),
        "source_checksum": checksum,
    }
    if attrs.get("pixel_size_um"):  # recorded by the file (OME/ImageJ TIFF, NWB imaging plane)
        movie.attrs["pixel_size_um"] = float(attrs["pixel_size_um"])
    return movie


def _check_block(block: np.ndarray) -> np.ndarray:
    if block.dtype.kind == "f" and not np.isfinite(block).all():
        raise InputError(
            "the movie contains NaN or infinite values. Fix or drop the bad frames before ingesting."
        )
    return block


def checked(movie: xr.DataArray) -> xr.DataArray:
    """Return ``movie`` with a lazy per-chunk finiteness check folded into its graph."""
    if movie.dtype.kind != "f":
        return movie
    data = da.map_blocks(_check_block, movie.data, dtype=movie.dtype)
    return movie.copy(data=data)


def ingest(
    url: str,
    out_url: str,
    *,
    fps: float | None = None,
    modality: str | None = None,
    dataset: str | None = None,
    axes: str = "tyx",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Convert ``url`` into a movie-schema zarr at ``out_url``.

    The input is never modified: an output that is, holds or lies inside the
    input is refused, with or without ``overwrite``. The output counts only
    once it is complete (``stores.atomic_output``: renamed into place on a
    local disk, committed by its ``complete`` marker on object stores); NaNs
    anywhere abort the write and leave nothing behind.

    Returns
    -------
    str
        The normalized output URL.

    Raises
    ------
    OutputConflictError
        ``out_url`` overlaps the input, or holds something other than a
        finished somaflow output and ``overwrite`` is False (exit status 2).
    ResultExistsError
        ``out_url`` holds a finished somaflow output and ``overwrite`` is False.
    """
    out_url = stores.normalize_url(out_url)
    guard.check_output_apart(out_url, [url])
    state = output_state(out_url, storage_options=storage_options)
    if state == "complete" and not overwrite:
        raise ResultExistsError(
            f"{out_url} already exists. Pass --overwrite to replace it, or choose another output."
        )
    if state != "missing" and not overwrite:
        raise OutputConflictError(
            f"{out_url} already exists and is not a finished somaflow movie. Choose another --out, "
            "or pass --overwrite to replace it."
        )
    movie = load_movie(
        url, fps=fps, modality=modality, dataset=dataset, axes=axes,
        memory_budget=memory_budget, storage_options=storage_options,
    )
    a = movie.attrs
    ds = make_movie_dataset(
        checked(movie), fps=a["fps"], modality=a["modality"], source=a["source"],
        source_checksum=a["source_checksum"],
        extra_attrs={"pixel_size_um": a["pixel_size_um"]} if "pixel_size_um" in a else None,
    )
    log.info("ingesting %s -> %s (%s frames of %sx%s)", url, out_url, *movie.shape)
    return write_movie(ds, out_url, overwrite=overwrite, storage_options=storage_options)
