"""What a run asks of the object store: requests and bytes per run, and the wait before the
first worker task on a large input.

Starts a loopback S3 server (moto) behind a counting proxy
(``somaflow.testing.s3proxy``), puts the input there and runs ``somaflow run``
with ``s3://`` input and result as a separate process, as a user would.

* ``--section requests``: a simulated session (``--preset``, ``--frames``),
  run end to end; prints the requests the store saw by method (``COPY`` is a
  server-side copy, a PUT with ``x-amz-copy-source``), bytes in and out, and
  the same counted for the result's work store only.
* ``--section first-task``: a synthetic uint16 TIFF of ``--gb`` gigabytes
  (512×512 frames); prints the seconds from the command's start to the first
  task a Dask worker starts (a scheduler plugin records it), then stops the run.

    .venv/bin/python benchmarks/bench_store.py --section requests
    .venv/bin/python benchmarks/bench_store.py --section first-task --gb 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from _common import machine  # noqa: E402

BIN = Path(sys.executable).parent
FIRST_TASK_PLUGIN = '''
import os, time
from distributed.diagnostics.plugin import SchedulerPlugin

class FirstTask(SchedulerPlugin):
    name = "first-task"
    done = False
    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing" and not self.done:
            self.done = True
            with open(os.environ["BENCH_FIRST_TASK"], "w") as fh:
                fh.write(f"{time.time()} {key!r}\\n")

def dask_setup(scheduler):
    scheduler.add_plugin(FirstTask())
'''


def _env(endpoint: str, home: str) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "SOMAFLOW_S3_ENDPOINT_URL": endpoint,
            "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def _s3(endpoint: str):
    import s3fs

    # a long read timeout: moto assembles a multipart upload of GBs slowly, and a retried
    # CompleteMultipartUpload races the first one
    return s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True,
                             config_kwargs={"read_timeout": 900})


def section_requests(args: argparse.Namespace, moto_url: str, tmp: str) -> dict:
    from somaflow.simulate import simulate, write_simulation
    from somaflow.testing.s3proxy import S3FaultProxy

    sim_dir = Path(tmp) / "sim"
    write_simulation(simulate(args.preset, seed=args.seed, n_frames=args.frames), str(sim_dir))
    meta = json.loads((sim_dir / "meta.json").read_text())
    fs = _s3(moto_url)
    fs.mkdir("bench")
    fs.put(str(sim_dir / "movie.tif"), "s3://bench/raw/movie.tif")
    with S3FaultProxy(moto_url) as proxy:
        env = _env(proxy.url, str(Path(tmp) / "prefect"))
        cmd = [str(BIN / "somaflow"), "run", "s3://bench/raw/movie.tif", "--out", "s3://bench/results/r.zarr",
               "--fps", str(meta["fps"]), "--modality", meta["modality"],
               "--neuron-radius", str(meta["neuron_radius"]), "--cluster", args.cluster, "--json"]
        proxy.reset_counts()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"somaflow run failed ({proc.returncode}): {proc.stderr[-3000:]}")
        counts = proxy.counts()
        work = [r for r in proxy.requests() if "/r.zarr.work/" in r[2]]
    by_work: dict[str, int] = {}
    for _, method, _, _ in work:
        by_work[method] = by_work.get(method, 0) + 1
    movie_bytes = (sim_dir / "movie.tif").stat().st_size
    return {"section": "requests", "preset": args.preset, "frames": args.frames, "seconds": round(seconds, 1),
            "input_bytes": movie_bytes, "requests": counts, "work_store_requests": by_work}


def section_first_task(args: argparse.Namespace, moto_url: str, tmp: str) -> dict:
    import numpy as np
    import tifffile

    frames = int(args.gb * 2**30 / (512 * 512 * 2))
    path = Path(tmp) / "big.tif"
    rng = np.random.default_rng(0)
    block = rng.integers(100, 4000, (50, 512, 512), dtype=np.uint16)
    movie = tifffile.memmap(path, shape=(frames, 512, 512), dtype=np.uint16, bigtiff=True)
    for i in range(0, frames, 50):
        movie[i:i + 50] = block[: min(50, frames - i)]
    movie.flush()
    del movie
    fs = _s3(moto_url)
    fs.mkdir("big")
    t = time.perf_counter()
    # one part at a time: moto's server fails concurrent multipart uploads of this size
    with open(path, "rb") as src, fs.open("s3://big/raw/big.tif", "wb", block_size=128 << 20) as dst:
        shutil.copyfileobj(src, dst, 64 << 20)
    upload = time.perf_counter() - t
    size = path.stat().st_size
    path.unlink()
    plugin = Path(tmp) / "first_task_plugin.py"
    plugin.write_text(FIRST_TASK_PLUGIN)
    marker = Path(tmp) / "first_task.txt"
    env = _env(moto_url, str(Path(tmp) / "prefect"))
    env["BENCH_FIRST_TASK"] = str(marker)
    port = 8786 + os.getpid() % 1000
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard", "--preload", str(plugin)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
                                   "--no-dashboard"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        from distributed import Client

        with Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=120)
        cmd = [str(BIN / "somaflow"), "run", "s3://big/raw/big.tif", "--out", "s3://big/results/r.zarr",
               "--fps", "30", "--cluster", address]
        t0 = time.time()
        errors = open(Path(tmp) / "run.err", "w+")
        run = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
        while not marker.exists() and run.poll() is None and time.time() - t0 < args.timeout:
            time.sleep(0.2)
        first = float(marker.read_text().split()[0]) if marker.exists() else None
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        if first is None:
            errors.seek(0)
            raise SystemExit(f"no worker task started; the run said: {errors.read()[-3000:]}")
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
    return {"section": "first-task", "input_bytes": size, "frames": frames, "upload_seconds": round(upload, 1),
            "seconds_to_first_worker_task": None if first is None else round(first - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--section", choices=["requests", "first-task"], default="requests")
    p.add_argument("--preset", default="2p-small")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster", default="local", help="somaflow run --cluster (requests section)")
    p.add_argument("--gb", type=float, default=2.0, help="input size of the first-task section")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    # keep objects in memory: moto spools larger ones to temporary files that its multipart
    # completion then reads after closing (ValueError: seek of closed file)
    os.environ.setdefault("MOTO_S3_DEFAULT_KEY_BUFFER_SIZE", str(8 << 30))
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            fn = section_requests if args.section == "requests" else section_first_task
            out = fn(args, f"http://{host}:{port}", tmp)
    finally:
        server.stop()
    out["machine"] = machine()
    print(json.dumps(out) if args.json else "\n".join(f"{k}: {v}" for k, v in out.items()))


if __name__ == "__main__":
    main()
