"""An output never destroys an input or a user's data (issue 21).

``run``, ``ingest`` and ``archive`` refuse an output that is, holds or lies
inside an input (with or without ``--overwrite``), and refuse anything at the
output that a somaflow run did not start (without ``--overwrite``): a user's
folder, a regular file, another tool's zarr. Only a result that a somaflow run
left unfinished, vouched for by its work store's run record, is resumed.
The resume of a run that really was killed is ``test_resume.test_sigkill_then_resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from conftest import run_cli
from somaflow import provenance
from somaflow.errors import OutputConflictError
from somaflow.io import guard, schema, stores

# ----------------------------------------------------------------------------- URL comparison


@pytest.mark.parametrize("out, inp, how", [
    ("/d/movie.tif", "/d/movie.tif", "is"),
    ("/d/movie.tif/", "/d//movie.tif", "is"),
    ("/d", "/d/movie.tif", "contains"),
    ("/", "/d/movie.tif", "contains"),
    ("/d/movie.zarr/r.zarr", "/d/movie.zarr", "inside"),
    ("/d/a.zarr2", "/d/a.zarr", None),  # a sibling that shares a prefix is apart
    ("/d/a", "/d/ab/movie.tif", None),
    ("/e/r.zarr", "/d/movie.tif", None),
    ("s3://b/raw", "s3://b/raw/m.tif", "contains"),
    ("s3a://b/raw/m.tif", "s3://b//raw/m.tif/", "is"),
    ("s3://b/results/r.zarr", "s3://b/raw/m.tif", None),
    ("s3://b", "s3://b/raw/m.tif", "contains"),
    ("s3://b/raw/m.tif", "/b/raw/m.tif", None),  # another store
    ("gcs://b/x", "gs://b/x/y.tif", "contains"),
    ("memory://m/r.zarr", "memory://m/r.zarr/movie", "contains"),
])
def test_overlap(out, inp, how):
    assert guard.overlap(out, inp) == how


def test_overlap_sees_through_symlinks_and_relative_paths(tmp_path, monkeypatch):
    real = tmp_path / "data"
    real.mkdir()
    (real / "movie.tif").write_bytes(b"x")
    (tmp_path / "link").symlink_to(real)
    assert guard.overlap(str(tmp_path / "link" / "movie.tif"), str(real / "movie.tif")) == "is"
    assert guard.overlap(str(tmp_path / "link"), str(real / "movie.tif")) == "contains"
    monkeypatch.chdir(real)
    assert guard.overlap("movie.tif", str(real / "movie.tif")) == "is"
    assert guard.overlap(f"file://{real}", "movie.tif") == "contains"


def test_check_output_apart_names_the_path_and_the_fix():
    guard.check_output_apart("/e/r.zarr", ["/d/movie.tif", None])
    with pytest.raises(OutputConflictError, match=r"--out /d contains the input /d/movie.tif.*Choose") as e:
        guard.check_output_apart("/d", [None, "/d/movie.tif"])
    assert e.value.exit_code == 2 and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- who owns --out


def _zarr(url: str, **attrs) -> str:
    ds = xr.Dataset({"v": (("y",), np.arange(3, dtype=np.float32))}, attrs=attrs)
    return schema.write_dataset(ds, url, overwrite=True)


def test_output_state_and_result_status(tmp_path):
    work = str(tmp_path / "r.zarr.work")
    url = str(tmp_path / "r.zarr")
    assert schema.output_state(url) == "missing"
    assert provenance.result_status(url, "h", work) == "missing"
    (tmp_path / "r.zarr").mkdir()
    (tmp_path / "r.zarr" / "notes.txt").write_text("mine")
    assert schema.output_state(url) == "foreign"
    assert provenance.result_status(url, "h", work) == "foreign"
    shutil.rmtree(url)
    (tmp_path / "r.zarr").write_text("a file")
    assert provenance.result_status(url, "h", work) == "foreign"
    os.remove(url)
    _zarr(url)  # a zarr somaflow did not write (no somaflow_version)
    assert schema.output_state(url) == "foreign" and provenance.result_status(url, "h", work) == "foreign"
    _zarr(url, somaflow_version="0.1.0", stage_hash="h")
    assert schema.output_state(url) == "complete" and provenance.result_status(url, "h", work) == "done"
    assert provenance.result_status(url, "other", work) == "stale"
    del zarr.open_group(url, mode="r+", zarr_format=3).attrs["complete"]
    assert schema.output_state(url) == "unfinished"
    # unfinished but no run record vouches for it: not resumed
    assert provenance.result_status(url, "h", work) == "foreign"
    assert provenance.work_status(work) == "missing"
    record = provenance.write_run_record(work, str(tmp_path / "m.tif"), url)
    assert json.loads(Path(record).read_text())["result"] == url
    assert provenance.work_status(work) == "ours"
    assert provenance.result_status(url, "h", work) == "incomplete"
    os.remove(record)
    assert provenance.work_status(work) == "foreign"


# ----------------------------------------------------------------------------- the command line


def _digest(path: Path) -> str:
    h = hashlib.blake2b()
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def session(make_movie, tmp_path):
    """A movie in its own folder (``tmp/data/movie.tif``), copied so a test may lose it."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(make_movie(41, n_frames=40) / "movie.tif", data / "movie.tif")
    return data / "movie.tif"


def _refused(proc, *, code: int = 2, match: str = "") -> None:
    err = proc.stderr.strip()
    assert proc.returncode == code, proc.stderr
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert match in err, err


def _occupied(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """An --out holding a user's folder or file; returns it and its digest."""
    out = tmp_path / "out.zarr"
    if kind == "folder":
        out.mkdir()
        (out / "notes.txt").write_text("a week of notes")
    else:
        out.write_text("not a result")
    return out, _digest(out)


@pytest.mark.parametrize("command", ["run", "ingest"])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_occupied_out_is_refused_without_overwrite(command, kind, session, tmp_path, prefect_api):
    out, before = _occupied(tmp_path, kind)
    proc = run_cli(command, str(session), "--out", str(out), "--fps", "10", check=False, env=prefect_api)
    _refused(proc, match=f"{out} already exists")
    assert "--overwrite" in proc.stderr and "choose another --out" in proc.stderr.lower()
    assert _digest(out) == before
    assert not Path(str(out) + ".work").exists()


@pytest.mark.parametrize("command", ["run", "ingest"])
@pytest.mark.parametrize("where", ["is", "contains", "inside"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_out_overlapping_the_input_is_refused(command, where, overwrite, session, tmp_path, prefect_api):
    data = session.parent
    before = _digest(data)
    out = {"is": session, "contains": data, "inside": session / "r.zarr"}[where]
    args = [command, str(session), "--out", str(out), "--fps", "10"] + (["--overwrite"] if overwrite else [])
    proc = run_cli(*args, check=False, env=prefect_api)
    _refused(proc, match={"is": "is the input", "contains": "contains the input",
                          "inside": "lies inside the input"}[where])
    assert _digest(data) == before and sorted(os.listdir(data)) == ["movie.tif"]


def test_run_refuses_an_out_whose_work_store_holds_the_input(session, tmp_path, prefect_api):
    """``--out r.zarr`` keeps intermediates in ``r.zarr.work``: that folder must not hold an input."""
    work = tmp_path / "r.zarr.work"
    work.mkdir()
    shutil.move(str(session), work / "movie.tif")
    before = _digest(work)
    proc = run_cli("run", str(work / "movie.tif"), "--out", str(tmp_path / "r.zarr"), "--fps", "10",
                   "--overwrite", check=False, env=prefect_api)
    _refused(proc, match="contains the input")
    assert _digest(work) == before


def test_run_refuses_an_out_that_is_its_parameter_file(session, tmp_path, prefect_api):
    params = tmp_path / "p.yaml"
    params.write_text("traces:\n  neuropil_coefficient: 0.6\n")
    proc = run_cli("run", str(session), "--out", str(params), "--params", str(params), "--fps", "10",
                   "--overwrite", check=False, env=prefect_api)
    _refused(proc, match="is the input")
    assert params.read_text().startswith("traces:")


def test_run_refuses_an_unfinished_result_no_run_record_vouches_for(session, tmp_path, prefect_api):
    """A somaflow-looking zarr without ``complete`` and without its run's work store is not resumed."""
    out = tmp_path / "r.zarr"
    _zarr(str(out), somaflow_version="0.1.0")
    del zarr.open_group(str(out), mode="r+", zarr_format=3).attrs["complete"]
    before = _digest(out)
    proc = run_cli("run", str(session), "--out", str(out), "--fps", "10", check=False, env=prefect_api)
    _refused(proc, match="already exists and is not a somaflow result")
    assert _digest(out) == before


def test_run_refuses_a_work_store_somaflow_did_not_make(session, tmp_path, prefect_api):
    work = tmp_path / "r.zarr.work"
    work.mkdir()
    (work / "thesis.tex").write_text("chapter 1")
    proc = run_cli("run", str(session), "--out", str(tmp_path / "r.zarr"), "--fps", "10", check=False,
                   env=prefect_api)
    _refused(proc, match=f"{work} already exists and was not made by a somaflow run")
    assert sorted(os.listdir(work)) == ["thesis.tex"]


# ----------------------------------------------------------------------------- archive


def _manifest(tmp_path: Path, rows: list[tuple[str, str]]) -> Path:
    m = tmp_path / "sessions.csv"
    m.write_text("session,movie,fps,modality\n" + "".join(f"{s},{movie},10,2p\n" for s, movie in rows))
    return m


@pytest.mark.integration
def test_archive_sessions_with_an_occupied_result_fail_and_lose_nothing(session, tmp_path, prefect_api):
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.zarr").mkdir()
    (results / "a.zarr" / "notes.txt").write_text("mine")
    (results / "b.zarr").write_text("a file")
    before = {"a": _digest(results / "a.zarr"), "b": _digest(results / "b.zarr")}
    m = _manifest(tmp_path, [("a", str(session)), ("b", str(session))])
    proc = run_cli("archive", str(m), "--out", str(results), "--cluster", "threads", "--json",
                   check=False, env=prefect_api)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["counts"] == {"done": 0, "skipped": 0, "failed": 2}
    for row in summary["sessions"]:
        assert "already exists and is not a somaflow result" in row["reason"] and "\n" not in row["reason"]
    assert (results / "a.zarr" / "notes.txt").read_text() == "mine"
    assert (results / "b.zarr").read_text() == "a file"
    assert not (results / "a.zarr.work").exists() and not (results / "b.zarr.work").exists()
    assert _digest(results / "a.zarr") == before["a"] and _digest(results / "b.zarr") == before["b"]


@pytest.mark.parametrize("where", ["is", "contains"])
def test_archive_refuses_results_overlapping_an_input_before_any_work(where, session, tmp_path, prefect_api):
    results = tmp_path / "results"
    if where == "is":  # a session whose movie is a movie zarr named like its result
        movie = results / "s.zarr"
        run_cli("ingest", str(session), "--out", str(movie), "--fps", "10", env=prefect_api)
    else:  # the movie lies inside the folder that would become the session's result
        (results / "s.zarr").mkdir(parents=True)
        movie = results / "s.zarr" / "movie.tif"
        shutil.copy(session, movie)
    before = _digest(results)
    m = _manifest(tmp_path, [("s", str(movie))])
    for extra in ([], ["--overwrite"]):
        proc = run_cli("archive", str(m), "--out", str(results), "--cluster", "threads", *extra,
                       check=False, env=prefect_api)
        _refused(proc, match=f"session s's result {results / 's.zarr'}")
        assert _digest(results) == before
    assert not (results / "archive_summary.json").exists()


def test_archive_refuses_a_summary_over_its_parameter_file(session, tmp_path, prefect_api):
    results = tmp_path / "results"
    results.mkdir()
    params = results / "archive_summary.json"  # YAML is a superset of JSON: a valid parameter file
    params.write_text('{"traces": {"neuropil_coefficient": 0.6}}')
    m = _manifest(tmp_path, [("s", str(session))])
    proc = run_cli("archive", str(m), "--out", str(results), "--params", str(params), "--cluster", "threads",
                   check=False, env=prefect_api)
    _refused(proc, match=f"the archive summary {params} is the input")
    assert params.read_text().startswith('{"traces"') and sorted(os.listdir(results)) == [params.name]


# ----------------------------------------------------------------------------- object storage


@pytest.mark.integration
def test_s3_outputs_are_guarded(session, s3_bucket, s3_server, prefect_api):
    env = {**prefect_api, **s3_server}
    fs, _ = stores.filesystem(s3_bucket)
    movie = f"{s3_bucket}/raw/movie.tif"
    fs.put(str(session), movie)
    fs.pipe({f"{s3_bucket}/mine/notes.txt": b"a week of notes", f"{s3_bucket}/afile": b"not a result"})
    listing = {p: fs.info(p)["ETag"] for p in fs.find(s3_bucket)}

    def check(*args: str, match: str) -> None:
        proc = run_cli(*args, "--fps", "10", check=False, env=env)
        _refused(proc, match=match)
        fs.invalidate_cache()
        assert {p: fs.info(p)["ETag"] for p in fs.find(s3_bucket)} == listing

    for command in ("run", "ingest"):
        for occupied in ("mine", "afile"):
            check(command, movie, "--out", f"{s3_bucket}/{occupied}", match="already exists")
        for out, how in ((movie, "is the input"), (f"{s3_bucket}/raw", "contains the input"),
                         (s3_bucket, "contains the input"), (f"{movie}/r.zarr", "lies inside the input")):
            check(command, movie, "--out", out, "--overwrite", match=how)
    # through an archive: a session's result would contain its movie
    inner = f"{s3_bucket}/s.zarr/movie.tif"
    fs.put(str(session), inner)
    fs.invalidate_cache()
    listing = {p: fs.info(p)["ETag"] for p in fs.find(s3_bucket)}
    m = Path(str(session.parent)) / "sessions.csv"
    m.write_text(f"session,movie,fps,modality\ns,{inner},10,2p\n")
    for extra in ([], ["--overwrite"]):
        proc = run_cli("archive", str(m), "--out", s3_bucket, *extra, check=False, env=env)
        _refused(proc, match=f"session s's result {s3_bucket}/s.zarr contains the input {inner}")
        fs.invalidate_cache()
        assert {p: fs.info(p)["ETag"] for p in fs.find(s3_bucket)} == listing
