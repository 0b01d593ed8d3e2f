"""CNMF over overlapping spatial patches (steps 1-5 of :mod:`somaflow.extract.cnmf`): the
binned fit movie, seeds, one Dask task per patch, the global merge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr
from scipy import ndimage

from somaflow.errors import InputError
from somaflow.extract.cnmf.params import CnmfParams
from somaflow.extract.cnmf.patch import PatchFit, fit_patch
from somaflow.extract.seeds import find_seeds
from somaflow.preprocess.summary import SummaryParams, summary_images


@dataclass
class CnmfFit:
    """Result of :func:`cnmf` after the global merge."""

    footprints: sp.csr_matrix  # (unit, y*x) float32, max 1
    fit_traces: np.ndarray  # (unit, T_fit) float32, on the binned fit movie
    spatial_corr: np.ndarray  # (unit,)
    background: sp.csr_matrix  # (maps, y*x): every patch's background regressors
    seeds: xr.Dataset
    origin: np.ndarray  # (unit,) int: seeding morphology mask, -1 for activity seeds
    snr: np.ndarray  # (unit,) peak SNR of the fit trace


def fit_bin_factor(n_frames: int, params: CnmfParams) -> int:
    """Frames averaged into one frame of the fit movie: at most ``max_fit_frames`` remain."""
    return int(math.ceil(n_frames / params.max_fit_frames))


def fit_movie(movie: xr.DataArray, params: CnmfParams) -> xr.DataArray:
    """The movie the factorisation sees (step 1): float32, binned in time by
    :func:`fit_bin_factor`, chunked time-contiguous in pixel tiles so that every
    patch reads only its region (lazy).

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) trace movie, dask-backed or numpy.
    params : CnmfParams

    Returns
    -------
    xarray.DataArray
        (frame, y, x) float32, dask-backed, no coordinates; chunks of
        :data:`FIT_CHUNK_FRAMES` frames by ``min(patch_size, 128)`` pixels square.

    Raises
    ------
    InputError
        The movie has fewer than 10 frames.
    """
    n_frames = int(movie.sizes["frame"])
    if n_frames < 10:
        raise InputError(f"CNMF needs at least 10 frames, the movie has {n_frames}. Record a longer movie.")
    k = fit_bin_factor(n_frames, params)
    fit = movie.astype(np.float32)
    if k > 1:
        fit = fit.coarsen(frame=k, boundary="trim").mean()
    tile = int(min(params.patch_size, 128))
    if isinstance(fit.data, da.Array):
        # the task-based rechunk: dask's P2P rechunk, which it picks for large movies on a distributed
        # client, lost its barrier's output when the store was computed (FutureCancelledError "lost
        # dependencies" on a 4000-frame 512x512 movie, dask 2026.11)
        fit = fit.copy(data=fit.data.rechunk((FIT_CHUNK_FRAMES, tile, tile), method="tasks"))
    else:
        fit = fit.chunk({"frame": FIT_CHUNK_FRAMES, "y": tile, "x": tile})
    fit = fit.rename("movie")
    return fit.drop_vars(list(fit.coords))


#: frames per chunk of the stored fit movie: reading a frame range of a region decompresses only the
#: chunks it overlaps (summary-image tasks read ``_STREAM_BYTES`` at a time, patch tasks every frame)
FIT_CHUNK_FRAMES = 250

#: ``read(region, frames)``: the (y, x) ``region`` of the fit movie's ``frames`` (a slice; all
#: frames when omitted), (frame, y, x) float32
RegionReader = Callable[..., np.ndarray]


def cnmf(
    fit: xr.DataArray,
    params: CnmfParams,
    *,
    fps: float,
    read: RegionReader | None = None,
    morph_masks: np.ndarray | None = None,
) -> CnmfFit:
    """Fit CNMF over patches of the fit movie (steps 2-4 of :mod:`somaflow.extract.cnmf`).

    Parameters
    ----------
    fit : xarray.DataArray
        (frame, y, x) fit movie (:func:`fit_movie`), dask-backed or numpy.
    params : CnmfParams
    fps : float
        Frame rate of ``fit`` (Hz): the movie's divided by :func:`fit_bin_factor`.
    read : callable, optional
        ``read(region, frames=slice(None)) -> (frame, y, x) float32``: the same
        data as ``fit`` over ``region`` (and ``frames``); each patch task calls it to read its own region (from
        the store ``fit`` was written to, say) instead of depending on ``fit``'s
        chunks, so no read task is queued on another worker. None: the tasks
        take their region of ``fit``.
    morph_masks : ndarray, (n, y, x) bool, optional
        Masks of an anatomical detector; with ``params.seed_morphology`` each
        one no activity-seeded component covers is initialised as a component
        of the patch that owns its centroid (seeded CNMF).

    Returns
    -------
    CnmfFit
        Footprints after the global merge, their traces on the fit movie,
        spatial correlations, the patches' background maps (used for the
        full-rate traces) and the seeds (see :func:`find_seeds`).
    """
    ny, nx = int(fit.sizes["y"]), int(fit.sizes["x"])
    data = fit.data if isinstance(fit.data, da.Array) else da.from_array(np.asarray(fit), chunks=-1)
    images = _fit_images(fit, params.neuron_radius, read=read)
    seeds = find_seeds(fit, images, params.seeds.model_copy(update={"fps": fps}))
    pts = np.stack([seeds["y"].values, seeds["x"].values], axis=1) if seeds.sizes["seed"] else np.zeros((0, 2), int)
    pnr = seeds["pnr"].values
    mm = (np.asarray(morph_masks, bool) if (morph_masks is not None and params.seed_morphology)
          else np.zeros((0, ny, nx), bool))
    mc = (np.array([np.argwhere(m).mean(axis=0) for m in mm]).round().astype(int).reshape(-1, 2)
          if len(mm) else np.zeros((0, 2), int))

    def _in(p: np.ndarray, sl: tuple[slice, slice]) -> np.ndarray:
        return (p[:, 0] >= sl[0].start) & (p[:, 0] < sl[0].stop) & (p[:, 1] >= sl[1].start) & (p[:, 1] < sl[1].stop)

    tasks = []
    for core, region in plan_patches((ny, nx), params):
        inside, m_inside = _in(pts, region), _in(mc, region)
        in_core, m_core = _in(pts[inside], core), _in(mc[m_inside], core)
        if not (in_core.any() or m_core.any()):
            continue
        morph = (np.flatnonzero(m_inside), mm[m_inside][:, region[0], region[1]], m_core)
        args = (pts[inside], pnr[inside], in_core, region, core, (ny, nx), params, morph)
        # the costliest patches (components x pixels) first, so no long task is left for the end
        area = (region[0].stop - region[0].start) * (region[1].stop - region[1].start)
        with dask.annotate(priority=(int(inside.sum()) + int(m_inside.sum())) * area):
            if read is not None:
                tasks.append(dask.delayed(_read_fit_patch)(read, *args))
            else:
                tasks.append(dask.delayed(fit_patch)(data[:, region[0], region[1]], *args))
    fits = list(dask.compute(*tasks)) if tasks else []
    footprints, traces, keep = _global_merge(fits, params, ny * nx)
    rval = np.concatenate([f.spatial_corr for f in fits])[keep] if fits else np.zeros(0)
    origin = np.concatenate([f.origin for f in fits])[keep] if fits else np.zeros(0, int)
    fsnr = np.concatenate([f.snr for f in fits])[keep] if fits else np.zeros(0)
    background = (sp.vstack([f.background for f in fits]).tocsr() if fits
                  else sp.csr_matrix((0, ny * nx), dtype=np.float32))
    return CnmfFit(footprints, traces, rval, background, seeds, origin, fsnr)


def plan_patches(shape: tuple[int, int], params: CnmfParams) -> list[tuple[tuple[slice, slice], tuple[slice, slice]]]:
    """Patch cores tiling the frame and their regions (core + halo), as (core, region) slices."""
    halo = int(math.ceil(params.halo_radii * params.neuron_radius))
    out = []
    cuts = [np.unique(np.linspace(0, n, max(1, round(n / params.patch_size)) + 1).round().astype(int)) for n in shape]
    for y0, y1 in zip(cuts[0][:-1], cuts[0][1:], strict=True):
        for x0, x1 in zip(cuts[1][:-1], cuts[1][1:], strict=True):
            core = (slice(int(y0), int(y1)), slice(int(x0), int(x1)))
            region = (slice(max(0, int(y0) - halo), min(shape[0], int(y1) + halo)),
                      slice(max(0, int(x0) - halo), min(shape[1], int(x1) + halo)))
            out.append((core, region))
    return out


_IMAGE_TILE = 256  # core size (pixels) of the tiles the fit movie's summary images are computed on
#: bytes of float32 frames a summary-image task reads and band-passes at a time (its working set is ~4x)
_STREAM_BYTES = 64 * 2**20



def _read_fit_patch(read: Callable[[tuple[slice, slice]], np.ndarray], seeds: np.ndarray, pnr: np.ndarray,
                    in_core: np.ndarray, region: tuple[slice, slice], *args: object) -> PatchFit:
    """:func:`fit_patch` on ``read(region)`` (one task reads and fits its patch)."""
    return fit_patch(read(region), seeds, pnr, in_core, region, *args)  # type: ignore[arg-type]


def _fit_images(movie: xr.DataArray, r: float = 0.0,
                read: Callable[[tuple[slice, slice]], np.ndarray] | None = None) -> xr.Dataset:
    """Summary images (correlation, PNR, ...) of the fit movie, spatially band-passed
    when ``r > 0`` (Gaussian of r/4 minus Gaussian of 2r, as CNMF-E filters before
    computing them: single pixels are too noisy and neuropil too smooth).

    One task per spatial tile of ``_IMAGE_TILE`` pixels plus a halo wide enough
    for the filter and the neighbour correlations, so the tiles run in parallel
    and no task holds whole frames of the whole movie. A task streams its
    region about :data:`_STREAM_BYTES` of frames at a time (read, band-passed
    and reduced chunk by chunk), so its memory does not grow with the movie's
    length. With ``read`` each task reads its own region instead of depending
    on ``movie``'s chunks.
    """

    data = movie.data if isinstance(movie.data, da.Array) else da.from_array(np.asarray(movie), chunks=-1)
    n_frames, ny, nx = data.shape
    halo = (int(math.ceil(4 * 2 * r)) if r > 0 else 0) + 1
    names = ("mean_image", "max_image", "std_image", "correlation_image", "pnr_image")

    def chunk(src: da.Array | tuple[slice, slice], f0: int, f1: int) -> np.ndarray:
        b = np.asarray(read(src, slice(f0, f1)) if read is not None else src[f0:f1], np.float32)  # type: ignore[index]
        return _bandpass(b, r) if r > 0 else b

    def tile_images(src: da.Array | tuple[slice, slice], crop: tuple[slice, slice]) -> np.ndarray:
        h, w = ((s.stop - s.start for s in src) if read is not None else src.shape[1:])  # type: ignore[union-attr]
        cuts = _frame_cuts(n_frames, _STREAM_BYTES // (4 * h * w))
        parts = [da.from_delayed(dask.delayed(chunk)(src, f0, f1), (f1 - f0, h, w), np.float32)
                 for f0, f1 in zip(cuts[:-1], cuts[1:], strict=True)]
        arr = xr.DataArray(da.concatenate(parts), dims=("frame", "y", "x"))
        im = summary_images(arr, SummaryParams()).compute(scheduler="synchronous")
        return np.stack([np.asarray(im[k].values)[crop] for k in names])

    cuts = [np.unique(np.linspace(0, n, max(1, round(n / _IMAGE_TILE)) + 1).round().astype(int)) for n in (ny, nx)]
    cores, tasks = [], []
    for y0, y1 in zip(cuts[0][:-1], cuts[0][1:], strict=True):
        for x0, x1 in zip(cuts[1][:-1], cuts[1][1:], strict=True):
            ry0, rx0 = max(0, int(y0) - halo), max(0, int(x0) - halo)
            ry1, rx1 = min(ny, int(y1) + halo), min(nx, int(x1) + halo)
            crop = (slice(int(y0) - ry0, int(y1) - ry0), slice(int(x0) - rx0, int(x1) - rx0))
            cores.append((slice(int(y0), int(y1)), slice(int(x0), int(x1))))
            region = (slice(ry0, ry1), slice(rx0, rx1))
            tasks.append(dask.delayed(tile_images)(region if read is not None else data[:, ry0:ry1, rx0:rx1], crop))
    out = np.zeros((len(names), ny, nx), np.float32)
    for core, img in zip(cores, dask.compute(*tasks), strict=True):
        out[:, core[0], core[1]] = img
    return xr.Dataset({k: (("y", "x"), out[i]) for i, k in enumerate(names)})


def _frame_cuts(n_frames: int, step: int) -> list[int]:
    """Boundaries of consecutive frame ranges of about ``step`` frames, none shorter than 2 frames
    (the summary images' neighbour differences need 2)."""
    starts = list(range(0, n_frames, max(int(step), 2)))
    if len(starts) > 1 and n_frames - starts[-1] < 2:
        starts.pop()
    return [*starts, n_frames]


def _bandpass(b: np.ndarray, r: float) -> np.ndarray:
    """(t, y, x) float32: per-frame difference of Gaussians, σ = r/4 minus σ = 2r (pixels)."""
    small, large = max(r / 4, 0.5), 2 * r
    return ndimage.gaussian_filter(b, (0, small, small)) - ndimage.gaussian_filter(b, (0, large, large))


def _global_merge(fits: list[PatchFit], params: CnmfParams,
                  n_pix: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Merge duplicate components across patches: overlapping footprints with correlated traces.

    Returns the footprints (unit, ``n_pix``), fit traces and the boolean keep
    mask over the concatenated patch components (none: a (0, ``n_pix``) matrix).
    """
    if not fits or sum(f.footprints.shape[0] for f in fits) == 0:
        return sp.csr_matrix((0, n_pix), dtype=np.float32), np.zeros((0, 0), np.float32), np.zeros(0, bool)
    A = sp.vstack([f.footprints for f in fits]).tocsr()
    C = np.concatenate([f.traces for f in fits])
    K = A.shape[0]
    if K < 2:
        return A, C, np.ones(K, bool)
    binA = (A > 0).astype(np.float32)
    overlap = (binA @ binA.T).toarray()
    np.fill_diagonal(overlap, 0)
    area = np.asarray(binA.sum(axis=1)).ravel()
    frac = overlap / np.maximum(np.minimum.outer(area, area), 1)
    corr = np.nan_to_num(np.corrcoef(C)) if C.shape[1] > 1 else np.eye(K)
    # cores above the mask threshold: IoU >= 0.5 there is one cell whatever the traces say
    core = (A.multiply(1.0 / np.maximum(A.max(axis=1).toarray(), 1e-12)) >= params.mask_fraction).astype(np.float32)
    inter = (core @ core.T).toarray()
    carea = np.asarray(core.sum(axis=1)).ravel()
    iou = inter / np.maximum(carea[:, None] + carea[None, :] - inter, 1)
    np.fill_diagonal(iou, 0)
    dup = np.triu(((frac > 0.5) & (corr > params.merge_correlation)) | (iou >= 0.5))
    drop = np.zeros(K, bool)
    for i, j in np.argwhere(dup):
        if drop[i] or drop[j]:
            continue
        drop[j if area[i] >= area[j] else i] = True
    keep = ~drop
    return A[np.flatnonzero(keep)], C[keep], keep

