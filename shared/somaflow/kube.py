"""Dask on Kubernetes through the dask-kubernetes operator (``--cluster kubernetes``).

The cluster is described by a values file — the ``dask:`` section of the Helm
chart's ``values.yaml`` (``charts/somaflow``), the ``cluster.yaml`` the chart
renders into its ConfigMap, or a YAML file holding the same keys at its top
level (``--cluster-spec FILE``) — validated into :class:`KubeSpec` and turned
into a ``DaskCluster`` resource (:func:`cluster_spec`) that the operator
reconciles into a scheduler pod, a scheduler service and ``workers`` worker
pods::

    dask:
      image: registry.example/somaflow-worker:0.1.0   # empty: the chart's images.worker
      workers: 8
      resources:
        requests: {cpu: "1", memory: 6Gi}
        limits: {cpu: "1", memory: 6Gi}
      env: {PREFECT_API_URL: "http://somaflow-prefect:4200/api"}
      env_from_secret: somaflow-s3          # AWS_ACCESS_KEY_ID ... for the object store

In a chart values file an empty ``dask.image`` is the chart's worker image
(``images.registry``/``images.worker``:``images.tag``, the tag defaulting to
the chart's appVersion, which is this package's version) and an empty
``dask.env_from_secret`` is the chart's object-store Secret
(``objectStore.secretName``): the same resolution the chart's templates make,
so a run from a laptop with ``--cluster-spec values.yaml`` and a flow run in
the cluster with the rendered ConfigMap build the same pods (a test renders the
chart and compares).

Every pod runs as the images' non-root user with a read-only root filesystem,
no privilege escalation and no capabilities; ``/tmp`` and the home directory
(Dask's spill directory, Prefect's and torch's caches) are an ``emptyDir``.

dask-kubernetes is an optional dependency: ``pip install 'somaflow[kubernetes]'``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from somaflow import __version__
from somaflow.errors import InputError, ParameterError
from somaflow.io.config import read_yaml

log = logging.getLogger(__name__)

#: environment every worker gets: one thread per BLAS/torch pool (STACK.md)
SINGLE_THREADED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

INSTALL_HINT = "pip install 'somaflow[kubernetes]'"

#: registry and repository of the Dask worker / flow-runner image (docker/worker.Dockerfile); the
#: chart's ``images.registry`` and ``images.worker`` (a test checks they agree)
DEFAULT_REGISTRY = "ghcr.io/somaflow"
WORKER_REPOSITORY = "somaflow-worker"
#: the image scheduler and workers run when nothing else is said: this package's own version
DEFAULT_IMAGE = f"{DEFAULT_REGISTRY}/{WORKER_REPOSITORY}:{__version__}"

#: the images' non-root user (docker/*.Dockerfile: ``useradd --uid 10001``)
RUN_AS_USER = 10001
#: home directory of that user in the worker image
HOME_DIR = "/home/somaflow"

#: pod-level security context of the scheduler and the worker pods
POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER, "seccompProfile": {"type": "RuntimeDefault"},
}
#: container-level security context of the scheduler and the worker containers
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
#: the writable places of a read-only container: one emptyDir, two mounts
SCRATCH_VOLUME: dict[str, Any] = {"name": "scratch", "emptyDir": {}}
SCRATCH_MOUNTS: list[dict[str, Any]] = [
    {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"},
    {"name": "scratch", "mountPath": HOME_DIR, "subPath": "home"},
]


class KubeSpec(BaseModel):
    """What the Dask cluster on Kubernetes looks like (the chart's ``dask:`` values)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field("somaflow", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40,
                      description="DaskCluster resource name (DNS label)")
    namespace: str | None = Field(None, description="namespace; default: the current one")
    image: str = Field(DEFAULT_IMAGE, min_length=1,
                       description="image of scheduler and workers (somaflow installed, same version as the client)")
    workers: int = Field(4, ge=1, le=2000, description="worker pods")
    threads_per_worker: int = Field(1, ge=1, description="Dask threads per worker pod")
    resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "6Gi"},
                                 "limits": {"cpu": "1", "memory": "6Gi"}},
        description="Kubernetes resources of a worker container")
    scheduler_resources: dict[str, dict[str, str]] = Field(
        default_factory=lambda: {"requests": {"cpu": "1", "memory": "4Gi"},
                                 "limits": {"cpu": "2", "memory": "4Gi"}},
        description="Kubernetes resources of the scheduler container")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of scheduler and workers")
    env_from_secret: str | None = Field(None, description="Secret whose keys become environment (store credentials)")
    secret_env: dict[str, str] = Field(
        default_factory=dict, description="environment variables from one Secret key each: NAME -> 'SECRET/KEY' "
                                          "(e.g. SOMAFLOW_INFERENCE_TOKEN from the inference service's token)")
    service_account: str | None = Field(None, description="service account of the pods (e.g. for IRSA)")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    idle_timeout: int = Field(900, ge=0, description="seconds without work before the operator deletes the cluster")
    scheduler_service_type: str = Field("ClusterIP", pattern="^(ClusterIP|NodePort|LoadBalancer)$")


def load_kube_spec(url: str | None = None) -> KubeSpec:
    """Read a values file into a :class:`KubeSpec` (defaults when ``url`` is None).

    The file is either a chart ``values.yaml`` (its ``dask:`` mapping is used,
    completed by :func:`from_chart_values`) or a mapping of :class:`KubeSpec`
    fields.

    Raises
    ------
    InputError
        The file is missing or not a YAML mapping.
    ParameterError
        A key is unknown or a value invalid.
    """
    if url is None:
        return KubeSpec()

    data = read_yaml(url, "cluster spec", "Pass an existing values file to --cluster-spec.")
    if isinstance(data, dict) and isinstance(data.get("dask"), dict):
        data = from_chart_values(data)
    if not isinstance(data, dict):
        raise InputError(f"cluster spec {url} must be a mapping (or hold one under 'dask:').")
    data = {k: v for k, v in data.items() if not (k == "image" and not v)}
    try:
        return KubeSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ParameterError(f"bad cluster spec {where}: {first['msg']}. Fix it in {url}.") from exc


def from_chart_values(values: dict[str, Any]) -> dict[str, Any]:
    """The ``dask:`` section of chart values, completed as the chart's templates complete it.

    An empty ``image`` becomes ``images.registry/images.worker:images.tag``
    (the tag defaulting to this package's version, the chart's appVersion); an
    empty ``env_from_secret`` becomes ``objectStore.secretName``; with an
    ``inference.tokenSecret`` the workers get ``SOMAFLOW_INFERENCE_TOKEN`` from
    its ``token`` key (the key the service reads its token from).
    """
    dask = dict(values["dask"])
    images = values.get("images") if isinstance(values.get("images"), dict) else {}
    if not dask.get("image") and images:
        registry = images.get("registry") or DEFAULT_REGISTRY
        repository = images.get("worker") or WORKER_REPOSITORY
        dask["image"] = f"{registry}/{repository}:{images.get('tag') or __version__}"
    store = values.get("objectStore") if isinstance(values.get("objectStore"), dict) else {}
    if not dask.get("env_from_secret") and store.get("secretName"):
        dask["env_from_secret"] = store["secretName"]
    inference = values.get("inference") if isinstance(values.get("inference"), dict) else {}
    if inference.get("tokenSecret"):
        dask["secret_env"] = {"SOMAFLOW_INFERENCE_TOKEN": f"{inference['tokenSecret']}/token",
                              **dict(dask.get("secret_env") or {})}
    return dask


def require_operator() -> Any:
    """Import ``dask_kubernetes.operator`` or explain how to install it.

    Raises
    ------
    ParameterError
        dask-kubernetes is not installed.
    """
    try:
        from dask_kubernetes import operator
    except ImportError as exc:
        raise ParameterError(
            f"--cluster kubernetes needs dask-kubernetes, which is not installed. Run {INSTALL_HINT} "
            "or use --cluster local / tcp://HOST:PORT."
        ) from exc
    return operator


def cluster_spec(spec: KubeSpec) -> dict[str, Any]:
    """The ``DaskCluster`` resource (kubernetes.dask.org/v1) for ``spec``.

    Built with the operator's ``make_cluster_spec`` and completed with what it
    does not take: threads per worker, scheduler resources, a Secret as
    environment, service account, node selector, tolerations, namespace,
    labels, and the security settings of every pod (non-root, read-only root
    filesystem with an ``emptyDir`` for ``/tmp`` and home, no privilege
    escalation, no capabilities, the runtime's seccomp profile).

    Raises
    ------
    ParameterError
        dask-kubernetes is not installed.
    """
    operator = require_operator()
    env = {**SINGLE_THREADED_ENV, **spec.env}
    base = operator.make_cluster_spec(
        name=spec.name, image=spec.image, n_workers=spec.workers,
        resources=copy.deepcopy(spec.resources), env=env,
        idle_timeout=spec.idle_timeout, scheduler_service_type=spec.scheduler_service_type,
    )
    out = copy.deepcopy(base)
    labels = {"app.kubernetes.io/name": "somaflow", "app.kubernetes.io/component": "dask",
              "app.kubernetes.io/version": __version__}
    out["metadata"]["labels"] = labels
    if spec.namespace:
        out["metadata"]["namespace"] = spec.namespace
    worker_pod = out["spec"]["worker"]["spec"]
    scheduler_pod = out["spec"]["scheduler"]["spec"]
    worker = worker_pod["containers"][0]
    worker["args"] = list(worker["args"]) + ["--nthreads", str(spec.threads_per_worker)]
    scheduler_pod["containers"][0]["resources"] = copy.deepcopy(spec.scheduler_resources)
    for pod in (worker_pod, scheduler_pod):
        pod["securityContext"] = copy.deepcopy(POD_SECURITY_CONTEXT)
        pod["volumes"] = [*pod.get("volumes", []), copy.deepcopy(SCRATCH_VOLUME)]
        # a pod that never talks to the Kubernetes API gets no token
        pod.setdefault("automountServiceAccountToken", False)
        for container in pod["containers"]:
            container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
            container["volumeMounts"] = [*container.get("volumeMounts", []), *copy.deepcopy(SCRATCH_MOUNTS)]
        if spec.env_from_secret:
            pod["containers"][0]["envFrom"] = [{"secretRef": {"name": spec.env_from_secret}}]
        for name, ref in spec.secret_env.items():
            secret, _, key = ref.partition("/")
            pod["containers"][0].setdefault("env", []).append(
                {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}})
        if spec.service_account:
            pod["serviceAccountName"] = spec.service_account
        if spec.node_selector:
            pod["nodeSelector"] = dict(spec.node_selector)
        if spec.tolerations:
            pod["tolerations"] = copy.deepcopy(spec.tolerations)
    return out


def start_cluster(spec: KubeSpec) -> Any:
    """Create the ``DaskCluster`` through the operator and return its ``KubeCluster``.

    Needs a kubeconfig or in-cluster credentials and the operator installed in
    the cluster; the cluster is deleted when the returned object is closed.
    """
    operator = require_operator()
    resource = cluster_spec(spec)
    log.info("creating DaskCluster %s with %d workers (%s)", spec.name, spec.workers, spec.image)
    return operator.KubeCluster(custom_cluster_spec=resource, namespace=spec.namespace,
                                shutdown_on_close=True, quiet=True)
