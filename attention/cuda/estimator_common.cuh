#pragma once
/// Shape helpers shared by the estimator's sampled-row score kernel (block_scores_block.cuh),
/// its selection and scatter kernels (select_block.cuh) and their launchers (block_estimator.cu);
/// the normalisation of per-block log2 sums shared by the pooled estimator's normaliser
/// (pooled_scores.cuh) and the selection.
/// Plain C++ with the CUDA qualifiers, so tests also compile it on the CPU through
/// tests/cuda_emu/cuda_emu.h (which defines ATTNPILOT_CUDA_EMU and the CUDA names used here).
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

namespace attnpilot::attention::cuda::est {

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Rows of query block qb (the last block may be short).
__device__ __forceinline__ int64_t block_rows(int64_t qb, int64_t n, int64_t bs) {
  const int64_t i0 = qb * bs;
  return n - i0 < bs ? n - i0 : bs;
}

// Visible key blocks of query block qb: ceil(kend / bs), kend the CPU twin's key count.
__device__ __forceinline__ int64_t visible_blocks(int64_t qb, int64_t n, int64_t m, int64_t bs,
                                                  bool causal, int64_t q_offset) {
  if (!causal) return ceil_div(m, bs);
  const int64_t end = q_offset + qb * bs + block_rows(qb, n, bs);
  return ceil_div(end < m ? end : m, bs);
}

/// The normalisation of a row of per-block log2 sums L[0, vis) (the pooled estimator's rows):
/// {M = max L, 1 / Σ 2^(L - M)}, to every lane of the warp (all 32 call it). Lane l visits
/// entries l, l + 32, ... in order (at(e, kb): L of entry kb = 32e + l), then xor trees: one
/// order, so every caller gets the same floats. kEntries > 0: the row has at most 32·kEntries
/// entries and the loops unroll (at may read registers by e); 0: a runtime loop over vis.
struct Log2RowScale {
  float max, inv_sum;
  /// The normalised score of log2 sum v: 2^(v - M) / Σ.
  __device__ __forceinline__ float operator()(float v) const { return exp2f(v - max) * inv_sum; }
};
template <int kEntries = 0, class At>
__device__ __forceinline__ Log2RowScale log2_row_scale(At&& at, int64_t vis, int lane) {
  const auto each = [&](auto&& f) {
    if constexpr (kEntries > 0) {
#pragma unroll
      for (int e = 0; e < kEntries; ++e)
        if (32 * e + lane < vis) f(at(e, 32 * e + lane));
    } else {
      int e = 0;
      for (int64_t kb = lane; kb < vis; kb += 32, ++e) f(at(e, kb));
    }
  };
  float mx = -INFINITY;
  each([&](float v) { mx = fmaxf(mx, v); });
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float l = 0.f;
  each([&](float v) { l += exp2f(v - mx); });
#pragma unroll
  for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
  return {mx, 1.f / l};
}

}  // namespace attnpilot::attention::cuda::est
