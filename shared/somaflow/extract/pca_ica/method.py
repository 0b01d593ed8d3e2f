"""The whole PCA/ICA method on one movie (:func:`pca_ica`).
"""

from __future__ import annotations

import logging

import numpy as np
import xarray as xr

from somaflow.errors import InputError, ParameterError
from somaflow.extract.pca_ica.ica import spatiotemporal_ica
from somaflow.extract.pca_ica.params import PcaIcaParams
from somaflow.extract.pca_ica.pca import decomposition_matrix, principal_components
from somaflow.extract.pca_ica.segment import segment_filters, upsample_filters
from somaflow.traces import TraceParams, extract_traces

log = logging.getLogger(__name__)


def pca_ica(
    movie: xr.DataArray,
    params: PcaIcaParams,
    *,
    trace_params: TraceParams | None = None,
    trace_movie: xr.DataArray | None = None,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Units and their activity by PCA/ICA.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) fluorescence (motion-corrected; for 1p background-removed),
        any real dtype, dask- or numpy-backed, ideally chunked along frames;
        never loaded whole. Its ``fps`` (and ``modality``) attrs set the trace
        parameters when ``trace_params`` is None.
    params : PcaIcaParams
        Stage parameters.
    trace_params : somaflow.traces.TraceParams, optional
        Parameters of the traces; default ``TraceParams.for_movie`` from the
        movie's attrs and ``params.neuron_radius``.
    trace_movie : xarray.DataArray, optional
        (frame, y, x) movie the traces are read from, same shape as ``movie``
        (e.g. the background-removed movie of a 1p session while ``movie`` is
        the corrected one); default ``movie``.

    Returns
    -------
    units : xarray.Dataset
        ``masks`` (unit, y, x) bool; ``footprints`` (unit, y, x) float32 in
        [0, 1] (the IC image, clipped at 0, on the thresholded component holding
        the mask, max 1); ``score`` (unit) float32 in [0, 1); ``accepted``
        (unit) bool; ``skewness`` (unit) float32 of the IC time course;
        ``contrast`` (unit) float32, the component's peak in robust SDs of its
        smoothed IC image; ``ic_traces`` (unit, ic_frame) float32, the IC time
        course on the binned frames (zero mean, unit variance). Units by
        decreasing score; several units may share an IC. Attrs ``n_pcs``,
        ``n_signal_pcs``, ``n_ics``, ``temporal_bin``, ``spatial_downsample``.
        A movie with no PC above the noise edge gives zero units.
    traces : xarray.Dataset
        From :func:`somaflow.traces.extract_traces` on ``trace_movie`` with the
        masks of all units (computed): ``traces``, ``dff``, ``spikes`` (unit, frame)
        float32 and ``snr`` (unit) float32.

    Raises
    ------
    InputError
        Wrong dims, too few frames or pixels, NaN/inf values, a movie constant in
        time, or ``n_pcs`` larger than the decomposition movie allows.
    ParameterError
        No frame rate for the traces.
    """
    _check_dims(movie)
    trace_movie = movie if trace_movie is None else trace_movie
    _check_dims(trace_movie)
    if trace_movie.shape != movie.shape:
        raise InputError(
            f"trace_movie is {trace_movie.shape} (frame, y, x) but the movie is {movie.shape}; "
            "pass a trace movie of the same session and size."
        )
    if trace_params is None:
        trace_params = _default_trace_params(movie, params)
    matrix, bin_t, grid = decomposition_matrix(movie, params)
    pcs = principal_components(matrix, grid, params)
    n_signal = int(pcs.attrs["n_signal_pcs"])
    n_ics = min(params.n_ics or n_signal, n_signal)
    log.info("pca-ica: %d frames binned by %d, %d PCs, %d above the noise edge, %d ICs",
             movie.sizes["frame"], bin_t, pcs.sizes["component"], n_signal, n_ics)
    ics = spatiotemporal_ica(pcs.isel(component=slice(0, n_signal)), n_ics, params)
    filters = upsample_filters(ics["spatial"], (movie.sizes["y"], movie.sizes["x"]),
                               params.spatial_downsample)
    units = segment_filters(filters, ics["skewness"].values, params)
    source = units["component"].values
    units["ic_traces"] = (("unit", "ic_frame"), ics["temporal"].values[source].astype(np.float32))
    units = units.drop_vars("component")
    units.attrs.update(n_pcs=int(pcs.sizes["component"]), n_signal_pcs=n_signal, n_ics=n_ics,
                       temporal_bin=bin_t, spatial_downsample=params.spatial_downsample)
    units = units.assign_coords({d: movie.coords[d] for d in ("y", "x") if d in movie.coords})
    traces = extract_traces(trace_movie, units["masks"], trace_params).compute()
    log.info("pca-ica: %d units, %d accepted", units.sizes["unit"], int(units["accepted"].sum()))
    return units, traces


def _check_dims(movie: xr.DataArray) -> None:
    if tuple(movie.dims) != ("frame", "y", "x"):
        raise InputError(
            f"pca_ica needs movies with dims ('frame', 'y', 'x'), got {tuple(movie.dims)}. "
            "Transpose or rename it."
        )


def _default_trace_params(movie: xr.DataArray, params: PcaIcaParams) -> TraceParams:
    fps = movie.attrs.get("fps")
    if fps is None or not float(fps) > 0:
        raise ParameterError(
            "pca_ica needs a frame rate for the traces: set the movie's 'fps' attr or pass "
            "trace_params=TraceParams.for_movie(fps, modality, neuron_radius)."
        )
    modality = str(movie.attrs.get("modality", "2p"))
    return TraceParams.for_movie(float(fps), modality, params.neuron_radius)

