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
for m in unet2d meanimage2d stneuronet convnet2p1d; do
  .venv/bin/somaflow train "$m" --out "$W/$m.safetensors"
done
# STNeuroNet: 6 more epochs from there (fresh Adam state, same crops): 12 in all
.venv/bin/somaflow train stneuronet --init "$W/stneuronet.safetensors" --lr 5e-4 --epochs 6 \
  --out "$W/stneuronet.safetensors"
for m in 3cnet 3cnet-plus lstm; do
  .venv/bin/somaflow train "$m" --out "$W/$m.safetensors" --cache "$CACHE"
done
