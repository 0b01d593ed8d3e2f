"""Cell placement, soma footprints (ellipses, doughnuts, irregular outlines) and masks.

Footprints are built in small local patches and kept sparse, so that a
512 x 512 field with hundreds of cells costs a few megabytes, not gigabytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from somaflow.errors import ParameterError
from somaflow.simulate.fields import smooth_field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    """A local image ``data`` whose top-left pixel sits at (``y0``, ``x0``) of a larger grid."""

    y0: int
    x0: int
    data: np.ndarray

    def shifted(self, dy: int, dx: int) -> Patch:
        """The same patch in a grid whose origin is moved by (dy, dx)."""
        return Patch(self.y0 + dy, self.x0 + dx, self.data)

    def clipped(self, shape: tuple[int, int]) -> tuple[tuple[slice, slice], np.ndarray]:
        """(target slices, data) of the part of the patch inside a grid of ``shape``."""
        h, w = self.data.shape
        ty0, tx0 = max(self.y0, 0), max(self.x0, 0)
        ty1, tx1 = min(self.y0 + h, shape[0]), min(self.x0 + w, shape[1])
        if ty1 <= ty0 or tx1 <= tx0:
            return (slice(0, 0), slice(0, 0)), self.data[:0, :0]
        data = self.data[ty0 - self.y0 : ty1 - self.y0, tx0 - self.x0 : tx1 - self.x0]
        return (slice(ty0, ty1), slice(tx0, tx1)), data


def place_cells(
    rng: np.random.Generator,
    n: int,
    shape: tuple[int, int],
    radius: float,
    *,
    min_distance: float,
    overlap_fraction: float,
    forbidden: np.ndarray | None = None,
) -> np.ndarray:
    """Random soma centres with a minimum spacing and a share of partial overlaps.

    Parameters
    ----------
    n : int
        Number of centres.
    shape : (int, int)
        Field of view (y, x) in pixels; centres keep ``radius / 2`` from its edges.
    radius : float
        Median soma radius in pixels.
    min_distance : float
        Minimum centre distance in radii for ordinary cells.
    overlap_fraction : float
        Share of cells placed 1.0-1.6 radii from an existing cell (partial overlap).
    forbidden : ndarray (y, x) bool, optional
        Pixels where no centre may fall (blood vessels).

    Returns
    -------
    ndarray, (n, 2) float64
        Centres (y, x) in pixels.

    Raises
    ------
    ParameterError
        When the cells do not fit.
    """
    margin = radius / 2
    lo = np.array([margin, margin])
    hi = np.array([shape[0] - 1 - margin, shape[1] - 1 - margin])
    centres = np.empty((n, 2))
    dmin = min_distance * radius
    n_placed = 0
    for i in range(n):
        overlapping = n_placed > 0 and rng.random() < overlap_fraction
        for _attempt in range(200):
            if overlapping:
                j = rng.integers(n_placed)
                d = rng.uniform(1.0, 1.6) * radius
                a = rng.uniform(0, 2 * np.pi, 32)
                cand = centres[j] + d * np.stack([np.sin(a), np.cos(a)], axis=1)
            else:
                cand = rng.uniform(lo, hi, (32, 2))
            ok = np.all((cand >= lo) & (cand <= hi), axis=1)
            if forbidden is not None:
                iy = np.clip(np.round(cand[:, 0]).astype(int), 0, shape[0] - 1)
                ix = np.clip(np.round(cand[:, 1]).astype(int), 0, shape[1] - 1)
                ok &= ~forbidden[iy, ix]
            if n_placed:
                dist = np.linalg.norm(cand[:, None, :] - centres[None, :n_placed, :], axis=2)
                if overlapping:
                    others = np.delete(dist, j, axis=1)
                    ok &= dist[:, j] >= 0.95 * radius
                    ok &= np.all(others >= dmin, axis=1) if others.size else True
                else:
                    ok &= np.all(dist >= dmin, axis=1)
            if ok.any():
                centres[n_placed] = cand[np.argmax(ok)]
                n_placed += 1
                break
        else:
            raise ParameterError(
                f"could not place cell {i + 1} of {n}: {n} cells of radius {radius:g} px with "
                f"min_distance {min_distance:g} radii do not fit in {shape[0]}x{shape[1]} px. "
                "Lower n_cells or min_distance, or enlarge shape."
            )
    return centres


@dataclass(frozen=True)
class CellShape:
    """Geometry of one soma (pixels, radians)."""

    center: tuple[float, float]
    radius: float
    elongation: float
    angle: float
    harmonics: tuple[tuple[float, float], ...]
    doughnut: bool
    nucleus: float
    nucleus_depth: float


def draw_shapes(
    rng: np.random.Generator,
    centres: np.ndarray,
    radius: float,
    *,
    radius_jitter: float,
    eccentricity: float,
    irregularity: float,
    doughnut_fraction: float,
) -> list[CellShape]:
    """Random geometry for each centre (log-normal radius, ellipse, harmonics, doughnut)."""
    shapes = []
    for c in centres:
        shapes.append(
            CellShape(
                center=(float(c[0]), float(c[1])),
                radius=float(radius * rng.lognormal(0.0, radius_jitter)),
                elongation=float(rng.uniform(0, eccentricity)),
                angle=float(rng.uniform(0, np.pi)),
                harmonics=tuple(
                    (float(irregularity * rng.standard_normal() / (k - 1)), float(rng.uniform(0, 2 * np.pi)))
                    for k in (2, 3, 4)
                ),
                doughnut=bool(rng.random() < doughnut_fraction),
                nucleus=float(rng.uniform(0.45, 0.6)),
                nucleus_depth=float(rng.uniform(0.6, 0.9)),
            )
        )
    return shapes


def _local_coords(s: CellShape, half: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """Patch origin and (normalised elliptical radius, angle, distance) on the patch."""
    cy, cx = s.center
    y0, x0 = int(np.floor(cy)) - half, int(np.floor(cx)) - half
    yy = np.arange(y0, y0 + 2 * half + 2, dtype=np.float64)[:, None] - cy
    xx = np.arange(x0, x0 + 2 * half + 2, dtype=np.float64)[None, :] - cx
    ca, sa = np.cos(s.angle), np.sin(s.angle)
    u = yy * ca + xx * sa
    v = -yy * sa + xx * ca
    a, b = s.radius * (1 + s.elongation), s.radius / (1 + s.elongation)
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    theta = np.arctan2(v / b, u / a)
    wobble = 1.0 + sum(c * np.cos(k * theta + ph) for k, (c, ph) in zip((2, 3, 4), s.harmonics, strict=True))
    rho_eff = rho / np.maximum(wobble, 0.5)
    return y0, x0, rho_eff, theta, np.sqrt(yy**2 + xx**2)


def soma_footprint(
    rng: np.random.Generator, s: CellShape, *, blur: float, halo: float, texture: float = 0.08
) -> Patch:
    """The spatial footprint of one soma, max-normalised to 1.

    A soft-edged irregular ellipse; for doughnuts the nucleus (a concentric soft
    ellipse of relative size ``s.nucleus``) is darkened by ``s.nucleus_depth``.
    A faint multiplicative texture, the optical blur ``blur`` (Gaussian sigma, px)
    and, optionally, a wide scattering halo of relative amplitude ``halo`` follow.

    Returns
    -------
    Patch
        float32 data in [0, 1], on the grid of ``s.center``.
    """
    a = s.radius * (1 + s.elongation)
    half = int(np.ceil(a * 1.35 + 4 * blur + 2 + (4.5 * s.radius if halo > 0 else 0)))
    y0, x0, rho, _theta, dist = _local_coords(s, half)
    edge = 0.5 / s.radius
    f = 0.5 * (1 - np.tanh((rho - 1) / edge))
    if s.doughnut:
        nucleus = 0.5 * (1 - np.tanh((rho / s.nucleus - 1) / (0.7 / (s.radius * s.nucleus))))
        f = f * (1 - s.nucleus_depth * nucleus)
    if texture > 0:
        f = f * np.maximum(1 + texture * smooth_field(rng, f.shape, 1.0), 0)
    if blur > 0:
        f = ndimage.gaussian_filter(f, blur, mode="constant")
    if halo > 0:
        f = f / f.max() + halo * np.exp(-0.5 * (dist / (1.5 * s.radius)) ** 2)
    f = f / f.max()
    f[f < 1e-3] = 0.0
    return Patch(y0, x0, f.astype(np.float32))


def surround_footprint(rng: np.random.Generator, s: CellShape, *, blur: float) -> Patch:
    """A cell's own processes: a faint, anisotropic halo around the soma, max 1, zero inside."""
    half = int(np.ceil(3.5 * s.radius * (1 + s.elongation) + 2))
    y0, x0, rho, theta, _ = _local_coords(s, half)
    outside = np.maximum(rho - 1.0, 0.0) * s.radius
    lobes = 1.0 + sum(
        0.5 / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3)
    )
    f = np.exp(-outside / (0.8 * s.radius)) * np.maximum(lobes, 0)
    f *= 0.5 * (1 + np.tanh((rho - 1.1) / (0.5 / s.radius)))
    f = ndimage.gaussian_filter(f, max(blur, 1.0), mode="constant")
    f /= f.max()
    f[f < 1e-2] = 0.0
    return Patch(y0, x0, f.astype(np.float32))


def gaussian_footprint(center: tuple[float, float], sigma: float) -> Patch:
    """An isotropic Gaussian patch (peak 1) truncated at 3 sigma: an out-of-focus neuron."""
    half = int(np.ceil(3 * sigma))
    cy, cx = center
    y0, x0 = int(np.floor(cy)) - half, int(np.floor(cx)) - half
    yy = np.arange(y0, y0 + 2 * half + 2)[:, None] - cy
    xx = np.arange(x0, x0 + 2 * half + 2)[None, :] - cx
    f = np.exp(-0.5 * (yy**2 + xx**2) / sigma**2)
    f[f < 1e-2] = 0.0
    return Patch(y0, x0, f.astype(np.float32))


def footprint_mask(fp: Patch, threshold: float) -> Patch:
    """The ground-truth mask of a footprint.

    Pixels above ``threshold`` x max, the connected component (8-connectivity)
    that holds the maximum, with interior holes (a doughnut's nucleus) filled,
    as a human annotator would draw the soma.
    """
    above = fp.data >= threshold * fp.data.max()
    labels, _ = ndimage.label(above, structure=np.ones((3, 3)))
    peak = np.unravel_index(np.argmax(fp.data), fp.data.shape)
    mask = ndimage.binary_fill_holes(labels == labels[peak])
    return Patch(fp.y0, fp.x0, mask)


def patches_to_csr(patches: list[Patch], shape: tuple[int, int], dtype: type = np.float32) -> sp.csr_matrix:
    """Stack patches as the columns of a sparse (pixels, n) matrix on a grid of ``shape``.

    Pixels are raveled in C order (y major). Parts of patches outside the grid are dropped.
    """
    rows, cols, vals = [], [], []
    for j, p in enumerate(patches):
        (sy, sx), data = p.clipped(shape)
        if data.size == 0:
            continue
        yy, xx = np.nonzero(data)
        rows.append((yy + sy.start) * shape[1] + (xx + sx.start))
        cols.append(np.full(yy.size, j))
        vals.append(data[yy, xx])
    n_pix = shape[0] * shape[1]
    if not rows:
        return sp.csr_matrix((n_pix, len(patches)), dtype=dtype)
    return sp.csr_matrix(
        (np.concatenate(vals).astype(dtype), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_pix, len(patches)),
    )


def dense_stack(patches: list[Patch], shape: tuple[int, int], dtype: type = np.float32) -> np.ndarray:
    """Patches as a dense (n, y, x) array on a grid of ``shape``."""
    out = np.zeros((len(patches), *shape), dtype=dtype)
    for j, p in enumerate(patches):
        (sy, sx), data = p.clipped(shape)
        if data.size:
            out[j, sy, sx] = data
    return out
