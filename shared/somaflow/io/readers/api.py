"""Open any supported input as a lazy ``(frame, y, x)`` movie (:func:`open_input`), and check a
sample of it for NaNs (:func:`check_finite_sample`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import xarray as xr

from somaflow.errors import InputError, ParameterError
from somaflow.io import stores
from somaflow.io.readers.base import (
    MAX_FRAME_PIXELS,
    _assemble,
    _check_dtype,
    _check_nonempty,
    _file_info,
    _frame_chunks,
    _name,
    _parse_axes,
    _plan_axes,
    check_declared_size,
)
from somaflow.io.readers.formats import detect_format
from somaflow.io.readers.hdf5 import _open_hdf5
from somaflow.io.readers.nwb import _open_nwb
from somaflow.io.readers.suite2p import _open_suite2p
from somaflow.io.readers.tiff import _open_tiff, _open_tiff_folder
from somaflow.io.readers.video import _open_video
from somaflow.io.readers.zarr_store import _open_zarr_input

log = logging.getLogger(__name__)


def open_input(
    url: str,
    *,
    dataset: str | None = None,
    axes: str = "tyx",
    frames_per_chunk: int | None = None,
    memory_budget: int = 256 << 20,
    storage_options: dict[str, Any] | None = None,
    plane: int | None = None,
    channel: int | None = None,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
) -> xr.DataArray:
    """Open a supported input lazily as a (frame, y, x) movie.

    Parameters
    ----------
    url : str
        Local path or fsspec URL (``s3://``, ``memory://`` ...) of a file or folder
        in one of :data:`FORMATS`.
    dataset : str, optional
        The array inside an HDF5 file or zarr group (e.g. ``"imaging"``), or the
        imaging series of an NWB file (``"TwoPhotonSeries"``). Guessed when the
        file has exactly one candidate.
    axes : str
        Axis order of the stored array: a permutation of ``"tyx"`` (``"yxt"`` for
        SIMA's HDF5), optionally with ``z`` (plane) and ``c`` (channel) for extra
        dims; singleton z / c axes are dropped. TIFF axes apply to the shape
        tifffile reports, which already lacks singleton axes: ``z`` / ``c``
        letters that it dropped are ignored.
    frames_per_chunk : int, optional
        Frames per dask chunk; planned from ``memory_budget`` with
        :func:`~somaflow.io.chunks.plan_frame_chunks` when None.
    memory_budget : int
        Bytes per task used to plan the chunks.
    storage_options : dict, optional
        fsspec options for remote URLs.
    plane, channel : int, optional
        Which z plane / channel to read when the ``z`` / ``c`` axis has more than
        one entry (singleton axes are dropped without them).
    max_frame_pixels : int
        Largest frame (y * x) accepted; with ``memory_budget`` checked on the
        declared shape before anything is read (:func:`~.base.check_declared_size`).

    Returns
    -------
    xarray.DataArray
        dims ``(frame, y, x)``, the file's dtype (integer or float), backed by a
        dask array chunked along ``frame`` only. Nothing but metadata is read
        here. attrs: ``source`` (normalized URL), ``format``, ``fps`` (Hz, when the
        file records it: NWB rate, Suite2p ``fs``, video frame rate, ImageJ
        ``finterval``/``fps``, ScanImage, OME or tifffile metadata), ``dataset``
        where one was used; a somaflow movie zarr keeps its own attrs.

    Raises
    ------
    StoreError
        ``url`` does not exist or cannot be reached.
    InputError
        Unsupported format, a single 2-D image, fewer than 2 frames, an empty,
        truncated or corrupt file, non-numeric pixels, several candidate arrays
        without ``dataset``, extra non-singleton axes without a selection, or a
        declared frame size above the limits.
    ParameterError
        Malformed ``axes``, ``frames_per_chunk``, ``plane``/``channel``, or a
        ``dataset`` given for a format that has none.
    """
    url = stores.normalize_url(url)
    axes = _parse_axes(axes)
    so = storage_options
    fmt = detect_format(url, so)
    if dataset is not None and fmt not in ("hdf5", "nwb", "zarr"):
        raise ParameterError(
            f"--dataset applies to HDF5, NWB and zarr inputs, not to {fmt} ({url})."
        )
    info = _file_info(url, so)
    _check_nonempty(url, info)
    version = (
        info.get("size"),
        info.get("mtime"),
        info.get("ETag"),
        str(info.get("LastModified", "")),
    )
    attrs: dict[str, Any]
    hint = ""
    if fmt == "zarr":
        return _open_zarr_input(
            url, so, dataset, axes, frames_per_chunk, memory_budget, plane, channel, max_frame_pixels
        )
    if fmt == "tiff":
        src, attrs, hint = _open_tiff(url, so, info)
        squeezed = "".join(a for a in axes if a not in "zc")
        if len(axes) != src.ndim and len(squeezed) == src.ndim:
            axes = squeezed  # tifffile already dropped the singleton z / c axes
    elif fmt == "tiff-folder":
        src, attrs = _open_tiff_folder(url, so)
        version = src.files
    elif fmt == "hdf5":
        src, attrs, hint = _open_hdf5(url, so, dataset)
    elif fmt == "nwb":
        src, attrs, hint = _open_nwb(url, so, dataset)
    elif fmt == "avi":
        src, attrs, hint = _open_video(url, so)
    else:
        src, attrs, hint = _open_suite2p(url, so)
        bin_info = _file_info(src.url, so)
        version = (bin_info.get("size"), bin_info.get("mtime"))
    _check_dtype(src.dtype, url)
    plan = _plan_axes(src.shape, axes, url, plane=plane, channel=channel, hint=hint)
    check_declared_size(plan.out_shape, url, memory_budget=memory_budget, max_frame_pixels=max_frame_pixels)
    n = _frame_chunks(plan.out_shape, src.dtype.itemsize, frames_per_chunk, memory_budget)
    attrs = {"source": url, **attrs, "format": fmt}
    if plane is not None or channel is not None:
        attrs.update({k: v for k, v in (("plane", plane), ("channel", channel)) if v is not None})
    name = _name(
        fmt,
        src.url,
        getattr(src, "dataset", None),
        axes,
        src.shape,
        str(src.dtype),
        n,
        plan.index,
        version,
    )
    movie = _assemble(src, plan, n, name=name, attrs=attrs)
    log.debug(
        "opened %s (%s) as %s %s in chunks of %d frames", url, fmt, movie.shape, movie.dtype, n
    )
    return movie


def check_finite_sample(movie: xr.DataArray, n_frames: int = 16) -> None:
    """Read a few evenly spaced frames and reject non-finite or constant movies.

    A quick sanity check before long work, not a proof: the ingest step checks
    every frame.

    Parameters
    ----------
    movie : xarray.DataArray
        dims (frame, y, x), lazy or not.
    n_frames : int
        How many frames to read (fewer when the movie is shorter), > 0.

    Raises
    ------
    InputError
        A sampled frame holds NaN/inf, or every sampled pixel has the same value.
    """
    if n_frames <= 0:
        raise ParameterError(f"n_frames must be positive, got {n_frames!r}.")
    n_total = movie.sizes["frame"]
    if n_total == 0:
        raise InputError("the movie has no frames. Point at a recording with at least 2 frames.")
    idx = np.unique(np.linspace(0, n_total - 1, min(n_frames, n_total)).round().astype(int))
    # one compute per frame: dask fuses each slice into its read, so only these
    # frames are read (a joint compute would share, hence read, whole chunks)
    sample = np.concatenate([np.asarray(movie.isel(frame=slice(i, i + 1)).values) for i in idx])
    source = movie.attrs.get("source", "the movie")
    if sample.dtype.kind == "f":
        bad = ~np.isfinite(sample)
        if bad.any():
            first = int(idx[np.argmax(bad.reshape(len(idx), -1).any(axis=1))])
            raise InputError(
                f"{source}: frame {first} contains NaN or infinite values. Fix or drop the bad "
                "frames before analysis."
            )
    if sample.size and sample.min() == sample.max():
        raise InputError(
            f"{source}: the movie is constant (every sampled pixel equals {sample.flat[0]}). "
            "Check that the recording holds signal and the right dataset/channel was chosen."
        )

