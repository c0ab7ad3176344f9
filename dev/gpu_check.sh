#!/usr/bin/env bash
# The GPU check (README, issue 11): run on a bare GPU machine that has PyTorch but no internet and no uv, with the
# machine's own python3; <= 8 minutes on one H100. Prints one JSON summary as its last line (and writes
# $OUT/gpu_check.json when $OUT is set). Packages the machine lacks can ride along in .gpu_vendor/ at the repo
# root (pure-Python ones, or builds for that machine's Python, e.g. unpacked cp312 wheels): it goes FIRST on
# PYTHONPATH when it exists, so a set brought together (pydantic + pydantic_core + typing_extensions) is used
# together even where the machine has an older copy of one of them. Bring only what is missing or too old.
# `bash dev/gpu_check.sh --dry_run` runs the same steps on a CPU with tiny sizes. All steps: dev/gpu_check.py.
set -uo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# .gpu_vendor/PYTHON_VERSION (e.g. "3.12"), when present, says which Python its compiled parts were built for:
# another Python (say a local --dry_run with .venv's) leaves the folder out instead of failing on it
if [ -d "$REPO/.gpu_vendor" ]; then
    WANT="$(cat "$REPO/.gpu_vendor/PYTHON_VERSION" 2>/dev/null || true)"
    HAVE="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
    if [ -z "$WANT" ] || [ "$WANT" = "$HAVE" ]; then
        export PYTHONPATH="$REPO/.gpu_vendor:$PYTHONPATH"
    else
        echo "note: .gpu_vendor/ holds packages for Python $WANT and this is Python $HAVE: not used" >&2
    fi
fi
exec "$PYTHON" dev/gpu_check.py "$@"
