"""GPU inference speed of the shipped detectors at 512 x 512 (network only, whole frames, no tiling).

Needs a CUDA GPU (it says so and exits otherwise). Each detector's default weights run on
one whole-frame input of the size the pipeline gives it; the raw frames per second count
the movie frames a batch stands for (STNeuroNet / (2+1)D ConvNet: ``batch_frames`` binned
frames x the bin factor of a 30 Hz movie). fp32, and bf16 autocast beside it.

    python benchmarks/bench_gpu.py [--size 512] [--repeats 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402


def _time(fn, repeats: int) -> float:
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--models", nargs="+", default=["stneuronet", "convnet2p1d", "unet2d", "meanimage2d"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from somaflow.detect.cnn import CnnParams
    from somaflow.inference import weights_path
    from somaflow.nn import load_checkpoint

    if not torch.cuda.is_available():
        sys.exit("bench_gpu: torch sees no CUDA GPU; the CPU figures come from bench_cnn.py --sections speed.")
    dev = torch.device("cuda")
    p = CnnParams.for_movie(30.0, "2p", 6.0)
    out = {"machine": machine(), "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
           "size": args.size, "bin_factor": p.input.factor, "batch_frames": p.input.batch_frames, "models": {}}
    s = args.size
    for name in args.models:
        model, _ = load_checkpoint(weights_path(name, "default"))
        model = model.to(dev).eval()
        if name in ("stneuronet", "convnet2p1d"):
            t = p.input.batch_frames + (-p.input.batch_frames % p.input.pad_multiple)
            x = torch.randn(1, 1, t, s, s, device=dev)
            raw = p.input.batch_frames * p.input.factor
        else:
            x = torch.randn(1, 4 if name == "unet2d" else 1, s, s, device=dev)
            raw = None
        row = {}
        for label, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                           ("bf16", torch.autocast("cuda", dtype=torch.bfloat16))):
            with torch.no_grad(), ctx:
                sec = _time(lambda m=model, v=x: m(v), args.repeats)
            row[label] = {"seconds_per_pass": round(sec, 4),
                          "raw_frames_per_second": round(raw / sec, 1) if raw else None}
        row["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(dev)
        out["models"][name] = row
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['machine']}; {out['gpu']}, torch {out['torch']}; {s}x{s}, 30 Hz binned x{p.input.factor}")
    for name, row in out["models"].items():
        cells = "  ".join(
            f"{k}: {v['seconds_per_pass'] * 1e3:.1f} ms/pass"
            + (f" = {v['raw_frames_per_second']:.0f} raw frames/s" if v["raw_frames_per_second"] else "")
            for k, v in row.items() if isinstance(v, dict))
        print(f"  {name:12s} {cells}  (peak {row['peak_gpu_memory_gb']} GB)")


if __name__ == "__main__":
    main()
