"""Open any supported input lazily as a ``(frame, y, x)`` movie.

Formats (see :func:`detect_format`):

========== ==================================================================
tiff        ``.tif`` / ``.tiff`` / ``.btf`` (classic and BigTIFF, ImageJ,
            OME, ScanImage; compressed or not)
tiff-folder a folder of TIFFs, one frame (or one stack) per file, in natural
            sort order (``f2.tif`` before ``f10.tif``)
hdf5        ``.h5`` / ``.hdf5``; ``dataset`` names the array
avi         ``.avi`` / ``.mkv`` / ``.mp4`` (FFmpeg through PyAV)
nwb         ``.nwb``: a ``TwoPhotonSeries`` / ``OnePhotonSeries`` (or an
            ``ImageSeries`` when there is no photon series)
zarr        ``.zarr`` or a folder with ``zarr.json``: a somaflow movie, or a
            bare array / group (``dataset`` names the array)
suite2p-bin Suite2p's ``.bin`` (int16 frames) with ``ops.npy`` beside it, or
            the folder holding ``data.bin`` + ``ops.npy``
========== ==================================================================

Every reader is lazy: opening reads metadata only; each dask chunk is read by a
small picklable object that opens the file itself, so graphs run on
distributed workers. Local paths are the main case; ``s3://`` and ``memory://``
URLs work through fsspec for TIFF, HDF5/NWB, zarr, video and Suite2p binaries.

Suite2p's ``ops.npy`` is a *pickled* dict by Suite2p's design, and unpickling
an untrusted file can run arbitrary code. somaflow reads it only when the user
points at a Suite2p binary or folder, checks that the ``.npy`` header declares a
0-d object array, and unpickles it with a restricted unpickler that accepts
only numpy arrays/scalars and plain Python containers; anything else is refused.

One module per format (:mod:`~.tiff`, :mod:`~.hdf5`, :mod:`~.nwb`, :mod:`~.video`,
:mod:`~.suite2p`, :mod:`~.zarr_store`) on what they share (:mod:`~.base`);
:mod:`~.formats` detects the format, :mod:`~.api` opens any input.
"""

from __future__ import annotations

from somaflow.io.readers.api import check_finite_sample, open_input
from somaflow.io.readers.formats import (
    FORMATS,
    HDF5_EXTENSIONS,
    NWB_MOVIE_TYPES,
    TIFF_EXTENSIONS,
    VIDEO_EXTENSIONS,
    detect_format,
)
from somaflow.io.readers.suite2p import load_suite2p_ops

__all__ = [
    "FORMATS",
    "HDF5_EXTENSIONS",
    "NWB_MOVIE_TYPES",
    "TIFF_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "check_finite_sample",
    "detect_format",
    "load_suite2p_ops",
    "open_input",
]
