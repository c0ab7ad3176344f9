#!/usr/bin/env bash
# Fill .gpu_vendor/ for dev/gpu_check.sh on a GPU machine whose python has PyTorch but not the rest and cannot
# reach a package registry. Run it HERE, where PyPI is reachable, with that machine's Python version:
#
#     bash dev/gpu_vendor.sh 3.12          # (or: bash dev/gpu_check.sh --vendor=3.12)
#
# It unpacks that Python's wheels (manylinux x86-64) of the chat server and its client (fastapi, uvicorn, pydantic,
# openai and what they import, as uv.lock pins them), and rustbpe when that python is here to build it (else the
# check's tokenizer stage uses GPT-4's ranks). .gpu_vendor/PYTHON_VERSION says for which Python: compiled packages
# are the reason for all this (a pydantic_core from a .venv of another Python does not import).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="${1:?usage: bash dev/gpu_vendor.sh PYTHON_VERSION, the version of the GPU machine python, e.g. 3.12}"
ROOTS="fastapi uvicorn openai"  # the server and the client; everything they need comes along, as uv.lock pins it
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT

# the closure of ROOTS in uv.lock, with its environment markers evaluated for the target Python on x86-64 Linux
python3 - "$VERSION" $ROOTS > "$WHEELS/requirements.txt" <<'PYTHON'
import sys
import tomllib
try:
    from packaging.markers import Marker, default_environment
except ImportError:  # a bare python3: pip carries its own copy
    from pip._vendor.packaging.markers import Marker, default_environment
version, roots = sys.argv[1], sys.argv[2:]
environment = default_environment() | {"python_version": version, "python_full_version": f"{version}.0",
                                        "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}
applies = lambda marker: not marker or Marker(marker).evaluate(environment)
with open("uv.lock", "rb") as f:
    packages = tomllib.load(f)["package"]
pinned, todo = {}, [(name, None) for name in roots]
while todo:
    name, version_wanted = todo.pop()
    if name in pinned:
        continue
    package = next(p for p in packages if p["name"] == name and version_wanted in (None, p["version"])
                   and any(applies(m) for m in p.get("resolution-markers", [""])))
    pinned[name] = package["version"]
    todo += [(d["name"], d.get("version")) for d in package.get("dependencies", []) if applies(d.get("marker"))]
print("\n".join(f"{name}=={version}" for name, version in sorted(pinned.items())))
PYTHON
PIP=(python3 -m pip)
python3 -m pip --version >/dev/null 2>&1 || PIP=(uvx pip)  # a uv-made venv has no pip
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version "$VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -r "$WHEELS/requirements.txt" -d "$WHEELS"
if command -v "python$VERSION" >/dev/null 2>&1; then
    maturin build --release --interpreter "python$VERSION" --out "$WHEELS" >/dev/null
else
    echo "note: no python$VERSION here to build rustbpe for; the check's tokenizer stage will use GPT-4's ranks"
fi

rm -rf .gpu_vendor
mkdir -p .gpu_vendor
for wheel in "$WHEELS"/*.whl; do
    python3 -m zipfile -e "$wheel" .gpu_vendor/
done
echo "$VERSION" > .gpu_vendor/PYTHON_VERSION
echo "filled .gpu_vendor/ for Python $VERSION ($(du -sh .gpu_vendor | cut -f1)): $(ls "$WHEELS" | grep -c whl) wheels"
echo "a device run carries it: carry=[\".gpu_vendor\"] (it is git-ignored)"
