# syntax=docker/dockerfile:1
# The Prefect worker of the Kubernetes work pool `somaflow-kubernetes`: polls the Prefect
# server and starts each flow run as a Kubernetes Job of the worker image (the chart's base
# job template). It needs prefect and prefect-kubernetes only, not somaflow.
# Build from the repository root:
#   docker build -f docker/prefect-worker.Dockerfile -t REGISTRY/somaflow-prefect-worker:VERSION .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY docker/prefect-worker.requirements.txt /tmp/requirements.txt
RUN pip install -r /tmp/requirements.txt \
    && python -c "import prefect_kubernetes.worker"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="somaflow-prefect-worker" \
      org.opencontainers.image.description="Prefect worker (Kubernetes work pool) for somaflow" \
      org.opencontainers.image.source="https://github.com/somaflow/somaflow"
# the prefect-worker chart mounts its scratch volume at /home/prefect and runs as this uid
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/prefect --shell /usr/sbin/nologin prefect
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/somaflow/docker/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/prefect \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    PREFECT_WORKER_WEBSERVER_HOST=0.0.0.0 \
    PREFECT_WORKER_WEBSERVER_PORT=8080 \
    SOMAFLOW_HEALTHCHECK_URL=http://127.0.0.1:8080/health
WORKDIR /home/prefect
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/somaflow/docker/healthcheck.py"]
CMD ["prefect", "worker", "start", "--type", "kubernetes", "--pool", "somaflow-kubernetes", "--with-healthcheck"]
