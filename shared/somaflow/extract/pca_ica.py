"""PCA/ICA source extraction (Mukamel, Nimmerjahn & Schnitzer, Neuron 2009).

The comparison baseline of ``somaflow run --method pca-ica``. Lengths scale
with the neuron radius r (pixels).

1. **Decomposition movie** — the movie averaged over ``b`` frames (``b`` =
   ``temporal_bin``, raised until at most ``max_frames_for_decomposition``
   frames remain) and over ``spatial_downsample``² pixels, then band-passed
   frame by frame: minus its Gaussian blur of ``background_sigma`` (2 r: removes
   neuropil and background fluctuations, which would otherwise take PCs and mix
   into the cells' ICs) and smoothed by ``spatial_sigma`` (r/5: raises a soma's
   SNR per pixel). A lazy (frame, pixel) float32 dask matrix chunked along
   frames (:func:`plan_frame_chunk`), held in memory only when it fits
   ``cache_bytes``.
2. **Normalization** — one streaming pass computes each pixel's temporal mean
   ``F̄`` and noise ``σ`` (RMS of the first difference over √2); each pixel
   becomes ``(F − F̄) / σ``: unit noise everywhere (pixels constant in time
   become 0). This replaces the paper's per-pixel ΔF/F, which the band-pass
   makes meaningless (it removes the baseline ΔF/F divides by); it also makes
   the noise level of step 3 known.
3. **PCA** — a randomized rank-``n_pcs`` SVD (``dask.array.linalg.svd_compressed``
   with ``compute=True``: each of its ``2 + 2·power_iterations`` passes streams
   the frame chunks and keeps only (frame, k) and (pixel, k) factors, so the
   movie is never held in memory). **Noise PCs** are dropped: a PC is kept when
   its singular value exceeds ``noise_pc_margin`` times the largest singular
   value expected of noise alone, ``√(T·λ) + √P`` for T frames, P pixels, unit
   noise variance and λ the top eigenvalue of the band-passed noise's spatial
   correlation (1 for white noise: the Marchenko–Pastur edge). That value is an
   upper bound for correlated noise; ``noise_pc_margin`` = 0.85 was measured
   best on the simulator (mean F1 on 2p-small seeds 0–2: 0.80 → 0.50,
   0.85 → 0.53, 0.90 → 0.49, 1.0 → 0.36). Memory: a few frame chunks plus a
   few (pixel, n_pcs + 10) float32 partial products of the SVD's passes
   (chunks hold at least n_pcs + 10 rows so the partials are no larger).
4. **Spatio-temporal ICA** — the fixed-point algorithm of CellSort
   (``fpica_standardica``: symmetric fastICA with the skewness contrast
   ``g(u) = u²``) on ``[(1 − μ)·V, μ·U] / √(1 − 2μ + 2μ²)``, the kept spatial
   (V, pixel samples) and temporal (U, frame samples, centred) singular vectors
   with orthonormal rows; ``μ`` = ``mu`` weights temporal against spatial
   skewness. Each IC is signed to positive skewness over the concatenated
   samples. scikit-learn is not a dependency; the algorithm is a few lines of
   numpy.
5. **Segmentation** of each spatial IC (bilinearly interpolated back to the
   movie's grid when downsampled): a Gaussian of ``smooth_sigma``, threshold at
   ``threshold`` robust SDs (1.4826 · MAD) above the median, connected
   components; each component is cut at ``peak_fraction`` of its height above
   the median (the connected part holding its peak, holes filled) and kept when
   its area lies in ``[min_area_fraction, max_area_fraction] · π r²``. Of two
   masks sharing more than ``duplicate_overlap`` of the smaller one only the
   higher-scoring one stays.

``score`` = ``k / (k + min_skewness)`` with ``k`` the positive part of the
skewness of the unit's IC time course: 0.5 at the acceptance threshold;
``accepted`` = skewness ≥ ``min_skewness``. Noise ICs are near-Gaussian; calcium
transients are right-skewed.

Traces come from :func:`somaflow.traces.extract_traces` on the full-rate movie
with the masks (neuropil-corrected F, ΔF/F, spikes, SNR), not from the IC time
courses: those are at the binned rate, in whitened units of arbitrary scale,
and would make this method's traces incomparable with the other methods'. The
IC time courses are kept as ``ic_traces`` in ``units``.

Measured F1 (IoU ≥ 0.5, accepted units, raw simulator movies with their
motion, defaults of :meth:`PcaIcaParams.for_movie`): 2p-small seeds 0/1/2
0.58/0.57/0.44, 2p-dense 0.51, 1p-small 0.67 (the band-pass removes its
background; on the morphologically background-removed movie 0.54).  For
comparison the local-maxima detector reports 0.81 on 2p-small (seeds 0–5).

PCA/ICA finds active cells only — a cell that never fires has no independent
component — and needs many frames: cells whose activity stays below the noise
edge of step 3 are missed.
"""

from __future__ import annotations

import logging
import math

import dask
import dask.array as da
import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.traces import TraceParams, extract_traces

log = logging.getLogger(__name__)

_MAD_TO_SIGMA = 1.4826
#: oversampling of the randomized SVD (extra random vectors beyond n_pcs)
_OVERSAMPLES = 10
#: default n_pcs: this many PCs per neuron area (π r²) of the field of view ...
_PCS_PER_NEURON_AREA = 0.5
#: ... within these bounds
_MIN_DEFAULT_PCS, _MAX_DEFAULT_PCS = 10, 300


class PcaIcaParams(BaseModel):
    """Parameters of :func:`pca_ica`; see the module docstring for the method.

    Defaults were measured on the simulator's 2p-small preset (seeds 0–2, r = 5
    px, 10 Hz); :meth:`for_movie` scales the lengths with the neuron radius.

    Attributes
    ----------
    neuron_radius : float
        Typical soma radius r (pixels of the input movie).
    temporal_bin : int
        Frames averaged into one frame of the decomposition movie.
    spatial_downsample : int
        Pixels averaged along y and along x into one decomposition pixel.
    max_frames_for_decomposition : int
        Most frames in the decomposition movie: ``temporal_bin`` is raised to
        ``ceil(frames / max_frames_for_decomposition)`` when needed; bounds the
        (frame, k) factors and the ICA's cost.
    background_sigma : float
        Each decomposition frame minus its Gaussian blur of this sigma
        (movie pixels; 0 = off).
    spatial_sigma : float
        Gaussian smoothing of each decomposition frame (movie pixels; 0 = off).
    n_pcs : int or None
        PCs computed; None: ``0.5 · y·x / (π r²)`` on the decomposition grid,
        clipped to [10, 300] and to ``min(frames, pixels) − 1``.
    noise_pc_margin : float
        A PC is kept when its singular value exceeds this times the noise
        edge; 0 keeps all ``n_pcs``.
    n_ics : int or None
        ICs sought; None: one per kept PC. Capped at the kept PCs.
    mu : float
        Weight of temporal (1) against spatial (0) skewness in the ICA.
    power_iterations : int
        Power iterations of the randomized SVD (each adds two passes over the
        decomposition matrix).
    max_ica_iterations : int
        Iteration limit of the fixed-point ICA (a warning is logged when hit).
    ica_tolerance : float
        The ICA stops when ``1 − min |cos|`` between successive unmixing
        vectors falls below this.
    smooth_sigma : float
        Gaussian sigma applied to each spatial IC before thresholding (pixels).
    threshold : float
        Segmentation threshold, robust SDs above the IC image's median.
    peak_fraction : float
        Each component is cut at this fraction of its height above the median
        (0: keep the thresholded component).
    min_area_fraction, max_area_fraction : float
        Allowed mask area as fractions of π r².
    duplicate_overlap : float
        Two masks are duplicates when they share more than this fraction of the
        smaller one; the higher-scoring one is kept.
    min_skewness : float
        A unit is accepted when its IC time course has at least this skewness
        (0.5, 0.75 and 1.0 give the same F1 within 0.01 on the simulator: the
        segmentation already removes most noise ICs; 0.5 keeps cells that fire
        often, whose time courses are less skewed).
    chunk_bytes : int
        Memory budget of one frame chunk (bytes) of the movie as float32 before
        binning; the frame chunk of the decomposition matrix is that many
        frames divided by the bin.
    cache_bytes : int
        The binned, band-passed (frame, pixel) float32 matrix is computed once
        and held in memory when it takes at most this many bytes; larger ones
        are recomputed from the movie, chunk by chunk, in every pass.
    seed : int
        Seed of the randomized SVD and of the ICA's initial unmixing matrix.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(5.0, gt=0, description="typical soma radius (pixels)")
    temporal_bin: int = Field(1, ge=1, description="frames averaged per decomposition frame")
    spatial_downsample: int = Field(1, ge=1, description="pixels averaged along y and along x")
    max_frames_for_decomposition: int = Field(
        3000, ge=3, description="most frames entering the decomposition (binning raised to fit)"
    )
    background_sigma: float = Field(
        10.0, ge=0, description="subtract each frame's Gaussian blur of this sigma (pixels; 0 = off)"
    )
    spatial_sigma: float = Field(1.0, ge=0, description="Gaussian smoothing of each frame (pixels)")
    n_pcs: int | None = Field(None, ge=1, description="PCs computed; None = from the movie size")
    noise_pc_margin: float = Field(
        0.85, ge=0, description="keep PCs above this x the noise singular-value edge (0 = all)"
    )
    n_ics: int | None = Field(None, ge=1, description="ICs sought; None = one per kept PC")
    mu: float = Field(0.5, ge=0, le=1, description="temporal (1) vs spatial (0) skewness weight")
    power_iterations: int = Field(2, ge=0, le=10, description="randomized-SVD power iterations")
    max_ica_iterations: int = Field(500, ge=1, description="fixed-point ICA iteration limit")
    ica_tolerance: float = Field(1e-4, gt=0, lt=1, description="ICA convergence: 1 - min |cos|")
    smooth_sigma: float = Field(1.5, ge=0, description="Gaussian sigma on IC images (pixels)")
    threshold: float = Field(3.0, gt=0, description="segmentation threshold (robust SDs)")
    peak_fraction: float = Field(
        0.4, ge=0, lt=1, description="cut each component at this fraction of its height"
    )
    min_area_fraction: float = Field(0.5, ge=0, description="minimum mask area / (pi r^2)")
    max_area_fraction: float = Field(3.0, gt=0, description="maximum mask area / (pi r^2)")
    duplicate_overlap: float = Field(
        0.5, gt=0, le=1, description="shared fraction of the smaller mask that makes a duplicate"
    )
    min_skewness: float = Field(
        0.5, gt=0, description="accept units whose IC time course has at least this skewness"
    )
    chunk_bytes: int = Field(
        64 << 20, gt=0, description="bytes per frame chunk of the float32 movie before binning"
    )
    cache_bytes: int = Field(
        512 << 20, ge=0, description="hold the decomposition matrix in memory up to this size (bytes)"
    )
    seed: int = Field(0, ge=0, description="seed of the randomized SVD and the ICA start")

    @model_validator(mode="after")
    def _consistent(self) -> PcaIcaParams:
        if self.min_area_fraction >= self.max_area_fraction:
            raise ValueError(
                f"min_area_fraction ({self.min_area_fraction}) must be below max_area_fraction "
                f"({self.max_area_fraction})"
            )
        if self.n_pcs is not None and self.n_ics is not None and self.n_ics > self.n_pcs:
            raise ValueError(f"n_ics ({self.n_ics}) cannot exceed n_pcs ({self.n_pcs}); lower n_ics")
        return self

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> PcaIcaParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz): frames are binned to about 5 Hz for the
            decomposition (indicator transients last ~0.5–1 s).
        modality : str
            ``"2p"`` or ``"1p"``; the defaults are the same (pass a 1p movie
            with its background removed, as ``trace_movie`` gives).
        neuron_radius : float
            Soma radius r (pixels): band-pass r/5 … 2 r, IC smoothing 0.3 r,
            areas in units of π r²; the decomposition grid is downsampled so
            that r stays at 4–8 of its pixels.
        """
        r = float(neuron_radius)
        return cls(
            neuron_radius=r,
            temporal_bin=max(1, int(round(float(fps) / 5.0))),
            spatial_downsample=max(1, int(r // 4)),
            background_sigma=round(2.0 * r, 3),
            spatial_sigma=round(r / 5.0, 3),
            smooth_sigma=round(0.3 * r, 3),
        )


def pca_ica(
    movie: xr.DataArray,
    params: PcaIcaParams,
    *,
    trace_params: TraceParams | None = None,
    trace_movie: xr.DataArray | None = None,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Units and their activity by PCA/ICA.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) fluorescence (motion-corrected; for 1p background-removed),
        any real dtype, dask- or numpy-backed, ideally chunked along frames;
        never loaded whole. Its ``fps`` (and ``modality``) attrs set the trace
        parameters when ``trace_params`` is None.
    params : PcaIcaParams
        Stage parameters.
    trace_params : somaflow.traces.TraceParams, optional
        Parameters of the traces; default ``TraceParams.for_movie`` from the
        movie's attrs and ``params.neuron_radius``.
    trace_movie : xarray.DataArray, optional
        (frame, y, x) movie the traces are read from, same shape as ``movie``
        (e.g. the background-removed movie of a 1p session while ``movie`` is
        the corrected one); default ``movie``.

    Returns
    -------
    units : xarray.Dataset
        ``masks`` (unit, y, x) bool; ``footprints`` (unit, y, x) float32 in
        [0, 1] (the IC image, clipped at 0, on the thresholded component holding
        the mask, max 1); ``score`` (unit) float32 in [0, 1); ``accepted``
        (unit) bool; ``skewness`` (unit) float32 of the IC time course;
        ``contrast`` (unit) float32, the component's peak in robust SDs of its
        smoothed IC image; ``ic_traces`` (unit, ic_frame) float32, the IC time
        course on the binned frames (zero mean, unit variance). Units by
        decreasing score; several units may share an IC. Attrs ``n_pcs``,
        ``n_signal_pcs``, ``n_ics``, ``temporal_bin``, ``spatial_downsample``.
        A movie with no PC above the noise edge gives zero units.
    traces : xarray.Dataset
        From :func:`somaflow.traces.extract_traces` on ``trace_movie`` with the
        masks of all units (computed): ``traces``, ``dff``, ``spikes`` (unit, frame)
        float32 and ``snr`` (unit) float32.

    Raises
    ------
    InputError
        Wrong dims, too few frames or pixels, NaN/inf values, a movie constant in
        time, or ``n_pcs`` larger than the decomposition movie allows.
    ParameterError
        No frame rate for the traces.
    """
    _check_dims(movie)
    trace_movie = movie if trace_movie is None else trace_movie
    _check_dims(trace_movie)
    if trace_movie.shape != movie.shape:
        raise InputError(
            f"trace_movie is {trace_movie.shape} (frame, y, x) but the movie is {movie.shape}; "
            "pass a trace movie of the same session and size."
        )
    if trace_params is None:
        trace_params = _default_trace_params(movie, params)
    matrix, bin_t, grid = decomposition_matrix(movie, params)
    pcs = principal_components(matrix, grid, params)
    n_signal = int(pcs.attrs["n_signal_pcs"])
    n_ics = min(params.n_ics or n_signal, n_signal)
    log.info("pca-ica: %d frames binned by %d, %d PCs, %d above the noise edge, %d ICs",
             movie.sizes["frame"], bin_t, pcs.sizes["component"], n_signal, n_ics)
    ics = spatiotemporal_ica(pcs.isel(component=slice(0, n_signal)), n_ics, params)
    filters = upsample_filters(ics["spatial"], (movie.sizes["y"], movie.sizes["x"]),
                               params.spatial_downsample)
    units = segment_filters(filters, ics["skewness"].values, params)
    source = units["component"].values
    units["ic_traces"] = (("unit", "ic_frame"), ics["temporal"].values[source].astype(np.float32))
    units = units.drop_vars("component")
    units.attrs.update(n_pcs=int(pcs.sizes["component"]), n_signal_pcs=n_signal, n_ics=n_ics,
                       temporal_bin=bin_t, spatial_downsample=params.spatial_downsample)
    units = units.assign_coords({d: movie.coords[d] for d in ("y", "x") if d in movie.coords})
    traces = extract_traces(trace_movie, units["masks"], trace_params).compute()
    log.info("pca-ica: %d units, %d accepted", units.sizes["unit"], int(units["accepted"].sum()))
    return units, traces


# ----------------------------------------------------------------------------- decomposition


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


# ----------------------------------------------------------------------------- ICA


def spatiotemporal_ica(pcs: xr.Dataset, n_ics: int, params: PcaIcaParams) -> xr.Dataset:
    """Spatio-temporal skewness ICA of principal components (CellSort's fixed point).

    Parameters
    ----------
    pcs : xarray.Dataset
        ``temporal`` (component, frame) and ``spatial`` (component, y, x)
        singular vectors with orthonormal rows, as from
        :func:`principal_components`.
    n_ics : int
        ICs sought, at most the number of components; 0 gives empty outputs.
    params : PcaIcaParams
        Uses ``mu``, ``max_ica_iterations``, ``ica_tolerance``, ``seed``.

    Returns
    -------
    xarray.Dataset
        ``temporal`` (ic, frame) float64 — IC time courses, zero mean, unit
        variance; ``spatial`` (ic, y, x) float64 — IC images, unit norm;
        ``skewness`` (ic) float64 of the time courses. Signed to positive
        skewness over the concatenated samples; sorted by decreasing
        ``skewness``. Attr ``iterations``.
    """
    temporal = np.asarray(pcs["temporal"].values, np.float64)
    spatial_img = np.asarray(pcs["spatial"].values, np.float64)
    k, n_rows = temporal.shape
    grid = spatial_img.shape[1:]
    spatial = spatial_img.reshape(k, -1)
    n_ics = min(int(n_ics), k)
    if n_ics == 0:
        return xr.Dataset(
            {
                "temporal": (("ic", "frame"), np.zeros((0, n_rows))),
                "spatial": (("ic", "y", "x"), np.zeros((0, *grid))),
                "skewness": (("ic",), np.zeros(0)),
            },
            attrs={"iterations": 0},
        )
    sig = temporal - temporal.mean(axis=1, keepdims=True)
    mu = params.mu
    x = np.concatenate([(1 - mu) * spatial, mu * sig], axis=1) / math.sqrt(1 - 2 * mu + 2 * mu * mu)
    b = _symmetric_orthogonalize(np.random.default_rng(params.seed).standard_normal((k, n_ics)))
    n_samples = x.shape[1]
    iterations = 0
    converged = False
    while iterations < params.max_ica_iterations and not converged:
        iterations += 1
        new = _symmetric_orthogonalize(x @ ((x.T @ b) ** 2) / n_samples)
        converged = 1.0 - float(np.min(np.abs(np.sum(new * b, axis=0)))) < params.ica_tolerance
        b = new
    if not converged:
        log.warning("pca-ica: the ICA did not converge in %d iterations; raise max_ica_iterations "
                    "or ica_tolerance", params.max_ica_iterations)
    w = b.T  # (ic, component), orthonormal rows
    sign = np.where(_skewness(w @ x) < 0, -1.0, 1.0)
    w = w * sign[:, None]
    ic_time = w @ sig
    ic_time /= np.maximum(ic_time.std(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    skew = _skewness(ic_time)
    order = np.argsort(-skew, kind="stable")
    return xr.Dataset(
        {
            "temporal": (("ic", "frame"), ic_time[order]),
            "spatial": (("ic", "y", "x"), (w @ spatial)[order].reshape(n_ics, *grid)),
            "skewness": (("ic",), skew[order]),
        },
        attrs={"iterations": iterations},
    )


def _symmetric_orthogonalize(b: np.ndarray) -> np.ndarray:
    """``B (BᵀB)^{-1/2}``: the nearest matrix with orthonormal columns."""
    u, _, vt = np.linalg.svd(b, full_matrices=False)
    return u @ vt


def _skewness(rows: np.ndarray) -> np.ndarray:
    """Sample skewness of each row of a 2-D array (0 for a constant row)."""
    c = rows - rows.mean(axis=1, keepdims=True)
    m2 = np.mean(c**2, axis=1)
    m3 = np.mean(c**3, axis=1)
    return np.divide(m3, m2**1.5, out=np.zeros_like(m3), where=m2 > 0)


# ----------------------------------------------------------------------------- segmentation


def upsample_filters(spatial: xr.DataArray, shape: tuple[int, int], factor: int) -> np.ndarray:
    """IC images on the decomposition grid brought to the movie's pixel grid.

    Parameters
    ----------
    spatial : xarray.DataArray
        (ic, y', x') images on a grid downsampled by ``factor``.
    shape : (int, int)
        (y, x) of the movie.
    factor : int
        Spatial downsampling factor; 1 returns the images unchanged.

    Returns
    -------
    numpy.ndarray
        (ic, y, x) float64: bilinear interpolation between block centres (block
        ``i`` is centred on movie pixel ``i·factor + (factor − 1)/2``), edge
        values extended.
    """
    imgs = np.asarray(spatial.values, np.float64)
    if factor == 1:
        return imgs
    ny, nx = shape
    cy = (np.arange(ny) - (factor - 1) / 2) / factor
    cx = (np.arange(nx) - (factor - 1) / 2) / factor
    coords = np.stack(np.meshgrid(cy, cx, indexing="ij"))
    out = np.zeros((len(imgs), ny, nx))
    for i, img in enumerate(imgs):
        out[i] = ndimage.map_coordinates(img, coords, order=1, mode="nearest")
    return out


def segment_filters(filters: np.ndarray, skewness: np.ndarray, params: PcaIcaParams) -> xr.Dataset:
    """Masks from IC images: smooth, threshold, split, cut, area filter, de-duplicate.

    Parameters
    ----------
    filters : numpy.ndarray
        (ic, y, x) float IC images, signed so that cells are positive.
    skewness : numpy.ndarray
        (ic,) skewness of each IC's time course.
    params : PcaIcaParams
        Uses the segmentation parameters and ``min_skewness``.

    Returns
    -------
    xarray.Dataset
        ``masks`` (unit, y, x) bool; ``footprints`` (unit, y, x) float32 in
        [0, 1]; ``score`` (unit) float32; ``accepted`` (unit) bool;
        ``skewness`` (unit) float32; ``contrast`` (unit) float32;
        ``component`` (unit) int64, the IC each unit comes from. By decreasing
        score (see :func:`pca_ica`).
    """
    n_ic, ny, nx = filters.shape
    r = params.neuron_radius
    lo, hi = (f * math.pi * r * r for f in (params.min_area_fraction, params.max_area_fraction))
    masks: list[np.ndarray] = []
    footprints: list[np.ndarray] = []
    source: list[int] = []
    contrast: list[float] = []
    for i in range(n_ic):
        img = filters[i]
        smooth = ndimage.gaussian_filter(img, params.smooth_sigma, mode="nearest") \
            if params.smooth_sigma > 0 else img
        med = float(np.median(smooth))
        sd = _MAD_TO_SIGMA * float(np.median(np.abs(smooth - med)))
        if not sd > 0:
            continue
        labels, _ = ndimage.label(smooth > med + params.threshold * sd)
        for j, sl in enumerate(ndimage.find_objects(labels), start=1):
            region = labels[sl] == j
            mask, peak = _cut(smooth[sl], region, med, params.peak_fraction)
            if not lo <= int(mask.sum()) <= hi:
                continue
            full = np.zeros((ny, nx), bool)
            full[sl] = mask
            weights = np.zeros((ny, nx), np.float32)
            weights[sl] = np.where(region, np.clip(img[sl], 0, None), 0)
            top = float(weights.max())
            masks.append(full)
            footprints.append(weights / top if top > 0 else full.astype(np.float32))
            source.append(i)
            contrast.append((peak - med) / sd)
    src = np.asarray(source, np.int64)
    skew = np.asarray(skewness, np.float64)[src]
    positive = np.clip(skew, 0, None)
    score = positive / (positive + params.min_skewness)
    stack = np.asarray(masks, bool).reshape(-1, ny, nx)
    kept = _drop_duplicates(stack, score, params.duplicate_overlap)
    order = kept[np.argsort(-score[kept], kind="stable")]
    return xr.Dataset(
        {
            "masks": (("unit", "y", "x"), stack[order]),
            "footprints": (("unit", "y", "x"),
                           np.asarray(footprints, np.float32).reshape(-1, ny, nx)[order]),
            "score": (("unit",), score[order].astype(np.float32)),
            "accepted": (("unit",), skew[order] >= params.min_skewness),
            "skewness": (("unit",), skew[order].astype(np.float32)),
            "contrast": (("unit",), np.asarray(contrast, np.float32)[order]),
            "component": (("unit",), src[order]),
        }
    )


def _cut(smooth: np.ndarray, region: np.ndarray, base: float, fraction: float) -> tuple[np.ndarray, float]:
    """The part of ``region`` at or above ``base + fraction · (peak − base)`` that
    holds the region's peak, holes filled; and the peak value."""
    values = np.where(region, smooth, -np.inf)
    py, px = np.unravel_index(int(np.argmax(values)), values.shape)
    peak = float(smooth[py, px])
    labels, _ = ndimage.label(region & (smooth >= base + fraction * (peak - base)))
    return ndimage.binary_fill_holes(labels == labels[py, px]), peak


def _drop_duplicates(masks: np.ndarray, score: np.ndarray, max_overlap: float) -> np.ndarray:
    """Indices of the masks kept, greedily by decreasing score: a mask sharing
    more than ``max_overlap`` of the smaller mask's area with a kept one is dropped."""
    n = len(masks)
    if n == 0:
        return np.zeros(0, np.int64)
    flat = masks.reshape(n, -1).astype(np.float32)
    inter = flat @ flat.T
    area = flat.sum(axis=1)
    overlap = inter / np.maximum(np.minimum(area[:, None], area[None, :]), 1.0)
    kept: list[int] = []
    for i in np.argsort(-score, kind="stable"):
        if not kept or overlap[i, kept].max() <= max_overlap:
            kept.append(int(i))
    return np.asarray(kept, np.int64)


# ----------------------------------------------------------------------------- inputs


def _check_dims(movie: xr.DataArray) -> None:
    if tuple(movie.dims) != ("frame", "y", "x"):
        raise InputError(
            f"pca_ica needs movies with dims ('frame', 'y', 'x'), got {tuple(movie.dims)}. "
            "Transpose or rename it."
        )


def _default_trace_params(movie: xr.DataArray, params: PcaIcaParams) -> TraceParams:
    fps = movie.attrs.get("fps")
    if fps is None or not float(fps) > 0:
        raise ParameterError(
            "pca_ica needs a frame rate for the traces: set the movie's 'fps' attr or pass "
            "trace_params=TraceParams.for_movie(fps, modality, neuron_radius)."
        )
    modality = str(movie.attrs.get("modality", "2p"))
    return TraceParams.for_movie(float(fps), modality, params.neuron_radius)
