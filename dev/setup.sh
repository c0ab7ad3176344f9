#!/usr/bin/env bash
# The one set-up, sourced by the commands people type, each naming what it needs:
#     source dev/setup.sh --no-dev bubblewrap    # speedrun.sh / run1000.sh: a training node
#     source dev/setup.sh bubblewrap chromium    # dev/test.sh: the developer set-up (sandbox and browser tests)
#     source dev/setup.sh                        # dev/runcpu.sh: the CPU demo (it runs no sandboxed code)
# Arguments: Debian packages to apt-get install when missing (only as root; without them the sandbox runs with
# reduced isolation and the browser tests skip, so this never fails the set-up), and --no-dev to leave out the
# developer packages (pytest, playwright, ...) that a training node does not need. Then: uv (installed with pip
# when missing) and `uv sync --frozen`, which creates .venv with the locked packages and compiles the rustbpe
# extension (maturin is the project's build backend); .venv is activated. Safe to run again: uv only does what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on some CI machines) and no bytecode in .venv, every
# process that builds a model recompiled torch._dynamo's sources: +5 s of CPU each (9.3 s against 4.3 s for a
# meta-device normal_ on a 2-core AMD EPYC). Compiling torch's files once takes ~15 s of CPU there.
sync_args=(--frozen --compile-bytecode)
missing_packages=()
for package in "$@"; do
    case "$package" in
        --no-dev) sync_args+=(--no-dev --inexact) ;;  # --inexact: a developer's extra packages stay installed
        bubblewrap) command -v bwrap >/dev/null 2>&1 || missing_packages+=(bubblewrap) ;;
        *) command -v "$package" >/dev/null 2>&1 || missing_packages+=("$package") ;;
    esac
done
if [ ${#missing_packages[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq >/dev/null 2>&1 \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing_packages[@]}" >/dev/null 2>&1; then
        echo "installed ${missing_packages[*]} with apt-get"
    else
        echo "note: ${missing_packages[*]} not installed (needs root and apt-get): without bubblewrap the code" \
             "sandbox has reduced isolation, without chromium the browser tests skip"
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

uv sync "${sync_args[@]}"
source .venv/bin/activate
