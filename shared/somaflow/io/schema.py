"""The movie and result schemas of CONTRACT.md, and their zarr v3 readers/writers.

Movie: variable ``movie`` (frame, y, x), attrs ``fps``, ``modality``, ``source``,
``source_checksum``.

Result: ``masks`` (unit, y, x) bool, ``footprints`` (unit, y, x) float32,
``traces`` / ``dff`` / ``spikes`` (unit, frame) float32, ``accepted`` (unit) bool,
``score`` (unit) float32, ``mean_image`` / ``max_image`` / ``correlation_image``
(y, x) float32, ``shifts`` (frame, axis) float32; attrs ``somaflow_version``,
``params`` (JSON), ``source``, ``source_checksum``, ``fps``, ``modality`` and
``complete`` = true, written last.

For other tools every result also carries (:func:`make_result_dataset`):
coordinates ``unit`` (unit ids 0..n-1), ``frame`` and ``time`` (frame times in
seconds), ``y`` / ``x`` (pixels), ``axis`` (``"y"``, ``"x"``); ``units`` and
``long_name`` attrs on every documented variable; a ``labels`` (y, x) int32
label image (0 = background, unit id + 1 elsewhere, napari's labels layer);
``pixel_size_um`` when the input recorded it. Strings are stored as zarr v3's
variable-length UTF-8 ``string`` data type, never as fixed-length UTF-32 (which
has no zarr v3 specification).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import zarr

from somaflow import __version__
from somaflow.errors import IncompleteResultError, InputError, StoreError, store_full
from somaflow.io import stores

log = logging.getLogger(__name__)

MODALITIES = ("2p", "1p")

#: result variables, their dims and dtypes
RESULT_VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "masks": (("unit", "y", "x"), "bool"),
    "footprints": (("unit", "y", "x"), "float32"),
    "traces": (("unit", "frame"), "float32"),
    "dff": (("unit", "frame"), "float32"),
    "spikes": (("unit", "frame"), "float32"),
    "accepted": (("unit",), "bool"),
    "score": (("unit",), "float32"),
    "mean_image": (("y", "x"), "float32"),
    "max_image": (("y", "x"), "float32"),
    "correlation_image": (("y", "x"), "float32"),
    "shifts": (("frame", "axis"), "float32"),
}
RESULT_ATTRS = ("somaflow_version", "params", "source", "source_checksum", "fps", "modality")

#: ``units`` and ``long_name`` of the result's variables and coordinates (CF-style attrs);
#: "a.u." is the movie's intensity scale, "1" a dimensionless number
VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "masks": {"units": "1", "long_name": "binary mask of each unit"},
    "footprints": {"units": "1", "long_name": "spatial footprint of each unit (weights, max 1)"},
    "traces": {"units": "a.u.", "long_name": "denoised calcium activity"},
    "dff": {"units": "1", "long_name": "dF/F"},
    "spikes": {"units": "a.u.", "long_name": "deconvolved activity (trace units per frame)"},
    "accepted": {"units": "1", "long_name": "final verdict: the unit is a neuron"},
    "score": {"units": "1", "long_name": "confidence that the unit is a neuron, in [0, 1]"},
    "snr": {"units": "1", "long_name": "signal-to-noise ratio of the unit's trace"},
    "mean_image": {"units": "a.u.", "long_name": "mean of the motion-corrected movie"},
    "max_image": {"units": "a.u.", "long_name": "maximum of the motion-corrected movie"},
    "correlation_image": {"units": "1", "long_name": "correlation of each pixel with its neighbours"},
    "std_image": {"units": "a.u.", "long_name": "standard deviation of the detection movie"},
    "pnr_image": {"units": "1", "long_name": "peak-to-noise ratio of the detection movie"},
    "shifts": {"units": "pixel", "long_name": "estimated motion (y, x) of each frame"},
    "labels": {"units": "1", "long_name": "label image: 0 background, unit id + 1 inside a mask"},
    "unit": {"units": "1", "long_name": "unit id"},
    "frame": {"units": "1", "long_name": "frame index"},
    "time": {"units": "s", "long_name": "frame time from the first frame"},
    "y": {"units": "pixel", "long_name": "row"},
    "x": {"units": "pixel", "long_name": "column"},
    "axis": {"long_name": "motion axis"},
}


def _zarr_kwargs(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"consolidated": False, "zarr_format": 3}
    so = stores.storage_options_for(url, storage_options)
    if stores.protocol_of(url) != "file":
        kw["storage_options"] = so
    return kw


def _store_error(url: str, exc: Exception) -> StoreError:
    return StoreError(
        f"cannot open {url!r} as a zarr store ({type(exc).__name__}: {exc}). "
        "Check that the URL exists and is a somaflow zarr."
    )


# ----------------------------------------------------------------------------- movie


def make_movie_dataset(
    movie: xr.DataArray,
    *,
    fps: float,
    modality: str,
    source: str,
    source_checksum: str,
    extra_attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Wrap a (frame, y, x) array as a movie-schema dataset.

    Parameters
    ----------
    movie : xarray.DataArray
        dims (frame, y, x), integer or floating, usually dask-backed.
    fps : float
        Frame rate in Hz, > 0.
    modality : {"2p", "1p"}
    source, source_checksum : str
        Where the movie came from and its checksum.
    """
    if tuple(movie.dims) != ("frame", "y", "x"):
        raise InputError(f"a movie needs dims (frame, y, x), got {movie.dims}.")
    if not (fps and np.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, got {fps!r}. Pass --fps.")
    if modality not in MODALITIES:
        raise InputError(f"modality must be one of {MODALITIES}, got {modality!r}.")
    if movie.dtype.kind not in "iuf":
        raise InputError(f"movie dtype {movie.dtype} is not numeric.")
    if movie.dtype.kind == "f" and movie.dtype != np.float32:
        movie = movie.astype(np.float32)
    attrs = {
        "fps": float(fps),
        "modality": modality,
        "source": source,
        "source_checksum": source_checksum,
        "somaflow_version": __version__,
    }
    attrs.update(extra_attrs or {})
    ds = xr.Dataset({"movie": movie.drop_vars(list(movie.coords))}, attrs=attrs)
    return ds


def write_movie(
    ds: xr.Dataset,
    url: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Write a movie dataset atomically to ``url`` (zarr v3); ``complete`` last.

    The dask graph is computed on the active scheduler (a distributed Client if
    one is running). Chunks on disk equal the dask chunks of ``ds.movie``.

    Returns
    -------
    str
        The normalized URL written.
    """
    return write_dataset(ds, url, overwrite=overwrite, storage_options=storage_options)


def write_dataset(
    ds: xr.Dataset,
    url: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    scheduler: str | None = None,
) -> str:
    """Write any dataset to a zarr v3 store atomically and mark it ``complete``.

    ``scheduler``: the dask scheduler that computes the chunks (``"threads"``
    ...); None: the current one (a distributed client when one is running).

    Used for movies, results and a run's intermediates. Fixed-length unicode
    arrays are written as variable-length UTF-8 strings (zarr v3's ``string``
    data type; fixed-length UTF-32 has no zarr v3 specification); encodings
    are reset so the dask chunks become the zarr chunks. ``scheduler``: the
    dask scheduler of this write only (``"threads"``, ...); None: the current
    one. Never set globally here: ``dask.config.set`` is process-wide, and the
    sessions of an archive run in threads that share the distributed client.
    """
    url = stores.normalize_url(url)
    ds = ds.copy()
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":
            ds[name] = var.astype(np.dtypes.StringDType())
    ds.attrs.pop("complete", None)
    for v in ds.variables.values():
        v.encoding = {}
    with stores.atomic_output(url, overwrite=overwrite, storage_options=storage_options) as tmp:
        try:
            pending = ds.to_zarr(tmp, mode="w", compute=False, **_zarr_kwargs(tmp, storage_options))
            dask.compute(pending, scheduler=scheduler)
        except OSError as exc:
            raise store_full(exc, repr(url)) or StoreError(f"cannot write {url!r}: {exc}") from exc
    mark_complete(url, storage_options=storage_options)
    return url


def open_movie(url: str, *, storage_options: dict[str, Any] | None = None) -> xr.DataArray:
    """Open a movie-schema zarr lazily.

    Returns
    -------
    xarray.DataArray
        dims (frame, y, x), dask-backed, with the store's attrs.

    Raises
    ------
    StoreError
        Missing or unreadable store.
    InputError
        The store is a zarr but not a somaflow movie.
    """
    ds = _open(url, storage_options)
    if "movie" not in ds:
        raise InputError(f"{url} has no 'movie' variable; it is not a somaflow movie zarr. Run `somaflow ingest` first.")
    movie = ds["movie"]
    movie.attrs = dict(ds.attrs)
    return movie


# ----------------------------------------------------------------------------- result


def make_result_dataset(
    variables: Mapping[str, Any],
    *,
    params: Mapping[str, Any],
    source: str,
    source_checksum: str,
    fps: float,
    modality: str,
    extra_attrs: Mapping[str, Any] | None = None,
    pixel_size_um: float | None = None,
) -> xr.Dataset:
    """Assemble a result-schema dataset from arrays and validate it.

    Parameters
    ----------
    variables : mapping
        At least every name in :data:`RESULT_VARIABLES`; values are numpy/dask
        arrays in the documented dims, or DataArrays. Extra variables (``snr``,
        ``cnn_probability`` ...) are kept if they are DataArrays or (dims, data)
        tuples. ``labels`` (y, x) is computed from ``masks`` and ``score``
        (:func:`label_image`) unless given.
    params : mapping
        Every parameter used; stored as a JSON string.
    pixel_size_um : float, optional
        Side of a pixel in micrometres, when the input recorded it; stored in
        the ``pixel_size_um`` attr of the dataset and of ``y`` and ``x``.

    Returns
    -------
    xarray.Dataset
        The variables with coordinates ``unit``, ``frame``, ``time`` (s),
        ``y``, ``x``, ``axis`` and the attrs of :data:`VARIABLE_ATTRS`.
    """
    data_vars: dict[str, Any] = {}
    for name, value in variables.items():
        if name in RESULT_VARIABLES:
            dims, dtype = RESULT_VARIABLES[name]
            arr = value.data if isinstance(value, xr.DataArray) else value
            data_vars[name] = (dims, arr.astype(dtype) if arr.dtype != np.dtype(dtype) else arr)
        else:
            data_vars[name] = value
    missing = [n for n in RESULT_VARIABLES if n not in data_vars]
    if missing:
        raise ValueError(f"result is missing variables {missing}")
    attrs = {
        "somaflow_version": __version__,
        "params": json.dumps(dict(params), sort_keys=True, default=str),
        "source": source,
        "source_checksum": source_checksum,
        "fps": float(fps),
        "modality": modality,
    }
    attrs.update(extra_attrs or {})
    if pixel_size_um is not None:
        attrs["pixel_size_um"] = float(pixel_size_um)
    ds = xr.Dataset(data_vars, attrs=attrs)
    validate_result(ds)
    if "labels" not in ds:
        ds["labels"] = (("y", "x"), label_image(ds["masks"].data, ds["score"].data))
    return annotate_result(ds)


def annotate_result(ds: xr.Dataset) -> xr.Dataset:
    """Coordinates and ``units`` / ``long_name`` attrs of a result (module docstring).

    ``time`` is ``frame / fps`` in seconds; ``y`` and ``x`` carry the
    ``pixel_size_um`` attr when the dataset has one.
    """
    coords: dict[str, Any] = {}
    for dim in ("unit", "frame", "y", "x"):
        if dim in ds.dims:
            coords[dim] = np.arange(ds.sizes[dim], dtype=np.int32 if dim == "unit" else np.int64)
    if "frame" in ds.dims:
        coords["time"] = ("frame", np.arange(ds.sizes["frame"]) / float(ds.attrs["fps"]))
    if "axis" in ds.dims and ds.sizes["axis"] == 2:
        coords["axis"] = np.array(["y", "x"], dtype=np.dtypes.StringDType())
    ds = ds.assign_coords(coords)
    for name in ds.variables:
        ds[name].attrs.update(VARIABLE_ATTRS.get(str(name), {}))
    if "pixel_size_um" in ds.attrs:
        for dim in ("y", "x"):
            ds[dim].attrs["pixel_size_um"] = ds.attrs["pixel_size_um"]
    return ds


def label_image(masks: Any, score: Any) -> Any:
    """One label image of all units' masks.

    Parameters
    ----------
    masks : numpy.ndarray or dask.array.Array
        (unit, y, x) bool.
    score : array_like
        (unit,) float; where masks overlap, the unit with the higher score wins
        (equal scores: the lower unit id).

    Returns
    -------
    numpy.ndarray or dask.array.Array
        (y, x) int32: 0 outside every mask, unit id + 1 inside one. Lazy when
        ``masks`` is a dask array.
    """
    n, ny, nx = masks.shape
    score = np.asarray(score, np.float64)
    order = np.lexsort((-np.arange(n), score))  # ascending priority: the last one wins
    rank = np.empty(n, np.int32)
    rank[order] = np.arange(1, n + 1, dtype=np.int32)
    lut = np.zeros(n + 1, np.int32)
    lut[rank] = np.arange(1, n + 1, dtype=np.int32)
    if not isinstance(masks, da.Array):
        return lut[_top_rank(np.asarray(masks, bool), rank)]
    if n == 0:
        return da.zeros((ny, nx), dtype=np.int32)
    masks = masks.rechunk({1: -1, 2: -1})
    bounds = np.cumsum((0, *masks.chunks[0]))
    tops = [
        da.from_delayed(dask.delayed(_top_rank)(block, rank[lo:hi]), shape=(ny, nx), dtype=np.int32)
        for block, lo, hi in zip(masks.to_delayed().ravel(), bounds[:-1], bounds[1:], strict=True)
    ]
    return da.stack(tops).max(axis=0).map_blocks(lambda b: lut[b], dtype=np.int32)


def _top_rank(masks: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """(y, x) the highest ``rank`` of the masks covering each pixel, 0 where none does."""
    top = np.zeros(masks.shape[1:], np.int32)
    for m, r in zip(masks, rank, strict=True):
        np.maximum(top, r, out=top, where=m)
    return top


def validate_result(ds: xr.Dataset) -> None:
    """Check that ``ds`` follows the result schema; raise ``InputError`` if not."""
    for name, (dims, dtype) in RESULT_VARIABLES.items():
        if name not in ds:
            raise InputError(f"result lacks the required variable {name!r}.")
        if tuple(ds[name].dims) != dims:
            raise InputError(f"result variable {name!r} has dims {ds[name].dims}, expected {dims}.")
        if ds[name].dtype != np.dtype(dtype):
            raise InputError(f"result variable {name!r} has dtype {ds[name].dtype}, expected {dtype}.")
    for attr in RESULT_ATTRS:
        if attr not in ds.attrs:
            raise InputError(f"result lacks the attribute {attr!r}.")


def write_result(
    ds: xr.Dataset,
    url: str,
    *,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> str:
    """Validate and write a result dataset atomically; ``complete=true`` is set last.

    Raises
    ------
    ResultExistsError
        ``url`` exists and ``overwrite`` is False; nothing is written.
    """
    validate_result(ds)
    if "unit" in ds.dims and ds.sizes["unit"] > 0:
        ds = ds.chunk({"unit": min(ds.sizes["unit"], 256)})
    # a result is assembled in this process (or read lazily from the run's stage zarrs):
    # encode it on local threads; a distributed client would ship every chunk through
    # the scheduler and back (measured 8x slower for 937 units at 512x512). Named for this
    # write only: dask.config.set is process-wide, and would send the computations of other
    # sessions running at the same time (an archive) to local threads too
    return write_dataset(ds, url, overwrite=overwrite, storage_options=storage_options, scheduler="threads")


def open_result(
    url: str, *, require_complete: bool = True, storage_options: dict[str, Any] | None = None
) -> xr.Dataset:
    """Open a result zarr lazily.

    Raises
    ------
    IncompleteResultError
        ``require_complete`` and the store lacks ``complete=true``.
    """
    ds = _open(url, storage_options)
    if require_complete and not ds.attrs.get("complete", False):
        raise IncompleteResultError(
            f"{url} is not marked complete: it is an unfinished or interrupted result. Rerun the job that writes it."
        )
    return ds


def is_complete(url: str, *, storage_options: dict[str, Any] | None = None) -> bool:
    """True when ``url`` is a zarr store whose root attrs say ``complete``."""
    try:
        if not stores.exists(url, storage_options):
            return False
        group = _open_group(url, storage_options, mode="r")
    except (StoreError, FileNotFoundError, ValueError, KeyError, zarr.errors.BaseZarrError):
        return False
    return bool(group.attrs.get("complete", False))


def output_state(url: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """What is at an output location, from somaflow's point of view.

    Returns
    -------
    str
        ``"missing"`` — nothing; ``"complete"`` — a zarr somaflow wrote (its
        root attrs carry ``somaflow_version``) marked ``complete``;
        ``"unfinished"`` — such a zarr without ``complete``; ``"foreign"`` —
        anything else (a file, a folder, another tool's zarr).
    """
    if not stores.exists(url, storage_options):
        return "missing"
    try:
        attrs = _open_group(url, storage_options, mode="r").attrs
    except (StoreError, OSError, ValueError, KeyError, TypeError, zarr.errors.BaseZarrError):
        return "foreign"
    if "somaflow_version" not in attrs:
        return "foreign"
    return "complete" if attrs.get("complete", False) else "unfinished"


def mark_complete(url: str, *, storage_options: dict[str, Any] | None = None) -> None:
    """Set ``complete=true`` on the root group of the zarr at ``url``."""
    group = _open_group(url, storage_options, mode="r+")
    group.attrs["complete"] = True


def read_attrs(url: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Root attrs of the zarr at ``url`` without opening its arrays."""
    return dict(_open_group(url, storage_options, mode="r").attrs)


def _open_group(url: str, storage_options: dict[str, Any] | None, mode: str) -> zarr.Group:
    url = stores.normalize_url(url)
    so = stores.storage_options_for(url, storage_options)
    try:
        return zarr.open_group(url, mode=mode, storage_options=so if stores.protocol_of(url) != "file" else None, zarr_format=3)
    except FileNotFoundError as exc:
        raise StoreError(f"{url} does not exist.") from exc


def _open(url: str, storage_options: dict[str, Any] | None) -> xr.Dataset:
    url = stores.normalize_url(url)
    if not stores.exists(url, storage_options):
        raise StoreError(f"{url} does not exist. Check the path or URL.")
    try:
        return xr.open_zarr(url, **_zarr_kwargs(url, storage_options))
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError) as exc:
        raise _store_error(url, exc) from exc
