"""Seeds for CNMF: over-complete candidates, cleansed and merged (sc-CNMF §3.2).

1. **Randomized max pooling** — ``pool_subsets`` max projections, each over a
   random ``pool_fraction`` of the frames, computed in one streaming pass over
   the movie (every frame chunk contributes to every projection). Local maxima
   of each projection's local contrast (Gaussian-smoothed by ``smooth_radii · r``
   minus a wide Gaussian of ``background_radii · r``), above ``pool_threshold``
   robust SDs and at least ``min_distance_radii · r`` apart; the union over
   projections, points closer than ``min_distance_radii · r`` collapsed into
   the most frequent one.
2. **Summary-image seeds** — local maxima of the correlation × PNR image above
   ``image_threshold`` robust SDs (of its local contrast).
3. **Cleansing** — each seed's trace (mean over a disk of r/2 on the detection
   movie) gives a peak–valley difference (max − min of the lightly smoothed
   trace) in units of its noise SD; a two-component Gaussian mixture on the
   log of these keeps the seeds in the upper component (posterior > 0.5).
   Seeds are activity seeds: silent cells have none and are left to the
   morphology detector (see :mod:`somaflow.extract.cnmf`).
4. **Merging** — seeds closer than ``merge_distance_radii · r`` whose traces
   are synchronous are one cell: the correlation of their traces restricted to
   the frames where either is active (above its median + 2 noise SD; a simpler
   stand-in for the paper's Hilbert phase locking) above ``merge_correlation``
   merges them, keeping the seed with the largest peak–valley difference.
"""

from __future__ import annotations

import logging
import math

import dask
import dask.array as da
import numpy as np
import scipy.sparse as sp
import xarray as xr
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage
from skimage.feature import peak_local_max

from somaflow.classify.lstm import seed_transient_probability
from somaflow.errors import InputError
from somaflow.robust import diff_noise_sd, robust_sd

log = logging.getLogger(__name__)



class SeedParams(BaseModel):
    """Parameters of :func:`find_seeds`; lengths in neuron radii r."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    neuron_radius: float = Field(5.0, gt=0, description="soma radius r (px)")
    pool_subsets: int = Field(12, ge=0, description="random max projections (0 = off)")
    pool_fraction: float = Field(0.1, gt=0, le=1, description="fraction of frames in each projection")
    pool_threshold: float = Field(3.0, ge=0, description="local-contrast threshold (robust SD)")
    image_threshold: float = Field(2.0, ge=0, description="summary-image threshold (robust SD)")
    smooth_radii: float = Field(0.5, ge=0, description="Gaussian smoothing of projections (r)")
    background_radii: float = Field(3.0, gt=0, description="wide Gaussian subtracted from projections (r)")
    min_distance_radii: float = Field(1.0, gt=0, description="minimum seed spacing (r)")
    gmm: bool = Field(True, description="cleanse seeds with a 2-component GMM on peak-valley")
    classifier: str = Field("none", pattern="^(none|lstm)$",
                            description="learned seed cleansing: 'lstm' also drops seeds whose trace the LSTM "
                                        "classifier (somaflow.classify.lstm) finds no transient in")
    classifier_weights: str = Field("default", description="LSTM checkpoint path/URL, or 'default'")
    classifier_threshold: float = Field(0.5, gt=0, lt=1, description="LSTM probability needed to keep a seed")
    inference: str = Field("local", exclude=True,
                           description="where the LSTM runs: 'local' or http://HOST:PORT (as CnnParams.inference)")
    fps: float | None = Field(None, gt=0, description="frame rate of the seed traces (Hz; the LSTM resamples "
                                                     "to 10 Hz)")
    min_pnr: float = Field(3.0, ge=0, description="seeds below this peak-valley/noise are dropped anyway")
    merge_distance_radii: float = Field(2.0, ge=0, description="merge synchronous seeds closer than this (r)")
    merge_correlation: float = Field(0.8, ge=-1, le=1, description="active-period correlation to merge")
    seed: int = Field(0, description="random generator seed of the frame subsets")

    @classmethod
    def for_movie(cls, fps: float, modality: str, neuron_radius: float) -> SeedParams:
        """Defaults for a movie: lengths follow ``neuron_radius``."""
        return cls(neuron_radius=float(neuron_radius), fps=float(fps))


def find_seeds(movie: xr.DataArray, images: xr.Dataset, params: SeedParams) -> xr.Dataset:
    """Seed pixels of candidate neurons.

    Parameters
    ----------
    movie : xarray.DataArray
        (frame, y, x) float detection movie (background-removed for 1p),
        dask- or numpy-backed; read twice (projections, seed traces).
    images : xarray.Dataset
        ``correlation_image`` and ``pnr_image`` (y, x).
    params : SeedParams

    Returns
    -------
    xarray.Dataset
        Over dim ``seed``: ``y``, ``x`` (int64 px), ``pnr`` (float32 peak-valley
        / noise), ``source`` (str) and
        ``traces`` (seed, frame) float32 — the seed traces on ``movie``.
        ``source`` is ``pool`` or ``image``.
    """
    if tuple(movie.dims) != ("frame", "y", "x"):
        raise InputError(f"find_seeds needs dims (frame, y, x), got {movie.dims}.")
    shape = (int(movie.sizes["y"]), int(movie.sizes["x"]))
    r = params.neuron_radius
    points: list[np.ndarray] = []
    sources: list[np.ndarray] = []
    if params.pool_subsets > 0:
        pooled = _pool_seeds(movie, params)
        points.append(pooled)
        sources.append(np.full(len(pooled), "pool"))
    act = np.clip(np.asarray(images["correlation_image"], np.float32), 0, None) * np.asarray(
        images["pnr_image"], np.float32
    )
    pts = _maxima(_contrast(act, params), params.image_threshold, params.min_distance_radii * r)
    points.append(pts)
    sources.append(np.full(len(pts), "image"))
    pts = np.concatenate(points) if points else np.zeros((0, 2), np.int64)
    src = np.concatenate(sources) if sources else np.zeros(0, "<U5")
    pts, src = _collapse(pts, src, params.min_distance_radii * r)
    traces = seed_traces(movie, pts, max(1.0, r / 2)) if len(pts) else np.zeros((0, movie.sizes["frame"]), np.float32)
    pnr = _peak_valley(traces)
    keep = pnr >= params.min_pnr
    if params.gmm and len(pts) >= 8:
        keep &= _gmm_upper(np.log(np.maximum(pnr, 1e-3)))
    if params.classifier == "lstm" and keep.any():

        prob = seed_transient_probability(traces[keep], params.fps or 10.0, weights=params.classifier_weights,
                                          inference=params.inference)
        lstm_keep = np.zeros_like(keep)
        lstm_keep[np.flatnonzero(keep)] = prob >= params.classifier_threshold
        log.info("LSTM seed cleansing: %d of %d seeds hold a transient", int(lstm_keep.sum()), int(keep.sum()))
        keep &= lstm_keep
    pts, src, traces, pnr = pts[keep], src[keep], traces[keep], pnr[keep]
    order = _merge(pts, traces, pnr, params)
    pts, src, traces, pnr = pts[order], src[order], traces[order], pnr[order]
    log.info("seeds: %d kept (%s)", len(pts), {s: int((src == s).sum()) for s in ("pool", "image")})
    return xr.Dataset(
        {
            "y": ("seed", pts[:, 0].astype(np.int64)),
            "x": ("seed", pts[:, 1].astype(np.int64)),
            "pnr": ("seed", pnr.astype(np.float32)),
            "source": ("seed", src.astype(str)),
            "traces": (("seed", "frame"), traces.astype(np.float32)),
        },
        attrs={"frame_shape": list(shape)},
    )


def seed_traces(movie: xr.DataArray, points: np.ndarray, radius: float) -> np.ndarray:
    """Mean of ``movie`` over a disk of ``radius`` px around each point, (seed, frame) float32.

    Only a small window around each point is read, so any chunking works
    (pixel-contiguous chunks included).
    """
    ny, nx = int(movie.sizes["y"]), int(movie.sizes["x"])
    k = int(math.ceil(radius))
    data = movie.data
    out = []
    for y, x in np.asarray(points, np.int64):
        y0, y1, x0, x1 = max(0, y - k), min(ny, y + k + 1), max(0, x - k), min(nx, x + k + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        w = ((yy - y) ** 2 + (xx - x) ** 2 <= radius**2 + 1e-9).astype(np.float32)
        w /= w.sum()
        win = data[:, y0:y1, x0:x1]
        out.append((win.astype(np.float32) * w[None]).sum(axis=(1, 2)))
    if not out:
        return np.zeros((0, int(movie.sizes["frame"])), np.float32)
    if isinstance(data, da.Array):
        out = list(dask.compute(*out))
    return np.stack([np.asarray(o, np.float32) for o in out])


def disk_matrix(points: np.ndarray, shape: tuple[int, int], radius: float) -> sp.csr_matrix:
    """Rows of 1/n over a disk of ``radius`` px around each (y, x) point, (n_points, y*x) CSR."""
    ny, nx = shape
    k = int(math.ceil(radius))
    dy, dx = np.mgrid[-k : k + 1, -k : k + 1]
    inside = dy**2 + dx**2 <= radius**2 + 1e-9
    dy, dx = dy[inside], dx[inside]
    rows, cols, vals = [], [], []
    for i, (y, x) in enumerate(np.asarray(points, np.int64)):
        yy, xx = y + dy, x + dx
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        idx = yy[ok] * nx + xx[ok]
        rows.append(np.full(len(idx), i))
        cols.append(idx)
        vals.append(np.full(len(idx), 1.0 / max(len(idx), 1), np.float32))
    n = len(points)
    if n == 0:
        return sp.csr_matrix((0, ny * nx), dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, ny * nx))


# ------------------------------------------------------------------ internals
def _pool_projections(movie: xr.DataArray, params: SeedParams) -> np.ndarray:
    """(pool_subsets, y, x) max projections over random frame subsets, one pass, any chunking."""
    data = movie.data
    k = params.pool_subsets
    n = int(movie.sizes["frame"])
    rng = np.random.default_rng(params.seed)
    member = rng.random((k, n)) < params.pool_fraction
    member[np.arange(k), rng.integers(0, n, k)] = True  # never empty
    if not isinstance(data, da.Array):
        arr = np.asarray(data, np.float32)
        return np.stack([arr[m].max(axis=0) for m in member])

    def block(b: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        t0, t1 = block_info[0]["array-location"][0] if block_info else (0, b.shape[0])
        return _block_max(b, member[:, t0:t1])

    nfb = len(data.chunks[0])
    parts = da.map_blocks(block, data, chunks=((k,) * nfb, data.chunks[1], data.chunks[2]), dtype=np.float32,
                          meta=np.empty((0, 0, 0), np.float32))
    stacked = da.stack([parts[i * k : (i + 1) * k] for i in range(nfb)])
    return np.asarray(stacked.max(axis=0).compute())


def _block_max(block: np.ndarray, member: np.ndarray) -> np.ndarray:
    b = np.asarray(block, np.float32)
    out = np.full((member.shape[0],) + b.shape[1:], -np.inf, np.float32)
    for j, m in enumerate(member):
        if m.any():
            out[j] = b[m].max(axis=0)
    return out


def _pool_seeds(movie: xr.DataArray, params: SeedParams) -> np.ndarray:
    r = params.neuron_radius
    found = []
    for proj in _pool_projections(movie, params):
        proj = np.where(np.isfinite(proj), proj, np.nanmin(proj[np.isfinite(proj)]) if np.isfinite(proj).any() else 0)
        found.append(_maxima(_contrast(proj, params), params.pool_threshold, params.min_distance_radii * r))
    pts = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    pts, _ = _collapse(pts, np.full(len(pts), "pool"), params.min_distance_radii * r)
    return pts


def _contrast(img: np.ndarray, params: SeedParams) -> np.ndarray:
    """Local contrast in robust SD units: small Gaussian minus wide Gaussian."""
    r = params.neuron_radius
    img = np.asarray(img, np.float32)
    c = ndimage.gaussian_filter(img, params.smooth_radii * r) - ndimage.gaussian_filter(img, params.background_radii * r)
    med = np.median(c)
    sd = robust_sd(c)
    return (c - med) / sd if sd > 0 else c - med


def _maxima(img: np.ndarray, threshold: float, min_distance: float) -> np.ndarray:
    pts = peak_local_max(img, min_distance=max(1, int(round(min_distance))), threshold_abs=threshold,
                         exclude_border=False)
    return np.asarray(pts, np.int64).reshape(-1, 2)


def _collapse(pts: np.ndarray, src: np.ndarray, dist: float) -> tuple[np.ndarray, np.ndarray]:
    """Collapse points closer than ``dist``: keep the one with most neighbours (ties: first)."""
    if len(pts) == 0:
        return pts.reshape(0, 2), src
    from scipy.spatial import cKDTree

    tree = cKDTree(pts)
    counts = np.array([len(n) for n in tree.query_ball_point(pts, dist)])
    order = np.lexsort((np.array([0 if s == "pool" else 1 for s in src]), -counts))
    taken = np.zeros(len(pts), bool)
    keep = []
    for i in order:
        if taken[i]:
            continue
        keep.append(i)
        taken[tree.query_ball_point(pts[i], dist)] = True
    keep_arr = np.array(keep, np.int64)
    return pts[keep_arr], src[keep_arr]


def _noise(tr: np.ndarray) -> np.ndarray:
    return np.maximum(diff_noise_sd(tr, axis=-1), 1e-9)


def _peak_valley(traces: np.ndarray) -> np.ndarray:
    if traces.shape[0] == 0 or traces.shape[1] < 3:
        return np.zeros(traces.shape[0], np.float32)
    sm = ndimage.uniform_filter1d(traces, 3, axis=-1)
    return ((sm.max(-1) - np.median(sm, -1)) / _noise(traces)).astype(np.float32)


def _gmm_upper(v: np.ndarray, iters: int = 200) -> np.ndarray:
    """Two-component 1-D Gaussian mixture by EM; True for points in the upper component.

    Falls back to all-True when the two components are not separated —
    Ashman's D = √2 |μ₁ − μ₂| / √(σ₁² + σ₂²) below 2 — then there is one
    population and nothing to cleanse.
    """
    v = np.asarray(v, np.float64)
    lo, hi = np.percentile(v, [25, 75])
    mu = np.array([lo, hi])
    sd = np.full(2, max(v.std(), 1e-6))
    w = np.array([0.5, 0.5])
    for _ in range(iters):
        ll = -0.5 * ((v[:, None] - mu) / sd) ** 2 - np.log(sd) + np.log(w)
        ll -= ll.max(axis=1, keepdims=True)
        resp = np.exp(ll)
        resp /= resp.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0) + 1e-12
        new_mu = (resp * v[:, None]).sum(0) / nk
        sd = np.sqrt((resp * (v[:, None] - new_mu) ** 2).sum(0) / nk) + 1e-6
        w = nk / nk.sum()
        if np.allclose(new_mu, mu, atol=1e-8):
            mu = new_mu
            break
        mu = new_mu
    upper = int(np.argmax(mu))
    if math.sqrt(2) * abs(mu[1] - mu[0]) / math.sqrt(float((sd**2).sum())) < 2:
        return np.ones(len(v), bool)
    return resp[:, upper] > 0.5


def _merge(pts: np.ndarray, traces: np.ndarray, pnr: np.ndarray, params: SeedParams) -> np.ndarray:
    """Indices of the seeds kept after merging synchronous neighbours (brightest first)."""
    n = len(pts)
    if n < 2 or params.merge_distance_radii <= 0:
        return np.arange(n)
    from scipy.spatial import cKDTree

    tree = cKDTree(pts)
    noise = _noise(traces)
    active = traces > (np.median(traces, -1, keepdims=True) + 2 * noise[:, None])
    order = np.argsort(-pnr, kind="stable")
    removed = np.zeros(n, bool)
    for i in order:
        if removed[i]:
            continue
        for j in tree.query_ball_point(pts[i], params.merge_distance_radii * params.neuron_radius):
            if j == i or removed[j] or pnr[j] > pnr[i]:
                continue
            both = active[i] | active[j]
            if both.sum() < 3:
                continue
            a, b = traces[i, both], traces[j, both]
            if a.std() == 0 or b.std() == 0:
                continue
            if float(np.corrcoef(a, b)[0, 1]) > params.merge_correlation:
                removed[j] = True
    return np.flatnonzero(~removed)
