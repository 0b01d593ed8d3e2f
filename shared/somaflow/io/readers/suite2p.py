"""Suite2p's registered binary (``data.bin`` with its ``ops.npy``) as a lazy movie; ``ops.npy``
read without executing code (:func:`load_suite2p_ops`).
"""

from __future__ import annotations

import logging
import math
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np

from somaflow.errors import InputError, SomaflowError
from somaflow.io import stores
from somaflow.io.readers.base import (
    _check_nonempty,
    _file_info,
    _frame_range,
    _is_local,
    _open_binary,
    _positive_fps,
    _Source,
)

log = logging.getLogger(__name__)


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

