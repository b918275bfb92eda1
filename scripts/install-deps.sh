#!/usr/bin/env bash
# Installs everything attnpilot's build, tests and demo need; idempotent (a second run
# installs nothing). Debian packages with apt-get; LibTorch (PyPI's torch) and the Python
# references into a virtual environment outside the repository:
#   ATTNPILOT_VENV (default: ~/.local/share/attnpilot/venv)
set -euo pipefail

VENV=${ATTNPILOT_VENV:-$HOME/.local/share/attnpilot/venv}
TORCH_VERSION=2.11.0

SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null; then SUDO=sudo; else
    echo "install-deps: not root and no sudo; install the packages listed in $0 by hand" >&2
  fi
fi

APT_PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  python3 python3-venv python3-pip
  libboost-dev libcli11-dev libyaml-cpp-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libsentencepiece-dev sentencepiece libgtest-dev libgmock-dev
  libzmq3-dev cppzmq-dev
  gnuplot-nox fortunes fortunes-min
  clang libclang-rt-14-dev
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "install-deps: creating virtual environment $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
if ! "$VENV/bin/python" - <<PY 2>/dev/null
import importlib, sys
import torch
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
for m in ("numpy", "safetensors", "transformers", "gymnasium", "zmq"):
    importlib.import_module(m)
PY
then
  echo "install-deps: pip install torch==$TORCH_VERSION and the Python references into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "torch==$TORCH_VERSION" numpy safetensors transformers gymnasium pyzmq
fi
echo "install-deps: ok (venv $VENV, torch $("$VENV/bin/python" -c 'import torch;print(torch.__version__)'))"
