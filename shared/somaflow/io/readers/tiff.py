"""TIFF files (one multi-page file, or a folder of files) as lazy movies.
"""

from __future__ import annotations

import contextlib
import logging
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import zarr

from somaflow.errors import InputError, SomaflowError
from somaflow.io import stores
from somaflow.io.readers.base import (
    _fps_from_attrs,
    _frame_range,
    _is_local,
    _open_binary,
    _pixel_size_um,
    _positive_fps,
    _Source,
)
from somaflow.io.readers.formats import TIFF_EXTENSIONS, _list_dir, _natural_key, _suffix

log = logging.getLogger(__name__)


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


class _PageChainWarnings(logging.Handler):
    """Collects what tifffile reports while it walks a file's page directories."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "TiffPages" in message:  # an invalid or looping page offset: the chain is broken
            self.messages.append(message.split("> ", 1)[-1])


@contextlib.contextmanager
def _page_chain_problems() -> Iterator[list[str]]:
    """tifffile's own validation of the page chain (its warnings while ``len(tif.pages)``
    walks every directory), as a list of problems; tifffile's other warnings are not shown."""
    handler = _PageChainWarnings()
    logger = logging.getLogger("tifffile")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False  # they become this reader's one-line error, not console noise
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


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


def _tiff_pixel_size(tif: Any) -> float | None:
    """The pixel side (µm) an OME or ImageJ TIFF records (square pixels only), else None."""
    if tif.is_ome and tif.ome_metadata:
        with contextlib.suppress(ET.ParseError, ValueError):
            for el in ET.fromstring(tif.ome_metadata).iter():
                if el.tag.endswith("Pixels") and "PhysicalSizeX" in el.attrib:
                    x = _pixel_size_um(el.attrib["PhysicalSizeX"], el.attrib.get("PhysicalSizeXUnit", "µm"))
                    y = _pixel_size_um(el.attrib.get("PhysicalSizeY", el.attrib["PhysicalSizeX"]),
                                       el.attrib.get("PhysicalSizeYUnit", "µm"))
                    return x if x is not None and y is not None and math.isclose(x, y, rel_tol=1e-3) else None
    if tif.is_imagej and tif.imagej_metadata and "unit" in tif.imagej_metadata:
        with contextlib.suppress(KeyError, TypeError, ZeroDivisionError):
            tags = tif.pages[0].tags
            (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value  # pixels per unit
            x = _pixel_size_um(xd / xn, tif.imagej_metadata["unit"])
            y = _pixel_size_um(yd / yn, tif.imagej_metadata["unit"])
            return x if x is not None and y is not None and math.isclose(x, y, rel_tol=1e-3) else None
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


def _series_as_frames(url: str, tif: Any) -> tuple[int, int, int]:
    """The (frame, y, x) shape of a TIFF whose several series (e.g. a file written in appends)
    are all plain frames of one size and dtype, read page by page as one movie.

    Raises
    ------
    InputError
        The series differ in frame size or dtype, or are not plain 2-D pages: naming them.
    """
    kinds = [(tuple(s.keyframe.shape), np.dtype(s.dtype), len(s.pages), tuple(s.shape)) for s in tif.series]
    frame, dtype = kinds[0][0], kinds[0][1]
    plain = all(len(k[0]) == 2 and math.prod(k[3]) == k[2] * math.prod(k[0]) for k in kinds)
    if plain and all(k[0] == frame and k[1] == dtype for k in kinds):
        n = sum(k[2] for k in kinds)
        if n == len(tif.pages):
            log.info("%s holds %d image series of %s %s frames; reading all %d pages as one movie",
                     url, len(kinds), frame, dtype, n)
            return (n, *frame)
    shown = "; ".join(f"series {i}: {k[3]} {k[1]}" for i, k in enumerate(kinds[:4]))
    more = f" and {len(kinds) - 4} more" if len(kinds) > 4 else ""
    raise InputError(
        f"{url} holds {len(kinds)} image series whose pages differ in size, dtype or layout ({shown}{more}); "
        "somaflow reads one movie of equal frames per file. Export the recording as one stack of "
        "equal frames (or each series to its own file)."
    )


def _open_tiff(
    url: str, so: dict[str, Any] | None, info: dict[str, Any]
) -> tuple[_TiffSource, dict[str, Any], str]:
    size = int(info.get("size") or 0)
    try:
        with _page_chain_problems() as chain, _tiff_file(url, so) as tif:
            n_pages = len(tif.pages)  # tifffile walks and checks every page directory
            series = tif.series[0]
            problem = (f"tifffile: {chain[0]} after {n_pages} pages" if chain else None) \
                or _tiff_data_problem(tif, size) or _tiff_count_problem(tif)
            if problem is not None:
                raise InputError(
                    f"{url} is a truncated or corrupt TIFF: {problem}. Re-copy or re-export the file."
                )
            compressed = int(series.keyframe.compression) != 1
            if compressed and series.dataoffset is None and len(series.pages):
                series.pages[-1].asarray()  # decode one page: catches a damaged stream early
            shape, dtype, file_axes = tuple(series.shape), series.dtype, series.axes
            if len(tif.series) > 1:
                shape, file_axes = _series_as_frames(url, tif), "TYX"
            page_frames = (
                len(shape) == 3
                and len(tif.pages) == shape[0]
                and tuple(series.keyframe.shape) == shape[1:]
            )
            fps = _tiff_fps(tif)
            pixel_size = _tiff_pixel_size(tif)
    except SomaflowError:
        raise
    except Exception as exc:  # tifffile raises many kinds on malformed files
        if stores.is_transient(exc):  # the store, not the file: exit 3, not 2
            raise stores.unavailable(url, exc) from exc
        raise InputError(
            f"cannot read {url} as a TIFF ({type(exc).__name__}: {exc}): it is a truncated or corrupt "
            "TIFF, or not a TIFF; re-copy or re-export it."
        ) from exc
    src = _TiffSource(url, so, shape, np.dtype(dtype), by_page=page_frames)
    guess = "".join(_TIFF_AXIS_LETTERS.get(a, "?") for a in file_axes)
    hint = f" (tifffile labels its axes {file_axes!r}"
    hint += (
        f", e.g. --axes {guess!r})" if len(set(guess)) == len(guess) and "?" not in guess else ")"
    )
    attrs = {"fps": fps} if fps else {}
    if pixel_size:
        attrs["pixel_size_um"] = pixel_size
    return src, attrs, hint


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
            if stores.is_transient(exc):  # the store, not the file: exit 3, not 2
                raise stores.unavailable(f, exc) from exc
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

