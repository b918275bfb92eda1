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
/// (four launches; the products followed LibTorch's TF32 matmul setting, this is plain fp32),
/// the default (CudaEstimatorOptions::pooled_w_kernel). History (H100, 2026-12-06): one load in
/// flight per thread, 139 and 148 µs against LibTorch's ~118; eight in flight and 4 blocks per
/// CTA, faster at r = 16, slower at r = 32 (A staged once per 4 blocks); this form (up to 16
/// blocks per CTA, the next block's loads in flight across the reduction, one barrier per
/// block, A_k staged transposed so the products read shared memory without bank conflicts)
/// 106-108 µs at L = 32k, r = 16 (ncu), against LibTorch's 98 µs of means plus 21 of products.
/// q is read once, up to kWBlocks query blocks per CTA, so a CTA's reads of A_q and A_k (2·d·r
/// floats, staged in shared memory) are shared by its blocks. The products alone, on means
/// LibTorch formed, are pooled_w_products_block (the fallback where q's rows are not 16-byte
/// aligned). Plain C++ with the CUDA qualifiers:
/// tests also run it on the CPU through tests/cuda_emu/cuda_emu.h.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/projection_block.cuh"

namespace attnpilot::attention::cuda::pooled_w {

/// Threads of a CTA and the most query blocks per CTA of pooled_w_block (PooledWLaunch::
/// blocks_per_cta).
inline constexpr int kThreads = 256;
inline constexpr int kWBlocks = 16;
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

/// Shared memory of a CTA (floats) at rank r: the row lanes' partial sums (two buffers), up to
/// kWBlocks means, A_q and A_k (d × r each), t (kWBlocks × r).
template <typename T, int D>
__host__ __device__ constexpr int shared_floats(int r) {
  return 2 * Geometry<T, D>::kRowLanes * D + kWBlocks * D + 2 * D * r + kWBlocks * r;
}

/// Query blocks per CTA of the products kernel (pooled_w_products_block).
inline constexpr int kProductBlocks = 32;

/// Shared memory (floats) of pooled_w_products_block at rank r: the means, A_q, A_k and t.
template <int D>
__host__ __device__ constexpr int products_shared_floats(int r) {
  return kProductBlocks * D + 2 * D * r + kProductBlocks * r;
}

/// A_q of head (b, h) into aq_s [D][r] (row i, column k at i·r + k) and A_k transposed into
/// ak_s [r][D] (column k, row i at k·D + i): the layouts in which products() reads both without
/// bank conflicts. All kThreads threads; the caller synchronises.
template <int D>
__device__ __forceinline__ void stage_a(const PooledWLaunch& p, int64_t h, int64_t b, float* aq_s,
                                        float* ak_s) {
  const int r = p.rank;
  const int64_t ab = p.a_batch > 1 ? b : 0;
  const float* aq = p.a_q + ab * p.a_q_stride[0] + h * p.a_q_stride[1];
  const float* ak = p.a_k + ab * p.a_k_stride[0] + h * p.a_k_stride[1];
  for (int e = threadIdx.x; e < D * r; e += kThreads) {
    const int i = e / r, k = e - (e / r) * r;
    aq_s[e] = aq[i * p.a_q_stride[2] + k * p.a_q_stride[3]];
    ak_s[k * D + i] = ak[i * p.a_k_stride[2] + k * p.a_k_stride[3]];
  }
}

/// w of `blocks` query blocks from their means (mean_s [blocks][D], shared): t[j][k] = scale ·
/// Σ_i mean[j][i] A_q[i][k] (one thread per (j, k); a warp reads A_q's consecutive columns and
/// one or two broadcast means), then w[j][i] = Σ_k A_k[i][k] t[j][k] (one thread per (j, i):
/// consecutive i, conflict-free in ak_s's transposed layout), written to w[b, h, qb0 + j, :]. All
/// kThreads threads (one barrier).
template <int D>
__device__ __forceinline__ void products(const PooledWLaunch& p, int64_t h, int64_t b, int64_t qb0,
                                         int blocks, const float* mean_s, const float* aq_s,
                                         const float* ak_s, float* t_s) {
  const int r = p.rank, tid = threadIdx.x;
  for (int e = tid; e < blocks * r; e += kThreads) {
    const int j = e / r, k = e - (e / r) * r;
    float s[4] = {};  // four chains (one would wait on each FMA's latency)
#pragma unroll 8
    for (int i = 0; i < D; ++i) s[i % 4] = fmaf(mean_s[j * D + i], aq_s[i * r + k], s[i % 4]);
    t_s[e] = ((s[0] + s[1]) + (s[2] + s[3])) * p.scale;
  }
  __syncthreads();
  float* w = p.w + ((b * p.heads + h) * p.q_blocks + qb0) * D;
  for (int e = tid; e < blocks * D; e += kThreads) {
    const int j = e / D, i = e % D;
    float s = 0.f;
    for (int k = 0; k < r; ++k) s = fmaf(ak_s[k * D + i], t_s[j * r + k], s);
    w[e] = s;
  }
}

/// 16 bytes of q (V elements of T) as loaded, added to acc as floats (projection_block.cuh's
/// piece_elem: bit operations, no local copy).
template <typename T, int V>
__device__ __forceinline__ void add_vec(const uint4& raw, float (&acc)[V]) {
#pragma unroll
  for (int u = 0; u < V; ++u) acc[u] += proj::piece_elem<T>(raw, u);
}

/// One CTA (kThreads threads, all of which call it: it holds barriers): query blocks
/// group·per .. + per - 1 (those < q_blocks; per = p.blocks_per_cta, 1 to kWBlocks) of head h
/// of batch entry b. `smem`: shared_floats<T, D>(p.rank) floats. Three phases, so the reads of q
/// stream without waiting on the products: A_q and A_k into shared memory; the blocks' means;
/// then t and w of all the blocks from shared memory. Each block's first eight loads per thread
/// are issued before the previous block's reduction (one barrier per block: the row lanes'
/// partial sums alternate between two buffers), so a CTA keeps reading across its barriers.
template <typename T, int D>
__device__ inline void pooled_w_block(const PooledWLaunch& p, int64_t group, int64_t h, int64_t b,
                                      float* smem) {
  using G = Geometry<T, D>;
  const int r = p.rank;
  float* partial = smem;                         // [2][kRowLanes][D]
  float* mean = partial + 2 * G::kRowLanes * D;  // [kWBlocks][D]
  float* aq_s = mean + kWBlocks * D;             // [D][r]
  float* ak_s = aq_s + D * r;                    // [r][D]
  float* t = ak_s + D * r;                       // [kWBlocks][r]
  const int tid = threadIdx.x, lane_r = tid / G::kChunks, chunk = tid % G::kChunks;
  const T* qh = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const int64_t bs = p.block_size, per = p.blocks_per_cta, qb0 = group * per;
  const int blocks = static_cast<int>(p.q_blocks - qb0 < per ? p.q_blocks - qb0 : per);
  const int64_t step = int64_t(G::kRowLanes) * p.q_stride[2];
  const auto rows_of = [&](int j) {
    const int64_t row0 = (qb0 + j) * bs;
    return p.n - row0 < bs ? p.n - row0 : bs;
  };
  const auto src_of = [&](int j) {
    return qh + ((qb0 + j) * bs + lane_r) * p.q_stride[2] + chunk * G::kVec;
  };
  // Eight 16-byte loads in flight per thread (all issued before any is used: loading and adding
  // row by row kept one in flight, 58% of DRAM bandwidth; ncu, H100), rows r0 + u·kRowLanes of
  // the block from src, zeros past its rows (a full block of 128 rows and d = 128 in 16-bit:
  // exactly eight per thread).
  const auto load8 = [&](const T* src, int64_t r0, int64_t rows, uint4(&raw)[8]) {
    const auto load = [&](int u) { return *reinterpret_cast<const uint4*>(src + u * step); };
    if (r0 + 7 * G::kRowLanes < rows) {  // warp-uniform in a full block: no predicates
#pragma unroll
      for (int u = 0; u < 8; ++u) raw[u] = load(u);
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u)
        raw[u] = r0 + u * G::kRowLanes < rows ? load(u) : make_uint4(0u, 0u, 0u, 0u);
    }
  };
  uint4 raw[8];
  if (blocks > 0) load8(src_of(0), lane_r, rows_of(0), raw);  // block 0's first loads
  stage_a<D>(p, h, b, aq_s, ak_s);
  for (int j = 0; j < blocks; ++j) {
    const int64_t rows = rows_of(j);
    float acc[G::kVec] = {};
#pragma unroll
    for (int u = 0; u < 8; ++u) add_vec<T>(raw[u], acc);
    // Blocks taller than eight row lanes' rounds: the rest of this block's rows.
    const T* src = src_of(j) + 8 * step;
    for (int64_t r0 = lane_r + 8 * G::kRowLanes; r0 < rows;
         r0 += 8 * G::kRowLanes, src += 8 * step) {
      load8(src, r0, rows, raw);
#pragma unroll
      for (int u = 0; u < 8; ++u) add_vec<T>(raw[u], acc);
    }
    if (j + 1 < blocks) load8(src_of(j + 1), lane_r, rows_of(j + 1), raw);  // in flight below
    float* part = partial + (j % 2) * G::kRowLanes * D;
#pragma unroll
    for (int e = 0; e < G::kVec; ++e) part[lane_r * D + chunk * G::kVec + e] = acc[e];
    __syncthreads();  // (also: every thread is past block j - 1's reads of the other buffer)
    if (tid < D) {
      float s = 0.f;
#pragma unroll 8
      for (int l = 0; l < G::kRowLanes; ++l) s += part[l * D + tid];
      mean[j * D + tid] = s / static_cast<float>(rows);
    }
  }
  __syncthreads();  // the means (and A) are read below
  products<D>(p, h, b, qb0, blocks, mean, aq_s, ak_s, t);
}

/// One CTA (kThreads threads, all of which call it: it holds barriers): w of query blocks
/// group·kProductBlocks .. + kProductBlocks - 1 (those < q_blocks) of head h of batch entry b
/// from their means p.means [batch, heads, q_blocks, D] fp32 (LibTorch's block means): the
/// products alone, in place of two cuBLAS products and a scaling (three launches). `smem`:
/// products_shared_floats<D>(p.rank) floats.
template <int D>
__device__ inline void pooled_w_products_block(const PooledWLaunch& p, int64_t group, int64_t h,
                                               int64_t b, float* smem) {
  const int r = p.rank;
  float* mean = smem;                       // [kProductBlocks][D]
  float* aq_s = mean + kProductBlocks * D;  // [D][r]
  float* ak_s = aq_s + D * r;               // [r][D]
  float* t = ak_s + D * r;                  // [kProductBlocks][r]
  const int64_t qb0 = group * kProductBlocks;
  const int blocks =
      static_cast<int>(p.q_blocks - qb0 < kProductBlocks ? p.q_blocks - qb0 : kProductBlocks);
  const float* src = p.means + ((b * p.heads + h) * p.q_blocks + qb0) * D;
  for (int e = threadIdx.x; e < blocks * D; e += kThreads) mean[e] = src[e];
  stage_a<D>(p, h, b, aq_s, ak_s);
  __syncthreads();
  products<D>(p, h, b, qb0, blocks, mean, aq_s, ak_s, t);
}

}  // namespace attnpilot::attention::cuda::pooled_w
