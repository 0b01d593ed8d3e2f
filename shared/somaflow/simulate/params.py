"""The frozen parameter model of the simulator.

Units used throughout: lengths in pixels, times in seconds, rates in Hz,
fluorescence in expected photons per pixel per frame (before the camera gain),
camera values in ADU (analog-to-digital units, the integers in the movie).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from somaflow.errors import ParameterError

MODALITIES = ("2p", "1p")
MOTIONS = ("none", "rigid", "nonrigid")


@dataclass(frozen=True)
class SimulationParams:
    """Every knob of one simulated session.

    Sequences given as lists (from YAML or JSON) are converted to tuples; every
    value is checked when the object is built and a bad one raises
    :class:`~somaflow.errors.ParameterError` naming the field and the fix.

    Attributes
    ----------
    name, description : str
        Preset name (``"custom"`` for hand-made parameters) and a one-line summary.
    modality : {"2p", "1p"}
        Two-photon (ring/filled somata, neuropil, slow low-rank background) or
        one-photon miniscope (blurred somata, strong moving non-low-rank background).
    shape : (int, int)
        Frame height and width in pixels.
    n_frames : int
        Number of frames.
    fps : float
        Frame rate in Hz.
    n_cells : int
        Number of ground-truth somata in the field of view.
    neuron_radius : float
        Median soma radius in pixels.
    radius_jitter : float
        Log-normal sigma of the per-cell radius.
    eccentricity : float
        Maximum relative elongation of the soma ellipse (semi-axes ``r (1 + e)`` and
        ``r / (1 + e)``, ``e`` uniform in [0, eccentricity]).
    irregularity : float
        Amplitude of the low-order angular harmonics that make somata non-elliptical.
    doughnut_fraction : float
        Fraction of somata whose nucleus is dark (a "doughnut" footprint).
    silent_fraction : float
        Fraction of somata that never fire (visible through their baseline only).
    min_distance : float
        Minimum centre distance, in median radii, for cells not placed to overlap.
    overlap_fraction : float
        Fraction of cells placed deliberately so that their soma partially overlaps
        a neighbour (centre distance 1.0-1.6 median radii).
    footprint_blur : float
        Gaussian sigma (pixels) of the optical blur of each footprint (PSF for 2p,
        scattering for 1p).
    scatter_halo : float
        Relative amplitude of a wide (1.5 radius) scattering halo added to each
        footprint (1p); 0 disables it.
    mask_threshold : float
        A ground-truth mask is the connected region of the footprint above this
        fraction of its maximum, nucleus hole filled.
    firing_rate : float
        Median firing rate of the active cells, Hz.
    firing_rate_spread : float
        Log-normal sigma of the per-cell firing rate.
    burstiness : float
        Standard deviation of the slow log-rate modulation (0: homogeneous Poisson).
    population_coupling : float
        Fraction of the log-rate modulation shared by all cells, in [0, 1].
    spike_amplitude : float
        Median peak dF/F of a single spike.
    amplitude_spread : float
        Log-normal sigma of the per-cell spike amplitude (a per-event jitter of
        half that is added).
    ar_order : {1, 2}
        Order of the autoregressive calcium model (2 adds a finite rise time).
    tau_decay, tau_rise : (float, float)
        Ranges (s) from which each cell's decay and rise time constants are drawn.
    cell_brightness : float
        Median baseline fluorescence F0 at a footprint's maximum, photons/pixel/frame.
    brightness_spread : float
        Log-normal sigma of the per-cell baseline.
    neuropil_level : float
        Mean neuropil fluorescence, photons/pixel/frame.
    neuropil_fluctuation : float
        Relative standard deviation of the neuropil's slow temporal fluctuations.
    neuropil_scale : float
        Spatial scale (in median radii) of the neuropil fluctuation patches.
    surround_neuropil : float
        Brightness of each cell's own process halo relative to its F0 (2p); it
        follows the cell's calcium. 0 disables it.
    background_level : float
        Mean static background (autofluorescence, out-of-plane light), photons.
    background_drift : float
        Relative amplitude of the slow background drift (two spatial components).
    bleach : float
        Fraction of fluorescence lost to photobleaching by the last frame.
    vignetting : float
        Relative intensity loss at the frame corners (quadratic fall-off).
    n_vessels : int
        Number of blood vessels (dark, curved stripes).
    vessel_contrast : float
        Fractional darkening at the centre of a vessel.
    n_blobs : int
        Number of large, drifting, fluctuating background blobs (1p).
    blob_amplitude : float
        Median peak brightness of a blob, photons.
    blob_drift : float
        Standard deviation of a blob centre's slow drift, pixels.
    blob_fluctuation : float
        Log-normal sigma of a blob's slow intensity fluctuation.
    n_out_of_focus : int
        Number of out-of-focus, active, heavily blurred neurons (part of the 1p
        background, not ground truth).
    out_of_focus_brightness : float
        Median baseline of an out-of-focus neuron at its peak, photons.
    global_fluctuation : float
        Relative standard deviation of a frame-wide intensity fluctuation
        (light source, hemodynamics).
    gain : float
        Camera / PMT gain, ADU per photon.
    offset : float
        Dark offset, ADU.
    read_noise : float
        Gaussian read noise standard deviation, ADU.
    motion : {"none", "rigid", "nonrigid"}
        Motion model.
    max_shift : float
        Largest rigid displacement along either axis, pixels.
    motion_std : float
        Standard deviation of the fast rigid jitter, pixels.
    motion_bout_rate : float
        Rate of movement bouts (larger displacements that return), Hz.
    nonrigid_amplitude : float
        Standard deviation of the non-rigid displacement at each control point, pixels.
    nonrigid_grid : (int, int)
        Number of control points (patches) along y and x of the non-rigid field.
    interpolation_order : int
        Spline order used to warp the clean movie (1: linear, 3: cubic).
    """

    name: str = "custom"
    description: str = "user-defined parameters"
    modality: str = "2p"
    shape: tuple[int, int] = (128, 128)
    n_frames: int = 300
    fps: float = 10.0
    # cells
    n_cells: int = 35
    neuron_radius: float = 5.0
    radius_jitter: float = 0.12
    eccentricity: float = 0.3
    irregularity: float = 0.06
    doughnut_fraction: float = 0.4
    silent_fraction: float = 0.2
    min_distance: float = 1.8
    overlap_fraction: float = 0.1
    footprint_blur: float = 0.6
    scatter_halo: float = 0.0
    mask_threshold: float = 0.3
    # activity
    firing_rate: float = 0.3
    firing_rate_spread: float = 0.7
    burstiness: float = 1.0
    population_coupling: float = 0.2
    spike_amplitude: float = 0.35
    amplitude_spread: float = 0.3
    ar_order: int = 2
    tau_decay: tuple[float, float] = (0.4, 0.9)
    tau_rise: tuple[float, float] = (0.04, 0.09)
    # fluorescence, photons per pixel per frame
    cell_brightness: float = 5.0
    brightness_spread: float = 0.35
    neuropil_level: float = 2.0
    neuropil_fluctuation: float = 0.3
    neuropil_scale: float = 3.0
    surround_neuropil: float = 0.15
    background_level: float = 1.0
    background_drift: float = 0.05
    bleach: float = 0.03
    vignetting: float = 0.15
    n_vessels: int = 1
    vessel_contrast: float = 0.6
    n_blobs: int = 0
    blob_amplitude: float = 0.0
    blob_drift: float = 0.0
    blob_fluctuation: float = 0.0
    n_out_of_focus: int = 0
    out_of_focus_brightness: float = 0.0
    global_fluctuation: float = 0.005
    # camera
    gain: float = 30.0
    offset: float = 200.0
    read_noise: float = 25.0
    # motion
    motion: str = "rigid"
    max_shift: float = 2.0
    motion_std: float = 0.3
    motion_bout_rate: float = 0.05
    nonrigid_amplitude: float = 0.0
    nonrigid_grid: tuple[int, int] = (1, 1)
    interpolation_order: int = 1

    def __post_init__(self) -> None:
        for name in ("shape", "tau_decay", "tau_rise", "nonrigid_grid"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                try:
                    object.__setattr__(self, name, tuple(value))
                except TypeError as exc:
                    raise ParameterError(
                        f"{name} must be a pair of numbers, got {value!r}. Pass e.g. {name}=(a, b)."
                    ) from exc
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        """All parameters as a JSON-serialisable dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @property
    def movie_nbytes(self) -> int:
        """Size of the uint16 movie in bytes."""
        return int(self.n_frames) * int(self.shape[0]) * int(self.shape[1]) * 2


def param_names() -> list[str]:
    """Names of every :class:`SimulationParams` field."""
    return [f.name for f in dataclasses.fields(SimulationParams)]


def _fail(name: str, value: Any, need: str) -> ParameterError:
    return ParameterError(f"simulation parameter {name}={value!r} is invalid: it must be {need}.")


def _validate(p: SimulationParams) -> None:
    if p.modality not in MODALITIES:
        raise _fail("modality", p.modality, f"one of {MODALITIES}")
    if p.motion not in MOTIONS:
        raise _fail("motion", p.motion, f"one of {MOTIONS}")
    for name, pair in (("shape", p.shape), ("nonrigid_grid", p.nonrigid_grid)):
        if len(pair) != 2 or not all(isinstance(v, numbers.Real) and float(v).is_integer() for v in pair):
            raise _fail(name, pair, "a pair of integers")
        object.__setattr__(p, name, (int(pair[0]), int(pair[1])))
    if min(p.shape) < 16:
        raise _fail("shape", p.shape, "at least 16 x 16 pixels")
    if min(p.nonrigid_grid) < 1:
        raise _fail("nonrigid_grid", p.nonrigid_grid, "at least one control point per axis")
    if p.nonrigid_grid[0] > p.shape[0] // 8 + 1 or p.nonrigid_grid[1] > p.shape[1] // 8 + 1:
        raise _fail("nonrigid_grid", p.nonrigid_grid, "at most one control point per 8 pixels")
    for name in ("n_frames", "n_cells", "n_vessels", "n_blobs", "n_out_of_focus", "ar_order", "interpolation_order"):
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < (1 if name == "n_frames" else 0):
            raise _fail(name, v, "a positive integer" if name == "n_frames" else "a non-negative integer")
        object.__setattr__(p, name, int(v))
    if p.ar_order not in (1, 2):
        raise _fail("ar_order", p.ar_order, "1 or 2")
    if p.interpolation_order not in (0, 1, 3):
        raise _fail("interpolation_order", p.interpolation_order, "0, 1 or 3")
    positive = ("fps", "neuron_radius", "firing_rate", "spike_amplitude", "gain", "neuropil_scale")
    for name in positive:
        v = getattr(p, name)
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v > 0):
            raise _fail(name, v, "a positive finite number")
        object.__setattr__(p, name, float(v))
    non_negative = (
        "radius_jitter", "eccentricity", "irregularity", "footprint_blur", "scatter_halo",
        "firing_rate_spread", "burstiness", "amplitude_spread", "cell_brightness",
        "brightness_spread", "neuropil_level", "neuropil_fluctuation", "surround_neuropil",
        "background_level", "background_drift", "blob_amplitude", "blob_drift",
        "blob_fluctuation", "out_of_focus_brightness", "global_fluctuation", "offset",
        "read_noise", "max_shift", "motion_std", "motion_bout_rate", "nonrigid_amplitude",
        "min_distance",
    )  # fmt: skip
    for name in non_negative:
        v = getattr(p, name)
        if not (isinstance(v, numbers.Real) and math.isfinite(v) and v >= 0):
            raise _fail(name, v, "a finite number >= 0")
        object.__setattr__(p, name, float(v))
    unit = (
        "doughnut_fraction", "silent_fraction", "overlap_fraction", "population_coupling",
        "bleach", "vignetting", "vessel_contrast",
    )  # fmt: skip
    for name in unit:
        v = getattr(p, name)
        if not (isinstance(v, numbers.Real) and 0 <= v <= 1):
            raise _fail(name, v, "a fraction in [0, 1]")
        object.__setattr__(p, name, float(v))
    if not (isinstance(p.mask_threshold, numbers.Real) and 0 < p.mask_threshold < 1):
        raise _fail("mask_threshold", p.mask_threshold, "a fraction in (0, 1)")
    object.__setattr__(p, "mask_threshold", float(p.mask_threshold))
    if p.bleach >= 1 or p.vignetting >= 1:
        raise ParameterError("bleach and vignetting must stay below 1 (some light must remain).")
    for name in ("tau_decay", "tau_rise"):
        pair = getattr(p, name)
        need = "a range (low, high) with 0 < low <= high, in seconds"
        if len(pair) != 2 or not all(isinstance(v, numbers.Real) for v in pair):
            raise _fail(name, pair, need)
        lo, hi = float(pair[0]), float(pair[1])
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise _fail(name, pair, need)
        object.__setattr__(p, name, (lo, hi))
    if p.ar_order == 2 and p.tau_rise[1] >= p.tau_decay[0]:
        raise _fail("tau_rise", p.tau_rise, "shorter than every tau_decay")
    if p.neuron_radius > min(p.shape) / 4:
        raise _fail("neuron_radius", p.neuron_radius, f"at most a quarter of the frame ({min(p.shape) / 4:g} px)")
    if p.offset > 60000:
        raise _fail("offset", p.offset, "at most 60000 ADU so that the uint16 movie does not saturate")
    if p.motion == "nonrigid" and p.nonrigid_amplitude <= 0:
        raise ParameterError(
            "motion='nonrigid' needs nonrigid_amplitude > 0; set it (e.g. 1.0 px) or use motion='rigid'."
        )
