#pragma once
/// The CTA body of the estimator's sampled-row score kernel (block_estimator.cu's
/// block_scores_kernel is a thin wrapper around block_scores_block): the GPU twin of
/// estimators.cpp's lowrank_block_scores; the algorithm, operation count and floor are described
/// at the top of block_estimator.cu. Tests also run it on the CPU through
/// tests/cuda_emu/cuda_emu.h (which defines ATTNPILOT_CUDA_EMU and the CUDA names used here); the
/// inline PTX it uses (mma_ptx.cuh: cvt.rna.tf32, mma.sync m16n8k8 tf32, ex2.approx) then comes
/// from tests/cuda_emu/cuda_emu_mma.h. Moving the body here left the kernels' SASS byte-identical.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/estimator_common.cuh"
#include "attention/cuda/mma_ptx.cuh"

namespace attnpilot::attention::cuda::sampled {

using est::block_rows;
using est::ceil_div;
using est::neg_inf;
using est::visible_blocks;
using ptx::mma_tf32;
using ptx::to_tf32;

inline constexpr int kRows = kEstimatorSampleRows;  // 8 sampled rows per query block
inline constexpr int kKeyTile = kEstimatorKeyTile;  // 64 keys per tile
inline constexpr int kScoreWarps = 4;               // each warp: 2 query blocks (16 mma rows)
inline constexpr int kScoreThreads = 32 * kScoreWarps;
inline constexpr int kTileQueryBlocks = 2 * kScoreWarps;  // query blocks per CTA work item
inline constexpr int64_t kLseSmemMaxBlocks = 128;         // L rows in shared memory up to this KB

__host__ __device__ constexpr int key_ld(int r) { return r + 4; }  // conflict-free b loads

// Two buffers (double buffering), each the tf32 hi and lo parts of a key tile.
__host__ __device__ constexpr int64_t score_tile_bytes(int r) {
  return int64_t(4) * kKeyTile * key_ld(r) * 4;
}

// The score kernel's workspace starts with the work counter (16 bytes), then, when the L rows
// do not fit in shared memory, one slice of 4 warps × 16 rows × k_blocks floats per CTA.
inline constexpr int64_t kCounterFloats = 4;

/// Dynamic shared memory of a CTA: the key tiles, then (k_blocks <= kLseSmemMaxBlocks) the L rows.
__host__ __device__ constexpr int64_t score_smem_bytes(int r, int64_t k_blocks) {
  return score_tile_bytes(r) +
         (k_blocks <= kLseSmemMaxBlocks ? int64_t(kScoreWarps) * 16 * k_blocks * 4 : 0);
}
/// Workspace bytes of a grid of `grid` CTAs: the counter, then (k_blocks > kLseSmemMaxBlocks)
/// the L rows of every CTA.
__host__ __device__ constexpr int64_t score_workspace_bytes(int64_t grid, int64_t k_blocks) {
  return kCounterFloats * 4 +
         (k_blocks <= kLseSmemMaxBlocks ? 0 : grid * kScoreWarps * 16 * k_blocks * 4);
}

/// One CTA (kScoreThreads threads, all of which call it: it holds barriers) of the persistent
/// grid: takes work items (tiles of 8 query blocks of one head) from the counter at
/// p.workspace[0] (zero before the launch) until none are left. `cta` is blockIdx.x (the CTA's
/// slice of the workspace's L rows when they are not in shared memory); `smem`: the dynamic
/// shared memory, score_smem_bytes(R, p.k_blocks) bytes, 16-byte aligned. R must equal
/// p.rank_pad. kSplit: three tf32 products per score (about fp32), else one (tf32: ~1e-3
/// relative).
template <int R, bool kSplit>
__device__ __forceinline__ void block_scores_block(const BlockScoresLaunch& p, unsigned int cta,
                                                   unsigned char* smem) {
  constexpr int kLd = key_ld(R);
  constexpr int kKs = R / 8;                  // k-steps of the mma
  constexpr int kTileWords = kKeyTile * kLd;  // one of hi / lo
  constexpr int kLoads = (kKeyTile * R / 4 + kScoreThreads - 1) / kScoreThreads;  // float4s
  __shared__ unsigned int next_item;
  // Buffer b: hi parts at tiles + 2b·kTileWords, lo parts after them ([kKeyTile][kLd] each).
  uint32_t* tiles = reinterpret_cast<uint32_t*>(smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int64_t bs = p.block_size, kbn = p.k_blocks;
  unsigned int* counter = reinterpret_cast<unsigned int*>(p.workspace);
  // This warp's 16 L rows (row 8·half + t: sample t of its query block 2·warp + half).
  float* lse = kbn > kLseSmemMaxBlocks
                   ? p.workspace + kCounterFloats +
                         (static_cast<int64_t>(cta) * kScoreWarps + warp) * 16 * kbn
                   : reinterpret_cast<float*>(tiles + 4 * kTileWords) + warp * 16 * kbn;
  const int64_t qtiles = ceil_div(p.q_blocks, kTileQueryBlocks);
  const int64_t bh_n = static_cast<int64_t>(p.batch) * p.heads;
  const int64_t work = qtiles * bh_n;
  const float kNegInf = neg_inf();

  // Work items in order, heaviest (latest query tiles) first, handed out by an atomic counter:
  // a CTA that finishes early takes the next item (a static round robin left the CTAs that got
  // two heavy items running up to ~1.8x the mean at 32k).
  if (tid == 0) next_item = atomicAdd(counter, 1u);
  __syncthreads();
  for (int64_t w = next_item; w < work;) {
    const int64_t qt = qtiles - 1 - w / bh_n;
    const int64_t bh = w % bh_n;
    const int64_t qb_first = qt * kTileQueryBlocks;
    const int64_t qb_last = qb_first + kTileQueryBlocks - 1 < p.q_blocks
                                ? qb_first + kTileQueryBlocks - 1
                                : p.q_blocks - 1;
    // Keys this CTA visits: up to the last visible key of its last query block.
    int64_t kend = p.m;
    if (p.causal) {
      const int64_t e = p.q_offset + qb_last * bs + block_rows(qb_last, p.n, bs);
      kend = e < p.m ? e : p.m;
    }
    const int64_t ntiles = ceil_div(kend, kKeyTile);

    // This lane's two rows: g of query block qb[0] (mma rows 0-7), g of qb[1] (rows 8-15).
    // Key j is hidden from a row when j > lim (lim = -1: an unused row sees nothing).
    int64_t qb[2], lim[2], vis[2];
    int ns[2];
    bool valid[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      qb[hf] = qb_first + 2 * warp + hf;
      valid[hf] = false;
      lim[hf] = -1;
      vis[hf] = 0;
      ns[hf] = 0;
      if (qb[hf] < p.q_blocks) {
        const int64_t rows = block_rows(qb[hf], p.n, bs);
        ns[hf] = rows < kRows ? static_cast<int>(rows) : kRows;
        vis[hf] = visible_blocks(qb[hf], p.n, p.m, bs, p.causal, p.q_offset);
        if (g < ns[hf]) {
          valid[hf] = true;
          const int64_t qpos = p.q_offset + qb[hf] * bs + rows - 1 - (g * rows) / ns[hf];
          lim[hf] = p.causal && qpos < p.m - 1 ? qpos : p.m - 1;
        }
      }
    }
    // Warp-uniform bounds: a tile is skipped past every row's limit, masked past the smallest.
    int64_t lim_max = lim[0] > lim[1] ? lim[0] : lim[1];
    int64_t lim_min = lim[0] < lim[1] ? lim[0] : lim[1];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) {
      const int64_t a = __shfl_xor_sync(0xffffffffu, lim_max, o);
      const int64_t c = __shfl_xor_sync(0xffffffffu, lim_min, o);
      lim_max = a > lim_max ? a : lim_max;
      lim_min = c < lim_min ? c : lim_min;
    }

    // A fragments (hi and lo tf32 parts) of the warp's 16 rows.
    uint32_t ahi[kKs][4], alo[kKs][4];
    {
      const float* qrow[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        qrow[hf] = valid[hf] ? p.qs + ((bh * p.q_blocks + qb[hf]) * kRows + g) * R : nullptr;
#pragma unroll
      for (int ks = 0; ks < kKs; ++ks) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hf = e % 2, col = ks * 8 + tig + (e / 2) * 4;
          const float x = qrow[hf] != nullptr ? qrow[hf][col] : 0.f;
          ahi[ks][e] = to_tf32(x);
          alo[ks][e] = kSplit ? to_tf32(x - __uint_as_float(ahi[ks][e])) : 0u;
        }
      }
    }

    // Running (max, per-lane sum) of the current key block for the lane's two rows.
    float bm[2] = {kNegInf, kNegInf}, be[2] = {0.f, 0.f};
    const float* kpg = p.kp + bh * p.m * R;

    // Key tiles are double-buffered: tile kt+1 is read from global memory into registers
    // while tile kt is scored, then converted into the other buffer; one barrier per tile.
    float4 pre[kLoads];
    const auto fetch = [&](int64_t kt) {
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int e = tid + i * kScoreThreads, row = e / (R / 4), col = (e % (R / 4)) * 4;
        const int64_t key = kt * kKeyTile + row;
        pre[i] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (e < kKeyTile * R / 4 && key < p.m)
          pre[i] = *reinterpret_cast<const float4*>(kpg + key * R + col);
      }
    };
    const auto stash = [&](int buf) {
      uint32_t* hi_t = tiles + 2 * buf * kTileWords;
      uint32_t* lo_t = hi_t + kTileWords;
#pragma unroll
      for (int i = 0; i < kLoads; ++i) {
        const int e = tid + i * kScoreThreads, row = e / (R / 4), col = (e % (R / 4)) * 4;
        if (e >= kKeyTile * R / 4) continue;
        const float v[4] = {pre[i].x, pre[i].y, pre[i].z, pre[i].w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const uint32_t hi = to_tf32(v[c]);
          hi_t[row * kLd + col + c] = hi;
          if (kSplit) lo_t[row * kLd + col + c] = to_tf32(v[c] - __uint_as_float(hi));
        }
      }
    };
    if (ntiles > 0) {
      fetch(0);
      stash(0);  // buffer 0 was last read before the previous item's final barrier
    }
    __syncthreads();

    for (int64_t kt = 0; kt < ntiles; ++kt) {
      const int64_t k0 = kt * kKeyTile;
      const int buf = static_cast<int>(kt & 1);
      const uint32_t* khi = tiles + 2 * buf * kTileWords;
      const uint32_t* klo = khi + kTileWords;
      if (kt + 1 < ntiles) fetch(kt + 1);  // in flight during the scoring below

      if (k0 <= lim_max) {  // some row of this warp sees a key of the tile
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < kKs; ++ks) {
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
            const int off = (nt * 8 + g) * kLd + ks * 8 + tig;
            const uint32_t bh0 = khi[off], bh1 = khi[off + 4];
            if (kSplit) {
              mma_tf32(s[nt], alo[ks], bh0, bh1);
              mma_tf32(s[nt], ahi[ks], klo[off], klo[off + 4]);
            }
            mma_tf32(s[nt], ahi[ks], bh0, bh1);
          }
        }
        if (k0 + kKeyTile - 1 > lim_min) {  // some element of the tile is hidden
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int64_t j = k0 + nt * 8 + 2 * tig + (c & 1);
              if (j > lim[c / 2]) s[nt][c] = kNegInf;
            }
        }
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float tm = kNegInf;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) tm = fmaxf(tm, fmaxf(s[nt][2 * hf], s[nt][2 * hf + 1]));
          tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 1));
          tm = fmaxf(tm, __shfl_xor_sync(0xffffffffu, tm, 2));
          if (tm != kNegInf) {  // quad-uniform
            float ts = 0.f;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
              ts += ptx::exp2_approx(s[nt][2 * hf] - tm) + ptx::exp2_approx(s[nt][2 * hf + 1] - tm);
            if (tm > bm[hf]) {
              be[hf] = be[hf] * exp2f(bm[hf] - tm) + ts;  // bm = -inf: be is 0
              bm[hf] = tm;
            } else {
              be[hf] += ts * exp2f(tm - bm[hf]);
            }
          }
        }
      }

      // End of a key block (or of the keys): L = max + log2(Σ over the quad), then reset.
      const bool block_end = (k0 + kKeyTile) % bs == 0 || kt + 1 == ntiles;
      if (block_end) {
        const int64_t kb = k0 / bs;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float sum = be[hf];
          sum += __shfl_xor_sync(0xffffffffu, sum, 1);
          sum += __shfl_xor_sync(0xffffffffu, sum, 2);
          if (tig == 0 && valid[hf] && kb < vis[hf])
            lse[(hf * 8 + g) * kbn + kb] = bm[hf] == kNegInf ? kNegInf : bm[hf] + log2f(sum);
          bm[hf] = kNegInf;
          be[hf] = 0.f;
        }
      }
      // The other buffer was last read in tile kt-1, before the barrier that ended it.
      if (kt + 1 < ntiles) stash(buf ^ 1);
      __syncthreads();
    }
    __syncwarp();

    // Normalise: M_t, l_t over each row's L values, then the block scores of both query blocks.
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      if (qb[hf] >= p.q_blocks) continue;  // warp-uniform
      float mt[kRows], il[kRows];
#pragma unroll
      for (int t = 0; t < kRows; ++t) {
        mt[t] = kNegInf;
        il[t] = 0.f;
        if (t >= ns[hf]) continue;
        const float* row = lse + (hf * 8 + t) * kbn;
        float mx = kNegInf;
        for (int64_t kb = lane; kb < vis[hf]; kb += 32) mx = fmaxf(mx, row[kb]);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        float l = 0.f;
        for (int64_t kb = lane; kb < vis[hf]; kb += 32) l += exp2f(row[kb] - mx);
#pragma unroll
        for (int o = 16; o > 0; o /= 2) l += __shfl_xor_sync(0xffffffffu, l, o);
        mt[t] = mx;
        il[t] = 1.f / l;
      }
      float* out = p.scores + (bh * p.q_blocks + qb[hf]) * kbn;
      const float inv_ns = 1.f / static_cast<float>(ns[hf]);
      for (int64_t kb = lane; kb < kbn; kb += 32) {
        float v = 0.f;
        if (kb < vis[hf]) {
#pragma unroll
          for (int t = 0; t < kRows; ++t)
            if (t < ns[hf]) v += exp2f(lse[(hf * 8 + t) * kbn + kb] - mt[t]) * il[t];
          v *= inv_ns;
        }
        out[kb] = v;
      }
    }
    __syncthreads();  // every thread has read next_item and is done with this item's L rows
    if (tid == 0) next_item = atomicAdd(counter, 1u);
    __syncthreads();
    w = next_item;
  }
}

}  // namespace attnpilot::attention::cuda::sampled
