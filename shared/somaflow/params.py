"""Run-level parameters: one frozen model per stage, grouped for ``somaflow run``.

Defaults derive from the movie's frame rate, modality and neuron radius
(``RunParams.for_movie``); a YAML file (``--params``) overrides any field::

    neuron_radius: 6
    preprocess:
      motion: {mode: rigid, max_shift: 15}
    extract:
      method: cnmf
      cnmf: {min_snr: 2.5}
    traces:
      neuropil_coefficient: 0.6

``fps``, ``modality`` and ``neuron_radius`` have one home, the top level
(:class:`MovieParams`), validated once; the stage models that need them get
them from there, and a run's parameters (and stage hashes) hold them once.
The extraction parameters are a tagged union on ``extract.method``
(:data:`ExtractParams`): a run carries, and hashes, only the parameters of the
method it uses. Files written for the earlier layout (top-level ``method``,
``cnmf``, ``detect``, ``cnn``, ``pca_ica``) still load: their sections move
under ``extract`` when they belong to the chosen method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_serializer,
    model_validator,
)

from somaflow.classify.cnet import ClassifyParams
from somaflow.detect.cnn import CnnParams
from somaflow.detect.local_maxima import LocalMaximaParams
from somaflow.errors import ParameterError
from somaflow.extract import DETECTORS, METHODS
from somaflow.extract.cnmf import CnmfParams
from somaflow.extract.pca_ica import PcaIcaParams
from somaflow.io.config import MAX_FPS, MAX_NEURON_RADIUS, check_movie_values, merge_overrides  # noqa: F401
from somaflow.io.readers.base import MAX_FRAME_PIXELS
from somaflow.preprocess.pipeline import PreprocessParams
from somaflow.preprocess.summary import SummaryParams
from somaflow.traces import TraceParams

#: default neuron radius in pixels by modality, when the user gives none
DEFAULT_NEURON_RADIUS = {"2p": 5.0, "1p": 6.0}
#: the movie-level values every stage model that declares them takes from the top level
MOVIE_KEYS = ("fps", "neuron_radius")
#: where a run's CNNs run (``--inference``): a run-level choice, pushed into every model that
#: calls one (detectors, classifier, LSTM seed cleansing); kept out of dumps and stage hashes,
#: so a run started locally resumes against the inference service and back
INFERENCE_KEY = "inference"

Modality = Literal["2p", "1p"]
Method = Literal[METHODS]  # type: ignore[valid-type]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestParams(_Frozen):
    """How inputs are read and chunked."""

    memory_budget: int = Field(256 << 20, gt=0, description="bytes per frame chunk in flight")
    max_frame_pixels: int = Field(MAX_FRAME_PIXELS, gt=0,
                                  description="largest frame (y * x pixels) an input may declare; checked "
                                              "before anything is read")
    dataset: str | None = Field(None, description="HDF5/zarr array path inside the input")
    axes: str = Field("tyx", description="axis order of the input, e.g. tyx or yxt")


class MovieParams(_Frozen):
    """What every stage needs to know of the movie: the one home of these three values."""

    fps: float = Field(gt=0, le=MAX_FPS, allow_inf_nan=False, description="frame rate of the input movie (Hz)")
    modality: Modality = Field(description="imaging modality: 2p (two-photon) or 1p (one-photon)")
    neuron_radius: float = Field(gt=0, le=MAX_NEURON_RADIUS, allow_inf_nan=False,
                                 description="typical soma radius (pixels)")


class CnmfExtract(_Frozen):
    """``method: cnmf``: CNMF, and the anatomical detectors of its morphology units."""

    method: Literal["cnmf"] = "cnmf"
    cnmf: CnmfParams
    detect: LocalMaximaParams = Field(description="local maxima (cnmf.morphology local-maxima or its fall-back)")
    cnn: CnnParams = Field(description="the CNN detector of cnmf.morphology")


class LocalMaximaExtract(_Frozen):
    """``method: local-maxima``: units at local maxima of the summary images."""

    method: Literal["local-maxima"] = "local-maxima"
    detect: LocalMaximaParams


class PcaIcaExtract(_Frozen):
    """``method: pca-ica``: PCA/ICA (Mukamel et al. 2009)."""

    method: Literal["pca-ica"] = "pca-ica"
    pca_ica: PcaIcaParams


class CnnExtract(_Frozen):
    """``method`` one of the CNN detectors (somaflow.detect.cnn)."""

    method: Literal[DETECTORS]  # type: ignore[valid-type]
    cnn: CnnParams


#: the extraction parameters of a run: only the chosen method's
ExtractParams = Annotated[CnmfExtract | LocalMaximaExtract | PcaIcaExtract | CnnExtract,
                          Field(discriminator="method")]

#: the parameter sections each method reads (the fields of its ExtractParams member)
METHOD_SECTIONS: dict[str, tuple[str, ...]] = {
    "cnmf": ("cnmf", "detect", "cnn"),
    "local-maxima": ("detect",),
    "pca-ica": ("pca_ica",),
    **{d: ("cnn",) for d in DETECTORS},
}
_SECTION_DEFAULTS = {"cnmf": CnmfParams, "detect": LocalMaximaParams, "cnn": CnnParams, "pca_ica": PcaIcaParams}


def extract_defaults(method: str, fps: float, modality: str, neuron_radius: float) -> dict[str, Any]:
    """The default extraction parameters of ``method`` for a movie (a plain mapping)."""
    return {"method": method, **{s: _SECTION_DEFAULTS[s].for_movie(fps, modality, neuron_radius).model_dump()
                                 for s in METHOD_SECTIONS[method]}}


class RunParams(MovieParams):
    """Every parameter of one ``somaflow run``."""

    ingest: IngestParams = IngestParams()
    preprocess: PreprocessParams
    summary: SummaryParams
    extract: ExtractParams
    classify: ClassifyParams = ClassifyParams()
    traces: TraceParams

    @property
    def method(self) -> str:
        """The source extraction method (``extract.method``)."""
        return self.extract.method

    @model_validator(mode="before")
    @classmethod
    def _movie_values_have_one_home(cls, data: Any) -> Any:
        """Fill every stage model's ``fps``/``neuron_radius`` from the top level; refuse a
        stage-level value that differs from it."""
        if not isinstance(data, Mapping) or any(k not in data for k in MOVIE_KEYS):
            return data
        values = {k: data[k] for k in MOVIE_KEYS}
        conflicts: list[str] = []
        out = dict(data)
        for name, field in cls.model_fields.items():
            sub = _model_of(field.annotation, out.get(name))
            if sub is not None and isinstance(out.get(name), Mapping):
                out[name] = _fill_movie_values(out[name], sub, values, name, conflicts)
        if conflicts:
            raise ParameterError(
                f"{conflicts[0]} is the run's {conflicts[0].rsplit('.', 1)[1]}: set it once at the top level "
                "of the --params file (or with --fps / --neuron-radius), not under a stage.")
        return out

    @model_serializer(mode="wrap")
    def _dump_movie_values_once(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: (_strip_movie_values(v) if isinstance(v, dict) else v) for k, v in data.items()}

    @classmethod
    def for_movie(
        cls,
        fps: float,
        modality: str,
        neuron_radius: float | None = None,
        overrides: Mapping[str, Any] | None = None,
        shape: tuple[int, int, int] = (1000, 512, 512),
    ) -> RunParams:
        """Defaults derived from the movie, then ``overrides`` (nested dict) applied.

        ``shape`` (frame, y, x) sizes the motion-correction patches. Top-level
        ``fps``, ``modality`` and ``neuron_radius`` in ``overrides`` win over the
        arguments, and the defaults derive from them.

        Raises
        ------
        ParameterError
            Unknown keys or invalid values in ``overrides``, or a section of
            another method than the chosen one.
        """
        over = to_current_layout(overrides or {})
        inference = over.pop(INFERENCE_KEY, None)
        movie = {"fps": fps, "modality": modality, "neuron_radius": neuron_radius}
        movie.update({k: over[k] for k in movie if over.get(k) is not None})
        if movie["neuron_radius"] is None:
            movie["neuron_radius"] = DEFAULT_NEURON_RADIUS.get(str(movie["modality"]), 5.0)
        m = _validated(MovieParams, movie)
        fps, modality, r = m.fps, m.modality, m.neuron_radius
        if 2 * r > min(shape[1:]):
            raise ParameterError(
                f"neuron_radius {r:g} px is too large for frames of {shape[1]}x{shape[2]} px: a cell that "
                f"wide does not fit in the frame. Give the soma radius in pixels (--neuron-radius, half a "
                "cell body's diameter).")
        method = over.get("extract", {}).get("method", METHODS[0])
        if method not in METHODS:
            raise ParameterError(f"bad parameter method: {method!r} is not one of "
                                 f"{', '.join(METHODS)}. Fix it in --method or the --params file.")
        base: dict[str, Any] = {
            **m.model_dump(),
            "ingest": IngestParams().model_dump(),
            "preprocess": PreprocessParams.for_movie(fps, modality, r, shape).model_dump(),
            "summary": SummaryParams.for_movie(fps, modality, r).model_dump(),
            "extract": extract_defaults(method, fps, modality, r),
            "classify": ClassifyParams().model_dump(),
            "traces": TraceParams.for_movie(fps, modality, r).model_dump(),
        }
        if inference is not None:
            over = merge_overrides(over, _inference_sections(str(inference), method))
        return _validated(cls, merge_overrides(base, over))


def inference_overrides(spec: str) -> dict[str, Any]:
    """Overrides that send every CNN of a run (detectors, classifier, LSTM seed cleansing) to
    ``spec``: ``"local"`` or the inference service's URL (``somaflow run --inference``)."""
    return {INFERENCE_KEY: spec}


def _inference_sections(spec: str, method: str) -> dict[str, Any]:
    """``inference`` set in each model of ``method`` that runs a CNN."""
    sections = METHOD_SECTIONS[method]
    extract: dict[str, Any] = {}
    if "cnn" in sections:
        extract["cnn"] = {"inference": spec}
    if "cnmf" in sections:
        extract["cnmf"] = {"seeds": {"inference": spec}}
    return {"classify": {"inference": spec}, **({"extract": extract} if extract else {})}


def to_current_layout(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides in the current layout: a top-level ``method`` becomes ``extract.method``
    (and wins over it: it is what ``--method`` sets), and top-level ``cnmf``, ``detect``,
    ``cnn`` and ``pca_ica`` sections (the earlier layout) move under ``extract`` when
    they belong to the chosen method.

    Raises
    ------
    ParameterError
        A top-level section of a method other than the chosen one.
    """
    over = dict(overrides)
    ext = dict(over.pop("extract", None) or {})
    if over.get("method") is not None:
        ext["method"] = over.pop("method")
    over.pop("method", None)
    method = ext.get("method", METHODS[0])
    for section in _SECTION_DEFAULTS:
        if section not in over:
            continue
        if section not in METHOD_SECTIONS.get(method, ()):
            users = [m for m, s in METHOD_SECTIONS.items() if section in s]
            raise ParameterError(
                f"parameter section {section}: is for method {' / '.join(users)}, and this run uses {method}: "
                f"drop it, or choose that method (its place is extract.{section}, with extract.method).")
        ext[section] = merge_overrides(ext.get(section) or {}, over.pop(section) or {})
    if ext:
        over["extract"] = ext
    return over


def _validated(model: type[BaseModel], data: Mapping[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ParameterError):
            raise cause from None
        where = ".".join(str(p) for p in first["loc"]) or "parameters"
        raise ParameterError(f"bad parameter {where}: {first['msg']}. Fix it in the --params file "
                             "or the command line.") from exc


def _model_of(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The model class a field holds (for the tagged union: the member ``value``'s method picks)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for member in getattr(annotation, "__args__", ()):
        for cls in getattr(member, "__args__", (member,)):
            if isinstance(cls, type) and issubclass(cls, BaseModel):
                tag = cls.model_fields.get("method")
                if tag is None:
                    return cls
                if isinstance(value, Mapping) and value.get("method") in getattr(tag.annotation, "__args__", ()):
                    return cls
    return None


def _fill_movie_values(data: Mapping[str, Any], model: type[BaseModel], values: Mapping[str, Any],
                       where: str, conflicts: list[str]) -> dict[str, Any]:
    out = dict(data)
    for key in MOVIE_KEYS:
        if key in model.model_fields:
            given = out.get(key)
            if given is not None and not _same(given, values[key]):
                conflicts.append(f"{where}.{key}")
            out[key] = values[key]
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation, out.get(name))
        if sub is not None and isinstance(out.get(name), Mapping):
            out[name] = _fill_movie_values(out[name], sub, values, f"{where}.{name}", conflicts)
    return out


def _same(a: Any, b: Any) -> bool:
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return False


def _strip_movie_values(data: dict[str, Any]) -> dict[str, Any]:
    return {k: (_strip_movie_values(v) if isinstance(v, dict) else v) for k, v in data.items()
            if k not in MOVIE_KEYS}
