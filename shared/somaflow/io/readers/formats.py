"""Which reader an input needs: the formats, their file extensions, :func:`detect_format`.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from somaflow.errors import InputError, StoreError
from somaflow.io import stores

FORMATS = ("tiff", "tiff-folder", "hdf5", "avi", "nwb", "zarr", "suite2p-bin")


TIFF_EXTENSIONS = (".tif", ".tiff", ".btf")


HDF5_EXTENSIONS = (".h5", ".hdf5")


VIDEO_EXTENSIONS = (".avi", ".mkv", ".mp4")


_SUPPORTED = (
    "TIFF (.tif/.tiff/.btf or a folder of TIFFs), HDF5 (.h5/.hdf5), video (.avi/.mkv/.mp4), "
    "NWB (.nwb), zarr (.zarr or a folder with zarr.json) and Suite2p (.bin with ops.npy beside it)"
)


#: NWB neurodata types whose ``data`` is a movie, most specific first
NWB_MOVIE_TYPES = ("TwoPhotonSeries", "OnePhotonSeries", "ImageSeries")


_FPS_KEYS = ("fps", "frame_rate", "framerate", "rate", "sampling_rate", "fs")


def _suffix(url: str) -> str:
    name = stores.basename(url).lower()
    return name[name.rfind(".") :] if "." in name else ""


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _list_dir(fs: Any, path: str) -> list[str]:
    return [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]


def detect_format(url: str, storage_options: dict[str, Any] | None = None) -> str:
    """Name the format of ``url``, from its extension or its directory contents.

    Parameters
    ----------
    url : str
        Local path or fsspec URL of a file or directory.
    storage_options : dict, optional
        fsspec options for remote URLs.

    Returns
    -------
    str
        One of :data:`FORMATS`.

    Raises
    ------
    StoreError
        ``url`` does not exist or cannot be listed.
    InputError
        The format is not supported (the message lists the supported ones), or
        a Suite2p ``.bin`` lacks its ``ops.npy``.
    """
    url = stores.normalize_url(url)
    fs, path = stores.filesystem(url, storage_options)
    if not stores.exists(url, storage_options):
        raise StoreError(f"{url} does not exist. Check the path or URL.")
    ext = _suffix(url)
    if ext in TIFF_EXTENSIONS and not fs.isdir(path):
        return "tiff"
    if ext in HDF5_EXTENSIONS:
        return "hdf5"
    if ext in VIDEO_EXTENSIONS:
        return "avi"
    if ext == ".nwb":
        return "nwb"
    if ext == ".zarr":
        return "zarr"
    if ext == ".bin":
        if fs.exists(posixpath.join(posixpath.dirname(path), "ops.npy")):
            return "suite2p-bin"
        raise InputError(
            f"{url} is a .bin file without an ops.npy beside it. Suite2p binaries need their ops.npy "
            "(frame size and count); keep it in the same folder, or convert the movie to TIFF."
        )
    if stores.basename(url) == "ops.npy":
        if fs.exists(posixpath.join(posixpath.dirname(path), "data.bin")):
            return "suite2p-bin"
    if fs.isdir(path):
        names = set(_list_dir(fs, path))
        if names & {"zarr.json", ".zgroup", ".zarray"}:
            return "zarr"
        if {"data.bin", "ops.npy"} <= names:
            return "suite2p-bin"
        if any(_suffix(n) in TIFF_EXTENSIONS for n in names):
            return "tiff-folder"
    raise InputError(f"cannot tell the format of {url}. Supported inputs: {_SUPPORTED}.")

