"""HDF5 files: the movie dataset (named, or the one candidate) as a lazy movie.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from somaflow.errors import InputError, SomaflowError
from somaflow.io.readers.base import _check_dtype, _fps_from_attrs, _is_local, _open_binary, _Source


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

