"""The documentation: generated pages match the code, and the site builds strictly."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field, create_model

from somaflow.cli import build_parser
from somaflow.params import RunParams
from somaflow.traces import TraceParams

REPO = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("docs_gen", REPO / "docs" / "gen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _gen()


def test_generated_pages_are_current():
    assert gen.stale() == []


def test_a_parameter_change_makes_its_page_stale():
    class Traces(TraceParams):
        new_knob: int = Field(3, ge=1, description="a parameter the docs do not know yet")

    changed = create_model("ChangedRunParams", __base__=RunParams, traces=(Traces, ...))
    problems = gen.stale(run_params=changed)
    assert problems == ["stages/traces.md is stale: run python docs/gen.py"]
    assert "`traces.new_knob`" in gen.params_table("traces", changed)


def test_a_changed_description_makes_its_page_stale():
    field = TraceParams.model_fields["neuropil_coefficient"]

    class Traces(TraceParams):
        neuropil_coefficient: float = Field(field.default, description="reworded")

    changed = create_model("ChangedRunParams", __base__=RunParams, traces=(Traces, ...))
    assert gen.stale(run_params=changed) == ["stages/traces.md is stale: run python docs/gen.py"]


def test_a_new_option_makes_the_cli_reference_stale():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    sub.choices["run"].add_argument("--brand-new", help="an option the docs do not know yet")
    assert gen.stale(parser=parser) == ["cli.md is stale: run python docs/gen.py"]


class _Rigid(BaseModel):
    """Rigid registration."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["rigid"] = "rigid"
    max_shift: float = Field(20.0, gt=0, description="largest shift (px)")


class _Piecewise(BaseModel):
    """Piecewise rigid registration."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["piecewise"] = "piecewise"
    patch_size: int = Field(128, ge=8, description="patch side (px)")


def test_a_new_section_must_be_documented_and_unions_are_walked():
    """A section no page holds is reported; a tagged union of models (one model per
    method) is documented member by member."""
    motion = Annotated[_Rigid | _Piecewise, Field(discriminator="mode")]
    changed = create_model("ChangedRunParams", __base__=RunParams, registration=(motion, _Rigid()))
    problems = gen.stale(run_params=changed)
    assert len(problems) == 1 and "'registration'" in problems[0]
    table = gen.params_table("registration", changed)
    assert 'when mode = "rigid"' in table and 'when mode = "piecewise"' in table
    assert "`registration.max_shift`" in table and "`registration.patch_size`" in table
    assert "float (> 0)" in table and "`20.0`" in table and "`128`" in table


def test_check_mode_exits_nonzero_when_stale(monkeypatch, capsys):
    monkeypatch.setattr(gen, "stale", lambda: ["cli.md is stale: run python docs/gen.py"])
    assert gen.main(["--check"]) == 1
    assert "cli.md is stale" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_site_builds_strictly(tmp_path):
    mkdocs = Path(sys.executable).with_name("mkdocs")
    proc = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for page in ("index.html", "tutorial/index.html", "cli/index.html", "stages/cnmf/index.html",
                 "benchmarks/index.html", "results/index.html", "deploy/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
