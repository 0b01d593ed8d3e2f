"""OASIS's pool-adjacent-violators pass, vectorised across traces (:func:`oasis`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from somaflow.errors import InputError, ParameterError
from somaflow.oasis.kernels import _pool_sums, _roots


def oasis(z: np.ndarray, g: np.ndarray, s_min: np.ndarray | float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative deconvolution ``min ½‖z − c‖² s.t. G c ≥ 0`` of each row.

    The building block of :func:`deconvolve`, for a known kernel and no
    baseline; a penalty ``λ`` is applied by passing ``z − λ κ`` (see the
    module docstring).

    Parameters
    ----------
    z : ndarray, (n, frame) float
        Traces, baseline removed.
    g : ndarray, (n, 1) or (n, 2) float
        AR coefficients; AR(1) needs ``0 < g < 1``, AR(2) real roots
        ``1 > d > r ≥ 0``.
    s_min : float or ndarray (n,)
        Smallest spike kept (trace units).

    Returns
    -------
    calcium, spikes : ndarray, (n, frame) float64

    Raises
    ------
    InputError
        ``z`` not 2-D or not finite.
    ParameterError
        ``g`` not one stable kernel per row.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2 or not z.shape[1] or not np.isfinite(z).all():
        raise InputError(f"oasis needs finite (unit, frame) traces, got shape {z.shape}; pass a 2-D "
                         "array without NaN/inf")
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 2 or len(g) != len(z):
        raise ParameterError(f"oasis needs one row of AR coefficients per trace: {len(z)} traces, g of "
                             f"shape {g.shape}; pass g with shape ({len(z)}, 1) or ({len(z)}, 2)")
    d, r = _roots(g)
    smin = np.broadcast_to(np.asarray(s_min, dtype=np.float64), (len(z),))
    pools = _pools(z, d, r, smin)
    return _calcium(pools, d, r, z.shape)


@dataclass
class _Pools:
    """Pools of all units, flattened: unit, start frame, length, value, Σ h_k z_{start+k}."""

    unit: np.ndarray
    start: np.ndarray
    length: np.ndarray
    value: np.ndarray
    hz: np.ndarray
    spike: np.ndarray  # spike at the pool start, ≥ 0 after clipping


def _pools(z: np.ndarray, d: np.ndarray, r: np.ndarray, smin: np.ndarray) -> _Pools:
    if np.all(r == 0):
        return _pools_ar1(z, d, smin)
    return _pools_ar2(z, d, r, smin)


def _pools_ar1(z: np.ndarray, d: np.ndarray, smin: np.ndarray) -> _Pools:
    """Exact AR(1) pools by parallel pool-adjacent-violators rounds.

    A pool [a, a + l) holds ``c_{a+k} = v d^k`` with ``v = Σ d^k z / Σ d^{2k}``;
    pools j, j+1 violate when the spike at j+1's start, ``v_{j+1} − d^{l_j} v_j``,
    is below ``smin``. Every round merges all violating chains of pools (of
    all units at once, flattened) and recomputes only the merged pools.
    """
    n, t = z.shape
    start = np.tile(np.arange(t), n)
    unit = np.repeat(np.arange(n), t)
    length = np.ones(n * t, np.int64)
    hz = z.ravel().copy()  # Σ d^k z_{a+k}
    value = hz.copy()
    dec = d[unit]  # d^length
    logd = np.log(d)
    while True:
        viol = value[1:] < value[:-1] * dec[:-1] + smin[unit[1:]]
        viol &= start[1:] > 0
        if not viol.any():
            break
        keep = np.concatenate(([True], ~viol))
        head = np.flatnonzero(keep)
        size = np.diff(np.append(head, keep.size))
        grown = size > 1
        members = np.flatnonzero(np.repeat(grown, size))
        sizes = size[grown]
        at = np.cumsum(sizes) - sizes
        offset = start[members] - np.repeat(start[head[grown]], sizes)
        new_hz = np.add.reduceat(hz[members] * np.exp(logd[unit[members]] * offset), at)
        new_len = np.add.reduceat(length[members], at)
        start, unit, length, hz, dec, value = (a[head] for a in (start, unit, length, hz, dec, value))
        idx = np.flatnonzero(grown)
        lu = logd[unit[idx]]
        hz[idx], length[idx] = new_hz, new_len
        dec[idx] = np.exp(lu * new_len)
        value[idx] = new_hz * (1 - np.exp(2 * lu)) / (1 - dec[idx] ** 2)
    value = np.maximum(value, 0.0)
    spike = value.copy()
    spike[1:] -= np.where(start[1:] == 0, 0.0, value[:-1] * dec[:-1])
    return _Pools(unit, start, length, value, hz, np.maximum(spike, 0.0))


def _pools_ar2(z: np.ndarray, d: np.ndarray, r: np.ndarray, smin: np.ndarray) -> _Pools:
    """AR(2) pools by the paper's greedy backward merging, all units in lockstep over frames.

    Pool i of a unit starts at ``a_i`` with value ``v_i`` and holds ``c_{a_i+k} =
    v_i h_k + g_2 c_{a_i−1} h_{k−1}``; its last two calcium values are kept so
    that the spike at the next pool's start, ``v_{i+1} − g_1 c_last − g_2
    c_before_last``, is cheap to check. The first pool is clipped at 0.
    """
    n, t = z.shape
    g1, g2 = d + r, -d * r
    size = n * t
    start = np.zeros(size, np.int64)  # pool i of unit u lives at u * t + i
    length = np.zeros(size, np.int64)
    sd = np.zeros(size)  # Σ d^k z_{a+k}
    sr = np.zeros(size)  # Σ r^k z_{a+k}
    cp = np.zeros(size)  # calcium just before the pool
    value = np.zeros(size)
    c_last = np.zeros(size)
    c_prev = np.zeros(size)  # second-to-last calcium of the pool
    base = np.arange(n) * t
    top = base - 1  # flat index of each unit's last pool

    for f in range(t):
        top += 1
        zf = z[:, f]
        before = c_last[top - 1] if f else np.zeros(n)
        v = zf if f else np.maximum(zf, 0.0)  # c_0 = s_0 ≥ 0
        start[top], length[top], sd[top], sr[top] = f, 1, zf, zf
        cp[top], value[top], c_last[top] = before, v, v
        c_prev[top] = before
        if not f:
            continue
        cand = np.arange(n)
        while cand.size:
            i = top[cand]
            j = i - 1
            bad = value[i] - g1[cand] * c_last[j] - g2[cand] * c_prev[j] < smin[cand]
            cand, i, j = cand[bad], i[bad], j[bad]
            if not cand.size:
                break
            du, ru, lj = d[cand], r[cand], length[j]
            sd[j] += du**lj * sd[i]
            sr[j] += ru**lj * sr[i]
            lj = lj + length[i]
            length[j] = lj
            hz = (du * sd[j] - ru * sr[j]) / (du - ru)
            c0 = g2[cand] * cp[j]
            w, x, h1, h2, h3 = _pool_sums(du, ru, lj)
            v = (hz - c0 * x) / w
            v = np.where(j == base[cand], np.maximum(v, 0.0), v)  # the first pool starts with s ≥ 0
            value[j], c_last[j], c_prev[j] = v, v * h1 + c0 * h2, v * h2 + c0 * h3
            top[cand] = j
            cand = cand[j > base[cand]]
    counts = top - base + 1
    keep = (np.arange(t)[None, :] < counts[:, None]).ravel()
    unit = np.repeat(np.arange(n), counts)
    du, ru = d[unit], r[unit]
    hz = (du * sd[keep] - ru * sr[keep]) / (du - ru)
    p_start, p_val = start[keep], value[keep]
    spike = p_val.copy()
    spike[1:] -= np.where(p_start[1:] == 0, 0.0,
                          g1[unit[1:]] * c_last[keep][:-1] + g2[unit[1:]] * c_prev[keep][:-1])
    return _Pools(unit, p_start, length[keep], p_val, hz, np.maximum(spike, 0.0))


def _select(pools: _Pools, units: np.ndarray) -> _Pools:
    """The pools of ``units`` (sorted), renumbered 0 … len(units) − 1."""
    pos = np.full(int(pools.unit.max(initial=-1)) + 1, -1)
    pos[units] = np.arange(units.size)
    keep = pos[pools.unit] >= 0
    return _Pools(pos[pools.unit[keep]], pools.start[keep], pools.length[keep], pools.value[keep],
                  pools.hz[keep], pools.spike[keep])


def _replace(pools: _Pools, units: np.ndarray, new: _Pools) -> _Pools:
    """``pools`` with the pools of ``units`` replaced by ``new`` (numbered by position in units)."""
    keep = ~np.isin(pools.unit, units)
    parts = [
        np.concatenate([getattr(pools, name)[keep], units[new.unit] if name == "unit" else getattr(new, name)])
        for name in ("unit", "start", "length", "value", "hz", "spike")
    ]
    order = np.lexsort((parts[1], parts[0]))
    return _Pools(*(a[order] for a in parts))


def _calcium(pools: _Pools, d: np.ndarray, r: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(calcium, spikes) arrays from the spikes at the pool starts."""
    spikes = np.zeros(shape)
    spikes[pools.unit, pools.start] = pools.spike
    calcium = np.empty(shape)
    for i in range(shape[0]):
        calcium[i] = lfilter([1.0], [1.0, -(d[i] + r[i]), d[i] * r[i]], spikes[i])
    return calcium, spikes

