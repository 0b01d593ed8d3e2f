"""Preprocessing throughput and memory: frames/s and peak RSS per process.

Simulates a movie straight into a movie zarr (streamed, chunk by chunk), then
runs the preprocessing stages of ``somaflow run`` on a local Dask cluster:
motion correction (template, shifts, corrected movie written to zarr) and the
summary images of the detection movie (binning, background removal, denoising
as configured). Prints frames/s per stage and the peak resident memory of the
client and of every worker.

    .venv/bin/python benchmarks/bench_preprocess.py                       # 512x512, 1000 frames
    .venv/bin/python benchmarks/bench_preprocess.py --frames 8000 --workers 2   # the >= 4 GB movie
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import PeakRSS, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2p-large", help="simulator preset (default 2p-large, 512x512)")
    ap.add_argument("--frames", type=int, default=1000, help="frames to simulate (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1.5GiB", help="per-worker memory limit")
    ap.add_argument("--motion", default=None, help="motion mode override: none|rigid|piecewise|auto")
    ap.add_argument("--workdir", default=None, help="where to put the zarrs (default: a temp dir)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from distributed import Client, LocalCluster

    from somaflow.io import schema
    from somaflow.params import RunParams
    from somaflow.preprocess.motion import registration_model
    from somaflow.session import stages
    from somaflow.simulate import as_dask_array, simulate

    workdir = args.workdir or tempfile.mkdtemp(prefix="somaflow-bench-")
    sim = simulate(args.preset, seed=args.seed, n_frames=args.frames)
    meta = sim.meta
    T, Y, X = meta["shape"]
    movie_url = os.path.join(workdir, "movie.zarr")
    out_url = os.path.join(workdir, "result.zarr")
    results: dict[str, object] = {"machine": machine(), "preset": args.preset, "shape": [T, Y, X],
                                  "bytes": T * Y * X * 2, "workers": args.workers}
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=args.memory_limit,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        if not os.path.exists(movie_url):
            t0 = time.perf_counter()
            arr = as_dask_array(sim, frames_per_chunk=64)
            import xarray as xr

            ds = schema.make_movie_dataset(xr.DataArray(arr, dims=("frame", "y", "x")), fps=meta["fps"],
                                           modality=meta["modality"], source=f"simulate:{args.preset}",
                                           source_checksum=f"simulate:{args.preset}:{args.seed}:{T}")
            schema.write_movie(ds, movie_url)
            results["simulate_s"] = round(time.perf_counter() - t0, 1)
        overrides = {"preprocess": {"motion": {"mode": args.motion}}} if args.motion else {}
        p = RunParams.for_movie(meta["fps"], meta["modality"], meta["neuron_radius"], overrides,
                                shape=(T, Y, X))
        with PeakRSS(client) as mem:
            t0 = time.perf_counter()
            corrected_url, motion = stages.motion(movie_url, out_url, p)
            t1 = time.perf_counter()
            det, plain = stages.summary(corrected_url, p)
            t2 = time.perf_counter()
        results.update({
            # the model registration used (motion.mode auto resolved) and what chose it
            "motion_mode": registration_model(motion, p.preprocess.motion.mode)["mode"],
            "nonrigid_deviation": registration_model(motion, p.preprocess.motion.mode).get("nonrigid_deviation"),
            "motion_s": round(t1 - t0, 1), "motion_fps": round(T / (t1 - t0), 1),
            "summary_s": round(t2 - t1, 1), "summary_fps": round(T / (t2 - t1), 1),
            "preprocess_fps": round(T / (t2 - t0), 1),
            "peak_rss_gib": {k: round(v / 2**30, 3) for k, v in mem.peaks.items()},
            "peak_worker_rss_gib": round(mem.worker_peak() / 2**30, 3),
        })
    if args.json:
        print(json.dumps(results))
        return
    print(f"machine: {results['machine']}")
    print(f"movie: {args.preset} {T}x{Y}x{X} uint16 ({results['bytes'] / 1e9:.2f} GB), {args.workers} workers")
    if "simulate_s" in results:
        print(f"simulate+write: {results['simulate_s']} s")
    print(f"motion ({results['motion_mode']}): {results['motion_s']} s = {results['motion_fps']} frames/s")
    print(f"summary images: {results['summary_s']} s = {results['summary_fps']} frames/s")
    print(f"preprocessing end to end: {results['preprocess_fps']} frames/s")
    print(f"peak RSS: {mem.report()}; worker max {results['peak_worker_rss_gib']} GiB")


if __name__ == "__main__":
    main()
