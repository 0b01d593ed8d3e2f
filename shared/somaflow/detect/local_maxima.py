"""Candidate neurons from summary images: seeds at local maxima, grown into masks.

The honest, simple detector of ``somaflow run`` (a CNMF-E-style initialisation
without the matrix factorisation). Lengths scale with the neuron radius r.

1. **Cue images**, each turned into a robust z-score ``(v − median) / (1.4826 ·
   MAD)`` over the image (most pixels are background):

   * *morphology* — white top-hat of the mean image: the mean minus its grey
     opening (a disk of ``background_radii · r``, on the mean lightly smoothed
     by r/4) — somata brighter than their local neuropil, including silent
     cells; dark vessels do not create false rims;
   * *activity* — the correlation image times the PNR image (CaImAn/CNMF-E's
     ``Cn · PNR``; negative correlations count as 0), or the correlation image.

   ``seed_image`` picks the cue: ``"combined"`` (default) is
   ``z_morphology + activity_weight · z_activity``; ``"mean"``,
   ``"correlation_pnr"`` and ``"correlation"`` use one cue alone. Measured
   F1 (IoU ≥ 0.5) on the simulator, seeds 0-5 of 2p-small: activity cue alone
   0.25 (corr × PNR) and 0.24 (corr), morphology alone 0.82, combined 0.81;
   the combination is better on 2p-dense (0.50 vs 0.47), 2p-lowsnr (0.78 vs
   0.76) and 1p-small without background removal (0.43 vs 0.41), and keeps
   active cells with a dim baseline, which the morphology cue misses.
2. **Seeds** — local maxima of the cue smoothed with a Gaussian of
   ``smooth_radii · r``, at least ``min_distance_radii · r`` apart and above
   ``threshold_k`` (in z units).
3. **Growth** — strongest seed first, inside a square window of half-width
   ``window_radii · r``, on the unsmoothed cue: the pixels above ``b +
   grow_fraction · (peak − b)``, with ``b`` the window's median and ``peak``
   the value at the seed; the connected component that holds the seed, holes
   filled (doughnut somata have a dim nucleus). A seed inside the grown region
   of a stronger seed is the same cell and is dropped.
4. **Conflicts** — pixels claimed by several regions go to the seed whose
   basin they are in: a marker-based watershed of the negated cue restricted to
   the union of the regions (``skimage.segmentation.watershed``). Each mask is
   the part of its own region in its basin, the component that holds its seed.
5. **Size** — masks with area outside ``[min_area_fraction, max_area_fraction]
   · π r²`` are dropped.

``score`` in [0, 1) grows with the seed's value ``z`` in the smoothed cue:
``z / (z + threshold_k)`` (0.5 at the threshold).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.morphology import disk
from skimage.segmentation import watershed

from somaflow.errors import InputError
from somaflow.robust import robust_sd

log = logging.getLogger(__name__)



class LocalMaximaParams(BaseModel):
    """Parameters of :func:`detect_local_maxima`; lengths are in neuron radii.

    Attributes
    ----------
    neuron_radius : float
        Typical soma radius r (pixels).
    seed_image : {"combined", "mean", "correlation_pnr", "correlation"}
        Cue image whose local maxima are the seeds and that the masks are
        grown on (see the module docstring).
    activity_weight : float
        Weight of the activity z-score in the ``"combined"`` cue.
    background_radii : float
        Radius of the disk of the grey opening that estimates the mean image's
        local background, in radii.
    smooth_radii : float
        Gaussian sigma of the seed-image smoothing, in radii (0 = none).
    threshold_k : float
        Seeds must exceed this value of the (z-scored) seed image.
    min_distance_radii : float
        Minimum distance between seeds, in radii.
    window_radii : float
        Half-width of the growth window around a seed, in radii.
    grow_fraction : float
        A pixel joins the seed's region above ``b + grow_fraction · (peak − b)``
        of the cue (b: the window's median).
    min_area_fraction, max_area_fraction : float
        Allowed mask area as fractions of π r².
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(5.0, gt=0, description="typical soma radius (pixels)")
    seed_image: Literal["combined", "mean", "correlation_pnr", "correlation"] = Field(
        "combined", description="cue image for seeds and growth"
    )
    activity_weight: float = Field(0.25, ge=0, description="weight of the activity cue in 'combined'")
    background_radii: float = Field(1.5, gt=0, description="grey-opening disk radius (radii)")
    smooth_radii: float = Field(0.25, ge=0, description="seed-image Gaussian sigma (radii)")
    threshold_k: float = Field(3.0, ge=0, description="seed threshold (z units)")
    min_distance_radii: float = Field(0.8, gt=0, description="minimum seed distance (radii)")
    window_radii: float = Field(2.0, gt=0, description="growth window half-width (radii)")
    grow_fraction: float = Field(
        0.35, gt=0, lt=1, description="region threshold between window median and peak"
    )
    min_area_fraction: float = Field(0.25, ge=0, description="minimum mask area / (pi r^2)")
    max_area_fraction: float = Field(4.0, gt=0, description="maximum mask area / (pi r^2)")

    @model_validator(mode="after")
    def _areas_ordered(self) -> LocalMaximaParams:
        if self.min_area_fraction >= self.max_area_fraction:
            raise ValueError(
                f"min_area_fraction ({self.min_area_fraction}) must be below max_area_fraction "
                f"({self.max_area_fraction})"
            )
        return self

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> LocalMaximaParams:
        """Defaults for a movie.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used by this stage, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``; the defaults are the same (tuned on the
            simulator's 2p presets; 1p needs background removal upstream).
        neuron_radius : float
            Typical soma radius (pixels).
        """
        return cls(neuron_radius=float(neuron_radius))


def detect_local_maxima(images: xr.Dataset, params: LocalMaximaParams) -> xr.Dataset:
    """Candidate units from summary images.

    Parameters
    ----------
    images : xarray.Dataset
        (y, x) images as from :func:`somaflow.preprocess.summary.summary_images`
        (computed or lazy): ``mean_image`` for the ``"combined"`` and
        ``"mean"`` cues, ``correlation_image`` for all but ``"mean"``,
        ``pnr_image`` for ``"combined"`` and ``"correlation_pnr"``.
    params : LocalMaximaParams
        Stage parameters.

    Returns
    -------
    xarray.Dataset
        ``masks`` (unit, y, x) bool
            one mask per candidate, disjoint, ordered by decreasing score.
        ``score`` (unit) float32
            confidence in [0, 1): ``z / (z + threshold_k)`` of the seed's value
            ``z`` in the smoothed cue.
        ``seed_y``, ``seed_x`` (unit) int64
            seed pixel of each unit.
        y/x coordinates of ``images`` are kept.

    Raises
    ------
    InputError
        A required image is missing, not 2-D (y, x), or not finite.
    """
    r = params.neuron_radius
    seed_img = _cue(images, params, smooth=params.smooth_radii * r)
    grow_img = _cue(images, params, smooth=0.0)
    peaks = peak_local_max(
        seed_img,
        min_distance=max(1, int(round(params.min_distance_radii * r))),
        threshold_abs=params.threshold_k,
        exclude_border=False,
    )
    seeds, regions = _grow(grow_img, peaks, params)
    masks = _resolve(grow_img, seeds, regions)
    area = masks.sum(axis=(1, 2))
    unit_area = math.pi * r * r
    keep = (area >= params.min_area_fraction * unit_area) & (area <= params.max_area_fraction * unit_area)
    log.info("local maxima: %d seeds, %d grown, %d kept after the area filter",
             len(peaks), len(seeds), int(keep.sum()))
    seeds, masks = seeds[keep], masks[keep]
    z = seed_img[seeds[:, 0], seeds[:, 1]]
    k = params.threshold_k
    score = np.clip(z / np.maximum(z + k, 1e-12), 0.0, 1.0) if k > 0 else np.ones(len(seeds))
    order = np.argsort(-score, kind="stable")
    coords = {d: images.coords[d] for d in ("y", "x") if d in images.coords}
    return xr.Dataset(
        {
            "masks": (("unit", "y", "x"), masks[order]),
            "score": (("unit",), score[order].astype(np.float32)),
            "seed_y": (("unit",), seeds[order, 0].astype(np.int64)),
            "seed_x": (("unit",), seeds[order, 1].astype(np.int64)),
        },
        coords=coords,
    )


# ----------------------------------------------------------------------------- helpers


def _image(images: xr.Dataset, name: str) -> np.ndarray:
    if name not in images:
        raise InputError(
            f"detect_local_maxima needs {name!r} in the images; compute it with "
            "somaflow.preprocess.summary.summary_images."
        )
    da_ = images[name]
    if tuple(da_.dims) != ("y", "x"):
        raise InputError(f"{name} must have dims ('y', 'x'), got {tuple(da_.dims)}; transpose it.")
    img = np.asarray(da_.values, dtype=np.float64)
    if not np.isfinite(img).all():
        raise InputError(f"the summary image {name} holds NaN or infinite values: the movie has NaN/inf "
                         "pixels or blank frames. Fix or drop the bad frames in the input and rerun.")
    return img


def robust_z(img: np.ndarray) -> np.ndarray:
    """``(img − median) / (1.4826 · MAD)``; ``img − median`` when the MAD is 0."""
    med = float(np.median(img))
    sd = float(robust_sd(img))
    return (img - med) / sd if sd > 0 else img - med


def _smooth(img: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(img, sigma=sigma, mode="nearest") if sigma > 0 else img


def _cue(images: xr.Dataset, params: LocalMaximaParams, *, smooth: float) -> np.ndarray:
    """(y, x) float64 cue image in robust z units, smoothed by ``smooth`` pixels."""
    kind = params.seed_image
    r = params.neuron_radius
    parts = []
    if kind in ("combined", "mean"):
        mean = _image(images, "mean_image")
        radius = max(1, int(round(params.background_radii * r)))
        background = ndimage.grey_opening(_smooth(mean, 0.25 * r), footprint=disk(radius))
        parts.append(robust_z(_smooth(mean - background, smooth)))
    if kind in ("combined", "correlation_pnr", "correlation"):
        activity = _image(images, "correlation_image")
        if kind != "correlation":
            activity = np.clip(activity, 0.0, None) * _image(images, "pnr_image")
        weight = params.activity_weight if kind == "combined" else 1.0
        parts.append(weight * robust_z(_smooth(activity, smooth)))
    return np.sum(parts, axis=0)


def _grow(
    img: np.ndarray, peaks: np.ndarray, params: LocalMaximaParams
) -> tuple[np.ndarray, list[tuple[slice, slice, np.ndarray]]]:
    """Grow each seed (strongest first) into a connected thresholded region.

    Returns the kept seeds (n, 2) and their regions as (row slice, col slice,
    bool window) triples; seeds inside a stronger seed's region are dropped.
    """
    ny, nx = img.shape
    half = max(1, int(math.ceil(params.window_radii * params.neuron_radius)))
    claimed = np.zeros((ny, nx), bool)
    kept: list[np.ndarray] = []
    regions: list[tuple[slice, slice, np.ndarray]] = []
    for y, x in peaks:  # peak_local_max returns them by decreasing value
        if claimed[y, x]:
            continue
        ys = slice(max(0, y - half), min(ny, y + half + 1))
        xs = slice(max(0, x - half), min(nx, x + half + 1))
        win = img[ys, xs]
        base = float(np.median(win))
        peak = float(img[y, x])
        if peak <= base:
            continue
        above = win >= base + params.grow_fraction * (peak - base)
        labels, _ = ndimage.label(above)
        region = ndimage.binary_fill_holes(labels == labels[y - ys.start, x - xs.start])
        claimed[ys, xs] |= region
        kept.append(np.array([y, x]))
        regions.append((ys, xs, region))
    seeds = np.array(kept, dtype=np.int64).reshape(-1, 2)
    return seeds, regions


def _resolve(img: np.ndarray, seeds: np.ndarray, regions: list[tuple[slice, slice, np.ndarray]]) -> np.ndarray:
    """Disjoint (unit, y, x) masks: watershed basins of the seeds within their regions."""
    n = len(seeds)
    masks = np.zeros((n, *img.shape), bool)
    if n == 0:
        return masks
    union = np.zeros(img.shape, bool)
    for ys, xs, region in regions:
        union[ys, xs] |= region
    markers = np.zeros(img.shape, np.int32)
    markers[seeds[:, 0], seeds[:, 1]] = np.arange(1, n + 1)
    basins = watershed(-img, markers=markers, mask=union)
    for i, (ys, xs, region) in enumerate(regions):
        own = region & (basins[ys, xs] == i + 1)
        labels, _ = ndimage.label(own)
        sy, sx = seeds[i, 0] - ys.start, seeds[i, 1] - xs.start
        if labels[sy, sx] > 0:
            masks[i, ys, xs] = labels == labels[sy, sx]
    return masks
