"""Zarr inputs: a somaflow movie zarr, or an array inside any zarr group.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
import zarr

from somaflow.errors import InputError, ParameterError, StoreError
from somaflow.io import stores
from somaflow.io.readers.base import (
    _ArraySource,
    _assemble,
    _check_dtype,
    _fps_from_attrs,
    _frame_chunks,
    _is_local,
    _name,
    _plan_axes,
    check_declared_size,
)
from somaflow.io.readers.hdf5 import _describe
from somaflow.io.schema import open_movie


def _open_zarr_node(url: str, so: dict[str, Any] | None) -> Any:
    try:
        return zarr.open(
            url,
            mode="r",
            storage_options=None if _is_local(url) else stores.storage_options_for(url, so),
        )
    except FileNotFoundError as exc:
        raise StoreError(
            f"{url} does not exist or is not a zarr store. Check the path or URL."
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"cannot open {url} as zarr ({type(exc).__name__}: {exc}). Check the store."
        ) from exc


def _is_somaflow_movie(node: Any) -> bool:
    return isinstance(node, zarr.Group) and "movie" in node and "fps" in node.attrs


def _zarr_array(url: str, node: Any, dataset: str | None) -> tuple[Any, dict[str, Any]]:
    if isinstance(node, zarr.Array):
        if dataset is not None:
            raise ParameterError(f"{url} is a single zarr array; drop --dataset {dataset!r}.")
        return node, dict(node.attrs)
    if dataset is not None:
        try:
            arr = node[dataset.strip("/")]
        except KeyError:
            arr = None
        if not isinstance(arr, zarr.Array):
            cands = [(f"{k}", v.shape, v.dtype) for k, v in node.arrays()]
            raise InputError(
                f"{url} has no array {dataset!r}. Arrays at its top level: {_describe(cands) or 'none'}. "
                "Pass one of them with --dataset."
            )
        return arr, {**dict(node.attrs), **dict(arr.attrs)}
    cands = [
        (k, v) for k, v in node.members(max_depth=None) if isinstance(v, zarr.Array) and v.ndim >= 3
    ]
    if len(cands) != 1:
        described = _describe([(k, v.shape, v.dtype) for k, v in cands])
        if cands:
            raise InputError(
                f"{url} holds several arrays of 3 or more dims: {described}. Name the movie with "
                f"--dataset (e.g. --dataset {cands[0][0]})."
            )
        images = [
            (k, v.shape, v.dtype)
            for k, v in node.members(max_depth=None)
            if isinstance(v, zarr.Array)
        ]
        if len(images) == 1 and len(images[0][1]) == 2:
            return node[images[0][0]], dict(node.attrs)
        raise InputError(
            f"{url} holds no array of 3 or more dims (found: {_describe(images) or 'none'}); it contains no movie."
        )
    return cands[0][1], {**dict(node.attrs), **dict(cands[0][1].attrs)}


def _open_zarr_input(
    url: str,
    so: dict[str, Any] | None,
    dataset: str | None,
    axes: str,
    frames_per_chunk: int | None,
    memory_budget: int,
    plane: int | None,
    channel: int | None,
    max_frame_pixels: int,
) -> xr.DataArray:

    node = _open_zarr_node(url, so)
    if _is_somaflow_movie(node) and dataset in (None, "movie"):
        if axes != "tyx":
            raise ParameterError(
                f"{url} is a somaflow movie with named dims; drop --axes {axes!r}."
            )
        movie = open_movie(url, storage_options=so)
        _check_dtype(movie.dtype, url)
        check_declared_size(tuple(movie.shape), url, memory_budget=memory_budget,
                            max_frame_pixels=max_frame_pixels)
        stored = movie.chunks[0][0] if movie.chunks else movie.sizes["frame"]
        n = _frame_chunks(tuple(movie.shape), movie.dtype.itemsize, frames_per_chunk, memory_budget)
        if frames_per_chunk is None and stored <= n:
            n = (n // stored) * stored  # whole stored chunks per task
        if movie.sizes["frame"] < 2:
            raise InputError(
                f"{url} holds {movie.sizes['frame']} frame(s); a movie needs at least 2."
            )
        movie = movie.chunk({"frame": n, "y": -1, "x": -1})
        movie.attrs = {**movie.attrs, "format": "zarr"}
        movie.attrs.setdefault("source", url)
        return movie
    arr, zattrs = _zarr_array(url, node, dataset)
    _check_dtype(arr.dtype, url)
    plan = _plan_axes(tuple(arr.shape), axes, url, plane=plane, channel=channel)
    check_declared_size(plan.out_shape, url, memory_budget=memory_budget, max_frame_pixels=max_frame_pixels)
    n = _frame_chunks(plan.out_shape, arr.dtype.itemsize, frames_per_chunk, memory_budget)
    stored = arr.chunks[axes.index("t")]
    if frames_per_chunk is None and stored <= n:
        n = (n // stored) * stored
    attrs: dict[str, Any] = {"source": url, "format": "zarr"}
    if node is not arr:
        attrs["dataset"] = arr.path
    if (fps := _fps_from_attrs(zattrs)) is not None:
        attrs["fps"] = fps
    name = _name("zarr", url, arr.path, axes, arr.shape, str(arr.dtype), n, plan.index)
    src = _ArraySource(url, so, tuple(arr.shape), np.dtype(arr.dtype), array=arr)
    return _assemble(src, plan, n, name=name, attrs=attrs)

