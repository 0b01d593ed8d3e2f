"""Cluster selection: a real scheduler + two workers as separate processes with an s3:// store,
the Kubernetes cluster spec (without a cluster), cluster options, the Prefect deployments."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port, kill_group, run_cli
from somaflow import kube, runtime
from somaflow.errors import InputError, ParameterError
from somaflow.io import schema, stores

# ----------------------------------------------------------------------------- a real multi-process cluster


@pytest.fixture()
def dask_processes(s3_server, tmp_path):
    """`dask scheduler` and two `dask worker` processes on loopback; yields the scheduler address."""
    bindir = Path(sys.executable).parent
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, **s3_server, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"dask-{i}.log", "w") for i in range(3)]
    procs = [subprocess.Popen([str(bindir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], env=env, stdout=logs[0], stderr=subprocess.STDOUT,
                              start_new_session=True)]
    for i in (1, 2):
        procs.append(subprocess.Popen(
            [str(bindir / "dask"), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
             "--no-dashboard", "--name", f"w{i}", "--memory-limit", "2GiB"],
            env=env, stdout=logs[i], stderr=subprocess.STDOUT, start_new_session=True))
    try:
        from distributed import Client

        with Client(address, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in procs[::-1]:
            kill_group(p, 15)
        for f in logs:
            f.close()


def _executed(address: str) -> dict[str, int]:
    from distributed import Client

    with Client(address, timeout="30s") as client:
        return client.run(lambda dask_worker: dask_worker.state.executed_count)


@pytest.mark.integration
@pytest.mark.slow  # the default suite runs every method S3-to-S3 on separate processes (test_multinode)
def test_run_on_a_multiprocess_cluster_with_s3(dask_processes, make_movie, s3_bucket, s3_server, prefect_api):
    sim = make_movie(41, n_frames=60)
    fs, _ = stores.filesystem(s3_bucket)
    fs.put(str(sim / "movie.tif"), f"{s3_bucket}/raw/movie.tif")
    out = f"{s3_bucket}/results/m.zarr"
    env = {**prefect_api, **s3_server}
    before = _executed(dask_processes)
    proc = run_cli("run", f"{s3_bucket}/raw/movie.tif", "--out", out, "--fps", "10",
                   "--cluster", dask_processes, "--json", env=env)
    summary = json.loads(proc.stdout)
    assert summary["status"] == "done" and summary["result"] == out
    assert "Prefect flow run" in proc.stderr
    after = _executed(dask_processes)
    assert len(after) == 2
    assert all(after[w] > before.get(w, 0) for w in after), (before, after)  # both workers computed
    fs.invalidate_cache()
    assert schema.is_complete(out)
    for name in ("movie", "corrected", "motion", "summary", "images", "units", "traces"):
        assert schema.is_complete(f"{out}.work/{name}.zarr"), name
    ds = schema.open_result(out)
    schema.validate_result(ds)
    prov = ds.attrs["provenance"]
    assert prov["source"] == f"{s3_bucket}/raw/movie.tif" and prov["source_fingerprint"]
    # done is done on S3 too: the fingerprint (ETag) check needs no cluster and no read of the movie
    again = run_cli("run", f"{s3_bucket}/raw/movie.tif", "--out", out, "--fps", "10",
                    "--cluster", dask_processes, env=env)
    assert "already done (skipped)" in again.stderr


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("cluster, spec, match", [
    ("sideways", None, "unknown --cluster"),
    ("local", "values.yaml", "--cluster kubernetes"),
])
def test_cluster_options(cluster, spec, match):
    with pytest.raises(ParameterError, match=match):
        runtime.check_cluster_option(cluster, spec)


def test_cluster_options_on_the_command_line(tmp_path):
    proc = run_cli("run", str(tmp_path / "m.tif"), "--out", str(tmp_path / "r.zarr"), "--cluster", "nowhere",
                   check=False)
    assert proc.returncode == 2 and "unknown --cluster" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    help_text = run_cli("archive", "--help").stdout
    assert "1 when any failed" in help_text and "--concurrency" in help_text and "kubernetes" in help_text


def test_bar_fraction():
    assert runtime.bar_fraction(10, 10) == 0.0
    assert runtime.bar_fraction(0, 10) == 1.0
    assert runtime.bar_fraction(5, 20) == 0.75
    assert runtime.bar_fraction(0, 0) == 0.0


def test_scheduler_backlog_comes_from_distributeds_progress_plugin():
    """The progress bar's backlog: tasks not yet finished, as distributed's AllProgress counts them."""
    import threading

    from distributed import Client, Event

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        gate = Event()
        futures = client.map(lambda i, gate=gate: (gate.wait(), i)[1], range(5))
        seen = 0
        for _ in range(200):  # the tasks reach the scheduler
            seen = client.run_on_scheduler(runtime._scheduler_backlog)
            if seen == 5:
                break
            threading.Event().wait(0.05)
        assert seen == 5
        assert "all-progress" in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
        gate.set()
        assert client.gather(futures) == list(range(5))
        assert client.run_on_scheduler(runtime._scheduler_backlog) == 0


def test_progress_lines_go_to_the_given_stream(tmp_path):
    import io

    stream = io.StringIO()
    with runtime.console_progress(stream):
        with runtime.stage_progress("s1", "motion"):
            pass
        with pytest.raises(RuntimeError), runtime.stage_progress("s1", "summary"):
            raise RuntimeError("boom")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[s1] motion: started" and lines[1].startswith("[s1] motion: done in ")
    assert lines[3].startswith("[s1] summary: failed after ")
    runtime.progress_logger().info("not shown")
    assert len(stream.getvalue().splitlines()) == 4


# ----------------------------------------------------------------------------- Kubernetes


def test_kube_spec_from_chart_values(tmp_path):
    pytest.importorskip("dask_kubernetes")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({
        "prefect": {"server": {"enabled": True}},
        "dask": {
            "name": "somaflow-archive", "namespace": "lab", "image": "registry.example/somaflow:1.2",
            "workers": 12, "threads_per_worker": 1,
            "resources": {"requests": {"cpu": "1", "memory": "6Gi"}, "limits": {"cpu": "1", "memory": "6Gi"}},
            "env": {"PREFECT_API_URL": "http://somaflow-prefect:4200/api"},
            "env_from_secret": "somaflow-s3", "service_account": "somaflow-dask",
            "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }))
    spec = kube.load_kube_spec(str(values))
    res = kube.cluster_spec(spec)
    assert res["apiVersion"] == "kubernetes.dask.org/v1" and res["kind"] == "DaskCluster"
    assert res["metadata"]["name"] == "somaflow-archive" and res["metadata"]["namespace"] == "lab"
    worker = res["spec"]["worker"]
    assert worker["replicas"] == 12
    c = worker["spec"]["containers"][0]
    assert c["image"] == "registry.example/somaflow:1.2"
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "6Gi"}
    assert c["args"][-2:] == ["--nthreads", "1"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["PREFECT_API_URL"] == "http://somaflow-prefect:4200/api"  # one Prefect server for all
    assert env["OMP_NUM_THREADS"] == "1"
    assert c["envFrom"] == [{"secretRef": {"name": "somaflow-s3"}}]
    assert worker["spec"]["serviceAccountName"] == "somaflow-dask"
    assert worker["spec"]["tolerations"][0]["key"] == "spot"
    sched = res["spec"]["scheduler"]["spec"]
    assert sched["containers"][0]["image"] == "registry.example/somaflow:1.2"
    assert sched["containers"][0]["resources"] == spec.scheduler_resources
    assert res["spec"]["scheduler"]["service"]["type"] == "ClusterIP"
    # the spec round-trips through YAML, as the operator receives it
    assert yaml.safe_load(yaml.safe_dump(res)) == res


def test_kube_spec_defaults_and_errors(tmp_path):
    assert kube.load_kube_spec(None).workers >= 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("dask:\n  workers: 0\n")
    with pytest.raises(ParameterError, match="workers"):
        kube.load_kube_spec(str(bad))
    bad.write_text("dask:\n  replicas: 3\n")
    with pytest.raises(ParameterError, match="replicas"):
        kube.load_kube_spec(str(bad))
    with pytest.raises(InputError, match="does not exist"):
        kube.load_kube_spec(str(tmp_path / "none.yaml"))


def test_kubernetes_without_dask_kubernetes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes", None)
    with pytest.raises(ParameterError, match=r"pip install 'somaflow\[kubernetes\]'"):
        kube.cluster_spec(kube.KubeSpec())
    with pytest.raises(ParameterError, match="kubernetes"), runtime.dask_client("kubernetes"):
        pass


# ----------------------------------------------------------------------------- deployments


def test_prefect_yaml_deployments():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    data = yaml.safe_load((REPO / "prefect.yaml").read_text())
    model = PrefectYamlModel.model_validate(data)
    assert {d.name for d in model.deployments} == {"archive-nightly", "archive-on-demand"}
    for d in model.deployments:
        flow = load_flow_from_entrypoint(str(REPO / d.entrypoint))
        assert flow.name == "somaflow-archive"
        sig = inspect.signature(flow.fn)
        sig.bind_partial(**d.parameters)  # every parameter exists
        assert d.parameters["cluster"] == "kubernetes"
        assert d.work_pool.name == "somaflow-kubernetes"
        # the image is the work pool's default, set by the chart (tests/test_deploy.py)
        assert "image" not in d.work_pool.job_variables
        assert parameter_schema(flow).properties.keys() >= set(d.parameters)
    nightly = next(d for d in model.deployments if d.name == "archive-nightly")
    sig.bind(**nightly.parameters)  # complete: a scheduled run needs no parameter at run time
    assert CronSchedule(cron=nightly.schedules[0].cron, timezone="UTC")

