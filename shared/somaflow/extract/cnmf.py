"""CNMF source extraction over overlapping spatial patches (Dask), 2p and 1p.

Model, per patch: ``Y (pixels × frames) ≈ A C + b0 1ᵀ + b f`` — ``A ≥ 0``
footprints restricted to a neighbourhood of their seed, ``C ≥ 0`` calcium
traces, ``b0`` the per-pixel baseline and ``b f`` a rank-``n_background``
fluctuating background (neuropil, global fluctuation). For 1p data the model
is fitted on the neural-enhanced movie (the per-frame morphological-opening
background removed, ``preprocess.trace_background``), where a low-rank
background is adequate; for 2p on the corrected movie.

Steps (:func:`cnmf`):

1. **Fit movie** — the trace movie, temporally binned to at most
   ``max_fit_frames`` frames, written once to a scratch zarr with
   time-contiguous, pixel-tiled chunks so that every patch reads only its
   region.
2. **Seeds** (:mod:`somaflow.extract.seeds`) — randomized max pooling and
   correlation × PNR maxima, GMM cleansing, synchronous-neighbour merging.
3. **Patches** — the frame is tiled into cores of ``patch_size`` px; each
   patch is its core plus a halo of ``halo_radii · r``. Every seed in the
   patch (halo included) becomes a component, so light from neighbours across
   the border is explained, but only components seeded in the core are
   returned: each seed is kept by exactly one patch, so patch borders neither
   lose nor double neurons. Patches run in parallel as Dask tasks; memory per
   task is the patch (binned frames × patch pixels), not the movie.
4. **Per patch** — greedy initialisation (footprint = pixels of the seed's
   window whose traces correlate with the seed trace above
   ``init_correlation``, weighted by their regression on it, the component
   that holds the seed; its rank-1 part removed from the residual before the
   next seed); then up to ``residual_rounds`` rounds of *residual seeding*
   (CNMF-E's greedy initialisation): local maxima of the residual's
   peak-to-noise image, band-passed at the soma scale (σ = r/2 minus σ = 1.5 r),
   above ``residual_pnr`` and ``residual_spacing_radii · r`` apart, are
   initialised the same way — in dense fields a neighbour hidden under a
   brighter cell's blur only stands out once that cell is subtracted (2p
   only: on the 1p enhanced movie the residue of bright cells' halos makes
   fragments); then ``iterations`` rounds of: background (``b0`` = temporal
   mean of the residual, ``b f`` its leading singular vectors), temporal HALS
   (non-negative block coordinate descent on C), spatial HALS restricted to the
   initial footprint dilated by ``support_growth_radii · r`` (within its
   window; free growth lets footprints leak into correlated neuropil), removal of
   empty components, merging of overlapping components whose traces correlate
   above ``merge_correlation``.
5. **Global** — components of neighbouring patches with overlapping
   footprints and correlated traces are merged (the larger kept); then the
   full-frame-rate traces of all units come from one streaming least-squares
   pass over the trace movie with the footprints and each patch's background
   maps as regressors (memory: one frame chunk): their peak SNR decides
   acceptance. The units' ``traces``, ``dff`` and ``spikes`` are by default
   (``traces='neuropil'``) their footprint-weighted mask means minus the
   neuropil annulus, deconvolved as for every other method
   (:func:`neuropil_traces`); ``traces='demixed'`` deconvolves the
   least-squares traces instead.
6. **Seeded CNMF and silent cells** — with ``seed_morphology`` every mask of
   the morphology detector (:mod:`somaflow.detect.local_maxima`) that no
   activity-seeded component of its patch covers (IoU < ``morph_covered_iou``)
   becomes a component after the seeds (smoothed-mask footprint, trace
   regressed from the residual) and goes through the same HALS updates, so its
   trace is demixed from neighbours and background; such units keep the
   detector's mask (kind ``morphology``; the fitted footprint gives their
   trace). Silent cells have no activity for CNMF to see (their component
   empties and is dropped); detector units that no unit covers are added
   before step 5 with a mean-image footprint (``add_silent``). Morphology
   units are accepted when their mask area lies in
   ``[morph_min_area_fraction, max_area_fraction] · π r²``, except where
   ``morphology='auto'`` fell back to local maxima (the movie is outside the
   U-Net's training range): there they are kept but not accepted unless
   ``accept_fallback_morphology``. A local maximum of the summary images with
   no activity behind it was rarely a cell on the real movies: 3 of 84 such
   units on Neurofinder 00 matched a human ROI, and on the miniscope movie
   they were small ragged spots between the cells.
7. **Quality** — per unit SNR (peak of the trace over its noise SD) and spatial
   correlation (footprint vs. the mean residual movie over the unit's active
   frames) and anatomical ``contrast`` (:func:`mask_contrast`: the mask on the
   mean image against a ring around it — a soma is brighter than its surround,
   a neuropil fluctuation fitted as a component is not; measured on the tuning
   movies it rejects most false CNMF units, which SNR and spatial correlation
   do not separate) and ``width`` (:func:`mask_width`: the mask's narrowest
   extent; a soma is round, so a sliver much thinner than a soma is a
   dendrite, neuropil or border fragment); ``accepted`` needs all four above
   ``min_snr`` / ``min_spatial_correlation`` / ``min_contrast`` /
   ``min_width_radii`` · r, and CNMF units below
   ``min_contrast`` do not hide the morphology unit at the same place
   (morphology units: the detector's score). A soma-sized CNMF unit
   (``contrast_exempt_size``: area ≥ π r² and width ≥ 2 r, times the factor;
   2p only by default) that fails contrast alone is accepted where it shares
   little with an accepted unit: real somata can be darker than their
   surround, which the simulator's are not. ``score`` in [0, 1].

Masks are the footprint above ``mask_fraction`` × its maximum, the connected
component holding the maximum, holes filled — the simulator's ground-truth
convention — with an area in ``[min_area_fraction, max_area_fraction] · π r²``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from somaflow.errors import InputError
from somaflow.extract.seeds import SeedParams, _noise, find_seeds

if TYPE_CHECKING:  # pragma: no cover
    from somaflow.params import RunParams
    from somaflow.traces import TraceParams

log = logging.getLogger(__name__)



class CnmfParams(BaseModel):
    """Parameters of :func:`cnmf`; lengths in neuron radii r unless in px."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(5.0, gt=0, description="soma radius r (px)")
    patch_size: int = Field(64, ge=16, description="side of a patch core (px)")
    halo_radii: float = Field(3.0, ge=0, description="patch halo around its core (r)")
    max_fit_frames: int = Field(2000, ge=50, description="frames the factorisation sees (binned)")
    n_background: int = Field(1, ge=0, le=5, description="rank of the fluctuating background per patch")
    iterations: int = Field(3, ge=1, le=20, description="spatial/temporal update rounds")
    hals_sweeps: int = Field(3, ge=1, le=50, description="HALS sweeps per update")
    window_radii: float = Field(2.5, gt=0, description="half-width of a footprint's window (r)")
    support_growth_radii: float = Field(0.4, ge=0, description="footprints may grow this far past their initial extent (r)")
    init_smooth_radii: float = Field(0.3, ge=0, description="Gaussian smoothing for initialisation (r)")
    init_correlation: float = Field(0.4, ge=0, le=1, description="pixel-to-seed correlation for the initial footprint")
    merge_correlation: float = Field(0.8, ge=-1, le=1, description="trace correlation to merge overlapping components")
    residual_rounds: int = Field(3, ge=0, le=10, description="rounds of seeding on the residual after the seeds")
    residual_pnr: float = Field(8.0, ge=0, description="peak-to-noise of a residual seed (soma-scale band-pass)")
    residual_spacing_radii: float = Field(0.8, gt=0, description="minimum spacing of residual seeds (r)")
    mask_fraction: float = Field(0.3, gt=0, lt=1, description="mask = footprint above this fraction of its max")
    min_area_fraction: float = Field(0.25, ge=0, description="smallest mask area of a CNMF unit (pi r^2)")
    morph_min_area_fraction: float = Field(
        0.0, ge=0, description="(0: off, not measured to help on held-out seeds) morphology units with a smaller mask (pi r^2) are not accepted: on the tuning "
        "movies they were a dense field's cell cut short or a fragment")
    max_area_fraction: float = Field(2.2, gt=0, description="largest mask area (pi r^2): wider is not one soma")
    min_width_radii: float = Field(
        1.2, ge=0, description="accepted CNMF units' masks are at least this wide (r) across their narrowest "
        "axis (mask_width; a disk is 2 r): thinner ones are dendrite, neuropil or border fragments. 0: off")
    min_snr: float = Field(3.0, ge=0, description="accepted units reach this peak SNR")
    min_spatial_correlation: float = Field(0.5, ge=-1, le=1, description="accepted units' spatial correlation")
    min_contrast: float = Field(
        0.5, description="accepted CNMF units stand out of the mean image: mask mean minus the mean of a ring "
        "(1 px to r outside the mask), in SDs of the ring; a soma is brighter than its surround, neuropil is not")
    contrast_exempt_size: float | None = Field(
        None, gt=0, description="a CNMF unit whose mask is at least this many times the nominal soma disk in "
        "area (pi r^2) and width (2 r) is accepted without min_contrast, on its activity (SNR, spatial "
        "correlation) and width, where it shares < morph_covered_iou of either mask with an accepted unit: real "
        "somata can be darker than their surround (on Neurofinder 00, 34 human ROIs were matched only by "
        "CNMF units rejected for contrast alone, median -0.14). None: off; for_movie sets 1.0 for 2p (Neurofinder IoU F1 0.266 -> 0.324; tuning "
        "seeds: 2p-small 0.981 -> 0.977, 2p-lowsnr 0.972 -> 0.967, 2p-dense 0.880 -> 0.883) and leaves 1p off "
        "(no labelled 1p movie to measure it on)")
    add_silent: bool = Field(True, description="add morphology-detector units no CNMF unit covers")
    accept_fallback_morphology: bool = Field(
        False, description="accept morphology units where morphology 'auto' fell back to local maxima (the "
        "movie is outside the U-Net's training range); off: on Neurofinder 00 3 of 84 matched a human ROI "
        "(IoU F1 0.225 -> 0.266 without them), on the miniscope movie they were spots between the cells")
    seed_morphology: bool = Field(
        False, description="(off: measured on held-out seeds it lowered F1 slightly and 2p-lowsnr trace r) "
        "morphology-detector masks no CNMF component covers become initial footprints "
        "(seeded CNMF): their traces are demixed from neighbours and background by the same HALS updates")
    morph_small_fraction: float = Field(
        0.0, ge=0, description="(0: off; measured on the tuning movies it helps 2p-lowsnr and hurts 2p-dense) a morphology-seeded component whose detector mask is smaller than this (pi r^2) "
        "and which the fit found active (SNR, spatial correlation, size) takes its larger footprint mask")
    morph_covered_iou: float = Field(
        0.3, ge=0, le=1, description="a morphology mask whose IoU with a component's mask reaches this is covered")
    morphology: Literal["auto", "local-maxima", "unet2d", "meanimage2d"] = Field(
        "auto", description="the anatomical detector whose masks are the morphology units "
        "(add_silent, seed_morphology, priority): the summary-image local maxima, or a CNN detector "
        "of somaflow.detect.cnn with the run's cnn parameters; auto: unet2d where the movie is inside "
        "its training distribution (no out-of-distribution warning), local-maxima elsewhere")
    priority: Literal["auto", "cnmf", "morphology"] = Field(
        "auto", description="which mask wins where a CNMF and a morphology unit overlap; auto: the "
        "morphology unit's when it comes from a CNN detector, the CNMF unit's for local maxima"
    )
    traces: Literal["neuropil", "demixed"] = Field(
        "neuropil", description="units' traces, dff and spikes: 'neuropil': footprint-weighted mean over the "
        "unit's mask minus its neuropil annulus, then ΔF/F and OASIS (somaflow.traces, as every other method; "
        "measured closer to the true calcium on every simulator preset); 'demixed': per-frame least squares on "
        "all footprints and the patches' background maps (CNMF's own C), deconvolved")
    seeds: SeedParams = SeedParams()

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> CnmfParams:
        """Defaults for a movie: lengths follow the radius; 1p gets a rank-2 background."""
        r = float(neuron_radius)
        return cls(
            neuron_radius=r,
            patch_size=int(max(48, round(12 * r))),
            n_background=1 if modality == "2p" else 2,
            # 1p: the enhanced movie keeps a residue of each bright cell's halo, which
            # residual seeding turns into fragments (measured: mostly false positives)
            residual_rounds=3 if modality == "2p" else 0,
            contrast_exempt_size=1.0 if modality == "2p" else None,
            seeds=SeedParams.for_movie(fps, modality, r),
        )


@dataclass
class PatchFit:
    """Components of one patch, in full-frame pixel indices."""

    footprints: sp.csr_matrix  # (k, y*x) float32, max 1
    traces: np.ndarray  # (k, T_fit) float32
    snr: np.ndarray  # (k,)
    spatial_corr: np.ndarray  # (k,)
    background: sp.csr_matrix  # (1 + n_background, y*x) patch-core background maps
    origin: np.ndarray  # (k,) int: index of the morphology mask that seeded it, -1 for activity seeds


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


# ----------------------------------------------------------------------------- driver
def cnmf(
    movie: xr.DataArray,
    params: CnmfParams,
    *,
    fps: float,
    scratch_url: str | None = None,
    morph_masks: np.ndarray | None = None,
) -> CnmfFit:
    """Fit CNMF over patches of ``movie`` (steps 1-4 of the module docstring).

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) trace movie (corrected; background-removed for 1p),
        dask-backed or numpy.
    params : CnmfParams
    fps : float
        Frame rate of ``movie`` (Hz).
    scratch_url : str, optional
        Folder for the binned fit movie, which every worker reads: on a
        cluster, a URL on the run's store. A temporary local folder when None.
        The fit movie is removed afterwards either way.
    morph_masks : ndarray, (n, y, x) bool, optional
        Masks of an anatomical detector; with ``params.seed_morphology`` each
        one no activity-seeded component covers is initialised as a component
        of the patch that owns its centroid (seeded CNMF).

    Returns
    -------
    CnmfFit
        Footprints after the global merge, their traces on the binned fit
        movie, spatial correlations, the patches' background maps (used for
        the full-rate traces) and the seeds (see :func:`find_seeds`).
    """
    from somaflow.io import schema, stores

    ny, nx = int(movie.sizes["y"]), int(movie.sizes["x"])
    n_frames = int(movie.sizes["frame"])
    if n_frames < 10:
        raise InputError(f"CNMF needs at least 10 frames, the movie has {n_frames}. Record a longer movie.")
    k = int(math.ceil(n_frames / params.max_fit_frames))
    fit = movie.astype(np.float32)
    if k > 1:
        fit = fit.coarsen(frame=k, boundary="trim").mean()
    tile = int(min(params.patch_size, 128))
    chunks = {"frame": -1, "y": tile, "x": tile}
    own_tmp = scratch_url is None
    scratch = tempfile.mkdtemp(prefix="somaflow-cnmf-") if own_tmp else scratch_url
    try:
        fit_url = stores.join(scratch, "fit_movie.zarr")
        ds = xr.Dataset({"movie": fit.chunk(chunks)})
        schema.write_dataset(ds.drop_vars(list(ds.coords)), fit_url, overwrite=True)
        fit_movie = _open_fit(fit_url)
        # tasks read their own region of the fit movie: no read tasks queued on another worker
        read = functools.partial(_read_region, fit_url)
        images = _fit_images(fit_movie, params.neuron_radius, read=read)
        # the seed traces are on the binned fit movie: k frames per sample
        seeds = find_seeds(fit_movie, images, params.seeds.model_copy(update={"fps": fps / k}))
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
            # the costliest patches (components x pixels) first, so no long task is left for the end
            area = (region[0].stop - region[0].start) * (region[1].stop - region[1].start)
            with dask.annotate(priority=(int(inside.sum()) + int(m_inside.sum())) * area):
                tasks.append(dask.delayed(_read_fit_patch)(read, pts[inside], pnr[inside], in_core, region, core,
                                                           (ny, nx), params, morph))
        fits = list(dask.compute(*tasks)) if tasks else []
    finally:
        if own_tmp:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            stores.remove(stores.join(scratch, "fit_movie.zarr"))
    footprints, traces, keep = _global_merge(fits, params)
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


def _open_fit(url: str, chunks: str | None = "auto") -> xr.DataArray:
    """The fit movie zarr at ``url``: dask-backed, or lazily indexed numpy with ``chunks=None``."""
    from somaflow.io import stores

    fs, path = stores.filesystem(url)
    kwargs = {} if chunks == "auto" else {"chunks": chunks}
    return xr.open_zarr(fs.get_mapper(path), consolidated=False, **kwargs)["movie"]


def _read_region(url: str, region: tuple[slice, slice]) -> np.ndarray:
    """(frame, y, x) float32: ``region`` of the fit movie zarr at ``url``, read by the calling task."""
    return np.asarray(_open_fit(url, chunks=None)[:, region[0], region[1]].values, np.float32)


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
    for the filter and the neighbour correlations, holding every frame (the fit
    movie is stored in all-frame tiles), so the tiles run in parallel and no
    task holds whole frames of the whole movie. With ``read`` (region → array)
    each task reads its own region instead of depending on ``movie``'s chunks.
    """
    from somaflow.preprocess.summary import SummaryParams, summary_images

    data = movie.data if isinstance(movie.data, da.Array) else da.from_array(np.asarray(movie), chunks=-1)
    ny, nx = data.shape[1:]
    halo = (int(math.ceil(4 * 2 * r)) if r > 0 else 0) + 1
    names = ("mean_image", "max_image", "std_image", "correlation_image", "pnr_image")

    def tile_images(block: np.ndarray | tuple[slice, slice], crop: tuple[slice, slice]) -> np.ndarray:
        b = np.asarray(read(block) if read is not None else block, np.float32)  # type: ignore[arg-type]
        if r > 0:
            b = _bandpass(b, r)
        arr = xr.DataArray(da.from_array(b, chunks=-1), dims=("frame", "y", "x"))
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


def _bandpass(b: np.ndarray, r: float) -> np.ndarray:
    """(t, y, x) float32: per-frame difference of Gaussians, σ = r/4 minus σ = 2r (pixels)."""
    small, large = max(r / 4, 0.5), 2 * r
    return ndimage.gaussian_filter(b, (0, small, small)) - ndimage.gaussian_filter(b, (0, large, large))


# ----------------------------------------------------------------------------- one patch
def fit_patch(
    block: np.ndarray,
    seeds: np.ndarray,
    pnr: np.ndarray,
    in_core: np.ndarray,
    region: tuple[slice, slice],
    core: tuple[slice, slice],
    shape: tuple[int, int],
    params: CnmfParams,
    morph: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> PatchFit:
    """CNMF on one patch (step 4 of the module docstring).

    Parameters
    ----------
    block : ndarray, (T, h, w)
        The patch region of the fit movie.
    seeds : ndarray, (n, 2) int
        Seeds inside the region, full-frame (y, x).
    pnr : ndarray, (n,)
        Seed strength (initialisation order).
    in_core : ndarray, (n,) bool
        Seeds whose components are returned.
    region, core : tuple of slice
        The region read and the core owned, full-frame.
    shape : (int, int)
        Full frame (y, x).
    morph : (ids, masks, in_core), optional
        Morphology masks whose centroid lies in the region: their indices,
        (n, h, w) bool patch-local masks and which are owned by the core.
        Each one no component covers becomes a component (mask-weighted
        footprint, trace regressed from the residual) after the seeds.
    """
    Y3 = np.asarray(block, np.float32)
    T, h, w = Y3.shape
    Y = Y3.reshape(T, h * w).T.copy()  # (P, T)
    r = params.neuron_radius
    # initialise on a spatially smoothed copy: single pixels are too noisy to correlate
    sm = ndimage.gaussian_filter(Y3, (0, params.init_smooth_radii * r, params.init_smooth_radii * r))
    del Y3
    R = sm.reshape(T, h * w).T.copy()
    del sm
    R -= np.percentile(R, 20, axis=1).astype(np.float32)[:, None]
    local = seeds - np.array([region[0].start, region[1].start])
    order = np.argsort(-pnr, kind="stable")
    half = int(math.ceil(params.window_radii * r))
    A_cols, C_rows, windows, keep_core = [], [], [], []
    for i in order:
        y, x = local[i]
        win = _window(y, x, half, h, w)
        a, c = _init_component(R, win, (y, x), (h, w), params)
        if a is None:
            continue
        R[win] -= np.outer(a[win], c)
        A_cols.append(a)
        C_rows.append(c)
        windows.append(win)
        keep_core.append(bool(in_core[i]))
    origin = [-1] * len(A_cols)
    if morph is not None and len(morph[0]):
        origin += _add_morphology(R, morph, A_cols, C_rows, windows, keep_core, (h, w), params)
    # residual seeding (CNMF-E's greedy initialisation): neighbours hidden under a
    # brighter cell's blur surface once it is subtracted
    cy0, cy1 = core[0].start - region[0].start, core[0].stop - region[0].start
    cx0, cx1 = core[1].start - region[1].start, core[1].stop - region[1].start
    for _ in range(params.residual_rounds):
        img = _residual_pnr(R, (h, w), r)
        pts = _local_peaks(img, params.residual_pnr, max(2.0, params.residual_spacing_radii * r))
        added = 0
        for y, x in pts:
            win = _window(int(y), int(x), half, h, w)
            a, c = _init_component(R, win, (int(y), int(x)), (h, w), params)
            if a is None:
                continue
            R[win] -= np.outer(a[win], c)
            A_cols.append(a)
            C_rows.append(c)
            windows.append(win)
            keep_core.append(bool(cy0 <= y < cy1 and cx0 <= x < cx1))
            origin.append(-1)
            added += 1
        log.debug("residual round: %d peaks, %d added", len(pts), added)
        if added == 0:
            break
    nb = params.n_background
    empty_bg = _background_maps(np.zeros(h * w, np.float32), np.zeros((h * w, 0), np.float32), region, core, shape)
    if not A_cols:
        return PatchFit(sp.csr_matrix((0, shape[0] * shape[1]), dtype=np.float32), np.zeros((0, T), np.float32),
                        np.zeros(0), np.zeros(0), empty_bg, np.zeros(0, int))
    A = np.stack(A_cols, axis=1)  # (P, K)
    C = np.stack(C_rows)  # (K, T)
    n_init = A.shape[1]
    keep_core_arr = np.array(keep_core)
    origin_arr = np.array(origin, int)
    support = _grow_support(A, _supports(windows, h * w), windows, (h, w),
                            steps=max(1, int(round(params.support_growth_radii * r))))
    b = np.zeros((h * w, nb), np.float32)
    f = np.zeros((nb, T), np.float32)
    for _ in range(params.iterations):
        b0, b, f = _update_background(Y, A, C, nb)
        C = _hals_temporal(Y, A, C, b0, b, f, params.hals_sweeps)
        A = _hals_spatial(Y, A, C, b0, b, f, support, params.hals_sweeps)
        A, C, keep = _normalize_drop(A, C)
        support, keep_core_arr, origin_arr = support[:, keep], keep_core_arr[keep], origin_arr[keep]
        windows = [wd for wd, k_ in zip(windows, keep, strict=True) if k_]
        A, C, support, keep_core_arr, windows, origin_arr = _merge_local(A, C, support, keep_core_arr, windows,
                                                                         origin_arr, params)
        if A.shape[1] == 0:
            break
    b0, b, f = _update_background(Y, A, C, nb)
    log.debug("patch %s: %d seeds, %d initialised, %d after fitting", core, len(seeds), n_init, A.shape[1])
    snr = _snr(C)
    rval = _spatial_corr(Y, A, C, b0, b, f)
    sel = keep_core_arr
    fp = _to_global(A[:, sel], region, shape)
    return PatchFit(fp, C[sel].astype(np.float32), snr[sel], rval[sel],
                    _background_maps(b0, b, region, core, shape), origin_arr[sel])


def _add_morphology(R: np.ndarray, morph: tuple[np.ndarray, np.ndarray, np.ndarray], A_cols: list, C_rows: list,
                    windows: list, keep_core: list, hw: tuple[int, int], params: CnmfParams) -> list[int]:
    """Seeded CNMF: each morphology mask no component covers becomes a component.

    Footprint: the mask, Gaussian-smoothed at 0.3 r (HALS reshapes it);
    trace: its regression on the residual ``R`` (updated in place), baseline
    (20th percentile) removed, clipped at 0. Appends to the lists; returns the
    origins (morphology indices) of the added components.
    """
    ids, masks, in_core = morph
    h, w = hw
    r = params.neuron_radius
    half = int(math.ceil(params.window_radii * r))
    have = [a.reshape(h, w) >= params.mask_fraction for a in A_cols]
    out: list[int] = []
    for j in np.argsort(-masks.reshape(len(masks), -1).sum(axis=1), kind="stable"):
        m = masks[j]
        area = int(m.sum())
        if area < 3:
            continue
        if any((m & c).sum() / max(int((m | c).sum()), 1) >= params.morph_covered_iou for c in have):
            continue
        cy, cx = np.argwhere(m).mean(axis=0).round().astype(int)
        win = _window(int(cy), int(cx), half, h, w)
        a = ndimage.gaussian_filter(m.astype(np.float32), max(0.5, 0.3 * r)).ravel()
        a[~np.isin(np.arange(h * w), win)] = 0
        a[a < 0.1 * a.max()] = 0
        a /= max(a.max(), 1e-12)
        aw = a[win]
        c = (aw @ R[win]) / max(float(aw @ aw), 1e-12)
        c = np.maximum(c - np.percentile(c, 20), 0).astype(np.float32)
        if not np.any(c > 0):
            c = np.full_like(c, 1e-3)
        R[win] -= np.outer(aw, c)
        A_cols.append(a.astype(np.float32))
        C_rows.append(c)
        windows.append(win)
        keep_core.append(bool(in_core[j]))
        have.append(m)
        out.append(int(ids[j]))
    return out


def _residual_pnr(R: np.ndarray, hw: tuple[int, int], r: float) -> np.ndarray:
    """Peak-to-noise image of the residual ``R`` (pixels × T), band-passed at the soma scale.

    Difference of Gaussians (σ = r/2 minus σ = 1.5 r: a soma-sized blob passes,
    neuropil smooth over ≳ 2 r does not), traces smoothed over 3 frames; peak
    above the median over the noise SD of the smoothed trace.
    """
    h, w = hw
    V = R.T.reshape(-1, h, w)
    B = ndimage.gaussian_filter(V, (0, 0.5 * r, 0.5 * r)) - ndimage.gaussian_filter(V, (0, 1.5 * r, 1.5 * r))
    noise = _noise(B.reshape(B.shape[0], -1).T).reshape(h, w) / math.sqrt(3)
    Bt = ndimage.uniform_filter1d(B, 3, axis=0)
    return (Bt.max(axis=0) - np.median(Bt, axis=0)) / noise


def _local_peaks(img: np.ndarray, threshold: float, spacing: float) -> np.ndarray:
    """(n, 2) local maxima of ``img`` above ``threshold`` at least ``spacing`` px apart, strongest first."""
    from skimage.feature import peak_local_max

    pts = peak_local_max(img, min_distance=max(1, int(round(spacing))), threshold_abs=threshold,
                         exclude_border=False)
    return np.asarray(pts, np.int64).reshape(-1, 2)


def _window(y: int, x: int, half: int, h: int, w: int) -> np.ndarray:
    """Flat pixel indices of the square window around (y, x), clipped to the patch."""
    ys = np.arange(max(0, y - half), min(h, y + half + 1))
    xs = np.arange(max(0, x - half), min(w, x + half + 1))
    return (ys[:, None] * w + xs[None, :]).ravel()


def _init_component(R: np.ndarray, win: np.ndarray, seed: tuple[int, int], hw: tuple[int, int],
                    params: CnmfParams) -> tuple[np.ndarray | None, np.ndarray]:
    h, w = hw
    y, x = seed
    r = params.neuron_radius
    core = _window(y, x, max(1, int(round(r / 3))), h, w)
    c = R[core].mean(axis=0)
    c = c - np.percentile(c, 20)
    c = np.maximum(c, 0)
    if not np.any(c > 0):
        return None, c
    Rw = R[win]
    cc = c - c.mean()
    Rc = Rw - Rw.mean(axis=1, keepdims=True)
    denom = np.sqrt((Rc**2).sum(1) * (cc**2).sum()) + 1e-12
    corr = (Rc @ cc) / denom
    coef = (Rc @ cc) / ((cc**2).sum() + 1e-12)
    ok = (corr > params.init_correlation) & (coef > 0)
    wy = win // w
    wx = win % w
    ys, xs = wy.min(), wx.min()
    grid = np.zeros((wy.max() - ys + 1, wx.max() - xs + 1), bool)
    grid[wy - ys, wx - xs] = ok
    lab, _ = ndimage.label(grid)
    lv = lab[y - ys, x - xs]
    if lv == 0:
        return None, c
    comp = (lab == lv)[wy - ys, wx - xs]
    if comp.sum() < max(3, 0.15 * math.pi * r * r):
        return None, c
    a = np.zeros(R.shape[0], np.float32)
    a[win[comp]] = coef[comp]
    peak = a.max()
    return a / peak, (c * peak).astype(np.float32)


def _supports(windows: list[np.ndarray], n_pix: int) -> np.ndarray:
    s = np.zeros((n_pix, len(windows)), bool)
    for k, win in enumerate(windows):
        s[win, k] = True
    return s


def _update_background(Y: np.ndarray, A: np.ndarray, C: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """b0 = temporal mean of Y - AC; b f = its leading ``nb`` singular pairs (randomized)."""
    R = Y - A @ C
    b0 = R.mean(axis=1)
    if nb == 0:
        return b0.astype(np.float32), np.zeros((Y.shape[0], 0), np.float32), np.zeros((0, Y.shape[1]), np.float32)
    R -= b0[:, None]
    rng = np.random.default_rng(0)
    Q = R @ rng.standard_normal((R.shape[1], nb + 4)).astype(np.float32)
    for _ in range(2):
        Q, _ = np.linalg.qr(Q)
        Q = R @ (R.T @ Q)
    Q, _ = np.linalg.qr(Q)
    Bs = Q.T @ R
    u, s, vt = np.linalg.svd(Bs, full_matrices=False)
    b = (Q @ u[:, :nb]) * s[:nb]
    f = vt[:nb]
    return b0.astype(np.float32), b.astype(np.float32), f.astype(np.float32)


def _hals_temporal(Y, A, C, b0, b, f, sweeps):  # type: ignore[no-untyped-def]
    YA = A.T @ Y - (A.T @ b0)[:, None] - (A.T @ b) @ f
    AA = A.T @ A
    C = C.copy()
    for _ in range(sweeps):
        for k in range(C.shape[0]):
            if AA[k, k] <= 0:
                continue
            C[k] = np.maximum(0, C[k] + (YA[k] - AA[k] @ C) / AA[k, k])
    return C


def _hals_spatial(Y, A, C, b0, b, f, support, sweeps):  # type: ignore[no-untyped-def]
    YC = Y @ C.T - np.outer(b0, C.sum(axis=1)) - b @ (f @ C.T)
    CC = C @ C.T
    A = A.copy()
    for _ in range(sweeps):
        for k in range(A.shape[1]):
            if CC[k, k] <= 0:
                continue
            A[:, k] = np.maximum(0, A[:, k] + (YC[:, k] - A @ CC[:, k]) / CC[k, k]) * support[:, k]
    return A


def _grow_support(A: np.ndarray, support: np.ndarray, windows: list[np.ndarray], hw: tuple[int, int],
                  steps: int = 1) -> np.ndarray:
    """Support = ``steps``-pixel dilation of each footprint's non-zero pixels, within its window."""
    h, w = hw
    out = np.zeros_like(support)
    for k, win in enumerate(windows):
        img = (A[:, k] > 0).reshape(h, w)
        grown = ndimage.binary_dilation(img, structure=np.ones((3, 3), bool), iterations=steps).ravel()
        allowed = np.zeros(h * w, bool)
        allowed[win] = True
        out[:, k] = grown & allowed
    return out


def _normalize_drop(A: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    peak = A.max(axis=0)
    keep = (peak > 0) & (C.max(axis=1) > 0)
    A = A[:, keep] / peak[keep]
    C = C[keep] * peak[keep, None]
    return A, C, keep


def _merge_local(A, C, support, keep_core, windows, origin, params):  # type: ignore[no-untyped-def]
    """Merge components whose footprints overlap and whose traces correlate.

    A merged component's origin is -1 (activity seed) if any member has it.
    """
    K = A.shape[1]
    if K < 2:
        return A, C, support, keep_core, windows, origin
    overlap = ((A > 0).T.astype(np.float32) @ (A > 0).astype(np.float32)) > 0
    corr = np.corrcoef(C) if C.shape[1] > 1 else np.eye(K)
    corr = np.nan_to_num(corr)
    np.fill_diagonal(overlap, False)
    pairs = np.argwhere(np.triu(overlap & (corr > params.merge_correlation)))
    if len(pairs) == 0:
        return A, C, support, keep_core, windows, origin
    parent = np.arange(K)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(int(j))] = find(int(i))
    roots = np.array([find(i) for i in range(K)])
    newA, newC, newS, newK, newW, newO = [], [], [], [], [], []
    for root in np.unique(roots):
        idx = np.flatnonzero(roots == root)
        scale = C[idx].max(axis=1)
        a = (A[:, idx] * scale).sum(axis=1)
        peak = a.max()
        strongest = idx[np.argmax(scale)]
        c = C[strongest] * (scale.max() / max(peak, 1e-12)) if len(idx) > 1 else C[strongest]
        newA.append(a / max(peak, 1e-12))
        newC.append(c if len(idx) > 1 else C[strongest])
        newS.append(support[:, idx].any(axis=1))
        newK.append(bool(keep_core[strongest]))
        newW.append(np.unique(np.concatenate([windows[i] for i in idx])))
        newO.append(-1 if (origin[idx] < 0).any() else int(origin[strongest]))
    return (np.stack(newA, 1), np.stack(newC), np.stack(newS, 1), np.array(newK), newW, np.array(newO, int))


def _snr(C: np.ndarray) -> np.ndarray:
    if C.shape[0] == 0:
        return np.zeros(0)
    base = np.median(C, axis=1)
    return (C.max(axis=1) - base) / _noise(C)


def _spatial_corr(Y, A, C, b0, b, f):  # type: ignore[no-untyped-def]
    """Correlation of each footprint with the data (others' light removed) over its active frames."""
    K = A.shape[1]
    out = np.zeros(K)
    if K == 0:
        return out
    for k in range(K):
        pix = np.flatnonzero(A[:, k] > 0)
        c = C[k]
        act = c > 0.5 * c.max()
        if act.sum() == 0 or len(pix) < 3:
            continue
        others = A[pix] @ C[:, act] - np.outer(A[pix, k], C[k, act])
        resid = Y[pix][:, act] - b0[pix, None] - b[pix] @ f[:, act] - others
        img = resid.mean(axis=1)
        a = A[pix, k]
        if img.std() == 0 or a.std() == 0:
            continue
        out[k] = float(np.corrcoef(a, img)[0, 1])
    return out


def _to_global(A: np.ndarray, region: tuple[slice, slice], shape: tuple[int, int]) -> sp.csr_matrix:
    h = region[0].stop - region[0].start
    w = region[1].stop - region[1].start
    pix = np.arange(h * w)
    gy = region[0].start + pix // w
    gx = region[1].start + pix % w
    gidx = gy * shape[1] + gx
    m = sp.csr_matrix(A.T.astype(np.float32))
    m = sp.csr_matrix((m.data, gidx[m.indices], m.indptr), shape=(A.shape[1], shape[0] * shape[1]))
    return m


def _background_maps(b0: np.ndarray, b: np.ndarray, region: tuple[slice, slice], core: tuple[slice, slice],
                     shape: tuple[int, int]) -> sp.csr_matrix:
    """Background regressors of a patch: ``b0`` and each column of ``b``, restricted to the core."""
    h = region[0].stop - region[0].start
    w = region[1].stop - region[1].start
    incore = np.zeros((h, w), bool)
    incore[core[0].start - region[0].start : core[0].stop - region[0].start,
           core[1].start - region[1].start : core[1].stop - region[1].start] = True
    maps = np.concatenate([np.asarray(b0, np.float32)[:, None], np.asarray(b, np.float32)], axis=1)
    maps = maps * incore.ravel()[:, None]
    return _to_global(maps, region, shape)


# ----------------------------------------------------------------------------- global
def _global_merge(fits: list[PatchFit], params: CnmfParams) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Merge duplicate components across patches: overlapping footprints with correlated traces.

    Returns the footprints, fit traces and the boolean keep mask over the
    concatenated patch components.
    """
    if not fits or sum(f.footprints.shape[0] for f in fits) == 0:
        n_pix = fits[0].footprints.shape[1] if fits else 0
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


# ----------------------------------------------------------------------------- units and traces
def masks_from_footprints(footprints: sp.csr_matrix, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """(unit, y, x) bool: footprint ≥ ``fraction`` × max, the component holding the max, holes filled.

    Each footprint is labelled inside the bounding box of its support (plus a
    one-pixel border), so the cost is the footprints' size, not units × frame.
    """
    n = footprints.shape[0]
    out = np.zeros((n,) + shape, bool)
    A = footprints.tocsr()
    for k in range(n):
        lo, hi = A.indptr[k], A.indptr[k + 1]
        if hi == lo:
            continue
        idx, val = A.indices[lo:hi], A.data[lo:hi]
        yy, xx = np.divmod(idx, shape[1])
        y0, x0 = max(int(yy.min()) - 1, 0), max(int(xx.min()) - 1, 0)
        y1, x1 = min(int(yy.max()) + 2, shape[0]), min(int(xx.max()) + 2, shape[1])
        img = np.zeros((y1 - y0, x1 - x0), np.float32)
        img[yy - y0, xx - x0] = val
        peak = np.unravel_index(np.argmax(img), img.shape)
        above = img >= fraction * img[peak]
        lab, _ = ndimage.label(above, structure=np.ones((3, 3)))
        out[k, y0:y1, x0:x1] = ndimage.binary_fill_holes(lab == lab[peak])
    return out


def _mask_pixels(masks: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(k, ys, xs)``: the pixel coordinates of every non-empty mask of a (unit, y, x) stack.

    One pass over the stack (sparse rows) instead of one full-frame scan per mask.
    """
    if not len(masks):
        return
    rows = sp.csr_matrix(masks.reshape(len(masks), int(np.prod(masks.shape[1:]))))
    for k in range(len(masks)):
        idx = rows.indices[rows.indptr[k]:rows.indptr[k + 1]]
        if len(idx):
            ys, xs = np.divmod(idx, masks.shape[2])
            yield k, ys, xs


def mask_contrast(masks: np.ndarray, image: np.ndarray, radius: float) -> np.ndarray:
    """Anatomical contrast of each mask on ``image`` (the mean image).

    ``(mean inside − mean of the ring) / SD of the ring``, the ring being the
    pixels 1 px to ``radius`` px outside the mask. Somata are brighter than
    their surround (doughnuts too, nucleus included: the mask is filled);
    neuropil fluctuations picked up as components are not.

    Parameters
    ----------
    masks : ndarray, (unit, y, x) bool
    image : ndarray, (y, x) float
    radius : float
        Soma radius r (px).

    Returns
    -------
    ndarray, (unit,) float64; NaN for an empty mask or ring.
    """
    out = np.full(len(masks), np.nan)
    steps = max(2, int(round(radius)))
    masks = np.asarray(masks, bool)
    for k, ys, xs in _mask_pixels(masks):
        m = masks[k]
        y0, y1 = max(0, ys.min() - steps - 1), min(m.shape[0], ys.max() + steps + 2)
        x0, x1 = max(0, xs.min() - steps - 1), min(m.shape[1], xs.max() + steps + 2)
        sub = m[y0:y1, x0:x1]
        ring = ndimage.binary_dilation(sub, iterations=steps) & ~ndimage.binary_dilation(sub, iterations=1)
        if ring.sum() < 3:
            continue
        img = image[y0:y1, x0:x1]
        sd = float(img[ring].std())
        out[k] = (float(img[sub].mean()) - float(img[ring].mean())) / max(sd, 1e-12)
    return out


def mask_width(masks: np.ndarray) -> np.ndarray:
    """Width of each mask across its narrowest axis: its second-moment ellipse's minor axis.

    ``4 √λ_min`` of the covariance of the mask's pixel coordinates
    (scikit-image's ``axis_minor_length``): a filled disk of radius r gives
    about 2 r, a line one pixel wide about 0. A soma is round, so a mask much
    thinner than a soma is a dendrite, a neuropil streak or a border artefact,
    whatever its area.

    Parameters
    ----------
    masks : ndarray, (unit, y, x) bool

    Returns
    -------
    ndarray, (unit,) float64
        Width in pixels; 0 for an empty mask.
    """
    masks = np.asarray(masks, bool)
    out = np.zeros(len(masks))
    for k, ys, xs in _mask_pixels(masks):
        if len(ys) < 2:
            continue
        cov = np.cov(np.stack([ys, xs]).astype(np.float64), bias=True)
        out[k] = 4.0 * math.sqrt(max(float(np.linalg.eigvalsh(cov)[0]), 0.0))
    return out


def _contrast_exempt(masks: np.ndarray, accepted: np.ndarray, active: np.ndarray, width: np.ndarray,
                     cp: CnmfParams) -> np.ndarray:
    """Units accepted on their activity alone although darker than their surround (``contrast_exempt_size``).

    ``active``: units that pass every criterion but contrast. Those whose mask
    is at least ``contrast_exempt_size`` times the nominal soma disk, in area
    (π r²) and in width (2 r), and which share less than
    ``morph_covered_iou`` of either mask with any accepted unit, are returned
    (bool, (unit,))."""
    n = len(masks)
    out = np.zeros(n, bool)
    r = cp.neuron_radius
    area = masks.reshape(n, -1).sum(axis=1)
    cand = (active & ~accepted & (area >= cp.contrast_exempt_size * math.pi * r**2)
            & (width >= cp.contrast_exempt_size * 2 * r))
    if not cand.any():
        return out
    flat = sp.csr_matrix(masks.reshape(n, -1), dtype=np.float32)
    c = np.flatnonzero(cand)
    frac_c, frac_a = _overlap_fractions(flat[c], flat[np.flatnonzero(accepted)])
    out[c[(np.maximum(frac_c, frac_a) < cp.morph_covered_iou).all(axis=1)]] = True
    return out


def _overlap_fractions(a: sp.csr_matrix, b: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Pixels shared by every pair of mask rows of ``a`` and ``b``, as fractions of each.

    Returns two (rows of a, rows of b) arrays: shared / area of the ``a`` row,
    and shared / area of the ``b`` row (an empty row shares nothing)."""
    inter = (a @ b.T).toarray() if a.shape[0] and b.shape[0] else np.zeros((a.shape[0], b.shape[0]))
    return (inter / np.maximum(np.asarray(a.sum(axis=1)), 1),
            inter / np.maximum(np.asarray(b.sum(axis=1)).ravel()[None, :], 1))


def full_rate_traces(movie: xr.DataArray, units: sp.csr_matrix, background: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients of every frame on the footprints and background maps.

    One streaming pass over ``movie`` (frame chunks); memory is one chunk plus
    the (n_regressors, frames) result.

    Returns
    -------
    raw : ndarray, (unit, frame) float32
        Each unit's amplitude (in units of its footprint's peak).
    background_under : ndarray, (unit, frame) float32
        The background's level under each footprint (footprint-weighted mean).
    """
    from scipy.linalg import cho_factor, cho_solve

    M = sp.vstack([units, background]).tocsr().astype(np.float64)
    K = units.shape[0]
    G = (M @ M.T).toarray()
    G[np.diag_indices_from(G)] += 1e-6 * max(float(np.trace(G)) / max(len(G), 1), 1e-12)
    factor = cho_factor(G)
    cols = np.unique(M.indices)
    Msub = M[:, cols]
    data = movie.data
    if not isinstance(data, da.Array):
        data = da.from_array(np.asarray(data), chunks=(64, -1, -1))
    data = data.rechunk({1: -1, 2: -1})
    n_reg = M.shape[0]

    def block(b: np.ndarray) -> np.ndarray:
        flat = np.asarray(b, np.float64).reshape(b.shape[0], -1)[:, cols]
        return cho_solve(factor, np.asarray(Msub @ flat.T)).astype(np.float32)

    coef = da.map_blocks(block, data, drop_axis=[1, 2], new_axis=[0], chunks=((n_reg,), data.chunks[0]),
                         dtype=np.float32, meta=np.empty((0, 0), np.float32)).compute()
    raw = coef[:K]
    A = units.astype(np.float64)
    norm = np.asarray(A.multiply(A).sum(axis=1)).ravel()
    W = (A @ background.T.astype(np.float64)).toarray() / np.maximum(norm, 1e-12)[:, None]
    under = (W @ coef[K:]).astype(np.float32)
    return raw, under


#: units per task of the deconvolution and ΔF/F of the full-rate traces: at least
#: this many, and few enough tasks (≈ 4 per core of a small cluster) to keep both cores busy
_MIN_UNITS_PER_TASK = 16
_TEMPORAL_TASKS = 8


def temporal_outputs(raw: np.ndarray, fluorescence: np.ndarray, fps: float,
                     tp: TraceParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Denoised calcium, spikes and ΔF/F of full-rate CNMF traces, in parallel over blocks of units.

    The rows are independent, so blocks of whole traces run as tasks on the
    current Dask scheduler (the cluster's workers under ``somaflow run``) and
    the result does not depend on the blocking.

    Parameters
    ----------
    raw : ndarray, (unit, frame)
        Each unit's amplitude (OASIS input, as CNMF's ``C`` + residual).
    fluorescence : ndarray, (unit, frame)
        Amplitude plus the background under the footprint (ΔF/F input).
    fps : float
        Frame rate (Hz).
    tp : TraceParams
        Baseline window and percentile of the ΔF/F, and the deconvolution.

    Returns
    -------
    calcium, spikes, dff : ndarray, (unit, frame) float32
    """
    from somaflow.traces import _window_frames, deconvolve_blocks, dff_rows

    n, n_frames = raw.shape
    if n == 0:
        empty = np.zeros((0, n_frames), np.float32)
        return empty, empty.copy(), empty.copy()
    rows = max(_MIN_UNITS_PER_TASK, math.ceil(n / _TEMPORAL_TASKS))
    raw_d = da.from_array(np.asarray(raw, np.float64), chunks=(rows, -1))
    f_d = da.from_array(np.asarray(fluorescence, np.float64), chunks=(rows, -1))
    window = _window_frames(tp.baseline_window_s * fps, n_frames)
    dff = da.map_blocks(dff_rows, f_d, f_d, window=window, percentile=tp.baseline_percentile,
                        samples=tp.baseline_samples_per_window, min_fraction=tp.min_baseline_fraction,
                        dtype=np.float64)
    dec = deconvolve_blocks(raw_d, fps, tp.deconvolution)
    dec_v, dff_v = dask.compute(dec.astype(np.float32), dff.astype(np.float32))
    return dec_v[0], dec_v[1], dff_v


def neuropil_traces(movie: xr.DataArray, footprints: sp.csr_matrix, masks: np.ndarray,
                    p: RunParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Calcium, spikes and ΔF/F of CNMF units from their footprints over their masks, neuropil-corrected.

    Each unit's fluorescence is the mean of the trace movie weighted by its
    footprint restricted to its mask, minus ``p.traces.neuropil_coefficient``
    times its neuropil annulus (:func:`somaflow.traces.weighted_traces`).
    The joint least-squares traces (``cnmf.traces='demixed'``) let a cell's
    unmodelled surround (processes, scattered light) drive the patch's
    background regressor and so leak into every unit of the patch; the local
    annulus does not (median matched-trace correlation with the true calcium
    on the tuning seeds 1100-1102: 2p-small 0.898 → 0.942, 2p-dense 0.822 →
    0.895, 2p-lowsnr 0.265 → 0.402, 1p-small 0.848 → 0.913).

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) trace movie (dask-backed).
    footprints : scipy.sparse.csr_matrix
        (unit, y·x) non-negative footprints.
    masks : numpy.ndarray
        (unit, y, x) bool masks of the same units.
    p : RunParams

    Returns
    -------
    calcium, spikes, dff : ndarray, (unit, frame) float32
    """
    from somaflow.traces import weighted_traces

    n = footprints.shape[0]
    on_mask = sp.csr_matrix(masks.reshape(n, -1), dtype=np.float32)
    weights = sp.csr_matrix(footprints.multiply(on_mask), dtype=np.float64)
    # a unit whose footprint is zero on its mask (a morphology unit's detector mask) is weighed uniformly
    empty = (np.diff(weights.indptr) == 0).astype(np.float64)
    weights = (weights + sp.diags(empty) @ on_mask).tocsr()
    t = weighted_traces(movie, weights, p.traces).compute()
    calcium, spikes, dff = (np.asarray(t[k].values, np.float32) for k in ("traces", "spikes", "dff"))
    return calcium, spikes, dff


def cnmf_units(
    corrected: xr.DataArray,
    images: xr.Dataset,
    p: RunParams,
    *,
    scratch_url: str | None = None,
) -> tuple[xr.Dataset, xr.Dataset]:
    """The whole CNMF method: fit, silent cells, full-rate traces, quality.

    Parameters
    ----------
    corrected : xarray.DataArray
        (frame, y, x) motion-corrected movie, dask-backed, ``fps`` attr.
    images : xarray.Dataset
        Summary images of the detection movie (for the morphology detector).
    p : somaflow.params.RunParams

    Returns
    -------
    units, traces : xarray.Dataset
        As :func:`somaflow.extract.find_units` documents; units also carry
        ``spatial_correlation`` and ``kind`` (``cnmf`` or ``morphology``).
    """
    from somaflow.assemble import dense_footprints, sparse_footprints
    from somaflow.detect.local_maxima import detect_local_maxima
    from somaflow.preprocess.pipeline import trace_movie

    cp = p.cnmf
    ny, nx = int(corrected.sizes["y"]), int(corrected.sizes["x"])
    movie = trace_movie(corrected, p.preprocess)
    lm, detector, notes, fell_back = None, "local-maxima", [], False
    if cp.add_silent or cp.seed_morphology:
        if cp.morphology != "local-maxima":
            from somaflow.detect.cnn import detect_cnn

            detector = "unet2d" if cp.morphology == "auto" else cp.morphology
            lm = detect_cnn(corrected, images, detector, p.cnn, p.neuron_radius)
            notes = json.loads(lm.attrs.get("ood_warnings", "[]"))
            if notes and cp.morphology == "auto":
                log.info("CNMF morphology units from local maxima, not %s: the movie is outside its "
                         "training distribution (%s)", detector, "; ".join(notes))
                notes = [f"cnmf.morphology auto: used local-maxima, not {detector}: {n}" for n in notes]
                lm, detector, fell_back = None, "local-maxima", True
            else:
                lm = lm.isel(unit=np.flatnonzero(lm["accepted"].values))
        if lm is None:
            lm = detect_local_maxima(images, p.detect)
    priority = cp.priority if cp.priority != "auto" else ("cnmf" if detector == "local-maxima" else "morphology")
    lm_masks = np.asarray(lm["masks"].values, bool) if lm is not None else np.zeros((0, ny, nx), bool)
    lm_score = np.asarray(lm["score"].values, np.float64) if lm is not None else np.zeros(0)
    fit = cnmf(movie, cp, fps=p.fps, scratch_url=scratch_url,
               morph_masks=lm_masks if cp.seed_morphology else None)
    A = fit.footprints
    masks = masks_from_footprints(A, (ny, nx), cp.mask_fraction)
    # components seeded from a morphology mask keep that (anatomical) mask unless
    # the fit found an active cell there (the detector's masks are often too small)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    r2 = math.pi * cp.neuron_radius**2
    size_ok = (area >= cp.min_area_fraction * r2) & (area <= cp.max_area_fraction * r2)
    is_m = fit.origin >= 0
    det_area = np.zeros(len(area))
    det_area[is_m] = lm_masks[fit.origin[is_m]].sum(axis=(1, 2))
    fitted = (size_ok & (fit.snr >= cp.min_snr) & (fit.spatial_corr >= cp.min_spatial_correlation)
              & (det_area < cp.morph_small_fraction * r2) & (area > det_area))
    use_det = is_m & ~fitted
    masks[use_det] = lm_masks[fit.origin[use_det]]
    ok = size_ok | use_det
    A, masks, rval, origin = A[np.flatnonzero(ok)], masks[ok], fit.spatial_corr[ok], fit.origin[ok]
    contrast = mask_contrast(masks, np.asarray(images["mean_image"], np.float32), cp.neuron_radius)
    width = mask_width(masks)
    kind = ["morphology" if o >= 0 else "cnmf" for o in origin]
    extra_score: list[float] = [float(lm_score[o]) for o in origin if o >= 0]
    if cp.add_silent:
        seeded = np.zeros(len(lm_masks), bool)
        seeded[origin[origin >= 0]] = True
        # sparse mask rows: a dense (unit, pixel) product of a 512x512 field costs seconds
        mine = sp.diags((contrast >= cp.min_contrast).astype(np.float32)) @ sp.csr_matrix(
            masks.reshape(len(masks), -1), dtype=np.float32)
        cand = sp.csr_matrix(lm_masks.reshape(len(lm_masks), -1), dtype=np.float32)
        frac_m, frac_c = _overlap_fractions(cand, mine)
        if priority == "morphology" and frac_m.size:
            # a CNMF unit overlapping a morphology unit is that cell: keep the morphology mask
            same = (np.maximum(frac_c, frac_m) >= 0.3).any(axis=0)
            same &= origin < 0
            A, masks, rval, contrast, width = (A[np.flatnonzero(~same)], masks[~same], rval[~same], contrast[~same],
                                               width[~same])
            origin = origin[~same]
            kind = ["morphology" if o >= 0 else "cnmf" for o in origin]
            new = ~seeded
        else:
            new = frac_m.max(axis=1) < 0.3 if frac_m.shape[1] else np.ones(len(lm_masks), bool)
            new &= ~seeded
        if new.any():
            add_masks = lm_masks[new]
            A = sp.vstack([A, sparse_footprints(add_masks, images["mean_image"].values)]).tocsr()
            masks = np.concatenate([masks, add_masks])
            kind += ["morphology"] * int(new.sum())
            extra_score += [float(s) for s in lm_score[new]]
            rval = np.concatenate([rval, np.full(int(new.sum()), np.nan)])
            contrast = np.concatenate([contrast, np.full(int(new.sum()), np.nan)])
            width = np.concatenate([width, mask_width(add_masks)])
    raw, under = full_rate_traces(movie, A.astype(np.float32), fit.background)
    if cp.traces == "demixed":
        calcium, spikes, dff = temporal_outputs(raw, raw + under, p.fps, p.traces)
    else:
        calcium, spikes, dff = neuropil_traces(movie, A, masks, p)
    snr = _snr(ndimage.uniform_filter1d(raw, 3, axis=-1)) * math.sqrt(3) if raw.shape[0] else np.zeros(0)
    snr = np.where(np.isfinite(snr), snr, 0)
    kind_arr = np.array(kind, dtype=object).astype(str)
    is_cnmf = kind_arr == "cnmf"
    s_snr = snr / (snr + cp.min_snr)
    s_r = np.clip(np.nan_to_num(rval, nan=0.0), 0, 1)
    score = np.where(is_cnmf, 0.5 * s_snr + 0.5 * s_r, 0.0)
    # every CNMF criterion but the anatomical contrast (see contrast_exempt_size)
    active = (is_cnmf & (snr >= cp.min_snr) & (np.nan_to_num(rval, nan=-1) >= cp.min_spatial_correlation)
              & (width >= cp.min_width_radii * cp.neuron_radius))
    accepted = active & (np.nan_to_num(contrast, nan=-np.inf) >= cp.min_contrast)
    if extra_score:
        score[~is_cnmf] = extra_score
        m_area = masks[~is_cnmf].sum(axis=(1, 2))
        accepted[~is_cnmf] = (m_area >= cp.morph_min_area_fraction * r2) & (m_area <= cp.max_area_fraction * r2)
    if fell_back and not cp.accept_fallback_morphology and (~is_cnmf).any():
        accepted[~is_cnmf] = False
        notes.append(f"cnmf.morphology auto: used local-maxima, whose {int((~is_cnmf).sum())} morphology units "
                     "are kept but not accepted (cnmf.accept_fallback_morphology)")
    if cp.contrast_exempt_size is not None:
        accepted |= _contrast_exempt(masks, accepted, active, width, cp)
    units = xr.Dataset({
        "masks": (("unit", "y", "x"), masks.astype(bool)),
        # lazy: densified block by block when written (a 512x512 field of 900 units is 0.9 GB dense)
        "footprints": (("unit", "y", "x"), dense_footprints(A, (ny, nx))),
        "score": ("unit", np.clip(score, 0, 1).astype(np.float32)),
        "accepted": ("unit", accepted.astype(bool)),
        "spatial_correlation": ("unit", np.asarray(rval, np.float32)),
        "contrast": ("unit", np.asarray(contrast, np.float32)),
        "width": ("unit", np.asarray(width, np.float32)),
        "kind": ("unit", kind_arr),
    }, attrs={"n_seeds": int(fit.seeds.sizes["seed"])})
    units.attrs["morphology_detector"] = detector
    if notes:
        units.attrs["ood_warnings"] = json.dumps(notes)
    traces = xr.Dataset({
        "traces": (("unit", "frame"), calcium),
        "dff": (("unit", "frame"), dff),
        "spikes": (("unit", "frame"), spikes),
        "snr": ("unit", snr.astype(np.float32)),
        "raw": (("unit", "frame"), raw.astype(np.float32)),
    })
    return units, traces
