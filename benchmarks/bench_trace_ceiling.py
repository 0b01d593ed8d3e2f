"""How well can any method recover the true calcium on each simulator preset? Trace-correlation ceilings.

The acceptance figure "median correlation of matched traces with the true
calcium" depends on the preset's noise as much as on the method. This
benchmark measures, on motion-free renders of each preset (held-out seeds
100-102 by default), what is reachable when the cells' masks are known
exactly:

- ``true-mask raw``: the neuropil-corrected mask mean (``somaflow.traces``
  with ``denoise=False``);
- ``true-mask OASIS``: the same trace denoised by OASIS, as ``somaflow run``
  reports ``traces``;
- ``spectral oracle``: the raw trace filtered by the Wiener filter built from
  the *true* calcium's own power spectrum and the true noise level of that
  trace. No method can know these; a linear estimator cannot beat it, so it
  bounds any linear denoiser (a spike-based one can do somewhat better only
  where transients stand clear of the noise).

The mask means are taken on the raw movie, so 1p presets (whose background
the flow removes first) are not meaningful here and are not in the default
list. Prints the median over cells with activity, per preset and seed, next to the
preset's median peak SNR (largest transient over the noise of the mask sum).

    .venv/bin/python benchmarks/bench_trace_ceiling.py
    .venv/bin/python benchmarks/bench_trace_ceiling.py --presets 2p-lowsnr --seeds 100 101 102 103 --json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402


def wiener_oracle(raw: np.ndarray, calcium: np.ndarray) -> float:
    """Correlation with ``calcium`` of ``raw`` after the oracle Wiener filter (see the module docstring)."""
    f = raw - raw.mean()
    c = calcium - calcium.mean()
    gain = float(f @ c) / float(c @ c)
    noise = f - gain * c
    signal_power = np.abs(np.fft.rfft(gain * c)) ** 2
    noise_power = np.mean(np.abs(np.fft.rfft(noise)) ** 2)  # white: one level for all frequencies
    h = signal_power / (signal_power + noise_power)
    est = np.fft.irfft(h * np.fft.rfft(f), n=len(f))
    return float(np.corrcoef(est, calcium)[0, 1])


def ceilings(preset: str, seed: int) -> dict:
    import xarray as xr

    from somaflow.evaluate.traces import pearson_rows
    from somaflow.simulate import simulate
    from somaflow.traces import TraceParams, extract_traces

    sim = simulate(preset, seed=seed, motion="none")
    m = sim.meta
    movie = xr.DataArray(sim.movie.astype(np.float32), dims=("frame", "y", "x"), attrs={"fps": m["fps"]})
    masks = xr.DataArray(sim.masks, dims=("unit", "y", "x"))
    tp = TraceParams.for_movie(m["fps"], m["modality"], m["neuron_radius"])
    den = extract_traces(movie, masks, tp)["traces"].values
    raw = extract_traces(movie, masks, tp.model_copy(update={"denoise": False}))["traces"].values
    calcium = np.asarray(sim.calcium, np.float64)
    active = np.ptp(calcium, axis=1) > 0
    r_den = pearson_rows(den, calcium)[active]
    r_raw = pearson_rows(raw, calcium)[active]
    r_wiener = np.array([wiener_oracle(np.asarray(f, np.float64), c) for f, c in zip(raw[active], calcium[active], strict=True)])
    return {"preset": preset, "seed": seed, "active_cells": int(active.sum()),
            "median_peak_snr": round(float(np.median(sim.snr[active])), 2),
            "true_mask_raw": round(float(np.nanmedian(r_raw)), 3),
            "true_mask_oasis": round(float(np.nanmedian(r_den)), 3),
            "spectral_oracle": round(float(np.nanmedian(r_wiener)), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 2p only: a 1p movie's mask means are dominated by its background until the flow removes it
    ap.add_argument("--presets", nargs="+", default=["2p-small", "2p-dense", "2p-lowsnr"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101, 102])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    rows = [ceilings(p, s) for p in args.presets for s in args.seeds]
    if args.json:
        print(json.dumps({"machine": machine(), "rows": rows}))
        return
    print(f"machine: {machine()}")
    print(f"{'preset':<11} {'seed':>4} {'cells':>5} {'peak SNR':>8} {'raw':>6} {'OASIS':>6} {'oracle':>6}")
    for r in rows:
        print(f"{r['preset']:<11} {r['seed']:>4} {r['active_cells']:>5} {r['median_peak_snr']:>8} "
              f"{r['true_mask_raw']:>6} {r['true_mask_oasis']:>6} {r['spectral_oracle']:>6}")
    for p in args.presets:
        sel = [r for r in rows if r["preset"] == p]
        print(f"{p:<11} mean  raw {np.mean([r['true_mask_raw'] for r in sel]):.3f}  "
              f"OASIS {np.mean([r['true_mask_oasis'] for r in sel]):.3f}  "
              f"oracle {np.mean([r['spectral_oracle'] for r in sel]):.3f}")


if __name__ == "__main__":
    main()
