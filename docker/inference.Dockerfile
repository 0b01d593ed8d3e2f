# syntax=docker/dockerfile:1
# somaflow's GPU inference service: `somaflow serve` (NVIDIA Triton through nvidia-pytriton,
# with somaflow's CNNs) on a CUDA base. The image IS the service environment (numpy<2,
# nvidia-pytriton, torch's CUDA build, somaflow installed --no-deps), so SOMAFLOW_SERVE_PYTHON
# points at its own interpreter.
#
# Why a CUDA base and not the official tritonserver image: the service runs Triton through
# nvidia-pytriton, whose wheel ships its own tritonserver with the Python backend; the
# official image would add a second, unused Triton (and its ~10 GB) beside it. The base is
# CUDA's smallest ("base": cudart and the driver interface only) because torch's wheel brings
# cuBLAS/cuDNN itself; Ubuntu 22.04's python3.10 comes with the shared libpython that Triton's
# Python-backend stub loads (no LD_LIBRARY_PATH games as with a pyenv interpreter).
# Build from the repository root:
#   docker build -f docker/inference.Dockerfile -t REGISTRY/somaflow-inference:VERSION .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10 python3.10-venv libpython3.10 \
    && rm -rf /var/lib/apt/lists/* \
    && python3.10 -m venv /opt/venv
WORKDIR /src
# the service environment (issue 23's services/inference/requirements.txt: numpy<2,
# nvidia-pytriton, torch with CUDA from PyPI, ...), then somaflow itself without its deps
COPY services/inference/requirements.txt services/inference/requirements.txt
RUN pip install -r services/inference/requirements.txt
COPY pyproject.toml README.md ./
COPY shared/ shared/
COPY flows/ flows/
COPY services/ services/
RUN pip install --no-deps . \
    && python -c "import numpy, pytriton, torch, somaflow.nn; assert numpy.__version__ < '2'"

FROM ${CUDA_IMAGE}
LABEL org.opencontainers.image.title="somaflow-inference" \
      org.opencontainers.image.description="somaflow's CNNs served by NVIDIA Triton (GPU)" \
      org.opencontainers.image.source="https://github.com/somaflow/somaflow"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10 libpython3.10 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/somaflow --shell /usr/sbin/nologin somaflow
COPY --from=build /opt/venv /opt/venv
COPY docker/healthcheck.py /opt/somaflow/docker/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/somaflow \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SOMAFLOW_SERVE_PYTHON=/opt/venv/bin/python \
    SOMAFLOW_HEALTHCHECK_URL=http://127.0.0.1:8000/v2/health/ready \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/somaflow
USER 10001:10001
# Triton: HTTP (Open Inference Protocol), gRPC, Prometheus metrics
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "/opt/somaflow/docker/healthcheck.py"]
# `python -m somaflow_service` takes `somaflow serve`'s options; the somaflow CLI itself needs dask
# and prefect, which this environment (numpy<2) does not hold
ENTRYPOINT ["python", "-m", "somaflow_service"]
CMD ["--host", "0.0.0.0", "--http-port", "8000", "--device", "cuda"]
