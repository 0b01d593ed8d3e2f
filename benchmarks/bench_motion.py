"""Motion correction: accuracy on simulated presets and throughput at 512x512.

Accuracy: for every preset and seed, the RMS length of the (dy, dx) error of
the recovered shifts against the simulator's true ones, after removing the
constant offset (the template's position is arbitrary):

* ``rigid`` — per-frame shifts of ``mode="rigid"`` (acceptance: <= 0.1 px);
* ``patch`` — ``mode="piecewise"``, the displacement field evaluated at the
  simulator's patch centres, the offset removed per patch, RMS over frames and
  patches (acceptance: <= 0.25 px), and the worst single patch;
* ``mean`` — the rigid part (spatial mean of the field) of the piecewise
  estimate against the simulator's rigid shifts.

Throughput: frames/s of the template, of the estimation and of the
application (separately, dask threads over frame chunks, all cores), for rigid
and piecewise registration, on a 512x512 slice of the ``2p-large`` preset;
with ``--downsample`` also for estimation on 2x2 binned frames. The patch
accuracy on that slice is printed as well.

    .venv/bin/python benchmarks/bench_motion.py
    .venv/bin/python benchmarks/bench_motion.py --seeds 0 1 2 3 4 --speed-frames 512
    .venv/bin/python benchmarks/bench_motion.py --quick     # 2p-small, 1p-small, 2p-nonrigid only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

#: presets and the simulator overrides used (2p-medium is shortened to keep the run short);
#: a ``"preset"`` entry names the simulator preset when the row's name is not one
PRESETS: dict[str, dict[str, object]] = {
    "2p-small": {},
    "2p-lowsnr": {},
    "1p-small": {},
    "1p-nonrigid": {
        "preset": "1p-small",
        "motion": "nonrigid",
        "nonrigid_grid": (3, 3),
        "nonrigid_amplitude": 0.8,
    },
    "2p-nonrigid": {},
    "2p-medium": {"n_frames": 600},
}
QUICK = ("2p-small", "1p-small", "2p-nonrigid")


def rms(est: np.ndarray, true: np.ndarray) -> float:
    """RMS length of the (dy, dx) error after removing its temporal mean (per patch)."""
    d = np.asarray(est, np.float64) - np.asarray(true, np.float64)
    d -= d.mean(axis=0)
    return float(np.sqrt((d**2).sum(axis=-1).mean()))


def accuracy(preset: str, seed: int, overrides: dict[str, object]) -> dict[str, float | str | int]:
    import xarray as xr

    from somaflow.preprocess.motion import (
        MotionParams,
        compute_template,
        estimate_shifts,
        shifts_at,
    )
    from somaflow.simulate import simulate

    overrides = dict(overrides)
    sim = simulate(str(overrides.pop("preset", preset)), seed=seed, **overrides)
    movie = xr.DataArray(sim.movie, dims=("frame", "y", "x"))
    meta = sim.meta
    row: dict[str, float | str | int] = {"preset": preset, "seed": seed, "frames": movie.shape[0]}
    for mode in ("rigid", "piecewise"):
        p = MotionParams.for_movie(
            meta["fps"], meta["modality"], meta["neuron_radius"], movie.shape, mode=mode
        )
        t0 = time.perf_counter()
        ds = estimate_shifts(movie, compute_template(movie, p), p).compute()
        row[f"{mode}_s"] = round(time.perf_counter() - t0, 2)
        if mode == "rigid":
            row["rigid"] = rms(ds["shifts"].values, sim.shifts)
            continue
        row["mean"] = rms(ds["shifts"].values, sim.shifts)
        row["fallback"] = float(ds["patch_fallback"].values.mean())
        if sim.patch_shifts is not None:
            cy, cx = (np.asarray(c, np.float64) for c in meta["patch_centers"])
            est = shifts_at(ds, cy, cx).values
            row["patch"] = rms(est, sim.patch_shifts)
            worst = max(
                rms(est[:, i, j], sim.patch_shifts[:, i, j])
                for i in range(len(cy))
                for j in range(len(cx))
            )
            row["patch_worst"] = worst
    return row


def speed(n_frames: int, seed: int, downsample: bool) -> list[dict[str, float | str]]:
    import dask
    import xarray as xr

    from somaflow.preprocess.motion import (
        MotionParams,
        apply_shifts,
        compute_template,
        estimate_shifts,
        shifts_at,
    )
    from somaflow.simulate import simulate

    sim = simulate("2p-large", seed=seed, n_frames=n_frames)
    t0 = time.perf_counter()
    movie_np = sim.movie
    print(f"simulated {movie_np.shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    meta = sim.meta
    # frame chunks of 32 frames, as a movie zarr would hold them
    movie = xr.DataArray(movie_np, dims=("frame", "y", "x")).chunk({"frame": 32})
    rows = []
    configs = [("rigid", 1), ("piecewise", 1)] + ([("piecewise", 2)] if downsample else [])
    for mode, k in configs:
        p = MotionParams.for_movie(
            meta["fps"], meta["modality"], meta["neuron_radius"], movie.shape, mode=mode, downsample=k
        )
        with dask.config.set(scheduler="threads"):
            t0 = time.perf_counter()
            template = compute_template(movie, p)
            t_template = time.perf_counter() - t0
            ds = estimate_shifts(movie, template, p)
            t0 = time.perf_counter()
            ds = ds.compute()
            t_est = time.perf_counter() - t0
            t0 = time.perf_counter()
            apply_shifts(movie, ds, p).data.sum().compute()  # computed, then reduced away
            t_apply = time.perf_counter() - t0
        row: dict[str, float | str] = {
            "mode": mode,
            "downsample": k,
            "template_frames": template.attrs["template_frames"],
            "template_s": round(t_template, 2),
            "estimate_fps": round(n_frames / t_est, 1),
            "apply_fps": round(n_frames / t_apply, 1),
            "both_fps": round(n_frames / (t_est + t_apply), 1),
        }
        if mode == "rigid":
            row["rigid_rms"] = round(rms(ds["shifts"].values, sim.shifts), 3)
        else:
            cy, cx = (np.asarray(c, np.float64) for c in meta["patch_centers"])
            row["patch_rms"] = round(rms(shifts_at(ds, cy, cx).values, sim.patch_shifts), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--presets", nargs="*", default=None, help=f"default: {' '.join(PRESETS)}")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--speed-frames", type=int, default=256, help="512x512 frames timed")
    ap.add_argument("--no-speed", action="store_true", help="skip the 512x512 timing")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the preset accuracy table")
    ap.add_argument("--downsample", action="store_true", help="also time downsample=2")
    ap.add_argument("--quick", action="store_true", help=f"presets {', '.join(QUICK)} only")
    args = ap.parse_args()

    from _common import machine

    print(f"# motion correction benchmark on {machine()}", flush=True)
    if not args.no_accuracy:
        presets = args.presets or list(QUICK if args.quick else PRESETS)
        print("\n## accuracy: RMS shift error (px) after removing the constant offset")
        print(
            f"{'preset':12} {'seed':>4} {'frames':>6} {'rigid':>7} {'mean':>7} {'patch':>7} "
            f"{'worst':>7} {'fallbk':>6} {'t_rigid':>8} {'t_piece':>8}"
        )
        table: dict[str, list[dict]] = {}
        for preset in presets:
            for seed in args.seeds:
                r = accuracy(preset, seed, PRESETS.get(preset, {}))
                table.setdefault(preset, []).append(r)

                def f(key: str, r: dict = r) -> str:
                    return f"{r[key]:7.3f}" if key in r else f"{'-':>7}"

                print(
                    f"{preset:12} {seed:>4} {r['frames']:>6} {f('rigid')} {f('mean')} {f('patch')} "
                    f"{f('patch_worst')} {r['fallback']:6.3f} {r['rigid_s']:7.1f}s "
                    f"{r['piecewise_s']:7.1f}s",
                    flush=True,
                )
        print("\nmean over seeds (acceptance: rigid <= 0.1 px, patch <= 0.25 px):")
        for preset, rows in table.items():
            parts = [
                f"{k} {np.mean([r[k] for r in rows]):.3f} (max {np.max([r[k] for r in rows]):.3f})"
                for k in ("rigid", "mean", "patch", "patch_worst")
                if k in rows[0]
            ]
            print(f"  {preset:12} " + ", ".join(parts))
    if not args.no_speed:
        print(f"\n## throughput at 512x512 ({args.speed_frames} frames of 2p-large, {os.cpu_count()} cores)")
        speed(args.speed_frames, args.seeds[0], args.downsample)


if __name__ == "__main__":
    main()
