"""`somaflow archive`: manifests, globs, fan-out with one broken session, a second pass that skips."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml

from conftest import prefect_records, run_cli
from somaflow.errors import InputError, ParameterError
from somaflow.io import schema
from somaflow.manifest import merge_overrides, parse_manifest, read_manifest, with_defaults

# ----------------------------------------------------------------------------- manifests


def test_yaml_manifest(tmp_path):
    (tmp_path / "raw").mkdir()
    text = yaml.safe_dump([
        {"session": "m1-d1", "movie": "raw/a.tif", "fps": 30, "modality": "2p"},
        {"session": "m1-d2", "movie": "s3://lab/raw/b.tif", "fps": 15.5, "modality": "1p",
         "neuron_radius": 7, "params": {"traces": {"neuropil_coefficient": 0.6}}},
    ])
    (tmp_path / "m.yaml").write_text(text)
    a, b = read_manifest(str(tmp_path / "m.yaml"))
    assert a.session == "m1-d1" and a.movie == str(tmp_path / "raw" / "a.tif") and a.fps == 30.0
    assert a.params == {} and a.neuron_radius is None
    assert b.movie == "s3://lab/raw/b.tif" and b.modality == "1p" and b.neuron_radius == 7.0
    assert b.params == {"traces": {"neuropil_coefficient": 0.6}}
    # a mapping with a sessions: list is accepted too
    assert parse_manifest(yaml.safe_dump({"sessions": [{"session": "x", "movie": "/m.tif"}]}), "yaml", "/")[0].movie == "/m.tif"


def test_csv_manifest_with_params_file(tmp_path):
    (tmp_path / "p.yaml").write_text("detect:\n  threshold_k: 2.5\n")
    (tmp_path / "m.csv").write_text("session,movie,fps,modality,neuron_radius,params\n"
                                    "a,a.tif,10,2p,,p.yaml\n"
                                    "b,/data/b.h5,20,1p,6,\n")
    a, b = read_manifest(str(tmp_path / "m.csv"))
    assert a.movie == str(tmp_path / "a.tif") and a.params == {"detect": {"threshold_k": 2.5}}
    assert a.neuron_radius is None and b.neuron_radius == 6.0 and b.params == {} and b.fps == 20.0


@pytest.mark.parametrize("text, kind, match", [
    ("session,movie\na,x.tif\na,y.tif\n", "csv", "twice"),
    ("session,film\na,x.tif\n", "csv", "movie"),
    ("session,movie,fps,colour\na,x.tif,10,red\n", "csv", "colour"),
    ("session,movie,fps\na,x.tif,-3\n", "csv", "fps"),
    ("session,movie\n../up,x.tif\n", "csv", "session"),
    ("session,movie\n", "csv", "no sessions"),
    ("{session: a}", "yaml", "list"),
    ("- {session: a}\n", "yaml", "movie"),
    ("- [a, b\n", "yaml", "YAML"),
])
def test_bad_manifests(text, kind, match):
    with pytest.raises(InputError, match=match):
        parse_manifest(text, kind, "/base")


def test_manifest_kinds(tmp_path):
    with pytest.raises(ParameterError, match="yaml"):
        read_manifest(str(tmp_path / "m.txt"))
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(str(tmp_path / "m.yaml"))


def test_glob(tmp_path):
    for name in ("b day.tif", "a.tif", "c.h5"):
        (tmp_path / name).write_bytes(b"")
    specs = read_manifest(str(tmp_path / "*.tif"))
    assert [s.session for s in specs] == ["a", "b_day"]
    assert specs[0].movie == str(tmp_path / "a.tif") and specs[0].fps is None
    filled = with_defaults(specs[0], 30.0, "1p", None)
    assert filled.fps == 30.0 and filled.modality == "1p"
    with pytest.raises(InputError, match="no file matches"):
        read_manifest(str(tmp_path / "*.avi"))


def test_merge_overrides():
    base = {"traces": {"neuropil_coefficient": 0.7, "tau_s": 1.0}, "method": "local-maxima"}
    assert merge_overrides(base, {"traces": {"tau_s": 0.5}}) == {
        "traces": {"neuropil_coefficient": 0.7, "tau_s": 0.5}, "method": "local-maxima"}


# ----------------------------------------------------------------------------- the archive flow


@pytest.mark.integration
def test_archive_with_a_broken_session(make_movie, tmp_path, prefect_api):
    rows = ["session,movie,fps,modality,neuron_radius,params"]
    for i, seed in enumerate((31, 32, 33, 34)):
        src = make_movie(seed, n_frames=60)
        shutil.copy(src / "movie.tif", tmp_path / f"s{i}.tif")
        rows.append(f"s{i},s{i}.tif,10,2p,5,{'p.yaml' if i == 3 else ''}")
    (tmp_path / "p.yaml").write_text("traces:\n  neuropil_coefficient: 0.6\n")
    (tmp_path / "broken.tif").write_bytes((tmp_path / "s0.tif").read_bytes()[:5000])  # truncated
    rows.insert(3, "broken,broken.tif,10,2p,,")
    (tmp_path / "sessions.csv").write_text("\n".join(rows) + "\n")
    # motion correction is what the session flow tests exercise; here it would only cost time
    (tmp_path / "all.yaml").write_text("preprocess:\n  motion:\n    mode: none\n")
    out = tmp_path / "results"
    args = ["archive", str(tmp_path / "sessions.csv"), "--out", str(out), "--concurrency", "2",
            "--params", str(tmp_path / "all.yaml"), "--cluster", "local", "--workers", "2"]

    first = run_cli(*args, "--json", env=prefect_api, check=False)
    assert first.returncode == 1, first.stderr
    summary = json.loads(first.stdout)
    by = {r["session"]: r for r in summary["sessions"]}
    assert [r["session"] for r in summary["sessions"]] == ["s0", "s1", "broken", "s2", "s3"]
    assert summary["counts"] == {"done": 4, "skipped": 0, "failed": 1}
    assert by["broken"]["status"] == "failed" and "TIFF" in by["broken"]["reason"]
    assert by["broken"]["exit_code"] == 2  # the cause, as `somaflow run` would exit: a bad input
    assert "\n" not in by["broken"]["reason"]
    for s in ("s0", "s1", "s2", "s3"):
        assert by[s]["status"] == "done" and by[s]["n_units"] > 0, by[s]
        assert schema.is_complete(str(out / f"{s}.zarr"))
    assert not (out / "broken.zarr").exists()
    used = json.loads(schema.read_attrs(str(out / "s3.zarr"))["params"])
    assert used["traces"]["neuropil_coefficient"] == 0.6 and used["preprocess"]["motion"]["mode"] == "none"
    assert json.loads((out / "archive_summary.json").read_text()) == summary
    assert "Prefect flow run" in first.stderr and "Dask dashboard" in first.stderr
    assert all((out / f"{s}.report.html").is_file() for s in ("s0", "s1", "s2", "s3"))
    _, artifacts = prefect_records(prefect_api, summary["flow_run_id"], wait=0)
    table = next(a for a in artifacts if a.key == "somaflow-archive")
    assert table.type == "table" and "broken" in str(table.data) and "failed" in str(table.data)

    # the second pass skips every finished session and still reports the broken one
    mtimes = {s: (out / f"{s}.zarr" / "zarr.json").stat().st_mtime for s in ("s0", "s1", "s2", "s3")}
    second = run_cli(*args, env=prefect_api, check=False)
    assert second.returncode == 1
    table = second.stdout
    assert "0 done, 4 skipped, 1 failed" in table and "broken" in table and "TIFF" in table
    again = json.loads((out / "archive_summary.json").read_text())
    assert again["counts"] == {"done": 0, "skipped": 4, "failed": 1}
    assert all(r["stages"] == {s: "skipped" for s in r["stages"]} for r in again["sessions"] if r["status"] == "skipped")
    assert {s: (out / f"{s}.zarr" / "zarr.json").stat().st_mtime for s in mtimes} == mtimes


def test_archive_bad_manifest_fails_before_work(tmp_path):
    (tmp_path / "m.csv").write_text("session,movie\na,a.tif\na,b.tif\n")
    proc = run_cli("archive", str(tmp_path / "m.csv"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "twice" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_archive_with_a_blank_session(make_movie, tmp_path, prefect_api):
    """Issue 28 item 3: a session whose movie holds nothing (pure noise) gives an empty, complete
    result, and the archive completes the others and exits 0."""
    import numpy as np
    import tifffile

    shutil.copy(make_movie(41, n_frames=40) / "movie.tif", tmp_path / "cells.tif")
    rng = np.random.default_rng(7)
    # pure noise, in which CNMF finds no candidate at all (measured: 0 units at 64 x 64 with this seed)
    tifffile.imwrite(tmp_path / "blank.tif", rng.normal(100, 5, (40, 64, 64)).astype(np.float32))
    (tmp_path / "sessions.yaml").write_text(yaml.safe_dump([
        {"session": "cells", "movie": "cells.tif", "fps": 10, "modality": "2p"},
        {"session": "blank", "movie": "blank.tif", "fps": 10, "modality": "2p"},
    ]))
    (tmp_path / "all.yaml").write_text("preprocess:\n  motion:\n    mode: none\n")
    out = tmp_path / "results"
    proc = run_cli("archive", str(tmp_path / "sessions.yaml"), "--out", str(out), "--concurrency", "2",
                   "--params", str(tmp_path / "all.yaml"), "--cluster", "threads", "--json", env=prefect_api,
                   check=False)
    assert proc.returncode == 0, proc.stderr
    by = {r["session"]: r for r in json.loads(proc.stdout)["sessions"]}
    assert by["cells"]["status"] == "done" and by["cells"]["n_units"] > 0, by["cells"]
    assert by["blank"]["status"] == "done" and by["blank"]["n_units"] == by["blank"]["n_accepted"] == 0, by["blank"]
    for s in ("cells", "blank"):
        assert schema.is_complete(str(out / f"{s}.zarr")) and (out / f"{s}.report.html").is_file()
    blank = schema.open_result(str(out / "blank.zarr"))
    assert blank.sizes["unit"] == 0 and blank.sizes["frame"] == 40
    assert blank["traces"].shape == (0, 40) and blank["masks"].shape == (0, 64, 64)
    # a second pass takes the empty result as finished, not as something to redo
    again = run_cli("archive", str(tmp_path / "sessions.yaml"), "--out", str(out), "--params",
                    str(tmp_path / "all.yaml"), "--cluster", "threads", "--json", env=prefect_api)
    assert json.loads(again.stdout)["counts"] == {"done": 0, "skipped": 2, "failed": 0}
