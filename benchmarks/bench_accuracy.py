"""Accuracy of ``somaflow run`` on the simulator: F1 per preset over several seeds.

Each (preset, seed) is simulated, run through the same session flow as
``somaflow run`` (one local Dask cluster, Prefect's ephemeral mode), and scored
with the evaluator. Prints one row per movie and, per preset, the mean F1, the
median of the movies' median trace correlations, and the median over every
matched cell of the preset (and of all presets together).

    .venv/bin/python benchmarks/bench_accuracy.py
    .venv/bin/python benchmarks/bench_accuracy.py --presets 2p-small 1p-small --seeds 100 101 102
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["2p-small", "2p-dense", "2p-lowsnr", "2p-nonrigid", "1p-small"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[100, 101, 102],
                    help="seeds (default 100-102: not the seeds the tests and tuning use)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=["local-maxima"],
                    help="extraction methods to compare (somaflow run --method)")
    ap.add_argument("--params", default=None, help="YAML overrides, as somaflow run --params")
    ap.add_argument("--classifier", default=None, help="cell classifier, as somaflow run --classifier")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from somaflow.runtime import configure_prefect_env

    configure_prefect_env()
    from somaflow_flows.session import session_flow

    from somaflow.evaluate import evaluate
    from somaflow.io.config import load_params_file
    from somaflow.params import RunParams
    from somaflow.runtime import dask_client
    from somaflow.simulate import simulate, write_simulation

    overrides = load_params_file(args.params) if args.params else {}
    if args.classifier:
        overrides = {**overrides, "classify": {**overrides.get("classify", {}), "classifier": args.classifier}}
    workdir = args.workdir or tempfile.mkdtemp(prefix="somaflow-acc-")
    rows = []
    pooled: dict[tuple[str, str], list[float]] = {}  # every matched cell's trace r, per method and preset
    print(f"machine: {machine()}", file=sys.stderr)
    with dask_client("local", args.workers):
        for method, preset, seed in ((mt, pr, sd) for mt in args.methods for pr in args.presets for sd in args.seeds):
            if True:
                sim_dir = os.path.join(workdir, f"{preset}-{seed}")
                sim = simulate(preset, seed=seed)
                if not os.path.exists(os.path.join(sim_dir, "meta.json")):
                    write_simulation(sim, sim_dir, overwrite=True)
                m = sim.meta
                p = RunParams.for_movie(m["fps"], m["modality"], m["neuron_radius"],
                                        {**overrides, "method": method}, shape=tuple(m["shape"]))
                out = os.path.join(sim_dir, f"result-{method}.zarr")
                t0 = time.perf_counter()
                summary = session_flow(os.path.join(sim_dir, "movie.tif"), out, p, overwrite=True)
                seconds = time.perf_counter() - t0
                ev = evaluate(out, os.path.join(sim_dir, "ground_truth.zarr"), include_matches=True)
                pooled.setdefault((method, preset), []).extend(
                    r for r in ev["match_trace_correlations"] if r is not None)
                row = {"method": method, "preset": preset, "seed": seed, "f1": ev["f1"], "precision": ev["precision"],
                       "recall": ev["recall"], "caiman_f1": ev["caiman"]["f1"],
                       "trace_corr": ev["trace_correlation"]["median"], "n_pred": ev["n_pred"],
                       "n_true": ev["n_true"], "seconds": round(seconds, 1),
                       "fps": round(m["shape"][0] / seconds, 1), "timings": summary["timings"]}
                rows.append(row)
                if not args.json:
                    tc = row["trace_corr"]
                    print(f"{method:12s} {preset:12s} seed {seed:4d}  F1 {row['f1']:.3f}  P {row['precision']:.3f}  "
                          f"R {row['recall']:.3f}  CaImAn F1 {row['caiman_f1']:.3f}  trace r "
                          f"{tc if tc is None else round(tc, 3)}  {row['n_pred']}/{row['n_true']} units  "
                          f"{row['seconds']} s ({row['fps']} frames/s)", flush=True)
    if args.json:
        print(json.dumps(rows))
        return
    print("mean F1 per method and preset:")
    for method in args.methods:
        for preset in args.presets:
            f1s = [r["f1"] for r in rows if r["preset"] == preset and r["method"] == method]
            tcs = [r["trace_corr"] for r in rows if r["preset"] == preset and r["method"] == method
                   and r["trace_corr"] is not None]
            cells = pooled.get((method, preset), [])
            print(f"  {method:12s} {preset:12s} F1 {statistics.mean(f1s):.3f}  trace r "
                  f"{statistics.median(tcs) if tcs else float('nan'):.3f}  (n={len(f1s)}; pooled over "
                  f"{len(cells)} matched cells {statistics.median(cells) if cells else float('nan'):.3f})")
        cells = [r for preset in args.presets for r in pooled.get((method, preset), [])]
        print(f"  {method:12s} {'all presets':12s} trace r pooled over {len(cells)} matched cells "
              f"{statistics.median(cells) if cells else float('nan'):.3f}")


if __name__ == "__main__":
    main()
