#!/usr/bin/env bash
# The test command (README): set everything up on a fresh machine, then run the whole test suite,
# slow tests included. Extra arguments go to pytest, e.g. `bash dev/test.sh -m "not slow" -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
source dev/setup.sh bubblewrap chromium  # the developer set-up: the sandbox and browser tests need these
python -m pytest -q -ra "$@"
