"""Real data: Neurofinder accuracy per method, miniscope ROI contours.

* ``neurofinder_left`` (2p, human anatomical ROIs in ``regions.json``; the
  frame rate was not recorded, ~7 Hz for Neurofinder 00): ``somaflow run``
  with each method, then F1 in the three conventions of ``somaflow evaluate``.
* ``miniscope_1p`` (1p, 10 Hz, no ground truth): ``somaflow run`` with each
  1p method; the accepted units' contours are drawn over the max projection
  into ``benchmarks/output/miniscope_1p_<method>.png``, and the unit count and
  median area are printed.

    .venv/bin/python benchmarks/bench_real.py
    .venv/bin/python benchmarks/bench_real.py --methods cnmf --skip-miniscope
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OUT = Path(__file__).resolve().parent / "output"


def contours_png(image: np.ndarray, masks: np.ndarray, path: Path) -> None:
    """Max projection (contrast-stretched, grey) with each mask's outline in colour."""
    from PIL import Image
    from skimage.segmentation import find_boundaries

    lo, hi = np.percentile(image, [1, 99.7])
    grey = np.clip((image - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
    rng = np.random.default_rng(0)
    for m in masks:
        edge = find_boundaries(m, mode="inner")
        rgb[edge] = rng.integers(80, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).resize((rgb.shape[1] * 2, rgb.shape[0] * 2), Image.NEAREST).save(path)


def neurofinder_breakdown(result: str, truth: str, radius: float) -> None:
    """Which units match and which human ROIs are missed, for a CNMF result on Neurofinder.

    Prints the accepted units per ``kind`` (CNMF components or the morphology
    detector's units) with how many match a human ROI (IoU ≥ 0.5), and the
    median anatomical contrast (:func:`somaflow.extract.cnmf.mask_contrast`,
    ring SDs) of found and missed ROIs on the mean and correlation images: a
    missed ROI darker than its surround on both is a silent soma that only its
    shape shows.
    """
    import xarray as xr

    from somaflow.evaluate import evaluate
    from somaflow.evaluate.groundtruth import Truth, load_truth
    from somaflow.extract.cnmf import mask_contrast
    from somaflow.io import schema

    units_url = result + ".work/units.zarr"
    if not os.path.exists(units_url):
        return
    kind = np.asarray(xr.open_zarr(units_url, consolidated=False)["kind"].values).astype(str)
    res = schema.open_result(result)
    accepted = np.asarray(res["accepted"].values, bool)
    ev = evaluate(result, truth, include_matches=True)
    matched_units = {m[0] for m in ev["matches"]}
    all_masks = None
    for k in np.unique(kind):
        ids = np.flatnonzero(accepted & (kind == k))
        print(f"  accepted {k} units: {len(ids)}, matching a human ROI: {sum(int(i) in matched_units for i in ids)}")
        left = np.flatnonzero(~accepted & (kind == k))
        if len(left):
            # what the units left out would score on their own (the fallback's morphology units, say)
            all_masks = np.asarray(res["masks"].values, bool) if all_masks is None else all_masks
            alone = evaluate(Truth(masks=all_masks[left], ids=left), truth)
            print(f"  not accepted {k} units: {len(left)}, matching a human ROI on their own: {alone['n_matched']}")
    t = load_truth(truth, shape=tuple(res["mean_image"].shape))
    found = np.isin(np.asarray(t.ids), [m[1] for m in ev["matches"]])
    masks = np.asarray(t.masks, bool)
    for name in ("mean_image", "correlation_image"):
        con = mask_contrast(masks, np.asarray(res[name].values, np.float32), radius)
        print(f"  human ROIs' contrast on the {name}: found {np.nanmedian(con[found]):+.2f}, "
              f"missed {np.nanmedian(con[~found]):+.2f} (median, ring SDs; {found.sum()} found, {(~found).sum()} missed)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["local-maxima", "cnmf", "pca-ica"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--neurofinder-fps", type=float, default=7.0)
    ap.add_argument("--neuron-radius", type=float, default=5.0, help="2p soma radius (px) for Neurofinder")
    ap.add_argument("--skip-miniscope", action="store_true")
    ap.add_argument("--skip-neurofinder", action="store_true")
    args = ap.parse_args()

    from somaflow.runtime import configure_prefect_env

    configure_prefect_env()
    from somaflow_flows.session import session_flow

    from somaflow.evaluate import evaluate
    from somaflow.io import schema
    from somaflow.params import RunParams
    from somaflow.runtime import dask_client

    work = tempfile.mkdtemp(prefix="somaflow-real-")
    print(f"# real data on {machine()}")
    with dask_client("local", args.workers):
        if not args.skip_neurofinder:
            movie = DATA / "neurofinder_left" / "movie.tif"
            truth = DATA / "neurofinder_left" / "regions.json"
            print(f"\n## neurofinder_left ({args.neurofinder_fps} Hz assumed, r = {args.neuron_radius} px)")
            print(f"{'method':14s} {'F1':>6s} {'P':>6s} {'R':>6s} {'CaImAn F1':>9s} {'NF F1':>6s} units  seconds")
            for method in args.methods:
                p = RunParams.for_movie(args.neurofinder_fps, "2p", args.neuron_radius, {"method": method},
                                        shape=(600, 512, 256))
                out = os.path.join(work, f"nf-{method}.zarr")
                t0 = time.perf_counter()
                session_flow(str(movie), out, p, overwrite=True)
                sec = time.perf_counter() - t0
                ev = evaluate(out, str(truth))
                print(f"{method:14s} {ev['f1']:6.3f} {ev['precision']:6.3f} {ev['recall']:6.3f} "
                      f"{ev['caiman']['f1']:9.3f} {ev['neurofinder']['combined']:6.3f} {ev['n_pred']:5d}  {sec:6.1f}",
                      flush=True)
                if method == "cnmf":
                    neurofinder_breakdown(out, str(truth), args.neuron_radius)
            print(f"(ground truth: {ev['n_true']} human ROIs; Suite2p's figures: bench_suite2p.py)")
        if not args.skip_miniscope:
            movie = DATA / "miniscope_1p" / "movie.tif"
            print("\n## miniscope_1p (10 Hz, 1p, no ground truth)")
            for method in [m for m in args.methods if m != "local-maxima"] or args.methods:
                p = RunParams.for_movie(10.0, "1p", None, {"method": method}, shape=(400, 480, 752))
                out = os.path.join(work, f"mini-{method}.zarr")
                t0 = time.perf_counter()
                session_flow(str(movie), out, p, overwrite=True)
                sec = time.perf_counter() - t0
                res = schema.open_result(out)
                acc = np.asarray(res["accepted"].values, bool)
                masks = np.asarray(res["masks"].values, bool)[acc]
                areas = masks.reshape(len(masks), -1).sum(axis=1)
                png = OUT / f"miniscope_1p_{method}.png"
                contours_png(np.asarray(res["max_image"].values, np.float32), masks, png)
                print(f"{method:14s} {int(acc.sum())} accepted of {acc.size} units, median area "
                      f"{np.median(areas) if len(areas) else 0:.0f} px, {sec:.1f} s -> {png}", flush=True)


if __name__ == "__main__":
    main()
