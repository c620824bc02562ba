#!/usr/bin/env bash
# GPU check for raylm's trainer, one call (under 8 minutes on an H200, compilation included): GPT-2 small on
# packed blocks (the training attention-mask path), first a plain compiled torch loop with raylm's kernels and
# optimiser (the baseline), then bf16 FSDP2 torch.compile per block through the real Ray Train loop, then a
# short fp16 run. Reports tokens/s, MFU with causal attention FLOPs (target on an H200: mfu >= 0.40) and
# ratio_vs_torch. Prints one JSON object (the last line of stdout).
#
#   bench/gpu_check.sh              on a machine with a CUDA GPU
#   bench/gpu_check.sh --dry-run    on CPU: the same code paths with the debug model (a few minutes)
#
# Python: $PYTHON, else .venv/bin/python, else python3. If raylm or its dependencies are missing it
# installs the repository (pip install -e .), which needs a package index; torch must already be a
# CUDA build for the GPU run (check: python -c "import torch; print(torch.cuda.is_available())").
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c "import torch, transformers, ray.train, safetensors, pydantic, raylm" >/dev/null 2>&1; then
  echo "[gpu_check] installing raylm and its dependencies with $PY" >&2
  "$PY" -m pip install --quiet -e . >&2 || {
    echo '{"benchmark": "gpu_check", "error": "dependencies missing and pip install -e . failed"}'
    exit 1
  }
fi

"$PY" -c "import torch; print('[gpu_check] torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" >&2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 2>/dev/null || true

exec "$PY" bench/gpu_check.py "$@"
