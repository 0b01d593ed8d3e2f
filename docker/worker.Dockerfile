# syntax=docker/dockerfile:1
# somaflow's Dask scheduler / worker and flow-runner image: the library, its CPU dependencies
# (torch's CPU build) and dask-kubernetes. One image, several entry points:
#   dask scheduler | dask worker tcp://... | somaflow archive ... | prefect flow-run execute
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t REGISTRY/somaflow-worker:VERSION .
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
# torch first, from PyTorch's CPU index: PyPI's Linux wheel is the multi-GB CUDA build (its
# own layer: it changes far less often than the code below)
# hadolint ignore=DL3059
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY flows/ flows/
# not editable: the final image carries the installed package, not the source tree; "." is
# this checkout, its dependencies are pyproject.toml's
# hadolint ignore=DL3013
RUN pip install ".[kubernetes]" \
    && python -c "import somaflow, somaflow_flows, dask_kubernetes, torch; assert not torch.cuda.is_available()"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="somaflow-worker" \
      org.opencontainers.image.description="somaflow: Dask scheduler/worker and flow runner (CPU)" \
      org.opencontainers.image.source="https://github.com/somaflow/somaflow"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/somaflow --shell /usr/sbin/nologin somaflow
COPY --from=build /opt/venv /opt/venv
# the Prefect deployments' working directory (prefect.yaml: set_working_directory /opt/somaflow)
COPY flows/ /opt/somaflow/flows/
COPY docker/healthcheck.py /opt/somaflow/docker/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/somaflow \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1
WORKDIR /opt/somaflow
USER 10001:10001
# Dask scheduler, scheduler dashboard, worker dashboard
EXPOSE 8786 8787 8788
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/somaflow/docker/healthcheck.py"]
CMD ["somaflow", "--help"]
