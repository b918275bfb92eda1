#pragma once
/// Shape helpers shared by the estimator's sampled-row score kernel (block_scores_block.cuh),
/// its selection and scatter kernels (select_block.cuh) and their launchers (block_estimator.cu).
/// Plain C++ with the CUDA qualifiers, so tests also compile it on the CPU through
/// tests/cuda_emu/cuda_emu.h (which defines ATTNPILOT_CUDA_EMU and the CUDA names used here).
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

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

}  // namespace attnpilot::attention::cuda::est
