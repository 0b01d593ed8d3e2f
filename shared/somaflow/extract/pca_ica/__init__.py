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

Modules: :mod:`~.params`, :mod:`~.pca`, :mod:`~.ica`, :mod:`~.segment`, :mod:`~.method`.
"""

from __future__ import annotations

from somaflow.extract.pca_ica.ica import spatiotemporal_ica
from somaflow.extract.pca_ica.method import pca_ica
from somaflow.extract.pca_ica.params import PcaIcaParams
from somaflow.extract.pca_ica.pca import (
    decomposition_matrix,
    default_n_pcs,
    noise_correlation,
    plan_frame_chunk,
    principal_components,
)
from somaflow.extract.pca_ica.segment import segment_filters, upsample_filters

__all__ = [
    "PcaIcaParams",
    "decomposition_matrix",
    "default_n_pcs",
    "noise_correlation",
    "pca_ica",
    "plan_frame_chunk",
    "principal_components",
    "segment_filters",
    "spatiotemporal_ica",
    "upsample_filters",
]
