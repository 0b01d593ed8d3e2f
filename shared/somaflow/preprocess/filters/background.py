"""Background removal: the homomorphic filter (2p) and the morphological opening (1p).
"""

from __future__ import annotations

import logging
import math

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage
from skimage.morphology import disk

from somaflow.preprocess.filters.frames import _like, _per_frame, whole_frames
from somaflow.preprocess.filters.params import HomomorphicParams, MorphParams

log = logging.getLogger(__name__)


def homomorphic(movie: xr.DataArray, params: HomomorphicParams) -> xr.DataArray:
    """STNeuroNet's homomorphic background flattening, then SD normalisation.

    Per frame ``H = exp(L − G_σ * L)`` with ``L = log(max(I, 0) + offset)`` and
    ``G_σ`` a Gaussian of SD ``params.sigma`` pixels (``reflect`` borders,
    MATLAB's ``symmetric``): the frame divided by its local geometric mean, so
    multiplicative illumination (vignetting, uneven expression) cancels. With
    ``params.normalize`` the result is divided by ``sd``, the population SD of
    ``H`` over the whole movie (not mean-subtracted, as in the authors' code).

    The SD is computed when this function is called (a streaming float64
    sum / sum-of-squares over frame chunks); the returned movie is lazy.
    A constant movie has ``sd = 0`` and is returned unnormalised (all ones)
    rather than as NaN.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), any real dtype, dask- or numpy-backed.
    params : HomomorphicParams
        Stage parameters.

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32, dimensionless, lazy; coords and attrs of
        ``movie`` plus ``homomorphic_sd`` (the divisor, 1.0 when not
        normalising).

    Raises
    ------
    InputError
        Wrong dims or dtype, or an empty movie.
    """
    data = whole_frames(movie, "homomorphic")
    kwargs = {"sigma": float(params.sigma), "offset": float(params.offset)}
    sd = 1.0
    if params.normalize:
        stats = da.map_blocks(
            _homomorphic_moments, data, **kwargs, chunks=((3,) * data.numblocks[0],),
            drop_axis=[1, 2], dtype=np.float64, meta=np.empty((0,), np.float64),
        ).reshape(data.numblocks[0], 3).sum(axis=0)
        (count, s1, s2), = dask.compute(stats)
        var = max(s2 / count - (s1 / count) ** 2, 0.0)
        # variance below float32 round-off of the second moment counts as zero
        sd = math.sqrt(var) if var > 1e-12 * (s2 / count) else 1.0
        log.info("homomorphic: overall SD of the filtered movie %.6g", sd)
    out = _per_frame(_homomorphic_block, data, scale=1.0 / sd, **kwargs)
    return _like(out, movie, homomorphic_sd=sd)


def _homomorphic_block(block: np.ndarray, *, sigma: float, offset: float, scale: float = 1.0) -> np.ndarray:
    """(t, y, x) → (t, y, x) float32 ``scale · exp(L − G_σ * L)``."""
    log_img = np.log(np.maximum(block.astype(np.float32), 0) + np.float32(offset))
    low = ndimage.gaussian_filter(log_img, sigma=(0, sigma, sigma), mode="reflect")
    out = np.exp(log_img - low)
    if scale != 1.0:
        out *= np.float32(scale)
    return out


def _homomorphic_moments(block: np.ndarray, *, sigma: float, offset: float) -> np.ndarray:
    """(3,) float64 ``[count, Σ H, Σ H²]`` of one chunk's filtered frames."""
    h = _homomorphic_block(block, sigma=sigma, offset=offset).astype(np.float64)
    return np.array([h.size, h.sum(), float(np.vdot(h.ravel(), h.ravel()))])


def morphological_background(movie: xr.DataArray, params: MorphParams) -> xr.DataArray:
    """Foreground after sc-CNMF's morphological background removal (1p).

    Per frame the background ``B`` is the grey-scale opening (erosion then
    dilation, ``scipy.ndimage`` with ``reflect`` borders) of the frame with a
    flat disk of radius ``params.radius``; the result is ``I − B``. Bright
    structures narrower than the disk (somata) stay in the foreground, wider
    ones (out-of-focus haze, vignetting, blood-vessel shadows' surround) go
    to ``B``. With ``params.downsample = d > 1`` the opening runs on the
    frame block-averaged over d×d pixels (edge-padded to a multiple of d)
    with a disk of radius ``radius / d``, and ``B`` is upsampled bilinearly.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), any real dtype, dask- or numpy-backed.
    params : MorphParams
        Stage parameters.

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32 foreground in movie units, lazy, chunked like
        the input's frames; coords and attrs of ``movie``. ≥ 0 when
        ``downsample`` is 1.

    Raises
    ------
    InputError
        Wrong dims or dtype, or an empty movie.
    """
    data = whole_frames(movie, "morphological_background")
    out = _per_frame(_foreground_block, data, radius=float(params.radius), downsample=int(params.downsample))
    return _like(out, movie)


def _disk(radius: float) -> np.ndarray:
    """(1, k, k) bool flat disk footprint (one frame at a time), at least a single pixel."""
    return disk(max(0, int(round(radius)))).astype(bool)[None]


def _opening_background(frames: np.ndarray, *, radius: float, downsample: int) -> np.ndarray:
    """(t, y, x) float32 frames → (t, y, x) float32 background (grey opening)."""
    if downsample == 1:
        return ndimage.grey_opening(frames, footprint=_disk(radius), mode="reflect")
    t, ny, nx = frames.shape
    d = downsample
    py, px = -ny % d, -nx % d
    padded = np.pad(frames, ((0, 0), (0, py), (0, px)), mode="edge")
    small = padded.reshape(t, (ny + py) // d, d, (nx + px) // d, d).mean(axis=(2, 4), dtype=np.float32)
    opened = ndimage.grey_opening(small, footprint=_disk(radius / d), mode="reflect")
    big = ndimage.zoom(opened, (1, d, d), order=1, mode="nearest", grid_mode=True)
    return big[:, :ny, :nx]


def _foreground_block(block: np.ndarray, *, radius: float, downsample: int) -> np.ndarray:
    """(t, y, x) → (t, y, x) float32 ``I − opening(I)``."""
    frames = block.astype(np.float32)
    return frames - _opening_background(frames, radius=radius, downsample=downsample)

