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
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import posixpath
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import dask.array as da
import h5py
import numpy as np
import tifffile
import xarray as xr
import zarr
from dask.base import tokenize

from somaflow.errors import InputError, ParameterError, SomaflowError, StoreError
from somaflow.io import stores
from somaflow.io.chunks import plan_frame_chunks
from somaflow.io.schema import open_movie

log = logging.getLogger(__name__)

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

# ----------------------------------------------------------------------------- detection


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


# ----------------------------------------------------------------------------- file access


def _is_local(url: str) -> bool:
    return stores.protocol_of(url) == "file"


@contextlib.contextmanager
def _open_binary(url: str, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    """A readable binary file object for ``url``."""
    if _is_local(url):
        with open(url, "rb") as fh:
            yield fh
    else:
        fs, path = stores.filesystem(url, storage_options)
        with fs.open(path, "rb") as fh:
            yield fh


def _file_info(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    fs, path = stores.filesystem(url, storage_options)
    try:
        return dict(fs.info(path))
    except FileNotFoundError as exc:
        raise StoreError(f"{url} does not exist. Check the path or URL.") from exc
    except OSError as exc:
        raise StoreError(
            f"cannot reach {url}: {exc}. Check the URL, credentials and endpoint."
        ) from exc


def _check_nonempty(url: str, info: dict[str, Any]) -> None:
    if info.get("type") != "directory" and int(info.get("size") or 0) == 0:
        raise InputError(f"{url} is empty (0 bytes). Check that the file was copied completely.")


def _read_error(url: str, what: str, exc: BaseException) -> InputError:
    return InputError(
        f"cannot read {what} of {url} ({type(exc).__name__}: {exc}). The file is corrupt or "
        "truncated; re-export or re-copy it."
    )


def _frame_range(key: Any, n: int) -> tuple[range, bool]:
    """The frames an index along the first axis selects, and whether it drops the axis."""
    if isinstance(key, (int, np.integer)):
        k = int(key) + n if key < 0 else int(key)
        return range(k, k + 1), True
    if isinstance(key, slice):
        return range(*key.indices(n)), False
    raise TypeError(f"unsupported index {key!r}")


def _split_key(key: Any, ndim: int) -> tuple[Any, ...]:
    key = key if isinstance(key, tuple) else (key,)
    return tuple(key) + (slice(None),) * (ndim - len(key))


def _bounding_key(
    key: tuple[Any, ...], shape: tuple[int, ...]
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Split a key with index arrays into a basic key covering them and the rest.

    ``block = x[basic]`` followed by ``block[rel]`` equals ``x[key]`` (numpy semantics).
    """
    basic: list[Any] = []
    rel: list[Any] = []
    for k, n in zip(key, shape, strict=False):
        if isinstance(k, (list, np.ndarray)):
            a = np.asarray(k)
            a = np.nonzero(a)[0] if a.dtype == bool else np.where(a < 0, a + n, a).astype(np.intp)
            lo = int(a.min()) if a.size else 0
            hi = int(a.max()) + 1 if a.size else 0
            basic.append(slice(lo, hi))
            rel.append(a - lo)
        elif isinstance(k, (int, np.integer)):
            i = int(k) + n if k < 0 else int(k)
            basic.append(slice(i, i + 1))
            rel.append(0)
        else:
            basic.append(k)
            rel.append(slice(None))
    return tuple(basic), tuple(rel)


# ----------------------------------------------------------------------------- lazy sources


@dataclass(frozen=True)
class _Source:
    """A picklable, lazily indexable array: every ``[]`` opens the file itself."""

    url: str
    storage_options: dict[str, Any] | None
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = _split_key(key, self.ndim)
        try:
            if any(isinstance(k, (list, np.ndarray)) for k in key):
                basic, rel = _bounding_key(key, self.shape)
                return np.asarray(self._read(basic))[rel]
            return np.asarray(self._read(key))
        except SomaflowError:
            raise
        except Exception as exc:  # any decoder/IO failure of a third-party reader
            raise _read_error(self.url, f"block {key}", exc) from exc

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        raise NotImplementedError


@contextlib.contextmanager
def _tiff_file(url: str, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    if _is_local(url):
        with tifffile.TiffFile(url) as tif:
            yield tif
    else:
        with _open_binary(url, storage_options) as fh, tifffile.TiffFile(fh) as tif:
            yield tif


@dataclass(frozen=True)
class _TiffSource(_Source):
    """Series 0 of a TIFF. ``by_page``: every page is one (y, x) frame, read page by page
    (fast: no series parsing); otherwise read through tifffile's zarr view of the series."""

    by_page: bool = False

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        with _tiff_file(self.url, self.storage_options) as tif:
            if self.by_page:
                frames, drop = _frame_range(key[0], self.shape[0])
                if len(frames) == 0:
                    block = np.empty((0,) + self.shape[1:], self.dtype)
                else:
                    block = tif.asarray(key=list(frames)).reshape((len(frames),) + self.shape[1:])
                block = block[(slice(None),) + key[1:]]
                return block[0] if drop else block
            store = tif.series[0].aszarr(level=0)
            try:
                return zarr.open_array(store, mode="r")[key]
            finally:
                store.close()


@dataclass(frozen=True)
class _ArraySource(_Source):
    """Any picklable, lazily indexable array (a zarr array)."""

    array: Any = None

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        return self.array[key]


@dataclass(frozen=True)
class _TiffFolderSource(_Source):
    files: tuple[str, ...] = ()
    #: first frame of each file in the concatenated movie (len(files) + 1 entries)
    starts: tuple[int, ...] = ()

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        frames, drop = _frame_range(key[0], self.shape[0])
        out = np.empty((len(frames),) + self.shape[1:], self.dtype)
        cache: dict[int, np.ndarray] = {}
        for i, t in enumerate(frames):
            f = int(np.searchsorted(self.starts, t, side="right")) - 1
            if f not in cache:
                cache.clear()
                with _open_binary(self.files[f], self.storage_options) as fh:
                    arr = tifffile.imread(fh)
                per_file = self.starts[f + 1] - self.starts[f]
                if arr.ndim == len(self.shape) - 1:
                    arr = arr[np.newaxis]
                expect = (per_file,) + self.shape[1:]
                if arr.shape != expect or arr.dtype != self.dtype:
                    raise InputError(
                        f"{self.files[f]} holds {arr.shape[1:]} {arr.dtype} frames but the folder's "
                        f"first file holds {self.shape[1:]} {self.dtype}. Every TIFF in the folder "
                        "needs the same frame size and dtype; remove the odd file."
                    )
                cache[f] = arr
            out[i] = cache[f][t - self.starts[f]]
        out = out[(slice(None),) + key[1:]]
        return out[0] if drop else out


@contextlib.contextmanager
def _h5_file(url: str, storage_options: dict[str, Any] | None) -> Iterator[Any]:
    if _is_local(url):
        with h5py.File(url, "r") as f:
            yield f
    else:
        with _open_binary(url, storage_options) as fh, h5py.File(fh, "r") as f:
            yield f


@dataclass(frozen=True)
class _H5Source(_Source):
    dataset: str = ""

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        with _h5_file(self.url, self.storage_options) as f:
            return f[self.dataset][key]


@dataclass(frozen=True)
class _BinSource(_Source):
    """Raw C-order frames (Suite2p ``data.bin``): frame t starts at ``t * frame_bytes``."""

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        frames, drop = _frame_range(key[0], self.shape[0])
        if _is_local(self.url):
            mm = np.memmap(self.url, dtype=self.dtype, mode="r", shape=self.shape)
            return np.array(mm[key])
        frame_bytes = math.prod(self.shape[1:]) * self.dtype.itemsize
        lo, hi = (
            (frames.start, frames.stop)
            if frames.step == 1
            else (min(frames, default=0), max(frames, default=-1) + 1)
        )
        with _open_binary(self.url, self.storage_options) as fh:
            fh.seek(lo * frame_bytes)
            raw = fh.read(max(hi - lo, 0) * frame_bytes)
        block = np.frombuffer(raw, self.dtype).reshape((max(hi - lo, 0),) + self.shape[1:])
        block = block[[t - lo for t in frames]]
        block = block[(slice(None),) + key[1:]]
        return block[0] if drop else block


@dataclass(frozen=True)
class _VideoSource(_Source):
    """Frames of the first video stream; ``pixel`` is how a frame becomes a 2-D array."""

    pixel: str = "gray"

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        frames, drop = _frame_range(key[0], self.shape[0])
        if len(frames) == 0:
            return np.empty((0,) + self.shape[1:], self.dtype)[(slice(None),) + key[1:]]
        lo, hi = min(frames), max(frames) + 1
        block = _decode_frames(self, lo, hi)
        block = block[[t - lo for t in frames]]
        block = block[(slice(None),) + key[1:]]
        return block[0] if drop else block


# ----------------------------------------------------------------------------- axes


def _parse_axes(axes: str) -> str:
    a = str(axes).strip().lower()
    if not a or set(a) - set("tyxzc") or len(set(a)) != len(a) or not set("tyx") <= set(a):
        raise ParameterError(
            f"axes must name t, y and x once each, plus optionally z (plane) and c (channel), "
            f"e.g. 'tyx' (the default) or 'yxt'; got {axes!r}."
        )
    return a


@dataclass(frozen=True)
class _AxesPlan:
    """How an array stored with ``axes`` becomes (frame, y, x)."""

    axes: str
    index: tuple[Any, ...]  # selects one plane/channel on z/c, everything else whole
    order: tuple[int, ...]  # transpose of the indexed array to (t, y, x)
    out_shape: tuple[int, int, int]


def _plan_axes(
    shape: tuple[int, ...],
    axes: str,
    url: str,
    *,
    plane: int | None,
    channel: int | None,
    hint: str = "",
) -> _AxesPlan:
    if len(shape) == 2:
        raise InputError(
            f"{url}: got a single 2-D image of shape {shape}; somaflow needs a movie (frame, y, x). "
            "Point at the whole recording, not one frame."
        )
    if len(shape) < 2:
        raise InputError(
            f"{url} holds a {len(shape)}-D array; somaflow needs a movie (frame, y, x)."
        )
    if len(axes) != len(shape):
        raise InputError(
            f"{url} holds a {len(shape)}-D array of shape {shape}{hint}, but axes {axes!r} names "
            f"{len(axes)} dims. Pass --axes with one letter per dim: t (frames), y, x, and z "
            "(plane) / c (channel) for extra dims, e.g. 'tzyxc'."
        )
    if any(n == 0 for n in shape):
        raise InputError(f"{url} holds an empty array of shape {shape}. Check the file.")
    index: list[Any] = []
    for ax, n in zip(axes, shape, strict=True):
        if ax not in "zc":
            index.append(slice(None))
            continue
        what, sel, opt = ("plane", plane, "plane") if ax == "z" else ("channel", channel, "channel")
        if sel is None:
            if n != 1:
                raise InputError(
                    f"{url} holds {n} {what}s (axis {ax!r}, shape {shape}); somaflow analyses one "
                    f"{what} at a time. Select one with {opt}=INDEX (0..{n - 1}) or export a single "
                    f"{what} to its own file."
                )
            sel = 0
        if not 0 <= sel < n:
            raise ParameterError(
                f"{opt}={sel} is out of range: {url} has {n} {what}s (0..{n - 1})."
            )
        index.append(int(sel))
    kept = [ax for ax in axes if ax not in "zc"]
    order = tuple(kept.index(ax) for ax in "tyx")
    out_shape = tuple(shape[axes.index(ax)] for ax in "tyx")
    return _AxesPlan(axes, tuple(index), order, out_shape)  # type: ignore[arg-type]


def _check_dtype(dtype: np.dtype, url: str) -> None:
    if np.dtype(dtype).kind not in "iuf":
        raise InputError(
            f"{url} stores {np.dtype(dtype)} pixels, not numbers. somaflow needs integer or float "
            "pixels; convert the data (e.g. to uint16 or float32) first."
        )


def _frame_chunks(
    out_shape: tuple[int, int, int], itemsize: int, frames_per_chunk: int | None, memory_budget: int
) -> int:
    if frames_per_chunk is None:
        return plan_frame_chunks(out_shape, itemsize, memory_budget)
    if (
        isinstance(frames_per_chunk, bool)
        or int(frames_per_chunk) != frames_per_chunk
        or frames_per_chunk <= 0
    ):
        raise ParameterError(
            f"frames_per_chunk must be a positive integer, got {frames_per_chunk!r}."
        )
    return min(int(frames_per_chunk), out_shape[0])


def _assemble(
    src: Any,
    plan: _AxesPlan,
    n_frames: int,
    *,
    name: str,
    attrs: dict[str, Any],
) -> xr.DataArray:
    """Wrap ``src`` (stored in ``plan.axes`` order) as a frame-chunked (frame, y, x) DataArray."""
    chunks: list[Any] = []
    for ax, n in zip(plan.axes, src.shape, strict=True):
        chunks.append(n_frames if ax == "t" else 1 if ax in "zc" else n)
    arr = da.from_array(
        src,
        chunks=tuple(chunks),
        name=name,
        lock=False,
        asarray=True,
        fancy=True,
        meta=np.empty((0,) * len(src.shape), src.dtype),
        inline_array=False,
    )
    arr = arr[plan.index].transpose(plan.order)
    n_t = plan.out_shape[0]
    if n_t < 2:
        raise InputError(
            f"{attrs['source']} holds {n_t} frame(s); a movie needs at least 2. Check the axes "
            f"(got {plan.axes!r}) or point at the whole recording."
        )
    return xr.DataArray(arr, dims=("frame", "y", "x"), name="movie", attrs=attrs)


def _name(fmt: str, url: str, *parts: Any) -> str:
    return f"read-{fmt}-{tokenize(url, *parts)}"


def _positive_fps(value: Any) -> float | None:
    try:
        fps = float(np.asarray(value).ravel()[0]) if np.ndim(value) else float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return fps if math.isfinite(fps) and fps > 0 else None


def _fps_from_attrs(*attr_maps: Any) -> float | None:
    for attrs in attr_maps:
        for k in _FPS_KEYS:
            if k in attrs and (fps := _positive_fps(attrs[k])) is not None:
                return fps
    return None


# ----------------------------------------------------------------------------- TIFF

_TIME_UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "ms": 1e-3,
    "msec": 1e-3,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "min": 60.0,
    "minute": 60.0,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "microsecond": 1e-6,
}


def _tiff_ifd_problem(fh: Any, size: int, max_pages: int = 1 << 24) -> str | None:
    """Walk the TIFF directory chain; describe the first pointer past the end of the file."""
    fh.seek(0)
    head = fh.read(16)
    if head[:2] not in (b"II", b"MM"):
        return "it does not start with a TIFF header"
    e = "<" if head[:2] == b"II" else ">"
    version = struct.unpack(e + "H", head[2:4])[0]
    if version == 42:
        offset = struct.unpack(e + "I", head[4:8])[0]
        cnt, cnt_size, tag_size, off, off_size = "H", 2, 12, "I", 4
    elif version == 43 and len(head) == 16:
        offset = struct.unpack(e + "Q", head[8:16])[0]
        cnt, cnt_size, tag_size, off, off_size = "Q", 8, 20, "Q", 8
    else:
        return "it does not start with a TIFF header"
    seen: set[int] = set()
    page = 0
    while offset and page < max_pages:
        if offset in seen:
            return f"its page directories form a loop at byte {offset}"
        seen.add(offset)
        if offset + cnt_size > size:
            return f"page {page}'s directory should start at byte {offset}, past the end of the {size}-byte file"
        fh.seek(offset)
        ntags = struct.unpack(e + cnt, fh.read(cnt_size))[0]
        end = offset + cnt_size + ntags * tag_size
        if end + off_size > size:
            return f"page {page}'s directory ends at byte {end + off_size}, past the end of the {size}-byte file"
        fh.seek(end)
        offset = struct.unpack(e + off, fh.read(off_size))[0]
        page += 1
    return None


def _tiff_data_problem(tif: Any, size: int) -> str | None:
    """Check that every pixel byte the series points at lies inside the file."""
    series = tif.series[0]
    if series.dataoffset is not None:
        need = int(series.dataoffset) + int(series.nbytes)
        if need > size:
            return f"its pixel data needs {need} bytes but the file has {size}"
        return None
    need = 0
    for page in series.pages:
        if page is None:
            continue
        ends = [
            int(o) + int(c)
            for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)
            if c
        ]
        need = max([need, *ends])
    if need > size:
        return f"its pixel data needs {need} bytes but the file has {size}"
    return None


def _tiff_count_problem(tif: Any) -> str | None:
    """Compare the planes found with what ImageJ / tifffile metadata declares."""
    series = tif.series[0]
    plane = max(int(series.keyframe.size), 1)
    found = int(math.prod(series.shape)) // plane
    expected = None
    if tif.is_imagej and tif.imagej_metadata:
        expected = int(tif.imagej_metadata.get("images", found))
    elif tif.is_shaped and tif.shaped_metadata and "shape" in tif.shaped_metadata[0]:
        expected = int(math.prod(tif.shaped_metadata[0]["shape"])) // plane
    if expected is not None and expected != found:
        return f"its metadata declares {expected} images but only {found} were found"
    return None


def _tiff_fps(tif: Any) -> float | None:
    if tif.is_imagej and tif.imagej_metadata:
        md = tif.imagej_metadata
        if (fps := _positive_fps(md.get("fps"))) is not None:
            return fps
        interval = _positive_fps(md.get("finterval"))
        unit = _TIME_UNITS.get(str(md.get("tunit", "s")).strip().lower(), 1.0)
        if interval is not None:
            return 1.0 / (interval * unit)
    if tif.is_shaped and tif.shaped_metadata:
        if (fps := _fps_from_attrs(tif.shaped_metadata[0])) is not None:
            return fps
    if tif.is_scanimage:
        with contextlib.suppress(Exception):
            frame_data = tif.scanimage_metadata.get("FrameData", {})
            if (fps := _positive_fps(frame_data.get("SI.hRoiManager.scanFrameRate"))) is not None:
                return fps
    if tif.is_ome and tif.ome_metadata:
        with contextlib.suppress(ET.ParseError, ValueError):
            for el in ET.fromstring(tif.ome_metadata).iter():
                if el.tag.endswith("Pixels") and "TimeIncrement" in el.attrib:
                    unit = _TIME_UNITS.get(el.attrib.get("TimeIncrementUnit", "s").lower(), 1.0)
                    inc = _positive_fps(el.attrib["TimeIncrement"])
                    if inc is not None:
                        return 1.0 / (inc * unit)
    return None


_TIFF_AXIS_LETTERS = {
    "T": "t",
    "I": "t",
    "Q": "t",
    "Z": "z",
    "C": "c",
    "S": "c",
    "Y": "y",
    "X": "x",
}


def _open_tiff(
    url: str, so: dict[str, Any] | None, info: dict[str, Any]
) -> tuple[_TiffSource, dict[str, Any], str]:
    size = int(info.get("size") or 0)
    try:
        with _open_binary(url, so) as fh:
            problem = _tiff_ifd_problem(fh, size)
        if problem is not None:
            raise InputError(
                f"{url} is a truncated or corrupt TIFF: {problem}. Re-copy or re-export the file."
            )
        with _tiff_file(url, so) as tif:
            series = tif.series[0]
            problem = _tiff_data_problem(tif, size) or _tiff_count_problem(tif)
            if problem is not None:
                raise InputError(
                    f"{url} is a truncated or corrupt TIFF: {problem}. Re-copy or re-export the file."
                )
            compressed = int(series.keyframe.compression) != 1
            if compressed and series.dataoffset is None and len(series.pages):
                series.pages[-1].asarray()  # decode one page: catches a damaged stream early
            if len(tif.series) > 1:
                log.info("%s holds %d image series; reading the first", url, len(tif.series))
            shape, dtype, file_axes = tuple(series.shape), series.dtype, series.axes
            page_frames = (
                len(shape) == 3
                and len(tif.pages) == shape[0]
                and tuple(series.keyframe.shape) == shape[1:]
            )
            fps = _tiff_fps(tif)
    except SomaflowError:
        raise
    except Exception as exc:  # tifffile raises many kinds on malformed files
        raise InputError(
            f"cannot read {url} as a TIFF ({type(exc).__name__}: {exc}). The file is corrupt, "
            "truncated or not a TIFF; re-copy or re-export it."
        ) from exc
    src = _TiffSource(url, so, shape, np.dtype(dtype), by_page=page_frames)
    guess = "".join(_TIFF_AXIS_LETTERS.get(a, "?") for a in file_axes)
    hint = f" (tifffile labels its axes {file_axes!r}"
    hint += (
        f", e.g. --axes {guess!r})" if len(set(guess)) == len(guess) and "?" not in guess else ")"
    )
    return src, ({"fps": fps} if fps else {}), hint


def _open_tiff_folder(
    url: str, so: dict[str, Any] | None
) -> tuple[_TiffFolderSource, dict[str, Any]]:
    fs, path = stores.filesystem(url, so)
    names = sorted(
        (n for n in _list_dir(fs, path) if _suffix(n) in TIFF_EXTENSIONS), key=_natural_key
    )
    files = tuple(stores.join(url, n) for n in names)
    first_attrs: dict[str, Any] = {}

    def header(f: str) -> tuple[tuple[int, ...], np.dtype]:
        try:
            with _tiff_file(f, so) as tif:
                if f == files[0] and (fps := _tiff_fps(tif)) is not None:
                    first_attrs["fps"] = fps
                return tuple(tif.series[0].shape), tif.series[0].dtype
        except Exception as exc:  # tifffile raises many kinds on malformed files
            raise InputError(
                f"cannot read {f} as a TIFF ({type(exc).__name__}: {exc}); remove or repair it."
            ) from exc

    shape0, dtype = header(files[0])
    if len(shape0) == 2:  # one frame per file; a different file shape is caught when read
        frame_shape, counts = shape0, [1] * len(files)
        last_shape, _ = header(files[-1])
        if last_shape != shape0:
            raise InputError(
                f"{files[-1]} holds {last_shape} but {files[0]} holds {shape0}. Every TIFF in "
                f"{url} needs the same frame size; remove the odd files."
            )
    else:  # a folder of stacks: each file's frame count is needed
        frame_shape, counts = shape0[1:], []
        for f in files:
            s, _ = header(f)
            if tuple(s[-len(frame_shape) :]) != frame_shape or len(s) != len(shape0):
                raise InputError(
                    f"{f} holds {s} but {files[0]} holds {shape0}. Every TIFF in {url} needs the "
                    "same frame size; remove the odd files."
                )
            counts.append(s[0])
    starts = tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))
    shape = (starts[-1],) + tuple(frame_shape)
    src = _TiffFolderSource(url, so, shape, np.dtype(dtype), files=files, starts=starts)
    return src, first_attrs


# ----------------------------------------------------------------------------- HDF5 / NWB


def _h5_open_error(url: str, exc: Exception, what: str = "HDF5") -> InputError:
    return InputError(
        f"cannot open {url} as {what} ({type(exc).__name__}: {exc}). The file is corrupt, "
        "truncated or not HDF5; re-copy or re-export it."
    )


def _h5_datasets(f: Any) -> list[tuple[str, tuple[int, ...], np.dtype]]:
    found: list[tuple[str, tuple[int, ...], np.dtype]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.shape is not None:
            found.append(("/" + name, tuple(obj.shape), obj.dtype))

    f.visititems(visit)
    return found


def _describe(cands: Sequence[tuple[str, tuple[int, ...], Any]]) -> str:
    return ", ".join(
        f"{n} {tuple(s)} {np.dtype(d) if not isinstance(d, str) else d}" for n, s, d in cands
    )


def _open_hdf5(
    url: str, so: dict[str, Any] | None, dataset: str | None
) -> tuple[_H5Source, dict[str, Any], str]:
    try:
        with _h5_file(url, so) as f:
            if dataset is None:
                all_ds = _h5_datasets(f)
                cands = [c for c in all_ds if len(c[1]) >= 3 and np.dtype(c[2]).kind in "iuf"]
                if len(cands) > 1:
                    raise InputError(
                        f"{url} holds several 3-D datasets: {_describe(cands)}. Name the movie "
                        "with --dataset (e.g. --dataset " + cands[0][0] + ")."
                    )
                if not cands:
                    images = [c for c in all_ds if len(c[1]) >= 2]
                    if len(images) == 1 and len(images[0][1]) == 2:
                        cands = images  # reported below as a single 2-D image
                    elif images:
                        raise InputError(
                            f"{url} holds no numeric 3-D dataset; found {_describe(images)}. Name "
                            "the movie with --dataset."
                        )
                    else:
                        raise InputError(f"{url} holds no array datasets; it contains no movie.")
                dataset = cands[0][0]
            obj = f.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                cands = [c for c in _h5_datasets(f) if len(c[1]) >= 2]
                kind = "a group" if obj is not None else "missing"
                raise InputError(
                    f"dataset {dataset!r} in {url} is {kind}. Available datasets: "
                    f"{_describe(cands) or 'none'}. Pass one of them with --dataset."
                )
            shape, dtype = tuple(obj.shape), obj.dtype
            attrs = {"dataset": obj.name}
            fps = _fps_from_attrs(obj.attrs, f.attrs)
            if fps is not None:
                attrs["fps"] = fps
    except SomaflowError:
        raise
    except (OSError, ValueError) as exc:
        raise _h5_open_error(url, exc) from exc
    _check_dtype(dtype, url)
    return _H5Source(url, so, shape, np.dtype(dtype), dataset=str(attrs["dataset"])), attrs, ""


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _open_nwb(
    url: str, so: dict[str, Any] | None, dataset: str | None
) -> tuple[_H5Source, dict[str, Any], str]:
    """NWB files are HDF5: find the imaging series by their ``neurodata_type``.

    NWB's ``ImageSeries.data`` is documented as (frames, x, y), but writers
    (Suite2p, CaImAn, most DANDI data) store rows first, i.e. (frames, y, x);
    the default axes ``tyx`` follows the writers. Pass ``axes="txy"`` for a file
    that follows the letter of the schema.
    """
    try:
        with _h5_file(url, so) as f:
            series: list[tuple[str, str, tuple[int, ...], np.dtype]] = []

            def visit(name: str, obj: Any) -> None:
                if isinstance(obj, h5py.Group):
                    ntype = _attr_str(obj.attrs.get("neurodata_type", ""))
                    data = obj.get("data")
                    if ntype in NWB_MOVIE_TYPES and isinstance(data, h5py.Dataset):
                        series.append(("/" + name, ntype, tuple(data.shape), data.dtype))

            f.visititems(visit)
            photon = [s for s in series if s[1] != "ImageSeries"]
            cands = photon or series
            listing = ", ".join(f"{p} ({t}, {s})" for p, t, s, _ in series) or "none"
            if dataset is not None:
                want = dataset.rstrip("/")
                want = want[: -len("/data")] if want.endswith("/data") else want
                chosen = [
                    s
                    for s in series
                    if s[0] == want
                    or s[0] == "/" + want.lstrip("/")
                    or s[0].rsplit("/", 1)[-1] == want
                ]
                if len(chosen) != 1:
                    raise InputError(
                        f"{url} has no single imaging series named {dataset!r}. Imaging series: "
                        f"{listing}. Pass one of them with --dataset."
                    )
            else:
                if not cands:
                    raise InputError(
                        f"{url} holds no TwoPhotonSeries, OnePhotonSeries or ImageSeries with data. "
                        "It contains no movie somaflow can read."
                    )
                if len(cands) > 1:
                    raise InputError(
                        f"{url} holds several imaging series: {listing}. Name one with --dataset "
                        f"(e.g. --dataset {cands[0][0].rsplit('/', 1)[-1]})."
                    )
                chosen = cands
            path, ntype, shape, dtype = chosen[0]
            group = f[path]
            if math.prod(shape) == 0 and "external_file" in group:
                raise InputError(
                    f"{url}: {path} keeps its frames in external files "
                    f"({[_attr_str(x) for x in group['external_file'][()]]}). Open those files instead."
                )
            attrs: dict[str, Any] = {"dataset": path + "/data", "nwb_type": ntype}
            fps = None
            if "starting_time" in group:
                fps = _positive_fps(group["starting_time"].attrs.get("rate"))
            if fps is None and "timestamps" in group and len(group["timestamps"]) > 1:
                ts = np.asarray(group["timestamps"][:1001], dtype=np.float64)
                step = float(np.median(np.diff(ts)))
                fps = 1.0 / step if step > 0 else None
            if fps is not None:
                attrs["fps"] = fps
    except SomaflowError:
        raise
    except (OSError, ValueError) as exc:
        raise _h5_open_error(url, exc, "NWB (HDF5)") from exc
    _check_dtype(dtype, url)
    return _H5Source(url, so, shape, np.dtype(dtype), dataset=path + "/data"), attrs, ""


# ----------------------------------------------------------------------------- video


def _video_pixel(pix_fmt: str) -> tuple[str, np.dtype]:
    """How to turn decoded frames into 2-D arrays, and their dtype."""
    if pix_fmt in ("gray", "gray8"):
        return "gray", np.dtype(np.uint8)
    if pix_fmt in ("gray16le", "gray16be"):
        return pix_fmt, np.dtype(np.uint16)
    if pix_fmt.startswith(("yuv", "yuvj", "nv")):
        return "gray", np.dtype(np.uint8)  # the luma plane
    return "rgb24", np.dtype(np.uint8)  # colour: accepted when R == G == B (checked per chunk)


@contextlib.contextmanager
def _av_container(url: str, so: dict[str, Any] | None) -> Iterator[Any]:
    import av

    if _is_local(url):
        with av.open(url) as c:
            yield c
    else:
        with _open_binary(url, so) as fh, av.open(fh) as c:
            yield c


def _frame_to_array(frame: Any, pixel: str, url: str) -> np.ndarray:
    if pixel != "rgb24":
        return frame.to_ndarray(format=pixel)
    rgb = frame.to_ndarray(format="rgb24")
    if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise InputError(
            f"{url} is a colour video; somaflow needs grey frames. Convert it to greyscale "
            "(e.g. ffmpeg -i IN -pix_fmt gray -c:v ffv1 OUT.avi)."
        )
    return rgb[..., 0]


def _decode_frames(src: _VideoSource, lo: int, hi: int) -> np.ndarray:
    """Decode frames ``lo..hi-1``: seek to a keyframe at or before ``lo``, decode forward."""
    out: list[np.ndarray] = []
    with _av_container(src.url, src.storage_options) as c:
        stream = c.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        tb = stream.time_base
        start = stream.start_time or 0

        def index(frame: Any, fallback: int) -> int:
            if frame.pts is None or not rate or not tb:
                return fallback
            return int(round(float((frame.pts - start) * tb * rate)))

        seeked = lo > 0 and bool(rate) and bool(tb)
        if seeked:
            c.seek(int(start + lo / (rate * tb)), stream=stream, backward=True, any_frame=False)
        for count, frame in enumerate(c.decode(stream)):
            i = index(frame, count)
            if seeked and not out and i > lo:  # the seek overshot: decode from the start
                return _decode_from_start(src, lo, hi)
            if i < lo:
                continue
            if i >= hi:
                break
            out.append(_frame_to_array(frame, src.pixel, src.url))
    if len(out) != hi - lo:
        raise InputError(
            f"{src.url}: frames {lo}..{hi - 1} could not be decoded (got {len(out)}); the video "
            "is truncated or has a variable frame rate. Re-encode it at a constant rate "
            "(e.g. ffmpeg -i IN -vsync cfr -pix_fmt gray -c:v ffv1 OUT.avi)."
        )
    return np.stack(out)


def _decode_from_start(src: _VideoSource, lo: int, hi: int) -> np.ndarray:
    out: list[np.ndarray] = []
    with _av_container(src.url, src.storage_options) as c:
        for count, frame in enumerate(c.decode(c.streams.video[0])):
            if count >= hi:
                break
            if count >= lo:
                out.append(_frame_to_array(frame, src.pixel, src.url))
    if len(out) != hi - lo:
        raise InputError(
            f"{src.url}: frames {lo}..{hi - 1} could not be decoded; the video is truncated."
        )
    return np.stack(out)


def _open_video(url: str, so: dict[str, Any] | None) -> tuple[_VideoSource, dict[str, Any], str]:
    try:
        with _av_container(url, so) as c:
            if not c.streams.video:
                raise InputError(f"{url} holds no video stream. Point at a movie file.")
            stream = c.streams.video[0]
            height, width = stream.codec_context.height, stream.codec_context.width
            pix_fmt = stream.codec_context.pix_fmt or ""
            rate = stream.average_rate or stream.guessed_rate
            n = int(stream.frames or 0)
            if n <= 0:  # containers like mkv don't record it: count the packets
                n = sum(1 for p in c.demux(stream) if p.size and p.pts is not None)
    except SomaflowError:
        raise
    except Exception as exc:  # PyAV raises its own error classes for bad files
        raise InputError(
            f"cannot open {url} as a video ({type(exc).__name__}: {exc}). The file is corrupt, "
            "truncated or uses a codec FFmpeg lacks; re-export it (e.g. as FFV1 in .avi)."
        ) from exc
    pixel, dtype = _video_pixel(pix_fmt)
    attrs: dict[str, Any] = {"pix_fmt": pix_fmt}
    if rate and (fps := _positive_fps(float(rate))) is not None:
        attrs["fps"] = fps
    return _VideoSource(url, so, (n, height, width), dtype, pixel=pixel), attrs, ""


# ----------------------------------------------------------------------------- Suite2p


class _OpsUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays/scalars and plain containers only; refuses every other global."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("builtins", "complex"),
        ("builtins", "slice"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "range"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "Path"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED or (module == "numpy.dtypes" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"ops.npy refers to {module}.{name}, which is not allowed")


def load_suite2p_ops(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read Suite2p's ``ops.npy`` (a pickled dict) without trusting it.

    The ``.npy`` header must declare a 0-d object array; the pickle inside is
    read by a restricted unpickler that only builds numpy arrays/scalars and
    plain containers, so a crafted file cannot run code. Only call this on a
    file the user pointed at.

    Raises
    ------
    InputError
        Not a ``.npy``, not a pickled dict, or it refers to disallowed objects.
    """
    try:
        with _open_binary(url, storage_options) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            if shape != () or dtype != np.dtype(object):
                raise InputError(
                    f"{url} is a .npy of shape {shape} and dtype {dtype}, not Suite2p's pickled "
                    "ops dict. Point at the ops.npy Suite2p wrote."
                )
            value = _OpsUnpickler(fh).load()
    except SomaflowError:
        raise
    except (
        pickle.UnpicklingError,
        ValueError,
        EOFError,
        TypeError,
        AttributeError,
        NotImplementedError,
    ) as exc:
        raise InputError(
            f"refusing to load {url}: {exc}. Suite2p's ops.npy should hold a dict of numbers, "
            "strings and arrays; regenerate it with Suite2p."
        ) from exc
    ops = value.item() if isinstance(value, np.ndarray) and value.shape == () else value
    if not isinstance(ops, dict):
        raise InputError(f"{url} holds a {type(ops).__name__}, not Suite2p's ops dict.")
    return ops


def _open_suite2p(url: str, so: dict[str, Any] | None) -> tuple[_BinSource, dict[str, Any], str]:
    fs, path = stores.filesystem(url, so)
    if fs.isdir(path):
        bin_url, ops_url = stores.join(url, "data.bin"), stores.join(url, "ops.npy")
    elif stores.basename(url) == "ops.npy":
        bin_url, ops_url = stores.sibling(url, "data.bin"), url
    else:
        bin_url, ops_url = url, stores.sibling(url, "ops.npy")
    ops = load_suite2p_ops(ops_url, so)
    try:
        ly, lx = int(ops["Ly"]), int(ops["Lx"])
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(
            f"{ops_url} lacks the frame size (Ly, Lx). Regenerate it with Suite2p."
        ) from exc
    info = _file_info(bin_url, so)
    _check_nonempty(bin_url, info)
    size = int(info["size"])
    dtype = np.dtype(np.int16)  # Suite2p binaries are always int16
    frame_bytes = ly * lx * dtype.itemsize
    n = int(ops.get("nframes", size // frame_bytes))
    if n * frame_bytes > size:
        raise InputError(
            f"{bin_url} is truncated: ops.npy declares {n} frames of {ly}x{lx} int16 "
            f"({n * frame_bytes} bytes) but the file has {size}. Re-copy it."
        )
    if size % frame_bytes:
        log.warning(
            "%s has %d trailing bytes beyond whole %dx%d frames",
            bin_url,
            size % frame_bytes,
            ly,
            lx,
        )
    attrs: dict[str, Any] = {}
    if (fps := _positive_fps(ops.get("fs"))) is not None:
        attrs["fps"] = fps
    return _BinSource(bin_url, so, (n, ly, lx), dtype), attrs, ""


# ----------------------------------------------------------------------------- zarr


def _open_zarr_node(url: str, so: dict[str, Any] | None) -> Any:
    try:
        return zarr.open(
            url,
            mode="r",
            storage_options=None if _is_local(url) else stores.storage_options_for(url, so),
        )
    except FileNotFoundError as exc:
        raise StoreError(
            f"{url} does not exist or is not a zarr store. Check the path or URL."
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(
            f"cannot open {url} as zarr ({type(exc).__name__}: {exc}). Check the store."
        ) from exc


def _is_somaflow_movie(node: Any) -> bool:
    return isinstance(node, zarr.Group) and "movie" in node and "fps" in node.attrs


def _zarr_array(url: str, node: Any, dataset: str | None) -> tuple[Any, dict[str, Any]]:
    if isinstance(node, zarr.Array):
        if dataset is not None:
            raise ParameterError(f"{url} is a single zarr array; drop --dataset {dataset!r}.")
        return node, dict(node.attrs)
    if dataset is not None:
        try:
            arr = node[dataset.strip("/")]
        except KeyError:
            arr = None
        if not isinstance(arr, zarr.Array):
            cands = [(f"{k}", v.shape, v.dtype) for k, v in node.arrays()]
            raise InputError(
                f"{url} has no array {dataset!r}. Arrays at its top level: {_describe(cands) or 'none'}. "
                "Pass one of them with --dataset."
            )
        return arr, {**dict(node.attrs), **dict(arr.attrs)}
    cands = [
        (k, v) for k, v in node.members(max_depth=None) if isinstance(v, zarr.Array) and v.ndim >= 3
    ]
    if len(cands) != 1:
        described = _describe([(k, v.shape, v.dtype) for k, v in cands])
        if cands:
            raise InputError(
                f"{url} holds several arrays of 3 or more dims: {described}. Name the movie with "
                f"--dataset (e.g. --dataset {cands[0][0]})."
            )
        images = [
            (k, v.shape, v.dtype)
            for k, v in node.members(max_depth=None)
            if isinstance(v, zarr.Array)
        ]
        if len(images) == 1 and len(images[0][1]) == 2:
            return node[images[0][0]], dict(node.attrs)
        raise InputError(
            f"{url} holds no array of 3 or more dims (found: {_describe(images) or 'none'}); it contains no movie."
        )
    return cands[0][1], {**dict(node.attrs), **dict(cands[0][1].attrs)}


# ----------------------------------------------------------------------------- public


def open_input(
    url: str,
    *,
    dataset: str | None = None,
    axes: str = "tyx",
    frames_per_chunk: int | None = None,
    memory_budget: int = 256 << 20,
    storage_options: dict[str, Any] | None = None,
    plane: int | None = None,
    channel: int | None = None,
) -> xr.DataArray:
    """Open a supported input lazily as a (frame, y, x) movie.

    Parameters
    ----------
    url : str
        Local path or fsspec URL (``s3://``, ``memory://`` ...) of a file or folder
        in one of :data:`FORMATS`.
    dataset : str, optional
        The array inside an HDF5 file or zarr group (e.g. ``"imaging"``), or the
        imaging series of an NWB file (``"TwoPhotonSeries"``). Guessed when the
        file has exactly one candidate.
    axes : str
        Axis order of the stored array: a permutation of ``"tyx"`` (``"yxt"`` for
        SIMA's HDF5), optionally with ``z`` (plane) and ``c`` (channel) for extra
        dims; singleton z / c axes are dropped. TIFF axes apply to the shape
        tifffile reports, which already lacks singleton axes: ``z`` / ``c``
        letters that it dropped are ignored.
    frames_per_chunk : int, optional
        Frames per dask chunk; planned from ``memory_budget`` with
        :func:`~somaflow.io.chunks.plan_frame_chunks` when None.
    memory_budget : int
        Bytes per task used to plan the chunks.
    storage_options : dict, optional
        fsspec options for remote URLs.
    plane, channel : int, optional
        Which z plane / channel to read when the ``z`` / ``c`` axis has more than
        one entry (singleton axes are dropped without them).

    Returns
    -------
    xarray.DataArray
        dims ``(frame, y, x)``, the file's dtype (integer or float), backed by a
        dask array chunked along ``frame`` only. Nothing but metadata is read
        here. attrs: ``source`` (normalized URL), ``format``, ``fps`` (Hz, when the
        file records it: NWB rate, Suite2p ``fs``, video frame rate, ImageJ
        ``finterval``/``fps``, ScanImage, OME or tifffile metadata), ``dataset``
        where one was used; a somaflow movie zarr keeps its own attrs.

    Raises
    ------
    StoreError
        ``url`` does not exist or cannot be reached.
    InputError
        Unsupported format, a single 2-D image, fewer than 2 frames, an empty,
        truncated or corrupt file, non-numeric pixels, several candidate arrays
        without ``dataset``, or extra non-singleton axes without a selection.
    ParameterError
        Malformed ``axes``, ``frames_per_chunk``, ``plane``/``channel``, or a
        ``dataset`` given for a format that has none.
    """
    url = stores.normalize_url(url)
    axes = _parse_axes(axes)
    so = storage_options
    fmt = detect_format(url, so)
    if dataset is not None and fmt not in ("hdf5", "nwb", "zarr"):
        raise ParameterError(
            f"--dataset applies to HDF5, NWB and zarr inputs, not to {fmt} ({url})."
        )
    info = _file_info(url, so)
    _check_nonempty(url, info)
    version = (
        info.get("size"),
        info.get("mtime"),
        info.get("ETag"),
        str(info.get("LastModified", "")),
    )
    attrs: dict[str, Any]
    hint = ""
    if fmt == "zarr":
        return _open_zarr_input(
            url, so, dataset, axes, frames_per_chunk, memory_budget, plane, channel
        )
    if fmt == "tiff":
        src, attrs, hint = _open_tiff(url, so, info)
        squeezed = "".join(a for a in axes if a not in "zc")
        if len(axes) != src.ndim and len(squeezed) == src.ndim:
            axes = squeezed  # tifffile already dropped the singleton z / c axes
    elif fmt == "tiff-folder":
        src, attrs = _open_tiff_folder(url, so)
        version = src.files
    elif fmt == "hdf5":
        src, attrs, hint = _open_hdf5(url, so, dataset)
    elif fmt == "nwb":
        src, attrs, hint = _open_nwb(url, so, dataset)
    elif fmt == "avi":
        src, attrs, hint = _open_video(url, so)
    else:
        src, attrs, hint = _open_suite2p(url, so)
        bin_info = _file_info(src.url, so)
        version = (bin_info.get("size"), bin_info.get("mtime"))
    _check_dtype(src.dtype, url)
    plan = _plan_axes(src.shape, axes, url, plane=plane, channel=channel, hint=hint)
    n = _frame_chunks(plan.out_shape, src.dtype.itemsize, frames_per_chunk, memory_budget)
    attrs = {"source": url, **attrs, "format": fmt}
    if plane is not None or channel is not None:
        attrs.update({k: v for k, v in (("plane", plane), ("channel", channel)) if v is not None})
    name = _name(
        fmt,
        src.url,
        getattr(src, "dataset", None),
        axes,
        src.shape,
        str(src.dtype),
        n,
        plan.index,
        version,
    )
    movie = _assemble(src, plan, n, name=name, attrs=attrs)
    log.debug(
        "opened %s (%s) as %s %s in chunks of %d frames", url, fmt, movie.shape, movie.dtype, n
    )
    return movie


def _open_zarr_input(
    url: str,
    so: dict[str, Any] | None,
    dataset: str | None,
    axes: str,
    frames_per_chunk: int | None,
    memory_budget: int,
    plane: int | None,
    channel: int | None,
) -> xr.DataArray:

    node = _open_zarr_node(url, so)
    if _is_somaflow_movie(node) and dataset in (None, "movie"):
        if axes != "tyx":
            raise ParameterError(
                f"{url} is a somaflow movie with named dims; drop --axes {axes!r}."
            )
        movie = open_movie(url, storage_options=so)
        _check_dtype(movie.dtype, url)
        stored = movie.chunks[0][0] if movie.chunks else movie.sizes["frame"]
        n = _frame_chunks(tuple(movie.shape), movie.dtype.itemsize, frames_per_chunk, memory_budget)
        if frames_per_chunk is None and stored <= n:
            n = (n // stored) * stored  # whole stored chunks per task
        if movie.sizes["frame"] < 2:
            raise InputError(
                f"{url} holds {movie.sizes['frame']} frame(s); a movie needs at least 2."
            )
        movie = movie.chunk({"frame": n, "y": -1, "x": -1})
        movie.attrs = {**movie.attrs, "format": "zarr"}
        movie.attrs.setdefault("source", url)
        return movie
    arr, zattrs = _zarr_array(url, node, dataset)
    _check_dtype(arr.dtype, url)
    plan = _plan_axes(tuple(arr.shape), axes, url, plane=plane, channel=channel)
    n = _frame_chunks(plan.out_shape, arr.dtype.itemsize, frames_per_chunk, memory_budget)
    stored = arr.chunks[axes.index("t")]
    if frames_per_chunk is None and stored <= n:
        n = (n // stored) * stored
    attrs: dict[str, Any] = {"source": url, "format": "zarr"}
    if node is not arr:
        attrs["dataset"] = arr.path
    if (fps := _fps_from_attrs(zattrs)) is not None:
        attrs["fps"] = fps
    name = _name("zarr", url, arr.path, axes, arr.shape, str(arr.dtype), n, plan.index)
    src = _ArraySource(url, so, tuple(arr.shape), np.dtype(arr.dtype), array=arr)
    return _assemble(src, plan, n, name=name, attrs=attrs)


def check_finite_sample(movie: xr.DataArray, n_frames: int = 16) -> None:
    """Read a few evenly spaced frames and reject non-finite or constant movies.

    A quick sanity check before long work, not a proof: the ingest step checks
    every frame.

    Parameters
    ----------
    movie : xarray.DataArray
        dims (frame, y, x), lazy or not.
    n_frames : int
        How many frames to read (fewer when the movie is shorter), > 0.

    Raises
    ------
    InputError
        A sampled frame holds NaN/inf, or every sampled pixel has the same value.
    """
    if n_frames <= 0:
        raise ParameterError(f"n_frames must be positive, got {n_frames!r}.")
    n_total = movie.sizes["frame"]
    if n_total == 0:
        raise InputError("the movie has no frames. Point at a recording with at least 2 frames.")
    idx = np.unique(np.linspace(0, n_total - 1, min(n_frames, n_total)).round().astype(int))
    # one compute per frame: dask fuses each slice into its read, so only these
    # frames are read (a joint compute would share, hence read, whole chunks)
    sample = np.concatenate([np.asarray(movie.isel(frame=slice(i, i + 1)).values) for i in idx])
    source = movie.attrs.get("source", "the movie")
    if sample.dtype.kind == "f":
        bad = ~np.isfinite(sample)
        if bad.any():
            first = int(idx[np.argmax(bad.reshape(len(idx), -1).any(axis=1))])
            raise InputError(
                f"{source}: frame {first} contains NaN or infinite values. Fix or drop the bad "
                "frames before analysis."
            )
    if sample.size and sample.min() == sample.max():
        raise InputError(
            f"{source}: the movie is constant (every sampled pixel equals {sample.flat[0]}). "
            "Check that the recording holds signal and the right dataset/channel was chosen."
        )
