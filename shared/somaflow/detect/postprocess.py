"""From the CNN detectors' neuron-probability maps to neuron masks and units.

numpy / scipy / scikit-image only: importing this module never imports torch.
Every length is in pixels and :meth:`PostprocessParams.for_movie` scales them
with the neuron radius r.

**Whole-neuron maps** (STNeuroNet, U-Net; Soltanian-Zadeh et al. 2019,
"Postprocessing Steps") — :func:`probability_to_masks`:

1. binarize at ``threshold`` (STNeuroNet picks the threshold with the best
   mean F1 on training data: :func:`choose_threshold`);
2. connected components (8-connectivity, as MATLAB's ``bwconncomp``);
3. components larger than ``split_area_factor`` × the mean neuron area π r²
   are split by a marker watershed of the negated distance transform (distance
   of each pixel to the nearest background pixel); the markers are the
   distance transform's local maxima at least ``peak_distance`` apart.
   Watershed fragments below ``min_area`` are merged into the neighbouring
   fragment they share the longest border with (Apthorpe et al. 2016, step 5),
   so that a split never loses pixels of the component;
4. regions below ``min_area`` are dropped;
5. with ``rescue_threshold`` (2p default), a second pass: steps 1-4 at that
   lower threshold on the map with the first pass's masks and a ring of
   ``rescue_gap`` pixels around them removed; its masks are added. A cell in a
   crowded cluster, where the network's probability stays grey, is found
   without growing the confident masks into it (somaflow's addition,
   measured in :data:`_RESCUE_THRESHOLD_2P`).

**Centroid maps** (the (2+1)D ConvNet and its mean-image variant, trained on
disks of radius ``marker_radius`` at the ROI centroids; Apthorpe et al. 2016,
"Network output postprocessing") — :func:`masks_from_centroids`: steps 1-4 on
the centroid probability (with ``min_marker_area`` and the split area scaled
to the marker disk) give one marker per cell; each cell then grows on a
summary image (correlation or mean): a marker-controlled watershed of the
negated image, limited to a disk of ``grow_radius`` around the marker's
centre, keeps the pixels above ``b + grow_fraction · (peak − b)`` (``peak``:
the image's maximum on the marker, ``b``: the median of the image in the
square window of half-width ``grow_radius`` around the marker's centre) — the
connected part that holds most of the marker, holes filled, joined with the
marker itself (the network's evidence that the cell is there, also where the
image shows nothing). This replaces the paper's ImageJ "Cell Magic Wand" step.

**Neuron fusion across temporal batches** (STNeuroNet, "Neuron fusion") —
:func:`fuse_batches`: masks whose centres of mass are closer than
``fusion_distance`` are one neuron and the mask whose area is closest to the
group's mean area is kept; then every mask ``m_i`` that covers another mask
``m_j`` — normalized overlap ``|m_i ∩ m_j| / |m_j| > fusion_overlap`` (Eq. 3,
θ_p = 0.75) — is removed: the paper removes the mask that "encompassed one or
more neurons", i.e. the covering one, and keeps the covered ones.

:func:`units_from_masks` turns masks and the probability map into the units
dataset that :func:`somaflow.detect.local_maxima.detect_local_maxima` returns
(plus ``accepted`` and ``cnn_probability``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage, sparse
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from somaflow.errors import InputError, ParameterError
from somaflow.evaluate.matching import MaskLike, SparseMasks, as_sparse, match_iou

log = logging.getLogger(__name__)

#: radius (pixels) the field defaults of :class:`PostprocessParams` are for
_DEFAULT_RADIUS = 5.0
#: ratios :meth:`PostprocessParams.for_movie` scales with the neuron radius r
_MIN_AREA_FRACTION = 0.25  # min_area / (pi r^2)
#: peak_distance / r; measured with perfect whole-neuron maps (the union of the true masks,
#: blurred by 0.7 px) of the simulator, seeds 0-2, mean F1: 0.6 r 0.958 (2p-small) and 0.755
#: (2p-dense); 0.5 r 0.912 / 0.765; 0.8 r 0.951 / 0.726; 1.0 r 0.955 / 0.709
_PEAK_DISTANCE_RADII = 0.6
#: STNeuroNet fuses masks closer than 4 um; its ABO neurons average 107.5 um^2,
#: i.e. an equivalent radius of 5.85 um, so 4 um is 0.68 r
_FUSION_DISTANCE_RADII = 0.7
#: Apthorpe et al. shrink ROIs to 4-px disks; 4 px = 0.8 r at r = 5
_MARKER_RADII = 0.8
_MIN_MARKER_AREA_FRACTION = 0.25  # min_marker_area / (pi marker_radius^2)
#: grow_radius / r and grow_fraction; measured with perfect centroid maps (marker disks at the
#: true centroids) of the simulator, seeds 0-1, mean F1 with the correlation / mean image:
#: 1.5 r, 0.25: 2p-small 0.971 / 1.000, 2p-dense 0.887 / 0.900, 1p-small 0.900 / 0.950;
#: 2.0 r, 0.35: 2p-small 0.929 / 1.000, 2p-dense 0.894 / 0.893, 1p-small 0.800 / 0.900
_GROW_RADII = 1.5
_GROW_FRACTION = 0.25
#: second-pass threshold for 2p whole-neuron maps; STNeuroNet (checkpoint threshold 0.85),
#: validation seeds 1100-1102 (2p-dense 1100-1105), mean F1 without / with the second pass at
#: 0.6 (gap 1 px): 2p-dense 0.824 / 0.869, 2p-lowsnr 0.956 / 0.966, 2p-nonrigid 0.912 / 0.910,
#: 2p-small 0.971 / 0.967; at 0.5: 0.845 / 0.966 / 0.904 / 0.967; on 1p-small it costs 0.03
#: (0.852 / 0.825: grey background structures), so 1p has no second pass
_RESCUE_THRESHOLD_2P = 0.6
#: tolerance on probabilities outside [0, 1] (float32 softmax round-off)
_PROB_TOL = 1e-5

_EIGHT = np.ones((3, 3), dtype=bool)

#: thresholds :func:`choose_threshold` tries by default: 0.30, 0.35, ..., 0.90
DEFAULT_CANDIDATES: tuple[float, ...] = tuple(round(0.3 + 0.05 * k, 2) for k in range(13))


class PostprocessParams(BaseModel):
    """Parameters of the CNN post-processing; lengths in pixels, areas in pixels².

    The field defaults are :meth:`for_movie` at a neuron radius of 5 px.

    Attributes
    ----------
    neuron_radius : float
        Typical soma radius r (pixels); π r² is the mean neuron area.
    threshold : float
        A pixel is foreground where the neuron probability is ``>= threshold``.
    min_area : float
        Masks smaller than this (pixels²) are dropped. Default 0.25 π r².
    split_area_factor : float
        Components larger than ``split_area_factor · π r²`` (centroid maps:
        ``π marker_radius²``) are split by the distance-transform watershed
        (STNeuroNet: the mean neuron area, factor 1).
    peak_distance : float
        Minimum distance between watershed markers (pixels), rounded to whole
        pixels. Default 0.6 r.
    fusion_distance : float
        Masks whose centres of mass are closer than this are one neuron in
        :func:`fuse_batches` (pixels). Default 0.7 r (4 µm in STNeuroNet).
    fusion_overlap : float
        θ_p of STNeuroNet Eq. 3: a mask ``m_i`` with ``|m_i ∩ m_j| / |m_j|``
        above it for another mask ``m_j`` is removed.
    marker_radius : float
        Radius of the centroid disks a centroid-mode model was trained on
        (pixels); must match the training targets. Default 0.8 r (4 px at r = 5).
    min_marker_area : float
        Centroid maps: foreground components smaller than this are dropped
        before growth (pixels²). Default 0.25 π marker_radius².
    grow_radius : float
        Centroid maps: a cell grows at most this far from its marker's centre
        (pixels). Default 1.5 r.
    grow_fraction : float
        Centroid maps: a pixel joins a cell above ``b + grow_fraction ·
        (peak − b)`` of the image (see the module docstring). Default 0.25.
    rescue_threshold : float or None
        Whole-neuron maps: threshold of the second pass (module docstring,
        step 5); None, or not below ``threshold``: no second pass. Default
        0.6; :meth:`for_movie` sets None for 1p.
    rescue_gap : int
        Pixels kept free around the first pass's masks in the second pass.
        Default 1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(_DEFAULT_RADIUS, gt=0, description="typical soma radius (pixels)")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="foreground where the neuron probability >= threshold"
    )
    min_area: float = Field(
        _MIN_AREA_FRACTION * math.pi * _DEFAULT_RADIUS**2, ge=0,
        description="masks smaller than this are dropped (pixels^2)",
    )
    split_area_factor: float = Field(
        1.0, gt=0, description="components above this x the mean neuron area are split by watershed"
    )
    peak_distance: float = Field(
        _PEAK_DISTANCE_RADII * _DEFAULT_RADIUS, gt=0,
        description="minimum distance between watershed markers (pixels)",
    )
    fusion_distance: float = Field(
        _FUSION_DISTANCE_RADII * _DEFAULT_RADIUS, gt=0,
        description="masks with centres of mass closer than this are one neuron (pixels)",
    )
    fusion_overlap: float = Field(
        0.75, gt=0, le=1, description="a mask covering this fraction of another mask is removed"
    )
    marker_radius: float = Field(
        _MARKER_RADII * _DEFAULT_RADIUS, gt=0,
        description="radius of the centroid disks of the training targets (pixels)",
    )
    min_marker_area: float = Field(
        _MIN_MARKER_AREA_FRACTION * math.pi * (_MARKER_RADII * _DEFAULT_RADIUS) ** 2, ge=0,
        description="centroid maps: smaller foreground components are dropped (pixels^2)",
    )
    grow_radius: float = Field(
        _GROW_RADII * _DEFAULT_RADIUS, gt=0,
        description="centroid maps: maximum growth distance from the marker centre (pixels)",
    )
    grow_fraction: float = Field(
        _GROW_FRACTION, gt=0, lt=1, description="centroid maps: growth threshold between local median and peak"
    )
    rescue_threshold: float | None = Field(
        _RESCUE_THRESHOLD_2P, gt=0, lt=1,
        description="whole-neuron maps: second-pass threshold away from the first pass's masks (None: off)",
    )
    rescue_gap: int = Field(1, ge=0, description="second pass: pixels kept free around the first pass's masks")

    @model_validator(mode="after")
    def _consistent(self) -> PostprocessParams:
        if self.grow_radius < self.marker_radius:
            raise ValueError(
                f"grow_radius ({self.grow_radius}) must be at least marker_radius "
                f"({self.marker_radius}): a cell grows outwards from its marker disk"
            )
        return self

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> PostprocessParams:
        """Defaults for a movie: every length scales with the neuron radius.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used by this stage, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``; only 2p has the second pass
            (``rescue_threshold``, see :data:`_RESCUE_THRESHOLD_2P`).
        neuron_radius : float
            Typical soma radius r (pixels).

        Raises
        ------
        ParameterError
            ``modality`` is neither ``"2p"`` nor ``"1p"``, or ``neuron_radius``
            is not positive.
        """
        if modality not in ("2p", "1p"):
            raise ParameterError(f"modality must be '2p' or '1p', got {modality!r}.")
        r = float(neuron_radius)
        if not r > 0:
            raise ParameterError(f"neuron_radius must be positive (pixels), got {neuron_radius}.")
        marker = _MARKER_RADII * r
        return cls(
            neuron_radius=r,
            min_area=_MIN_AREA_FRACTION * math.pi * r * r,
            peak_distance=_PEAK_DISTANCE_RADII * r,
            fusion_distance=_FUSION_DISTANCE_RADII * r,
            marker_radius=marker,
            min_marker_area=_MIN_MARKER_AREA_FRACTION * math.pi * marker * marker,
            grow_radius=_GROW_RADII * r,
            rescue_threshold=_RESCUE_THRESHOLD_2P if modality == "2p" else None,
        )


# ----------------------------------------------------------------------------- maps to masks


def probability_to_masks(prob: np.ndarray | xr.DataArray, params: PostprocessParams) -> np.ndarray:
    """Neuron masks from a whole-neuron probability map (STNeuroNet post-processing).

    Parameters
    ----------
    prob : numpy.ndarray or xarray.DataArray
        ``(y, x)`` float neuron (class-1 softmax) probability in [0, 1].
    params : PostprocessParams
        ``threshold``, ``neuron_radius``, ``split_area_factor``,
        ``peak_distance``, ``min_area``, ``rescue_threshold`` and
        ``rescue_gap`` are used.

    Returns
    -------
    numpy.ndarray
        ``(n, y, x)`` bool, disjoint masks of at least ``min_area`` pixels:
        the first pass's in raster order of their first pixel, then the
        second pass's.

    Raises
    ------
    InputError
        ``prob`` is not 2-D, holds NaN/inf, or values outside [0, 1].
    """
    p = _probability(prob)
    split_area = params.split_area_factor * math.pi * params.neuron_radius**2
    labels = _instances(p >= params.threshold, split_area, params.peak_distance, params.min_area)
    masks = _masks_from_labels(labels, params.min_area)
    low = params.rescue_threshold
    if low is not None and low < params.threshold:
        taken = masks.any(axis=0)
        if params.rescue_gap:
            taken = ndimage.binary_dilation(taken, _EIGHT, iterations=params.rescue_gap)
        extra = _masks_from_labels(
            _instances((p >= low) & ~taken, split_area, params.peak_distance, params.min_area), params.min_area
        )
        log.debug("probability_to_masks: %d + %d masks at thresholds %.3g, %.3g", len(masks), len(extra),
                  params.threshold, low)
        return np.concatenate([masks, extra]) if len(extra) else masks
    log.debug("probability_to_masks: %d masks at threshold %.3g", len(masks), params.threshold)
    return masks


def masks_from_centroids(
    prob: np.ndarray | xr.DataArray, image: np.ndarray | xr.DataArray, params: PostprocessParams
) -> np.ndarray:
    """Cell masks from a centroid probability map, grown on a summary image.

    Parameters
    ----------
    prob : numpy.ndarray or xarray.DataArray
        ``(y, x)`` float probability in [0, 1] that a pixel lies in a cell's
        centroid disk (the (2+1)D ConvNet's output).
    image : numpy.ndarray or xarray.DataArray
        ``(y, x)`` float summary image the cells are bright in (correlation or
        mean image), same shape as ``prob``.
    params : PostprocessParams
        ``threshold``, ``min_marker_area``, ``marker_radius``,
        ``split_area_factor``, ``peak_distance``, ``grow_radius``,
        ``grow_fraction`` and ``min_area`` are used.

    Returns
    -------
    numpy.ndarray
        ``(n, y, x)`` bool, disjoint masks of at least ``min_area`` pixels,
        at most one per marker, in raster order of their first pixel.

    Raises
    ------
    InputError
        ``prob`` or ``image`` is not 2-D or not finite, their shapes differ,
        or ``prob`` has values outside [0, 1].
    """
    p = _probability(prob)
    img = _finite_image(image, "image")
    if img.shape != p.shape:
        raise InputError(
            f"image is {img.shape[0]}x{img.shape[1]} but the probability map is "
            f"{p.shape[0]}x{p.shape[1]} (y, x); pass the summary image of the same field of view."
        )
    split_area = params.split_area_factor * math.pi * params.marker_radius**2
    markers = _instances(p >= params.threshold, split_area, params.peak_distance, params.min_marker_area)
    markers = _relabel(markers, params.min_marker_area)
    n = int(markers.max())
    if n == 0:
        return np.zeros((0, *p.shape), dtype=bool)
    idx = np.arange(1, n + 1)
    centres = np.asarray(ndimage.center_of_mass(np.ones(p.shape), markers, idx)).reshape(n, 2)
    peaks = ndimage.maximum(img, markers, idx)

    # every pixel within grow_radius of some marker centre (plus the markers themselves)
    seeds = np.ones(p.shape, dtype=bool)
    cy = np.clip(np.rint(centres[:, 0]).astype(int), 0, p.shape[0] - 1)
    cx = np.clip(np.rint(centres[:, 1]).astype(int), 0, p.shape[1] - 1)
    seeds[cy, cx] = False
    reach = (ndimage.distance_transform_edt(seeds) <= params.grow_radius + 1.0) | (markers > 0)
    basins = watershed(-img, markers=markers, mask=reach, connectivity=2)

    ny, nx = p.shape
    half = int(math.ceil(params.grow_radius))
    labels = np.zeros(p.shape, dtype=np.int64)
    for i in range(n):
        y0, x0 = centres[i]
        ys = slice(max(0, int(math.floor(y0)) - half), min(ny, int(math.ceil(y0)) + half + 1))
        xs = slice(max(0, int(math.floor(x0)) - half), min(nx, int(math.ceil(x0)) + half + 1))
        basin = basins[ys, xs] == i + 1
        marker = markers[ys, xs] == i + 1
        yy, xx = np.mgrid[ys, xs]
        disk = (yy - y0) ** 2 + (xx - x0) ** 2 <= params.grow_radius**2
        win = img[ys, xs]
        base = float(np.median(win))
        own = _grown(basin & disk, marker, win, base, float(peaks[i]), params.grow_fraction)
        labels[ys, xs][own] = i + 1
    masks = _masks_from_labels(labels, params.min_area)
    log.debug("masks_from_centroids: %d markers, %d masks", n, len(masks))
    return masks


def _grown(allowed: np.ndarray, marker: np.ndarray, win: np.ndarray, base: float, peak: float,
           fraction: float) -> np.ndarray:
    """The part of ``allowed`` above the growth threshold that holds the marker, holes filled.

    Always joined with the marker (within ``allowed``); the marker alone when
    the image shows no cell there (peak at or below the local median, or no
    pixel of the marker above the threshold).
    """
    fallback = marker & allowed
    if peak <= base:
        return fallback
    above = allowed & (win >= base + fraction * (peak - base))
    lab, n = ndimage.label(above, structure=_EIGHT)
    if n == 0:
        return fallback
    hits = np.bincount(lab[marker], minlength=n + 1)
    hits[0] = 0
    if hits.max() == 0:
        return fallback
    region = (lab == int(np.argmax(hits))) | fallback
    return ndimage.binary_fill_holes(region) & allowed


def _instances(binary: np.ndarray, split_area: float, peak_distance: float,
               min_fragment: float) -> np.ndarray:
    """(y, x) int64 label image: components of ``binary``, the large ones split.

    Components with more than ``split_area`` pixels are split by a watershed
    of the negated distance transform from its local maxima at least
    ``peak_distance`` apart; fragments below ``min_fragment`` pixels are merged
    into their neighbour with the longest shared border.
    """
    comp, n = ndimage.label(binary, structure=_EIGHT)
    comp = comp.astype(np.int64)
    if n == 0:
        return comp
    areas = np.bincount(comp.ravel(), minlength=n + 1)
    big = np.flatnonzero(areas[1:] > split_area) + 1
    if big.size == 0:
        return comp
    big_mask = np.isin(comp, big)
    big_labels = np.where(big_mask, comp, 0)
    dist = ndimage.distance_transform_edt(binary)
    peaks = peak_local_max(
        dist, min_distance=max(1, int(round(peak_distance))), labels=big_labels,
        exclude_border=False, p_norm=2,
    )
    markers = np.zeros(binary.shape, dtype=np.int64)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1)
    # a component without a marker (cannot happen for a finite maximum, but be safe)
    missing = np.setdiff1d(big, comp[peaks[:, 0], peaks[:, 1]])
    for k, lab in enumerate(missing, start=len(peaks) + 1):
        flat = int(np.argmax(np.where(comp == lab, dist, -1.0)))
        markers.flat[flat] = k
    split = watershed(-dist, markers=markers, mask=big_mask, connectivity=2)
    out = np.where(big_mask, 0, comp)
    next_label = n + 1
    boxes = ndimage.find_objects(comp)
    for lab in big:
        box = boxes[lab - 1]
        inside = comp[box] == lab
        parts = _merge_fragments(np.where(inside, split[box], 0), min_fragment)
        ids = np.unique(parts[parts > 0])
        if ids.size <= 1:
            out[box][inside] = lab
            continue
        sub = out[box]
        for pid in ids:
            sub[parts == pid] = next_label
            next_label += 1
    return out


def _merge_fragments(parts: np.ndarray, min_fragment: float) -> np.ndarray:
    """Merge fragments below ``min_fragment`` pixels into the neighbour sharing the most border."""
    parts = parts.copy()
    while True:
        ids, counts = np.unique(parts[parts > 0], return_counts=True)
        if ids.size <= 1:
            return parts
        small = np.flatnonzero(counts < min_fragment)
        if small.size == 0:
            return parts
        frag = int(ids[small[np.argmin(counts[small])]])
        this = parts == frag
        ring = ndimage.binary_dilation(this, structure=_EIGHT) & ~this
        neigh = parts[ring]
        neigh = neigh[neigh > 0]
        if neigh.size == 0:  # not touching any other fragment (8-connected, so unlikely)
            return parts
        vals, touch = np.unique(neigh, return_counts=True)
        parts[this] = int(vals[np.argmax(touch)])


def _relabel(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Labels 1..k of the regions with at least ``min_area`` pixels, in label order; others 0."""
    areas = np.bincount(labels.ravel())
    keep = areas >= min_area
    keep[0] = False
    lut = np.zeros(areas.size, dtype=np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[labels]


def _masks_from_labels(labels: np.ndarray, min_area: float) -> np.ndarray:
    """(n, y, x) bool masks of the labels with at least ``min_area`` pixels, in raster order."""
    labels = _relabel(labels, min_area)
    # order by each region's first pixel (raster order)
    flat = labels.ravel()
    firsts = np.flatnonzero(flat)
    _, first_index = np.unique(flat[firsts], return_index=True)
    order = np.argsort(firsts[first_index], kind="stable") + 1
    masks = np.zeros((order.size, *labels.shape), dtype=bool)
    boxes = ndimage.find_objects(labels)
    for i, lab in enumerate(order):
        box = boxes[lab - 1]
        masks[i][box] = labels[box] == lab
    return masks


# ----------------------------------------------------------------------------- fusion


def fuse_batches(batches: Sequence[MaskLike], params: PostprocessParams) -> np.ndarray:
    """STNeuroNet's neuron fusion of masks found in several temporal batches.

    1. Masks (from any batches) whose centres of mass are closer than
       ``fusion_distance`` are one neuron: groups are formed by complete
       linkage (every two masks of a group are closer than the distance, so
       a chain of neighbours is not merged into one neuron) among the masks a
       KD-tree finds within the distance of each other. Each group keeps the
       mask whose area is closest to the group's mean area (ties: the earliest).
    2. A kept mask ``m_i`` that covers another kept mask ``m_j``,
       ``|m_i ∩ m_j| / |m_j| > fusion_overlap`` (STNeuroNet Eq. 3), is
       removed. Masks are visited from the largest down and a mask is removed
       when it covers a mask not removed yet, so of two near-identical masks
       (each covers the other) the larger goes and the smaller stays.

    Empty masks are ignored. The work is a KD-tree query and one sparse
    product over the overlapping pairs: O(N log N) in the number of masks.

    Parameters
    ----------
    batches : sequence of numpy.ndarray or SparseMasks
        One ``(n_i, y, x)`` bool stack of masks per temporal batch (e.g. from
        :func:`probability_to_masks`), or its
        :class:`~somaflow.evaluate.matching.SparseMasks` (a long movie's many
        batches then need no dense stacks), all with the same ``(y, x)``.
    params : PostprocessParams
        ``fusion_distance`` and ``fusion_overlap`` are used.

    Returns
    -------
    numpy.ndarray
        ``(m, y, x)`` bool masks, one per neuron, ordered by the batch and
        position of the first mask of each group.

    Raises
    ------
    InputError
        No batches, a stack that is not 3-D, or stacks of different ``(y, x)``.
    """
    if not len(batches):
        raise InputError("fuse_batches needs at least one batch of masks; pass a list of (n, y, x) stacks.")
    sparse_batches = []
    for k, b in enumerate(batches):
        if not isinstance(b, SparseMasks) and np.ndim(b) != 3:
            raise InputError(
                f"batch {k} has shape {np.shape(b)}; every batch must be an (n, y, x) stack of masks."
            )
        sm = as_sparse(b)
        if sparse_batches and sm.shape != sparse_batches[0].shape:
            raise InputError(
                f"batch {k} is {sm.shape[0]}x{sm.shape[1]} (y, x) but batch 0 is "
                f"{sparse_batches[0].shape[0]}x{sparse_batches[0].shape[1]}; all batches must come from the same "
                "field of view."
            )
        sparse_batches.append(sm)
    shape = sparse_batches[0].shape
    matrix = sparse.vstack([sm.matrix for sm in sparse_batches], format="csr")
    areas = np.concatenate([sm.areas for sm in sparse_batches])
    centroids = np.concatenate([sm.centroids for sm in sparse_batches]).reshape(-1, 2)
    nonempty = np.flatnonzero(areas > 0)
    if nonempty.size == 0:
        return np.zeros((0, *shape), dtype=bool)

    groups = _fusion_groups(centroids[nonempty], params.fusion_distance)
    reps = _group_representatives(groups, areas[nonempty])
    chosen = nonempty[reps]
    kept = _drop_covering(matrix[chosen], areas[chosen], params.fusion_overlap)
    final = chosen[kept]
    log.info(
        "neuron fusion: %d masks from %d batches -> %d neurons -> %d after removing covering masks",
        nonempty.size, len(sparse_batches), chosen.size, final.size,
    )
    return matrix[final].astype(bool).toarray().reshape(final.size, *shape)


def _fusion_groups(centroids: np.ndarray, distance: float) -> np.ndarray:
    """(n,) group label per mask: complete-linkage clusters of centroids closer than ``distance``."""
    n = len(centroids)
    pairs = cKDTree(centroids).query_pairs(r=distance, output_type="ndarray")
    if pairs.size:
        d = np.hypot(*(centroids[pairs[:, 0]] - centroids[pairs[:, 1]]).T)
        pairs = pairs[d < distance]
    graph = sparse.coo_array((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    groups = np.arange(n)  # singletons keep their own index
    order = np.argsort(comp, kind="stable")
    bounds = np.flatnonzero(np.diff(comp[order])) + 1
    for members in np.split(order, bounds):
        if members.size < 2:
            continue
        if members.size == 2:
            groups[members] = members[0]
            continue
        tree = linkage(centroids[members], method="complete")
        # clusters whose members are all pairwise closer than `distance`
        sub = fcluster(tree, t=np.nextafter(distance, 0.0), criterion="distance")
        for c in np.unique(sub):
            m = members[sub == c]
            groups[m] = m.min()
    return groups


def _group_representatives(groups: np.ndarray, areas: np.ndarray) -> np.ndarray:
    """Index of the member whose area is closest to its group's mean, one per group, by group."""
    order = np.lexsort((np.arange(groups.size), groups))
    g = groups[order]
    bounds = np.flatnonzero(np.diff(g)) + 1
    starts = np.concatenate([[0], bounds])
    sums = np.add.reduceat(areas[order].astype(np.float64), starts)
    counts = np.diff(np.concatenate([starts, [g.size]]))
    mean = np.repeat(sums / counts, counts)
    dev = np.abs(areas[order] - mean)
    # smallest deviation per group, ties to the earliest mask
    key = np.lexsort((order, dev, g))
    first = np.concatenate([[True], g[key][1:] != g[key][:-1]])
    return order[key[first]]  # in group order (a group's label is its first member)


def _drop_covering(matrix: sparse.csr_array, areas: np.ndarray, overlap: float) -> np.ndarray:
    """Indices (sorted) of the masks kept after removing those that cover another kept mask."""
    n = matrix.shape[0]
    inter = sparse.coo_array(matrix @ matrix.T)
    i, j, v = inter.row, inter.col, inter.data
    sel = (i != j) & (v > overlap * areas[j])
    i, j = i[sel], j[sel]
    if i.size == 0:
        return np.arange(n)
    covered: dict[int, np.ndarray] = {}
    order = np.argsort(i, kind="stable")
    bounds = np.flatnonzero(np.diff(i[order])) + 1
    for chunk in np.split(order, bounds):
        covered[int(i[chunk[0]])] = j[chunk]
    removed = np.zeros(n, dtype=bool)
    for k in np.lexsort((np.arange(n), -areas)):  # largest first, ties by index
        cov = covered.get(int(k))
        if cov is not None and (~removed[cov]).any():
            removed[k] = True
    return np.flatnonzero(~removed)


# ----------------------------------------------------------------------------- threshold


def threshold_scores(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    params: PostprocessParams,
    candidates: Sequence[float] | np.ndarray = DEFAULT_CANDIDATES,
    images: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """Mean F1 (IoU ≥ 0.5, :func:`somaflow.evaluate.match_iou`) of each threshold.

    Parameters
    ----------
    probs : sequence of numpy.ndarray
        One probability map per session: ``(y, x)``, or ``(batch, y, x)`` for
        several temporal batches whose masks are fused by :func:`fuse_batches`.
    truths : sequence of numpy.ndarray
        ``(n, y, x)`` bool ground-truth masks per session.
    params : PostprocessParams
        Everything but ``threshold`` is used as given.
    candidates : array_like of float
        Thresholds to try, each in (0, 1).
    images : sequence of numpy.ndarray, optional
        ``(y, x)`` summary image per session: the maps are then centroid maps
        and the masks come from :func:`masks_from_centroids`.

    Returns
    -------
    numpy.ndarray
        ``(len(candidates),)`` float64 mean F1 over the sessions.

    Raises
    ------
    InputError
        No sessions, or ``probs``, ``truths`` (and ``images``) differ in length.
    ParameterError
        No candidates, or a candidate outside (0, 1).
    """
    cands = np.asarray(candidates, dtype=np.float64).ravel()
    if cands.size == 0 or not np.all((cands > 0) & (cands < 1)):
        raise ParameterError(
            f"threshold candidates must be a non-empty list of values in (0, 1), got {cands.tolist()}."
        )
    if len(probs) == 0 or len(probs) != len(truths) or (images is not None and len(images) != len(probs)):
        raise InputError(
            f"choose_threshold needs one probability map and one truth mask stack per session "
            f"(and one image each in centroid mode); got {len(probs)} maps, {len(truths)} truths"
            + ("" if images is None else f", {len(images)} images") + "."
        )
    base = params.model_dump()
    scores = np.zeros(cands.size)
    for k, t in enumerate(cands):
        p = PostprocessParams(**{**base, "threshold": float(t)})
        f1 = [
            match_iou(_session_masks(prob, None if images is None else images[s], p), truths[s]).f1
            for s, prob in enumerate(probs)
        ]
        scores[k] = float(np.mean(f1))
    return scores


def choose_threshold(
    probs: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    params: PostprocessParams,
    candidates: Sequence[float] | np.ndarray = DEFAULT_CANDIDATES,
    images: Sequence[np.ndarray] | None = None,
) -> float:
    """The probability threshold with the best mean F1 on labelled data (STNeuroNet).

    Parameters are those of :func:`threshold_scores`. When several candidates
    reach the best mean F1, the middle one of them (in sorted order) is
    returned: the most robust choice on a plateau.

    Returns
    -------
    float
        The chosen threshold, one of ``candidates``.
    """
    cands = np.asarray(candidates, dtype=np.float64).ravel()
    scores = threshold_scores(probs, truths, params, cands, images)
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    tied = np.sort(cands[best])
    choice = float(tied[(tied.size - 1) // 2])
    log.info(
        "threshold by mean F1: %s -> %.3g",
        ", ".join(f"{t:.3g}: {s:.3f}" for t, s in zip(cands, scores, strict=True)), choice,
    )
    return choice


def _session_masks(prob: np.ndarray, image: np.ndarray | None, params: PostprocessParams) -> np.ndarray:
    """Masks of one session's map (``(y, x)`` or ``(batch, y, x)``, fused)."""
    arr = np.asarray(prob)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(
            f"a probability map must be (y, x) or (batch, y, x), got shape {arr.shape}."
        )
    if image is None:
        per_batch = [probability_to_masks(b, params) for b in arr]
    else:
        per_batch = [masks_from_centroids(b, image, params) for b in arr]
    return per_batch[0] if len(per_batch) == 1 else fuse_batches(per_batch, params)


# ----------------------------------------------------------------------------- units


def units_from_masks(masks: np.ndarray | xr.DataArray, prob: np.ndarray | xr.DataArray) -> xr.Dataset:
    """The units dataset of a CNN detector, as the rest of the pipeline expects it.

    Parameters
    ----------
    masks : numpy.ndarray or xarray.DataArray
        ``(unit, y, x)`` bool masks, none empty.
    prob : numpy.ndarray or xarray.DataArray
        ``(y, x)`` neuron probability in [0, 1] the masks came from; its
        ``y``/``x`` coordinates, if any, are kept.

    Returns
    -------
    xarray.Dataset
        ``masks`` (unit, y, x) bool
            ordered by decreasing score (stable).
        ``score`` (unit) float32
            mean probability inside the mask, in [0, 1].
        ``accepted`` (unit) bool
            all True (a classifier may overrule).
        ``seed_y``, ``seed_x`` (unit) int64
            the mask's pixel of highest probability (first in raster order on ties).
        ``cnn_probability`` (y, x) float32
            the probability map.

    Raises
    ------
    InputError
        ``masks`` is not 3-D, its ``(y, x)`` differs from ``prob``'s, a mask
        is empty, or ``prob`` is not a valid probability map.
    """
    p = _probability(prob)
    m = np.asarray(masks.values if isinstance(masks, xr.DataArray) else masks)
    if m.ndim != 3 or m.shape[1:] != p.shape:
        raise InputError(
            f"masks must be (unit, y, x) with (y, x) = {p.shape} like the probability map, "
            f"got shape {m.shape}; pass the masks found on this map."
        )
    m = m.astype(bool, copy=False)
    sm = SparseMasks.from_dense(m)
    empty = np.flatnonzero(sm.areas == 0)
    if empty.size:
        raise InputError(
            f"{empty.size} mask(s) are empty (first: unit {int(empty[0])}); drop empty masks first."
        )
    flat = p.ravel()
    n = sm.n
    score = np.zeros(n)
    seed = np.zeros(n, dtype=np.int64)
    if n:
        indptr, indices = sm.matrix.indptr, sm.matrix.indices
        values = flat[indices]
        score = np.add.reduceat(values, indptr[:-1]) / sm.areas
        seed = np.array(
            [indices[a + int(np.argmax(values[a:b]))] for a, b in zip(indptr[:-1], indptr[1:], strict=True)],
            dtype=np.int64,
        )
    order = np.argsort(-score, kind="stable")
    sy, sx = np.divmod(seed[order], p.shape[1])
    coords: dict[str, xr.DataArray] = {}
    if isinstance(prob, xr.DataArray):
        coords = {d: prob.coords[d] for d in ("y", "x") if d in prob.coords}
    return xr.Dataset(
        {
            "masks": (("unit", "y", "x"), m[order]),
            "score": (("unit",), np.clip(score[order], 0.0, 1.0).astype(np.float32)),
            "accepted": (("unit",), np.ones(n, dtype=bool)),
            "seed_y": (("unit",), sy.astype(np.int64)),
            "seed_x": (("unit",), sx.astype(np.int64)),
            "cnn_probability": (("y", "x"), p.astype(np.float32)),
        },
        coords=coords,
    )


# ----------------------------------------------------------------------------- validation


def _finite_image(arr: np.ndarray | xr.DataArray, name: str) -> np.ndarray:
    """(y, x) float64 copy of a finite 2-D image."""
    if isinstance(arr, xr.DataArray):
        if tuple(arr.dims) != ("y", "x"):
            raise InputError(f"{name} must have dims ('y', 'x'), got {tuple(arr.dims)}; transpose it.")
        arr = arr.values
    img = np.asarray(arr, dtype=np.float64)
    if img.ndim != 2:
        raise InputError(f"{name} must be a 2-D (y, x) image, got shape {img.shape}.")
    if not np.isfinite(img).all():
        raise InputError(f"{name} holds NaN or infinite values; recompute it.")
    return img


def _probability(prob: np.ndarray | xr.DataArray) -> np.ndarray:
    """(y, x) float64 probability map, validated to lie in [0, 1]."""
    p = _finite_image(prob, "the probability map")
    if p.size and (p.min() < -_PROB_TOL or p.max() > 1 + _PROB_TOL):
        raise InputError(
            f"the probability map spans [{p.min():.3g}, {p.max():.3g}], outside [0, 1]; pass the "
            "softmax probability of the neuron class, not the logits."
        )
    return np.clip(p, 0.0, 1.0)
