"""Named simulation presets, from CI-sized movies to benchmark-sized ones.

Photon budgets follow real recordings: a 2p soma at rest gives a few photons per
pixel per frame over ~2 photons of neuropil, so a single spike is at the edge of
detectability and a burst is clear (peak trace SNR ~ 5-30); a 1p miniscope
frame is dominated by ~10x brighter out-of-focus light, with cells adding a few
per cent on top.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from somaflow.errors import ParameterError
from somaflow.simulate.params import SimulationParams, param_names

_2P_SMALL = SimulationParams(
    name="2p-small",
    description="2p, 128x128, 300 frames at 10 Hz, 35 cells r=5 px, mild rigid motion (CI)",
    modality="2p",
    shape=(128, 128),
    n_frames=300,
    fps=10.0,
    n_cells=35,
    neuron_radius=5.0,
)

_1P_SMALL = dataclasses.replace(
    _2P_SMALL,
    name="1p-small",
    description="1p miniscope, 128x128, 300 frames at 10 Hz, 30 cells r=6 px, strong moving background (CI)",
    modality="1p",
    n_cells=30,
    neuron_radius=6.0,
    radius_jitter=0.12,
    eccentricity=0.25,
    doughnut_fraction=0.0,
    silent_fraction=0.15,
    min_distance=1.6,
    overlap_fraction=0.15,
    footprint_blur=2.0,
    scatter_halo=0.12,
    spike_amplitude=0.5,
    tau_decay=(0.5, 1.0),
    tau_rise=(0.05, 0.1),
    cell_brightness=250.0,
    neuropil_level=200.0,
    neuropil_fluctuation=0.2,
    neuropil_scale=4.0,
    surround_neuropil=0.0,
    background_level=1200.0,
    background_drift=0.05,
    bleach=0.05,
    vignetting=0.45,
    n_vessels=2,
    vessel_contrast=0.3,
    n_blobs=8,
    blob_amplitude=600.0,
    blob_drift=6.0,
    blob_fluctuation=0.35,
    n_out_of_focus=60,
    out_of_focus_brightness=60.0,
    global_fluctuation=0.01,
    gain=0.1,
    offset=8.0,
    read_noise=1.5,
    motion="rigid",
    max_shift=3.0,
    motion_std=0.4,
)

PRESETS: dict[str, SimulationParams] = {
    p.name: p
    for p in (
        _2P_SMALL,
        dataclasses.replace(
            _2P_SMALL,
            name="2p-dense",
            description="2p, 128x128, 300 frames, 80 tightly packed cells with many partial overlaps",
            n_cells=80,
            min_distance=1.3,
            overlap_fraction=0.35,
        ),
        dataclasses.replace(
            _2P_SMALL,
            name="2p-lowsnr",
            description="2p, 128x128, 300 frames, dim cells, small transients and strong read noise",
            cell_brightness=1.5,
            neuropil_level=1.5,
            spike_amplitude=0.2,
            read_noise=45.0,
        ),
        dataclasses.replace(
            _2P_SMALL,
            name="2p-nonrigid",
            description="2p, 192x192, 300 frames, 70 cells, rigid bouts up to 4 px plus a 3x3 non-rigid field",
            shape=(192, 192),
            n_cells=70,
            motion="nonrigid",
            max_shift=4.0,
            motion_std=0.5,
            motion_bout_rate=0.1,
            nonrigid_amplitude=1.2,
            nonrigid_grid=(3, 3),
        ),
        dataclasses.replace(
            _2P_SMALL,
            name="2p-medium",
            description="2p, 256x256, 2000 frames at 30 Hz, 130 cells r=6 px, mild non-rigid motion",
            shape=(256, 256),
            n_frames=2000,
            fps=30.0,
            n_cells=130,
            neuron_radius=6.0,
            motion="nonrigid",
            max_shift=4.0,
            nonrigid_amplitude=0.6,
            nonrigid_grid=(3, 3),
        ),
        dataclasses.replace(
            _2P_SMALL,
            name="2p-large",
            description="2p, 512x512, 8000 frames at 30 Hz, 400 cells r=7 px, non-rigid motion (benchmark; stream it)",
            shape=(512, 512),
            n_frames=8000,
            fps=30.0,
            n_cells=400,
            neuron_radius=7.0,
            n_vessels=2,
            motion="nonrigid",
            max_shift=6.0,
            motion_std=0.4,
            nonrigid_amplitude=0.8,
            nonrigid_grid=(4, 4),
        ),
        _1P_SMALL,
        dataclasses.replace(
            _1P_SMALL,
            name="1p-large",
            description="1p miniscope, 512x512, 8000 frames at 20 Hz, 450 cells r=6 px (benchmark; stream it)",
            shape=(512, 512),
            n_frames=8000,
            fps=20.0,
            n_cells=450,
            n_vessels=4,
            n_blobs=24,
            n_out_of_focus=900,
            max_shift=5.0,
        ),
    )
}


def list_presets() -> list[tuple[str, str]]:
    """(name, one-line description) of every preset, in a stable order."""
    return [(name, p.description) for name, p in PRESETS.items()]


def resolve_params(preset: str | SimulationParams, **overrides: Any) -> SimulationParams:
    """The parameters of a preset (by name) or given directly, with ``overrides`` applied.

    Raises
    ------
    ParameterError
        Unknown preset name, unknown override name, or an invalid value.
    """
    if isinstance(preset, SimulationParams):
        params = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ParameterError(
                f"unknown simulation preset {preset!r}; choose one of {sorted(PRESETS)} "
                "(`somaflow simulate --list-presets`)."
            )
        params = PRESETS[preset]
    else:
        raise ParameterError(f"preset must be a preset name or SimulationParams, got {type(preset).__name__}.")
    if not overrides:
        return params
    unknown = sorted(set(overrides) - set(param_names()))
    if unknown:
        raise ParameterError(
            f"unknown simulation parameters {unknown}; valid names are {param_names()}."
        )
    return dataclasses.replace(params, **overrides)
