"""The movie and result schemas of CONTRACT.md, and their zarr v3 readers/writers.

Movie: variable ``movie`` (frame, y, x), attrs ``fps``, ``modality``, ``source``,
``source_checksum``.

Result: ``masks`` (unit, y, x) bool, ``footprints`` (unit, y, x) float32,
``traces`` / ``dff`` / ``spikes`` (unit, frame) float32, ``accepted`` (unit) bool,
``score`` (unit) float32, ``mean_image`` / ``max_image`` / ``correlation_image``
(y, x) float32, ``shifts`` (frame, axis) float32; attrs ``somaflow_version``,
``params`` (JSON), ``source``, ``source_checksum``, ``fps``, ``modality`` and
``complete`` = true, written last.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import dask
import numpy as np
import xarray as xr
import zarr

from somaflow import __version__
from somaflow.errors import IncompleteResultError, InputError, StoreError
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
) -> str:
    """Write any dataset to a zarr v3 store atomically and mark it ``complete``.

    Used for movies, results and a run's intermediates. String coordinates
    (no stable zarr v3 dtype) are dropped; encodings are reset so the dask
    chunks become the zarr chunks.
    """
    url = stores.normalize_url(url)
    ds = ds.drop_vars([c for c in ds.coords if ds[c].dtype.kind in "UO"])
    ds.attrs.pop("complete", None)
    for v in ds.variables.values():
        v.encoding = {}
    with stores.atomic_output(url, overwrite=overwrite, storage_options=storage_options) as tmp:
        try:
            ds.to_zarr(tmp, mode="w", **_zarr_kwargs(tmp, storage_options))
        except (OSError, PermissionError) as exc:
            raise StoreError(f"cannot write {url!r}: {exc}") from exc
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
) -> xr.Dataset:
    """Assemble a result-schema dataset from arrays and validate it.

    Parameters
    ----------
    variables : mapping
        At least every name in :data:`RESULT_VARIABLES`; values are numpy/dask
        arrays in the documented dims, or DataArrays. Extra variables (``snr``,
        ``cnn_probability`` ...) are kept if they are DataArrays or (dims, data)
        tuples.
    params : mapping
        Every parameter used; stored as a JSON string.
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
    ds = xr.Dataset(data_vars, attrs=attrs)
    validate_result(ds)
    return ds


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
    # the scheduler and back (measured 8x slower for 937 units at 512x512)
    with dask.config.set(scheduler="threads"):
        return write_dataset(ds, url, overwrite=overwrite, storage_options=storage_options)


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
