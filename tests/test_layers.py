"""The library's structure: layers that point one way, no cycles, no hidden imports.

The import-linter contracts in pyproject.toml ([tool.importlinter]) are the
check; these tests run them, show that they fail on a forbidden import, import
every module in a fresh interpreter, and hold every module but the command
line to top-level imports of somaflow (a function-local import hides a cycle
from the check instead of removing it).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "shared" / "somaflow"
FLOWS = REPO / "flows"
LINT = Path(sys.executable).with_name("lint-imports")
#: the one module allowed to import somaflow inside functions: each command loads what it needs
#: when it runs, so that `somaflow --help` starts without Prefect, Dask, xarray or torch
LAZY_IMPORTS_ALLOWED = {LIBRARY / "cli.py"}
MAX_LINES = 600


def _modules() -> list[str]:
    out = []
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    out += [f"somaflow_flows.{p.stem}" for p in sorted(FLOWS.glob("*.py")) if p.stem != "__init__"]
    return out


def test_import_contracts_hold():
    run = subprocess.run([str(LINT), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout and "0 broken" in run.stdout


def test_import_contracts_fail_on_a_forbidden_import(tmp_path):
    """A low layer that imports a high one (errors -> session) and the library importing the
    flows both break a contract."""
    shutil.copytree(LIBRARY, tmp_path / "somaflow", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copytree(FLOWS, tmp_path / "somaflow_flows", ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / "somaflow" / "errors.py", "a") as fh:
        fh.write("\nfrom somaflow import session  # noqa\n")
    with open(tmp_path / "somaflow" / "provenance.py", "a") as fh:
        fh.write("\nimport somaflow_flows.session  # noqa\n")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    env = {"PYTHONPATH": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    run = subprocess.run([str(LINT), "--config", str(tmp_path / "pyproject.toml"), "--no-cache"],
                         cwd=tmp_path, capture_output=True, text=True, env=env)
    assert run.returncode != 0, run.stdout[-3000:]
    assert "the library's layers point one way BROKEN" in run.stdout
    assert "only the command line enters the flows, and only to start a flow run BROKEN" in run.stdout
    assert "somaflow.errors -> somaflow.session" in run.stdout


def test_no_import_cycles_among_modules():
    """No two modules import each other, directly or through others (strongly connected components)."""
    graph = grimp.build_graph("somaflow", "somaflow_flows", cache_dir=None)
    modules = sorted(graph.modules)
    edges = {m: {d for d in graph.find_modules_directly_imported_by(m) if d in graph.modules} for m in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(modules)))
    for m in modules:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


#: third-party packages loaded once before the forks (a fresh interpreter per module would spend
#: minutes re-importing them); no somaflow module is loaded in the parent
_PRELOAD = ("numpy", "scipy.ndimage", "scipy.sparse", "scipy.optimize", "scipy.signal", "scipy.stats",
            "scipy.interpolate", "scipy.spatial", "scipy.cluster", "dask.array", "distributed", "xarray", "zarr",
            "pydantic", "yaml", "fsspec", "tifffile", "h5py", "skimage.feature", "skimage.filters",
            "skimage.morphology", "skimage.segmentation", "skimage.measure", "torch", "safetensors.torch",
            "prefect", "prefect.flows", "prefect.tasks", "prefect.runtime")
_FORK_IMPORTS = """
import importlib, os, sys
for name in sys.argv[2:]:
    importlib.import_module(name)
assert not any(m == "somaflow" or m.startswith(("somaflow.", "somaflow_flows")) for m in sys.modules)
failed = []
for module in sys.argv[1].split(","):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(module)
            os._exit(0)
        except BaseException as exc:
            os.write(w, f"{module}: {type(exc).__name__}: {exc}".encode()[:2000])
            os._exit(1)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    message = os.read(r, 4000).decode()
    os.close(r)
    if status:
        failed.append(message or f"{module}: exit status {status}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone():
    """Each module imports in an interpreter where no other somaflow module was loaded
    (no hidden dependence on import order): one fork per module of a parent that
    holds only the third-party packages."""
    run = subprocess.run([sys.executable, "-c", _FORK_IMPORTS, ",".join(_modules()), *_PRELOAD],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def _local_somaflow_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                names = ([sub.module or ""] if isinstance(sub, ast.ImportFrom)
                         else [a.name for a in sub.names] if isinstance(sub, ast.Import) else [])
                if any(n == "somaflow" or n.startswith(("somaflow.", "somaflow_flows")) for n in names):
                    found.append(f"{path.relative_to(REPO)}:{sub.lineno} {ast.unparse(sub)}")
    return found


def test_no_function_local_somaflow_imports():
    files = [p for p in [*LIBRARY.rglob("*.py"), *FLOWS.glob("*.py")] if p not in LAZY_IMPORTS_ALLOWED]
    found = [hit for p in files for hit in _local_somaflow_imports(p)]
    assert not found, "function-local imports of somaflow (import at the top of the module):\n" + "\n".join(found)


def test_modules_hold_one_idea():
    """No library module over ~600 lines (STYLE.md)."""
    long = {str(p.relative_to(REPO)): n for p in LIBRARY.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_help_starts_without_heavy_imports():
    """`somaflow --help` loads neither Prefect, Dask, xarray nor torch."""
    code = ("import sys\nfrom somaflow import cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('prefect', 'dask', 'xarray', 'torch') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
