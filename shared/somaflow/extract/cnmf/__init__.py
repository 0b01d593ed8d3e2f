"""CNMF source extraction over overlapping spatial patches (Dask), 2p and 1p.

Model, per patch: ``Y (pixels × frames) ≈ A C + b0 1ᵀ + b f`` — ``A ≥ 0``
footprints restricted to a neighbourhood of their seed, ``C ≥ 0`` calcium
traces, ``b0`` the per-pixel baseline and ``b f`` a rank-``n_background``
fluctuating background (neuropil, global fluctuation). For 1p data the model
is fitted on the neural-enhanced movie (the per-frame morphological-opening
background removed, ``preprocess.trace_background``), where a low-rank
background is adequate; for 2p on the corrected movie.

Steps (:func:`cnmf`):

1. **Fit movie** (:func:`fit_movie`) — the trace movie, temporally binned to
   at most ``max_fit_frames`` frames, chunked time-contiguous in pixel tiles
   so that every patch reads only its region (the session layer writes it to
   a scratch store once and hands :func:`cnmf` a reader of its regions).
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
6. **Seeded CNMF and silent cells** — the morphology units come in as an
   argument (:class:`MorphologyUnits`: the session layer runs the anatomical
   detector, :mod:`somaflow.detect.local_maxima` or a CNN detector, and
   passes its units). With ``seed_morphology`` every morphology mask that no
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
   ``accept_fallback_morphology``.
7. **Quality** — per unit SNR (peak of the trace over its noise SD) and spatial
   correlation (footprint vs. the mean residual movie over the unit's active
   frames) and anatomical ``contrast`` (:func:`mask_contrast`: the mask on the
   mean image against a ring around it — a soma is brighter than its surround,
   a neuropil fluctuation fitted as a component is not) and ``width`` (:func:`mask_width`: the mask's narrowest
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

from somaflow.extract.cnmf.fit import (
    CnmfFit,
    RegionReader,
    cnmf,
    fit_bin_factor,
    fit_movie,
    plan_patches,
)
from somaflow.extract.cnmf.params import CnmfParams
from somaflow.extract.cnmf.patch import PatchFit, fit_patch
from somaflow.extract.cnmf.quality import mask_contrast, mask_width, masks_from_footprints
from somaflow.extract.cnmf.temporal import full_rate_traces, neuropil_traces, temporal_outputs
from somaflow.extract.cnmf.units import MorphologyUnits, cnmf_units

__all__ = [
    "CnmfFit",
    "CnmfParams",
    "MorphologyUnits",
    "PatchFit",
    "RegionReader",
    "cnmf",
    "cnmf_units",
    "fit_bin_factor",
    "fit_movie",
    "fit_patch",
    "full_rate_traces",
    "mask_contrast",
    "mask_width",
    "masks_from_footprints",
    "neuropil_traces",
    "plan_patches",
    "temporal_outputs",
]
