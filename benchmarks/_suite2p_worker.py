"""Run Suite2p on one TIFF and save its ROI masks; executed by ``bench_suite2p.py`` in Suite2p's own venv.

Not importable from somaflow's environment (Suite2p is not a dependency).

    VENV/bin/python benchmarks/_suite2p_worker.py DATA_DIR OUT_DIR --fs 7 --diameter 10 --tau 1.0 \
        --algorithm sparsery

Writes ``OUT_DIR/masks.npz`` with ``masks`` (roi, y, x) bool (every pixel of
every ROI Suite2p detected), ``iscell`` (roi,) bool (its built-in classifier)
and ``seconds``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import suite2p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data_dir", help="folder holding movie.tif (uncompressed)")
    ap.add_argument("out_dir")
    ap.add_argument("--fs", type=float, required=True, help="frame rate (Hz)")
    ap.add_argument("--diameter", type=float, required=True, help="cell diameter (px)")
    ap.add_argument("--tau", type=float, default=1.0, help="indicator decay (s)")
    ap.add_argument("--algorithm", default="sparsery", choices=["sparsery", "sourcery"])
    args = ap.parse_args()

    settings = suite2p.default_settings()
    settings["torch_device"] = "cpu"
    settings["fs"] = args.fs
    settings["tau"] = args.tau
    settings["diameter"] = [args.diameter, args.diameter]
    settings["detection"]["algorithm"] = args.algorithm
    settings["classification"]["use_builtin_classifier"] = True
    db = suite2p.default_db()
    db.update({"data_path": [args.data_dir], "save_path0": args.out_dir, "tiff_list": ["movie.tif"],
               "nplanes": 1, "nchannels": 1})
    t0 = time.time()
    paths = suite2p.run_s2p(db=db, settings=settings)
    seconds = time.time() - t0
    plane = os.path.dirname(paths[0])
    # stat.npy is an object array that Suite2p wrote a moment ago in this run's own output folder
    stat = np.load(os.path.join(plane, "stat.npy"), allow_pickle=True)
    iscell = np.load(os.path.join(plane, "iscell.npy"))[:, 0] > 0.5
    plane_db = np.load(os.path.join(plane, "db.npy"), allow_pickle=True).item()  # written by this run too
    shape = (int(plane_db["Ly"]), int(plane_db["Lx"]))
    masks = np.zeros((len(stat), *shape), dtype=bool)
    for k, s in enumerate(stat):
        masks[k, s["ypix"], s["xpix"]] = True
    np.savez_compressed(os.path.join(args.out_dir, "masks.npz"), masks=masks, iscell=iscell, seconds=seconds)
    print(f"suite2p {args.algorithm}: {len(stat)} ROIs, {int(iscell.sum())} classified as cells, {seconds:.1f} s")


if __name__ == "__main__":
    main()
