#!/usr/bin/env bash
# The GPU check (dev/gpu_check.py says what it runs): speedrun.sh in miniature on CUDA, in at most 8 minutes. The
# last line of output is one JSON summary (also $OUT/gpu_check.json); exit status 0 when every stage passed.
#
#     bash dev/gpu_check.sh                  # on a GPU machine
#     bash dev/gpu_check.sh --dry_run        # any CPU: every stage at tiny sizes (the test suite runs this)
#
# Which Python: the locked .venv when its torch can use the GPU, else the machine's python3 (a lent GPU machine has
# PyTorch but no internet and no uv); PYTHON=... chooses one, and the summary says which and why. Packages python3
# lacks can ride along in .gpu_vendor/ (filled by `bash dev/gpu_check.sh --vendor=3.12`, see dev/gpu_vendor.sh).
set -uo pipefail
export GPU_CHECK_T0="$(date +%s.%N)"  # the time limit counts from here
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

for arg in "$@"; do
    case "$arg" in
        --vendor=*) exec bash dev/gpu_vendor.sh "${arg#*=}" ;;
        --dry_run) DRY_RUN=1 ;;
    esac
done

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ] && [ -n "${DRY_RUN:-}" ]; then
        PYTHON=.venv/bin/python WHY="the locked environment (.venv)"
    elif [ -x .venv/bin/python ] && CHECK="$(.venv/bin/python -m nanochat.common --device_type=cuda 2>&1)"; then
        PYTHON=.venv/bin/python WHY="the locked environment (.venv): $CHECK"
    elif [ -x .venv/bin/python ]; then
        PYTHON=python3 WHY="$(command -v python3): the locked environment (.venv) cannot use the GPU: ${CHECK##*$'\n'}"
    else
        PYTHON=python3 WHY="$(command -v python3): there is no .venv (\`uv sync --frozen\` makes it, given the network)"
    fi
else
    WHY="PYTHON=$PYTHON, as set"
fi
export GPU_CHECK_PYTHON_WHY="$WHY"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .gpu_vendor ] && [ "$PYTHON" != .venv/bin/python ]; then
    WANT="$(cat .gpu_vendor/PYTHON_VERSION 2>/dev/null || true)"
    HAVE="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ -z "$WANT" ] || [ "$WANT" = "$HAVE" ]; then
        export PYTHONPATH="$REPO/.gpu_vendor:$PYTHONPATH"
    else
        echo "note: .gpu_vendor/ holds packages for Python $WANT and this is Python $HAVE: not used" >&2
    fi
fi
echo "python: $PYTHON ($WHY)"
exec "$PYTHON" dev/gpu_check.py "$@"
