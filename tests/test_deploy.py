"""Offline checks of docker/ and charts/somaflow (no Docker engine, no helm binary, no cluster).

- hadolint on every Dockerfile, yamllint on every YAML file, the compose files against the
  compose specification;
- the chart rendered by Helm's own Go SDK (helm-python-sdk) for the default values and the
  CPU-only and GPU values files, with the dask-kubernetes-operator subchart taken from the
  installed dask-kubernetes package (the chart repository cannot be reached from here; the two
  Prefect subcharts are not rendered for the same reason);
- every rendered manifest, the pods the operator builds for the DaskCluster that
  ``somaflow.kube`` creates from the rendered ConfigMap, and the Job the Prefect worker builds
  from the chart's base job template for each deployment of ``prefect.yaml``, validated with
  ``kubernetes-validate --strict`` against a pinned Kubernetes version (the DaskCluster against
  the operator's CRD schema, unknown fields refused);
- the security settings of every pod, the chart's values against values.schema.json, one
  source for image names, and compose services <-> chart components one to one;
- a misspelled manifest field and a wrongly typed value are caught.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from dask_kubernetes.operator import controller as dask_controller

import somaflow
from somaflow import kube

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "somaflow"
DOCKER = REPO / "docker"
#: the Kubernetes version manifests are validated against (the chart's kubeVersion allows >= 1.29)
K8S_VERSION = "1.33.0"
RELEASE, NAMESPACE = "somaflow", "lab"
VALUES_FILES = {"default": None, "cpu": CHART / "ci" / "cpu-values.yaml", "gpu": CHART / "ci" / "gpu-values.yaml"}
POD_OWNERS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}
DASK_CRD = Path(dask_controller.__file__).parents[1] / "deployment" / "helm" / "dask-kubernetes-operator"


def _tool(name: str) -> str:
    """A console script of this environment (hadolint, yamllint, check-jsonschema)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]'"
    return found


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def _load_yaml(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def chart_dir(tmp_path_factory) -> Path:
    """The chart with its dask-kubernetes-operator dependency in charts/, as `helm dependency
    build` leaves it: from the dask-kubernetes package of the same release (its chart's version
    is set at release time by chartpress, as here). The Prefect charts are not in any package."""
    dest = tmp_path_factory.mktemp("chart") / "somaflow"
    shutil.copytree(CHART, dest, ignore=shutil.ignore_patterns("ci"))
    dep = next(d for d in _load_yaml(CHART / "Chart.yaml")["dependencies"] if d["name"] == "dask-kubernetes-operator")
    sub = dest / "charts" / "dask-kubernetes-operator"
    shutil.copytree(DASK_CRD, sub)
    meta = _load_yaml(sub / "Chart.yaml")
    meta["version"] = dep["version"]
    (sub / "Chart.yaml").write_text(yaml.safe_dump(meta))
    return dest


@pytest.fixture(scope="module")
def chart(chart_dir):
    with helm.Chart.load(chart_dir) as loaded:
        yield loaded


def render(chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest of the release (Helm validates ``values`` against the schema first)."""
    out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if not path.endswith(".txt"):
            docs.extend(d for d in yaml.safe_load_all(text) if d)
    return docs


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict[str, Any]]]:
    return {name: render(chart, _load_yaml(path)) for name, path in VALUES_FILES.items()}


@pytest.fixture(scope="module")
def merged(chart) -> dict[str, dict[str, Any]]:
    """The values each release would use: the chart's defaults under each values file."""
    return {name: chart.merge_values(_load_yaml(path)) for name, path in VALUES_FILES.items()}


def _find(docs, kind: str, name: str | None = None) -> dict[str, Any]:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''} rendered"
    return hits[0]


def _config(docs) -> dict[str, Any]:
    return _find(docs, "ConfigMap", "somaflow-config")["data"]


def _dask_cluster(docs, tmp_path: Path) -> dict[str, Any]:
    """The DaskCluster a run in the cluster creates: somaflow.kube on the rendered cluster.yaml."""
    spec_file = tmp_path / "cluster.yaml"
    spec_file.write_text(_config(docs)["cluster.yaml"])
    return kube.cluster_spec(kube.load_kube_spec(str(spec_file)))


def _operator_deployments(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    """The scheduler and worker Deployments the operator makes of a DaskCluster (its own code)."""
    name, meta = cluster["metadata"]["name"], cluster["metadata"]
    scheduler = dask_controller.build_scheduler_deployment_spec(
        name, copy.deepcopy(cluster["spec"]["scheduler"]["spec"]), {}, meta.get("labels", {}))
    worker = dask_controller.build_worker_deployment_spec(
        "default", meta.get("namespace", NAMESPACE), name, "abc123",
        copy.deepcopy(cluster["spec"]["worker"]["spec"]), {}, meta.get("labels", {}))
    return [scheduler, worker]


def _base_job_template(docs) -> dict[str, Any]:
    cm = _find(docs, "ConfigMap", "somaflow-prefect-base-job-template")
    return json.loads(cm["data"]["baseJobTemplate.json"])


class _NoAPI:
    """Stands in for the Prefect client: the template references no blocks or variables."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the base job template made the worker call the API ({name})")


def _flow_run_jobs(docs) -> dict[str, dict[str, Any]]:
    """The Job the Kubernetes worker (prefect-kubernetes) builds for each deployment of prefect.yaml."""
    from prefect.client.schemas.objects import FlowRun
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _base_job_template(docs)
    jobs = {}
    for deployment in _load_yaml(REPO / "prefect.yaml")["deployments"]:
        variables = deployment["work_pool"].get("job_variables", {})
        config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            template, variables, client=_NoAPI()))
        config.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="nightly-otter"))
        jobs[deployment["name"]] = config.job_manifest
    return jobs


def _pod_specs(docs) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in docs:
        if d["kind"] in POD_OWNERS:
            out.append((f"{d['kind']}/{d['metadata'].get('name', d['metadata'].get('generateName'))}",
                        d["spec"]["template"]["spec"]))
    return out


# ----------------------------------------------------------------------------- Dockerfiles, YAML


DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))


def test_every_image_has_a_dockerfile():
    assert {p.name for p in DOCKERFILES} == {"worker.Dockerfile", "inference.Dockerfile", "prefect-worker.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint_and_our_rules(dockerfile):
    res = _run(_tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(dockerfile))
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    bases = [args.get(m.strip("${}"), m) for m in re.findall(r"^FROM (\S+)", text, re.M)]
    assert len(bases) >= 2, "multi-stage: a build stage and a small final stage"
    for base in bases:  # pinned: a version in the tag, never latest
        assert re.search(r":[^:]*\d+\.\d+", base) and "latest" not in base, base
    final = text[text.rindex("\nFROM "):]
    users = re.findall(r"^USER (\S+)", final, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the final stage runs as a non-root user"
    assert re.search(r"^HEALTHCHECK ", final, re.M)
    assert not re.search(r"^(ENV|ARG) \S*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)\S*=\S", text, re.M | re.I), \
        "no secrets in layers"


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    res = _run(_tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(bad))
    assert res.returncode != 0 and "DL3007" in res.stdout  # ":latest"


def test_dockerignore_keeps_secrets_and_state_out():
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("**") if "**" in lines else 0] == "**"  # deny by default
    assert "**/.env" in lines and "!pyproject.toml" in lines


def test_every_yaml_file_passes_yamllint():
    res = _run(_tool("yamllint"), "--strict", "-c", str(REPO / ".yamllint.yaml"), ".")
    assert res.returncode == 0, res.stdout + res.stderr


def test_compose_files_follow_the_compose_spec():
    res = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
               str(DOCKER / "compose.yaml"), str(DOCKER / "compose.gpu.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr


# ----------------------------------------------------------------------------- values


def test_values_files_match_the_schema(merged):
    schema_file = CHART / "values.schema.json"
    res = _run(_tool("check-jsonschema"), "--schemafile", str(schema_file), str(CHART / "values.yaml"))
    assert res.returncode == 0, res.stdout + res.stderr
    schema = json.loads(schema_file.read_text())
    for values in merged.values():
        jsonschema.validate(values, schema)  # what Helm checks at install, for each values file


def test_every_values_key_is_commented():
    """Each key has a comment above it (or inline), or sits inside a value documented as a whole
    by a helm-docs "# --" comment on an enclosing key (e.g. a securityContext mapping)."""
    lines = (CHART / "values.yaml").read_text().splitlines()

    def commented(i: int, whole: bool = False) -> bool:
        above = lines[i - 1].strip() if i else ""
        return above.startswith("# --" if whole else "#") or (not whole and " # " in lines[i])

    def ancestors(i: int):
        indent = len(lines[i]) - len(lines[i].lstrip())
        for j in range(i - 1, -1, -1):
            text = lines[j]
            if text.strip() and not text.lstrip().startswith(("#", "-")) and len(text) - len(text.lstrip()) < indent:
                indent = len(text) - len(text.lstrip())
                yield j

    for i, line in enumerate(lines):
        if re.match(r"^\s*[\w.-]+:", line):
            assert commented(i) or any(commented(j, whole=True) for j in ancestors(i)), \
                f"values.yaml line {i + 1} has no comment: {line.strip()}"


@pytest.mark.parametrize("bad, where", [
    ({"dask": {"workers": "many"}}, "/dask/workers"),
    ({"inference": {"device": "tpu"}}, "/inference/device"),
    ({"containerSecurityContext": {"allowPrivilegeEscalation": True, "readOnlyRootFilesystem": True,
                                   "capabilities": {"drop": ["ALL"]}}}, "/containerSecurityContext/allowPrivilegeEscalation"),
    ({"podSecurityContext": {"runAsNonRoot": False, "seccompProfile": {"type": "RuntimeDefault"}}},
     "/podSecurityContext/runAsNonRoot"),
    ({"archive": {"enabled": True}}, "/archive/manifest"),
])
def test_a_broken_values_file_is_caught(chart, tmp_path, bad, where):
    values_file = tmp_path / "bad-values.yaml"
    values_file.write_text(yaml.safe_dump(bad))
    with pytest.raises(helm.HelmError, match=re.escape(where)):
        render(chart, _load_yaml(values_file))
    res = _run(_tool("check-jsonschema"), "--schemafile", str(CHART / "values.schema.json"), str(values_file))
    if where != "/archive/manifest":  # a partial file: only the merged values lack the manifest
        assert res.returncode != 0


def test_pipeline_defaults_are_valid_somaflow_parameters(rendered):
    from somaflow.params import RunParams

    for docs in rendered.values():
        params = yaml.safe_load(_config(docs)["params.yaml"])
        RunParams.for_movie(30.0, "2p", overrides=params)  # raises on an unknown key or bad value


# ----------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("values", list(VALUES_FILES))
def test_rendered_manifests_validate_strictly(rendered, values, tmp_path):
    docs = rendered[values]
    kinds = {d["kind"] for d in docs}
    assert {"ConfigMap", "Role", "RoleBinding", "ServiceAccount", "Deployment"} <= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # what the operator creates for a run: its scheduler and worker Deployments
    for doc in _operator_deployments(_dask_cluster(docs, tmp_path)):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # a flow run's Job; prefect-kubernetes insists on completions/parallelism inside the pod
    # spec (its default template has them there) and the API server drops them: strip them here
    for job in _flow_run_jobs(docs).values():
        job = copy.deepcopy(job)
        for key in ("completions", "parallelism"):
            job["spec"]["template"]["spec"].pop(key)
        job["metadata"]["name"] = job["metadata"].pop("generateName") + "x"
        kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def test_operator_crds_validate_strictly(chart):
    crds = [yaml.safe_load(crd["data"]) for crd in chart.crds]
    assert {c["spec"]["names"]["kind"] for c in crds} >= {"DaskCluster", "DaskWorkerGroup"}
    for crd in crds:
        kubernetes_validate.validate(crd, K8S_VERSION, strict=True)


def _strict_schema(schema: Any) -> Any:
    """A CRD's OpenAPI schema as the API server applies it with strict field validation:
    objects refuse fields they do not declare."""
    if isinstance(schema, dict):
        out = {k: _strict_schema(v) for k, v in schema.items() if not k.startswith("x-kubernetes")}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict_schema(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def dask_cluster_schema() -> dict[str, Any]:
    crd = _load_yaml(DASK_CRD / "crds" / "daskcluster.yaml")
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict_schema(version["schema"]["openAPIV3Schema"])
    # every object's implicit fields
    schema["properties"].update(apiVersion={"const": f"{crd['spec']['group']}/v1"},
                                kind={"const": crd["spec"]["names"]["kind"]}, metadata={"type": "object"})
    return schema


@pytest.mark.parametrize("values", list(VALUES_FILES))
def test_dask_cluster_matches_the_operators_crd(rendered, dask_cluster_schema, values, tmp_path):
    cluster = _dask_cluster(rendered[values], tmp_path)
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1" and cluster["kind"] == "DaskCluster"
    jsonschema.validate(cluster, dask_cluster_schema)


def test_a_broken_manifest_is_caught(rendered, dask_cluster_schema, tmp_path):
    deployment = copy.deepcopy(_find(rendered["gpu"], "Deployment", "somaflow-inference"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["imagePulPolicy"] = container.pop("imagePullPolicy")  # misspelled
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePulPolicy"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    cluster = _dask_cluster(rendered["gpu"], tmp_path)
    cluster["spec"]["worker"]["spec"]["containers"][0]["resouces"] = {}  # misspelled
    with pytest.raises(jsonschema.ValidationError, match="resouces"):
        jsonschema.validate(cluster, dask_cluster_schema)


# ----------------------------------------------------------------------------- security


def _assert_secure_pod(where: str, pod: dict[str, Any]) -> None:
    psc = pod.get("securityContext") or {}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        csc = c.get("securityContext") or {}
        what = f"{where} container {c['name']}"
        assert csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{what}: runAsNonRoot"
        assert csc.get("runAsUser", psc.get("runAsUser", 1)) != 0, f"{what}: runAsUser 0"
        assert csc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation"
        assert csc.get("readOnlyRootFilesystem") is True, f"{what}: readOnlyRootFilesystem"
        assert "ALL" in (csc.get("capabilities") or {}).get("drop", []), f"{what}: capabilities not dropped"
        assert not (csc.get("capabilities") or {}).get("add"), f"{what}: capabilities added"
        assert not csc.get("privileged"), f"{what}: privileged"
        seccomp = csc.get("seccompProfile", psc.get("seccompProfile")) or {}
        assert seccomp.get("type") in ("RuntimeDefault", "Localhost"), f"{what}: seccomp profile"


@pytest.mark.parametrize("values", list(VALUES_FILES))
def test_every_pod_is_locked_down(rendered, values, tmp_path):
    docs = rendered[values]
    pods = _pod_specs(docs)
    pods += _pod_specs(_operator_deployments(_dask_cluster(docs, tmp_path)))
    pods += [(f"flow run {name}", job["spec"]["template"]["spec"]) for name, job in _flow_run_jobs(docs).items()]
    names = {where for where, _ in pods}
    # the chart's inference service, the operator (subchart), Dask scheduler and workers, flow runs
    assert any("inference" in n for n in names) and any("dask-kubernetes-operator" in n for n in names)
    assert any("scheduler" in n for n in names) and any("worker" in n for n in names)
    assert values == "default" or any("archive" in n for n in names)
    for where, pod in pods:
        _assert_secure_pod(f"{values}: {where}", pod)


def test_upstream_prefect_subcharts_get_locked_down_values(merged):
    """The Prefect charts cannot be fetched here; what this chart passes them is checked."""
    for values in merged.values():
        worker = values["prefect-worker"]["worker"]
        server = values["prefect-server"]["server"]
        for ctx in (worker["containerSecurityContext"], worker["initContainer"]["containerSecurityContext"],
                    server["containerSecurityContext"]):
            assert ctx["runAsNonRoot"] and not ctx["allowPrivilegeEscalation"] and ctx["readOnlyRootFilesystem"]
            assert ctx["capabilities"]["drop"] == ["ALL"]
        for ctx in (worker["podSecurityContext"], server["podSecurityContext"]):
            assert ctx["runAsNonRoot"] and ctx["seccompProfile"]["type"] == "RuntimeDefault"


# ----------------------------------------------------------------------------- the inference service


@pytest.mark.parametrize("values", ["default", "cpu", "gpu"])
def test_inference_service(rendered, merged, values):
    docs, vals = rendered[values], merged[values]["inference"]
    deployment = _find(docs, "Deployment", "somaflow-inference")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpu = vals["device"] == "cuda"
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == gpu
    assert pod.get("nodeSelector", {}) == vals["nodeSelector"] and pod.get("tolerations", []) == vals["tolerations"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["args"][container["args"].index("--device") + 1] == vals["device"]
    assert any(v["mountPath"] == "/dev/shm" for v in container["volumeMounts"])
    service = _find(docs, "Service", "somaflow-inference")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    hpa = _find(docs, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == ("Pods" if gpu else "Resource")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "somaflow-inference"


@pytest.mark.parametrize("values", ["cpu", "gpu"])
def test_only_dask_workers_reach_the_inference_service(rendered, values, tmp_path):
    docs = rendered[values]
    policy = _find(docs, "NetworkPolicy")
    inference_labels = _find(docs, "Deployment", "somaflow-inference")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= inference_labels.items()
    scheduler, worker = _operator_deployments(_dask_cluster(docs, tmp_path))
    pods = {"worker": worker["spec"]["template"]["metadata"]["labels"],
            "scheduler": scheduler["spec"]["template"]["metadata"]["labels"],
            "archive": _find(docs, "Job")["spec"]["template"]["metadata"]["labels"],
            "inference": inference_labels}

    def admitted(labels: dict[str, str], port: int) -> bool:
        for rule in policy["spec"]["ingress"]:
            if port in [p["port"] for p in rule["ports"]]:
                for peer in rule["from"]:
                    sel = peer.get("podSelector", {}).get("matchLabels")
                    if sel is not None and "namespaceSelector" not in peer and sel.items() <= labels.items():
                        return True
        return False

    assert admitted(pods["worker"], 8000) and admitted(pods["worker"], 8001)
    assert not any(admitted(pods[p], 8000) for p in ("scheduler", "archive", "inference"))


# ----------------------------------------------------------------------------- one source of truth


def test_versions_agree():
    chart = _load_yaml(CHART / "Chart.yaml")
    pyproject = (REPO / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert chart["appVersion"] == version == somaflow.__version__
    deps = {d["name"]: d for d in chart["dependencies"]}
    assert deps["dask-kubernetes-operator"]["version"] == _installed_version("dask-kubernetes")
    assert all(d.get("condition") == f"{name}.enabled" for name, d in deps.items())


def _installed_version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


@pytest.mark.parametrize("values", list(VALUES_FILES))
def test_images_come_from_the_chart(rendered, merged, values, tmp_path):
    vals = merged[values]
    tag = vals["images"]["tag"] or _load_yaml(CHART / "Chart.yaml")["appVersion"]
    image = {k: f"{vals['images']['registry']}/{vals['images'][k]}:{tag}" for k in ("worker", "inference", "prefectWorker")}
    docs = rendered[values]
    # the Dask pods (flow runs and --cluster-spec values.yaml alike), the archive Job, the flow runs
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(vals))
    from_values = kube.load_kube_spec(str(values_file))
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(_config(docs)["cluster.yaml"])
    from_configmap = kube.load_kube_spec(str(cluster_file))
    assert from_values.image == from_configmap.image == image["worker"]
    assert from_values.model_copy(update={"namespace": NAMESPACE}) == from_configmap
    if values == "default":
        assert from_values.image == kube.DEFAULT_IMAGE == kube.KubeSpec().image
    for name, job in _flow_run_jobs(docs).items():
        pod = job["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == image["worker"], name
        assert pod["serviceAccountName"] == vals["prefect"]["flowRunServiceAccount"]
        assert job["metadata"]["namespace"] == NAMESPACE
    for kind, name, key in (("Deployment", "somaflow-inference", "inference"),):
        assert _find(docs, kind, name)["spec"]["template"]["spec"]["containers"][0]["image"] == image[key]
    if values != "default":
        assert _find(docs, "Job")["spec"]["template"]["spec"]["containers"][0]["image"] == image["worker"]
    worker = vals["prefect-worker"]["worker"]
    assert f"{worker['image']['repository']}:{worker['image']['prefectTag']}" == image["prefectWorker"]
    # the rest of the wiring between this chart and the Prefect subcharts and prefect.yaml
    assert worker["config"]["workPool"] == vals["prefect"]["workPool"]
    assert worker["selfHostedServerApiConfig"]["apiUrl"] == vals["prefect"]["apiUrl"] == vals["dask"]["env"]["PREFECT_API_URL"]
    assert worker["config"]["baseJobTemplate"]["existingConfigMapName"] == "somaflow-prefect-base-job-template"
    pools = {d["work_pool"]["name"] for d in _load_yaml(REPO / "prefect.yaml")["deployments"]}
    assert pools == {vals["prefect"]["workPool"]}


def test_deployments_read_the_charts_configmap(rendered):
    docs = rendered["default"]
    config = _find(docs, "ConfigMap", "somaflow-config")
    for deployment in _load_yaml(REPO / "prefect.yaml")["deployments"]:
        params = deployment["parameters"]
        assert params["cluster_spec"] == "/etc/somaflow/cluster.yaml"
        assert params["params_file"] == "/etc/somaflow/params.yaml"
    for job in _flow_run_jobs(docs).values():
        pod = job["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "config")
        assert volume["configMap"]["name"] == config["metadata"]["name"]
        mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "config")
        assert mount["mountPath"] == "/etc/somaflow"
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "somaflow-s3"}}]


def test_docs_build_the_images_the_chart_names(merged):
    doc = (REPO / "docs" / "deploy.md").read_text()
    vals = merged["default"]["images"]
    tag = _load_yaml(CHART / "Chart.yaml")["appVersion"]
    for dockerfile, key in (("worker", "worker"), ("inference", "inference"), ("prefect-worker", "prefectWorker")):
        command = f"docker build -f docker/{dockerfile}.Dockerfile -t $REGISTRY/{vals[key]}:{tag} ."
        assert command in doc, f"docs/deploy.md lacks: {command}"


# ----------------------------------------------------------------------------- compose <-> chart


def _compose_components() -> dict[str, str]:
    compose = _load_yaml(DOCKER / "compose.yaml")
    return {name: svc["labels"]["io.somaflow.component"] for name, svc in compose["services"].items()}


def _chart_components(docs, merged_values, tmp_path) -> set[str]:
    """What runs in a release: the chart's workloads, the Dask cluster a run creates, the
    enabled upstream subcharts, and the object store its pods are pointed at."""
    found = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
             for d in docs if d["kind"] in POD_OWNERS and "app.kubernetes.io/component" in
             d["spec"]["template"]["metadata"].get("labels", {})}
    cluster = _dask_cluster(docs, tmp_path)
    found |= {f"dask-{role}" for role in ("scheduler", "worker") if cluster["spec"][role]["spec"]["containers"]}
    found |= {name for name in ("prefect-server", "prefect-worker") if merged_values[name]["enabled"]}
    secret = merged_values["objectStore"]["secretName"]
    if all({"secretRef": {"name": secret}} in pod["containers"][0].get("envFrom", [])
           for kind, pod in _pod_specs(docs) if "archive" in kind):
        found.add("object-store")
    return found


@pytest.mark.parametrize("values", ["cpu", "gpu"])
def test_compose_services_and_chart_components_correspond(rendered, merged, values, tmp_path):
    compose = _compose_components()
    chart = _chart_components(rendered[values], merged[values], tmp_path)
    assert set(compose.values()) == chart, (sorted(compose.values()), sorted(chart))
    # one service per component, except the store's bucket-creating one-shot companion
    per_component = {}
    for service, component in compose.items():
        per_component.setdefault(component, []).append(service)
    assert {c: s for c, s in per_component.items() if len(s) > 1} == {"object-store": ["object-store", "object-store-init"]}


def test_compose_mirrors_the_charts_settings():
    compose = _load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    for name in ("dask-scheduler", "dask-worker", "archive", "prefect-worker", "inference"):
        svc = services[name]
        assert svc.get("read_only") is True and svc.get("cap_drop") == ["ALL"], name
        assert svc["user"].split(":")[0] not in ("0", "root"), name
        assert "no-new-privileges:true" in svc.get("security_opt", []), name
    archive = services["archive"]["command"]
    assert archive[:2] == ["somaflow", "archive"] and "--params" in archive and "--inference" in archive
    assert all(p.startswith("127.0.0.1:") for svc in services.values() for p in svc.get("ports", []))
    assert "ports" not in services["inference"]  # reached by the Dask workers only


def test_chart_lints_clean(chart_dir):
    report = helm.lint(chart_dir, strict=True, kube_version=f"v{K8S_VERSION}", namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # the only finding: the Prefect charts, which `helm dependency build` fetches, are absent
    missing = [m for m in problems if "missing these dependencies" in m["error"]]
    assert problems == missing, problems
    for m in missing:
        assert set(re.split(r"[,\s]+", m["error"].split(":")[-1].strip())) == {"prefect-server", "prefect-worker"}
    assert all("missing these dependencies" in e for e in report["errors"]), report["errors"]


def test_optional_secrets_render_and_validate(chart, tmp_path):
    docs = render(chart, {"objectStore": {"create": True, "accessKeyId": "AKIDTEST", "secretAccessKey": "s3cr3t",
                                          "endpoint": "http://minio.storage:9000"},
                          "inference": {"tokenSecret": "somaflow-inference-token"}})
    secret = _find(docs, "Secret", "somaflow-s3")
    assert set(secret["stringData"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "SOMAFLOW_S3_ENDPOINT_URL"}
    env = _find(docs, "Deployment", "somaflow-inference")["spec"]["template"]["spec"]["containers"][0]["env"]
    token = next(e for e in env if e["name"] == "SOMAFLOW_SERVE_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "somaflow-inference-token", "key": "token"}
    # the Dask workers, which call the service, get the same token (the client's variable)
    worker = _dask_cluster(docs, tmp_path)["spec"]["worker"]["spec"]["containers"][0]
    token = next(e for e in worker["env"] if e["name"] == "SOMAFLOW_INFERENCE_TOKEN")
    assert token["valueFrom"]["secretKeyRef"] == {"name": "somaflow-inference-token", "key": "token"}
    assert kube.from_chart_values({"dask": {}, "inference": {"tokenSecret": "t"}})["secret_env"] == {
        "SOMAFLOW_INFERENCE_TOKEN": "t/token"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    with pytest.raises(helm.HelmError, match="objectStore.accessKeyId is required"):
        render(chart, {"objectStore": {"create": True}})
