"""End-to-end scaling of one session: frames/s of the session flow with 1, 2, ... workers.

Simulates a movie straight into a movie zarr (streamed, in parallel), then runs
the whole session flow of ``somaflow run`` (motion correction -> summary images
-> extraction -> traces -> result zarr; ingest is not needed for a movie zarr)
on a ``LocalCluster`` of N single-threaded worker processes, for each N in
``--workers``, recomputing every stage each time. Prints seconds, frames/s and
the speed-up over the first configuration, plus per-stage seconds. Cluster
start-up and Prefect's server start are excluded (a warm-up flow runs first).

    .venv/bin/python benchmarks/bench_scaling.py                              # 512x512, 2000 frames, 1 and 2 workers
    .venv/bin/python benchmarks/bench_scaling.py --frames 4000 --workers 1 2 4 --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import PeakRSS, machine  # noqa: E402


def simulate_movie(url: str, preset: str, frames: int, size: int, seed: int, workers: int) -> dict:
    """Write a simulated movie zarr at ``url`` (once) and return the simulation's meta."""
    import xarray as xr
    from distributed import Client, LocalCluster

    from somaflow.io import schema
    from somaflow.simulate import as_dask_array, simulate
    from somaflow.simulate.presets import PRESETS

    base = PRESETS[preset]
    area = size * size / (base.shape[0] * base.shape[1])  # keep the cell density of the preset
    sim = simulate(preset, seed=seed, n_frames=frames, shape=(size, size),
                   n_cells=max(1, round(base.n_cells * area)))
    if not schema.is_complete(url):
        with LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=":0") as lc, Client(lc):
            arr = as_dask_array(sim, frames_per_chunk=64)
            m = sim.meta
            ds = schema.make_movie_dataset(xr.DataArray(arr, dims=("frame", "y", "x")), fps=m["fps"],
                                           modality=m["modality"], source=f"simulate:{preset}",
                                           source_checksum=f"simulate:{preset}:{seed}:{frames}:{size}")
            schema.write_movie(ds, url, overwrite=True)
    return sim.meta


def _cpu_seconds(workers: set[int]) -> tuple[float, float]:
    """CPU seconds (user + system) so far of the worker processes, and of this process with its other
    descendants (client, scheduler, Prefect's server, nannies): what competes with the workers for cores."""
    import psutil

    me = psutil.Process()
    own, other = 0.0, 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        if proc.pid in workers:
            own += t.user + t.system
        else:
            other += t.user + t.system
    return own, other


def _write_task_stream(path: str, data: list[dict], t0: float) -> None:
    """Save the compute intervals of a task stream, seconds from the run's start, for idle-time analysis."""
    offset = time.time() - time.perf_counter() + t0  # the stream holds wall-clock times
    rows = [{"key": str(t["key"]), "worker": t["worker"], "start": round(s["start"] - offset, 3),
             "stop": round(s["stop"] - offset, 3)}
            for t in data for s in t["startstops"] if s["action"] == "compute"]
    with open(path, "w") as f:
        json.dump(sorted(rows, key=lambda r: r["start"]), f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2p-large", help="simulator preset (default 2p-large)")
    ap.add_argument("--frames", type=int, default=2000, help="frames (default 2000)")
    ap.add_argument("--size", type=int, default=512, help="frame height and width in pixels (default 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    ap.add_argument("--motion", default=None, help="motion mode override: none|rigid|piecewise|auto (default: the run's, auto for 2p)")
    ap.add_argument("--workdir", default=None, help="where to put the zarrs (default: a temp dir, removed)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--task-stream", default=None, metavar="PREFIX",
                    help="write each run's Dask task stream (key, worker, start, stop) to PREFIX-N.json")
    args = ap.parse_args()

    from somaflow.runtime import configure_prefect_env

    configure_prefect_env()
    from distributed import get_task_stream
    from prefect import flow
    from somaflow_flows.session import session_flow

    from somaflow.io import schema
    from somaflow.params import RunParams
    from somaflow.runtime import dask_client

    workdir = args.workdir or tempfile.mkdtemp(prefix="somaflow-scaling-")
    movie_url = os.path.join(workdir, f"movie-{args.preset}-{args.frames}-{args.size}.zarr")
    t0 = time.perf_counter()
    meta = simulate_movie(movie_url, args.preset, args.frames, args.size, args.seed, max(args.workers))
    simulate_s = time.perf_counter() - t0
    T, Y, X = meta["shape"]
    overrides = {"preprocess": {"motion": {"mode": args.motion}}} if args.motion else {}
    p = RunParams.for_movie(meta["fps"], meta["modality"], meta["neuron_radius"], overrides, shape=(T, Y, X))

    @flow(name="bench-warm-up")
    def warm_up() -> int:
        return 1

    warm_up()  # starts Prefect's ephemeral server outside the timed region
    rows = []
    for n in args.workers:
        out = os.path.join(workdir, f"result-{n}.zarr")
        load = os.getloadavg()[0]
        with dask_client("local", n) as client, PeakRSS(client) as mem, get_task_stream(client) as ts:
            workers = set(client.run(os.getpid).values())
            cpu0 = _cpu_seconds(workers)
            t0 = time.perf_counter()
            summary = session_flow(movie_url, out, p, overwrite=True, session=f"{n}-workers")
            seconds = time.perf_counter() - t0
            cpu1 = _cpu_seconds(workers)
        if args.task_stream:
            _write_task_stream(f"{args.task_stream}-{n}.json", ts.data, t0)
        busy = sum(s["stop"] - s["start"] for t in ts.data for s in t["startstops"] if s["action"] == "compute")
        rows.append({"workers": n, "seconds": round(seconds, 1), "frames_per_second": round(T / seconds, 1),
                     "timings": summary["timings"], "n_units": summary["n_units"],
                     "peak_worker_rss_gib": round(mem.worker_peak() / 2**30, 2),
                     "peak_client_rss_gib": round(mem.peaks.get("client", 0) / 2**30, 2), "load_before": round(load, 1),
                     "tasks": len(ts.data), "task_seconds": round(busy, 1),
                     "worker_utilization": round(busy / (seconds * n), 2),
                     "worker_cpu_seconds": round(cpu1[0] - cpu0[0], 1),
                     "other_cpu_seconds": round(cpu1[1] - cpu0[1], 1)})
        rows[-1]["motion_mode"] = schema.open_result(out).attrs.get("motion_mode")  # auto resolved
        shutil.rmtree(out + ".work", ignore_errors=True)
    base = rows[0]["seconds"]
    for r in rows:  # from the seconds: the printed frames/s are rounded
        r["speedup"] = round(base / r["seconds"], 2)
    result = {"machine": machine(), "preset": args.preset,
              "shape": [T, Y, X], "bytes": T * Y * X * 2, "motion_mode": rows[0]["motion_mode"],
              "simulate_s": round(simulate_s, 1), "runs": rows}
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result))
        return
    print(f"machine: {result['machine']}")
    print(f"movie: {args.preset} {T}x{Y}x{X} uint16 ({result['bytes'] / 1e9:.2f} GB), motion {result['motion_mode']}")
    for r in rows:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in r["timings"].items())
        print(f"{r['workers']} worker(s): {r['seconds']} s = {r['frames_per_second']} frames/s "
              f"(x{r['speedup']}; {stages}; {r['tasks']} tasks, {r['task_seconds']} task-seconds, workers busy "
              f"{r['worker_utilization']:.0%}; CPU s workers {r['worker_cpu_seconds']}, rest {r['other_cpu_seconds']}; peak worker RSS {r['peak_worker_rss_gib']} GiB, "
              f"client {r['peak_client_rss_gib']} GiB; "
              f"1-min load before {r['load_before']})")


if __name__ == "__main__":
    main()
