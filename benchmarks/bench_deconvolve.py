"""Spike inference (OASIS) against electrically recorded spikes.

For every dataset in ``../shared/data/spike_ground_truth`` (Cascade's ground
truth: ΔF/F ``fluo_mean`` sampled at ``fluo_time`` and juxtacellular spike
times ``events_AP`` / 1e4 s, one ``.mat`` file per neuron, possibly several
recordings each), every recording is deconvolved with
:func:`somaflow.deconvolve` at its own frame rate.

Score (the spikefinder convention, Berens et al. 2018): the inferred
``spikes`` and the true spike counts are both summed into 40 ms bins (25 Hz)
from the first frame on; the Pearson correlation is taken per neuron over the
bins of all its recordings. Neurons without a single spike are left out (the
correlation is undefined) and counted. For context the same score is given for
a naive estimate, the positive part of the trace's first difference.

The headline is the zero-lag r. Each line also gives the single lag (within
±80 ms, the same for all neurons of a dataset) that maximizes the median r:
GCaMP's rise puts the estimate ~40 ms after the spike, and in DS03 the
fluorescence (even its raw derivative) leads the recorded spikes by ~40 ms,
an offset of that dataset's time stamps.

Time: CPU seconds of ``deconvolve`` per dataset, and of a 500 × 10 000 frame
synthetic array (AR(1) spikes at 30 Hz; and AR(2)), on one core.

    .venv/bin/python benchmarks/bench_deconvolve.py
    .venv/bin/python benchmarks/bench_deconvolve.py --variants   # parameter variants too
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: the numbers are per core

import numpy as np  # noqa: E402
import scipy.io  # noqa: E402
from scipy.signal import lfilter  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402

from somaflow.oasis import DeconvolutionParams, deconvolve  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spike_ground_truth"
BIN_S = 0.04  # 25 Hz, the spikefinder evaluation rate
LAGS = (-2, -1, 0, 1, 2)  # bins of 40 ms

#: parameter variants compared with --variants (label → DeconvolutionParams fields)
VARIANTS: dict[str, dict] = {
    "default": {},
    "baseline optimize (OASIS)": {"baseline": "optimize"},
    "baseline zero": {"baseline": "zero"},
    "prior g (tau 0.7 s)": {"estimate_g": False},
    "shared kernel (somaflow run)": {"g_scope": "shared"},
    "NND (penalty 0)": {"sparsity": "penalty", "baseline": "percentile"},
    "s_min 1 SD": {"s_min": 1.0},
    "AR(2)": {"ar_order": 2},
}


def load_dataset(folder: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """neuron → list of (frame times s, ΔF/F, spike times s) per recording."""
    out: dict[str, list] = {}
    for path in sorted(folder.glob("*.mat")):
        records = np.atleast_1d(scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)["CAttached"])
        recs = []
        for rec in records:
            if not hasattr(rec, "fluo_time"):
                continue  # electrophysiology-only entries
            t = np.atleast_1d(rec.fluo_time).astype(np.float64)
            f = np.atleast_1d(rec.fluo_mean).astype(np.float64)
            ap = np.atleast_1d(rec.events_AP).astype(np.float64) / 1e4
            ok = np.isfinite(t) & np.isfinite(f)
            if ok.sum() >= 100:
                recs.append((t[ok], f[ok], ap))
        if recs:
            out[path.stem] = recs
    return out


def binned(times: np.ndarray, values: np.ndarray | None, t0: float, n_bins: int) -> np.ndarray:
    """Sum of ``values`` (or counts of ``times``) in 40 ms bins from t0."""
    idx = np.floor((times - t0) / BIN_S).astype(np.int64)
    ok = (idx >= 0) & (idx < n_bins)
    w = None if values is None else values[ok]
    return np.bincount(idx[ok], weights=w, minlength=n_bins).astype(np.float64)


def score(neurons: dict, estimates: dict) -> tuple[np.ndarray, int]:
    """(neuron, lag) correlations of binned estimates with binned true spikes; neurons skipped.

    Lag ``k`` (``LAGS``) compares the estimate in bin ``i + k`` with the truth in
    bin ``i``, within each recording.
    """
    corrs, skipped = [], 0
    for name, recs in neurons.items():
        est, true = [], []
        for (t, _, ap), s in zip(recs, estimates[name], strict=True):
            dt = np.median(np.diff(t))
            t0 = t[0] - dt / 2
            n_bins = int(np.floor((t[-1] + dt / 2 - t0) / BIN_S))
            est.append(binned(t, s, t0, n_bins))
            true.append(binned(ap, None, t0, n_bins))
        if sum(x.sum() for x in true) == 0:
            skipped += 1
            continue
        row = []
        for k in LAGS:
            e = np.concatenate([x[max(k, 0) : x.size + min(k, 0)] for x in est])
            s_true = np.concatenate([x[max(-k, 0) : x.size - max(k, 0)] for x in true])
            row.append(float(np.corrcoef(e, s_true)[0, 1]) if e.std() > 0 else 0.0)
        corrs.append(row)
    return np.asarray(corrs).reshape(-1, len(LAGS)), skipped


def run_deconvolution(neurons: dict, params: DeconvolutionParams) -> tuple[dict, float]:
    """Spikes of every recording; recordings of equal length and rate are solved as one array."""
    groups: dict[tuple[int, float], list[tuple[str, int]]] = defaultdict(list)
    for name, recs in neurons.items():
        for i, (t, f, _) in enumerate(recs):
            groups[(f.size, round(1.0 / np.median(np.diff(t)), 3))].append((name, i))
    out: dict[str, list] = {name: [None] * len(recs) for name, recs in neurons.items()}
    cpu = 0.0
    for (_, fps), members in groups.items():
        traces = np.stack([neurons[name][i][1] for name, i in members])
        t0 = time.process_time()
        res = deconvolve(traces, fps, params=params)
        cpu += time.process_time() - t0
        for (name, i), s in zip(members, res.spikes, strict=True):
            out[name][i] = s
    return out, cpu


def naive(neurons: dict) -> dict:
    return {name: [np.maximum(np.diff(f, prepend=f[0]), 0.0) for _, f, _ in recs]
            for name, recs in neurons.items()}


def line(label: str, corrs: np.ndarray, skipped: int, cpu: float | None) -> str:
    """Zero-lag median/mean r, and the dataset's best single lag with its median r."""
    zero = corrs[:, LAGS.index(0)]
    best = int(np.argmax(np.median(corrs, axis=0)))
    timing = "" if cpu is None else f"  {cpu:6.2f} s"
    return (f"  {label:34s} n={zero.size:2d} (+{skipped} silent)  median r={np.median(zero):.3f}  "
            f"mean r={zero.mean():.3f} | best lag {LAGS[best] * BIN_S * 1e3:+4.0f} ms: median r="
            f"{np.median(corrs[:, best]):.3f}{timing}")


def synthetic_speed(order: int, n: int = 500, frames: int = 10_000, fps: float = 30.0) -> tuple[float, float]:
    """CPU seconds of deconvolve on an (n, frames) array, and the median per-frame spike correlation."""
    rng = np.random.default_rng(0)
    d = np.exp(-1.0 / (rng.uniform(0.4, 1.5, n) * fps))
    r = np.exp(-1.0 / (0.05 * fps)) if order == 2 else 0.0
    s = (rng.random((n, frames)) < 0.5 / fps) * rng.lognormal(0, 0.3, (n, frames))
    c = np.stack([lfilter([1.0], [1.0, -(d[i] + r), d[i] * r], s[i]) for i in range(n)])
    y = 0.3 + c + 0.2 * rng.standard_normal((n, frames))
    t0 = time.process_time()
    res = deconvolve(y, fps, params=DeconvolutionParams(ar_order=order))
    cpu = time.process_time() - t0
    corr = np.median([np.corrcoef(res.spikes[i], s[i])[0, 1] for i in range(n)])
    return cpu, float(corr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", action="store_true", help="also score the parameter variants")
    ap.add_argument("--no-speed", action="store_true", help="skip the 500 x 10 000 timing")
    args = ap.parse_args()
    print(f"machine: {machine()}; BLAS/OpenMP threads: {os.environ['OMP_NUM_THREADS']}")
    print(f"score: Pearson r of spikes summed in {BIN_S * 1e3:.0f} ms bins vs true spike counts, "
          "per neuron over its recordings")
    if not DATA.is_dir():
        print(f"no ground truth at {DATA}; skipping the real-data part")
    else:
        variants = VARIANTS if args.variants else {"default": {}}
        for folder in sorted(p for p in DATA.iterdir() if p.is_dir()):
            neurons = load_dataset(folder)
            recs = [r for rs in neurons.values() for r in rs]
            fps = np.median([1.0 / np.median(np.diff(t)) for t, _, _ in recs])
            frames = sum(f.size for _, f, _ in recs)
            spikes = sum(a.size for _, _, a in recs)
            print(f"{folder.name}: {len(neurons)} neurons, {len(recs)} recordings, {frames} frames "
                  f"at {fps:.1f} Hz, {spikes} spikes")
            for label, fields in variants.items():
                est, cpu = run_deconvolution(neurons, DeconvolutionParams(**fields))
                print(line(f"OASIS {label}", *score(neurons, est), cpu), flush=True)
            print(line("naive: positive first difference", *score(neurons, naive(neurons)), None))
    if not args.no_speed:
        for order in (1, 2):
            cpu, corr = synthetic_speed(order)
            print(f"speed: 500 x 10 000 frames, AR({order}), default parameters: {cpu:.1f} s CPU "
                  f"(median per-frame spike correlation on the synthetic data {corr:.2f})", flush=True)


if __name__ == "__main__":
    main()
