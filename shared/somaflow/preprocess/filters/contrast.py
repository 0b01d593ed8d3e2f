"""Contrast clipping and the spatial high-pass of frames.
"""

from __future__ import annotations

import logging

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from somaflow.errors import ParameterError
from somaflow.preprocess.filters.frames import _like, _per_frame, whole_frames
from somaflow.preprocess.filters.params import ContrastParams

log = logging.getLogger(__name__)


def clip_contrast(movie: xr.DataArray, params: ContrastParams) -> xr.DataArray:
    """Clip to the [low, high] percentiles of the movie and rescale to [0, 1].

    Output ``(clip(I, lo, hi) − lo) / (hi − lo)`` with ``lo``/``hi`` the
    ``low_percentile``/``high_percentile`` (numpy's linear interpolation) of
    a sample of the movie's values: up to ``params.sample_frames`` evenly
    spaced frames, and in them a fixed random subset of pixel positions when
    the sample would exceed ``params.max_samples`` values. The sample
    depends on the movie's shape and the seed only, not on its chunking.
    The percentiles are computed when this function is called (one pass
    over the chunks holding sampled frames); the returned movie is lazy.
    When ``hi == lo`` (e.g. a constant movie) the output is all zeros.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), any real dtype, dask- or numpy-backed.
    params : ContrastParams
        Stage parameters.

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32 in [0, 1], lazy; coords and attrs of ``movie``
        plus ``contrast_limits`` = [lo, hi] (movie units).

    Raises
    ------
    InputError
        Wrong dims or dtype, or an empty movie.
    """
    data = whole_frames(movie, "clip_contrast")
    n_frames, ny, nx = data.shape
    frames = np.unique(np.round(np.linspace(0, n_frames - 1, min(n_frames, params.sample_frames))).astype(int))
    per_frame = min(ny * nx, max(1, params.max_samples // len(frames)))
    pixels = None
    if per_frame < ny * nx:
        pixels = np.sort(np.random.default_rng(params.seed).choice(ny * nx, per_frame, replace=False))
    sample = data[frames]
    values = da.map_blocks(
        _take_pixels, sample, pixels=pixels, drop_axis=[1, 2], new_axis=[1],
        chunks=(sample.chunks[0], (per_frame,)), dtype=np.float64, meta=np.empty((0, 0), np.float64),
    )
    (values,) = dask.compute(values)
    lo, hi = (float(v) for v in np.percentile(values, [params.low_percentile, params.high_percentile]))
    log.info("clip_contrast: %g-th percentile %.6g, %g-th %.6g from %d values",
             params.low_percentile, lo, params.high_percentile, hi, values.size)
    out = _per_frame(_clip_block, data, lo=lo, hi=hi)
    return _like(out, movie, contrast_limits=[lo, hi])


def _take_pixels(block: np.ndarray, *, pixels: np.ndarray | None) -> np.ndarray:
    """(t, y, x) → (t, n) float64 values at the flat pixel indices (all when None)."""
    flat = block.reshape(block.shape[0], -1)
    return (flat if pixels is None else flat[:, pixels]).astype(np.float64)


def _clip_block(block: np.ndarray, *, lo: float, hi: float) -> np.ndarray:
    """(t, y, x) → (t, y, x) float32 ``(clip(I, lo, hi) − lo) / (hi − lo)``, 0 when hi == lo."""
    if not hi > lo:
        return np.zeros(block.shape, np.float32)
    x = np.clip(block.astype(np.float64), lo, hi)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def highpass(movie: xr.DataArray, sigma: float) -> xr.DataArray:
    """Per-frame Gaussian high-pass ``I − G_σ * I`` (``reflect`` borders).

    Used to match 1p frames to a template in motion correction, where the
    smooth background would otherwise dominate the cross-correlation.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), any real dtype, dask- or numpy-backed.
    sigma : float
        SD (pixels) of the Gaussian blur subtracted, > 0.

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32 in movie units, lazy; coords and attrs of ``movie``.

    Raises
    ------
    ParameterError
        ``sigma`` is not a positive number.
    InputError
        Wrong dims or dtype, or an empty movie.
    """
    if not (isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma > 0):
        raise ParameterError(
            f"highpass sigma must be a positive number of pixels, got {sigma!r}; "
            "use about the neuron radius."
        )
    data = whole_frames(movie, "highpass")
    out = _per_frame(_highpass_block, data, sigma=float(sigma))
    return _like(out, movie)


def _highpass_block(block: np.ndarray, *, sigma: float) -> np.ndarray:
    """(t, y, x) → (t, y, x) float32 ``I − G_σ * I``."""
    frames = block.astype(np.float32)
    return frames - ndimage.gaussian_filter(frames, sigma=(0, sigma, sigma), mode="reflect")

