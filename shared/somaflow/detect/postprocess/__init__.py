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

Modules: :mod:`~.params`, :mod:`~.masks`, :mod:`~.fusion`, :mod:`~.thresholds`, :mod:`~.units`.
"""

from __future__ import annotations

from somaflow.detect.postprocess.fusion import fuse_batches
from somaflow.detect.postprocess.masks import masks_from_centroids, probability_to_masks
from somaflow.detect.postprocess.params import DEFAULT_CANDIDATES, PostprocessParams
from somaflow.detect.postprocess.thresholds import choose_threshold, threshold_scores
from somaflow.detect.postprocess.units import units_from_masks

__all__ = [
    "DEFAULT_CANDIDATES",
    "PostprocessParams",
    "choose_threshold",
    "fuse_batches",
    "masks_from_centroids",
    "probability_to_masks",
    "threshold_scores",
    "units_from_masks",
]
