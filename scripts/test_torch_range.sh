#!/usr/bin/env bash
# The suite and the GPU check's dry run at both ends of the supported torch range, by hand (not CI):
#   oldest   torch 2.11.0 + transformers 5.17.0 (the GPU machines'), in a virtual environment made
#            (or reused) outside the checkout;
#   current  whatever `python` is on PATH (the newest supported: torch 2.13).
# The checkout is tested through PYTHONPATH; costmodel is not installed into the venv.
#
#   scripts/test_torch_range.sh [--venv DIR] [--python PY] [--out DIR] [--skip-oldest|--skip-current] [-- PYTEST_ARGS...]
#
# The first run downloads torch (about 3 GB with its CUDA libraries); later runs reuse the venv and
# need no network. Logs go to --out (default /tmp/costmodel-torch-range). Exit status 0 only when
# every suite and dry run passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

OLDEST_TORCH=2.11.0
OLDEST_TRANSFORMERS=5.17.0
OTHERS=(networkx tabulate tqdm matplotlib sympy numpy pytest hypothesis)

VENV="${COSTMODEL_OLDEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/costmodel/venv-torch-$OLDEST_TORCH}"
BASE_PYTHON=python3
OUT=/tmp/costmodel-torch-range
RUN_OLDEST=1
RUN_CURRENT=1
PYTEST_ARGS=(-q)
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) VENV="$2"; shift 2 ;;
        --python) BASE_PYTHON="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --skip-oldest) RUN_OLDEST=0; shift ;;
        --skip-current) RUN_CURRENT=0; shift ;;
        --) shift; PYTEST_ARGS+=("$@"); break ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "test_torch_range.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUT"

versions() {   # "torch X, transformers Y" of a python, or empty when either is missing
    "$1" -c 'import torch, transformers; print(torch.__version__, transformers.__version__)' 2>/dev/null
}

ensure_oldest_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "== creating $VENV with $BASE_PYTHON"
        mkdir -p "$(dirname "$VENV")"
        "$BASE_PYTHON" -m venv "$VENV" || return 1
    fi
    local have torch_version
    have="$(versions "$VENV/bin/python")"
    torch_version="${have%% *}"
    if [ -n "$have" ] && [ "${torch_version%%+*}" = "$OLDEST_TORCH" ] && [ "${have##* }" = "$OLDEST_TRANSFORMERS" ] \
            && "$VENV/bin/python" -c "import networkx, tabulate, tqdm, matplotlib, sympy, numpy, pytest, hypothesis" 2>/dev/null; then
        echo "== reusing $VENV (torch ${have%% *}, transformers ${have##* })"
        return 0
    fi
    echo "== installing torch==$OLDEST_TORCH transformers==$OLDEST_TRANSFORMERS into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "torch==$OLDEST_TORCH" "transformers==$OLDEST_TRANSFORMERS" "${OTHERS[@]}" || return 1
}

declare -a SUMMARY=()
FAILED=0

run_env() {   # label, python: the suite, then the dry run; one summary line
    local label="$1" py="$2" bindir have suite_line suite_status gc_status t0 t1 t2
    bindir="$(dirname "$py")"
    have="$(versions "$py")"
    if [ -z "$have" ]; then
        SUMMARY+=("$(printf '%-8s %-32s %s' "$label" "-" "FAIL: $py cannot import torch and transformers")")
        FAILED=1
        return
    fi
    echo "== $label: $py, torch ${have% *}, transformers ${have##* }"
    t0=$(date +%s)
    PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$py" -m pytest "${PYTEST_ARGS[@]}" -p no:cacheprovider \
        > "$OUT/pytest-$label.log" 2>&1
    local rc=$?
    t1=$(date +%s)
    suite_line="$(grep -E '(passed|failed|error|no tests ran)' "$OUT/pytest-$label.log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
    [ -n "$suite_line" ] || suite_line="exit $rc: $(tail -1 "$OUT/pytest-$label.log")"
    if [ $rc -eq 0 ]; then suite_status="PASS"; else suite_status="FAIL"; FAILED=1; fi
    echo "   suite: $suite_status ($suite_line), $((t1 - t0)) s; log $OUT/pytest-$label.log"

    rm -rf "$OUT/gpu_check-$label"
    PATH="$bindir:$PATH" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        bash scripts/gpu_check.sh "$OUT/gpu_check-$label" --dry-run > "$OUT/gpu_check-$label.log" 2>&1
    rc=$?
    t2=$(date +%s)
    # gpu_check records a failing run and goes on (exit 0): read the runs' errors from its JSON
    local errors
    errors="$("$py" - "$OUT/gpu_check-$label/gpu_check.json" <<'EOF' 2>&1
import json, sys
try:
    runs = json.load(open(sys.argv[1]))["runs"]
except Exception as e:
    print(f"no report ({type(e).__name__}: {e})")
    sys.exit()
bad = [f"{r.get('name')}: {r['error']}" for r in runs if r.get("error")]
print("; ".join(bad) if bad else f"ok:{len(runs)}")
EOF
)"
    if [ $rc -eq 0 ] && [ "${errors%%:*}" = "ok" ]; then
        gc_status="PASS (${errors#ok:} runs)"
    else
        gc_status="FAIL (exit $rc; ${errors})"
        FAILED=1
    fi
    echo "   gpu_check --dry-run: $gc_status, $((t2 - t1)) s; log $OUT/gpu_check-$label.log"
    SUMMARY+=("$(printf '%-8s %-32s %-4s %-46s %5s s   %s' "$label" "torch ${have% *}, transformers ${have##* }" \
        "$suite_status" "($suite_line)" "$((t1 - t0))" "gpu_check --dry-run $gc_status")")
}

if [ $RUN_OLDEST -eq 1 ]; then
    if ensure_oldest_venv; then
        run_env oldest "$VENV/bin/python"
    else
        SUMMARY+=("$(printf '%-8s %s' oldest "FAIL: could not set up $VENV (torch==$OLDEST_TORCH, transformers==$OLDEST_TRANSFORMERS)")")
        FAILED=1
    fi
fi
if [ $RUN_CURRENT -eq 1 ]; then
    run_env current "$(command -v python)"
fi

echo
echo "torch range summary (checkout $ROOT; logs in $OUT)"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
if [ $FAILED -eq 0 ]; then echo "ALL PASSED"; else echo "SOME FAILED"; fi
exit $FAILED
