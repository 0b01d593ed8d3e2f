"""Deconvolution settings on the simulator: trace r and spike r of ``somaflow run`` results.

The deconvolution only changes the traces stage's ``traces`` (denoised
calcium) and ``spikes``: F1 does not depend on it (units are accepted on
their masks, SNR and ΔF/F). So each (preset, seed) is run once through the
session flow (CNMF by default, cached in ``--workdir``), and each variant's
``traces`` and ``spikes`` are recomputed from the stored ΔF/F of all units
with :func:`somaflow.traces.deconvolve_blocks` (one shared kernel per movie,
as the pipeline does) and scored with the evaluator against the simulator's
true calcium and spikes. Prints one row per movie and variant and, per preset
and variant, the mean F1, the median of the movies' median trace r and spike r.

Variants:

* ``before``: the previous defaults (noise-constrained λ, the raw decay
  estimate, no onset shift), for calcium and spikes;
* ``after``: the spike-inference defaults of issue 26 for both;
* ``shipped``: what the run's ``TraceParams`` computes: ``spikes`` from
  ``deconvolution``, ``traces`` from a second pass with ``calcium``
  (:meth:`TraceParams.calcium_deconvolution`), i.e. the pipeline as it stands.

``--speed`` times one and two passes on synthetic traces instead.

    .venv/bin/python benchmarks/bench_deconv_traces.py
    .venv/bin/python benchmarks/bench_deconv_traces.py --presets 2p-small --seeds 100
    .venv/bin/python benchmarks/bench_deconv_traces.py --speed
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402

#: the defaults before issue 26's spike-inference change
BEFORE = {"sparsity": "noise", "penalty": 0.0, "decay_correction_s": None, "onset_shift_s": 0.0}


def _variants(tp, explore: bool = False):
    """name -> (calcium DeconvolutionParams, spikes DeconvolutionParams) for a run's TraceParams."""
    new = tp.deconvolution
    old = new.model_copy(update=BEFORE)
    out = {
        "before": (old, old),
        "after": (new, new),
        "shipped": (tp.calcium_deconvolution(), new),
    }
    if explore:  # calcium alternatives, spikes as shipped
        out["ca-noise"] = (new.model_copy(update={"sparsity": "noise", "penalty": 0.0}), new)
        out["ca-tau"] = (new.model_copy(update={"decay_correction_s": None}), new)
        out["ca-old"] = (old.model_copy(update={"onset_shift_s": new.onset_shift_s}), new)
    return out


def _deconvolve(dff: np.ndarray, fps: float, calcium_p, spikes_p) -> tuple[np.ndarray, np.ndarray, float]:
    """(calcium, spikes, seconds) as the traces stage computes them (one task, this process)."""
    import dask.array as da

    from somaflow.oasis import deconvolve_blocks

    d = da.from_array(np.asarray(dff, np.float64), chunks=(max(1, dff.shape[0]), -1))
    t0 = time.perf_counter()
    out = deconvolve_blocks(d, fps, spikes_p, calcium_p).compute(scheduler="sync")
    return out[0], out[1], time.perf_counter() - t0


def _speed(n: int = 500, t: int = 10_000, fps: float = 30.0) -> None:
    """Seconds of one pass and of the shipped two passes on n synthetic AR(1) traces of t frames."""
    from scipy.signal import lfilter

    from somaflow.traces import TraceParams

    rng = np.random.default_rng(0)
    s = (rng.random((n, t)) < 0.5 / fps) * rng.uniform(0.5, 1.5, (n, t))
    y = lfilter([1.0], [1.0, -np.exp(-1 / (0.7 * fps))], s, axis=1) + 0.2 * rng.standard_normal((n, t))
    tp = TraceParams()
    for name, cp in (("one pass (calcium=None)", None), ("two passes (default calcium)", tp.calcium_deconvolution())):
        best = min(_deconvolve(y, fps, cp, tp.deconvolution)[2] for _ in range(2))
        print(f"speed: {n} traces x {t} frames, {name}: {best:.2f} s (best of 2, one core)", flush=True)

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["2p-small", "2p-dense", "2p-lowsnr", "1p-small", "2p-nonrigid"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101, 102],
                    help="seeds (default 100-102: held out)")
    ap.add_argument("--method", default="cnmf")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--speed", action="store_true", help="time one and two passes on synthetic traces, then exit")
    ap.add_argument("--explore", action="store_true", help="also other calcium settings")
    ap.add_argument("--workdir", default=None, help="simulations and results (reused when present)")
    args = ap.parse_args()

    if args.speed:
        _speed()
        return
    from somaflow.runtime import configure_prefect_env

    configure_prefect_env()
    from somaflow_flows.session import session_flow

    from somaflow.evaluate import evaluate, load_prediction, load_truth
    from somaflow.io.schema import open_result
    from somaflow.params import RunParams
    from somaflow.runtime import dask_client
    from somaflow.simulate import simulate, write_simulation

    workdir = args.workdir or tempfile.mkdtemp(prefix="somaflow-deconv-")
    print(f"machine: {machine()}; workdir {workdir}", file=sys.stderr)
    rows = []
    with dask_client("local", args.workers):
        for preset in args.presets:
            for seed in args.seeds:
                sim_dir = os.path.join(workdir, f"{preset}-{seed}")
                if not os.path.exists(os.path.join(sim_dir, "meta.json")):
                    write_simulation(simulate(preset, seed=seed), sim_dir, overwrite=True)
                m = _meta(sim_dir)
                p = RunParams.for_movie(m["fps"], m["modality"], m["neuron_radius"], {"method": args.method},
                                        shape=tuple(m["shape"]))
                out = os.path.join(sim_dir, f"result-{args.method}.zarr")
                if not os.path.exists(out):
                    session_flow(os.path.join(sim_dir, "movie.tif"), out, p, overwrite=True)
                truth = load_truth(os.path.join(sim_dir, "ground_truth.zarr"))
                pred = load_prediction(out)
                ds = open_result(out)
                dff = np.asarray(ds["dff"].values, np.float64)
                fps = float(m["fps"])
                for name, (cp, spp) in _variants(p.traces, args.explore).items():
                    calcium, spikes, extra = _deconvolve(dff, fps, cp, spp)
                    variant = dataclasses.replace(pred, traces=calcium[pred.ids].astype(np.float32),
                                                  spikes=spikes[pred.ids].astype(np.float32))
                    ev = evaluate(variant, truth)
                    row = {"preset": preset, "seed": seed, "variant": name, "f1": ev["f1"],
                           "trace_r": ev["trace_correlation"]["median"], "spike_r": ev["spike_correlation"]["median"],
                           "n_units": int(dff.shape[0]), "seconds": extra}
                    rows.append(row)
                    print(f"{preset:12s} seed {seed:4d} {name:8s} F1 {_r(row['f1'])}  trace r {_r(row['trace_r'])}  "
                          f"spike r {_r(row['spike_r'])}  ({row['n_units']} units; OASIS {extra * 1e3:.0f} ms)", flush=True)
    print("per preset (mean F1, median over seeds of the median trace r / spike r):")
    names = list(dict.fromkeys(r["variant"] for r in rows))
    for preset in args.presets:
        for name in names:
            sel = [r for r in rows if r["preset"] == preset and r["variant"] == name]
            print(f"  {preset:12s} {name:8s} F1 {statistics.mean(r['f1'] for r in sel):.3f}  trace r "
                  f"{_med(r['trace_r'] for r in sel)}  spike r {_med(r['spike_r'] for r in sel)}  (n={len(sel)})")


def _meta(sim_dir: str) -> dict:
    import json

    with open(os.path.join(sim_dir, "meta.json")) as f:
        return json.load(f)


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _med(xs) -> str:
    v = [x for x in xs if x is not None]
    return f"{statistics.median(v):.3f}" if v else "-"


if __name__ == "__main__":
    main()
