"""Assemble the per-stage outputs of a run into one result-schema dataset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from somaflow.footprints import footprints_from_masks
from somaflow.io.schema import make_result_dataset


def assemble_result(
    images: xr.Dataset,
    units: xr.Dataset,
    traces: xr.Dataset,
    *,
    n_frames: int,
    params: Mapping[str, Any],
    source: str,
    source_checksum: str,
    fps: float,
    modality: str,
    shifts: np.ndarray | None = None,
    extra_attrs: Mapping[str, Any] | None = None,
    pixel_size_um: float | None = None,
) -> xr.Dataset:
    """Build the result dataset of CONTRACT.md.

    Parameters
    ----------
    images : xarray.Dataset
        ``mean_image``, ``max_image``, ``correlation_image`` (y, x) and optionally
        ``std_image``, ``pnr_image``.
    units : xarray.Dataset
        ``masks`` (unit, y, x) bool, ``score`` (unit) in [0, 1], optionally
        ``accepted`` (unit) and ``footprints``.
    traces : xarray.Dataset
        ``traces``, ``dff``, ``spikes`` (unit, frame), optionally ``snr`` (unit).
    shifts : numpy.ndarray, optional
        (frame, 2) motion estimate in pixels; zeros when no motion correction ran.
    pixel_size_um : float, optional
        Pixel side in micrometres when the input recorded it.
    """
    masks = units["masks"].astype(bool)
    n = masks.sizes["unit"]
    footprints = units["footprints"] if "footprints" in units else footprints_from_masks(
        masks, images["correlation_image"]
    )
    score = units["score"] if "score" in units else xr.DataArray(np.ones(n, np.float32), dims="unit")
    accepted = units["accepted"] if "accepted" in units else xr.DataArray(np.ones(n, bool), dims="unit")
    variables: dict[str, Any] = {
        "masks": masks,
        "footprints": footprints,
        "traces": traces["traces"],
        "dff": traces["dff"],
        "spikes": traces["spikes"],
        "accepted": accepted,
        "score": score,
        "mean_image": images["mean_image"],
        "max_image": images["max_image"],
        "correlation_image": images["correlation_image"],
        "shifts": np.zeros((n_frames, 2), np.float32) if shifts is None else shifts,
    }
    for extra in ("snr",):
        if extra in traces:
            variables[extra] = traces[extra].astype(np.float32)
    for extra in ("std_image", "pnr_image"):
        if extra in images:
            variables[extra] = images[extra].astype(np.float32)
    if "cnn_score" in units:
        variables["cnn_score"] = units["cnn_score"].astype(np.float32)
    if "cnn_probability" in units:
        variables["cnn_probability"] = units["cnn_probability"].astype(np.float32)
    attrs = {"motion_corrected": shifts is not None}
    attrs.update(extra_attrs or {})
    return make_result_dataset(
        variables, params=params, source=source, source_checksum=source_checksum,
        fps=fps, modality=modality, extra_attrs=attrs, pixel_size_um=pixel_size_um,
    )

