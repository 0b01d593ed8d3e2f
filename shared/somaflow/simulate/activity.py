"""Spike trains and calcium traces: doubly stochastic Poisson spikes, AR(1)/AR(2) calcium."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

from somaflow.simulate.params import SimulationParams


@dataclass(frozen=True)
class Activity:
    """Ground-truth activity of ``n`` cells over ``T`` frames.

    Attributes
    ----------
    spikes : ndarray, (n, T) float32
        Spike counts per frame.
    calcium : ndarray, (n, T) float32
        Calcium signal as dF/F (0 at rest).
    ar_coefficients : ndarray, (n, ar_order) float32
        AR coefficients ``g``: ``c[t] = sum_k g[k] c[t-1-k] + drive[t]``.
    active : ndarray, (n,) bool
        False for silent cells (no spikes at all).
    """

    spikes: np.ndarray
    calcium: np.ndarray
    ar_coefficients: np.ndarray
    active: np.ndarray


def ar1_process(rng: np.random.Generator, shape: tuple[int, ...], tau_frames: float) -> np.ndarray:
    """Stationary unit-variance AR(1) noise along the last axis.

    Parameters
    ----------
    shape : tuple
        Output shape; the last axis is time.
    tau_frames : float
        Correlation time in frames.

    Returns
    -------
    ndarray, float64, ``shape``
    """
    phi = float(np.exp(-1.0 / max(tau_frames, 1e-6)))
    e = rng.standard_normal(shape)
    x0 = rng.standard_normal(shape[:-1] + (1,))
    out = lfilter([np.sqrt(1 - phi**2)], [1.0, -phi], e, axis=-1, zi=phi * x0)[0]
    return np.asarray(out)


def ar_coefficients(tau_decay: np.ndarray, tau_rise: np.ndarray, fps: float, order: int) -> np.ndarray:
    """AR coefficients from time constants (s) at ``fps`` Hz.

    Returns
    -------
    ndarray, (n, order) float64
        ``(d,)`` for AR(1); ``(d + r, -d r)`` for AR(2), with ``d = exp(-1/(tau_decay fps))``
        and ``r = exp(-1/(tau_rise fps))``.
    """
    d = np.exp(-1.0 / (tau_decay * fps))
    if order == 1:
        return d[:, None]
    r = np.exp(-1.0 / (tau_rise * fps))
    return np.stack([d + r, -d * r], axis=1)


def kernel_peak(g: np.ndarray) -> np.ndarray:
    """Peak of the impulse response of each AR filter ``g`` (n, order); 1 for AR(1)."""
    n, order = g.shape
    if order == 1:
        return np.ones(n)
    # roots d, r of z^2 - g1 z - g2
    disc = np.sqrt(np.maximum(g[:, 0] ** 2 + 4 * g[:, 1], 0))
    d, r = (g[:, 0] + disc) / 2, (g[:, 0] - disc) / 2
    k = np.arange(0, 2000)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = (d[:, None] ** (k + 1) - r[:, None] ** (k + 1)) / (d - r)[:, None]
    h = np.where(np.isfinite(h), h, (k + 1) * d[:, None] ** k)
    return h.max(axis=1)


def simulate_activity(
    rng: np.random.Generator, n: int, p: SimulationParams, *, silent_fraction: float | None = None
) -> Activity:
    """Spikes and calcium for ``n`` cells.

    Rates are log-normal around ``p.firing_rate``; each cell's rate is modulated by
    ``exp(b z(t) - b^2/2)`` where ``z`` is a slow (2 s) AR(1) process partly shared
    across cells (``p.population_coupling``), giving bursts and correlations.
    Each spike adds a dF/F transient whose peak is the cell's amplitude (log-normal
    around ``p.spike_amplitude``) times a per-event jitter.

    Returns
    -------
    Activity
    """
    T, fps = p.n_frames, p.fps
    silent_fraction = p.silent_fraction if silent_fraction is None else silent_fraction
    n_silent = int(round(silent_fraction * n))
    active = np.ones(n, dtype=bool)
    active[rng.permutation(n)[:n_silent]] = False

    rate = np.minimum(p.firing_rate * rng.lognormal(0.0, p.firing_rate_spread, n), 10.0)
    b = p.burstiness
    shared = ar1_process(rng, (1, T), 2.0 * fps)
    private = ar1_process(rng, (n, T), 2.0 * fps)
    rho = p.population_coupling
    z = np.sqrt(rho) * shared + np.sqrt(1 - rho) * private
    lam = rate[:, None] / fps * np.exp(b * z - b**2 / 2)
    counts = rng.poisson(np.minimum(lam, 5.0)).astype(np.float64)
    counts[~active] = 0.0

    amp = p.spike_amplitude * rng.lognormal(0.0, p.amplitude_spread, n)
    jitter = rng.lognormal(0.0, p.amplitude_spread / 2, (n, T))
    drive = counts * amp[:, None] * jitter

    tau_d = rng.uniform(*p.tau_decay, n)
    tau_r = rng.uniform(*p.tau_rise, n)
    g = ar_coefficients(tau_d, tau_r, fps, p.ar_order)
    peak = kernel_peak(g)
    calcium = np.empty((n, T), dtype=np.float64)
    for i in range(n):
        calcium[i] = lfilter([1.0 / peak[i]], np.r_[1.0, -g[i]], drive[i])
    return Activity(
        spikes=counts.astype(np.float32),
        calcium=calcium.astype(np.float32),
        ar_coefficients=g.astype(np.float32),
        active=active,
    )


def fluctuation_traces(
    rng: np.random.Generator, k: int, p: SimulationParams, *, tau_s: float, shared: np.ndarray | None = None
) -> np.ndarray:
    """``k`` zero-mean, unit-std, positively skewed calcium-like population signals.

    Each is an exponentially filtered (``tau_s`` seconds) Poisson train with a high,
    slowly modulated rate, like the summed activity of many axons.

    Returns
    -------
    ndarray, (k, T) float64
    """
    T, fps = p.n_frames, p.fps
    z = ar1_process(rng, (k, T), 2.0 * fps)
    if shared is not None:
        z = 0.5 * z + np.sqrt(0.75) * shared[None, :]
    counts = rng.poisson(20.0 / fps * np.exp(z - 0.5))
    phi = np.exp(-1.0 / (tau_s * fps))
    x = lfilter([1.0], [1.0, -phi], counts.astype(np.float64), axis=1)
    x -= x.mean(axis=1, keepdims=True)
    sd = x.std(axis=1, keepdims=True)
    return x / np.where(sd > 0, sd, 1.0)
