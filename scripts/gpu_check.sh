#!/usr/bin/env bash
# The GPU validation of costmodel: zoo models on one CUDA GPU (inference and train, bfloat16, size
# sweeps), measured against predicted. Writes JSON, a Markdown table and plots under OUT_DIR.
#
#   scripts/gpu_check.sh [OUT_DIR] [gpu_check.py options]     # e.g. scripts/gpu_check.sh out --hw h200
#   scripts/gpu_check.sh /tmp/gc --dry-run                    # the pipeline on the CPU, tiny models
#   scripts/gpu_check.sh --dry-run                            # the same, into gpu_check_out
#   scripts/gpu_check.sh out --suite time                     # time MAPE and exponents, six architectures
#
# Kept under 8 minutes on one H100/H200: the GPU tests get 90 s, gpu_check.py starts no run after
# --budget-s (330 s by default) and this wrapper stops it at 390 s whatever happens. At most 8 files
# come out: gpu_check.json, gpu_check.md, gpu_check_plots.pdf, pytest_cuda.txt (and a calibration).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_check_out                                           # OUT_DIR may be left out: `gpu_check.sh --dry-run`
if [[ $# -gt 0 && "$1" != -* ]]; then OUT="$1"; shift; fi
export KINETO_LOG_LEVEL="${KINETO_LOG_LEVEL:-5}"         # the profiler's native log, off
export PYTHONUNBUFFERED=1                                  # progress shows even if the command is cut off
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"        # no install needed: the checkout is the package
export TRANSFORMERS_VERBOSITY="${TRANSFORMERS_VERBOSITY:-error}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
mkdir -p "$OUT"
# the GPU tests first (skipped without CUDA), at most 90 s; their summary line goes into the report
timeout --signal=INT --kill-after=10 90 python -m pytest -q -m cuda -p no:cacheprovider tests \
    > "$OUT/pytest_cuda.txt" 2>&1 || true
tail -n 3 "$OUT/pytest_cuda.txt"
timeout --signal=INT --kill-after=20 390 python scripts/gpu_check.py --out "$OUT" "$@"
echo "report: $OUT/gpu_check.md, $OUT/gpu_check.json, $OUT/gpu_check_plots.pdf, $OUT/pytest_cuda.txt"
