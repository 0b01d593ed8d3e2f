"""Summary images of a movie in one streaming pass over frame chunks.

``summary_images`` returns the mean, max, standard-deviation, local-correlation
and peak-to-noise-ratio (PNR) images of a (frame, y, x) movie. Every frame
chunk is reduced to a small stack of (y, x) partial images (sums, sums of
squares, sums of products with the lower and right neighbours, maxima and
chunk medians); dask adds the partials up in a tree, so memory depends on the
frame size and the chunk size, never on the movie length.

Numerics
--------
Moment sums are accumulated in float64 after subtracting a per-pixel reference
(the movie's first frame). Centering removes the bulk of the signal before
squaring, so ``E[x²] − E[x]²`` does not lose the variance to cancellation
even for bright uint16 movies with many frames; covariances and variances are
invariant to the shift.

The correlation image is CaImAn's ``local_correlations(Y, eight_neighbours=False)``
(also STNeuroNet's): for every pixel, the mean Pearson correlation of its trace
with the traces of its 4-connected neighbours that exist (2 at corners, 3 on
edges). A pair in which either pixel has zero variance contributes 0, so
constant pixels give 0 and never NaN.

The PNR image (CaImAn/CNMF-E ``correlation_pnr`` in spirit, made streaming)
is ``(peak − baseline) / noise`` per pixel, computed on the movie after an
optional per-frame Gaussian smoothing (``pnr_smooth_sigma``):

* baseline — the mean over chunks of each chunk's temporal median (weighted by
  the chunk's frame count): a robust, drift-following stand-in for the global
  median that needs no second pass;
* peak — the maximum over all frames;
* noise — ``median(|Δx|) / (0.6745·√2)``: the MAD estimate of the standard
  deviation of white noise from first differences, with the median taken per
  chunk and averaged over chunks (weighted by the number of differences). The
  difference across a chunk border is not used.

Both medians depend slightly on the chunking (exact for one chunk); chunks
shorter than 32 frames are merged first, and with chunks of ≥ 50 frames the
difference from the one-chunk value is a few percent.
"""

from __future__ import annotations

import logging

import dask.array as da
import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from somaflow.frames import check_movie, whole_frames
from somaflow.robust import DIFF_TO_SIGMA

log = logging.getLogger(__name__)


#: channels of the per-chunk partial stack that are summed over chunks
_SUM_CHANNELS = ("s1", "s2", "s_down", "s_right", "median_w", "mad_w")
#: channels of the per-chunk partial stack that are maxed over chunks
_MAX_CHANNELS = ("max", "smooth_max")
_N_CHANNELS = len(_SUM_CHANNELS) + len(_MAX_CHANNELS)

#: frame chunks shorter than this are merged (PNR medians need enough frames)
_MIN_CHUNK_FRAMES = 32

#: float64 working memory per inner batch of a chunk (bytes)
_BATCH_BYTES = 64 << 20


class SummaryParams(BaseModel):
    """Parameters of :func:`summary_images`.

    Attributes
    ----------
    pnr_smooth_sigma : float
        Standard deviation (pixels) of the per-frame spatial Gaussian applied
        before the PNR statistics; 0 (default) disables it. Smoothing averages
        the noise of a soma's pixels (CNMF-E's choice) but is the costliest
        step of the pass (about 40 %); the local-maxima detector smooths its
        cue images itself, and its F1 on the simulator's 2p and 1p presets does
        not change with this sigma (0, r/4, r/2 measured). The correlation
        image is always computed on the unsmoothed movie (smoothing would
        correlate neighbouring noise).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pnr_smooth_sigma: float = Field(
        0.0, ge=0, description="per-frame Gaussian sigma (pixels) before the PNR statistics; 0 = off"
    )

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> SummaryParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used by this stage, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``.
        neuron_radius : float
            Typical soma radius (pixels).

        Returns
        -------
        SummaryParams
            The defaults (no PNR smoothing) for every modality and radius.
        """
        return cls()


def summary_images(movie: xr.DataArray, params: SummaryParams) -> xr.Dataset:
    """Mean, max, std, correlation and PNR images of a movie.

    The result is lazy (dask-backed). Compute all variables together
    (``summary_images(...).compute()``, or ``dask.compute``) so the movie is
    read once; computing the variables one by one reads it once per variable.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x), any real dtype (typically uint16 or float32), dask- or
        numpy-backed, at least 2 frames. Chunks that split frames spatially are
        merged to whole frames (the neighbour products need them); numpy input
        is chunked along frames automatically.
    params : SummaryParams
        Stage parameters.

    Returns
    -------
    xarray.Dataset
        Variables, each (y, x) float32, coordinates of ``movie`` on y/x kept:

        ``mean_image``
            temporal mean (movie units).
        ``max_image``
            temporal maximum (movie units).
        ``std_image``
            temporal standard deviation, population (ddof=0) (movie units).
        ``correlation_image``
            mean Pearson correlation with the 4-connected neighbours, in [−1, 1].
        ``pnr_image``
            peak-to-noise ratio of the (smoothed) trace (dimensionless, ≥ 0).

    Raises
    ------
    InputError
        ``movie`` does not have dims (frame, y, x), has fewer than 2 frames, or
        is not real-valued.
    """
    check_movie(movie, "summary_images", min_frames=2, why=" to estimate variance and correlation")
    data = whole_frames(movie, min_chunk_frames=_MIN_CHUNK_FRAMES)
    n_frames, ny, nx = data.shape
    ref = data[0].astype(np.float64)
    parts = da.map_blocks(
        _chunk_partials,
        data,
        ref,
        sigma=float(params.pnr_smooth_sigma),
        chunks=((_N_CHANNELS,) * data.numblocks[0], (ny,), (nx,)),
        dtype=np.float64,
        meta=np.empty((0, 0, 0), np.float64),
    ).reshape(data.numblocks[0], _N_CHANNELS, ny, nx)
    n_sum = len(_SUM_CHANNELS)
    sums = parts[:, :n_sum].sum(axis=0)
    maxima = parts[:, n_sum:].max(axis=0)
    n_diff = n_frames - data.numblocks[0]
    images = _finalize(sums, maxima, ref, n_frames=n_frames, n_diff=n_diff)
    coords = {k: movie.coords[k] for k in ("y", "x") if k in movie.coords}
    return xr.Dataset(
        {name: xr.DataArray(arr, dims=("y", "x"), coords=coords) for name, arr in images.items()},
        attrs={"summary_params": params.model_dump_json()},
    )


# ----------------------------------------------------------------------------- helpers




def _chunk_partials(block: np.ndarray, ref: np.ndarray, *, sigma: float) -> np.ndarray:
    """Partial images of one frame chunk.

    Parameters
    ----------
    block : numpy.ndarray
        (t, y, x) frames of one chunk.
    ref : numpy.ndarray
        (y, x) float64 per-pixel reference subtracted before the moment sums.

    Returns
    -------
    numpy.ndarray
        (len(_SUM_CHANNELS) + len(_MAX_CHANNELS), y, x) float64 in the order of
        ``_SUM_CHANNELS + _MAX_CHANNELS``; medians come multiplied by their
        weight (t frames, t − 1 differences).
    """
    t, ny, nx = block.shape
    out = np.zeros((_N_CHANNELS, ny, nx), np.float64)
    s1, s2, s_down, s_right, median_w, mad_w, mx, smx = out
    mx[...] = -np.inf
    batch = max(1, _BATCH_BYTES // max(1, 8 * ny * nx))
    buffer = np.empty((min(batch, t), ny, nx), np.float64)
    for start in range(0, t, batch):
        x = buffer[: min(batch, t - start)]
        x[...] = block[start:start + batch]
        np.maximum(mx, x.max(axis=0), out=mx)
        x -= ref
        s1 += x.sum(axis=0)
        s2 += np.einsum("tyx,tyx->yx", x, x)
        s_down[:-1] += np.einsum("tyx,tyx->yx", x[:, :-1], x[:, 1:])
        s_right[:, :-1] += np.einsum("tyx,tyx->yx", x[:, :, :-1], x[:, :, 1:])
    smooth = block.astype(np.float32)
    if sigma > 0:
        smooth = ndimage.gaussian_filter(smooth, sigma=(0, sigma, sigma), mode="nearest")
    smx[...] = smooth.max(axis=0)
    rows = max(1, _BATCH_BYTES // max(1, 4 * t * nx))  # row strips bound the temporaries
    for y0 in range(0, ny, rows):
        strip = smooth[:, y0:y0 + rows]
        n_rows = strip.shape[1]
        # pixel-major copy: numpy's (SIMD) sort along a contiguous axis beats a strided median
        traces = np.ascontiguousarray(strip.reshape(t, -1).T)
        if t > 1:
            jumps = np.abs(np.diff(traces, axis=1))
            mad_w[y0:y0 + n_rows] = (t - 1) * _median_last(jumps).reshape(n_rows, nx)
        median_w[y0:y0 + n_rows] = t * _median_last(traces).reshape(n_rows, nx)  # sorts traces
    return out


def _median_last(a: np.ndarray) -> np.ndarray:
    """Median along the last axis (sorts ``a`` in place), as ``np.median``."""
    a.sort(axis=-1)
    n = a.shape[-1]
    if n % 2:
        return a[..., n // 2].astype(np.float64)
    return 0.5 * (a[..., n // 2 - 1].astype(np.float64) + a[..., n // 2])


def _pair_correlation(
    cov: da.Array, var_a: da.Array, var_b: da.Array, tol_a: da.Array, tol_b: da.Array
) -> da.Array:
    """Pearson correlation from moments; 0 where either variance is (numerically) zero."""
    ok = (var_a > tol_a) & (var_b > tol_b)
    denom = da.sqrt(da.where(ok, var_a * var_b, 1.0))
    return da.clip(da.where(ok, cov / denom, 0.0), -1.0, 1.0)


def _finalize(
    sums: da.Array, maxima: da.Array, ref: da.Array, *, n_frames: int, n_diff: int
) -> dict[str, da.Array]:
    """Images from the reduced partials (all lazy, (y, x) float32)."""
    s1, s2, s_down, s_right, median_w, mad_w = (sums[i] for i in range(len(_SUM_CHANNELS)))
    mx, smx = maxima[0], maxima[1]
    mean_c = s1 / n_frames
    second = s2 / n_frames
    var = da.maximum(second - mean_c**2, 0.0)
    # variance below float64 round-off of the centered second moment counts as zero
    tol = 1e-12 * second + 1e-300

    cov_down = s_down[:-1] / n_frames - mean_c[:-1] * mean_c[1:]
    corr_down = _pair_correlation(cov_down, var[:-1], var[1:], tol[:-1], tol[1:])
    cov_right = s_right[:, :-1] / n_frames - mean_c[:, :-1] * mean_c[:, 1:]
    corr_right = _pair_correlation(cov_right, var[:, :-1], var[:, 1:], tol[:, :-1], tol[:, 1:])

    ny, nx = ref.shape
    total = (
        da.pad(corr_down, ((0, 1), (0, 0)))  # pair with the pixel below
        + da.pad(corr_down, ((1, 0), (0, 0)))  # pair with the pixel above
        + da.pad(corr_right, ((0, 0), (0, 1)))  # right neighbour
        + da.pad(corr_right, ((0, 0), (1, 0)))  # left neighbour
    )
    n_neighbours = _neighbour_count(ny, nx)
    correlation = total / np.maximum(n_neighbours, 1)

    baseline = median_w / n_frames
    noise = mad_w / n_diff / DIFF_TO_SIGMA
    pnr = da.where(noise > 0, (smx - baseline) / da.where(noise > 0, noise, 1.0), 0.0)
    pnr = da.maximum(pnr, 0.0)

    images = {
        "mean_image": mean_c + ref,
        "max_image": mx,
        "std_image": da.sqrt(var),
        "correlation_image": correlation,
        "pnr_image": pnr,
    }
    return {k: v.astype(np.float32) for k, v in images.items()}


def _neighbour_count(ny: int, nx: int) -> np.ndarray:
    """(y, x) number of 4-connected neighbours inside the image."""
    count = np.zeros((ny, nx), np.int64)
    count[:-1] += 1
    count[1:] += 1
    count[:, :-1] += 1
    count[:, 1:] += 1
    return count
