"""The bad-input matrix (issue 28): every bad input, parameter or output location gets the exit
status of its cause (2 input/parameters, 3 store), exactly one line on stderr, no traceback,
nothing at ``--out`` a later run could mistake, and the input byte for byte as it was.

Every case is a real ``somaflow`` process. They are started together (a few at a time) by one
module fixture, and each case is then checked on its own; all of them fail before any cluster
or Prefect server starts. The cases test_cli.py already covers for ``ingest`` (truncated TIFF,
2-D image, NaN, empty, missing) are run here through ``run`` and ``archive``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import h5py
import numpy as np
import pytest
import tifffile
import zarr

from conftest import free_port, run_cli
from somaflow.io import schema


@dataclass(frozen=True)
class Case:
    """One bad input: the command line (``{in}``, ``{out}``, ``{dir}`` filled in), the exit
    status its cause maps to, and a fragment the one line must hold."""

    name: str
    args: tuple[str, ...]
    code: int
    says: str
    input: str | None = None  # file under the case's folder whose bytes must not change
    env: dict[str, str] = field(default_factory=dict)


def _write_inputs(d: Path) -> None:
    rng = np.random.default_rng(0)
    good = rng.integers(0, 1000, (40, 32, 32), dtype=np.uint16)
    tifffile.imwrite(d / "good.tif", good)
    data = (d / "good.tif").read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 2])
    tifffile.imwrite(d / "image.tif", good[0])
    tifffile.imwrite(d / "stack4d.tif", rng.integers(0, 1000, (6, 3, 32, 32), dtype=np.uint16))
    f = good.astype(np.float32)
    f[0, 3, 3] = np.nan  # a frame the quick sample reads
    tifffile.imwrite(d / "nan.tif", f)
    tifffile.imwrite(d / "constant.tif", np.full((40, 32, 32), 7, np.uint16))
    tifffile.imwrite(d / "one.tif", good[:1][None][0])
    tifffile.imwrite(d / "three.tif", good[:3])
    tifffile.imwrite(d / "mixed.tif", good[0])  # pages of different shapes: two series
    tifffile.imwrite(d / "mixed.tif", good[:5, :16, :16], append=True)
    (d / "empty.tif").write_bytes(b"")
    (d / "random.tif").write_bytes(rng.bytes(4096))
    (d / "random.h5").write_bytes(rng.bytes(4096))
    with h5py.File(d / "complex.h5", "w") as h:
        h["movie"] = (good + 1j * good).astype(np.complex64)
    with h5py.File(d / "bool.h5", "w") as h:
        h["movie"] = good > 500
    with h5py.File(d / "movie.h5", "w") as h:
        h["imaging"] = good
    with h5py.File(d / "huge.h5", "w") as h:  # 4 KB declaring (10, 100000, 100000): never allocated
        h.create_dataset("movie", shape=(10, 100_000, 100_000), dtype="uint16", chunks=(1, 64, 64))
    c = av.open(str(d / "empty.avi"), "w", format="avi")  # a valid AVI container with no frame
    s = c.add_stream("mjpeg", rate=10)
    s.width, s.height, s.pix_fmt = 32, 32, "yuvj420p"
    c.start_encoding()
    c.close()
    (d / "params_not_yaml.yaml").write_text("preprocess: [unclosed\n")
    (d / "params_list.yaml").write_text("- 1\n- 2\n")
    (d / "params_unknown.yaml").write_text("preprocess:\n  no_such_stage: 1\n")
    (d / "params_radius.yaml").write_text("neuron_radius: -3\n")
    (d / "params_frame_limit.yaml").write_text("ingest:\n  max_frame_pixels: 100\n")
    (d / "a_file").write_text("not a folder")
    manifest = [{"session": "s1", "movie": str(d / "good.tif"), "fps": 10}]
    (d / "manifest.yaml").write_text(json.dumps(manifest))
    (d / "manifest_inf.yaml").write_text(
        "- {session: s1, movie: " + str(d / "good.tif") + ", fps: 10, neuron_radius: .inf}\n")
    # a live lease of another run on locked.zarr, with that run's in-flight output
    work = d / "locked.zarr.work"
    (work / ".movie.zarr.partial-0123abcd").mkdir(parents=True)
    (work / ".movie.zarr.partial-0123abcd" / "zarr.json").write_text("{}")
    (work / "somaflow-run.json").write_text("{}")
    (d / "locked.zarr.lease").write_text(json.dumps(
        {"owner": {"host": "elsewhere", "pid": 1, "token": "x"}, "expires": time.time() + 3600}))
    # zarr inputs the README documents
    zarr.save_array(str(d / "bare.zarr"), good, zarr_format=3)
    g = zarr.open_group(str(d / "group.zarr"), mode="w", zarr_format=3)
    g.create_array("imaging", data=good)
    g.create_array("mean", data=good[0])


def _run(*args: str) -> tuple[str, ...]:
    return ("run", *args)


FPS = ("--fps", "10")
CASES = [
    # inputs
    Case("truncated-tiff", _run("{dir}/truncated.tif", "--out", "{out}", *FPS), 2, "truncated", "truncated.tif"),
    Case("image-2d", _run("{dir}/image.tif", "--out", "{out}", *FPS), 2, "single 2-D image", "image.tif"),
    Case("stack-4d", _run("{dir}/stack4d.tif", "--out", "{out}", *FPS), 2, "--axes", "stack4d.tif"),
    Case("nan-frame", _run("{dir}/nan.tif", "--out", "{out}", *FPS), 2, "NaN", "nan.tif"),
    Case("constant", _run("{dir}/constant.tif", "--out", "{out}", *FPS), 2, "constant", "constant.tif"),
    Case("one-frame", _run("{dir}/one.tif", "--out", "{out}", *FPS), 2, "1 frame", "one.tif"),
    Case("three-frames", _run("{dir}/three.tif", "--out", "{out}", *FPS), 2, "needs at least 16 frames",
         "three.tif"),
    Case("complex-dtype", _run("{dir}/complex.h5", "--out", "{out}", *FPS), 2, "complex64", "complex.h5"),
    Case("bool-dtype", _run("{dir}/bool.h5", "--out", "{out}", *FPS), 2, "bool", "bool.h5"),
    Case("missing-path", _run("{dir}/nope.tif", "--out", "{out}", *FPS), 3, "does not exist"),
    Case("unreachable-store", _run("s3://bucket/movie.tif", "--out", "{out}", *FPS), 3, "s3://bucket",
         env={"SOMAFLOW_S3_ENDPOINT_URL": "http://127.0.0.1:{closed}", "AWS_ACCESS_KEY_ID": "x",
              "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}),
    Case("wrong-h5-dataset", _run("{dir}/movie.h5", "--dataset", "/nope", "--out", "{out}", *FPS), 2,
         "/imaging", "movie.h5"),
    Case("empty-file", _run("{dir}/empty.tif", "--out", "{out}", *FPS), 2, "empty", "empty.tif"),
    Case("random-bytes-tiff", _run("{dir}/random.tif", "--out", "{out}", *FPS), 2, "TIFF", "random.tif"),
    Case("random-bytes-h5", _run("{dir}/random.h5", "--out", "{out}", *FPS), 2, "HDF5", "random.h5"),
    Case("empty-avi", _run("{dir}/empty.avi", "--out", "{out}", *FPS), 2, "empty.avi", "empty.avi"),
    # item 2: a declared frame size no machine holds; the limit is a parameter
    Case("declared-huge-h5", _run("{dir}/huge.h5", "--out", "{out}", *FPS), 2, "ingest.max_frame_pixels",
         "huge.h5"),
    Case("declared-huge-h5-ingest", ("ingest", "{dir}/huge.h5", "--out", "{out}", *FPS), 2, "100000x100000",
         "huge.h5"),
    Case("frame-limit-param", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--params",
                                   "{dir}/params_frame_limit.yaml"), 2, "above the limit of 100", "good.tif"),
    # item 5: pages of different shapes
    Case("tiff-mixed-series", _run("{dir}/mixed.tif", "--out", "{out}", *FPS), 2, "2 image series", "mixed.tif"),
    # parameters (item 6: no silent default, no infinity)
    Case("params-not-yaml", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--params", "{dir}/params_not_yaml.yaml"),
         2, "not valid YAML", "params_not_yaml.yaml"),
    Case("params-not-mapping", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--params", "{dir}/params_list.yaml"),
         2, "mapping", "params_list.yaml"),
    Case("params-unknown-key", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--params",
                                    "{dir}/params_unknown.yaml"), 2, "no_such_stage", "params_unknown.yaml"),
    Case("params-bad-radius", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--params", "{dir}/params_radius.yaml"),
         2, "neuron_radius", "params_radius.yaml"),
    Case("params-missing", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--params", "{dir}/nope.yaml"), 2,
         "does not exist", "good.tif"),
    Case("fps-zero", _run("{dir}/good.tif", "--out", "{out}", "--fps", "0"), 2, "--fps", "good.tif"),
    Case("fps-negative", _run("{dir}/good.tif", "--out", "{out}", "--fps", "-5"), 2, "--fps", "good.tif"),
    Case("fps-inf", _run("{dir}/good.tif", "--out", "{out}", "--fps", "inf"), 2, "--fps", "good.tif"),
    Case("fps-nan", _run("{dir}/good.tif", "--out", "{out}", "--fps", "nan"), 2, "--fps", "good.tif"),
    Case("radius-zero", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--neuron-radius", "0"), 2,
         "--neuron-radius", "good.tif"),
    Case("radius-negative", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--neuron-radius", "-2"), 2,
         "--neuron-radius", "good.tif"),
    Case("radius-inf", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--neuron-radius", "inf"), 2,
         "--neuron-radius", "good.tif"),
    Case("radius-huge", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--neuron-radius", "10000"), 2,
         "--neuron-radius", "good.tif"),
    Case("radius-wider-than-frame", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--neuron-radius", "40"), 2,
         "too large for frames of 32x32", "good.tif"),
    # output locations (item 7: exit 3 at once; defect 1: never over an input)
    Case("out-under-proc", _run("{dir}/good.tif", "--out", "/proc/somaflow-test.zarr", *FPS), 3,
         "/proc/somaflow-test.zarr", "good.tif"),
    Case("out-under-sys", _run("{dir}/good.tif", "--out", "/sys/somaflow-test.zarr", *FPS), 3,
         "/sys/somaflow-test.zarr", "good.tif"),
    Case("out-parent-is-file", _run("{dir}/good.tif", "--out", "{dir}/a_file/r.zarr", *FPS), 3, "a_file",
         "good.tif"),
    Case("out-is-input", _run("{dir}/good.tif", "--out", "{dir}/good.tif", *FPS), 2, "is the input", "good.tif"),
    Case("ingest-out-under-proc", ("ingest", "{dir}/good.tif", "--out", "/proc/somaflow-test.zarr", *FPS), 3,
         "/proc/somaflow-test.zarr", "good.tif"),
    # item 8: another run holds the result's lease: refused at once, its in-flight output untouched
    Case("out-locked", _run("{dir}/good.tif", "--out", "{dir}/locked.zarr", *FPS), 3, "another run", "good.tif"),
    # item 4: zarr inputs are accepted (the run gets as far as the lease of a locked result)
    Case("zarr-bare-array", _run("{dir}/bare.zarr", "--out", "{dir}/locked.zarr", *FPS), 3, "another run",
         "bare.zarr"),
    Case("zarr-group", _run("{dir}/group.zarr", "--out", "{dir}/locked.zarr", *FPS), 3, "another run", "group.zarr"),
    Case("zarr-group-dataset", _run("{dir}/group.zarr", "--dataset", "imaging", "--out", "{dir}/locked.zarr", *FPS),
         3, "another run", "group.zarr"),
    # the inference service's own code: nothing answers at --inference
    Case("inference-unreachable", _run("{dir}/good.tif", "--out", "{out}", *FPS, "--inference",
                                       "http://127.0.0.1:{closed}"), 4, "127.0.0.1:{closed}", "good.tif",
         env={"SOMAFLOW_INFERENCE_DEADLINE": "2"}),
    # archive: bad options fail at once, before a server or cluster starts
    Case("archive-radius-zero", ("archive", "{dir}/manifest.yaml", "--out", "{out}", "--neuron-radius", "0"), 2,
         "--neuron-radius", "manifest.yaml"),
    Case("archive-fps-inf", ("archive", "{dir}/manifest.yaml", "--out", "{out}", "--fps", "inf"), 2, "--fps",
         "manifest.yaml"),
    Case("archive-row-radius-inf", ("archive", "{dir}/manifest_inf.yaml", "--out", "{out}"), 2, "neuron_radius",
         "manifest_inf.yaml"),
    Case("archive-out-under-proc", ("archive", "{dir}/manifest.yaml", "--out", "/proc/somaflow-test"), 3,
         "/proc/somaflow-test", "manifest.yaml"),
]


def _digest(path: Path) -> str:
    h = hashlib.blake2b()
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file():
                h.update(str(p.relative_to(path)).encode())
                h.update(p.read_bytes())
    elif path.exists():
        h.update(path.read_bytes())
    return h.hexdigest()


def _listing(d: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(d.rglob("*"))}


@dataclass
class Outcome:
    code: int
    stderr: str
    seconds: float
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    input_before: str
    input_after: str
    closed: str


#: runs each case's command line in a process forked from one interpreter that imported the
#: command line and the session API once (``somaflow = somaflow.cli:main``, the console
#: script's entry point): a real process per case (its own exit status, stderr, environment
#: and state) without paying the imports ~50 times; test_cli.py runs the console script itself
_FORKER = """
import json, os, sys, time
import somaflow.cli, somaflow.session, somaflow.manifest  # warm: every case forks from here
cases = json.load(sys.stdin)
running, done = {}, {}
def reap():
    pid, status = os.wait()
    name, t0 = running.pop(pid)
    done[name] = {"code": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t0}
for case in cases:
    while len(running) >= 3:
        reap()
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        err = os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        out = os.open(os.devnull, os.O_WRONLY)
        os.dup2(err, 2); os.dup2(out, 1)
        os.environ.update(case["env"])
        sys.argv = ["somaflow", *case["args"]]
        try:
            code = somaflow.cli.main(case["args"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        sys.stderr.flush()
        os._exit(code)
    running[pid] = (case["name"], t0)
while running:
    reap()
print(json.dumps(done))
"""


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict[str, Outcome]:
    """Every case run once (three at a time); case name -> outcome."""
    root = tmp_path_factory.mktemp("bad-inputs")
    closed = str(free_port())
    jobs, state = [], {}
    for case in CASES:
        d = root / case.name
        d.mkdir()
        _write_inputs(d)
        fill: Callable[[str], str] = lambda s, d=d: s.format(dir=d, out=d / "result.zarr", closed=closed)  # noqa: E731
        src = d / case.input if case.input else d / "good.tif"
        state[case.name] = (d, src, _listing(d), _digest(src))
        jobs.append({"name": case.name, "args": [fill(a) for a in case.args], "stderr": str(root / f"{case.name}.err"),
                     "env": {"SOMAFLOW_HOME": str(root / "home"), **{k: fill(v) for k, v in case.env.items()}}})
    proc = subprocess.run([sys.executable, "-c", _FORKER], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    outcomes = {}
    for name, (d, src, before, digest) in state.items():
        outcomes[name] = Outcome(done[name]["code"], (root / f"{name}.err").read_text(), done[name]["seconds"],
                                 before, _listing(d), digest, _digest(src), closed)
    return outcomes


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(matrix, case):
    o = matrix[case.name]
    err = o.stderr
    lines = err.strip().splitlines()
    assert o.code == case.code, f"exit {o.code}, expected {case.code}: {err}"
    assert len(lines) == 1 and lines[0].startswith("somaflow: error:"), err
    assert "Traceback" not in err and "internal error" not in err
    assert case.says.format(closed=o.closed) in lines[0], lines[0]
    # nothing written, nothing removed: a later run finds the folder as it was (the locked
    # result's in-flight output included), and the input is byte for byte the same
    assert o.after == o.before, set(o.after) ^ set(o.before)
    assert o.input_after == o.input_before
    # before any cluster or Prefect server starts: neither is running in the process
    assert "Dask dashboard" not in err and o.seconds < 60


# ----------------------------------------------------------------------------- what the bad cases must not break


def test_zarr_inputs_ingest(tmp_path):
    """Item 4: a bare zarr array and a group of plain arrays (with and without --dataset) ingest."""
    _write_inputs(tmp_path)
    good = tifffile.imread(tmp_path / "good.tif")
    for i, args in enumerate([("bare.zarr",), ("group.zarr",), ("group.zarr", "--dataset", "imaging")]):
        out = tmp_path / f"m{i}.zarr"
        run_cli("ingest", str(tmp_path / args[0]), *args[1:], "--out", str(out), "--fps", "10")
        np.testing.assert_array_equal(schema.open_movie(str(out)).values, good)


def test_tiff_written_in_appends_reads_every_page(tmp_path):
    """Item 5: a TIFF written in two appends (two series of equal frames) is one movie of all its
    pages, not its first series."""
    rng = np.random.default_rng(3)
    movie = rng.integers(0, 1000, (200, 16, 16), dtype=np.uint16)
    src = tmp_path / "two.tif"
    tifffile.imwrite(src, movie[:100])
    tifffile.imwrite(src, movie[100:], append=True)
    with tifffile.TiffFile(src) as tif:
        assert len(tif.series) == 2  # what made it silently 100 frames
    out = tmp_path / "m.zarr"
    run_cli("ingest", str(src), "--out", str(out), "--fps", "10")
    np.testing.assert_array_equal(schema.open_movie(str(out)).values, movie)


def test_nan_in_unsampled_frame_ingest(tmp_path):
    """Item 10: NaN in a frame the quick sample skips is found inside a Dask task: still one line,
    exit 2, and nothing at --out."""
    rng = np.random.default_rng(4)
    m = rng.integers(0, 1000, (60, 16, 16)).astype(np.float32)
    m[1, 3, 3] = np.nan  # frame 1 is not among the 16 sampled frames of 60
    src = tmp_path / "nan.tif"
    tifffile.imwrite(src, m)
    before = _digest(src)
    out = tmp_path / "m.zarr"
    proc = run_cli("ingest", str(src), "--out", str(out), "--fps", "10", check=False)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "NaN" in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["nan.tif"] and _digest(src) == before
