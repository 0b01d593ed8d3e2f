"""Run-level parameters: one frozen model per stage, grouped for ``somaflow run``.

Defaults derive from the movie's frame rate, modality and neuron radius
(``RunParams.for_movie``); a YAML file (``--params``) overrides any field::

    preprocess:
      motion: {mode: rigid, max_shift: 15}
    detect:
      min_area_fraction: 0.3
    traces:
      neuropil_coefficient: 0.6
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from somaflow.classify.cnet import ClassifyParams
from somaflow.detect.cnn import CnnParams
from somaflow.detect.local_maxima import LocalMaximaParams
from somaflow.errors import ParameterError
from somaflow.extract import METHODS
from somaflow.extract.cnmf import CnmfParams
from somaflow.extract.pca_ica import PcaIcaParams
from somaflow.io.config import merge_overrides
from somaflow.preprocess.pipeline import PreprocessParams
from somaflow.preprocess.summary import SummaryParams
from somaflow.traces import TraceParams

#: default neuron radius in pixels by modality, when the user gives none
DEFAULT_NEURON_RADIUS = {"2p": 5.0, "1p": 6.0}


class IngestParams(BaseModel):
    """How inputs are read and chunked."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_budget: int = Field(256 << 20, gt=0, description="bytes per frame chunk in flight")
    dataset: str | None = Field(None, description="HDF5/zarr array path inside the input")
    axes: str = Field("tyx", description="axis order of the input, e.g. tyx or yxt")


class RunParams(BaseModel):
    """Every parameter of one ``somaflow run``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fps: float = Field(gt=0, description="frame rate of the input movie (Hz)")
    modality: str = Field(pattern="^(2p|1p)$")
    neuron_radius: float = Field(gt=0, description="typical soma radius (pixels)")
    method: str = Field("cnmf", description="source extraction method (somaflow.extract.METHODS; the first is the default)")
    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams
    summary: SummaryParams
    detect: LocalMaximaParams
    cnmf: CnmfParams
    pca_ica: PcaIcaParams
    cnn: CnnParams
    classify: ClassifyParams = ClassifyParams()
    traces: TraceParams

    @classmethod
    def for_movie(
        cls,
        fps: float,
        modality: str,
        neuron_radius: float | None = None,
        overrides: dict[str, Any] | None = None,
        shape: tuple[int, int, int] = (1000, 512, 512),
    ) -> RunParams:
        """Defaults derived from the movie, then ``overrides`` (nested dict) applied.

        ``shape`` (frame, y, x) sizes the motion-correction patches.

        Raises
        ------
        ParameterError
            Unknown keys or invalid values in ``overrides``.
        """
        r = float(neuron_radius or DEFAULT_NEURON_RADIUS.get(modality, 5.0))
        base: dict[str, Any] = {
            "fps": fps,
            "modality": modality,
            "neuron_radius": r,
            "method": METHODS[0],
            "ingest": IngestParams().model_dump(),
            "preprocess": PreprocessParams.for_movie(fps, modality, r, shape).model_dump(),
            "summary": SummaryParams.for_movie(fps, modality, r).model_dump(),
            "detect": LocalMaximaParams.for_movie(fps, modality, r).model_dump(),
            "cnmf": CnmfParams.for_movie(fps, modality, r).model_dump(),
            "pca_ica": PcaIcaParams.for_movie(fps, modality, r).model_dump(),
            "cnn": CnnParams.for_movie(fps, modality, r).model_dump(),
            "classify": ClassifyParams().model_dump(),
            "traces": TraceParams.for_movie(fps, modality, r).model_dump(),
        }
        merged = merge_overrides(base, overrides or {})
        if merged.get("method") not in METHODS:
            raise ParameterError(f"bad parameter method: {merged.get('method')!r} is not one of "
                                 f"{', '.join(METHODS)}. Fix it in --method or the --params file.")
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ParameterError(f"bad parameter {where}: {first['msg']}. Fix it in the --params file.") from exc
