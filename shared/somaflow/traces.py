"""Fluorescence traces, ΔF/F, spikes and SNR of units given their masks.

Pipeline per unit (all lazy, dask-parallel):

1. **Fluorescence** ``F_cell`` — the mask-weighted mean of the movie over the
   unit's pixels, and ``F_np`` — the plain mean over its neuropil annulus: the
   pixels more than ``neuropil_inner_gap`` and at most ``neuropil_inner_gap +
   neuropil_width`` pixels from the mask, excluding every unit's pixels (as in
   Suite2p). The annulus is widened (doubling its width, up to 4×) until it
   holds ``min_neuropil_pixels``. Both are one sparse matrix product per frame
   chunk, so memory does not grow with the movie length.
2. **Trace** ``F = F_cell − c·F_np`` with ``c = neuropil_coefficient`` (0.7 for
   2p, the Suite2p/Allen convention; 0 for 1p, whose neuropil is removed by
   background subtraction upstream instead).
3. **ΔF/F** ``(F − F0) / max(F0, floor)``: ``F0`` is a running percentile of
   ``F`` over ``baseline_window_s`` (the ``baseline_percentile``-th, 8 by
   default). The floor is ``max(min_baseline_fraction · median_t(F_cell),
   σ_F)``: it keeps ΔF/F finite when the neuropil-corrected baseline is near 0
   or negative (σ_F: noise of ``F`` from the MAD of its first difference).
4. **Spikes** — OASIS non-negative deconvolution of each unit's whole ΔF/F
   trace (:func:`somaflow.deconvolve.deconvolve`, parameters in
   ``deconvolution``): AR(1) kernel shared by all units of the movie (the
   median of the units' AR(2) fits, ``g_scope="shared"``, its decay
   shortened by ``decay_correction_s``; the prior ``deconvolution.tau_s``
   where no fit is stable), a penalty of 3 noise SDs, percentile baseline,
   spikes moved ``onset_shift_s`` earlier (defaults chosen by
   leave-one-dataset-out CV on electrophysiology, ``docs/benchmarks.md``).
   ``traces`` (the denoised calcium) is a second pass with the same kernel
   estimates but noise-constrained sparsity and the raw decay (``calcium``):
   the spike settings' own calcium matches the true calcium less well at low
   SNR (``benchmarks/bench_deconv_traces.py``).
   ΔF/F rather than F so that the spikes of all units share one scale (ΔF/F
   jump per frame) and the running-percentile baseline has already removed
   slow drifts, which OASIS's constant baseline cannot follow. Computed per
   block of whole traces, chunked along units (the shared kernel is
   estimated over all blocks first). On the simulator (true
   masks; median over active cells of the correlation of Gaussian-smoothed
   spikes with the truth, ``somaflow.evaluate.traces.spike_correlations``,
   mean of seeds 0 and 1; 2p-small / 2p-dense / 2p-lowsnr / 1p-small) it
   scores 0.89 / 0.80 / 0.45 / 0.29 against 0.81 / 0.67 / 0.14 / 0.29 for
   the thresholded AR(1) inverse filter it replaces.
5. **SNR** — peak over noise of ΔF/F after a running mean of ``n ≈ tau·fps/2``
   frames (``tau = deconvolution.tau_s``, roughly matched to a transient):
   ``(max_t(m) − median_t(m)) / (σ_dff / √n)`` with ``m`` the running mean
   and ``σ_dff`` the noise SD of ΔF/F from the MAD of its first difference.
"""

from __future__ import annotations

import logging
import math

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr
from numpy.lib.stride_tricks import sliding_window_view
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from scipy import ndimage

from somaflow.errors import InputError, ParameterError
from somaflow.footprints import sparse_masks
from somaflow.frames import check_movie, whole_frames
from somaflow.oasis import (
    MIN_FRAMES,
    CalciumParams,
    DeconvolutionParams,
    deconvolve_blocks,
)
from somaflow.robust import diff_noise_sd

log = logging.getLogger(__name__)

#: the stage's deconvolution: one kernel for all units of a movie (see DeconvolutionParams.g_scope)
_DECONVOLUTION = DeconvolutionParams(g_scope="shared")

#: float elements per unit-chunk of the temporal stages (≈ 64 MiB of float32)
_TEMPORAL_BLOCK_ELEMENTS = 16 << 20
#: how many times the neuropil annulus may be doubled to reach min_neuropil_pixels
_MAX_ANNULUS_DOUBLINGS = 2


class TraceParams(BaseModel):
    """Parameters of :func:`extract_traces`.

    Attributes
    ----------
    fps : float or None
        Frame rate (Hz); ``None`` takes ``movie.attrs["fps"]``.
    neuropil_coefficient : float
        ``c`` in ``F = F_cell − c·F_np``; 0 disables neuropil subtraction.
    neuropil_inner_gap : float
        Pixels between a mask and the inner edge of its neuropil annulus.
    neuropil_width : float
        Width of the annulus (pixels) before any widening.
    min_neuropil_pixels : int
        The annulus is widened until it holds this many pixels (up to 4× width).
    baseline_window_s : float
        Length of the running-percentile baseline window (seconds); capped at
        the movie length.
    baseline_percentile : float
        Percentile of the running baseline F0 (0–100).
    baseline_samples_per_window : int
        F0 is evaluated exactly every ``window / baseline_samples_per_window``
        frames and linearly interpolated in between; a value ≥ the window
        length in frames gives ``scipy.ndimage.percentile_filter`` exactly.
    min_baseline_fraction : float
        Floor of F0 as a fraction of the unit's median raw fluorescence.
    deconvolution : somaflow.oasis.DeconvolutionParams
        Spike inference (OASIS) on ΔF/F; its ``tau_s`` (indicator decay, s)
        also sets the SNR smoothing. A legacy top-level ``tau_s`` is moved
        here.
    calcium : somaflow.oasis.CalciumParams or None
        ``traces`` (with ``denoise``) is the calcium of a second OASIS pass,
        ``deconvolution`` with these sparsity and decay settings (the
        previous defaults: noise-constrained, the raw decay estimate), which
        keep the match to the true calcium that the spike settings lose at
        low SNR; ``None``: the calcium of the spikes' own fit (one pass).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    fps: float | None = Field(None, gt=0, description="frame rate (Hz); None = movie.attrs['fps']")
    neuropil_coefficient: float = Field(0.7, ge=0, le=2, description="F = F_cell - c * F_neuropil")
    denoise: bool = Field(True, description="`traces` = OASIS-denoised calcium of the ΔF/F (CONTRACT: denoised "
                                            "calcium); False keeps the neuropil-corrected fluorescence")
    neuropil_inner_gap: float = Field(2.0, ge=0, description="pixels between mask and annulus")
    neuropil_width: float = Field(10.0, gt=0, description="annulus width (pixels)")
    min_neuropil_pixels: int = Field(50, ge=1, description="widen the annulus up to 4x to reach this")
    baseline_window_s: float = Field(60.0, gt=0, description="running-percentile window (s)")
    baseline_percentile: float = Field(8.0, ge=0, le=100, description="percentile of the baseline F0")
    baseline_samples_per_window: int = Field(
        32, ge=1, description="exact F0 evaluations per window length; linear in between"
    )
    min_baseline_fraction: float = Field(
        0.1, gt=0, le=1, description="F0 floor as a fraction of the median raw fluorescence"
    )
    deconvolution: DeconvolutionParams = Field(
        _DECONVOLUTION, description="spike inference (OASIS) on each unit's dF/F"
    )
    calcium: CalciumParams | None = Field(
        CalciumParams(), description="the denoised calcium (`traces`) from a second OASIS pass with this sparsity "
        "and decay correction (the spikes' kernel estimates reused); None: the spikes' pass's calcium")

    @model_validator(mode="before")
    @classmethod
    def _partial_deconvolution(cls, data: object) -> object:
        """Fill a partial ``deconvolution`` dict from this stage's default; move a legacy ``tau_s`` into it."""
        if not isinstance(data, dict):
            return data
        sub = data.get("deconvolution")
        if "tau_s" not in data and not isinstance(sub, dict):
            return data
        data = dict(data)
        if isinstance(sub, DeconvolutionParams):
            sub = sub.model_dump()
        else:  # a dict (or nothing): the fields it leaves out keep this stage's defaults (a shared kernel)
            sub = {**_DECONVOLUTION.model_dump(), **(sub or {})}
        if "tau_s" in data:
            sub["tau_s"] = data.pop("tau_s")
        data["deconvolution"] = sub
        return data

    @model_validator(mode="after")
    def _calcium_valid(self) -> TraceParams:
        try:
            self.calcium_deconvolution()
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ValueError(f"calcium with deconvolution: {msg} (for calcium)") from None
        return self

    def calcium_deconvolution(self) -> DeconvolutionParams:
        """The deconvolution whose calcium is ``traces``: ``deconvolution`` with ``calcium`` applied."""
        return self.deconvolution if self.calcium is None else self.calcium.apply(self.deconvolution)

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> TraceParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz).
        modality : str
            ``"2p"``: neuropil coefficient 0.7, τ = 0.7 s (GCaMP6f-like);
            ``"1p"``: no neuropil subtraction, τ = 1.0 s (slower indicators and
            blur in widefield miniscope data).
        neuron_radius : float
            Soma radius (pixels); the annulus starts 2 px (at least r/3) out and
            is 2 r wide.
        """
        r = float(neuron_radius)
        one_p = modality == "1p"
        return cls(
            fps=float(fps),
            neuropil_coefficient=0.0 if one_p else 0.7,
            neuropil_inner_gap=round(max(2.0, r / 3), 3),
            neuropil_width=round(2 * r, 3),
            min_neuropil_pixels=max(1, int(round(2 * math.pi * r * r))),
            deconvolution=_DECONVOLUTION.model_copy(update={"tau_s": 1.0 if one_p else 0.7}),
        )


def extract_traces(movie: xr.DataArray, masks: xr.DataArray, params: TraceParams) -> xr.Dataset:
    """Traces, ΔF/F, spikes and SNR of every unit (lazy, dask-backed).

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) fluorescence, any real dtype, dask- or numpy-backed;
        chunked along frames (spatial chunks are merged to whole frames).
    masks : xarray.DataArray
        (unit, y, x) bool masks or non-negative float weights, same y/x size as
        ``movie``; loaded into memory (they are turned into a sparse matrix).
    params : TraceParams
        Stage parameters.

    Returns
    -------
    xarray.Dataset
        ``traces`` (unit, frame) float32
            denoised calcium: OASIS's fit to ΔF/F (dimensionless; the pass of
            ``params.calcium_deconvolution()``); with
            ``params.denoise=False`` the neuropil-corrected fluorescence ``F``
            (movie units).
        ``dff`` (unit, frame) float32
            ΔF/F (dimensionless).
        ``spikes`` (unit, frame) float32
            non-negative deconvolved activity (OASIS; ΔF/F jump per frame).
        ``snr`` (unit) float32
            peak-to-noise ratio of ΔF/F (dimensionless).
        ``traces`` with ``denoise=False`` is chunked like the movie's frames;
        the others are chunked along units with whole traces. Zero units give (0, frame) arrays.

    Raises
    ------
    InputError
        Wrong dims, mismatched y/x sizes, negative mask weights, or units but
        fewer than ``somaflow.deconvolve.MIN_FRAMES`` frames.
    ParameterError
        No frame rate in ``params.fps`` nor in ``movie.attrs["fps"]``.
    """
    _validate(movie, masks)
    return weighted_traces(movie, sparse_masks(np.asarray(masks.values)), params, coords=_coords(movie, masks))


def weighted_traces(movie: xr.DataArray, weights: sp.csr_matrix, params: TraceParams, *,
                    coords: dict[str, xr.DataArray] | None = None) -> xr.Dataset:
    """:func:`extract_traces` with the units' pixel weights given as a sparse matrix.

    For callers that hold footprints sparsely (CNMF): a dense (unit, y, x)
    copy of a large field's footprints costs gigabytes.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) fluorescence, as :func:`extract_traces` takes it.
    weights : scipy.sparse.csr_matrix
        (unit, y·x) non-negative pixel weights, C pixel order; a unit's
        fluorescence is its weighted mean, its neuropil annulus is built
        around its nonzero pixels.
    params : TraceParams
    coords : dict, optional
        Coordinates for the result (``unit``, ``frame``); default: the movie's ``frame``.

    Returns
    -------
    xarray.Dataset
        As :func:`extract_traces`.

    Raises
    ------
    InputError
        As :func:`extract_traces`, or ``weights`` has the wrong number of columns.
    """
    _validate_movie(movie)
    n_pix = int(movie.sizes["y"]) * int(movie.sizes["x"])
    if weights.shape[1] != n_pix:
        raise InputError(f"weights have {weights.shape[1]} pixel columns but the movie's frames hold {n_pix} "
                         "pixels; pass (unit, y*x) weights in the movie's pixel grid.")
    if weights.nnz and not (np.isfinite(weights.data).all() and weights.data.min() >= 0):
        raise InputError("weights hold negative or non-finite values; pass non-negative footprints.")
    cells = sp.csr_matrix(weights, dtype=np.float64)
    cells.eliminate_zeros()
    fps = _frame_rate(movie, params)
    data = whole_frames(movie)
    n_frames = data.shape[0]
    n_units = cells.shape[0]
    if coords is None:
        coords = {"frame": movie.coords["frame"]} if "frame" in movie.coords else {}
    attrs = {"fps": fps, "trace_params": params.model_dump_json()}
    if n_units == 0:
        empty = da.zeros((0, n_frames), dtype=np.float32, chunks=((0,), data.chunks[0]))
        return xr.Dataset(
            {
                "traces": (("unit", "frame"), empty),
                "dff": (("unit", "frame"), empty),
                "spikes": (("unit", "frame"), empty),
                "snr": (("unit",), np.zeros(0, np.float32)),
            },
            coords=coords,
            attrs=attrs,
        )

    if n_frames < MIN_FRAMES:
        raise InputError(f"extract_traces needs at least {MIN_FRAMES} frames to infer spikes, got "
                         f"{n_frames}; pass a longer movie.")
    rows = _weight_matrix(cells, (int(movie.sizes["y"]), int(movie.sizes["x"])), params)
    fluo = _project(data, rows)  # (2n or n, frame), frame-chunked, float64
    corrected = fluo[:n_units]
    raw = fluo[n_units:] if rows.shape[0] > n_units else corrected

    unit_rows = max(1, min(n_units, _TEMPORAL_BLOCK_ELEMENTS // max(1, n_frames)))
    corrected_u = corrected.rechunk((unit_rows, -1))
    raw_u = raw.rechunk((unit_rows, -1))
    window = window_frames(params.baseline_window_s * fps, n_frames)
    dff = da.map_blocks(
        dff_rows, corrected_u, raw_u, window=window,
        percentile=params.baseline_percentile, samples=params.baseline_samples_per_window,
        min_fraction=params.min_baseline_fraction, dtype=np.float64,
    )
    oasis = deconvolve_blocks(dff, fps, params.deconvolution,
                              params.calcium_deconvolution() if params.denoise else None)
    spikes = oasis[1]
    trace = oasis[0] if params.denoise else corrected
    n_smooth = max(1, int(round(params.deconvolution.tau_s * fps / 2)))
    snr = da.map_blocks(_snr_block, dff, n=n_smooth, drop_axis=1, dtype=np.float64)
    return xr.Dataset(
        {
            "traces": (("unit", "frame"), trace.astype(np.float32)),
            "dff": (("unit", "frame"), dff.astype(np.float32)),
            "spikes": (("unit", "frame"), spikes.astype(np.float32)),
            "snr": (("unit",), snr.astype(np.float32)),
        },
        coords=coords,
        attrs=attrs,
    )


# ----------------------------------------------------------------------------- inputs


def _validate_movie(movie: xr.DataArray) -> None:
    check_movie(movie, "traces")



def _validate(movie: xr.DataArray, masks: xr.DataArray) -> None:
    _validate_movie(movie)
    if tuple(masks.dims) != ("unit", "y", "x"):
        raise InputError(
            f"extract_traces needs masks with dims ('unit', 'y', 'x'), got {tuple(masks.dims)}. "
            "Transpose or rename them."
        )
    if masks.shape[1:] != movie.shape[1:]:
        raise InputError(
            f"masks are {masks.shape[1:]} pixels but the movie frames are {movie.shape[1:]}. "
            "Pass masks in the movie's pixel grid."
        )


def _frame_rate(movie: xr.DataArray, params: TraceParams) -> float:
    fps = params.fps if params.fps is not None else movie.attrs.get("fps")
    if fps is None or not float(fps) > 0:
        raise ParameterError(
            "extract_traces needs a frame rate: set TraceParams.fps or the movie's 'fps' attr."
        )
    return float(fps)



def _coords(movie: xr.DataArray, masks: xr.DataArray) -> dict[str, xr.DataArray]:
    coords = {}
    if "frame" in movie.coords:
        coords["frame"] = movie.coords["frame"]
    if "unit" in masks.coords:
        coords["unit"] = masks.coords["unit"]
    return coords


# ----------------------------------------------------------------------------- spatial weights


def neuropil_masks(cells: sp.csr_matrix, shape: tuple[int, int], params: TraceParams) -> sp.csr_matrix:
    """Neuropil annulus of every unit.

    Parameters
    ----------
    cells : scipy.sparse.csr_matrix
        (unit, y·x) nonzero where a unit has weight (see :func:`sparse_masks`).
    shape : (int, int)
        Frame shape (y, x) in pixels.
    params : TraceParams
        Uses ``neuropil_inner_gap``, ``neuropil_width``, ``min_neuropil_pixels``.

    Returns
    -------
    scipy.sparse.csr_matrix
        (unit, y·x) bool: pixels at Euclidean distance in (gap, gap + width]
        from the unit's mask and outside every mask; the width is doubled (at
        most twice) while fewer than ``min_neuropil_pixels`` are found. A unit
        may end with an empty annulus in a fully packed field.
    """
    ny, nx = shape
    occupied = np.zeros(ny * nx, bool)
    occupied[cells.indices] = True
    occupied = occupied.reshape(ny, nx)
    gap = params.neuropil_inner_gap
    pad = int(math.ceil(gap + params.neuropil_width * 2**_MAX_ANNULUS_DOUBLINGS)) + 1
    rows: list[np.ndarray] = []
    for i in range(cells.shape[0]):
        ys, xs = np.divmod(cells.indices[cells.indptr[i]:cells.indptr[i + 1]], nx)
        if ys.size == 0:
            rows.append(np.zeros(0, np.int64))
            continue
        y0, y1 = max(0, ys.min() - pad), min(ny, ys.max() + pad + 1)
        x0, x1 = max(0, xs.min() - pad), min(nx, xs.max() + pad + 1)
        outside = np.ones((y1 - y0, x1 - x0), bool)
        outside[ys - y0, xs - x0] = False
        dist = ndimage.distance_transform_edt(outside)
        free = ~occupied[y0:y1, x0:x1]
        width = params.neuropil_width
        for _ in range(_MAX_ANNULUS_DOUBLINGS + 1):
            ring = (dist > gap) & (dist <= gap + width) & free
            if ring.sum() >= params.min_neuropil_pixels:
                break
            width *= 2
        ry, rx = np.nonzero(ring)
        rows.append((ry + y0) * nx + (rx + x0))
    indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    indices = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(indices.size, bool), indices, indptr), shape=(cells.shape[0], ny * nx))


def _normalize_rows(m: sp.csr_matrix) -> tuple[sp.csr_matrix, np.ndarray]:
    """Rows scaled to sum 1 (empty rows stay 0) and a mask of the empty rows."""
    total = np.asarray(m.sum(axis=1)).ravel()
    empty = total <= 0
    return sp.diags(1.0 / np.where(empty, 1.0, total)) @ m, empty


def _weight_matrix(cells: sp.csr_matrix, shape: tuple[int, int], params: TraceParams) -> sp.csr_matrix:
    """Rows of the projection: ``[A − c·N ; A]`` (or just ``A`` when c = 0).

    ``A`` holds each unit's weights normalized to sum 1, ``N`` the uniform
    weights of its neuropil annulus (a zero row when the annulus is empty).
    """
    cell, empty = _normalize_rows(cells)
    if empty.any():
        log.warning("%d units have empty masks; their traces are 0", int(empty.sum()))
    c = params.neuropil_coefficient
    if c == 0:
        return cell.tocsr()
    neuropil, no_ring = _normalize_rows(neuropil_masks(cells, shape, params).astype(np.float64))
    if (no_ring & ~empty).any():
        log.warning("%d units have no neuropil pixels; they get no neuropil subtraction",
                    int((no_ring & ~empty).sum()))
    return sp.vstack([cell - c * neuropil, cell]).tocsr()


# ----------------------------------------------------------------------------- projection


def _project(data: da.Array, rows: sp.csr_matrix) -> da.Array:
    """(row, frame) = rows @ movie, one sparse product per frame chunk (float64)."""
    cols = np.unique(rows.indices).astype(np.int32)
    sub = rows[:, cols].T.tocsr()  # (support pixels, row)
    # one key for the pixel indices and weights: every block task refers to it, none carries a copy
    return da.blockwise(
        _project_block, "uf", data, "fyx",
        weights=dask.delayed((cols, sub), pure=True),
        new_axes={"u": rows.shape[0]}, concatenate=True, dtype=np.float64,
        meta=np.empty((0, 0), np.float64),
    )


def _project_block(block: np.ndarray, weights: tuple[np.ndarray, sp.csr_matrix]) -> np.ndarray:
    """(row, t) projections of one (t, y, x) chunk: ``weights`` = (support pixel indices ``cols``,
    (support pixel, row) weights)."""
    cols, sub = weights
    t = block.shape[0]
    pixels = block.reshape(t, -1)[:, cols].astype(np.float64)
    return np.ascontiguousarray(np.asarray(pixels @ sub).T)


# ----------------------------------------------------------------------------- temporal stages


def window_frames(frames: float, n_frames: int) -> int:
    """Odd window length in frames, at least 1 and at most the movie length."""
    w = max(1, int(round(frames)))
    w = min(w, n_frames)
    return w if w % 2 == 1 else max(1, w - 1)


def running_percentile(x: np.ndarray, window: int, percentile: float, samples: int) -> np.ndarray:
    """Running percentile along the last axis, evaluated sparsely and interpolated.

    Parameters
    ----------
    x : numpy.ndarray
        (..., time) float.
    window : int
        Odd window length (samples); edges are mirrored (scipy's ``reflect``).
    percentile : float
        0–100; the value of rank ``int(window · percentile / 100)`` in the
        sorted window, as ``scipy.ndimage.percentile_filter``.
    samples : int
        Exact evaluations per window length: every ``ceil(window / samples)``
        samples (and at the last one), linear interpolation in between. With
        ``samples ≥ window`` the result equals
        ``scipy.ndimage.percentile_filter(x, percentile, size=(1, ..., window))``.

    Returns
    -------
    numpy.ndarray
        Same shape as ``x``, float64.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    half = window // 2
    rank = min(window - 1, int(float(window) * percentile / 100.0))
    step = max(1, math.ceil(window / samples))
    centres = np.arange(0, n, step)
    if centres[-1] != n - 1:
        centres = np.append(centres, n - 1)
    flat = x.reshape(-1, n)
    out = np.empty_like(flat)
    per_row = max(1, _TEMPORAL_BLOCK_ELEMENTS // max(1, len(centres) * window))
    for r0 in range(0, flat.shape[0], per_row):
        padded = np.pad(flat[r0:r0 + per_row], ((0, 0), (half, half)), mode="symmetric")
        windows = sliding_window_view(padded, window, axis=-1)[:, centres]
        values = np.partition(windows, rank, axis=-1)[..., rank]
        if step == 1:
            out[r0:r0 + per_row] = values
        else:
            t = np.arange(n)
            out[r0:r0 + per_row] = np.stack([np.interp(t, centres, v) for v in values])
    return out.reshape(x.shape)


def _noise_sd(x: np.ndarray) -> np.ndarray:
    """(unit,) white-noise SD from the MAD of the first difference along time."""
    if x.shape[-1] < 2:
        return np.zeros(x.shape[:-1])
    return diff_noise_sd(x, axis=-1)


def dff_rows(
    f: np.ndarray, raw: np.ndarray, *, window: int, percentile: float, samples: int, min_fraction: float
) -> np.ndarray:
    """ΔF/F of (n, frame) rows holding whole traces, against a running-percentile baseline.

    The baseline F0 is floored at ``min_fraction`` × the median of ``raw`` (the
    rows before any neuropil subtraction; pass ``f`` itself when there is none)
    and at the rows' noise SD, so flat, zero or negative rows stay finite.
    """
    f0 = running_percentile(f, window, percentile, samples)
    floor = np.maximum(min_fraction * np.median(raw, axis=-1), _noise_sd(f))
    floor = np.maximum(floor, np.finfo(np.float32).tiny)
    return (f - f0) / np.maximum(f0, floor[:, None])


def _snr_block(dff: np.ndarray, *, n: int) -> np.ndarray:
    """(unit,) peak of the n-frame running mean of ΔF/F over its noise SD."""
    smooth = ndimage.uniform_filter1d(dff, size=min(n, dff.shape[-1]), axis=-1, mode="nearest")
    sd = _noise_sd(dff) / math.sqrt(n)
    peak = smooth.max(axis=-1) - np.median(smooth, axis=-1)
    return np.where(sd > 0, peak / np.where(sd > 0, sd, 1.0), 0.0)
