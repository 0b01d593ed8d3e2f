"""Suite2p on the same real data, scored by somaflow's evaluator: the reference for ``bench_real.py``.

Suite2p is not a dependency: the first run creates a separate virtual
environment (``--venv``, default ``.venv-suite2p`` in the repository root) and
installs ``suite2p==1.1.0`` into it from PyPI (about 6 GB: its torchvision
brings a CUDA build of torch, which runs on the CPU here). Each detection
algorithm runs once on ``../shared/data/neurofinder_left`` with the frame rate
and cell size ``bench_real.py`` gives ``somaflow run`` (7 Hz, diameter 10 px,
τ 1 s), and its ROIs, all of them and those its built-in classifier calls
cells, are scored against the human ROIs in the three conventions of
``somaflow evaluate``.

Suite2p's ScanImageTiffReader misreads the deflate-compressed movie.tif
(pixel values up to 32767 where the movie holds at most 3818, mean image
uncorrelated with the movie's), so the movie is first rewritten uncompressed
into the work folder; the input is never modified.

    .venv/bin/python benchmarks/bench_suite2p.py
    .venv/bin/python benchmarks/bench_suite2p.py --algorithms sourcery --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "neurofinder_left"
SUITE2P = "suite2p==1.1.0"


def ensure_venv(venv: Path) -> Path:
    """The Suite2p interpreter, creating the environment on first use."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with {SUITE2P} (first run only; about 6 GB)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", SUITE2P], check=True)
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA), help="folder with movie.tif and regions.json")
    ap.add_argument("--venv", default=str(ROOT / ".venv-suite2p"))
    ap.add_argument("--algorithms", nargs="+", default=["sparsery", "sourcery"])
    ap.add_argument("--fs", type=float, default=7.0)
    ap.add_argument("--diameter", type=float, default=10.0)
    ap.add_argument("--tau", type=float, default=1.0)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tifffile

    from somaflow.evaluate import evaluate
    from somaflow.evaluate.groundtruth import Truth

    data = Path(args.data)
    truth = data / "regions.json"
    python = ensure_venv(Path(args.venv))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="somaflow-suite2p-"))
    raw = work / "data"
    raw.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(raw / "movie.tif", tifffile.imread(data / "movie.tif"))  # uncompressed copy
    rows = []
    for algorithm in args.algorithms:
        out = work / algorithm
        subprocess.run([str(python), str(Path(__file__).with_name("_suite2p_worker.py")), str(raw), str(out),
                        "--fs", str(args.fs), "--diameter", str(args.diameter), "--tau", str(args.tau),
                        "--algorithm", algorithm], check=True)
        with np.load(out / "masks.npz") as z:
            masks, iscell, seconds = z["masks"], z["iscell"], float(z["seconds"])
        for label, keep in (("all ROIs", np.ones(len(masks), bool)), ("iscell", iscell)):
            ev = evaluate(Truth(masks=masks[keep], source=f"suite2p {algorithm} {label}"), str(truth))
            rows.append({"algorithm": algorithm, "rois": label, "n": int(keep.sum()), "f1": ev["f1"],
                         "precision": ev["precision"], "recall": ev["recall"], "caiman_f1": ev["caiman"]["f1"],
                         "neurofinder": ev["neurofinder"]["combined"], "offset": ev["offset"],
                         "seconds": round(seconds, 1)})
    if args.json:
        print(json.dumps(rows))
        return
    print(f"# Suite2p 1.1.0 on {data.name} ({args.fs:g} Hz, diameter {args.diameter:g} px), {machine()}")
    print(f"{'algorithm':10s} {'ROIs':9s} {'n':>4s} {'F1':>6s} {'P':>6s} {'R':>6s} {'CaImAn F1':>9s} "
          f"{'NF F1':>6s} offset  seconds")
    for r in rows:
        print(f"{r['algorithm']:10s} {r['rois']:9s} {r['n']:4d} {r['f1']:6.3f} {r['precision']:6.3f} "
              f"{r['recall']:6.3f} {r['caiman_f1']:9.3f} {r['neurofinder']:6.3f} {str(r['offset']):7s} "
              f"{r['seconds']}")


if __name__ == "__main__":
    main()
