"""Assemble the per-stage outputs of a run into one result-schema dataset."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr

from somaflow.errors import InputError
from somaflow.io.schema import make_result_dataset


def footprints_from_masks(masks: xr.DataArray, image: xr.DataArray) -> xr.DataArray:
    """Spatial weights of each unit: ``image`` inside its mask, normalized to max 1.

    Parameters
    ----------
    masks : xarray.DataArray
        (unit, y, x) bool.
    image : xarray.DataArray
        (y, x) float; non-negative parts are used as weights (e.g. the
        correlation image).

    Returns
    -------
    xarray.DataArray
        (unit, y, x) float32 in [0, 1]; a unit whose weights are all zero gets
        its binary mask.
    """
    m = np.asarray(masks, dtype=bool)
    out = np.zeros(m.shape, np.float32)
    sparse_footprints(m, image).toarray(out=out.reshape(len(m), int(np.prod(m.shape[1:]))))
    return xr.DataArray(out, dims=("unit", "y", "x"))


def sparse_footprints(masks: np.ndarray, image: Any) -> sp.csr_matrix:
    """:func:`footprints_from_masks` as a sparse ``(unit, y·x)`` float32 matrix.

    Touches only the masks' pixels, so its cost is their total area, not
    units × frame.
    """
    m = np.asarray(masks, dtype=bool)
    w = np.clip(np.asarray(image, dtype=np.float32), 0, None).ravel()
    rows = sp.csr_matrix(m.reshape(len(m), int(np.prod(m.shape[1:]))), dtype=np.float32)
    rows.data = w[rows.indices].astype(np.float32)
    peak = np.zeros(len(m), np.float32)
    nonempty = rows.indptr[1:] > rows.indptr[:-1]
    if nonempty.any():
        peak[nonempty] = np.maximum.reduceat(rows.data, rows.indptr[:-1][nonempty])
    flat = peak <= 0
    counts = np.diff(rows.indptr)
    rows.data[np.repeat(flat, counts)] = 1.0  # all-zero weights: the binary mask
    peak[flat] = 1.0
    rows.data /= np.repeat(peak, counts)
    return rows


#: bytes of one block of :func:`dense_footprints` (a block is one task's dense copy)
FOOTPRINT_BLOCK_BYTES = 64 << 20


def dense_footprints(rows: sp.csr_matrix, shape: tuple[int, int]) -> da.Array:
    """Sparse ``(unit, y·x)`` footprints as a lazy dense ``(unit, y, x)`` float32 dask array.

    Each block of units is densified only when computed (when a result is
    written, chunk by chunk), so the whole dense stack — units × frame
    pixels × 4 bytes, gigabytes for a large field — is never held at once.
    A block holds at most :data:`FOOTPRINT_BLOCK_BYTES` (at least one unit).

    Parameters
    ----------
    rows : scipy.sparse.csr_matrix
        (unit, y·x) footprints, C pixel order.
    shape : tuple of int
        (y, x) frame shape.

    Returns
    -------
    dask.array.Array
        (unit, y, x) float32, chunked along units only.
    """
    import dask

    ny, nx = int(shape[0]), int(shape[1])
    rows = sp.csr_matrix(rows, dtype=np.float32)
    n = rows.shape[0]
    if rows.shape[1] != ny * nx:
        raise InputError(f"footprints have {rows.shape[1]} pixel columns but the frame is {ny}x{nx}.")
    if n == 0:
        return da.zeros((0, ny, nx), dtype=np.float32, chunks=((0,), (ny,), (nx,)))
    per = max(1, FOOTPRINT_BLOCK_BYTES // (4 * ny * nx))
    blocks = [
        da.from_delayed(dask.delayed(_densify)(rows[i:i + per], ny, nx), shape=(min(per, n - i), ny, nx),
                        dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
        for i in range(0, n, per)
    ]
    return da.concatenate(blocks, axis=0)


def _densify(rows: sp.csr_matrix, ny: int, nx: int) -> np.ndarray:
    return rows.toarray().reshape(rows.shape[0], ny, nx)


def assemble_result(
    images: xr.Dataset,
    units: xr.Dataset,
    traces: xr.Dataset,
    *,
    n_frames: int,
    params: Mapping[str, Any],
    source: str,
    source_checksum: str,
    fps: float,
    modality: str,
    shifts: np.ndarray | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    pixel_size_um: float | None = None,
) -> xr.Dataset:
    """Build the result dataset of CONTRACT.md.

    Parameters
    ----------
    images : xarray.Dataset
        ``mean_image``, ``max_image``, ``correlation_image`` (y, x) and optionally
        ``std_image``, ``pnr_image``.
    units : xarray.Dataset
        ``masks`` (unit, y, x) bool, ``score`` (unit) in [0, 1], optionally
        ``accepted`` (unit) and ``footprints``.
    traces : xarray.Dataset
        ``traces``, ``dff``, ``spikes`` (unit, frame), optionally ``snr`` (unit).
    shifts : numpy.ndarray, optional
        (frame, 2) motion estimate in pixels; zeros when no motion correction ran.
    pixel_size_um : float, optional
        Pixel side in micrometres when the input recorded it.
    """
    masks = units["masks"].astype(bool)
    n = masks.sizes["unit"]
    footprints = units["footprints"] if "footprints" in units else footprints_from_masks(
        masks, images["correlation_image"]
    )
    score = units["score"] if "score" in units else xr.DataArray(np.ones(n, np.float32), dims="unit")
    accepted = units["accepted"] if "accepted" in units else xr.DataArray(np.ones(n, bool), dims="unit")
    variables: dict[str, Any] = {
        "masks": masks,
        "footprints": footprints,
        "traces": traces["traces"],
        "dff": traces["dff"],
        "spikes": traces["spikes"],
        "accepted": accepted,
        "score": score,
        "mean_image": images["mean_image"],
        "max_image": images["max_image"],
        "correlation_image": images["correlation_image"],
        "shifts": np.zeros((n_frames, 2), np.float32) if shifts is None else shifts,
    }
    for extra in ("snr",):
        if extra in traces:
            variables[extra] = traces[extra].astype(np.float32)
    for extra in ("std_image", "pnr_image"):
        if extra in images:
            variables[extra] = images[extra].astype(np.float32)
    if "cnn_score" in units:
        variables["cnn_score"] = units["cnn_score"].astype(np.float32)
    if "cnn_probability" in units:
        variables["cnn_probability"] = units["cnn_probability"].astype(np.float32)
    attrs = {"motion_corrected": shifts is not None}
    attrs.update(extra_attrs or {})
    return make_result_dataset(
        variables, params=params, source=source, source_checksum=source_checksum,
        fps=fps, modality=modality, extra_attrs=attrs, pixel_size_um=pixel_size_um,
    )
