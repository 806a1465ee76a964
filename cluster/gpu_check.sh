#!/usr/bin/env bash
# GPU system check on one machine with the project's environment and no network (< 8 min on one
# H100): a random-init Llava at LLaVA-1.5-7B widths (2 language layers) trains and evaluates two
# built-in tasks through Ray Train + DeepSpeed ZeRO-2 + gradient checkpointing in bf16, then prints
# steps/s, tokens/s, peak GPU memory against the plan's estimate, and the accuracy matrix.
#   bash cluster/gpu_check.sh [--out DIR] [--steps N] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
if ! python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA GPU visible to torch (cluster/gpu_check.sh needs one)" >&2
  exit 2
fi
exec python workflows/gpu_check.py "$@"
