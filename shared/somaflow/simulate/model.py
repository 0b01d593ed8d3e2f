"""``simulate``: a seeded calcium-imaging session with its ground truth."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from somaflow.errors import ParameterError
from somaflow.simulate.footprints import dense_stack
from somaflow.simulate.params import SimulationParams
from somaflow.simulate.presets import resolve_params
from somaflow.simulate.render import clean_canvas, render_frames
from somaflow.simulate.scene import Scene, Truth, build_scene

log = logging.getLogger(__name__)

#: ``Simulation.movie`` refuses to build an in-memory movie larger than this
MAX_IN_MEMORY_BYTES = 2 * 1024**3

SHIFT_CONVENTION = (
    "shifts[t] = (dy, dx) is the displacement of the tissue in frame t relative to the "
    "ground-truth coordinates: frame_t(y, x) = reference(y - dy, x - dx); "
    "scipy.ndimage.shift(frame_t, -shifts[t]) registers a frame"
)
TRACE_UNITS = (
    "calcium and dff are dF/F (0 at rest); traces = baseline * calcium, photons per pixel per frame "
    "at the footprint maximum; spikes are spike counts per frame"
)


@dataclass(eq=False)
class Simulation:
    """A simulated session and its ground truth.

    Attributes
    ----------
    params : SimulationParams
    seed : int
    calcium : ndarray, (unit, frame) float32
        True calcium as dF/F (0 at rest, silent cells all 0).
    spikes : ndarray, (unit, frame) float32
        Spike counts per frame.
    shifts : ndarray, (frame, axis) float32
        Rigid (frame-mean) displacement (dy, dx) in px, see :data:`SHIFT_CONVENTION`.
    patch_shifts : ndarray, (frame, patch_y, patch_x, axis) float32 or None
        Total displacement at the centres of a coarse patch grid (non-rigid motion only);
        the centres are ``meta["patch_centers"]``.
    active : ndarray, (unit,) bool
        False for silent cells (visible by their baseline fluorescence only).
    doughnut : ndarray, (unit,) bool
        True for cells with a dark nucleus.
    centers : ndarray, (unit, 2) float32
        Soma centres (y, x), px.
    radii : ndarray, (unit,) float32
        Soma radii, px.
    baseline : ndarray, (unit,) float32
        Resting fluorescence F0 at the footprint maximum, photons/pixel/frame.
    ar_coefficients : ndarray, (unit, ar_order) float32
        Each cell's AR calcium coefficients at the movie's frame rate.
    snr : ndarray, (unit,) float32
        Peak SNR: the largest calcium transient summed over the mask, over the
        shot plus read noise of that mask sum at the mean brightness (0 for silent cells).
    meta : dict
        JSON-serialisable: fps, modality, neuron_radius, preset, seed, shape
        ``[frames, y, x]``, n_units, conventions and ``params`` (every parameter).
    scene, truth
        The generative model, used to render frames (see :mod:`.render`).
    """

    params: SimulationParams
    seed: int
    calcium: np.ndarray
    spikes: np.ndarray
    shifts: np.ndarray
    patch_shifts: np.ndarray | None
    active: np.ndarray
    doughnut: np.ndarray
    centers: np.ndarray
    radii: np.ndarray
    baseline: np.ndarray
    ar_coefficients: np.ndarray
    snr: np.ndarray
    meta: dict[str, Any]
    scene: Scene = field(repr=False)
    truth: Truth = field(repr=False)

    @property
    def n_units(self) -> int:
        """Number of ground-truth cells."""
        return int(self.calcium.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """Movie shape (frame, y, x)."""
        return (self.params.n_frames, *self.params.shape)

    @cached_property
    def footprints(self) -> np.ndarray:
        """True spatial footprints, (unit, y, x) float32, each max-normalised to 1."""
        return dense_stack(self.truth.footprints, self.params.shape, np.float32)

    @cached_property
    def masks(self) -> np.ndarray:
        """True ROI masks, (unit, y, x) bool: footprint >= ``mask_threshold`` x max,
        the connected part around the maximum, nucleus hole filled."""
        return dense_stack(self.truth.masks, self.params.shape, bool)

    @cached_property
    def movie(self) -> np.ndarray:
        """The whole movie, (frame, y, x) uint16 ADU, rendered on first access.

        Raises
        ------
        ParameterError
            The movie would exceed :data:`MAX_IN_MEMORY_BYTES`; stream it with
            :func:`~somaflow.simulate.stream.iter_movie_chunks` or write it with
            :func:`~somaflow.simulate.write.write_simulation` instead.
        """
        nbytes = self.params.movie_nbytes
        if nbytes > MAX_IN_MEMORY_BYTES:
            raise ParameterError(
                f"the {self.params.name!r} movie is {nbytes / 1024**3:.1f} GiB, too large to hold in memory; "
                "use iter_movie_chunks(sim) or write_simulation(sim, OUT_DIR) to stream it."
            )
        return render_frames(self, 0, self.params.n_frames)


def simulate(preset: str | SimulationParams = "2p-small", seed: int = 0, **overrides: Any) -> Simulation:
    """Simulate a calcium-imaging session with ground truth.

    The movie itself is rendered lazily (``Simulation.movie``, or streamed with
    ``iter_movie_chunks``); this call draws every component and the ground truth.

    Parameters
    ----------
    preset : str or SimulationParams
        A name from :data:`~somaflow.simulate.presets.PRESETS` or explicit parameters.
    seed : int
        Non-negative seed; the same seed and parameters give the same movie, bit for bit.
    **overrides
        Field values replacing those of the preset, e.g. ``n_frames=100``.

    Returns
    -------
    Simulation

    Raises
    ------
    ParameterError
        Unknown preset or parameter, invalid value, negative seed, or cells that do not fit.
    """
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}.")
    seed = int(seed)
    p = resolve_params(preset, **overrides)
    t0 = time.perf_counter()
    scene, truth = build_scene(p, seed)
    act = truth.activity
    n = p.n_cells
    snr = _peak_snr(scene, truth)
    motion = scene.motion
    meta: dict[str, Any] = {
        "fps": float(p.fps),
        "modality": p.modality,
        "neuron_radius": float(p.neuron_radius),
        "preset": p.name,
        "seed": seed,
        "shape": [p.n_frames, *p.shape],
        "n_units": n,
        "n_active": int(act.active.sum()),
        "n_doughnut": int(sum(s.doughnut for s in truth.shapes)),
        "mask_threshold": float(p.mask_threshold),
        "gain": float(p.gain),
        "offset": float(p.offset),
        "median_snr": float(np.median(snr[act.active])) if act.active.any() else 0.0,
        "patch_centers": [motion.patch_centers[0].tolist(), motion.patch_centers[1].tolist()]
        if motion.control is not None
        else None,
        "shift_convention": SHIFT_CONVENTION,
        "trace_units": TRACE_UNITS,
        "mask_definition": (
            f"footprint >= {p.mask_threshold:g} x its max, the 8-connected region holding the max, "
            "holes (a doughnut's nucleus) filled"
        ),
        "params": p.to_dict(),
    }
    sim = Simulation(
        params=p,
        seed=seed,
        calcium=act.calcium,
        spikes=act.spikes,
        shifts=motion.rigid,
        patch_shifts=motion.patch_shifts,
        active=act.active,
        doughnut=np.array([s.doughnut for s in truth.shapes], dtype=bool),
        centers=np.array([s.center for s in truth.shapes], dtype=np.float32).reshape(n, 2),
        radii=np.array([s.radius for s in truth.shapes], dtype=np.float32),
        baseline=truth.baseline,
        ar_coefficients=act.ar_coefficients,
        snr=snr,
        meta=meta,
        scene=scene,
        truth=truth,
    )
    log.debug("built scene %s seed %d in %.2f s", p.name, seed, time.perf_counter() - t0)
    return sim


def _peak_snr(scene: Scene, truth: Truth) -> np.ndarray:
    """Per-cell peak SNR of the mask-summed trace (photon and read noise at mean brightness)."""
    p = scene.params
    n = p.n_cells
    if n == 0:
        return np.zeros(0, np.float32)
    idx = np.unique(np.linspace(0, p.n_frames - 1, min(8, p.n_frames)).round().astype(int))
    pad, (Y, X) = scene.pad, p.shape
    mean_lam = clean_canvas(scene, idx).mean(axis=0)[pad : pad + Y, pad : pad + X] * scene.vignette
    light = scene.tissue[pad : pad + Y, pad : pad + X] * scene.vignette * float(scene.frame_gain.mean())
    read_var = (p.read_noise / p.gain) ** 2
    peak = truth.activity.calcium.max(axis=1)
    out = np.zeros(n, np.float32)
    for i, (fp, mask) in enumerate(zip(truth.footprints, truth.masks, strict=True)):
        (sy, sx), m = mask.clipped(p.shape)
        (fy, fx), f = fp.clipped(p.shape)
        if not m.any():
            continue
        fpm = np.zeros((Y, X), np.float32)
        fpm[fy, fx] = f
        sel = np.zeros((Y, X), bool)
        sel[sy, sx] = m
        signal = peak[i] * truth.baseline[i] * float((fpm * light)[sel].sum())
        noise = np.sqrt(float(mean_lam[sel].sum()) + sel.sum() * read_var)
        out[i] = signal / noise
    return out
