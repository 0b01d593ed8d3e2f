"""Per-frame preprocessing filters: background removal, denoising, contrast.

Every filter is a pure function ``f(movie, params) -> movie`` on a
``(frame, y, x)`` :class:`xarray.DataArray`. The work runs lazily with
:func:`dask.array.map_blocks` over frame chunks that hold whole frames (no
spatial halo is needed; chunks that split frames are merged first, see
:func:`whole_frames`). Outputs are float32, keep the input's dims, coords and
attrs, and are chunked like the (frame-only) input.

* :func:`homomorphic` — STNeuroNet's 2p background flattening: per frame
  ``exp(log I − G_σ * log I)``, then division by the movie's overall SD.
* :func:`morphological_background` — sc-CNMF's 1p "neural enhancing",
  background = grey-scale opening with a flat disk, foreground ``I − B``.
* :func:`perona_malik` — sc-CNMF's denoising, Perona–Malik anisotropic
  diffusion.
* :func:`clip_contrast` — Apthorpe et al.'s contrast step, clip to the
  3rd–99th percentiles and rescale to [0, 1].
* :func:`highpass` — ``I − G_σ * I``, for matching 1p frames in motion
  correction.

Two-pass filters
----------------
:func:`homomorphic` (its SD) and :func:`clip_contrast` (its percentiles)
need a statistic of the whole movie before any output frame can be written.
They compute that statistic **when called**, in one streaming dask pass whose
memory is a few chunks, and return a lazy movie. Leaving the statistic lazy
would make every output chunk wait on a reduction over the whole movie, so
the scheduler would hold every input chunk (or upstream result) in memory
until the end; ``dask.graph_manipulation.clone`` would avoid that but cannot
be fused by current dask when the graph holds a rechunk (dask-ms issue #374).

Modules: :mod:`~.params`, :mod:`~.frames`, :mod:`~.background`, :mod:`~.denoise`, :mod:`~.contrast`.
"""

from __future__ import annotations

from somaflow.preprocess.filters.background import homomorphic, morphological_background
from somaflow.preprocess.filters.contrast import clip_contrast, highpass
from somaflow.preprocess.filters.denoise import difference_noise_sd, perona_malik
from somaflow.preprocess.filters.frames import whole_frames
from somaflow.preprocess.filters.params import (
    DEFAULT_MEMORY_BUDGET,
    ContrastParams,
    HomomorphicParams,
    MorphParams,
    PeronaMalikParams,
)

__all__ = [
    "ContrastParams",
    "DEFAULT_MEMORY_BUDGET",
    "HomomorphicParams",
    "MorphParams",
    "PeronaMalikParams",
    "clip_contrast",
    "difference_noise_sd",
    "highpass",
    "homomorphic",
    "morphological_background",
    "perona_malik",
    "whole_frames",
]
