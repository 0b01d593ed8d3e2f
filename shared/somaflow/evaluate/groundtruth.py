"""Loading ground truth and predictions for evaluation.

Three formats are read, each through fsspec (local paths, ``s3://``,
``memory://`` ...):

* a somaflow **result zarr** (``somaflow simulate`` writes its ground truth as
  one, ``somaflow run`` its prediction): the masks, traces and spikes of the
  units whose ``accepted`` is true;
* a Neurofinder **regions.json**: a list of ``{"id": ..., "coordinates":
  [[row, col], ...]}``, rasterized onto a ``(y, x)`` grid;
* an **.npz** with ``masks`` ``(unit, y, x)`` and optionally ``traces`` and
  ``spikes`` ``(unit, frame)`` and ``ids`` ``(unit,)``.

A directory that is not itself a zarr but holds ``ground_truth.zarr`` (the
output folder of ``somaflow simulate``) or ``regions.json`` (a Neurofinder
dataset folder) resolves to that file.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from somaflow.errors import InputError, StoreError
from somaflow.io import schema, stores

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Truth:
    """Units to compare: masks and, when known, their activity.

    Used both for ground truth and for predictions.

    Attributes
    ----------
    masks : numpy.ndarray
        ``(unit, y, x)`` bool.
    traces : numpy.ndarray or None
        ``(unit, frame)`` float32 calcium (true or denoised).
    spikes : numpy.ndarray or None
        ``(unit, frame)`` float32 spikes (true counts or deconvolved activity).
    ids : numpy.ndarray
        ``(unit,)`` int64 identifiers reported in matches: the unit's index in
        a result store (rejected units included), the region ``id`` of a
        regions.json, ``ids`` of an .npz; else ``0 .. n-1``.
    fps : float or None
        Frame rate of ``traces``/``spikes`` in Hz, when known.
    source : str
        Where the units were read from.
    notes : tuple of str
        Things the loader assumed or changed, for the report.
    """

    masks: np.ndarray
    traces: np.ndarray | None = None
    spikes: np.ndarray | None = None
    ids: np.ndarray | None = None
    fps: float | None = None
    source: str = ""
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        masks = np.asarray(self.masks)
        if masks.ndim != 3:
            raise InputError(
                f"masks must be a (unit, y, x) array, got shape {masks.shape} ({self.source or 'in memory'}). "
                "Stack one 2-D mask per unit along the first axis."
            )
        object.__setattr__(self, "masks", masks if masks.dtype == bool else masks != 0)
        n = masks.shape[0]
        for name in ("traces", "spikes"):
            value = getattr(self, name)
            if value is None:
                continue
            value = np.asarray(value)
            if value.ndim != 2 or value.shape[0] != n:
                raise InputError(
                    f"{name} must be (unit, frame) with {n} units to match the masks, got shape "
                    f"{value.shape} ({self.source or 'in memory'}). Store one row per mask."
                )
            object.__setattr__(self, name, value)
        ids = np.arange(n, dtype=np.int64) if self.ids is None else np.asarray(self.ids, dtype=np.int64)
        if ids.shape != (n,):
            raise InputError(f"ids must have one entry per unit ({n}), got shape {ids.shape}.")
        object.__setattr__(self, "ids", ids)

    @property
    def n(self) -> int:
        """Number of units."""
        return int(self.masks.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """The ``(y, x)`` grid in pixels."""
        return int(self.masks.shape[1]), int(self.masks.shape[2])


# ----------------------------------------------------------------------------- regions.json


def masks_from_regions(
    regions: list[dict[str, Any]], shape: tuple[int, int] | None = None, *, source: str = "regions"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Rasterize Neurofinder regions onto a ``(y, x)`` grid.

    Parameters
    ----------
    regions : list of dict
        Each with ``coordinates`` ``[[row, col], ...]`` (integer pixels) and
        optionally an integer ``id``.
    shape : (int, int) or None
        The grid ``(y, x)``. None: ``max coordinate + 1`` along each axis, which
        is smaller than the real field of view when no region touches its far
        edges (a note says so).
    source : str
        Name used in messages.

    Returns
    -------
    masks : numpy.ndarray
        ``(unit, y, x)`` bool, one per non-empty region.
    ids : numpy.ndarray
        ``(unit,)`` int64 region ids (their positions when ids are missing or
        not integers).
    notes : list of str

    Raises
    ------
    InputError
        Malformed regions, or coordinates outside ``shape``.
    """
    if not isinstance(regions, list):
        raise InputError(
            f"{source}: a regions.json must hold a list of {{'id', 'coordinates'}} objects, "
            f"got {type(regions).__name__}."
        )
    notes: list[str] = []
    coords: list[np.ndarray] = []
    ids: list[Any] = []
    empty = 0
    for i, region in enumerate(regions):
        if not isinstance(region, dict) or "coordinates" not in region:
            raise InputError(
                f"{source}: region {i} has no 'coordinates'; each region must be "
                "{'id': ..., 'coordinates': [[row, col], ...]}."
            )
        c = np.asarray(region["coordinates"])
        if c.size == 0:
            empty += 1
            continue
        if c.ndim != 2 or c.shape[1] != 2 or not np.issubdtype(c.dtype, np.number):
            raise InputError(
                f"{source}: region {i} coordinates must be [[row, col], ...] pairs, got shape {c.shape}."
            )
        if not np.all(np.isfinite(c)) or np.any(c != np.round(c)):
            raise InputError(f"{source}: region {i} has non-integer pixel coordinates.")
        coords.append(c.astype(np.int64))
        ids.append(region.get("id", i))
    if empty:
        notes.append(f"{empty} region(s) without coordinates in {source} were ignored.")
    if shape is None:
        if not coords:
            raise InputError(
                f"{source} has no non-empty region, so the image size cannot be inferred; "
                "pass shape=(y, x)."
            )
        top = np.max([c.max(axis=0) for c in coords], axis=0)
        shape = (int(top[0]) + 1, int(top[1]) + 1)
        notes.append(
            f"image shape {shape[0]}x{shape[1]} inferred from the largest region coordinates of "
            f"{source}; pass the movie's shape if the field of view is larger."
        )
        log.warning(notes[-1])
    ny, nx = int(shape[0]), int(shape[1])
    masks = np.zeros((len(coords), ny, nx), dtype=bool)
    for k, c in enumerate(coords):
        if c.min() < 0 or c[:, 0].max() >= ny or c[:, 1].max() >= nx:
            raise InputError(
                f"{source}: region {ids[k]!r} has pixels outside the {ny}x{nx} (y, x) image "
                f"(rows {c[:, 0].min()}..{c[:, 0].max()}, cols {c[:, 1].min()}..{c[:, 1].max()}). "
                "Pass the shape of the movie the regions were drawn on; coordinates are [row, col]."
            )
        masks[k, c[:, 0], c[:, 1]] = True
    if all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
        id_arr = np.asarray(ids, dtype=np.int64)
    else:
        id_arr = np.arange(len(coords), dtype=np.int64)
    return masks, id_arr, notes


def regions_from_masks(masks: np.ndarray, ids: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Neurofinder regions (a JSON-serialisable list) from ``(unit, y, x)`` masks.

    Parameters
    ----------
    masks : numpy.ndarray
        ``(unit, y, x)`` bool.
    ids : numpy.ndarray, optional
        ``(unit,)`` integer ids; default ``0 .. n-1``.

    Returns
    -------
    list of dict
        ``[{"id": int, "coordinates": [[row, col], ...]}, ...]``, row-major
        pixel order. Write it with ``json.dump``.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise InputError(f"masks must be (unit, y, x), got shape {masks.shape}.")
    ids = np.arange(masks.shape[0]) if ids is None else np.asarray(ids)
    out = []
    for i, m in zip(ids, masks, strict=True):
        rows, cols = np.nonzero(m)
        out.append({"id": int(i), "coordinates": np.stack([rows, cols], 1).tolist()})
    return out


# ----------------------------------------------------------------------------- loaders


def _read_bytes(url: str, storage_options: dict[str, Any] | None) -> bytes:
    fs, path = stores.filesystem(url, storage_options)
    try:
        if not fs.exists(path):
            raise StoreError(f"{url} does not exist. Check the path or URL.")
        with fs.open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise StoreError(f"cannot read {url}: {exc}. Check the path, URL and permissions.") from exc


def _kind(url: str, storage_options: dict[str, Any] | None) -> tuple[str, str]:
    """Classify ``url`` as ("json" | "npz" | "zarr", resolved url)."""
    low = url.lower().rstrip("/")
    if low.endswith(".json"):
        return "json", url
    if low.endswith(".npz"):
        return "npz", url
    fs, path = stores.filesystem(url, storage_options)
    try:
        if not fs.exists(path):
            raise StoreError(f"{url} does not exist. Check the path or URL.")
        if not fs.isdir(path) and not low.endswith(".zarr"):
            raise InputError(
                f"{url} is not a recognised ground truth: expected a result zarr, a Neurofinder "
                "regions.json or an .npz with a 'masks' (unit, y, x) array."
            )
        if low.endswith(".zarr") or fs.exists(f"{path}/zarr.json"):
            return "zarr", url
        for name, kind in (("ground_truth.zarr", "zarr"), ("regions.json", "json")):
            if fs.exists(f"{path}/{name}"):
                return kind, stores.join(url, name)
    except OSError as exc:
        raise StoreError(f"cannot reach {url}: {exc}. Check the URL, credentials and endpoint.") from exc
    raise InputError(
        f"{url} is a directory but neither a zarr store nor a folder holding ground_truth.zarr or "
        "regions.json. Point at the result zarr, the regions.json or the .npz itself."
    )


def _load_zarr(url: str, storage_options: dict[str, Any] | None) -> Truth:
    ds = schema.open_result(url, storage_options=storage_options)
    missing = [v for v in ("masks", "accepted") if v not in ds]
    if missing:
        raise InputError(
            f"{url} lacks {missing}: it is not a somaflow result. Evaluate a store written by "
            "`somaflow run` or `somaflow simulate`, a regions.json or an .npz."
        )
    accepted = np.asarray(ds["accepted"].values, dtype=bool)
    idx = np.flatnonzero(accepted)
    notes = []
    if idx.size < accepted.size:
        notes.append(f"{accepted.size - idx.size} of {accepted.size} units of {url} are not accepted and were ignored.")

    def take(name: str) -> np.ndarray | None:
        if name not in ds:
            return None
        return np.asarray(ds[name].isel(unit=idx).values)

    fps = ds.attrs.get("fps")
    return Truth(
        masks=take("masks"),
        traces=take("traces"),
        spikes=take("spikes"),
        ids=idx.astype(np.int64),
        fps=float(fps) if fps else None,
        source=url,
        notes=tuple(notes),
    )


def _load_json(url: str, shape: tuple[int, int] | None, storage_options: dict[str, Any] | None) -> Truth:
    raw = _read_bytes(url, storage_options)
    try:
        regions = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{url} is not valid JSON ({exc}); expected a Neurofinder regions.json.") from exc
    masks, ids, notes = masks_from_regions(regions, shape, source=url)
    return Truth(masks=masks, ids=ids, source=url, notes=tuple(notes))


def _load_npz(url: str, storage_options: dict[str, Any] | None) -> Truth:
    raw = _read_bytes(url, storage_options)
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as exc:
        raise InputError(f"{url} is not a readable .npz without pickled objects ({exc}).") from exc
    if "masks" not in arrays:
        raise InputError(
            f"{url} has arrays {sorted(arrays)} but no 'masks'; save the masks as "
            "np.savez(path, masks=masks_unit_y_x, traces=..., spikes=...)."
        )
    fps = arrays.get("fps")
    return Truth(
        masks=arrays["masks"],
        traces=arrays.get("traces"),
        spikes=arrays.get("spikes"),
        ids=arrays.get("ids"),
        fps=float(fps) if fps is not None and np.size(fps) == 1 else None,
        source=url,
    )


def load_truth(
    url: str,
    *,
    shape: tuple[int, int] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Truth:
    """Load ground truth from a result zarr, a Neurofinder regions.json or an .npz.

    Parameters
    ----------
    url : str
        Local path or fsspec URL; see the module docstring for the formats.
    shape : (int, int), optional
        ``(y, x)`` of the movie, needed to rasterize a regions.json exactly;
        without it the grid is inferred (max coordinate + 1) and a note says so.
        Ignored for the other formats.
    storage_options : dict, optional
        fsspec options for remote URLs.

    Returns
    -------
    Truth

    Raises
    ------
    StoreError
        The URL does not exist or cannot be read (an unfinished result zarr
        raises :class:`~somaflow.errors.IncompleteResultError`).
    InputError
        The content is not one of the formats, or is malformed.
    """
    kind, url = _kind(str(url), storage_options)
    if kind == "zarr":
        return _load_zarr(url, storage_options)
    if kind == "json":
        return _load_json(url, shape, storage_options)
    return _load_npz(url, storage_options)


def load_prediction(
    url: str,
    *,
    shape: tuple[int, int] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> Truth:
    """Load a prediction: the accepted units of a result zarr.

    Any format :func:`load_truth` reads is accepted, so that two annotations
    (a regions.json, an .npz) can be compared as well; for a result zarr only
    units with ``accepted`` true are kept and their ``ids`` are their indices
    along ``unit`` in the store.
    """
    return load_truth(url, shape=shape, storage_options=storage_options)
