"""Per-stage cost of one session: CPU milliseconds per frame, passes over the movie, bytes per frame.

Runs the stages of ``somaflow run`` (:mod:`somaflow.session.stages`: ingest,
motion, summary, extract, classify, write) one after the other in this process
on Dask's synchronous scheduler, so a stage's CPU time is this process's CPU
time (``time.process_time``, every thread) while it runs, independent of how
many cores a cluster would spread it over. Bytes read and written are this
process's ``rchar``/``wchar`` (``/proc/self/io``: every read and write
call, local stores only); "passes" is bytes read over the size of the movie
in its input dtype.

The input is a simulated TIFF (``--preset``, ``--frames``, ``--size``) written
once into ``--workdir``, or ``--input`` (any movie ``somaflow run`` reads, with
``--fps`` and ``--neuron-radius``).

    .venv/bin/python benchmarks/bench_stages.py --frames 1000                # 512x512 2p-large
    .venv/bin/python benchmarks/bench_stages.py --frames 4000 --json stages.json
    .venv/bin/python benchmarks/bench_stages.py --input movie.tif --fps 30 --neuron-radius 6
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine  # noqa: E402


def _io() -> tuple[int, int]:
    """(rchar, wchar) of this process so far (Linux)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


class Meter:
    """CPU seconds, wall seconds and bytes read/written of each ``with meter(stage):`` block."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}

    def __call__(self, stage: str) -> Meter:
        self._stage = stage
        return self

    def __enter__(self) -> None:
        self._t = (time.process_time(), time.perf_counter(), *_io())

    def __exit__(self, *exc: object) -> None:
        cpu, wall, r, w = time.process_time(), time.perf_counter(), *_io()
        self.rows[self._stage] = {"cpu_s": cpu - self._t[0], "wall_s": wall - self._t[1],
                                  "read_bytes": r - self._t[2], "written_bytes": w - self._t[3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default=None, help="a movie to run on instead of a simulated one")
    ap.add_argument("--fps", type=float, default=None)
    ap.add_argument("--neuron-radius", type=float, default=None)
    ap.add_argument("--modality", default="2p", help="of --input (default 2p)")
    ap.add_argument("--preset", default="2p-large")
    ap.add_argument("--frames", type=int, default=1000)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--method", default=None, help="extraction method (default: the run's default)")
    ap.add_argument("--workdir", default=None, help="keeps the simulated movie between invocations")
    ap.add_argument("--json", default=None, help="also write the table here")
    args = ap.parse_args()

    import dask
    from bench_throughput import simulate

    from somaflow.io import schema
    from somaflow.params import RunParams
    from somaflow.session import stage_outputs, stages

    work = Path(args.workdir or tempfile.mkdtemp(prefix="somaflow-stages-"))
    if args.input:
        src, fps, radius = args.input, args.fps, args.neuron_radius
        if fps is None or radius is None:
            ap.error("--input needs --fps and --neuron-radius")
        truth = None
    else:
        data = work / f"sim-{args.preset}-{args.frames}-{args.size}-{args.seed}"
        meta = simulate(data, args.preset, args.frames, args.size, args.seed)
        src, fps, radius, truth = str(data / "movie.tif"), meta["fps"], meta["neuron_radius"], data / "ground_truth.zarr"
    out = str(work / "result.zarr")
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out + ".work", ignore_errors=True)
    overrides = {"method": args.method} if args.method else {}
    from somaflow.io.ingest import load_movie

    shape = tuple(load_movie(src, fps=fps, modality=args.modality).shape)  # lazy: reads the header only
    p = RunParams.for_movie(fps, args.modality, radius, overrides, shape=shape)
    meter = Meter()
    with dask.config.set(scheduler="synchronous"):
        with meter("ingest"):
            movie_url = stages.ingest(src, out, fps, p.modality, p)
        movie = schema.open_movie(movie_url)
        n, movie_bytes = int(movie.sizes["frame"]), movie.nbytes
        with meter("motion"):
            corrected_url, motion = stages.motion(movie_url, out, p)
        with meter("summary"):
            det, plain = stages.summary(corrected_url, p, out_url=out)
        with meter("extract"):
            units, traces = stages.extract(corrected_url, det, p, out_url=out)
        images = det.assign(mean_image=plain["mean_image"], max_image=plain["max_image"])
        with meter("classify"):
            verdict = stages.classify(units, traces, images, p, out_url=out)
        units = units.assign(score=verdict["score"], accepted=verdict["accepted"])
        with meter("write"):
            stages.write(out, movie_url, images, units, schema.open_result(stage_outputs(out)["extract"][1]),
                         motion, p, {}, True)
    total = {k: sum(r[k] for r in meter.rows.values()) for k in ("cpu_s", "wall_s", "read_bytes", "written_bytes")}
    meter.rows["total"] = total
    table = {stage: {"cpu_ms_per_frame": round(1000 * r["cpu_s"] / n, 2), "wall_s": round(r["wall_s"], 1),
                     "passes_read": round(r["read_bytes"] / movie_bytes, 2),
                     "read_kb_per_frame": round(r["read_bytes"] / n / 1024, 1),
                     "written_kb_per_frame": round(r["written_bytes"] / n / 1024, 1)}
             for stage, r in meter.rows.items()}
    f1 = None
    if truth is not None:
        from somaflow.evaluate import evaluate

        f1 = round(evaluate(out, str(truth))["f1"], 3)
    print(f"# {src}: {n} frames of {tuple(movie.shape[1:])} ({movie_bytes / n / 1024:.0f} kB/frame), "
          f"method {p.method}, motion {p.preprocess.motion.mode}, F1 {f1}; {machine()}")
    print(f"{'stage':9s} {'CPU ms/frame':>12s} {'wall s':>7s} {'passes':>7s} {'read kB/fr':>10s} {'written kB/fr':>13s}")
    for stage, r in table.items():
        print(f"{stage:9s} {r['cpu_ms_per_frame']:12.2f} {r['wall_s']:7.1f} {r['passes_read']:7.2f} "
              f"{r['read_kb_per_frame']:10.1f} {r['written_kb_per_frame']:13.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "frames": n, "f1": f1, "stages": table}))


if __name__ == "__main__":
    main()
