#!/usr/bin/env bash
# Reproduces the shipped default weights in shared/somaflow/nn/weights/ (CPU; the recipes are in
# somaflow/nn/recipes.py: presets 2p-small, 2p-dense, 2p-lowsnr, 1p-small; training seeds from 1000,
# validation seeds 1100+, never the benchmark's held-out seeds 100-102).
# The classifiers share one cache of simulated CNMF candidates (one CNMF run per session).
set -euo pipefail
cd "$(dirname "$0")/.."
W=shared/somaflow/nn/weights
CACHE=${CACHE:-.cache/train}
mkdir -p "$W" "$CACHE"
# STNeuroNet (width 16) and the U-Net learn separated targets from 64 / 96 sessions: recipes sized for
# a GPU. The shipped ones were trained on one NVIDIA H100 (torch 2.11, CUDA 13), ~6 min each with
# --jobs 5 --threads 5 (sessions simulated in parallel); on a CPU they take hours. --device auto
# takes a CUDA GPU when torch sees one.
JOBS=${JOBS:-$(nproc)}
for m in unet2d stneuronet; do
  .venv/bin/somaflow train "$m" --out "$W/$m.safetensors" --jobs "$JOBS"
done
# the centroid-target ConvNets: CPU-sized recipes
for m in meanimage2d convnet2p1d; do
  .venv/bin/somaflow train "$m" --out "$W/$m.safetensors"
done
# the shipped classifiers: candidates cached here first (96 CNMF runs), then trained on the H100 (~40 s each)
for m in 3cnet 3cnet-plus lstm; do
  .venv/bin/somaflow train "$m" --out "$W/$m.safetensors" --cache "$CACHE"
done
