"""Turn a :class:`~somaflow.simulate.scene.Scene` into frames, block by block.

Frames are computed in fixed blocks of :data:`BLOCK` frames aligned on frame 0,
and the shot/read noise of block ``b`` comes from its own random stream
``(seed, "noise", b)``. Any frame range is therefore bit-identical whether it is
rendered at once or chunk by chunk, and memory is bounded by the block size
(about ``BLOCK x canvas pixels x 12`` bytes).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from somaflow.errors import ParameterError
from somaflow.simulate._rng import rng_for
from somaflow.simulate.fields import render_blobs
from somaflow.simulate.motion import warp
from somaflow.simulate.scene import KINDS, DenseLayer, Scene


class HasScene(Protocol):
    """Anything that carries a scene (a :class:`~somaflow.simulate.model.Simulation`)."""

    scene: Scene

log = logging.getLogger(__name__)

#: frames per internal render block (the unit of determinism)
BLOCK = 32


def _scene(sim: HasScene | Scene) -> Scene:
    return sim if isinstance(sim, Scene) else sim.scene


def clean_canvas(scene: Scene, frames: slice | np.ndarray, components: Iterable[str] = KINDS) -> np.ndarray:
    """Expected photons on the canvas, before motion, vignetting and noise.

    Parameters
    ----------
    scene : Scene
    frames : slice or int array
        Frames to render.
    components : iterable of {"cells", "neuropil", "background"}
        Which parts of the model to include.

    Returns
    -------
    ndarray, (B, Yc, Xc) float32
        Photons per pixel per frame on the canvas (field of view plus ``scene.pad``).
    """
    comps = set(components)
    unknown = comps - set(KINDS)
    if unknown:
        raise ParameterError(f"unknown components {sorted(unknown)}; choose from {KINDS}.")
    gain = scene.frame_gain[frames]
    n = gain.shape[0]
    yc, xc = scene.canvas_shape
    canvas = np.zeros((n, yc * xc), dtype=np.float32)
    for layer in scene.layers:
        if layer.kind not in comps:
            continue
        temporal = layer.temporal[:, frames]
        if isinstance(layer, DenseLayer):
            canvas += temporal.T @ layer.spatial
        elif layer.spatial.nnz:
            canvas += np.asarray(layer.spatial @ temporal).T
    canvas = canvas.reshape(n, yc, xc)
    if scene.blobs is not None and "background" in comps:
        b = scene.blobs
        canvas += render_blobs(b.centers[frames], b.sigmas, b.amplitudes[frames], (yc, xc))
    canvas *= scene.tissue[None]
    canvas *= gain[:, None, None]
    return canvas


def _render_block(scene: Scene, block: int, comps: tuple[str, ...], motion: bool, noise: bool) -> np.ndarray:
    p = scene.params
    f0, f1 = block * BLOCK, min((block + 1) * BLOCK, p.n_frames)
    frames = slice(f0, f1)
    canvas = clean_canvas(scene, frames, comps)
    pad, (Y, X) = scene.pad, p.shape
    if motion and p.motion != "none":
        lam = warp(canvas, scene.motion, frames, pad, p.interpolation_order)
    else:
        lam = np.ascontiguousarray(canvas[:, pad : pad + Y, pad : pad + X])
    lam *= scene.vignette[None]
    np.maximum(lam, 0.0, out=lam)
    if not noise:
        return lam * np.float32(p.gain) + np.float32(p.offset)
    rng = rng_for(scene.seed, "noise", block)
    adu = rng.poisson(lam).astype(np.float32)
    adu *= np.float32(p.gain)
    if p.read_noise > 0:
        adu += np.float32(p.read_noise) * rng.standard_normal(lam.shape, dtype=np.float32)
    adu += np.float32(p.offset)
    np.rint(adu, out=adu)
    np.clip(adu, 0, 65535, out=adu)
    return adu.astype(np.uint16)


def render_frames(
    sim: HasScene | Scene,
    start: int = 0,
    stop: int | None = None,
    *,
    components: Iterable[str] = KINDS,
    motion: bool = True,
    noise: bool = True,
) -> np.ndarray:
    """Render frames ``start:stop`` of a simulated movie.

    Parameters
    ----------
    sim : Simulation or Scene
    start, stop : int
        Frame range (``stop`` defaults to the last frame).
    components : iterable of {"cells", "neuropil", "background"}
        Parts of the model to include (default all). Camera offset is always added.
    motion : bool
        Apply the simulated motion (default True).
    noise : bool
        Draw Poisson shot noise and Gaussian read noise (default True).

    Returns
    -------
    ndarray, (frame, y, x)
        uint16 ADU when ``noise`` (clipped to [0, 65535]); otherwise float32
        expected ADU, ``gain * photons + offset``.
    """
    scene = _scene(sim)
    T = scene.params.n_frames
    stop = T if stop is None else stop
    if not (0 <= start <= stop <= T):
        raise ParameterError(f"frame range {start}:{stop} is outside the movie's 0:{T}; pass 0 <= start <= stop <= {T}.")
    comps = tuple(components)
    Y, X = scene.params.shape
    out = np.empty((stop - start, Y, X), dtype=np.uint16 if noise else np.float32)
    if stop == start:
        return out
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        f0 = block * BLOCK
        data = _render_block(scene, block, comps, motion, noise)
        lo, hi = max(start, f0), min(stop, f0 + data.shape[0])
        out[lo - start : hi - start] = data[lo - f0 : hi - f0]
    return out
