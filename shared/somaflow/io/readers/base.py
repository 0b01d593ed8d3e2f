"""What every reader shares: file access, frame keys, the lazy source protocol (:class:`_Source`),
axis orders and the assembly of a source into a dask-backed ``(frame, y, x)`` movie.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from somaflow.errors import InputError, ParameterError, SomaflowError, StoreError
from somaflow.io import stores
from somaflow.io.chunks import plan_frame_chunks
from somaflow.io.readers.formats import _FPS_KEYS


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
    except Exception as exc:  # drivers raise their own types (botocore, aiohttp ...)
        if stores.is_transient(exc):
            raise stores.unavailable(url, exc) from exc
        raise StoreError(
            f"cannot reach {url}: {exc}. Check the URL, credentials and endpoint."
        ) from exc


def _check_nonempty(url: str, info: dict[str, Any]) -> None:
    if info.get("type") != "directory" and int(info.get("size") or 0) == 0:
        raise InputError(f"{url} is empty (0 bytes). Check that the file was copied completely.")


def _read_error(url: str, what: str, exc: BaseException) -> SomaflowError:
    """The error for a failed read of ``url``: the store's (exit 3) when it did not answer after its
    retries (:func:`somaflow.io.stores.is_transient`), else the file's (exit 2: corrupt or truncated)."""
    if stores.is_transient(exc):
        return stores.unavailable(url, exc)
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


@dataclass(frozen=True)
class _ArraySource(_Source):
    """Any picklable, lazily indexable array (a zarr array)."""

    array: Any = None

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        return self.array[key]


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


#: largest frame an input may declare unless the caller allows more (8192 x 8192 pixels)
MAX_FRAME_PIXELS = 1 << 26


def check_declared_size(shape: tuple[int, int, int], url: str, *, memory_budget: int,
                        max_frame_pixels: int = MAX_FRAME_PIXELS) -> None:
    """Refuse a movie whose declared frame size no stage could hold, before a byte of it is read.

    A file's header may declare any shape (a 4 KB HDF5 can declare frames of
    100000 x 100000 pixels); reading a single frame of it would exhaust the
    machine. Checked on metadata only.

    Parameters
    ----------
    shape : tuple of int
        (frame, y, x) as the input declares it.
    url : str
        The input, for the message.
    memory_budget : int
        Bytes one task may use (``ingest.memory_budget``); one frame as float32
        (the stages' working type) must fit in it.
    max_frame_pixels : int
        Largest y * x accepted (``ingest.max_frame_pixels``).

    Raises
    ------
    InputError
        The frame exceeds either limit.
    """
    ny, nx = int(shape[1]), int(shape[2])
    pixels = ny * nx
    if pixels > max_frame_pixels:
        raise InputError(
            f"{url} declares frames of {ny}x{nx} pixels ({pixels:,}), above the limit of {max_frame_pixels:,} "
            "(ingest.max_frame_pixels). The file's header is corrupt, or crop the movie; for a genuine "
            "recording this large, raise ingest.max_frame_pixels in a --params file."
        )
    if pixels * 4 > memory_budget:
        raise InputError(
            f"{url} declares frames of {ny}x{nx} pixels: one frame as float32 ({pixels * 4:,} bytes) exceeds "
            f"the memory budget of {memory_budget:,} bytes per task (ingest.memory_budget). Raise "
            "ingest.memory_budget in a --params file, or crop the movie."
        )


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


#: micrometres per unit of a recorded pixel size
_LENGTH_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
                 "\\u00b5m": 1.0, "nm": 1e-3, "mm": 1e3, "m": 1e6, "meters": 1e6, "metres": 1e6}


def _pixel_size_um(value: Any, unit: str) -> float | None:
    """A positive, finite pixel side in µm from ``value`` in ``unit``; None if either is unusable."""
    scale = _LENGTH_UNITS.get(str(unit).strip().lower())
    size = _positive_fps(value)  # any positive finite number
    return size * scale if size is not None and scale is not None else None
