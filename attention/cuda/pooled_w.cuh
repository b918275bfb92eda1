#pragma once
/// Block-level device code of the pooled estimator's first step on the stored keys
/// (block_estimator.cu's pooled_w_kernel is a thin wrapper around pooled_w_block): for each
/// query block qb of head (b, h), its mean query and w = A_k (A_qᵀ q̄ · scale), the d-vector
/// pooled_keys_mma.cuh scores the stored keys with:
///
///   q [rows of qb × d] ──16-byte loads, fp32 sums: (threads of one column chunk) × (row lanes)
///       ──► shared partial sums [row lanes × d] ──► q̄ [d] (÷ rows; the last block may be short)
///   t = scale · A_qᵀ q̄   [r]   (one thread per rank column, d FMAs)
///   w = A_k t            [d]   (one thread per element, r FMAs) ──► w[b, h, qb, :] fp32
///
/// One kernel instead of LibTorch's block-mean reduction, two cuBLAS products and a scaling
/// (four launches; the products followed LibTorch's TF32 matmul setting, this is plain fp32).
/// q is read once, kWBlocks query blocks per CTA, so a CTA's reads of A_q and A_k (2·d·r floats)
/// are shared by its blocks. Plain C++ with the CUDA qualifiers: tests also run it on the CPU
/// through tests/cuda_emu/cuda_emu.h.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

#include "attention/cuda/block_estimator_kernels.h"

namespace attnpilot::attention::cuda::pooled_w {

/// Threads of a CTA and query blocks per CTA.
inline constexpr int kThreads = 256;
inline constexpr int kWBlocks = 4;
/// Largest rank (columns of A_q, A_k) the kernel takes.
inline constexpr int kMaxRank = kPooledWMaxRank;

/// q elements per 16-byte load, column chunks of a row, and row lanes of the CTA.
template <typename T, int D>
struct Geometry {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kChunks = D / kVec;
  static constexpr int kRowLanes = kThreads / kChunks;
  static_assert(D % kVec == 0 && kThreads % kChunks == 0, "d a multiple of 16 bytes' elements");
};

/// Shared memory of a CTA (floats): the row lanes' partial sums, the mean, t.
template <typename T, int D>
__host__ __device__ constexpr int shared_floats() {
  return Geometry<T, D>::kRowLanes * D + D + kMaxRank;
}

/// 16 bytes of q (kVec elements) as floats, added to acc.
template <typename T, int V>
__device__ __forceinline__ void add_vec(const T* src, float (&acc)[V]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(src);
    acc[0] += v.x;
    acc[1] += v.y;
    acc[2] += v.z;
    acc[3] += v.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      T pair[2];
      static_assert(sizeof(pair) == sizeof(uint32_t), "two 16-bit elements per word");
      __builtin_memcpy(pair, &words[i], sizeof(pair));
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        acc[2 * i] += __bfloat162float(pair[0]);
        acc[2 * i + 1] += __bfloat162float(pair[1]);
      } else {
        acc[2 * i] += __half2float(pair[0]);
        acc[2 * i + 1] += __half2float(pair[1]);
      }
    }
  }
}

/// One CTA (kThreads threads, all of which call it: it holds barriers): query blocks
/// group·kWBlocks .. + kWBlocks - 1 (those < q_blocks) of head h of batch entry b. `smem`:
/// shared_floats<T, D>() floats.
template <typename T, int D>
__device__ inline void pooled_w_block(const PooledWLaunch& p, int64_t group, int64_t h, int64_t b,
                                      float* smem) {
  using G = Geometry<T, D>;
  float* partial = smem;                  // [kRowLanes][D]
  float* mean = smem + G::kRowLanes * D;  // [D]
  float* t = mean + D;                    // [kMaxRank]
  const int tid = threadIdx.x, lane_r = tid / G::kChunks, chunk = tid % G::kChunks;
  const T* qh = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const int64_t ab = p.a_batch > 1 ? b : 0;
  const float* aq = p.a_q + ab * p.a_q_stride[0] + h * p.a_q_stride[1];
  const float* ak = p.a_k + ab * p.a_k_stride[0] + h * p.a_k_stride[1];
  const int64_t bs = p.block_size;
  for (int j = 0; j < kWBlocks; ++j) {
    const int64_t qb = group * kWBlocks + j;
    if (qb >= p.q_blocks) break;  // CTA-uniform
    const int64_t row0 = qb * bs;
    const int64_t rows = p.n - row0 < bs ? p.n - row0 : bs;
    float acc[G::kVec] = {};
    // Eight loads in flight per thread where the block has the rows (a full block of 128 rows
    // and d = 128 in 16-bit: exactly eight per thread).
    for (int64_t r0 = lane_r; r0 < rows; r0 += 8 * G::kRowLanes) {
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const int64_t r = r0 + u * G::kRowLanes;
        if (r < rows) add_vec<T>(qh + (row0 + r) * p.q_stride[2] + chunk * G::kVec, acc);
      }
    }
#pragma unroll
    for (int e = 0; e < G::kVec; ++e) partial[lane_r * D + chunk * G::kVec + e] = acc[e];
    __syncthreads();
    if (tid < D) {
      float s = 0.f;
      for (int l = 0; l < G::kRowLanes; ++l) s += partial[l * D + tid];
      mean[tid] = s / static_cast<float>(rows);
    }
    __syncthreads();
    if (tid < p.rank) {
      float s = 0.f;
      for (int i = 0; i < D; ++i) s = fmaf(mean[i], aq[i * p.a_q_stride[2] + tid], s);
      t[tid] = s * p.scale;
    }
    __syncthreads();
    if (tid < D) {
      const float* row = ak + tid * p.a_k_stride[2];
      float s = 0.f;
      for (int k = 0; k < p.rank; ++k) s = fmaf(row[k], t[k], s);
      p.w[((b * p.heads + h) * p.q_blocks + qb) * D + tid] = s;
    }
    __syncthreads();  // partial, mean and t are rewritten by the next block
  }
}

}  // namespace attnpilot::attention::cuda::pooled_w
