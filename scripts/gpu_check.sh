#!/usr/bin/env bash
# The GPU validation of costmodel: zoo models on one CUDA GPU (inference and train, bfloat16, size
# sweeps), measured against predicted. Writes JSON, a Markdown table and plots under OUT_DIR.
#
#   scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options]     # e.g. scripts/gpu_check.sh out --hw h200
#   scripts/gpu_check.sh /tmp/gc --dry-run                    # the pipeline on the CPU, tiny models
#
# Kept under 8 minutes on one H100/H200: gpu_check.py starts no run after --budget-s (420 s by
# default) and this wrapper stops it at 480 s whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_out}"
shift || true
export KINETO_LOG_LEVEL="${KINETO_LOG_LEVEL:-5}"         # the profiler's native log, off
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
mkdir -p "$OUT"
timeout --signal=INT --kill-after=20 480 python scripts/gpu_check.py --out "$OUT" "$@"
echo "report: $OUT/gpu_check.md, $OUT/gpu_check.json, plots $OUT/*.png"
