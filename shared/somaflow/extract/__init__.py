"""Source extraction: from a corrected movie and its summary images to units.

:func:`find_units` is the one entry point the session flow calls; it dispatches
on ``RunParams.method``. Every method returns the same two datasets:

* ``units`` — ``masks`` (unit, y, x) bool, optionally ``footprints``,
  ``score``, ``accepted``;
* ``traces`` — ``traces``, ``dff``, ``spikes`` (unit, frame), optionally ``snr``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import xarray as xr

from somaflow.errors import ParameterError

#: the CNN detectors (somaflow.detect.cnn.DETECTORS; listed here so that choosing a method needs no torch)
DETECTORS: tuple[str, ...] = ("stneuronet", "convnet2p1d", "unet2d", "meanimage2d")

if TYPE_CHECKING:  # pragma: no cover
    from somaflow.params import RunParams

#: the methods ``somaflow run --method`` accepts; the first is the default (measured best:
#: benchmarks/bench_accuracy.py --methods cnmf local-maxima)
METHODS: tuple[str, ...] = ("cnmf", "local-maxima", "pca-ica", "stneuronet", "convnet2p1d", "unet2d", "meanimage2d")


def find_units(corrected: xr.DataArray, images: xr.Dataset, p: RunParams,
               scratch_url: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """Find units and their activity with the method ``p.method``.

    Parameters
    ----------
    corrected : xarray.DataArray
        (frame, y, x) motion-corrected movie (dask-backed; not loaded).
    images : xarray.Dataset
        Summary images of the detection movie (``correlation_image``,
        ``pnr_image``, ``mean_image``, ``max_image``, ``std_image``), (y, x).
    p : somaflow.params.RunParams
        Every parameter of the run.
    scratch_url : str, optional
        Where a method may keep intermediates every worker must read (CNMF's
        binned fit movie): a folder on the run's store, e.g. under its work
        store. None: a temporary local folder, fit only for a cluster whose
        workers share the client's disk.

    Returns
    -------
    units, traces : xarray.Dataset
        See the module docstring; ``traces`` is computed (numpy-backed).

    Raises
    ------
    ParameterError
        ``p.method`` is not one of :data:`METHODS`.
    """
    if p.method == "local-maxima" or p.method in DETECTORS:
        from somaflow.preprocess.pipeline import trace_movie
        from somaflow.traces import extract_traces

        if p.method == "local-maxima":
            from somaflow.detect.local_maxima import detect_local_maxima

            units = detect_local_maxima(images, p.detect)
        else:
            from somaflow.detect.cnn import detect_cnn

            units = detect_cnn(corrected, images, p.method, p.cnn, p.neuron_radius)
        traces = extract_traces(trace_movie(corrected, p.preprocess), units["masks"], p.traces).compute()
        return units, traces
    if p.method == "cnmf":
        from somaflow.extract.cnmf import cnmf_units

        return cnmf_units(corrected, images, p, scratch_url=scratch_url)
    if p.method == "pca-ica":
        from somaflow.extract.pca_ica import pca_ica
        from somaflow.preprocess.pipeline import trace_movie

        return pca_ica(corrected, p.pca_ica, trace_params=p.traces,
                       trace_movie=trace_movie(corrected, p.preprocess))
    raise ParameterError(f"unknown method {p.method!r}; use one of {', '.join(METHODS)}.")
