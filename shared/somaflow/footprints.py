"""Units' spatial weights as sparse rows: masks to footprints and back, projections of a movie on them.

A stack of N units over a (y, x) frame is a ``(N, y·x)`` CSR matrix; these
helpers convert masks and footprints to that form, densify it lazily for
writing, and project a movie on it (one weighted sum per unit and frame).
"""

from __future__ import annotations

from typing import Any

import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr

from somaflow.errors import InputError


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


def sparse_masks(masks: np.ndarray) -> sp.csr_matrix:
    """(unit, y·x) float64 CSR matrix of the nonzero mask weights, C pixel order.

    Raises
    ------
    InputError
        Negative or non-finite weights.
    """
    n = len(masks)
    flat = masks.reshape(n, int(np.prod(masks.shape[1:])))
    n_pix = flat.shape[1]
    index = np.flatnonzero(flat)  # sorted by unit, then pixel
    values = flat.ravel()[index].astype(np.float64)
    if values.size and not (np.isfinite(values).all() and values.min() > 0):
        raise InputError("masks hold negative or non-finite weights; pass bool masks or "
                         "non-negative footprints.")
    units = index // n_pix
    indptr = np.searchsorted(units, np.arange(n + 1))
    return sp.csr_matrix((values, index - units * n_pix, indptr), shape=(n, n_pix))


def project(movie: xr.DataArray, rows: sp.csr_matrix) -> da.Array | np.ndarray:
    """``rows @ frame`` for every frame: (n_rows, frame), lazily for dask movies.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x).
    rows : scipy.sparse.csr_matrix
        (n_rows, y*x) weights.
    """
    data = movie.data
    n = rows.shape[0]
    if not isinstance(data, da.Array):
        flat = np.asarray(data, np.float32).reshape(data.shape[0], -1)
        return np.asarray((rows @ flat.T), np.float32)
    data = data.rechunk({1: -1, 2: -1})
    rows = rows.tocsr()
    cols = np.unique(rows.indices)
    sub = rows[:, cols]

    def block(b: np.ndarray) -> np.ndarray:
        flat = np.asarray(b, np.float32).reshape(b.shape[0], -1)[:, cols]
        return np.asarray(sub @ flat.T, np.float32)

    return da.map_blocks(block, data, drop_axis=[1, 2], new_axis=[0], chunks=((n,), data.chunks[0]),
                         dtype=np.float32, meta=np.empty((0, 0), np.float32))
