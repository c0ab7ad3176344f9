#!/usr/bin/env bash
# Shared set-up for the README's commands, sourced by dev/test.sh and dev/runcpu.sh: makes sure uv exists
# (installed with pip when missing) and syncs the virtual environment, which also compiles the rustbpe
# extension (maturin is the project's build backend). Safe to run again: uv only does what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# System packages: bubblewrap isolates the code sandbox (nanochat/execution.py), chromium drives the browser
# tests. Installed only as root with apt-get; without them those tests skip, so this never fails the set-up.
missing_packages=()
command -v bwrap >/dev/null 2>&1 || missing_packages+=(bubblewrap)
command -v chromium >/dev/null 2>&1 || missing_packages+=(chromium)
if [ ${#missing_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_packages[@]}" >/dev/null 2>&1; then
        echo "installed ${missing_packages[*]} with apt-get"
    else
        echo "note: ${missing_packages[*]} not installed (needs root and apt-get): the sandbox/browser tests will skip"
    fi
fi

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
