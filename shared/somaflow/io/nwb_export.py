"""A result zarr as an NWB file (``somaflow export RESULT --nwb OUT.nwb``).

Written with pynwb, laid out the way NWB's own tools read optical physiology
(roiextractors' ``NwbSegmentationExtractor``, NWB Widgets):

* ``processing/ophys/ImageSegmentation/PlaneSegmentation`` — one row per unit:
  ``image_mask`` (the result's binary ``masks``), ``footprint`` (the spatial
  weights), ``score``, ``Accepted``, ``snr``; the ids are the result's ``unit``
  coordinate;
* ``processing/ophys/Fluorescence/Denoised`` (``traces``: denoised calcium),
  ``processing/ophys/Fluorescence/Deconvolved`` (``spikes``) and
  ``processing/ophys/DfOverF/RoiResponseSeries`` (``dff``), each a
  ``RoiResponseSeries`` (frame, unit) at the movie's frame rate;
* ``processing/ophys/SegmentationImages`` — ``mean``, ``max``, ``correlation``;
* ``processing/ophys/MotionCorrectionShifts`` — the (y, x) shift of every frame
  in pixels;
* ``general``: the device, optical channel and imaging plane, ``source_script``
  naming somaflow and its version, and ``notes`` holding the parameters and
  provenance as JSON.

NWB orders image axes (x, y) ("num_x, num_y"): masks and images are written
transposed, as roiextractors expects, so it reads them back as (y, x).

What the result does not know (acquisition time, subject, indicator, brain
area, wavelengths) comes from an optional metadata YAML
(:class:`NwbMetadata`); without it wavelengths are NaN and names "unknown".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from somaflow import __version__
from somaflow.errors import InputError, ParameterError, StoreError
from somaflow.io import schema, stores
from somaflow.io.config import read_yaml

#: name of the processing module NWB tools look in
OPHYS = "ophys"
#: units per block when masks and footprints are streamed into the file
_BLOCK_UNITS = 64


class SubjectMetadata(BaseModel):
    """NWB ``Subject``: who was imaged (all optional)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    subject_id: str | None = Field(None, description="the lab's id of the animal")
    species: str | None = Field(None, description="Latin binomial, e.g. Mus musculus")
    sex: str | None = Field(None, description="M, F, U or O")
    age: str | None = Field(None, description="ISO 8601 duration, e.g. P90D")
    description: str | None = Field(None, description="free text")


class NwbMetadata(BaseModel):
    """What an NWB file records that a somaflow result does not know.

    Every field is optional; give them in a YAML file (``export --metadata``)::

        session_start_time: 2024-05-02T10:31:00+02:00
        experimenter: ["Doe, Jane"]
        institution: Example University
        subject: {subject_id: m12, species: Mus musculus, sex: F, age: P90D}
        imaging_plane: {indicator: GCaMP6s, location: VISp, excitation_lambda: 920}
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    session_description: str | None = Field(None, description="default: what somaflow ran on which source")
    experiment_description: str | None = None
    session_start_time: dt.datetime | None = Field(
        None, description="acquisition start (default: when the result was written, or now)")
    identifier: str | None = Field(None, description="default: derived from the source checksum and parameters")
    experimenter: list[str] = Field(default_factory=list, description="people who did the experiment")
    institution: str | None = None
    lab: str | None = None
    keywords: list[str] = Field(default_factory=lambda: ["calcium imaging", "segmentation"])
    subject: SubjectMetadata | None = None
    device: dict[str, str] = Field(default_factory=dict,
                                   description="name, description, manufacturer of the microscope")
    indicator: str = Field("unknown", description="calcium indicator, e.g. GCaMP6s")
    location: str = Field("unknown", description="brain area imaged")
    excitation_lambda: float = Field(float("nan"), description="nm; NaN when unknown")
    emission_lambda: float = Field(float("nan"), description="nm; NaN when unknown")

    @classmethod
    def from_yaml(cls, url: str | None) -> NwbMetadata:
        """Read a metadata YAML (an ``imaging_plane:`` mapping is flattened).

        Raises
        ------
        InputError
            The file is missing or not YAML.
        ParameterError
            Unknown keys or bad values.
        """
        if url is None:
            return cls()
        data = read_yaml(url, "NWB metadata file")
        if not isinstance(data, dict):
            raise InputError(f"NWB metadata file {url} must hold a mapping (session_start_time: ..., subject: ...).")
        plane = data.pop("imaging_plane", None) or {}
        if not isinstance(plane, dict):
            raise InputError(f"NWB metadata file {url}: imaging_plane must be a mapping (indicator: ..., location: ...).")
        data = {**data, **plane}
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ParameterError(f"bad NWB metadata {where}: {first['msg']}. Fix it in {url}.") from exc


def _start_time(ds: xr.Dataset, meta: NwbMetadata) -> dt.datetime:
    t = meta.session_start_time
    if t is None:
        created = ds.attrs.get("created")
        t = dt.datetime.fromisoformat(created) if created else dt.datetime.now(dt.timezone.utc)
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _identifier(ds: xr.Dataset) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(str(ds.attrs.get("source_checksum", "")).encode())
    h.update(str(ds.attrs.get("params", "")).encode())
    return f"somaflow-{h.hexdigest()}"


def _unit_blocks(arr: xr.DataArray, dtype: type) -> Iterator[np.ndarray]:
    """(x, y) planes of a (unit, y, x) array, one unit at a time, read in blocks."""
    n = arr.sizes["unit"]
    for lo in range(0, n, _BLOCK_UNITS):
        block = np.asarray(arr.isel(unit=slice(lo, lo + _BLOCK_UNITS)).values, dtype=dtype)
        yield from np.ascontiguousarray(block.transpose(0, 2, 1))


def _streamed(arr: xr.DataArray, dtype: type) -> Any:
    """A gzip-compressed dataset filled one unit at a time (no dense copy of the stack)."""
    from hdmf.backends.hdf5 import H5DataIO
    from hdmf.data_utils import DataChunkIterator

    n, ny, nx = (arr.sizes[d] for d in ("unit", "y", "x"))
    it = DataChunkIterator(data=_unit_blocks(arr, dtype), maxshape=(n, nx, ny), dtype=np.dtype(dtype),
                           buffer_size=_BLOCK_UNITS)
    return H5DataIO(it, compression="gzip", chunks=(1, nx, ny))


def build_nwbfile(ds: xr.Dataset, meta: NwbMetadata | None = None) -> Any:
    """The NWB file of a result (see the module docstring), not yet written.

    Parameters
    ----------
    ds : xarray.Dataset
        A complete result (``somaflow.io.schema``), lazily opened is fine.
    meta : NwbMetadata, optional

    Returns
    -------
    pynwb.NWBFile
        Masks and footprints are streamed from ``ds`` when the file is written.
    """
    from hdmf.backends.hdf5 import H5DataIO
    from hdmf.common import VectorData
    from pynwb import NWBFile, TimeSeries
    from pynwb.base import Images
    from pynwb.file import Subject
    from pynwb.image import GrayscaleImage
    from pynwb.ophys import (
        DfOverF,
        Fluorescence,
        ImageSegmentation,
        OpticalChannel,
        PlaneSegmentation,
        RoiResponseSeries,
    )

    meta = meta or NwbMetadata()
    a = ds.attrs
    fps = float(a["fps"])
    method = a.get("method", json.loads(a.get("params", "{}")).get("method", "somaflow"))
    n = int(ds.sizes["unit"])
    provenance = a.get("provenance")
    nwb = NWBFile(
        session_description=meta.session_description
        or f"{a['modality']} calcium imaging, segmented by somaflow ({method}) from {a['source']}",
        identifier=meta.identifier or _identifier(ds),
        session_start_time=_start_time(ds, meta),
        experiment_description=meta.experiment_description,
        experimenter=meta.experimenter or None,
        institution=meta.institution,
        lab=meta.lab,
        keywords=meta.keywords or None,
        source_script=f"somaflow {a.get('somaflow_version', __version__)} (somaflow run; exported by "
                      f"somaflow {__version__})",
        source_script_file_name="somaflow",
        notes=json.dumps({"params": json.loads(a.get("params", "{}")),
                          "provenance": provenance if isinstance(provenance, dict) else None,
                          "source": a["source"], "source_checksum": a["source_checksum"],
                          "ood_warnings": json.loads(a.get("ood_warnings", "[]") or "[]")},
                         default=str),
        subject=Subject(**meta.subject.model_dump(exclude_none=True)) if meta.subject else None,
    )
    dev = {"name": "Microscope", "description": f"{a['modality']} microscope (not recorded by somaflow)",
           **meta.device}
    device = nwb.create_device(**dev)
    channel = OpticalChannel(name="OpticalChannel", description="the movie's channel",
                             emission_lambda=meta.emission_lambda)
    plane = nwb.create_imaging_plane(
        name="ImagingPlane", optical_channel=channel, imaging_rate=fps, device=device,
        description=f"the field of view of {a['source']} ({ds.sizes['y']} x {ds.sizes['x']} pixels)",
        excitation_lambda=meta.excitation_lambda, indicator=meta.indicator, location=meta.location,
        **({"grid_spacing": [a["pixel_size_um"] * 1e-6] * 2, "grid_spacing_unit": "meters"}
           if "pixel_size_um" in a else {}),
    )
    ophys = nwb.create_processing_module(OPHYS, f"optical physiology processed by somaflow ({method})")

    columns = [
        VectorData(name="image_mask", description="the unit's binary mask (x, y), as the result's masks",
                   data=_streamed(ds["masks"], bool)),
        VectorData(name="footprint", description="the unit's spatial footprint (x, y): weights, max 1",
                   data=_streamed(ds["footprints"], np.float32)),
        VectorData(name="score", description="confidence that the unit is a neuron, in [0, 1]",
                   data=np.asarray(ds["score"].values, np.float32)),
        VectorData(name="Accepted", description="final verdict of somaflow (classifier and quality tests)",
                   data=np.asarray(ds["accepted"].values, bool)),
    ]
    if "snr" in ds:
        columns.append(VectorData(name="snr", description="signal-to-noise ratio of the unit's trace",
                                  data=np.asarray(ds["snr"].values, np.float32)))
    ids = np.asarray(ds["unit"].values if "unit" in ds.coords else np.arange(n), np.int64)
    seg = PlaneSegmentation(name="PlaneSegmentation", imaging_plane=plane, id=ids, columns=columns,
                            description=f"somaflow units ({method}); ids are the result's unit ids")
    ophys.add(ImageSegmentation(name="ImageSegmentation", plane_segmentations=[seg]))

    def series(container: Any, name: str, var: str, unit: str, description: str) -> None:
        rois = seg.create_roi_table_region(region=list(range(n)), description="every unit of the result")
        data = np.ascontiguousarray(np.asarray(ds[var].values, np.float32).T)
        container.add_roi_response_series(RoiResponseSeries(
            name=name, data=H5DataIO(data, compression="gzip"), rois=rois, unit=unit, rate=fps,
            starting_time=0.0, description=description))

    fluorescence = ophys.add(Fluorescence(name="Fluorescence"))
    series(fluorescence, "Denoised", "traces", "a.u.", "denoised calcium activity (the result's traces)")
    series(fluorescence, "Deconvolved", "spikes", "a.u.", "deconvolved activity (the result's spikes)")
    dff = ophys.add(DfOverF(name="DfOverF"))
    series(dff, "RoiResponseSeries", "dff", "n.a.", "dF/F (the result's dff), dimensionless")
    images = [GrayscaleImage(name=name, data=np.asarray(ds[f"{name}_image"].values, np.float32).T,
                             description=f"{name} image of the motion-corrected movie (x, y)")
              for name in ("mean", "max", "correlation")]
    ophys.add(Images(name="SegmentationImages", images=images,
                     description="summary images somaflow segmented"))
    mode = a.get("motion_mode", "unknown")
    ophys.add(TimeSeries(
        name="MotionCorrectionShifts", data=np.asarray(ds["shifts"].values, np.float32), unit="pixels",
        rate=fps, starting_time=0.0,
        description=f"estimated (y, x) displacement of each frame, pixels (motion model: {mode}); "
                    "masks and images are in the motion-corrected frame"))
    return nwb


def export_nwb(result_url: str, out: str, *, metadata: NwbMetadata | None = None,
               overwrite: bool = False) -> str:
    """Write a complete result as an NWB file (atomically: temporary name, then moved).

    Parameters
    ----------
    result_url : str
        A complete result zarr.
    out : str
        The ``.nwb`` file to write (local path or fsspec URL).
    metadata : NwbMetadata, optional
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    str
        The normalized URL written.

    Raises
    ------
    IncompleteResultError
        The result is unfinished.
    ResultExistsError
        ``out`` exists and ``overwrite`` is False.
    """
    from pynwb import NWBHDF5IO

    ds = schema.open_result(result_url)
    nwb = build_nwbfile(ds, metadata)
    out = stores.normalize_url(out)
    local = stores.protocol_of(out) == "file"
    with stores.atomic_output(out, overwrite=overwrite) as tmp, \
            tempfile.TemporaryDirectory(dir=os.path.dirname(out) if local else None) as scratch:
        path = os.path.join(scratch, stores.basename(out))  # pynwb wants the .nwb suffix
        try:
            with NWBHDF5IO(path, "w") as io:
                io.write(nwb)
        except OSError as exc:
            raise StoreError(f"cannot write {out}: {exc}") from exc
        if local:
            os.replace(path, tmp)
        else:
            fs, remote = stores.filesystem(tmp)
            fs.put(path, remote)
    return out
