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


def _folder(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools finds ``package`` (``[tool.setuptools] package-dir``)."""
    top, _, rest = package.partition(".")
    if top in package_dir:
        return REPO / package_dir[top] / Path(*rest.split(".") if rest else ())
    return REPO / package_dir.get("", ".") / Path(*package.split("."))


def test_package_data_matches_files():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, patterns in config["package-data"].items():
        folder = _folder(package, config["package-dir"])
        for pattern in patterns:
            assert list(folder.glob(pattern)), f"{package}: nothing matches {pattern}"
