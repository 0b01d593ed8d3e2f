"""Resumable runs: stage hashes, fingerprints, result states, and a SIGKILLed `somaflow run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import kill_group, run_cli
from somaflow import provenance
from somaflow.io import schema
from somaflow.params import RunParams

# ----------------------------------------------------------------------------- stage hashes


def _params(**over) -> dict:
    return RunParams.for_movie(10.0, "2p", 5.0, over, shape=(100, 64, 64)).model_dump(mode="json")


def test_stage_hashes_are_deterministic_and_chained():
    a = provenance.stage_hashes("blake2b:00", _params())
    assert a == provenance.stage_hashes("blake2b:00", _params())
    assert list(a) == list(provenance.STAGES)
    assert len(set(a.values())) == len(a)
    other_source = provenance.stage_hashes("blake2b:01", _params())
    assert all(other_source[s] != a[s] for s in a)


@pytest.mark.parametrize("over, first_changed", [
    ({"traces": {"neuropil_coefficient": 0.5}}, "extract"),
    ({"detect": {"threshold_k": 2.5}}, "extract"),
    ({"summary": {"pnr_smooth_sigma": 1.0}}, "summary"),
    ({"preprocess": {"binning": {"target_fps": 5.0}}}, "summary"),
    ({"preprocess": {"motion": {"max_shift": 7}}}, "motion"),
    ({"ingest": {"axes": "tyx", "memory_budget": 1 << 20}}, "ingest"),
])
def test_a_parameter_change_invalidates_its_stage_and_everything_after(over, first_changed):
    base = provenance.stage_hashes("blake2b:00", _params())
    changed = provenance.stage_hashes("blake2b:00", _params(**over))
    i = provenance.STAGES.index(first_changed)
    for stage in provenance.STAGES[:i]:
        assert changed[stage] == base[stage], stage
    for stage in provenance.STAGES[i:]:
        assert changed[stage] != base[stage], stage


def test_stage_hash_needs_a_checksum():
    with pytest.raises(ValueError, match="checksum"):
        provenance.stage_hashes("", _params())


def test_fingerprint_of_listing_ignores_order_and_sees_changes():
    a = [{"name": "/d/x", "size": 3, "mtime": 1.0}, {"name": "/d/y", "size": 4, "mtime": 2.0}]
    f = provenance.fingerprint_of_listing(a, "/d")
    assert f == provenance.fingerprint_of_listing(a[::-1], "/d")
    assert f != provenance.fingerprint_of_listing([a[0], {**a[1], "mtime": 2.5}], "/d")
    assert f != provenance.fingerprint_of_listing([a[0], {**a[1], "size": 5}], "/d")
    # the same tree somewhere else has the same fingerprint (names are relative)
    moved = [{**e, "name": e["name"].replace("/d", "/e")} for e in a]
    assert f == provenance.fingerprint_of_listing(moved, "/e")


# ----------------------------------------------------------------------------- result states


def _write(url: str, **attrs) -> str:
    ds = xr.Dataset({"v": (("y",), np.arange(3, dtype=np.float32))}, attrs=attrs)
    return schema.write_dataset(ds, url, overwrite=True)


def _uncomplete(url: str) -> None:
    del zarr.open_group(url, mode="r+", zarr_format=3).attrs["complete"]


def test_result_status(tmp_path):
    url = str(tmp_path / "r.zarr")
    assert provenance.result_status(url, "h1") == "missing"
    _write(url, stage_hash="h1", somaflow_version="0.1.0")
    assert provenance.result_status(url, "h1") == "done"
    assert provenance.is_current(url, "h1") and not provenance.is_current(url, "h2")
    assert provenance.result_status(url, "h2") == "stale"
    assert provenance.result_status(url, None) == "stale"
    _uncomplete(url)
    work = provenance.work_url(url)
    provenance.write_run_record(work, str(tmp_path / "m.tif"), url)
    assert provenance.result_status(url, "h1", work) == "incomplete"  # never "done" without complete=true
    assert provenance.result_status(url, "h1") == "foreign"  # no run record vouches for it
    assert not provenance.is_current(url, "h1")


def test_known_source_checksum_from_a_matching_fingerprint(tmp_path):
    src = tmp_path / "movie.bin"
    src.write_bytes(b"0123456789")
    out = str(tmp_path / "r.zarr")
    assert provenance.known_source_checksum(str(src), [out]) is None
    _write(out, source_checksum="blake2b:abc", provenance={"source_fingerprint": provenance.source_fingerprint(str(src))})
    assert provenance.known_source_checksum(str(src), [out]) == "blake2b:abc"
    os.utime(src, (1, 1))  # touched: the recorded checksum can no longer be trusted
    assert provenance.known_source_checksum(str(src), [out]) is None


def test_remove_partial_outputs(tmp_path):
    (tmp_path / ".corrected.zarr.partial-1234abcd").mkdir()
    (tmp_path / ".corrected.zarr.partial-1234abcd" / "c").write_text("x")
    (tmp_path / "movie.zarr").mkdir()
    removed = provenance.remove_partial_outputs(str(tmp_path))
    assert len(removed) == 1 and sorted(os.listdir(tmp_path)) == ["movie.zarr"]
    assert provenance.remove_partial_outputs(str(tmp_path / "absent")) == []


def test_versions_and_host():
    v = provenance.versions()
    assert {"python", "somaflow", "numpy", "dask", "xarray", "zarr", "prefect"} <= set(v)
    assert provenance.host()["node"]


# ----------------------------------------------------------------------------- crash and resume


@pytest.fixture(scope="module")
def session(make_movie):
    return make_movie(21, n_frames=60)


@pytest.fixture(scope="module")
def reference(session, tmp_path_factory, prefect_api):
    """An uninterrupted run, on the cluster kind the runs it is compared with compute on.

    Not the threaded scheduler: there BLAS uses every core, while distributed's worker
    processes run it single-threaded (OMP/OPENBLAS_NUM_THREADS=1), so float sums differ
    in the last bits (measured: motion shifts by ~3e-5 px) and a unit at a threshold
    can come or go (45 units against 44 on this movie).
    """
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    proc = run_cli("run", str(session / "movie.tif"), "--out", str(out), "--fps", "10", "--cluster", "local",
                   "--workers", "2", "--json", env=prefect_api)
    summary = json.loads(proc.stdout)
    assert summary["status"] == "done" and set(summary["stages"].values()) == {"ran"}
    return out


def _run_until(args: list[str], env: dict, line: str, timeout: float = 300) -> tuple[subprocess.Popen, list[str]]:
    """Start `somaflow ARGS` in its own process group; return once stderr shows ``line``."""
    exe = Path(sys.executable).with_name("somaflow")
    proc = subprocess.Popen([str(exe), *args], env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen: list[str] = []
    deadline = time.time() + timeout
    assert proc.stderr is not None
    for text in proc.stderr:
        seen.append(text.rstrip())
        if line in text or time.time() > deadline:
            break
    return proc, seen


def _same_result(a: str, b: str) -> None:
    x, y = schema.open_result(a), schema.open_result(b)
    assert x.sizes == y.sizes
    np.testing.assert_array_equal(x["masks"].values, y["masks"].values)
    # float32 work on other workers in another order: equal to ~1e-4 relative, not bit for bit
    np.testing.assert_allclose(x["traces"].values, y["traces"].values, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(x["dff"].values, y["dff"].values, rtol=2e-3, atol=2e-3)
    sx, sy = x["spikes"].values.ravel(), y["spikes"].values.ravel()
    assert np.corrcoef(sx, sy)[0, 1] > 0.999 if sx.std() > 0 else np.array_equal(sx, sy)
    np.testing.assert_allclose(x["shifts"].values, y["shifts"].values, atol=1e-6)
    np.testing.assert_allclose(x["correlation_image"].values, y["correlation_image"].values, atol=1e-6)
    assert x.attrs["stage_hash"] == y.attrs["stage_hash"]


@pytest.mark.integration
def test_sigkill_then_resume(session, reference, tmp_path, prefect_api):
    out = tmp_path / "r.zarr"
    args = ["run", str(session / "movie.tif"), "--out", str(out), "--fps", "10", "--cluster", "local",
            "--workers", "2", "--json"]
    proc, seen = _run_until(args, prefect_api, "motion: done")
    try:
        assert any("motion: done" in s for s in seen), "\n".join(seen)
        assert any("Prefect flow run" in s for s in seen) and any("Dask dashboard" in s for s in seen)
    finally:
        kill_group(proc)
    work = tmp_path / "r.zarr.work"
    assert schema.is_complete(str(work / "corrected.zarr")) and schema.is_complete(str(work / "motion.zarr"))
    assert not schema.is_complete(str(out))

    # the rerun skips what is complete and ends with what an uninterrupted run writes
    summary = json.loads(run_cli(*args[:-1], "--json", env=prefect_api).stdout)
    assert summary["status"] == "done"
    assert summary["stages"]["ingest"] == "skipped" and summary["stages"]["motion"] == "skipped"
    assert summary["stages"]["write"] == "ran"
    assert not [p for p in os.listdir(work) if ".partial-" in p]
    _same_result(str(out), str(reference))
    prov = schema.read_attrs(str(out))["provenance"]
    assert prov["stages"]["motion"]["status"] == "skipped"
    assert prov["source_checksum"] == schema.read_attrs(str(reference))["source_checksum"]
    assert {"somaflow", "numpy", "dask", "xarray", "zarr", "prefect"} <= set(prov["versions"])
    assert set(prov["stage_hashes"]) == set(provenance.STAGES)

    # a finished session is not run again: no cluster, no flow, exit 0
    t0 = time.perf_counter()
    again = run_cli(*args[:-1], env=prefect_api)
    assert "already done (skipped)" in again.stderr and "(already done: skipped)" in again.stdout
    assert time.perf_counter() - t0 < 60

    # a result without complete=true is never taken for a finished one: the write stage reruns
    mtime = (work / "units.zarr" / "zarr.json").stat().st_mtime
    _uncomplete(str(out))
    summary = json.loads(run_cli("run", str(session / "movie.tif"), "--out", str(out), "--fps", "10",
                                 "--cluster", "threads", "--workers", "2", "--json", env=prefect_api).stdout)
    assert summary["status"] == "done" and summary["stages"]["write"] == "ran"
    assert {summary["stages"][s] for s in ("ingest", "motion", "summary", "extract")} == {"skipped"}
    assert (work / "units.zarr" / "zarr.json").stat().st_mtime == mtime
    assert schema.is_complete(str(out))
    _same_result(str(out), str(reference))


@pytest.mark.integration
def test_changed_parameters(session, reference, tmp_path, prefect_api):
    """New trace parameters: the result is stale (an error without --overwrite); a fresh
    result over the same work store recomputes extraction only."""
    params = tmp_path / "p.yaml"
    params.write_text("traces:\n  baseline_percentile: 30\n")
    movie = str(session / "movie.tif")
    stale = run_cli("run", movie, "--out", str(reference), "--fps", "10", "--params", str(params),
                    check=False, env=prefect_api)
    assert stale.returncode == 3 and "already exists" in stale.stderr and "--overwrite" in stale.stderr
    assert len(stale.stderr.strip().splitlines()) == 1
    # a copy of the finished run's work store under a new result name: only extract and write run
    out = tmp_path / "new.zarr"
    shutil.copytree(str(reference) + ".work", str(out) + ".work")
    summary = json.loads(run_cli("run", movie, "--out", str(out), "--fps", "10", "--params", str(params),
                                 "--cluster", "local", "--workers", "2", "--json", env=prefect_api).stdout)
    assert summary["stages"] == {"ingest": "skipped", "motion": "skipped", "summary": "skipped",
                                 "extract": "ran", "classify": "ran", "write": "ran", "report": "ran"}
    new, ref = schema.open_result(str(out)), schema.open_result(str(reference))
    np.testing.assert_array_equal(new["masks"].values, ref["masks"].values)
    assert not np.allclose(new["dff"].values, ref["dff"].values)
    assert json.loads(new.attrs["params"])["traces"]["baseline_percentile"] == 30


@pytest.mark.slow
def test_sigkill_then_resume_on_s3(session, reference, s3_bucket, s3_server, prefect_api):
    """The kill-and-resume run with input, work store and result on S3 (loopback moto): stage
    outputs written in place are taken only once complete; the rerun skips them and ends with the
    local run's result."""
    from somaflow.io import stores

    fs, _ = stores.filesystem(s3_bucket)
    fs.put(str(session / "movie.tif"), f"{s3_bucket}/raw/movie.tif")
    out = f"{s3_bucket}/results/r.zarr"
    env = {**prefect_api, **s3_server}
    args = ["run", f"{s3_bucket}/raw/movie.tif", "--out", out, "--fps", "10", "--cluster", "local",
            "--workers", "2", "--json"]
    proc, seen = _run_until(args, env, "motion: done")
    try:
        assert any("motion: done" in s for s in seen), "\n".join(seen)
    finally:
        kill_group(proc)
    work = out + ".work"
    assert schema.is_complete(f"{work}/corrected.zarr") and schema.is_complete(f"{work}/motion.zarr")
    assert not schema.is_complete(out)
    summary = json.loads(run_cli(*args, env=env).stdout)
    assert summary["status"] == "done"
    assert summary["stages"]["ingest"] == "skipped" and summary["stages"]["motion"] == "skipped"
    assert summary["stages"]["write"] == "ran"
    x, y = schema.open_result(out), schema.open_result(str(reference))
    np.testing.assert_array_equal(x["masks"].values, y["masks"].values)
    np.testing.assert_allclose(x["traces"].values, y["traces"].values, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(x["shifts"].values, y["shifts"].values, atol=1e-6)
    again = run_cli(*args[:-1], env=env)
    assert "already done (skipped)" in again.stderr
