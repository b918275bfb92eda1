#!/usr/bin/env bash
# Developer build of selected targets in a build folder of your own, one compile at a
# time (the machines have 2 cores; several people may be building at once):
#   scripts/dev-build.sh NAME [TARGET...]     -> builds build-NAME (all targets if none given)
# then e.g. `ctest --test-dir build-NAME -L perturbation --output-on-failure`. No unity build
# (quick rebuilds of one file); UNITY=ON scripts/dev-build.sh ... to check the batched build.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/dev-build.sh NAME [TARGET...]}; shift
VENV=${ATTNPILOT_VENV:-$HOME/.local/share/attnpilot/venv}
dir=build-$name
if [ ! -f "$dir/build.ninja" ]; then
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_PREFIX_PATH="$("$VENV/bin/python" -c 'import torch;print(torch.utils.cmake_prefix_path)')" \
    -DATTNPILOT_PYTHON="$VENV/bin/python" -DATTNPILOT_UNITY="${UNITY:-OFF}" >"$dir.configure.log" 2>&1 || { tail -30 "$dir.configure.log"; exit 1; }
fi
targets=()
for t in "$@"; do targets+=(--target "$t"); done
cmake --build "$dir" -j "${JOBS:-1}" "${targets[@]}"
