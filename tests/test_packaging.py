"""pyproject.toml lists every package folder (setuptools warns at install about any it misses)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    root = REPO / "shared"
    folders = {".".join(d.relative_to(root).parts) for d in (root / "somaflow").rglob("*")
               if d.is_dir() and d.name.isidentifier() and not d.name.startswith(("_", "."))
               and not d.name.endswith(".egg-info")}
    folders.add("somaflow")
    assert folders - listed == set(), "add these to [tool.setuptools] packages"
    assert {p for p in listed if p.startswith("somaflow.") or p == "somaflow"} <= folders


def test_report_template_is_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in data.items():
        folder = REPO / "shared" / Path(*package.split("."))
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: nothing matches {pattern}"
