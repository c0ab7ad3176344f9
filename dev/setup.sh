#!/usr/bin/env bash
# Shared set-up for the README's commands, sourced by dev/test.sh and dev/runcpu.sh: makes sure uv exists
# (installed with pip when missing) and syncs the virtual environment, which also compiles the rustbpe
# extension (maturin is the project's build backend). Safe to run again: uv only does what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1; then
    [ -f "$HOME/.cargo/env" ] && source "$HOME/.cargo/env"
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: a Rust toolchain (cargo) is needed to build rustbpe; install it from https://rustup.rs" >&2
    exit 1
fi

if ! command -v uv >/dev/null 2>&1; then
    echo "uv not found; installing it with pip"
    python3 -m pip install --quiet uv || python3 -m pip install --quiet --user uv
    export PATH="$HOME/.local/bin:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
fi

uv sync --frozen
source .venv/bin/activate
