"""The HTML report: its content, that it is self-contained, that it renders in headless
Chromium without console errors, and `somaflow report` on the command line."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import run_cli
from somaflow.io import schema
from somaflow.report import build_report, default_report_url, example_units

CHROMIUM = next((c for c in ("chromium", "chromium-browser", "google-chrome") if shutil.which(c)), None)


@pytest.fixture(scope="module")
def report(small_result, make_movie, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "small.html"
    truth = str(make_movie(41, n_frames=80) / "ground_truth.zarr")
    proc = run_cli("report", small_result, "--out", str(out), "--ground-truth", truth)
    assert str(out) in proc.stdout
    return out


def test_report_content(report, small_result):
    html = report.read_text()
    ds = schema.open_result(small_result)
    n, n_acc = ds.sizes["unit"], int(ds["accepted"].sum())
    for section in ("Units on the summary images", "Evaluation against ground truth", "Example traces",
                    "Motion correction", "Scores", "Stage timings", "Parameters", "Out of distribution"):
        assert section in html, section
    assert f"{n} ({n_acc} accepted)" in html
    assert "noise level 0.7 is above the training range" in html
    assert "IoU ≥ 0.5, Hungarian" in html and "CaImAn" in html and "neurofinder" in html
    assert "3.2" in html and "extract" in html  # a stage's timing
    # the source name is escaped, never markup
    assert "sim &lt;movie&gt;.tif" in html and "<movie>" not in html
    # four figures (units, traces, motion, scores), all inline PNGs, and nothing the page would fetch
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 4
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith("data:") for r in refs), refs
    assert "<script" not in html and "<link" not in html


def test_example_units_spread_over_the_ranking():
    score = np.array([0.9, 0.1, 0.8, 0.7, 0.95, 0.3, 0.6])
    accepted = np.array([True, False, True, True, True, True, True])
    assert example_units(score, accepted, k=3).tolist() == [4, 2, 5]  # best, middle, worst accepted
    assert example_units(score, accepted, k=10).tolist() == [4, 0, 2, 3, 6, 5]
    assert example_units(score, np.zeros(7, bool)).tolist() == []


def test_report_of_a_result_without_units(small_result):
    ds = schema.open_result(small_result).load()
    empty = ds.isel(unit=slice(0, 0))
    html = build_report(empty, title="empty")
    assert "0 (0 accepted)" in html and "No accepted units" in html


def test_default_report_url():
    assert default_report_url("/data/run/r.zarr") == "/data/run/r.report.html"
    assert default_report_url("s3://lab/results/m1.zarr/") == "s3://lab/results/m1.report.html"
    assert default_report_url("/data/out") == "/data/out.report.html"


def test_report_cli_refuses_to_write_into_the_result(small_result, tmp_path):
    proc = run_cli("report", small_result, "--out", f"{small_result}/report.html", check=False)
    assert proc.returncode == 2 and "lies inside the input" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    (tmp_path / "r.html").write_text("mine")
    again = run_cli("report", small_result, "--out", str(tmp_path / "r.html"), check=False)
    assert again.returncode == 3 and "--overwrite" in again.stderr
    assert (tmp_path / "r.html").read_text() == "mine"


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
         "--log-level=0", "--window-size=1400,3000", f"--screenshot={shot}", report.resolve().as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    image = np.asarray(Image.open(shot).convert("L"), np.float32)
    assert image.shape == (3000, 1400)
    # the page is drawn: the header bar is dark, the figures vary, and the rest is not blank
    assert image[:40].mean() < 120
    assert image[400:1400].std() > 30
