"""The extract stage of a session: run the method a run chose and hand each
method what it needs.

:func:`find_units` dispatches on the method. For CNMF it first runs the
anatomical detector (:func:`morphology_units`: the U-Net, or summary-image
local maxima) and passes its units into :func:`somaflow.extract.cnmf.cnmf_units`,
and it writes the binned fit movie to a scratch store once, so that every
patch task of the factorisation reads only its own region
(:func:`cnmf_fit_store`). Every method returns the same two datasets:

* ``units`` — ``masks`` (unit, y, x) bool, optionally ``footprints``,
  ``score``, ``accepted``;
* ``traces`` — ``traces``, ``dff``, ``spikes`` (unit, frame), optionally ``snr``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator

import numpy as np
import xarray as xr

from somaflow.detect.cnn import detect_cnn
from somaflow.detect.local_maxima import detect_local_maxima
from somaflow.errors import ParameterError
from somaflow.extract import DETECTORS, METHODS
from somaflow.extract.cnmf import CnmfParams, MorphologyUnits, RegionReader, cnmf_units, fit_movie
from somaflow.extract.pca_ica import pca_ica
from somaflow.io import schema, stores
from somaflow.params import RunParams
from somaflow.preprocess.pipeline import trace_movie
from somaflow.traces import extract_traces

log = logging.getLogger(__name__)


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
        Where a method keeps intermediates every worker must read (CNMF's
        binned fit movie): a folder on the run's store, under its work store.
        None: a temporary local folder, fit only for a cluster whose workers
        share the client's disk.

    Returns
    -------
    units, traces : xarray.Dataset
        See the module docstring; ``traces`` is computed (numpy-backed).

    Raises
    ------
    ParameterError
        ``p.method`` is not one of :data:`somaflow.extract.METHODS`.
    """
    if p.method == "local-maxima" or p.method in DETECTORS:
        if p.method == "local-maxima":
            units = detect_local_maxima(images, p.extract.detect)
        else:
            units = detect_cnn(corrected, images, p.method, p.extract.cnn, p.neuron_radius)
        traces = extract_traces(trace_movie(corrected, p.preprocess), units["masks"], p.traces).compute()
        return units, traces
    if p.method == "cnmf":
        return cnmf_method(corrected, images, p, scratch_url=scratch_url)
    if p.method == "pca-ica":
        return pca_ica(corrected, p.extract.pca_ica, trace_params=p.traces,
                       trace_movie=trace_movie(corrected, p.preprocess))
    raise ParameterError(f"unknown method {p.method!r}; use one of {', '.join(METHODS)}.")


def morphology_units(corrected: xr.DataArray, images: xr.Dataset, p: RunParams) -> MorphologyUnits:
    """The anatomical detector's units for CNMF (``cnmf.morphology``).

    ``auto``: the U-Net where the movie is inside its training distribution
    (no out-of-distribution warning), else summary-image local maxima (the
    fall-back is noted and, unless ``cnmf.accept_fallback_morphology``, its
    units are not accepted). A CNN detector's units are those it accepted.
    """
    cp = p.extract.cnmf
    lm, detector, notes, fell_back = None, "local-maxima", [], False
    if cp.morphology != "local-maxima":
        detector = "unet2d" if cp.morphology == "auto" else cp.morphology
        lm = detect_cnn(corrected, images, detector, p.extract.cnn, p.neuron_radius)
        notes = json.loads(lm.attrs.get("ood_warnings", "[]"))
        if notes and cp.morphology == "auto":
            log.info("CNMF morphology units from local maxima, not %s: the movie is outside its "
                     "training distribution (%s)", detector, "; ".join(notes))
            notes = [f"cnmf.morphology auto: used local-maxima, not {detector}: {n}" for n in notes]
            lm, detector, fell_back = None, "local-maxima", True
        else:
            lm = lm.isel(unit=np.flatnonzero(lm["accepted"].values))
    if lm is None:
        lm = detect_local_maxima(images, p.extract.detect)
    return MorphologyUnits(masks=np.asarray(lm["masks"].values, bool),
                           score=np.asarray(lm["score"].values, np.float64),
                           detector=detector, fell_back=fell_back, notes=tuple(notes))


def cnmf_method(corrected: xr.DataArray, images: xr.Dataset, p: RunParams, *,
                scratch_url: str | None = None) -> tuple[xr.Dataset, xr.Dataset]:
    """CNMF on the trace movie, with the morphology units when CNMF uses them."""
    cp = p.extract.cnmf
    movie = trace_movie(corrected, p.preprocess)
    morphology = morphology_units(corrected, images, p) if (cp.add_silent or cp.seed_morphology) else None
    with cnmf_fit_store(movie, cp, scratch_url) as (fit, read):
        return cnmf_units(movie, images, cp, p.traces, fps=p.fps, morphology=morphology,
                          fit_data=fit, read=read)


@contextlib.contextmanager
def cnmf_fit_store(movie: xr.DataArray, cp: CnmfParams,
                   scratch_url: str | None = None) -> Iterator[tuple[xr.DataArray, RegionReader]]:
    """Write CNMF's fit movie once; yield it read back (dask-backed) and a reader
    of its regions for the patch tasks.

    ``scratch_url``: folder of the fit movie, which every patch task reads (on
    a cluster: a URL on the run's store); a temporary local folder when None.
    The fit movie is removed on exit either way.
    """
    own_tmp = scratch_url is None
    scratch = tempfile.mkdtemp(prefix="somaflow-cnmf-") if own_tmp else scratch_url
    try:
        url = stores.join(scratch, "fit_movie.zarr")
        schema.write_dataset(fit_movie(movie, cp).to_dataset(), url, overwrite=True)
        yield _open_fit(url), functools.partial(_read_region, url)
    finally:
        if own_tmp:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            stores.remove(stores.join(scratch, "fit_movie.zarr"))


def _open_fit(url: str, chunks: str | None = "auto") -> xr.DataArray:
    """The fit movie zarr at ``url``: dask-backed, or lazily indexed numpy with ``chunks=None``."""
    fs, path = stores.filesystem(url)
    kwargs = {} if chunks == "auto" else {"chunks": chunks}
    return xr.open_zarr(fs.get_mapper(path), consolidated=False, **kwargs)["movie"]


def _read_region(url: str, region: tuple[slice, slice], frames: slice = slice(None)) -> np.ndarray:
    """(frame, y, x) float32: ``region`` of the fit movie zarr at ``url`` over ``frames``, read by
    the calling task."""
    return np.asarray(_open_fit(url, chunks=None)[frames, region[0], region[1]].values, np.float32)
