"""End-to-end throughput against Suite2p: frames/s, summed peak memory and F1, side by side.

Simulates one 2p movie with known cells (``--preset``, default ``2p-large``:
512x512 at 30 Hz, cell density and radius of the preset) as an uncompressed
``movie.tif``, then runs, in alternation (A B A B ... ``--repeats`` pairs):

* **Suite2p** 1.1.0 with its defaults plus the cell diameter, frame rate and
  τ (``_suite2p_worker.py`` in Suite2p's own environment, created on first
  use as ``bench_suite2p.py`` does);
* **somaflow** ``somaflow run movie.tif --fps F --neuron-radius R`` with its
  defaults (local Dask, Prefect's ephemeral server, in-process inference).

Each is timed as a whole process (start-up, reading the TIFF, writing its
complete result), and its peak memory is the peak of the resident memory
summed over the process and every descendant (client, scheduler, workers,
Prefect's server), sampled every ``--interval`` s. Both results are scored
against the simulation's ground truth by ``somaflow.evaluate`` (IoU >= 0.5,
Hungarian matching): somaflow's accepted units, Suite2p's ROIs its classifier
calls cells and all of its ROIs. Prints each run, the medians and the ratio of
frames/s (somaflow / Suite2p) pair by pair.

    .venv/bin/python benchmarks/bench_throughput.py                          # 4000 frames, 2 pairs
    .venv/bin/python benchmarks/bench_throughput.py --frames 8000 --only somaflow --repeats 1
    .venv/bin/python benchmarks/bench_throughput.py --frames 500 --size 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import TreePeak, machine  # noqa: E402
from bench_suite2p import ensure_venv  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def simulate(folder: Path, preset: str, frames: int, size: int, seed: int) -> dict:
    """``folder/movie.tif`` and ``folder/ground_truth.zarr`` (once); returns the simulation's meta."""
    from somaflow.simulate import simulate as sim_fn
    from somaflow.simulate.presets import PRESETS
    from somaflow.simulate.write import write_simulation

    meta_path = folder / "meta.json"
    if not meta_path.exists():
        base = PRESETS[preset]
        area = size * size / (base.shape[0] * base.shape[1])  # the preset's cell density
        sim = sim_fn(preset, seed=seed, n_frames=frames, shape=(size, size),
                     n_cells=max(1, round(base.n_cells * area)))
        write_simulation(sim, str(folder), overwrite=True)
    return json.loads(meta_path.read_text())


def timed(cmd: list[str], interval: float, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; returns (seconds, summed peak RSS in bytes, stdout). Raises on failure."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with TreePeak(proc.pid, interval) as mem:
        out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return seconds, mem.peak, out


def run_suite2p(python: Path, data: Path, out: Path, meta: dict, interval: float) -> dict:
    import shutil

    from somaflow.evaluate import evaluate
    from somaflow.evaluate.groundtruth import Truth

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    seconds, peak, _ = timed([str(python), str(Path(__file__).with_name("_suite2p_worker.py")), str(data), str(out),
                              "--fs", str(meta["fps"]), "--diameter", str(2 * meta["neuron_radius"])], interval)
    with np.load(out / "masks.npz") as z:
        masks, iscell = z["masks"], z["iscell"]
    truth = str(data / "ground_truth.zarr")
    f1 = {label: evaluate(Truth(masks=masks[keep], source=f"suite2p {label}"), truth)["f1"]
          for label, keep in (("iscell", iscell), ("all", np.ones(len(masks), bool)))}
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": "suite2p", "seconds": round(seconds, 1), "peak_gib": round(peak / 2**30, 2),
            "f1": round(f1["iscell"], 3), "f1_all_rois": round(f1["all"], 3), "n": int(iscell.sum())}


def run_somaflow(data: Path, out: Path, meta: dict, interval: float, extra: list[str]) -> dict:
    import shutil

    from somaflow.evaluate import evaluate

    result = out / "result.zarr"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [str(BIN / "somaflow"), "run", str(data / "movie.tif"), "--fps", str(meta["fps"]),
           "--neuron-radius", str(meta["neuron_radius"]), "--out", str(result), "--json", *extra]
    seconds, peak, stdout = timed(cmd, interval)
    summary = json.loads(stdout.strip().splitlines()[-1])
    ev = evaluate(str(result), str(data / "ground_truth.zarr"))
    shutil.rmtree(out, ignore_errors=True)
    return {"tool": "somaflow", "seconds": round(seconds, 1), "peak_gib": round(peak / 2**30, 2),
            "f1": round(ev["f1"], 3), "n": int(summary["n_accepted"]),
            "timings": {k: round(v, 1) for k, v in summary["timings"].items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="2p-large")
    ap.add_argument("--frames", type=int, default=4000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=7, help="simulation seed (default 7: not a tuning seed)")
    ap.add_argument("--repeats", type=int, default=2, help="A B pairs (default 2; 0: only simulate the movie)")
    ap.add_argument("--only", choices=["suite2p", "somaflow"], default=None, help="run one tool only")
    ap.add_argument("--somaflow-args", default="", help="extra arguments of `somaflow run` (one string)")
    ap.add_argument("--venv", default=str(ROOT / ".venv-suite2p"), help="Suite2p's environment")
    ap.add_argument("--workdir", default=None, help="keeps the simulated movie between invocations")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling period (s)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="somaflow-throughput-"))
    data = work / f"sim-{args.preset}-{args.frames}-{args.size}-{args.seed}"
    t0 = time.perf_counter()
    meta = simulate(data, args.preset, args.frames, args.size, args.seed)
    print(f"# movie: {data / 'movie.tif'} {meta['shape']} at {meta['fps']} Hz, {meta['n_units']} cells "
          f"(ready in {time.perf_counter() - t0:.0f} s); {machine()}", flush=True)
    if args.repeats < 1:  # --repeats 0: only prepare the movie
        return
    python = ensure_venv(Path(args.venv)) if args.only != "somaflow" else None
    tools = [t for t in ("suite2p", "somaflow") if args.only in (None, t)]
    rows: list[dict] = []
    for rep in range(args.repeats):
        for tool in tools:
            load = os.getloadavg()[0]
            if tool == "suite2p":
                row = run_suite2p(python, data, work / "suite2p-out", meta, args.interval)  # type: ignore[arg-type]
            else:
                row = run_somaflow(data, work / "somaflow-out", meta, args.interval, args.somaflow_args.split())
            row.update(repeat=rep, frames_per_second=round(meta["shape"][0] / row["seconds"], 2),
                       load_before=round(load, 1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'tool':9s} {'frames/s':>9s} {'seconds':>8s} {'peak GiB':>9s} {'F1':>6s}   (medians of {args.repeats})")
    med = {}
    for tool in tools:
        rs = [r for r in rows if r["tool"] == tool]
        med[tool] = {k: statistics.median(r[k] for r in rs) for k in ("frames_per_second", "seconds", "peak_gib", "f1")}
        m = med[tool]
        print(f"{tool:9s} {m['frames_per_second']:9.2f} {m['seconds']:8.1f} {m['peak_gib']:9.2f} {m['f1']:6.3f}")
    if len(tools) == 2:
        ratios = [b["frames_per_second"] / a["frames_per_second"]
                  for a, b in zip(rows[0::2], rows[1::2], strict=True)]
        print(f"somaflow / Suite2p frames/s, pair by pair: {', '.join(f'{r:.2f}' for r in ratios)}; "
              f"median {statistics.median(ratios):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "meta": meta, "rows": rows, "medians": med}))


if __name__ == "__main__":
    main()
