"""``write_simulation``: movie.tif + ground_truth.zarr + meta.json, streamed chunk by chunk."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tifffile

from somaflow.errors import ResultExistsError, StoreError
from somaflow.io import schema, stores
from somaflow.simulate.footprints import Patch, dense_stack
from somaflow.simulate.model import Simulation
from somaflow.simulate.render import BLOCK
from somaflow.simulate.stream import iter_movie_chunks

log = logging.getLogger(__name__)

#: above this size the TIFF is written as BigTIFF (plain, not ImageJ)
BIGTIFF_BYTES = 2 * 1024**3
#: units per chunk of the ground-truth footprints and masks
UNIT_CHUNK = 64


class SummaryAccumulator:
    """Streaming mean, max and 4-neighbour correlation images of a movie.

    Feed (frame, y, x) chunks in order with :meth:`update`; read the images with
    :meth:`images`. Sums are kept in float64 around the first chunk's mean, so
    memory is a handful of (y, x) arrays whatever the movie's length.
    """

    def __init__(self) -> None:
        self.n = 0
        self.ref: np.ndarray | None = None
        self.max: np.ndarray | None = None

    def update(self, chunk: np.ndarray) -> None:
        """Add a (frame, y, x) chunk (processed :data:`BLOCK` frames at a time)."""
        for start in range(0, chunk.shape[0], BLOCK):
            self._update(chunk[start : start + BLOCK])

    def _update(self, chunk: np.ndarray) -> None:
        x = chunk.astype(np.float64)
        if self.ref is None:
            self.ref = x.mean(axis=0)
            self.s = np.zeros_like(self.ref)
            self.ss = np.zeros_like(self.ref)
            self.sdown = np.zeros_like(self.ref[:-1, :])
            self.sright = np.zeros_like(self.ref[:, :-1])
            self.max = x.max(axis=0)
        else:
            np.maximum(self.max, x.max(axis=0), out=self.max)
        x -= self.ref
        self.n += x.shape[0]
        self.s += x.sum(axis=0)
        self.ss += np.einsum("tyx,tyx->yx", x, x)
        self.sdown += np.einsum("tyx,tyx->yx", x[:, :-1, :], x[:, 1:, :])
        self.sright += np.einsum("tyx,tyx->yx", x[:, :, :-1], x[:, :, 1:])

    def images(self) -> dict[str, np.ndarray]:
        """``mean_image``, ``max_image``, ``correlation_image``, each (y, x) float32."""
        if self.ref is None or self.max is None:
            raise ValueError("no frames were added")
        n = self.n
        mean = self.s / n
        var = np.maximum(self.ss / n - mean**2, 0.0)
        sd = np.sqrt(var)
        with np.errstate(divide="ignore", invalid="ignore"):
            cov_d = self.sdown / n - mean[:-1, :] * mean[1:, :]
            cov_r = self.sright / n - mean[:, :-1] * mean[:, 1:]
            corr_d = np.nan_to_num(cov_d / (sd[:-1, :] * sd[1:, :]))
            corr_r = np.nan_to_num(cov_r / (sd[:, :-1] * sd[:, 1:]))
        total = np.zeros_like(mean)
        count = np.zeros_like(mean)
        total[:-1, :] += corr_d
        total[1:, :] += corr_d
        total[:, :-1] += corr_r
        total[:, 1:] += corr_r
        count[:-1, :] += 1
        count[1:, :] += 1
        count[:, :-1] += 1
        count[:, 1:] += 1
        return {
            "mean_image": (mean + self.ref).astype(np.float32),
            "max_image": self.max.astype(np.float32),
            "correlation_image": (total / np.maximum(count, 1)).astype(np.float32),
        }


class _PatchStack:
    """A lazily densified (unit, y, x) stack of patches, indexable like an array (for dask)."""

    def __init__(self, patches: list[Patch], shape: tuple[int, int], dtype: Any) -> None:
        self.patches = patches
        self.shape = (len(patches), *shape)
        self.dtype = np.dtype(dtype)
        self.ndim = 3

    def __getitem__(self, key: tuple[slice, slice, slice]) -> np.ndarray:
        units, ys, xs = key
        dense = dense_stack(self.patches[units], self.shape[1:], self.dtype)
        return dense[:, ys, xs]


def _lazy_stack(patches: list[Patch], shape: tuple[int, int], dtype: Any) -> Any:
    import dask.array as da

    stack = _PatchStack(patches, shape, dtype)
    chunks = (max(1, min(UNIT_CHUNK, len(patches))), *shape)
    return da.from_array(stack, chunks=chunks, asarray=True, fancy=False, name=False)


def _write_tiff(sim: Simulation, fh: Any, frames_per_chunk: int, acc: SummaryAccumulator) -> None:
    p = sim.params
    big = p.movie_nbytes > BIGTIFF_BYTES

    def frames() -> Iterator[np.ndarray]:
        for chunk in iter_movie_chunks(sim, frames_per_chunk=frames_per_chunk):
            acc.update(chunk)
            yield from chunk

    shape = (p.n_frames, *p.shape)
    if big:
        meta = {"axes": "TYX", "fps": p.fps, "modality": p.modality, "source": f"simulate:{p.name}:{sim.seed}"}
        with tifffile.TiffWriter(fh, bigtiff=True) as tw:
            tw.write(frames(), shape=shape, dtype=np.uint16, metadata=meta, contiguous=True)
    else:
        meta = {"axes": "TYX", "fps": p.fps, "finterval": 1.0 / p.fps, "unit": "pixel"}
        with tifffile.TiffWriter(fh, imagej=True) as tw:
            tw.write(frames(), shape=shape, dtype=np.uint16, metadata=meta, contiguous=True)


@contextlib.contextmanager
def _seekable_writer(url: str) -> Iterator[Any]:
    """A seekable binary file that ends up at ``url`` (spooled locally for object stores)."""
    fs, path = stores.filesystem(url)
    with fs.open(path, "wb") as fh:
        if fh.seekable():
            yield fh
            return
        with tempfile.TemporaryDirectory(prefix="somaflow-sim-") as tmp:
            local = os.path.join(tmp, "movie.tif")
            with open(local, "wb") as lf:
                yield lf
            with open(local, "rb") as lf:
                shutil.copyfileobj(lf, fh, length=8 << 20)


def _ground_truth(sim: Simulation, images: dict[str, np.ndarray], source: str, checksum: str) -> Any:
    p = sim.params
    n = sim.n_units
    variables: dict[str, Any] = {
        "masks": _lazy_stack(sim.truth.masks, p.shape, bool),
        "footprints": _lazy_stack(sim.truth.footprints, p.shape, np.float32),
        "traces": (sim.baseline[:, None] * sim.calcium).astype(np.float32),
        "dff": sim.calcium.astype(np.float32),
        "spikes": sim.spikes.astype(np.float32),
        "accepted": np.ones(n, dtype=bool),
        "score": np.ones(n, dtype=np.float32),
        "shifts": sim.shifts.astype(np.float32),
        **images,
        "snr": (("unit",), sim.snr.astype(np.float32)),
        "active": (("unit",), sim.active),
        "doughnut": (("unit",), sim.doughnut),
        "baseline": (("unit",), sim.baseline.astype(np.float32)),
        "centers": (("unit", "axis"), sim.centers.astype(np.float32)),
        "ar_coefficients": (("unit", "lag"), sim.ar_coefficients.astype(np.float32)),
    }
    if sim.patch_shifts is not None:
        variables["patch_shifts"] = (("frame", "patch_y", "patch_x", "axis"), sim.patch_shifts)
    ds = schema.make_result_dataset(
        variables,
        params=sim.meta,
        source=source,
        source_checksum=checksum,
        fps=p.fps,
        modality=p.modality,
        extra_attrs={"ground_truth": True, "neuron_radius": float(p.neuron_radius)},
    )
    if sim.patch_shifts is not None:
        centers = sim.scene.motion.patch_centers
        ds = ds.assign_coords(patch_y=centers[0], patch_x=centers[1])
    return ds


def write_simulation(
    sim: Simulation,
    out_dir: str,
    *,
    overwrite: bool = False,
    frames_per_chunk: int = 4 * BLOCK,
) -> None:
    """Write a simulation to ``out_dir`` with bounded memory.

    Creates, atomically (under a temporary name moved into place at the end):

    * ``movie.tif`` — uint16 (frame, y, x); ImageJ hyperstack with ``fps`` and
      ``finterval`` when up to 2 GiB, otherwise BigTIFF with the JSON description
      ``{"axes": "TYX", "fps": ...}``; streamed ``frames_per_chunk`` frames at a time.
    * ``ground_truth.zarr`` — the result schema: true ``masks``, ``footprints``,
      ``traces`` (baseline x dF/F, photons/pixel/frame at the footprint max),
      ``dff`` (dF/F calcium), ``spikes`` (counts per frame), ``accepted`` = True and
      ``score`` = 1 for every cell (silent ones included: they are real cells),
      ``mean_image`` / ``max_image`` / ``correlation_image`` of the movie, true
      ``shifts``; plus ``snr``, ``active``, ``doughnut``, ``baseline``, ``centers``,
      ``ar_coefficients`` and, for non-rigid motion, ``patch_shifts``
      (frame, patch_y, patch_x, axis). ``source`` is ``"simulate:PRESET:SEED"`` and
      ``source_checksum`` that of ``movie.tif``.
    * ``meta.json`` — ``sim.meta`` (fps, modality, neuron_radius, preset, seed,
      shape, n_units, conventions, params).

    Parameters
    ----------
    sim : Simulation
    out_dir : str
        Local path or fsspec URL (``memory://``, ``s3://`` ...).
    overwrite : bool
        Replace an existing non-empty ``out_dir``.
    frames_per_chunk : int
        Frames rendered and written at a time.

    Raises
    ------
    ResultExistsError
        ``out_dir`` exists, is not an empty directory, and ``overwrite`` is False;
        nothing is written.
    StoreError
        The destination cannot be written.
    """
    url = stores.normalize_url(out_dir)
    fs, path = stores.filesystem(url)
    if fs.exists(path):
        empty = fs.isdir(path) and not fs.ls(path, detail=False)
        if not empty and not overwrite:
            raise ResultExistsError(
                f"{url} already exists and is not empty. Pass overwrite=True (--overwrite) to replace it, "
                "or choose another output directory."
            )
        if empty:
            fs.rm(path, recursive=True)
    p = sim.params
    source = f"simulate:{p.name}:{sim.seed}"
    try:
        with stores.atomic_output(url, overwrite=overwrite) as tmp:
            tfs, tpath = stores.filesystem(tmp)
            tfs.makedirs(tpath, exist_ok=True)
            movie_url = stores.join(tmp, "movie.tif")
            acc = SummaryAccumulator()
            with _seekable_writer(movie_url) as fh:
                _write_tiff(sim, fh, frames_per_chunk, acc)
            checksum = stores.checksum(movie_url)
            ds = _ground_truth(sim, acc.images(), source, checksum)
            schema.write_result(ds, stores.join(tmp, "ground_truth.zarr"))
            with tfs.open(stores.filesystem(stores.join(tmp, "meta.json"))[1], "w") as f:
                json.dump({**sim.meta, "source": source, "source_checksum": checksum}, f, indent=2)
    except OSError as exc:
        raise StoreError(f"cannot write the simulation to {url!r}: {exc}. Check the path and permissions.") from exc
    log.info("wrote simulation %s (seed %d) to %s", p.name, sim.seed, url)
