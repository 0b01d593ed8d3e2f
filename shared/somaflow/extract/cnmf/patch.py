"""CNMF on one patch (step 4 of :mod:`somaflow.extract.cnmf`): greedy and residual
initialisation, background, HALS updates of footprints and traces, local merging.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from somaflow.extract.cnmf.params import CnmfParams
from somaflow.extract.seeds import _noise

log = logging.getLogger(__name__)


@dataclass
class PatchFit:
    """Components of one patch, in full-frame pixel indices."""

    footprints: sp.csr_matrix  # (k, y*x) float32, max 1
    traces: np.ndarray  # (k, T_fit) float32
    snr: np.ndarray  # (k,)
    spatial_corr: np.ndarray  # (k,)
    background: sp.csr_matrix  # (1 + n_background, y*x) patch-core background maps
    origin: np.ndarray  # (k,) int: index of the morphology mask that seeded it, -1 for activity seeds


def fit_patch(
    block: np.ndarray,
    seeds: np.ndarray,
    pnr: np.ndarray,
    in_core: np.ndarray,
    region: tuple[slice, slice],
    core: tuple[slice, slice],
    shape: tuple[int, int],
    params: CnmfParams,
    morph: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> PatchFit:
    """CNMF on one patch (step 4 of the module docstring).

    Parameters
    ----------
    block : ndarray, (T, h, w)
        The patch region of the fit movie.
    seeds : ndarray, (n, 2) int
        Seeds inside the region, full-frame (y, x).
    pnr : ndarray, (n,)
        Seed strength (initialisation order).
    in_core : ndarray, (n,) bool
        Seeds whose components are returned.
    region, core : tuple of slice
        The region read and the core owned, full-frame.
    shape : (int, int)
        Full frame (y, x).
    morph : (ids, masks, in_core), optional
        Morphology masks whose centroid lies in the region: their indices,
        (n, h, w) bool patch-local masks and which are owned by the core.
        Each one no component covers becomes a component (mask-weighted
        footprint, trace regressed from the residual) after the seeds.
    """
    Y3 = np.asarray(block, np.float32)
    T, h, w = Y3.shape
    Y = Y3.reshape(T, h * w).T.copy()  # (P, T)
    r = params.neuron_radius
    # initialise on a spatially smoothed copy: single pixels are too noisy to correlate
    sm = ndimage.gaussian_filter(Y3, (0, params.init_smooth_radii * r, params.init_smooth_radii * r))
    del Y3
    R = sm.reshape(T, h * w).T.copy()
    del sm
    R -= np.percentile(R, 20, axis=1).astype(np.float32)[:, None]
    local = seeds - np.array([region[0].start, region[1].start])
    order = np.argsort(-pnr, kind="stable")
    half = int(math.ceil(params.window_radii * r))
    A_cols, C_rows, windows, keep_core = [], [], [], []
    for i in order:
        y, x = local[i]
        win = _window(y, x, half, h, w)
        a, c = _init_component(R, win, (y, x), (h, w), params)
        if a is None:
            continue
        R[win] -= np.outer(a[win], c)
        A_cols.append(a)
        C_rows.append(c)
        windows.append(win)
        keep_core.append(bool(in_core[i]))
    origin = [-1] * len(A_cols)
    if morph is not None and len(morph[0]):
        origin += _add_morphology(R, morph, A_cols, C_rows, windows, keep_core, (h, w), params)
    # residual seeding (CNMF-E's greedy initialisation): neighbours hidden under a
    # brighter cell's blur surface once it is subtracted
    cy0, cy1 = core[0].start - region[0].start, core[0].stop - region[0].start
    cx0, cx1 = core[1].start - region[1].start, core[1].stop - region[1].start
    for _ in range(params.residual_rounds):
        img = _residual_pnr(R, (h, w), r)
        pts = _local_peaks(img, params.residual_pnr, max(2.0, params.residual_spacing_radii * r))
        added = 0
        for y, x in pts:
            win = _window(int(y), int(x), half, h, w)
            a, c = _init_component(R, win, (int(y), int(x)), (h, w), params)
            if a is None:
                continue
            R[win] -= np.outer(a[win], c)
            A_cols.append(a)
            C_rows.append(c)
            windows.append(win)
            keep_core.append(bool(cy0 <= y < cy1 and cx0 <= x < cx1))
            origin.append(-1)
            added += 1
        log.debug("residual round: %d peaks, %d added", len(pts), added)
        if added == 0:
            break
    nb = params.n_background
    empty_bg = _background_maps(np.zeros(h * w, np.float32), np.zeros((h * w, 0), np.float32), region, core, shape)
    if not A_cols:
        return PatchFit(sp.csr_matrix((0, shape[0] * shape[1]), dtype=np.float32), np.zeros((0, T), np.float32),
                        np.zeros(0), np.zeros(0), empty_bg, np.zeros(0, int))
    A = np.stack(A_cols, axis=1)  # (P, K)
    C = np.stack(C_rows)  # (K, T)
    n_init = A.shape[1]
    keep_core_arr = np.array(keep_core)
    origin_arr = np.array(origin, int)
    support = _grow_support(A, _supports(windows, h * w), windows, (h, w),
                            steps=max(1, int(round(params.support_growth_radii * r))))
    b = np.zeros((h * w, nb), np.float32)
    f = np.zeros((nb, T), np.float32)
    for _ in range(params.iterations):
        b0, b, f = _update_background(Y, A, C, nb)
        C = _hals_temporal(Y, A, C, b0, b, f, params.hals_sweeps)
        A = _hals_spatial(Y, A, C, b0, b, f, support, params.hals_sweeps)
        A, C, keep = _normalize_drop(A, C)
        support, keep_core_arr, origin_arr = support[:, keep], keep_core_arr[keep], origin_arr[keep]
        windows = [wd for wd, k_ in zip(windows, keep, strict=True) if k_]
        A, C, support, keep_core_arr, windows, origin_arr = _merge_local(A, C, support, keep_core_arr, windows,
                                                                         origin_arr, params)
        if A.shape[1] == 0:
            break
    b0, b, f = _update_background(Y, A, C, nb)
    log.debug("patch %s: %d seeds, %d initialised, %d after fitting", core, len(seeds), n_init, A.shape[1])
    snr = _snr(C)
    rval = _spatial_corr(Y, A, C, b0, b, f)
    sel = keep_core_arr
    fp = _to_global(A[:, sel], region, shape)
    return PatchFit(fp, C[sel].astype(np.float32), snr[sel], rval[sel],
                    _background_maps(b0, b, region, core, shape), origin_arr[sel])


def _add_morphology(R: np.ndarray, morph: tuple[np.ndarray, np.ndarray, np.ndarray], A_cols: list, C_rows: list,
                    windows: list, keep_core: list, hw: tuple[int, int], params: CnmfParams) -> list[int]:
    """Seeded CNMF: each morphology mask no component covers becomes a component.

    Footprint: the mask, Gaussian-smoothed at 0.3 r (HALS reshapes it);
    trace: its regression on the residual ``R`` (updated in place), baseline
    (20th percentile) removed, clipped at 0. Appends to the lists; returns the
    origins (morphology indices) of the added components.
    """
    ids, masks, in_core = morph
    h, w = hw
    r = params.neuron_radius
    half = int(math.ceil(params.window_radii * r))
    have = [a.reshape(h, w) >= params.mask_fraction for a in A_cols]
    out: list[int] = []
    for j in np.argsort(-masks.reshape(len(masks), math.prod(masks.shape[1:])).sum(axis=1), kind="stable"):
        m = masks[j]
        area = int(m.sum())
        if area < 3:
            continue
        if any((m & c).sum() / max(int((m | c).sum()), 1) >= params.morph_covered_iou for c in have):
            continue
        cy, cx = np.argwhere(m).mean(axis=0).round().astype(int)
        win = _window(int(cy), int(cx), half, h, w)
        a = ndimage.gaussian_filter(m.astype(np.float32), max(0.5, 0.3 * r)).ravel()
        a[~np.isin(np.arange(h * w), win)] = 0
        a[a < 0.1 * a.max()] = 0
        a /= max(a.max(), 1e-12)
        aw = a[win]
        c = (aw @ R[win]) / max(float(aw @ aw), 1e-12)
        c = np.maximum(c - np.percentile(c, 20), 0).astype(np.float32)
        if not np.any(c > 0):
            c = np.full_like(c, 1e-3)
        R[win] -= np.outer(aw, c)
        A_cols.append(a.astype(np.float32))
        C_rows.append(c)
        windows.append(win)
        keep_core.append(bool(in_core[j]))
        have.append(m)
        out.append(int(ids[j]))
    return out


def _residual_pnr(R: np.ndarray, hw: tuple[int, int], r: float) -> np.ndarray:
    """Peak-to-noise image of the residual ``R`` (pixels × T), band-passed at the soma scale.

    Difference of Gaussians (σ = r/2 minus σ = 1.5 r: a soma-sized blob passes,
    neuropil smooth over ≳ 2 r does not), traces smoothed over 3 frames; peak
    above the median over the noise SD of the smoothed trace.
    """
    h, w = hw
    V = R.T.reshape(-1, h, w)
    B = ndimage.gaussian_filter(V, (0, 0.5 * r, 0.5 * r)) - ndimage.gaussian_filter(V, (0, 1.5 * r, 1.5 * r))
    noise = _noise(B.reshape(B.shape[0], -1).T).reshape(h, w) / math.sqrt(3)
    Bt = ndimage.uniform_filter1d(B, 3, axis=0)
    return (Bt.max(axis=0) - np.median(Bt, axis=0)) / noise


def _local_peaks(img: np.ndarray, threshold: float, spacing: float) -> np.ndarray:
    """(n, 2) local maxima of ``img`` above ``threshold`` at least ``spacing`` px apart, strongest first."""
    from skimage.feature import peak_local_max

    pts = peak_local_max(img, min_distance=max(1, int(round(spacing))), threshold_abs=threshold,
                         exclude_border=False)
    return np.asarray(pts, np.int64).reshape(-1, 2)


def _window(y: int, x: int, half: int, h: int, w: int) -> np.ndarray:
    """Flat pixel indices of the square window around (y, x), clipped to the patch."""
    ys = np.arange(max(0, y - half), min(h, y + half + 1))
    xs = np.arange(max(0, x - half), min(w, x + half + 1))
    return (ys[:, None] * w + xs[None, :]).ravel()


def _init_component(R: np.ndarray, win: np.ndarray, seed: tuple[int, int], hw: tuple[int, int],
                    params: CnmfParams) -> tuple[np.ndarray | None, np.ndarray]:
    h, w = hw
    y, x = seed
    r = params.neuron_radius
    core = _window(y, x, max(1, int(round(r / 3))), h, w)
    c = R[core].mean(axis=0)
    c = c - np.percentile(c, 20)
    c = np.maximum(c, 0)
    if not np.any(c > 0):
        return None, c
    Rw = R[win]
    cc = c - c.mean()
    Rc = Rw - Rw.mean(axis=1, keepdims=True)
    denom = np.sqrt((Rc**2).sum(1) * (cc**2).sum()) + 1e-12
    corr = (Rc @ cc) / denom
    coef = (Rc @ cc) / ((cc**2).sum() + 1e-12)
    ok = (corr > params.init_correlation) & (coef > 0)
    wy = win // w
    wx = win % w
    ys, xs = wy.min(), wx.min()
    grid = np.zeros((wy.max() - ys + 1, wx.max() - xs + 1), bool)
    grid[wy - ys, wx - xs] = ok
    lab, _ = ndimage.label(grid)
    lv = lab[y - ys, x - xs]
    if lv == 0:
        return None, c
    comp = (lab == lv)[wy - ys, wx - xs]
    if comp.sum() < max(3, 0.15 * math.pi * r * r):
        return None, c
    a = np.zeros(R.shape[0], np.float32)
    a[win[comp]] = coef[comp]
    peak = a.max()
    return a / peak, (c * peak).astype(np.float32)


def _supports(windows: list[np.ndarray], n_pix: int) -> np.ndarray:
    s = np.zeros((n_pix, len(windows)), bool)
    for k, win in enumerate(windows):
        s[win, k] = True
    return s


def _update_background(Y: np.ndarray, A: np.ndarray, C: np.ndarray, nb: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """b0 = temporal mean of Y - AC; b f = its leading ``nb`` singular pairs (randomized)."""
    R = Y - A @ C
    b0 = R.mean(axis=1)
    if nb == 0:
        return b0.astype(np.float32), np.zeros((Y.shape[0], 0), np.float32), np.zeros((0, Y.shape[1]), np.float32)
    R -= b0[:, None]
    rng = np.random.default_rng(0)
    Q = R @ rng.standard_normal((R.shape[1], nb + 4)).astype(np.float32)
    for _ in range(2):
        Q, _ = np.linalg.qr(Q)
        Q = R @ (R.T @ Q)
    Q, _ = np.linalg.qr(Q)
    Bs = Q.T @ R
    u, s, vt = np.linalg.svd(Bs, full_matrices=False)
    b = (Q @ u[:, :nb]) * s[:nb]
    f = vt[:nb]
    return b0.astype(np.float32), b.astype(np.float32), f.astype(np.float32)


def _hals_temporal(Y, A, C, b0, b, f, sweeps):  # type: ignore[no-untyped-def]
    YA = A.T @ Y - (A.T @ b0)[:, None] - (A.T @ b) @ f
    AA = A.T @ A
    C = C.copy()
    for _ in range(sweeps):
        for k in range(C.shape[0]):
            if AA[k, k] <= 0:
                continue
            C[k] = np.maximum(0, C[k] + (YA[k] - AA[k] @ C) / AA[k, k])
    return C


def _hals_spatial(Y, A, C, b0, b, f, support, sweeps):  # type: ignore[no-untyped-def]
    YC = Y @ C.T - np.outer(b0, C.sum(axis=1)) - b @ (f @ C.T)
    CC = C @ C.T
    A = A.copy()
    for _ in range(sweeps):
        for k in range(A.shape[1]):
            if CC[k, k] <= 0:
                continue
            A[:, k] = np.maximum(0, A[:, k] + (YC[:, k] - A @ CC[:, k]) / CC[k, k]) * support[:, k]
    return A


def _grow_support(A: np.ndarray, support: np.ndarray, windows: list[np.ndarray], hw: tuple[int, int],
                  steps: int = 1) -> np.ndarray:
    """Support = ``steps``-pixel dilation of each footprint's non-zero pixels, within its window."""
    h, w = hw
    out = np.zeros_like(support)
    for k, win in enumerate(windows):
        img = (A[:, k] > 0).reshape(h, w)
        grown = ndimage.binary_dilation(img, structure=np.ones((3, 3), bool), iterations=steps).ravel()
        allowed = np.zeros(h * w, bool)
        allowed[win] = True
        out[:, k] = grown & allowed
    return out


def _normalize_drop(A: np.ndarray, C: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    peak = A.max(axis=0)
    keep = (peak > 0) & (C.max(axis=1) > 0)
    A = A[:, keep] / peak[keep]
    C = C[keep] * peak[keep, None]
    return A, C, keep


def _merge_local(A, C, support, keep_core, windows, origin, params):  # type: ignore[no-untyped-def]
    """Merge components whose footprints overlap and whose traces correlate.

    A merged component's origin is -1 (activity seed) if any member has it.
    """
    K = A.shape[1]
    if K < 2:
        return A, C, support, keep_core, windows, origin
    overlap = ((A > 0).T.astype(np.float32) @ (A > 0).astype(np.float32)) > 0
    corr = np.corrcoef(C) if C.shape[1] > 1 else np.eye(K)
    corr = np.nan_to_num(corr)
    np.fill_diagonal(overlap, False)
    pairs = np.argwhere(np.triu(overlap & (corr > params.merge_correlation)))
    if len(pairs) == 0:
        return A, C, support, keep_core, windows, origin
    parent = np.arange(K)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        parent[find(int(j))] = find(int(i))
    roots = np.array([find(i) for i in range(K)])
    newA, newC, newS, newK, newW, newO = [], [], [], [], [], []
    for root in np.unique(roots):
        idx = np.flatnonzero(roots == root)
        scale = C[idx].max(axis=1)
        a = (A[:, idx] * scale).sum(axis=1)
        peak = a.max()
        strongest = idx[np.argmax(scale)]
        c = C[strongest] * (scale.max() / max(peak, 1e-12)) if len(idx) > 1 else C[strongest]
        newA.append(a / max(peak, 1e-12))
        newC.append(c if len(idx) > 1 else C[strongest])
        newS.append(support[:, idx].any(axis=1))
        newK.append(bool(keep_core[strongest]))
        newW.append(np.unique(np.concatenate([windows[i] for i in idx])))
        newO.append(-1 if (origin[idx] < 0).any() else int(origin[strongest]))
    return (np.stack(newA, 1), np.stack(newC), np.stack(newS, 1), np.array(newK), newW, np.array(newO, int))


def _snr(C: np.ndarray) -> np.ndarray:
    if C.shape[0] == 0:
        return np.zeros(0)
    base = np.median(C, axis=1)
    return (C.max(axis=1) - base) / _noise(C)


def _spatial_corr(Y, A, C, b0, b, f):  # type: ignore[no-untyped-def]
    """Correlation of each footprint with the data (others' light removed) over its active frames."""
    K = A.shape[1]
    out = np.zeros(K)
    if K == 0:
        return out
    for k in range(K):
        pix = np.flatnonzero(A[:, k] > 0)
        c = C[k]
        act = c > 0.5 * c.max()
        if act.sum() == 0 or len(pix) < 3:
            continue
        others = A[pix] @ C[:, act] - np.outer(A[pix, k], C[k, act])
        resid = Y[pix][:, act] - b0[pix, None] - b[pix] @ f[:, act] - others
        img = resid.mean(axis=1)
        a = A[pix, k]
        if img.std() == 0 or a.std() == 0:
            continue
        out[k] = float(np.corrcoef(a, img)[0, 1])
    return out


def _to_global(A: np.ndarray, region: tuple[slice, slice], shape: tuple[int, int]) -> sp.csr_matrix:
    h = region[0].stop - region[0].start
    w = region[1].stop - region[1].start
    pix = np.arange(h * w)
    gy = region[0].start + pix // w
    gx = region[1].start + pix % w
    gidx = gy * shape[1] + gx
    m = sp.csr_matrix(A.T.astype(np.float32))
    m = sp.csr_matrix((m.data, gidx[m.indices], m.indptr), shape=(A.shape[1], shape[0] * shape[1]))
    return m


def _background_maps(b0: np.ndarray, b: np.ndarray, region: tuple[slice, slice], core: tuple[slice, slice],
                     shape: tuple[int, int]) -> sp.csr_matrix:
    """Background regressors of a patch: ``b0`` and each column of ``b``, restricted to the core."""
    h = region[0].stop - region[0].start
    w = region[1].stop - region[1].start
    incore = np.zeros((h, w), bool)
    incore[core[0].start - region[0].start : core[0].stop - region[0].start,
           core[1].start - region[1].start : core[1].stop - region[1].start] = True
    maps = np.concatenate([np.asarray(b0, np.float32)[:, None], np.asarray(b, np.float32)], axis=1)
    maps = maps * incore.ravel()[:, None]
    return _to_global(maps, region, shape)

