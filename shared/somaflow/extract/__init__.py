"""Source extraction: from a corrected movie and its summary images to units.

The methods (:data:`METHODS`) live in their own modules — :mod:`somaflow.extract.cnmf`,
:mod:`somaflow.extract.pca_ica`, and the detectors of :mod:`somaflow.detect` —
and return the same two datasets:

* ``units`` — ``masks`` (unit, y, x) bool, optionally ``footprints``,
  ``score``, ``accepted``;
* ``traces`` — ``traces``, ``dff``, ``spikes`` (unit, frame), optionally ``snr``.

:func:`somaflow.session.extract.find_units` runs the method a run chose.
"""

from __future__ import annotations

#: the CNN detectors (somaflow.detect.cnn.DETECTORS; listed here so that choosing a method needs no torch)
DETECTORS: tuple[str, ...] = ("stneuronet", "convnet2p1d", "unet2d", "meanimage2d")

#: the methods ``somaflow run --method`` accepts; the first is the default (measured best:
#: benchmarks/bench_accuracy.py --methods cnmf local-maxima)
METHODS: tuple[str, ...] = ("cnmf", "local-maxima", "pca-ica", *DETECTORS)
