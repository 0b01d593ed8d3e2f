"""Issue 28: the result's lease, what a SIGKILL leaves behind, sessions that share one Dask
client, blank movies and failed runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from conftest import run_cli
from somaflow.errors import InputError, ResultLockedError, StoreError
from somaflow.io import lease, schema, stores
from somaflow.params import RunParams
from somaflow.preprocess.pipeline import detection_movie
from somaflow.preprocess.summary import summary_images
from somaflow.session import end_failed_session, find_units, session_params, stages, start_session
from somaflow.session.layout import scratch_url, stage_outputs

# ----------------------------------------------------------------------------- the lease


@pytest.fixture(params=["local", "s3"])
def out_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "r.zarr")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/results/r.zarr"


def _other_process_takes(url: str, ttl: float = 30) -> subprocess.CompletedProcess:
    code = ("import sys; from somaflow.io import lease\n"
            "try:\n    lease.acquire(sys.argv[1], ttl=float(sys.argv[2]))\n"
            "except Exception as e:\n    print(type(e).__name__, e); sys.exit(3)\n"
            "import os; os._exit(0)  # dies holding it, as a SIGKILLed run does\n")
    return subprocess.run([sys.executable, "-c", code, url, str(ttl)], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)


def _live_holder(url: str, ttl: float = 60) -> subprocess.Popen:
    """Another process that takes the lease of ``url`` and keeps running (and renewing) until killed."""
    code = ("import sys; from somaflow.io import lease\n"
            "lease.acquire(sys.argv[1], ttl=float(sys.argv[2]))\n"
            "print('held', flush=True); sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, url, str(ttl)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lease_refuses_a_second_owner_and_expires(out_url):
    holder = _live_holder(out_url)
    try:
        fs, path = stores.filesystem(lease.lease_url(out_url))
        record = json.loads(fs.cat_file(path))
        assert {"host", "pid", "token"} <= set(record["owner"]) and record["expires"] > time.time()
        with pytest.raises(ResultLockedError, match="another run"):
            lease.acquire(out_url)
        second = _other_process_takes(out_url)
        assert second.returncode == 3 and "ResultLockedError" in second.stdout
    finally:
        holder.kill()
        holder.wait(30)
    # its process is gone (a SIGKILLed run on this machine): the lease is taken over at once
    with lease.held(out_url, ttl=30):
        pass
    # a holder on another machine (its process cannot be checked from here): only its expiry frees it
    crashed = out_url.replace("r.zarr", "c.zarr")
    fs.pipe_file(stores.filesystem(lease.lease_url(crashed))[1], json.dumps(
        {"owner": {"host": "elsewhere", "pid": 1, "token": "x"}, "expires": time.time() + 1.0}).encode())
    with pytest.raises(ResultLockedError, match="another run"):
        lease.acquire(crashed)
    time.sleep(1.5)
    with lease.held(crashed, ttl=30) as mine:
        again = lease.acquire(crashed)  # re-entrant in one process
        assert again is mine
        lease.release(again)
        assert _other_process_takes(crashed).returncode == 3
    fs.invalidate_cache()
    assert not fs.exists(stores.filesystem(lease.lease_url(crashed))[1])  # released by the outermost holder


def test_lease_is_renewed_while_held(tmp_path):
    url = str(tmp_path / "r.zarr")
    with lease.held(url, ttl=1.2):
        time.sleep(2.5)  # past two lifetimes: still ours because it was renewed
        assert _other_process_takes(url).returncode == 3


def test_lease_on_an_unwritable_location_is_a_store_error(tmp_path):
    (tmp_path / "file").write_text("x")
    for bad in ("/proc/somaflow-x.zarr", str(tmp_path / "file" / "r.zarr")):
        with pytest.raises(StoreError, match="cannot write"):
            lease.acquire(bad)
    with pytest.raises(StoreError):
        lease.check_writable("/sys/somaflow-x")


# ----------------------------------------------------------------------------- SIGKILL leaves nothing running


def test_prefect_server_dies_with_its_parent(tmp_path):
    """Item 9: the ephemeral Prefect server started for a run does not outlive a SIGKILLed run."""
    code = ("import os, sys, time\nfrom somaflow.runtime import configure_prefect_env, start_prefect_server\n"
            "configure_prefect_env()\nfrom prefect.server.api.server import SubprocessASGIServer\n"
            "start_prefect_server()\nprint(SubprocessASGIServer._instances[None].server_process.pid, flush=True)\n"
            "time.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "SOMAFLOW_HOME": str(tmp_path)})
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        server = int(proc.stdout.readline())
        os.kill(server, 0)  # running
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(server, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{server}/stat") as fh:  # a zombie waiting for init counts as gone
            if fh.read().split()[2] == "Z":
                return
        time.sleep(0.5)
    os.kill(server, signal.SIGKILL)
    pytest.fail("the Prefect server outlived its parent")


def test_a_new_run_removes_scratch_and_partial_outputs(tmp_path):
    out = str(tmp_path / "r.zarr")
    work = tmp_path / "r.zarr.work"
    (work / ".movie.zarr.partial-00000000").mkdir(parents=True)
    os.makedirs(scratch_url(out) + "/fit_movie.zarr")
    (work / "somaflow-run.json").write_text("{}")
    start_session(str(tmp_path / "in.tif"), out)
    assert sorted(os.listdir(work)) == ["somaflow-run.json"]
    # a failure before any stage output: nothing left for a later run to mistake
    assert end_failed_session(out) and not work.exists()
    # ... but a work store with a finished stage is kept for the rerun to resume
    start_session(str(tmp_path / "in.tif"), out)
    (work / "movie.zarr").mkdir()
    assert not end_failed_session(out) and work.exists()


# ----------------------------------------------------------------------------- sessions sharing one client


def test_a_write_does_not_switch_other_threads_off_the_cluster(tmp_path, small_result):
    """The known bug: write_result set dask's process-wide scheduler to threads; a session
    computing meanwhile on the archive's distributed client ran on the local scheduler and
    failed with 'Missing dependency'. Every scheduler choice is now per call."""
    from distributed import Client, LocalCluster, get_worker

    ds = schema.open_result(small_result).load()

    def on_worker(block: np.ndarray) -> np.ndarray:
        try:
            get_worker()
            return np.ones_like(block)
        except ValueError:
            return np.zeros_like(block)

    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as lc, Client(lc):
        stop = threading.Event()

        def writer() -> None:
            i = 0
            while not stop.is_set():
                schema.write_result(ds, str(tmp_path / f"w{i}.zarr"))
                i += 1

        t = threading.Thread(target=writer)
        t.start()
        try:
            fractions = [float(da.ones((64,), chunks=4).map_blocks(on_worker).mean().compute()) for _ in range(30)]
        finally:
            stop.set()
            t.join()
    assert min(fractions) == 1.0, fractions


# ----------------------------------------------------------------------------- blank movies, NaN summaries


@pytest.mark.parametrize("method", ["cnmf", "local-maxima", "pca-ica"])
def test_blank_movie_gives_an_empty_result(tmp_path, method):
    """Item 3: a movie where nothing is found extracts zero units, not a crash."""
    rng = np.random.default_rng(1)
    movie = xr.DataArray(rng.normal(100, 5, (60, 40, 40)).astype(np.float32), dims=("frame", "y", "x"),
                         attrs={"fps": 10.0})
    p = RunParams.for_movie(10.0, "2p", 5.0, {"method": method}, shape=movie.shape)
    with dask.config.set(scheduler="synchronous"):
        det = summary_images(detection_movie(movie.chunk({"frame": 20}), p.preprocess), p.summary).compute()
        units, traces = find_units(movie.chunk({"frame": 20}), det, p)
    assert units.sizes["unit"] == 0 and traces["traces"].shape == (0, 60)


def test_summary_with_nan_is_refused_and_not_written(tmp_path):
    """Item 11: summary images holding NaN are an input error naming the movie, never a complete store."""
    rng = np.random.default_rng(2)
    m = rng.integers(0, 1000, (40, 32, 32)).astype(np.float32)
    m[5] = np.nan
    url = str(tmp_path / "corrected.zarr")
    ds = schema.make_movie_dataset(xr.DataArray(m, dims=("frame", "y", "x")).chunk({"frame": 10}), fps=10.0,
                                   modality="2p", source="in.tif", source_checksum="x")
    schema.write_movie(ds, url)
    p = RunParams.for_movie(10.0, "2p", 5.0, shape=m.shape)
    out = str(tmp_path / "r.zarr")
    with dask.config.set(scheduler="synchronous"), pytest.raises(InputError, match="in.tif has NaN"):
        stages.summary(url, p, out_url=out)
    assert not any(stores.exists(u) for u in stage_outputs(out)["summary"])


def test_three_frames_fail_before_any_stage(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "three.tif", np.arange(3 * 32 * 32, dtype=np.uint16).reshape(3, 32, 32))
    with pytest.raises(InputError, match="needs at least 16 frames"):
        session_params(str(tmp_path / "three.tif"), fps=10)


# ----------------------------------------------------------------------------- a full disk inside a Dask task

#: run in a user and mount namespace of its own (no root needed, nothing left mounted): --out on a
#: 1 MiB tmpfs (the ingested movie fits, the motion-corrected one does not), then the same run
#: after the tmpfs grows, as after space is freed; what --out holds is copied out after each
_FULL_DISK = """
set -u
mount -t tmpfs -o size=1m tmpfs "$DISK"
"$SOMAFLOW" run "$MOVIE" --out "$DISK/r.zarr" --fps 10 --method local-maxima --cluster local --workers 1 \
    > "$LOGS/full.out" 2> "$LOGS/full.err"
echo $? > "$LOGS/full.rc"
cp -a "$DISK" "$LOGS/after-full"
mount -o remount,size=64m "$DISK"
"$SOMAFLOW" run "$MOVIE" --out "$DISK/r.zarr" --fps 10 --method local-maxima --cluster local --workers 1 \
    > "$LOGS/freed.out" 2> "$LOGS/freed.err"
echo $? > "$LOGS/freed.rc"
cp -a "$DISK" "$LOGS/after-freed"
"""


def _own_mounts_allowed(where) -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$0"', str(where)],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.integration
def test_a_full_disk_in_a_dask_task_is_one_line_and_the_rerun_resumes(tmp_path, make_movie, prefect_api):
    """Item 10: ENOSPC while a worker process writes a stage's chunks: exit 3, one line naming the
    full disk and the fix, no traceback, no partial stage a later run could take for finished;
    after space is freed the same command resumes after the last finished stage."""
    disk, logs = tmp_path / "disk", tmp_path / "logs"
    disk.mkdir()
    logs.mkdir()
    if not _own_mounts_allowed(disk):
        pytest.skip("no user and mount namespaces here (unshare -rm): cannot make a small disk without root")
    movie = make_movie(6, n_frames=40) / "movie.tif"
    env = {**os.environ, **prefect_api, "DISK": str(disk), "LOGS": str(logs), "MOVIE": str(movie),
           "SOMAFLOW": str(Path(sys.executable).with_name("somaflow"))}
    subprocess.run(["unshare", "-rm", "sh", "-c", _FULL_DISK], env=env, check=True, timeout=600)

    err = (logs / "full.err").read_text()
    assert (logs / "full.rc").read_text().strip() == "3", err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("somaflow: error: cannot write") and "disk is full" in lines[-1], err
    assert "rerun" in lines[-1] and "Traceback" not in err
    # every other line is the run's progress: no worker log, no second error line
    assert all(line.startswith(("[r.zarr]", "Dask dashboard")) for line in lines[:-1]), err
    work = logs / "after-full" / "r.zarr.work"
    assert not (logs / "after-full" / "r.zarr").exists()
    left = sorted(p.name for p in work.iterdir())
    assert "movie.zarr" in left and not any("partial" in n for n in left), left
    for name in left:  # every stage store left behind is complete: nothing half-written to mistake
        if name.endswith(".zarr"):
            assert schema.is_complete(str(work / name)), name

    freed = (logs / "freed.err").read_text()
    assert (logs / "freed.rc").read_text().strip() == "0", freed
    assert "[r.zarr] ingest: skipped" in freed, freed
    assert schema.is_complete(str(logs / "after-freed" / "r.zarr"))


# ----------------------------------------------------------------------------- a cluster that does not start


def test_a_local_cluster_that_does_not_start_is_one_line_not_an_internal_error(tmp_path, make_movie, prefect_api):
    """A nanny that fails to start (seen under load: a worker timing out) is tried once more with longer
    timeouts, then is exit 75 (a temporary failure) with one line naming the cluster, not exit 70.
    Provoked by a worker preload that cannot be imported: every start fails the same way."""
    out = tmp_path / "r.zarr"
    proc = run_cli("run", str(make_movie(6, n_frames=40) / "movie.tif"), "--out", str(out), "--fps", "10",
                   "--method", "local-maxima", "--cluster", "local", "--workers", "1", check=False,
                   env={**prefect_api, "DASK_DISTRIBUTED__WORKER__PRELOAD": '["somaflow_no_such_preload"]'})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 75, proc.stderr
    assert lines[-1].startswith("somaflow: error: the local Dask cluster (--workers 1) did not start, twice")
    assert "somaflow_no_such_preload" in lines[-1] and "Traceback" not in proc.stderr
    assert all(line.startswith("[r.zarr]") for line in lines[:-1]), proc.stderr
    assert not out.exists() and not schema.is_complete(str(out))
