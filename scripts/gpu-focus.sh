#!/usr/bin/env bash
# A short GPU run for the CUDA kernels (device tool; carry [".devdeps"]): builds only the CUDA
# test programs and benches, runs the GPU tests, then the benchmark steps in order of value,
# starting none past DEADLINE seconds, so a run whose device time is short still returns its
# first results. Logs land in $OUT (kept to a handful of files: the device tool returns few).
#   DEADLINE=330 bash scripts/gpu-focus.sh
# Knobs (environment):
#   DEADLINE      seconds after which no new step starts (default 400)
#   SPARSE_LENS   block-sparse bench lengths, one run each (default "32768 131072"; "" none)
#   DENSITIES     block-sparse bench rows, e.g. "0.1,0.05" (default "1,0.1,0.05")
#   ESTIMATOR     1: the estimator bench (default 1)
#   SVD           svd_bench sections to run, e.g. "topr tall" (default none)
#   NCU_KERNEL    a demangled-name regex: one ncu --set full profile of that kernel in the 32k
#                 sparse bench (details and per-SASS stalls), e.g. 'ws_kernel.*\(bool\)1, \(bool\)1'
#   NCU_LEN       the length ncu profiles at (default 32768)
#   NCU_DENSITIES the sparse rows ncu may profile (default "1,0.1,0.05"; -c 1 takes the first)
#   NCU_ESTIMATOR 1: ncu of one default estimator call (every kernel: duration, throughput,
#                 occupancy) into ncu-estimator.txt; full: --set full of its pooled-key scores
#                 kernel alone, with per-SASS stalls (ncu-estimator.txt, ncu-estimator-sass.csv);
#                 the profiled run calls the default estimator, w in one part, w from LibTorch's means
#   NCU_SVD       1: ncu --set full of one 128x128 batched Jacobi SVD launch (svd_bench --only
#                 square; the full-tile kernel with scaled rotations) into ncu-svd.txt and
#                 ncu-svd-sass.csv
#   NCU_SKIP      full: pooled-key kernels to skip first (1: the one-part call's, 2: its pipelined
#                 form; default 0)
#   GPU_TESTS     0: skip the GPU tests; a list of test programs: only those (default 1: all)
#   SANITIZE      a gtest filter: compute-sanitizer memcheck of the block-sparse and estimator
#                 GPU tests on it (e.g. '*Persistent*:*PooledScores*'; default none)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
DEADLINE=${DEADLINE:-400}
left() { echo $((DEADLINE - ($(date +%s) - T0))); }
step() { echo "== [$(($(date +%s) - T0))s] $*"; }
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ -f .devdeps/gpu-env.sh ]; then
  # shellcheck disable=SC1091
  source .devdeps/gpu-env.sh
else
  echo "gpu-focus: .devdeps/gpu-env.sh missing (bash ../shared/device/fetch-debs.sh, carry .devdeps)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
step configure
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DATTNPILOT_PYTHON="$(command -v python3)" >"$OUT/configure.log" 2>&1 ||
  { tail -30 "$OUT/configure.log"; exit 1; }
rm -f "$OUT/configure.log"
step build
TESTS="attention_cuda_block_sparse_test attention_cuda_estimator_test attention_cuda_decode_test attention_cuda_executor_test perturbation_jacobi_svd_cuda_test"
case "${GPU_TESTS:-1}" in 1) ;; 0) TESTS="" ;; *) TESTS="$GPU_TESTS" ;; esac
# Only what this run uses: the tests it runs, the attention bench when a step uses it, svd_bench
# when SVD or NCU_SVD is set.
BENCHES=""
[ -n "${SPARSE_LENS-32768 131072}${NCU_KERNEL:-}" ] || [ "${ESTIMATOR:-1}" = 1 ] ||
  [ "${NCU_ESTIMATOR:-0}" != 0 ] && BENCHES="attention_cuda_bench"
[ -n "${SVD:-}${NCU_SVD:-}" ] && BENCHES="$BENCHES svd_bench"
# shellcheck disable=SC2086
[ -z "$TESTS$BENCHES" ] || cmake --build build-gpu -j "$(nproc)" --target $TESTS $BENCHES -- -k 0 \
  >"$OUT/build.log" 2>&1 || grep -E "error|FAILED" "$OUT/build.log" | head -40
step tests
: >"$OUT/tests.log"
for t in $TESTS; do
  f=$(find build-gpu/tests -name "$t" -type f | head -1)
  [ -n "$f" ] || { echo "$t: not built"; continue; }
  timeout 200 "$f" >>"$OUT/tests.log" 2>&1
  echo "$t: rc=$? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/tests.log" | tail -1)"
done
grep -E "^\[  FAILED|Failure" "$OUT/tests.log" | head -10
if [ -n "${SANITIZE:-}" ] && [ "$(left)" -gt 90 ]; then
  step "compute-sanitizer memcheck ($SANITIZE)"
  CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for t in attention_cuda_block_sparse_test attention_cuda_estimator_test; do
    f=$(find build-gpu/tests -name "$t" -type f | head -1)
    [ -n "$f" ] || continue
    timeout "$(($(left) - 30))" "$CS" --tool memcheck --error-exitcode 9 "$f" \
      --gtest_filter="$SANITIZE" >"$OUT/sanitize-$t.log" 2>&1
    echo "$t: memcheck rc=$? $(grep -E "ERROR SUMMARY" "$OUT/sanitize-$t.log" | tail -1)"
  done
fi
BS=build-gpu/bench/attention_cuda_bench
for len in ${SPARSE_LENS-32768 131072}; do
  [ "$(left)" -gt 90 ] || break
  step "sparse $len"
  timeout "$(($(left) - 5))" $BS --only sparse --min-len "$len" --max-len "$len" \
    --densities "${DENSITIES:-1,0.1,0.05}" 2>&1 |
    tee "$OUT/sparse$len.log" | tail -4
done
if [ "${ESTIMATOR:-1}" = 1 ] && [ "$(left)" -gt 60 ]; then
  step estimator
  timeout "$(($(left) - 5))" $BS --only estimator 2>&1 | tee "$OUT/estimator.log" |
    grep -E "pq-|pooled|by parts" | head -12
fi
for part in ${SVD:-}; do
  [ "$(left)" -gt 60 ] || break
  step "svd $part"
  timeout "$(($(left) - 5))" build-gpu/bench/svd_bench --device cuda --full --repeats 5 \
    --only "$part" 2>&1 | tee "$OUT/svd-$part.log" | tail -12
done
if [ -n "${NCU_KERNEL:-}" ] && [ "$(left)" -gt 70 ]; then
  step ncu
  N=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout "$(($(left) - 10))" "$N" --set full --kernel-name-base demangled -k "regex:$NCU_KERNEL" \
    -c 1 --export "$OUT/prof" --force-overwrite $BS --only sparse --min-len "${NCU_LEN:-32768}" \
    --max-len "${NCU_LEN:-32768}" --densities "${NCU_DENSITIES:-1,0.1,0.05}" --no-flex \
    >/dev/null 2>&1
  "$N" -i "$OUT/prof.ncu-rep" --page details >"$OUT/ncu.txt" 2>&1
  "$N" -i "$OUT/prof.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu-sass.csv" 2>&1
  rm -f "$OUT/prof.ncu-rep"
  grep -E "Duration|Issue Slots Busy|highest-utilized" "$OUT/ncu.txt" | head -4
fi
if [ "${NCU_ESTIMATOR:-0}" = full ] && [ "$(left)" -gt 60 ]; then
  step "ncu estimator (full, pooled-key scores kernel)"
  N=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout "$(($(left) - 10))" "$N" --profile-from-start off --set full -k regex:pooled_keys \
    -s "${NCU_SKIP:-0}" -c 1 --export "$OUT/prof-est" --force-overwrite $BS --only estimator-profile >/dev/null 2>&1
  "$N" -i "$OUT/prof-est.ncu-rep" --page details >"$OUT/ncu-estimator.txt" 2>&1
  "$N" -i "$OUT/prof-est.ncu-rep" --page source --csv --print-source sass \
    >"$OUT/ncu-estimator-sass.csv" 2>&1
  rm -f "$OUT/prof-est.ncu-rep"
  grep -E "Duration|Issue Slots Busy|highest-utilized|Achieved Occupancy" "$OUT/ncu-estimator.txt" |
    head -6
elif [ "${NCU_ESTIMATOR:-0}" = 1 ] && [ "$(left)" -gt 40 ]; then
  step "ncu estimator"
  N=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout "$(($(left) - 5))" "$N" --profile-from-start off --section SpeedOfLight \
    --section LaunchStats --section Occupancy $BS --only estimator-profile \
    >"$OUT/ncu-estimator.txt" 2>&1
  grep -E "^  [a-zA-Z_].*\(|Duration|Registers Per|Achieved Occupancy|Memory Through|Compute \(SM\) Thr" \
    "$OUT/ncu-estimator.txt" | head -80
fi
if [ "${NCU_SVD:-0}" = 1 ] && [ "$(left)" -gt 60 ]; then
  step "ncu svd (128x128 Jacobi kernel)"
  N=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
  timeout "$(($(left) - 10))" "$N" --set full --kernel-name-base demangled \
    -k 'regex:jacobi_svd_kernel.*\(bool\)0, \(bool\)1, \(bool\)1>' -c 1 --export "$OUT/prof-svd" --force-overwrite \
    build-gpu/bench/svd_bench --device cuda --full --repeats 1 --only square >/dev/null 2>&1
  "$N" -i "$OUT/prof-svd.ncu-rep" --page details >"$OUT/ncu-svd.txt" 2>&1
  "$N" -i "$OUT/prof-svd.ncu-rep" --page source --csv --print-source sass >"$OUT/ncu-svd-sass.csv" 2>&1
  rm -f "$OUT/prof-svd.ncu-rep"
  grep -E "Duration|Issue Slots Busy|highest-utilized|Achieved Occupancy" "$OUT/ncu-svd.txt" | head -6
fi
step finished
