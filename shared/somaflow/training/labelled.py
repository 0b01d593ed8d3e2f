"""Labelled real data: Neurofinder folders (:func:`neurofinder_set`) and
curated results (:func:`result_labels`); example caches as zarr groups
(:func:`write_examples` / :func:`read_examples`, written atomically,
``complete`` last).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from somaflow.errors import IncompleteResultError, InputError, ParameterError
from somaflow.evaluate import masks_from_regions
from somaflow.io import stores
from somaflow.io.readers import open_input
from somaflow.io.schema import is_complete, open_result, write_dataset
from somaflow.nn.images import summary_channels
from somaflow.nn.targets import union_target
from somaflow.training.detector_sets import detection_summary_images


@dataclass(frozen=True)
class LabelledSession:
    """A real session with labelled cells, prepared as the detectors see it.

    Attributes
    ----------
    movie : xarray.DataArray
        (frame, y, x) lazy movie, attrs ``fps``, ``modality``.
    images : xarray.Dataset
        :func:`detection_summary_images`.
    channels : numpy.ndarray
        (4, H, W) float32 :func:`summary_channels`.
    masks : numpy.ndarray
        (N, H, W) bool labelled cells.
    target : numpy.ndarray
        (H, W) uint8 :func:`union_target`.
    fps, neuron_radius : float
    modality : str
    """

    movie: xr.DataArray
    images: xr.Dataset
    channels: np.ndarray
    masks: np.ndarray
    target: np.ndarray
    fps: float
    modality: str
    neuron_radius: float


def neurofinder_set(
    dataset_dir: str | Path,
    *,
    fps: float = 7.0,
    neuron_radius: float = 5.0,
    frames: slice | None = None,
) -> LabelledSession:
    """A Neurofinder-style folder (``movie.tif`` + ``regions.json``) as a labelled session.

    ``../shared/data/neurofinder_left`` is a registered 2p excerpt (600
    frames, 512 × 256 px) whose SOURCE.md says the frame rate was not
    recorded, about 7 Hz for the Neurofinder 00 sets (the default here, as
    in ``benchmarks/bench_real.py``); its regions are anatomical, so silent
    cells are included. The movie is read with the library's readers (no
    motion correction: Neurofinder movies are registered).

    Parameters
    ----------
    dataset_dir : str or Path
        Folder holding ``movie.tif`` and ``regions.json``.
    fps : float
        Frame rate (Hz).
    neuron_radius : float
        Soma radius (px).
    frames : slice, optional
        Use only these frames (e.g. a temporal split); default all.

    Returns
    -------
    LabelledSession
    """

    folder = Path(dataset_dir)
    movie_path, regions_path = folder / "movie.tif", folder / "regions.json"
    for path in (movie_path, regions_path):
        if not path.exists():
            raise InputError(
                f"{path} does not exist; a Neurofinder folder holds movie.tif and regions.json."
            )
    movie = open_input(str(movie_path))
    if frames is not None:
        movie = movie.isel(frame=frames)
    movie = movie.assign_attrs(fps=float(fps), modality="2p")
    try:
        regions = json.loads(regions_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{regions_path} is not valid JSON: {exc}") from exc
    masks, _, _ = masks_from_regions(regions, tuple(movie.shape[1:]), source=str(regions_path))
    images = detection_summary_images(movie, fps, "2p", neuron_radius)
    return LabelledSession(
        movie=movie,
        images=images,
        channels=summary_channels(images),
        masks=masks,
        target=union_target(masks),
        fps=float(fps),
        modality="2p",
        neuron_radius=float(neuron_radius),
    )


def result_labels(result_url: str) -> tuple[np.ndarray, np.ndarray]:
    """The units of a result zarr and a person's verdict on them.

    Parameters
    ----------
    result_url : str
        A complete result (``somaflow run``) whose ``accepted`` was edited.

    Returns
    -------
    masks : numpy.ndarray
        (N, H, W) bool.
    accepted : numpy.ndarray
        (N,) bool: True = a cell.

    Raises
    ------
    IncompleteResultError
        The result is unfinished.
    """

    ds = open_result(result_url)
    for name in ("masks", "accepted"):
        if name not in ds:
            raise InputError(f"{result_url} has no {name!r} variable; pass a somaflow result zarr.")
    return np.asarray(ds["masks"].values, bool), np.asarray(ds["accepted"].values, bool)


def write_examples(
    url: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], *, overwrite: bool = False
) -> str:
    """Store example arrays (and what made them) as a zarr group, atomically.

    Written under a temporary name, moved into place, and marked
    ``complete`` last (:func:`somaflow.io.schema.write_dataset`), so a crash
    never leaves a cache that :func:`read_examples` would take.

    Parameters
    ----------
    url : str
        Any fsspec URL.
    arrays : mapping of str to numpy.ndarray
        Each stored as a variable of its own dims ``NAME_0, NAME_1, ...``,
        chunked along its first axis (≈ 64 MiB per chunk).
    meta : mapping
        JSON-serialisable description (recipe, presets, seeds, statistics).
    overwrite : bool
        Replace an existing cache.

    Returns
    -------
    str
        The normalized URL.

    Raises
    ------
    ResultExistsError
        ``url`` exists and ``overwrite`` is False.
    ParameterError
        ``meta`` is not JSON-serialisable or an array name is invalid.
    """

    try:
        meta_json = json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"write_examples: meta must be JSON-serialisable ({exc}).") from exc
    data_vars = {}
    for name, arr in arrays.items():
        if not name or "/" in name or name.startswith("."):
            raise ParameterError(f"write_examples: invalid array name {name!r}.")
        a = np.asarray(arr)
        dims = tuple(f"{name}_{i}" for i in range(a.ndim))
        var = xr.DataArray(a, dims=dims)
        if a.ndim and a.nbytes:
            per = max(1, int((64 << 20) // max(1, a.nbytes // max(1, a.shape[0]))))
            var = var.chunk({dims[0]: min(per, a.shape[0])})
        data_vars[name] = var
    ds = xr.Dataset(data_vars, attrs={"meta": meta_json, "kind": "somaflow-examples"})
    return write_dataset(ds, url, overwrite=overwrite)


def read_examples(url: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a cache written by :func:`write_examples`.

    Returns
    -------
    arrays : dict of str to numpy.ndarray
    meta : dict

    Raises
    ------
    StoreError
        ``url`` does not exist.
    IncompleteResultError
        The cache is not marked complete (an interrupted write).
    """

    if stores.exists(url) and not is_complete(url):
        raise IncompleteResultError(
            f"{url} is an incomplete example cache (an interrupted write); delete it and build it again."
        )
    ds = open_result(url)
    arrays = {name: np.asarray(ds[name].values) for name in ds.data_vars}
    return arrays, json.loads(ds.attrs.get("meta", "{}"))

