"""NWB files: the imaging series (TwoPhotonSeries, OnePhotonSeries, ImageSeries) as a lazy movie.
"""

from __future__ import annotations

import math
from typing import Any

import h5py
import numpy as np

from somaflow.errors import InputError, SomaflowError
from somaflow.io.readers.base import _check_dtype, _pixel_size_um, _positive_fps
from somaflow.io.readers.formats import NWB_MOVIE_TYPES
from somaflow.io.readers.hdf5 import _attr_str, _h5_file, _h5_open_error, _H5Source


def _open_nwb(
    url: str, so: dict[str, Any] | None, dataset: str | None
) -> tuple[_H5Source, dict[str, Any], str]:
    """The imaging series of an NWB file, found by pynwb (every ``ImageSeries``, which
    includes ``TwoPhotonSeries`` and ``OnePhotonSeries``), read lazily from its HDF5 dataset.

    NWB's ``ImageSeries.data`` is documented as (frames, x, y), but writers
    (Suite2p, CaImAn, most DANDI data) store rows first, i.e. (frames, y, x);
    the default axes ``tyx`` follows the writers. Pass ``axes="txy"`` for a file
    that follows the letter of the schema.
    """
    from pynwb import NWBHDF5IO  # heavy (hdmf, pandas): loaded for NWB inputs only
    from pynwb.image import ImageSeries

    try:
        with _h5_file(url, so) as f, NWBHDF5IO(file=f, mode="r", load_namespaces=True) as io:
            nwb = io.read()
            # TwoPhotonSeries and OnePhotonSeries are ImageSeries; data stored in the file has a path
            found = {o.data.name.rsplit("/", 1)[0]: o for o in nwb.objects.values()
                     if isinstance(o, ImageSeries) and isinstance(o.data, h5py.Dataset)}
            series: list[tuple[str, str, tuple[int, ...], np.dtype]] = sorted(
                (p, o.neurodata_type, tuple(o.data.shape), o.data.dtype) for p, o in found.items()
                if o.neurodata_type in NWB_MOVIE_TYPES)
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
            obj = found[path]
            if math.prod(shape) == 0 and obj.external_file is not None:
                raise InputError(
                    f"{url}: {path} keeps its frames in external files "
                    f"({[_attr_str(x) for x in obj.external_file[()]]}). Open those files instead."
                )
            attrs: dict[str, Any] = {"dataset": path + "/data", "nwb_type": ntype}
            fps = _positive_fps(obj.rate) if obj.rate is not None else None
            if fps is None and obj.timestamps is not None and len(obj.timestamps) > 1:
                ts = np.asarray(obj.timestamps[:1001], dtype=np.float64)
                step = float(np.median(np.diff(ts)))
                fps = 1.0 / step if step > 0 else None
            if fps is not None:
                attrs["fps"] = fps
            plane = getattr(obj, "imaging_plane", None)
            spacing = getattr(plane, "grid_spacing", None)
            if spacing is not None:
                unit = getattr(plane, "grid_spacing_unit", None) or "meters"
                sizes = [_pixel_size_um(v, unit) for v in np.asarray(spacing, np.float64).ravel()[:2]]
                if len(sizes) == 2 and None not in sizes and math.isclose(sizes[0], sizes[1], rel_tol=1e-3):
                    attrs["pixel_size_um"] = sizes[0]
    except SomaflowError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # not NWB, or a namespace pynwb cannot build
        raise _h5_open_error(url, exc, "NWB (HDF5)") from exc
    _check_dtype(dtype, url)
    return _H5Source(url, so, shape, np.dtype(dtype), dataset=path + "/data"), attrs, ""

