"""End-to-end CLI: simulate -> ingest/run -> evaluate, local and on loopback S3; bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile

from conftest import prefect_records, run_cli
from somaflow.io import schema, stores


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "s"
    run_cli("simulate", str(out), "--preset", "2p-small", "--seed", "11")
    return out


def _meta(sim_dir):
    return json.loads((sim_dir / "meta.json").read_text())


def test_simulate_outputs(sim_dir):
    meta = _meta(sim_dir)
    assert {"fps", "modality", "neuron_radius", "preset", "seed"} <= set(meta)
    movie = tifffile.imread(sim_dir / "movie.tif")
    assert movie.dtype == np.uint16 and movie.ndim == 3
    gt = schema.open_result(str(sim_dir / "ground_truth.zarr"))
    assert gt.sizes["unit"] > 0 and gt["masks"].shape[1:] == movie.shape[1:]


def test_list_presets():
    out = run_cli("simulate", "--list-presets").stdout
    assert "2p-small" in out and "1p-small" in out


def test_evaluate_gt_against_itself(sim_dir):
    gt = str(sim_dir / "ground_truth.zarr")
    m = json.loads(run_cli("evaluate", gt, gt, "--json").stdout)
    assert m["f1"] == pytest.approx(1.0) and m["precision"] == pytest.approx(1.0)


def test_run_and_evaluate_local(sim_dir, tmp_path, prefect_api):
    meta = _meta(sim_dir)
    out = tmp_path / "result.zarr"
    params = tmp_path / "params.yaml"
    params.write_text("preprocess:\n  motion:\n    mode: rigid\n    max_shift: 8\n")
    proc = run_cli("run", str(sim_dir / "movie.tif"), "--out", str(out), "--fps", str(meta["fps"]),
                   "--neuron-radius", str(meta["neuron_radius"]), "--workers", "2", "--json",
                   "--params", str(params), env=prefect_api)
    summary = json.loads(proc.stdout)
    assert summary["result"] == str(out)
    assert summary["motion"] == {"mode": "rigid"}  # forced: no auto measurement
    ds = schema.open_result(str(out))
    schema.validate_result(ds)
    assert ds.attrs["complete"] is True
    assert ds.sizes["frame"] == meta["shape"][0]
    used = json.loads(ds.attrs["params"])
    assert used["fps"] == meta["fps"]
    assert used["preprocess"]["motion"]["mode"] == "rigid" and used["preprocess"]["motion"]["max_shift"] == 8
    # motion correction ran and recovered the simulated motion (up to a constant offset)
    gt = schema.open_result(str(sim_dir / "ground_truth.zarr"))
    est, true = ds["shifts"].values, gt["shifts"].values
    assert np.abs(true).max() > 0.5
    err = (est - est.mean(0)) - (true - true.mean(0))
    assert np.sqrt((err ** 2).mean()) < 0.3
    m = json.loads(run_cli("evaluate", str(out), str(sim_dir / "ground_truth.zarr"), "--json").stdout)
    assert np.isfinite(m["f1"]) and 0.0 <= m["f1"] <= 1.0
    assert m["n_pred"] == int(ds["accepted"].sum())
    text = run_cli("evaluate", str(out), str(sim_dir / "ground_truth.zarr")).stdout
    assert "global offset: searched up to 20 px" in text and "median -" not in text
    # the report sits beside the result, and the summary says where the intermediates are
    report = tmp_path / "result.report.html"
    assert summary["report"] == str(report) and report.is_file() and "Example traces" in report.read_text()
    assert summary["work"] == str(out) + ".work" and summary["work_bytes"] > 0
    assert "labels" in ds and ds["time"].attrs["units"] == "s"
    # Prefect: the stage lines are the flow run's logs, and the run published its artifacts
    logs, artifacts = prefect_records(prefect_api, summary["flow_run_id"])
    messages = [rec.message for rec in logs]
    assert any("extract: done in" in msg for msg in messages), messages
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"somaflow-result-zarr", "somaflow-result-zarr-report"}, by_key
    assert by_key["somaflow-result-zarr"].type == "table" and str(report) in str(by_key["somaflow-result-zarr"].data)
    assert str(report) in str(by_key["somaflow-result-zarr-report"].data)  # a link artifact
    # a second run without --overwrite refuses and leaves the result alone
    again = run_cli("run", str(sim_dir / "movie.tif"), "--out", str(out), "--fps", "10", check=False,
                    env=prefect_api)
    assert again.returncode != 0
    assert "already exists" in again.stderr and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert schema.is_complete(str(out))


def test_run_help_says_what_fps_and_radius_to_use():
    text = " ".join(run_cli("run", "--help").stdout.split())
    assert "half a cell body's diameter" in text and "--fps 7 --neuron-radius 5" in text
    assert "default 5 for 2p" in text


@pytest.mark.slow  # covered in the default suite by test_multinode and test_store_faults (S3 to S3)
def test_run_on_s3(sim_dir, s3_bucket, s3_server, prefect_api):
    meta = _meta(sim_dir)
    fs, _ = stores.filesystem(s3_bucket)
    fs.put(str(sim_dir / "movie.tif"), f"{s3_bucket}/raw/movie.tif")
    src_before = fs.cat(f"{s3_bucket}/raw/movie.tif")
    env = {**prefect_api, **s3_server}
    movie_url = f"{s3_bucket}/movies/m.zarr"
    run_cli("ingest", f"{s3_bucket}/raw/movie.tif", "--out", movie_url, "--fps", str(meta["fps"]), env=env)
    assert schema.is_complete(movie_url)
    out = f"{s3_bucket}/results/r.zarr"
    proc = run_cli("run", movie_url, "--out", out, "--neuron-radius", str(meta["neuron_radius"]),
                   "--workers", "2", env=env)
    fs.invalidate_cache()
    assert schema.is_complete(out)
    # the 2p default, motion.mode auto, measured the (rigid) motion and kept the rigid model
    assert "motion correction: rigid (non-rigid deviation" in proc.stdout, proc.stdout
    attrs = schema.open_result(out).attrs
    assert attrs["motion_mode"] == "rigid" and attrs["motion_nonrigid_deviation"] < 0.4
    gt_url = f"{s3_bucket}/gt.zarr"
    fs.put(str(sim_dir / "ground_truth.zarr"), gt_url, recursive=True)
    m = json.loads(run_cli("evaluate", out, gt_url, "--json", env=env).stdout)
    assert np.isfinite(m["f1"])
    assert fs.cat(f"{s3_bucket}/raw/movie.tif") == src_before


# ----------------------------------------------------------------------------- bad input


def _bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    good = rng.integers(0, 1000, (20, 16, 16), dtype=np.uint16)
    trunc = tmp_path / "truncated.tif"
    tifffile.imwrite(trunc, good)
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    img2d = tmp_path / "image.tif"
    tifffile.imwrite(img2d, good[0])
    nans = tmp_path / "nans.tif"
    f = good.astype(np.float32)
    f[7, 3, 3] = np.nan
    tifffile.imwrite(nans, f)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    return {"truncated": trunc, "2d": img2d, "nan": nans, "empty": empty,
            "missing": tmp_path / "does-not-exist.tif"}


@pytest.mark.parametrize("kind", ["truncated", "2d", "nan", "empty", "missing"])
def test_ingest_bad_input(tmp_path, kind):
    src = _bad_inputs(tmp_path)[kind]
    before = sorted(os.listdir(tmp_path))
    out = tmp_path / "out.zarr"
    proc = run_cli("ingest", str(src), "--out", str(out), "--fps", "10", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("somaflow: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == before


def test_bad_params_file(tmp_path, sim_dir):
    params = tmp_path / "p.yaml"
    params.write_text("preprocess:\n  motion:\n    mode: sideways\n")
    proc = run_cli("run", str(sim_dir / "movie.tif"), "--out", str(tmp_path / "r.zarr"), "--fps", "10",
                   "--params", str(params), check=False)
    assert proc.returncode == 2 and "preprocess.motion.mode" in proc.stderr
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.parametrize("kind", ["2d", "missing"])
def test_run_bad_input_fails_before_work(tmp_path, kind):
    src = _bad_inputs(tmp_path)[kind]
    out = tmp_path / "r.zarr"
    proc = run_cli("run", str(src), "--out", str(out), "--fps", "10", check=False)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not out.exists() and not (tmp_path / "r.zarr.work").exists()


def test_ingest_existing_output_needs_overwrite(tmp_path, sim_dir):
    out = tmp_path / "m.zarr"
    run_cli("ingest", str(sim_dir / "movie.tif"), "--out", str(out), "--fps", "10")
    mtime = (out / "zarr.json").stat().st_mtime
    proc = run_cli("ingest", str(sim_dir / "movie.tif"), "--out", str(out), "--fps", "10", check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
    assert (out / "zarr.json").stat().st_mtime == mtime
    run_cli("ingest", str(sim_dir / "movie.tif"), "--out", str(out), "--fps", "12", "--overwrite")
    assert schema.open_movie(str(out)).attrs["fps"] == 12.0


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "ingest", str(tmp_path / "nope.tif"), "--out", str(tmp_path / "o.zarr"),
                   check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
