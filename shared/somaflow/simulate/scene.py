"""The generative model of a session: every spatial and temporal component, no pixels yet.

Expected photons of frame ``t`` at canvas pixel ``p`` (before motion, vignetting
and noise)::

    tissue(p) * gain(t) * [ sum_layers  S_layer(p, :) @ T_layer(:, t)  +  blobs(p, t) ]

where the layers are

* ``cells`` (sparse): soma footprints x ``F0 (1 + calcium)``;
* ``neuropil`` (sparse, 2p): each cell's process halo x ``s F0 (1 + calcium)``;
* ``neuropil`` (dense): a textured map x ``(1 + f sum_k w_k(p) z_k(t))``, smooth
  patches ``w_k`` with calcium-like population signals ``z_k``;
* ``background`` (dense): a smooth static baseline and a second smooth map, both
  slowly drifting (a rank-2 background, as CNMF assumes for 2p);
* ``background`` (sparse, 1p): out-of-focus active neurons (wide Gaussians);
* ``blobs`` (1p, part of ``background``): large Gaussian blobs whose centres drift
  and whose brightness fluctuates;

``tissue`` darkens blood vessels, ``gain`` is photobleaching times a frame-wide
fluctuation. The canvas is the field of view plus a margin of ``pad`` pixels so
that motion brings real tissue, not padding, into view.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from somaflow.simulate import fields
from somaflow.simulate._rng import rng_for
from somaflow.simulate.activity import Activity, ar1_process, fluctuation_traces, simulate_activity
from somaflow.simulate.footprints import (
    CellShape,
    Patch,
    draw_shapes,
    footprint_mask,
    gaussian_footprint,
    patches_to_csr,
    place_cells,
    soma_footprint,
    surround_footprint,
)
from somaflow.simulate.motion import Motion, simulate_motion
from somaflow.simulate.params import SimulationParams

log = logging.getLogger(__name__)

#: component kinds a render can select
KINDS = ("cells", "neuropil", "background")


@dataclass(frozen=True)
class SparseLayer:
    """``spatial`` (canvas pixels, m) CSR float32 times ``temporal`` (m, T) float32."""

    kind: str
    spatial: sp.csr_matrix
    temporal: np.ndarray


@dataclass(frozen=True)
class DenseLayer:
    """``spatial`` (k, canvas pixels) float32 times ``temporal`` (k, T) float32."""

    kind: str
    spatial: np.ndarray
    temporal: np.ndarray


@dataclass(frozen=True)
class Blobs:
    """Drifting Gaussian blobs: centres (T, K, 2) canvas px, sigmas (K,), amplitudes (T, K) photons."""

    centers: np.ndarray
    sigmas: np.ndarray
    amplitudes: np.ndarray


@dataclass(frozen=True)
class Scene:
    """Everything needed to render any frame of one simulated session."""

    params: SimulationParams
    seed: int
    pad: int
    layers: tuple[SparseLayer | DenseLayer, ...]
    blobs: Blobs | None
    tissue: np.ndarray
    frame_gain: np.ndarray
    vignette: np.ndarray
    motion: Motion

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """(y, x) size of the canvas, px."""
        return (self.params.shape[0] + 2 * self.pad, self.params.shape[1] + 2 * self.pad)


@dataclass(frozen=True)
class Truth:
    """Ground truth in field-of-view coordinates (footprints and masks as patches)."""

    shapes: list[CellShape]
    footprints: list[Patch]
    masks: list[Patch]
    activity: Activity
    baseline: np.ndarray


def canvas_pad(p: SimulationParams) -> int:
    """Margin (px) around the field of view that motion can bring into view."""
    if p.motion == "none":
        return 0
    return int(np.ceil(p.max_shift + 4 * p.nonrigid_amplitude + 3))


def build_scene(p: SimulationParams, seed: int) -> tuple[Scene, Truth]:
    """Draw every component of a session from ``seed``.

    Returns
    -------
    (Scene, Truth)
    """
    Y, X = p.shape
    pad = canvas_pad(p)
    cshape = (Y + 2 * pad, X + 2 * pad)
    R = p.neuron_radius

    # blood vessels first: cells avoid them
    vessels = fields.vessel_map(rng_for(seed, "vessels"), cshape, p.n_vessels, width=1.6 * R)
    tissue = (1.0 - p.vessel_contrast * vessels).astype(np.float32)

    centres = place_cells(
        rng_for(seed, "placement"), p.n_cells, p.shape, R,
        min_distance=p.min_distance, overlap_fraction=p.overlap_fraction,
        forbidden=vessels[pad : pad + Y, pad : pad + X] > 0.3,
    )  # fmt: skip
    shape_rng = rng_for(seed, "shape")
    shapes = draw_shapes(
        shape_rng, centres + pad, R, radius_jitter=p.radius_jitter, eccentricity=p.eccentricity,
        irregularity=p.irregularity, doughnut_fraction=p.doughnut_fraction,
    )  # fmt: skip
    canvas_fps = [soma_footprint(shape_rng, s, blur=p.footprint_blur, halo=p.scatter_halo) for s in shapes]
    activity = simulate_activity(rng_for(seed, "activity"), p.n_cells, p)
    b_rng = rng_for(seed, "brightness")
    baseline = (p.cell_brightness * b_rng.lognormal(0.0, p.brightness_spread, p.n_cells)).astype(np.float32)
    driven = baseline[:, None] * (1.0 + activity.calcium)

    layers: list[SparseLayer | DenseLayer] = [
        SparseLayer("cells", patches_to_csr(canvas_fps, cshape), driven.astype(np.float32))
    ]
    if p.surround_neuropil > 0 and p.n_cells:
        halos = [surround_footprint(shape_rng, s, blur=p.footprint_blur) for s in shapes]
        layers.append(
            SparseLayer("neuropil", patches_to_csr(halos, cshape), (p.surround_neuropil * driven).astype(np.float32))
        )
    layers.extend(_neuropil_layer(p, seed, cshape))
    layers.append(_background_layer(p, seed, cshape))
    if p.n_out_of_focus:
        layers.append(_out_of_focus_layer(p, seed, cshape))

    blobs = _blobs(p, seed, cshape) if p.n_blobs and p.blob_amplitude > 0 else None
    g_rng = rng_for(seed, "background", 1)
    t = np.arange(p.n_frames) / max(p.n_frames - 1, 1)
    gain = (1.0 - p.bleach) ** t * (1.0 + p.global_fluctuation * ar1_process(g_rng, (p.n_frames,), 1.0 * p.fps))
    motion = simulate_motion(rng_for(seed, "motion"), p)

    scene = Scene(
        params=p, seed=seed, pad=pad, layers=tuple(layers), blobs=blobs, tissue=tissue,
        frame_gain=gain.astype(np.float32), vignette=fields.vignette(p.shape, p.vignetting), motion=motion,
    )  # fmt: skip
    fov_fps = [_renormalised(fp.shifted(-pad, -pad), p.shape) for fp in canvas_fps]
    masks = [footprint_mask(fp, p.mask_threshold).shifted(-pad, -pad) for fp in canvas_fps]
    unshifted = [dataclasses.replace(s, center=(s.center[0] - pad, s.center[1] - pad)) for s in shapes]
    truth = Truth(shapes=unshifted, footprints=fov_fps, masks=masks, activity=activity, baseline=baseline)
    return scene, truth


def _renormalised(fp: Patch, shape: tuple[int, int]) -> Patch:
    """Crop a patch to a grid and rescale it to max 1 there (cells cut by the border)."""
    (sy, sx), data = fp.clipped(shape)
    m = float(data.max()) if data.size else 0.0
    if m <= 0 or m == 1.0:
        return fp
    return Patch(fp.y0, fp.x0, (fp.data / m).astype(np.float32))


def _neuropil_layer(p: SimulationParams, seed: int, cshape: tuple[int, int]) -> list[DenseLayer]:
    if p.neuropil_level <= 0:
        return []
    rng = rng_for(seed, "neuropil")
    scale = p.neuropil_scale * p.neuron_radius
    k = int(np.clip(round(cshape[0] * cshape[1] / (2 * scale) ** 2), 2, 32))
    texture = np.maximum(1.0 + 0.25 * fields.smooth_field(rng, cshape, 2 * p.neuron_radius), 0.3)
    patches = fields.neuropil_patches(rng, cshape, k, scale) * texture[None]
    z = fluctuation_traces(rng, k, p, tau_s=float(np.mean(p.tau_decay)))
    spatial = np.concatenate([texture[None], patches]).reshape(k + 1, -1)
    temporal = np.concatenate([np.ones((1, p.n_frames)), p.neuropil_fluctuation * z]) * p.neuropil_level
    return [DenseLayer("neuropil", spatial.astype(np.float32), temporal.astype(np.float32))]


def _background_layer(p: SimulationParams, seed: int, cshape: tuple[int, int]) -> DenseLayer:
    rng = rng_for(seed, "background")
    size = min(p.shape)
    base = np.maximum(1.0 + 0.3 * fields.smooth_field(rng, cshape, 0.15 * size), 0.2)
    tilt = 0.3 * fields.smooth_field(rng, cshape, 0.3 * size)
    drift = p.background_drift * ar1_process(rng, (2, p.n_frames), 30.0 * p.fps)
    spatial = np.stack([base, tilt]).reshape(2, -1)
    temporal = np.stack([1.0 + drift[0], drift[1]]) * p.background_level
    return DenseLayer("background", spatial.astype(np.float32), temporal.astype(np.float32))


def _out_of_focus_layer(p: SimulationParams, seed: int, cshape: tuple[int, int]) -> SparseLayer:
    rng = rng_for(seed, "out_of_focus")
    n = p.n_out_of_focus
    centres = rng.uniform([0, 0], [cshape[0] - 1, cshape[1] - 1], (n, 2))
    sigmas = p.neuron_radius * rng.uniform(2.0, 4.0, n)
    patches = [gaussian_footprint((float(c[0]), float(c[1])), float(s)) for c, s in zip(centres, sigmas, strict=True)]
    act = simulate_activity(rng, n, p, silent_fraction=0.0)
    f0 = p.out_of_focus_brightness * rng.lognormal(0.0, 0.4, n)
    return SparseLayer(
        "background", patches_to_csr(patches, cshape), (f0[:, None] * (1.0 + act.calcium)).astype(np.float32)
    )


def _blobs(p: SimulationParams, seed: int, cshape: tuple[int, int]) -> Blobs:
    rng = rng_for(seed, "blobs")
    k, T = p.n_blobs, p.n_frames
    size = min(p.shape)
    start = rng.uniform([-0.1 * cshape[0], -0.1 * cshape[1]], [1.1 * cshape[0], 1.1 * cshape[1]], (k, 2))
    drift = p.blob_drift * ar1_process(rng, (k, 2, T), 10.0 * p.fps)
    centers = start[None] + np.moveaxis(drift, -1, 0)
    sigmas = rng.uniform(0.12, 0.3, k) * size
    amp0 = p.blob_amplitude * rng.lognormal(0.0, 0.3, k)
    f = p.blob_fluctuation
    z = ar1_process(rng, (k, T), 1.5 * p.fps)
    amplitudes = amp0[None, :] * np.exp(f * z - f**2 / 2).T
    return Blobs(centers.astype(np.float32), sigmas.astype(np.float32), amplitudes.astype(np.float32))
