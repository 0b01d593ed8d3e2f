"""The preprocessing chain of ``somaflow run``: which filters run, in which order.

Two movies come out of preprocessing:

* the **corrected movie** — motion-corrected, full frame rate, in the input's
  pixel grid; the run stores it (``RESULT.work/corrected.zarr``) and traces are
  read from it;
* the **detection movie** — the corrected movie binned to a target rate,
  background-removed (homomorphic filter for 2p, morphological opening for 1p)
  and, for 1p, Perona–Malik denoised; summary images and detectors read it. It
  is lazy and never stored: it is recomputed from the corrected movie.
"""

from __future__ import annotations

from typing import Literal

import xarray as xr
from pydantic import BaseModel, ConfigDict, Field

from somaflow.preprocess.filters import (
    HomomorphicParams,
    MorphParams,
    PeronaMalikParams,
    homomorphic,
    morphological_background,
    perona_malik,
)
from somaflow.preprocess.motion import MotionParams
from somaflow.preprocess.temporal import BinParams, bin_frames


class PreprocessParams(BaseModel):
    """Parameters of the preprocessing chain (each stage keeps its own model)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    motion: MotionParams
    binning: BinParams
    background: Literal["none", "homomorphic", "morphological"] = Field(
        "none", description="background removal of the detection movie"
    )
    homomorphic: HomomorphicParams
    morphological: MorphParams
    denoise: bool = Field(False, description="Perona-Malik denoising of the detection movie")
    perona_malik: PeronaMalikParams
    trace_background: bool = Field(
        False, description="read traces from the background-removed movie (1p)"
    )

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float,
                  shape: tuple[int, ...]) -> PreprocessParams:
        """Defaults: 2p — motion ``mode: auto`` (rigid, or piecewise when the
        movie's non-rigid deviation exceeds 0.4 px: piecewise took ~4x the
        rigid motion stage at 512x512) and binning to 6 Hz for detection; 1p — rigid
        motion correction (a high-passed 1p patch holds little texture);
        1p — high-passed motion matching, morphological background removal and
        Perona–Malik denoising, traces from the background-removed movie."""
        one_p = modality == "1p"
        return cls(
            motion=MotionParams.for_movie(fps, modality, neuron_radius, shape, mode="rigid" if one_p else "auto"),
            binning=BinParams.for_movie(fps, modality, neuron_radius),
            background="morphological" if one_p else "none",
            homomorphic=HomomorphicParams.for_movie(fps, modality, neuron_radius),
            morphological=MorphParams.for_movie(fps, modality, neuron_radius),
            denoise=one_p,
            perona_malik=PeronaMalikParams.for_movie(fps, modality, neuron_radius),
            trace_background=one_p,
        )


def remove_background(movie: xr.DataArray, p: PreprocessParams) -> xr.DataArray:
    """The configured background removal of ``movie`` (lazy, float32)."""
    if p.background == "homomorphic":
        return homomorphic(movie, p.homomorphic)
    if p.background == "morphological":
        return morphological_background(movie, p.morphological)
    return movie


def detection_movie(corrected: xr.DataArray, p: PreprocessParams) -> xr.DataArray:
    """Binned, background-removed, optionally denoised movie for detection.

    Parameters
    ----------
    corrected : xarray.DataArray
        (frame, y, x) motion-corrected movie with an ``fps`` attr.

    Returns
    -------
    xarray.DataArray
        (frame', y, x) float32, lazy; frame' = frame // bin factor.
    """
    movie = bin_frames(corrected, p.binning) if p.binning.factor(corrected.attrs["fps"]) > 1 else corrected
    movie = remove_background(movie, p)
    if p.denoise:
        movie = perona_malik(movie, p.perona_malik)
    return movie


def trace_movie(corrected: xr.DataArray, p: PreprocessParams) -> xr.DataArray:
    """The movie traces are read from: the corrected movie, or for 1p its
    background-removed version (full frame rate, lazy)."""
    if p.trace_background:
        return remove_background(corrected, p)
    return corrected
