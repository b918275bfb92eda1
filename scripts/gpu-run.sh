#!/usr/bin/env bash
# The one script for the project's GPU machine (device tool; see README "Building on a GPU
# machine"). Builds against the machine's PyTorch LibTorch + CUDA, runs every test and the
# benchmarks named in BENCHES, and leaves logs under $OUT (or ./gpu-out).
#   carry: [".devdeps"]   command: bash scripts/gpu-run.sh
# CTEST_ARGS narrows the tests (e.g. "-R Cuda|Tall|TopR|Emulat"), BUILD_ARGS the build targets.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -f .devdeps/gpu-env.sh ]; then
  # shellcheck disable=SC1091
  source .devdeps/gpu-env.sh
else
  export CMAKE_PREFIX_PATH="$(python3 -c 'import torch;print(torch.utils.cmake_prefix_path)')"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv >"$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
start=$(date +%s)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTNPILOT_PYTHON="$(command -v python3)" \
  ${CMAKE_ARGS:-} >"$OUT/configure.log" 2>&1 || { tail -40 "$OUT/configure.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" ${BUILD_ARGS:-} >"$OUT/build.log" 2>&1 || { grep -E "error|Error|FAILED" "$OUT/build.log" | head -40; [ -n "${KEEP_GOING:-}" ] || exit 1; }
echo "build: $(( $(date +%s) - start )) s"
(cd build-gpu && ctest --output-on-failure --timeout 600 -j 4 ${CTEST_ARGS:-} >"$OUT/ctest.log" 2>&1)
rc=$?
grep -E "tests passed|tests failed|Failed|\*\*\*|SKIPPED|Skipped" "$OUT/ctest.log" | tail -30
# BENCHES: names, each optionally with its own arguments after a colon, commas for spaces, e.g.
#   BENCHES="svd_bench:--device,cuda,--full,--repeats,5,--no-tracking attention_cuda_bench:--only,estimator"
# (BENCH_ARGS, if set, is added to every bench without its own arguments).
for spec in ${BENCHES:-}; do
  b=${spec%%:*}
  args=${BENCH_ARGS:-}
  [ "$spec" != "$b" ] && args=${spec#*:} && args=${args//,/ }
  if [ -x "build-gpu/bench/$b" ]; then
    echo "== $b $args"
    # shellcheck disable=SC2086
    timeout 300 "build-gpu/bench/$b" $args 2>&1 | tee "$OUT/$b.log" | tail -40
  else
    echo "== $b: not built (build-gpu/bench/$b missing)"
  fi
done
exit $rc
