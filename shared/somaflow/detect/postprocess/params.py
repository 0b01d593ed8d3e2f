"""Parameters of the detectors' post-processing (:class:`PostprocessParams`) and their defaults.
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from somaflow.errors import ParameterError

#: radius (pixels) the field defaults of :class:`PostprocessParams` are for
_DEFAULT_RADIUS = 5.0


#: ratios :meth:`PostprocessParams.for_movie` scales with the neuron radius r
_MIN_AREA_FRACTION = 0.25  # min_area / (pi r^2)


#: peak_distance / r; measured with perfect whole-neuron maps (the union of the true masks,
#: blurred by 0.7 px) of the simulator, seeds 0-2, mean F1: 0.6 r 0.958 (2p-small) and 0.755
#: (2p-dense); 0.5 r 0.912 / 0.765; 0.8 r 0.951 / 0.726; 1.0 r 0.955 / 0.709
_PEAK_DISTANCE_RADII = 0.6


#: STNeuroNet fuses masks closer than 4 um; its ABO neurons average 107.5 um^2,
#: i.e. an equivalent radius of 5.85 um, so 4 um is 0.68 r
_FUSION_DISTANCE_RADII = 0.7


#: Apthorpe et al. shrink ROIs to 4-px disks; 4 px = 0.8 r at r = 5
_MARKER_RADII = 0.8


_MIN_MARKER_AREA_FRACTION = 0.25  # min_marker_area / (pi marker_radius^2)


#: grow_radius / r and grow_fraction; measured with perfect centroid maps (marker disks at the
#: true centroids) of the simulator, seeds 0-1, mean F1 with the correlation / mean image:
#: 1.5 r, 0.25: 2p-small 0.971 / 1.000, 2p-dense 0.887 / 0.900, 1p-small 0.900 / 0.950;
#: 2.0 r, 0.35: 2p-small 0.929 / 1.000, 2p-dense 0.894 / 0.893, 1p-small 0.800 / 0.900
_GROW_RADII = 1.5


_GROW_FRACTION = 0.25


#: second-pass threshold for 2p whole-neuron maps; STNeuroNet (checkpoint threshold 0.85),
#: validation seeds 1100-1102 (2p-dense 1100-1105), mean F1 without / with the second pass at
#: 0.6 (gap 1 px): 2p-dense 0.824 / 0.869, 2p-lowsnr 0.956 / 0.966, 2p-nonrigid 0.912 / 0.910,
#: 2p-small 0.971 / 0.967; at 0.5: 0.845 / 0.966 / 0.904 / 0.967; on 1p-small it costs 0.03
#: (0.852 / 0.825: grey background structures), so 1p has no second pass
_RESCUE_THRESHOLD_2P = 0.6


#: tolerance on probabilities outside [0, 1] (float32 softmax round-off)
_PROB_TOL = 1e-5


_EIGHT = np.ones((3, 3), dtype=bool)


#: thresholds :func:`choose_threshold` tries by default: 0.30, 0.35, ..., 0.90
DEFAULT_CANDIDATES: tuple[float, ...] = tuple(round(0.3 + 0.05 * k, 2) for k in range(13))


class PostprocessParams(BaseModel):
    """Parameters of the CNN post-processing; lengths in pixels, areas in pixels².

    The field defaults are :meth:`for_movie` at a neuron radius of 5 px.

    Attributes
    ----------
    neuron_radius : float
        Typical soma radius r (pixels); π r² is the mean neuron area.
    threshold : float
        A pixel is foreground where the neuron probability is ``>= threshold``.
    min_area : float
        Masks smaller than this (pixels²) are dropped. Default 0.25 π r².
    split_area_factor : float
        Components larger than ``split_area_factor · π r²`` (centroid maps:
        ``π marker_radius²``) are split by the distance-transform watershed
        (STNeuroNet: the mean neuron area, factor 1).
    peak_distance : float
        Minimum distance between watershed markers (pixels), rounded to whole
        pixels. Default 0.6 r.
    fusion_distance : float
        Masks whose centres of mass are closer than this are one neuron in
        :func:`fuse_batches` (pixels). Default 0.7 r (4 µm in STNeuroNet).
    fusion_overlap : float
        θ_p of STNeuroNet Eq. 3: a mask ``m_i`` with ``|m_i ∩ m_j| / |m_j|``
        above it for another mask ``m_j`` is removed.
    marker_radius : float
        Radius of the centroid disks a centroid-mode model was trained on
        (pixels); must match the training targets. Default 0.8 r (4 px at r = 5).
    min_marker_area : float
        Centroid maps: foreground components smaller than this are dropped
        before growth (pixels²). Default 0.25 π marker_radius².
    grow_radius : float
        Centroid maps: a cell grows at most this far from its marker's centre
        (pixels). Default 1.5 r.
    grow_fraction : float
        Centroid maps: a pixel joins a cell above ``b + grow_fraction ·
        (peak − b)`` of the image (see the module docstring). Default 0.25.
    rescue_threshold : float or None
        Whole-neuron maps: threshold of the second pass (module docstring,
        step 5); None, or not below ``threshold``: no second pass. Default
        0.6; :meth:`for_movie` sets None for 1p.
    rescue_gap : int
        Pixels kept free around the first pass's masks in the second pass.
        Default 1.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(_DEFAULT_RADIUS, gt=0, description="typical soma radius (pixels)")
    threshold: float = Field(
        0.5, gt=0, lt=1, description="foreground where the neuron probability >= threshold"
    )
    min_area: float = Field(
        _MIN_AREA_FRACTION * math.pi * _DEFAULT_RADIUS**2, ge=0,
        description="masks smaller than this are dropped (pixels^2)",
    )
    split_area_factor: float = Field(
        1.0, gt=0, description="components above this x the mean neuron area are split by watershed"
    )
    peak_distance: float = Field(
        _PEAK_DISTANCE_RADII * _DEFAULT_RADIUS, gt=0,
        description="minimum distance between watershed markers (pixels)",
    )
    fusion_distance: float = Field(
        _FUSION_DISTANCE_RADII * _DEFAULT_RADIUS, gt=0,
        description="masks with centres of mass closer than this are one neuron (pixels)",
    )
    fusion_overlap: float = Field(
        0.75, gt=0, le=1, description="a mask covering this fraction of another mask is removed"
    )
    marker_radius: float = Field(
        _MARKER_RADII * _DEFAULT_RADIUS, gt=0,
        description="radius of the centroid disks of the training targets (pixels)",
    )
    min_marker_area: float = Field(
        _MIN_MARKER_AREA_FRACTION * math.pi * (_MARKER_RADII * _DEFAULT_RADIUS) ** 2, ge=0,
        description="centroid maps: smaller foreground components are dropped (pixels^2)",
    )
    grow_radius: float = Field(
        _GROW_RADII * _DEFAULT_RADIUS, gt=0,
        description="centroid maps: maximum growth distance from the marker centre (pixels)",
    )
    grow_fraction: float = Field(
        _GROW_FRACTION, gt=0, lt=1, description="centroid maps: growth threshold between local median and peak"
    )
    rescue_threshold: float | None = Field(
        _RESCUE_THRESHOLD_2P, gt=0, lt=1,
        description="whole-neuron maps: second-pass threshold away from the first pass's masks (None: off)",
    )
    rescue_gap: int = Field(1, ge=0, description="second pass: pixels kept free around the first pass's masks")

    @model_validator(mode="after")
    def _consistent(self) -> PostprocessParams:
        if self.grow_radius < self.marker_radius:
            raise ValueError(
                f"grow_radius ({self.grow_radius}) must be at least marker_radius "
                f"({self.marker_radius}): a cell grows outwards from its marker disk"
            )
        return self

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> PostprocessParams:
        """Defaults for a movie: every length scales with the neuron radius.

        Parameters
        ----------
        fps : float
            Frame rate (Hz); not used by this stage, accepted for a uniform API.
        modality : str
            ``"2p"`` or ``"1p"``; only 2p has the second pass
            (``rescue_threshold``, see :data:`_RESCUE_THRESHOLD_2P`).
        neuron_radius : float
            Typical soma radius r (pixels).

        Raises
        ------
        ParameterError
            ``modality`` is neither ``"2p"`` nor ``"1p"``, or ``neuron_radius``
            is not positive.
        """
        if modality not in ("2p", "1p"):
            raise ParameterError(f"modality must be '2p' or '1p', got {modality!r}.")
        r = float(neuron_radius)
        if not r > 0:
            raise ParameterError(f"neuron_radius must be positive (pixels), got {neuron_radius}.")
        marker = _MARKER_RADII * r
        return cls(
            neuron_radius=r,
            min_area=_MIN_AREA_FRACTION * math.pi * r * r,
            peak_distance=_PEAK_DISTANCE_RADII * r,
            fusion_distance=_FUSION_DISTANCE_RADII * r,
            marker_radius=marker,
            min_marker_area=_MIN_MARKER_AREA_FRACTION * math.pi * marker * marker,
            grow_radius=_GROW_RADII * r,
            rescue_threshold=_RESCUE_THRESHOLD_2P if modality == "2p" else None,
        )

