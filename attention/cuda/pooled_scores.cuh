#pragma once
/// Block-level device code of the pooled-query block scores (block_estimator.cu's
/// pooled_scores_kernel and pooled_normalise_kernel are thin wrappers around it): the GPU twin of
/// estimators.cpp's lowrank_block_scores(..., pool_queries = true). Plain fp32 on the CUDA cores,
/// no inline PTX, so tests also run it on the CPU through tests/cuda_emu/cuda_emu.h (which
/// defines ATTNPILOT_CUDA_EMU and the CUDA names used here).
///
/// What it computes, for each (b, h) and query block qb (rows i0 = qb·bs .. i0 + rows - 1, keys
/// j < kend, kend = causal ? min(m, q_offset + i0 + rows) : m, vis = ceil(kend / bs)):
///
///   s_j = pq_qb · kp_j                     (pq already scaled by log2(e)/√d: base-2 units)
///   L[qb, kb] = log2 Σ_{j in kb, j < kend} 2^(s_j)          for kb < vis
///   score[qb, kb] = 2^(L[qb, kb] - M) / Σ_{kb' < vis} 2^(L[qb, kb'] - M),  M = max_kb L[qb, kb]
///                 (zero for kb >= vis)
///
/// (1) pooled_scores_block: one CTA of kPooledThreads threads per (b·h, group of G query
/// blocks, chunk of chunk_blocks key blocks); thread t owns Q query blocks (group·G + t + 128·i,
/// i < Q; Q = 2 and G = 256 up to rank 32, Q = 1 and G = 128 at rank 64) and keeps their
/// projected mean queries in registers, so each key read from shared memory serves Q dot products
/// (the float4 broadcasts, not the FMAs, bounded the one-row-per-thread projection kernel). The
/// CTA walks the chunk's keys (up to its last query block's kend) in tiles of 64: the tile of
/// projected keys is staged in shared memory (double buffered: the next tile's float4 loads are
/// in flight while this one is scored), then every thread that sees keys of the tile scores them
/// 8 at a time (8·Q dot products reading the keys as shared-memory broadcasts, per query block
/// the 8-key max, a rescale of the running sum when the max grows, 8 exp2) and masks keys
/// j >= kend (only a query block's last visible key block can hold any). At each key block's end
/// the thread writes L[qb, kb] into the scores tensor itself, for kb < vis only. Query blocks see a
/// prefix of the keys that grows with qb, so the CTA's last query block bounds its keys; a CTA
/// whose chunk lies past it exits before its first barrier. (2) pooled_normalise_row: one warp per
/// (b, h, qb) row, in place: M, the sum of 2^(L - M), the scores, zeros past vis.
///
/// Work at L = 32k, 32 heads, r = 16, block 128, causal: 32 · Σ_qb kend ≈ 1.3e8 (query block,
/// key) pairs, 16 FMA (2.1e9 FMA: ~70 µs of the H100's FFMA rate), one exp2 (~35 µs of MUFU),
/// and R/(4·Q) = 2 shared-memory float4 broadcasts per pair per thread; kp is read once per
/// (query group, key chunk) CTA. Measured (H100, 2026-12-06): the pooled estimator with it and
/// the key projection takes 0.77-0.79 ms at r = 16 (1.2 ms at r = 32); pooled_keys_mma.cuh is
/// the default where it applies.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/estimator_common.cuh"

namespace attnpilot::attention::cuda::pooled {

/// Threads per CTA of the pooled score kernel.
inline constexpr int kPooledThreads = 128;
/// Keys per shared-memory tile (block sizes are multiples of it).
inline constexpr int kPooledKeyTile = kEstimatorKeyTile;
/// Keys per update of a thread's running max and sum.
inline constexpr int kPooledKeyStep = 8;

/// Query blocks per thread: each key read from shared memory serves that many dot products
/// (2 up to rank 32; rank 64 keeps one, its 64 query registers being enough).
__host__ __device__ constexpr int pooled_queries_per_thread(int rank_pad) {
  return rank_pad <= 32 ? 2 : 1;
}

__host__ __device__ inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

/// The CPU twin's kend: keys query block qb sees (non-decreasing in qb). Launch: any launch
/// struct with the geometry fields (PooledScoresLaunch, PooledKeysLaunch).
template <class Launch>
__host__ __device__ inline int64_t pooled_visible_keys(const Launch& p, int64_t qb) {
  if (!p.causal) return p.m;
  const int64_t bs = p.block_size, i0 = qb * bs;
  const int64_t rows = p.n - i0 < bs ? p.n - i0 : bs;
  const int64_t end = p.q_offset + i0 + rows;
  return end < p.m ? end : p.m;
}

/// Query blocks per CTA, key chunks (of p.chunk_blocks key blocks, which must be >= 1) and
/// query groups of the grid.
__host__ __device__ inline int64_t pooled_group_size(const PooledScoresLaunch& p) {
  return int64_t(kPooledThreads) * pooled_queries_per_thread(p.rank_pad);
}
__host__ __device__ inline int64_t pooled_chunks(const PooledScoresLaunch& p) {
  return div_up(p.k_blocks, p.chunk_blocks);
}
__host__ __device__ inline int64_t pooled_groups(const PooledScoresLaunch& p) {
  return div_up(p.q_blocks, pooled_group_size(p));
}

/// (1) One CTA: query group `group` (query blocks group·G .. group·G + G-1, G =
/// pooled_group_size: thread t owns blocks group·G + t + 128·i, i < pooled_queries_per_thread),
/// key blocks chunk·chunk_blocks .. of head bh = b·heads + h. `tiles`: 2·kPooledKeyTile·R floats
/// of shared memory, 16-byte aligned. Every thread of a CTA of kPooledThreads calls it (it holds
/// barriers). R must equal p.rank_pad.
template <int R>
__device__ inline void pooled_scores_block(const PooledScoresLaunch& p, int64_t chunk,
                                           int64_t group, int64_t bh, float* tiles) {
  constexpr int kQ = pooled_queries_per_thread(R);
  constexpr int kTile = kPooledKeyTile * R;  // floats per buffer
  constexpr int kVecs = kTile / 4;           // float4s per tile
  constexpr int kLoads = (kVecs + kPooledThreads - 1) / kPooledThreads;
  const float kNegInf = -INFINITY;
  const int tid = threadIdx.x;
  const int64_t bs = p.block_size, first = group * kPooledThreads * kQ;
  const int64_t qb_last =
      first + kPooledThreads * kQ <= p.q_blocks ? first + kPooledThreads * kQ - 1 : p.q_blocks - 1;
  // Keys of the CTA: its chunk, cut at the last query block's kend (the largest of the group).
  const int64_t kend_cta = pooled_visible_keys(p, qb_last);
  const int64_t kb0 = chunk * p.chunk_blocks;
  const int64_t k_lo = kb0 * bs;
  int64_t k_hi = (kb0 + p.chunk_blocks) * bs;
  if (k_hi > kend_cta) k_hi = kend_cta;
  if (k_lo >= k_hi) return;  // CTA-uniform: nothing of this chunk is visible to the group
  const int64_t ntiles = div_up(k_hi - k_lo, kPooledKeyTile);

  // This thread's query blocks: projected mean queries, key counts, visible blocks, outputs.
  float q[kQ][R];
  int64_t kend[kQ], vis[kQ];
  float* out[kQ];
#pragma unroll
  for (int i = 0; i < kQ; ++i) {
    const int64_t qb = first + tid + int64_t(kPooledThreads) * i;
    const bool active = qb < p.q_blocks;
    kend[i] = active ? pooled_visible_keys(p, qb) : 0;  // 0: sees nothing, writes nothing
    vis[i] = div_up(kend[i], bs);
    const float* src = p.pq + (bh * p.q_blocks + (active ? qb : 0)) * R;
#pragma unroll
    for (int c = 0; c < R; ++c) q[i][c] = active ? src[c] : 0.f;
    out[i] = p.scores + (bh * p.q_blocks + (active ? qb : 0)) * p.k_blocks;
  }
  const float* kpg = p.kp + bh * p.m * R;

  // Double-buffered key tiles: tile t+1 goes global -> registers while tile t is scored, then
  // registers -> the other buffer; one barrier per tile. Keys >= m are zero (and masked).
  float4 pre[kLoads];
  const auto fetch = [&](int64_t t) {
    const int64_t key0 = k_lo + t * kPooledKeyTile;
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + i * kPooledThreads;
      const int64_t key = key0 + e / (R / 4);
      pre[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (e < kVecs && key < p.m)
        pre[i] = *reinterpret_cast<const float4*>(kpg + key * R + (e % (R / 4)) * 4);
    }
  };
  const auto stash = [&](int buf) {
    float4* dst = reinterpret_cast<float4*>(tiles + buf * kTile);
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int e = tid + i * kPooledThreads;
      if (e < kVecs) dst[e] = pre[i];
    }
  };
  fetch(0);
  stash(0);
  __syncthreads();

  // Per query block: running max and Σ 2^(s - max) over the current key block.
  float mx[kQ], sum[kQ];
#pragma unroll
  for (int i = 0; i < kQ; ++i) {
    mx[i] = kNegInf;
    sum[i] = 0.f;
  }
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t k0 = k_lo + t * kPooledKeyTile;
    const int buf = static_cast<int>(t & 1);
    if (t + 1 < ntiles) fetch(t + 1);  // in flight during the scoring below
    // Keys of the tile each query block sees.
    int lim[kQ], lim_max = 0;
#pragma unroll
    for (int i = 0; i < kQ; ++i) {
      lim[i] = kend[i] <= k0                   ? 0
               : kend[i] - k0 < kPooledKeyTile ? static_cast<int>(kend[i] - k0)
                                               : kPooledKeyTile;
      lim_max = lim[i] > lim_max ? lim[i] : lim_max;
    }
    const float* tile = tiles + buf * kTile;
    for (int j0 = 0; j0 < lim_max; j0 += kPooledKeyStep) {
      float s[kQ][kPooledKeyStep];
#pragma unroll
      for (int u = 0; u < kPooledKeyStep; ++u) {
        const float4* kr = reinterpret_cast<const float4*>(tile + (j0 + u) * R);
        float a[kQ];
#pragma unroll
        for (int i = 0; i < kQ; ++i) a[i] = 0.f;
#pragma unroll
        for (int c = 0; c < R / 4; ++c) {
          const float4 w = kr[c];  // the same address for every thread: a broadcast
#pragma unroll
          for (int i = 0; i < kQ; ++i) {
            a[i] = fmaf(q[i][4 * c], w.x, a[i]);
            a[i] = fmaf(q[i][4 * c + 1], w.y, a[i]);
            a[i] = fmaf(q[i][4 * c + 2], w.z, a[i]);
            a[i] = fmaf(q[i][4 * c + 3], w.w, a[i]);
          }
        }
#pragma unroll
        for (int i = 0; i < kQ; ++i) s[i][u] = j0 + u < lim[i] ? a[i] : kNegInf;
      }
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        if (j0 >= lim[i]) continue;  // none of these keys is visible to query block i
        float cm = s[i][0];          // finite: key j0 < lim[i] is visible
#pragma unroll
        for (int u = 1; u < kPooledKeyStep; ++u) cm = fmaxf(cm, s[i][u]);
        if (cm > mx[i]) {
          sum[i] *= exp2f(mx[i] - cm);  // mx = -inf: sum is 0 and stays 0
          mx[i] = cm;
        }
#pragma unroll
        for (int u = 0; u < kPooledKeyStep; ++u) sum[i] += exp2f(s[i][u] - mx[i]);
      }
    }
    // End of a key block (tiles never straddle one), or of the CTA's keys: L, then reset.
    if ((k0 + kPooledKeyTile) % bs == 0 || t + 1 == ntiles) {
      const int64_t kb = k0 / bs;
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        // kb < vis: a key of kb was seen (inactive query blocks have vis = 0).
        if (kb < vis[i]) out[i][kb] = mx[i] + log2f(sum[i]);
        mx[i] = kNegInf;
        sum[i] = 0.f;
      }
    }
    // The other buffer was last read in tile t-1, before the barrier that ended it.
    if (t + 1 < ntiles) stash(buf ^ 1);
    __syncthreads();
  }
}

/// (2) One warp (all 32 lanes) per row b·heads·q_blocks + ... of the scores: the L values of
/// its visible key blocks become the softmax's block sums, in place; zero past them.
__device__ inline void pooled_normalise_row(const PooledScoresLaunch& p, int64_t row) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t qb = row % p.q_blocks;
  const int64_t vis = div_up(pooled_visible_keys(p, qb), p.block_size);
  float* sc = p.scores + row * p.k_blocks;
  const est::Log2RowScale norm =
      est::log2_row_scale([&](int, int64_t kb) { return sc[kb]; }, vis, lane);
  for (int64_t kb = lane; kb < p.k_blocks; kb += 32) sc[kb] = kb < vis ? norm(sc[kb]) : 0.f;
}

}  // namespace attnpilot::attention::cuda::pooled
