"""The PCA step: frame chunks, the pixel-pixel decomposition matrix, noise correlation, the
principal components (randomized SVD).
"""

from __future__ import annotations

import logging
import math

import dask
import dask.array as da
import numpy as np
import xarray as xr
from scipy import ndimage

from somaflow.errors import InputError
from somaflow.extract.pca_ica.params import (
    _MAX_DEFAULT_PCS,
    _MIN_DEFAULT_PCS,
    _OVERSAMPLES,
    _PCS_PER_NEURON_AREA,
    PcaIcaParams,
)

log = logging.getLogger(__name__)


def plan_frame_chunk(n_frames: int, frame_bytes: int, chunk_bytes: int) -> int:
    """Frames per chunk of a frame-chunked matrix under a memory budget.

    Parameters
    ----------
    n_frames : int
        Frames (rows) of the matrix.
    frame_bytes : int
        Bytes of one frame.
    chunk_bytes : int
        Budget of one chunk (bytes).

    Returns
    -------
    int
        ``chunk_bytes // frame_bytes`` clipped to ``[1, n_frames]``.
    """
    return int(max(1, min(n_frames, chunk_bytes // max(1, frame_bytes))))


def decomposition_matrix(
    movie: xr.DataArray, params: PcaIcaParams
) -> tuple[xr.DataArray, int, tuple[int, int]]:
    """The normalized (frame, pixel) matrix PCA runs on, after one statistics pass.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) fluorescence, numpy- or dask-backed.
    params : PcaIcaParams
        Uses the binning, band-pass, ``chunk_bytes`` and ``cache_bytes``.

    Returns
    -------
    matrix : xarray.DataArray
        (frame, pixel) float32, dask-backed, chunked along frames: the binned,
        band-passed movie with each pixel (C order of the (y', x') grid)
        centred and divided by its noise SD. Attrs ``noise_rms`` (RMS over
        pixels of the normalized noise SD: 1, or less when pixels are constant)
        and ``noise_correlation`` (top eigenvalue of the band-passed noise's
        spatial correlation matrix).
    temporal_bin : int
        Frames averaged per row.
    grid : (int, int)
        (y', x') shape of the decomposition grid.

    Raises
    ------
    InputError
        Fewer than 3 binned frames, fewer than 2 pixels, NaN/inf values, or a
        movie constant in time.
    """
    n_frames, ny, nx = (movie.sizes[d] for d in ("frame", "y", "x"))
    bin_t = max(params.temporal_bin, math.ceil(n_frames / params.max_frames_for_decomposition))
    n_rows = n_frames // bin_t
    s = params.spatial_downsample
    gy, gx = ny // s, nx // s
    if n_rows < 3:
        raise InputError(
            f"PCA/ICA needs at least 3 frames after binning by {bin_t}; the movie has {n_frames} "
            f"frames, {n_rows} after binning. Lower temporal_bin or use a longer movie."
        )
    if gy * gx < 2:
        raise InputError(
            f"the movie is {ny}x{nx} pixels, {gy}x{gx} after downsampling by {s}; PCA/ICA needs at "
            "least 2 pixels. Lower spatial_downsample."
        )
    data = movie.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(-1, -1, -1))
    data = data[: n_rows * bin_t, : gy * s, : gx * s]
    # budget the float32 input of a chunk: bin_t frames of (gy·s, gx·s) pixels per row
    rows = plan_frame_chunk(n_rows, bin_t * gy * gx * s * s * 4, params.chunk_bytes)
    data = data.rechunk((rows * bin_t, -1, -1)).astype(np.float32)
    if bin_t > 1 or s > 1:
        data = da.coarsen(np.mean, data, {0: bin_t, 1: s, 2: s})
    sigma, bg_sigma = params.spatial_sigma / s, params.background_sigma / s
    if sigma > 0 or bg_sigma > 0:
        data = data.map_blocks(_band_pass, sigma=sigma, bg_sigma=bg_sigma, dtype=np.float32)
    flat = data.reshape(n_rows, gy * gx)
    if n_rows * gy * gx * 4 <= params.cache_bytes:
        flat = flat.persist()  # filter once instead of once per pass
    mean, noise = _pixel_stats(flat)
    if not (np.isfinite(mean).all() and np.isfinite(noise).all()):
        raise InputError("the movie holds NaN or infinite values; fix or crop the input before PCA/ICA.")
    if not (noise > 0).any():
        raise InputError(
            "the movie is constant in time (no pixel varies): PCA/ICA has no activity to "
            "decompose. Check the input (wrong dataset or a blank recording)."
        )
    scale = np.where(noise > 0, noise, np.inf)  # pixels constant in time become 0
    normalized = ((flat - mean.astype(np.float32)) / scale.astype(np.float32)).astype(np.float32)
    attrs = {"noise_rms": float(np.sqrt(np.mean(noise > 0))),
             "noise_correlation": noise_correlation(sigma, bg_sigma)}
    return xr.DataArray(normalized, dims=("frame", "pixel"), attrs=attrs), bin_t, (gy, gx)


def _band_pass(block: np.ndarray, sigma: float, bg_sigma: float) -> np.ndarray:
    """Each frame of a (frame, y, x) block minus its ``bg_sigma`` blur, then
    smoothed by ``sigma`` (0 skips either step); float32."""
    out = block.astype(np.float32)
    if bg_sigma > 0:
        out = out - ndimage.gaussian_filter(out, (0, bg_sigma, bg_sigma), mode="nearest")
    if sigma > 0:
        out = ndimage.gaussian_filter(out, (0, sigma, sigma), mode="nearest")
    return out


def noise_correlation(sigma: float, bg_sigma: float) -> float:
    """Top eigenvalue of the spatial correlation matrix of white noise after the
    band-pass: the peak of the filter's power spectrum over its mean,
    ``max |K̂|² / Σ k²`` (1 without filtering; ≈ 4πσ² for a Gaussian of
    σ ≳ 1 px alone). Border effects are ignored."""
    if sigma <= 0 and bg_sigma <= 0:
        return 1.0
    half = int(math.ceil(4 * max(sigma, bg_sigma))) + 1
    delta = np.zeros((1, 4 * half + 1, 4 * half + 1), np.float32)
    delta[0, 2 * half, 2 * half] = 1.0
    kernel = _band_pass(delta, sigma, bg_sigma)[0].astype(np.float64)
    power = np.abs(np.fft.fft2(kernel)) ** 2
    return float(power.max() / np.sum(kernel**2))


def _pixel_stats(flat: da.Array) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel temporal mean and noise SD (RMS first difference / √2), float64,
    in one pass over the frame chunks."""
    mean = flat.mean(axis=0, dtype=np.float64)
    msd = ((flat[1:] - flat[:-1]).astype(np.float64) ** 2).mean(axis=0)
    mean, msd = dask.compute(mean, msd)
    return np.asarray(mean), np.sqrt(np.asarray(msd) / 2.0)


def default_n_pcs(grid: tuple[int, int], n_rows: int, radius: float) -> int:
    """PCs computed when ``n_pcs`` is None.

    Parameters
    ----------
    grid : (int, int)
        (y', x') size of the decomposition grid.
    n_rows : int
        Frames of the decomposition matrix.
    radius : float
        Neuron radius in decomposition pixels.

    Returns
    -------
    int
        ``round(0.5 · y'·x' / (π r²))`` (a PC per two neuron areas of the field
        of view), clipped to [10, 300] and to ``min(n_rows, y'·x') − 1``.
    """
    k = int(round(_PCS_PER_NEURON_AREA * grid[0] * grid[1] / (math.pi * radius**2)))
    k = min(max(k, _MIN_DEFAULT_PCS), _MAX_DEFAULT_PCS)
    return max(1, min(k, min(n_rows, grid[0] * grid[1]) - 1))


def principal_components(matrix: xr.DataArray, grid: tuple[int, int], params: PcaIcaParams) -> xr.Dataset:
    """Randomized SVD of the normalized matrix and the noise-PC cut.

    Parameters
    ----------
    matrix : xarray.DataArray
        (frame, pixel) float32, dask-backed, from :func:`decomposition_matrix`
        (its attrs give the noise level).
    grid : (int, int)
        (y', x') shape of the pixel axis.
    params : PcaIcaParams
        Uses ``n_pcs``, ``power_iterations``, ``noise_pc_margin``, ``seed``.

    Returns
    -------
    xarray.Dataset
        ``temporal`` (component, frame) float64 — left singular vectors
        (orthonormal rows); ``spatial`` (component, y, x) float64 — right
        singular vectors (orthonormal when flattened); ``singular_values``
        (component) float64, decreasing. Attrs ``noise_edge`` (expected top
        singular value of noise alone) and ``n_signal_pcs`` (leading PCs above
        ``noise_pc_margin · noise_edge``).

    Raises
    ------
    InputError
        ``n_pcs`` is not below ``min(frames, pixels)`` of the matrix.
    """
    n_rows, n_pix = matrix.shape
    limit = min(n_rows, n_pix) - 1
    if params.n_pcs is None:
        k = default_n_pcs(grid, n_rows, params.neuron_radius / params.spatial_downsample)
    elif params.n_pcs > limit:
        raise InputError(
            f"n_pcs={params.n_pcs} but the decomposition movie has only {n_rows} frames and {n_pix} "
            f"pixels, which allow at most {limit} PCs. Lower n_pcs (or temporal_bin), or use a "
            "longer movie."
        )
    else:
        k = params.n_pcs
    # each frame chunk contributes a dense (pixel, k + oversamples) partial product to
    # Mᵀ·Q: chunks of at least that many rows keep the partials no larger than the chunks
    rows = min(n_rows, max(matrix.data.chunks[0][0], k + _OVERSAMPLES))
    u, s, v = da.linalg.svd_compressed(
        matrix.data.rechunk((rows, -1)), k, n_power_iter=params.power_iterations, n_oversamples=_OVERSAMPLES,
        seed=params.seed, compute=True,
    )
    u, s, v = dask.compute(u, s, v)
    rms = float(matrix.attrs["noise_rms"])
    edge = rms * (math.sqrt(n_rows * float(matrix.attrs["noise_correlation"])) + math.sqrt(n_pix))
    above = np.asarray(s) > params.noise_pc_margin * edge
    n_signal = len(s) if above.all() else int(np.argmin(above))
    if n_signal == len(s) and params.noise_pc_margin > 0:
        log.warning("pca-ica: all %d PCs are above the noise edge; raise n_pcs to find more cells", k)
    return xr.Dataset(
        {
            "temporal": (("component", "frame"), np.asarray(u, np.float64).T),
            "spatial": (("component", "y", "x"), np.asarray(v, np.float64).reshape(k, *grid)),
            "singular_values": (("component",), np.asarray(s, np.float64)),
        },
        attrs={"noise_edge": edge, "n_signal_pcs": n_signal},
    )

