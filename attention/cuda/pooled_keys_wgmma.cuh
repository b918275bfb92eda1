#pragma once
/// The pooled-query block scores on the stored keys with Hopper's warpgroup MMA (sm_90a): the
/// same scores as pooled_keys_mma.cuh (the mma.sync body, whose header describes them), with
/// the products issued as wgmma by the CTA's one warpgroup:
///
///   w [64 query blocks × d] ──load_w (hi + lo split, per-row power of two σ)──► registers:
///       exactly wgmma's register A fragments (each warp's 16 rows, 2·d/16 · 4 registers)
///   k [keys × d] ──cp.async, 128-key tiles, 128-byte swizzle (block_sparse_wgmma_block.cuh's
///       load_tile_async), S tiles in flight──► smem, K-major B of wgmma
///   S[64 × 128] = σ·(hi·kᵀ + lo·kᵀ)   wgmma m64n128k16, A from registers, B K-major
///       (imm-trans-b = 0), 2·d/16 instructions per tile, fp32 accumulators (64 per thread)
///   per row and 64-key half tile: pooled_keys_mma.cuh's masked running (max, Σ 2^(s - max))
///       and, at the end of a key block, L[qb, kb] = log2 Σ 2^(s_j) by lane c4 = 0
///
/// Why: the mma.sync body runs its 69 GFLOP (L = 32k, 32 heads, d = 128, hi and lo) at about a
/// third of the tensor rate (ncu on an H100, 2026-12-06: latency-bound, tensor pipe 34%, 3 CTAs
/// of 164 registers per SM; 0.3-0.4 ms of the estimator's 0.57). One wgmma m64n128k16 replaces
/// 16 mma.sync m16n8k16 and reads no A from shared memory; at ~70% of the 990 TFLOP/s the
/// products take ~0.1 ms. Measured (H100, 2026-12-06): the whole estimator 0.423 ms per call
/// against the mma.sync body's 0.489 at L = 32k, r = 16 (the scores kernel ~0.3 ms at ncu's
/// clocks with w in two parts, ~0.2 with one); the default on sm_90.
///
/// Same grid and CTA geometry as the mma.sync body (64 query blocks × a chunk of key blocks of
/// one (batch, head)), same scores up to the order of the fp32 sums.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/block_sparse_wgmma_block.cuh"
#include "attention/cuda/mma_ptx.cuh"
#include "attention/cuda/pooled_keys_mma.cuh"
#include "attention/cuda/wgmma_ptx.cuh"

namespace attnpilot::attention::cuda::pooled_keys_wgmma {

namespace bsw = block_sparse_wgmma;
using pooled_keys::div_up;
using pooled_keys::kGroupBlocks;

/// Threads of a CTA (one warpgroup: 4 warps of 16 query blocks) and keys per tile.
inline constexpr int kThreads = 128;
inline constexpr int kTileKeys = 128;
static_assert(kThreads == pooled_keys::kThreads && kGroupBlocks == 64,
              "the mma.sync body's grid: 64 query blocks per CTA of 128 threads");

/// Dynamic shared memory of a CTA: `stages` swizzled 128-key tiles and 1 KB to align the base.
__host__ __device__ constexpr int64_t shared_bytes(int d, int stages) {
  return int64_t(stages) * bsw::tile_bytes(d) + 1024;
}

/// One CTA (kThreads threads, all of which call it: it holds barriers and warpgroup MMAs):
/// pooled_keys::pooled_keys_block's contract, with S swizzled 128-key tiles in `smem_raw`
/// (shared_bytes(D, S) bytes).
///
/// kPipelined (S = 3): tile t + 1's products run while tile t is folded, in a second
/// accumulator set:
///
///   tile t:  wait P_t | flush held blocks | t+1 landed, barrier | load t+2 | issue P_t+1 |
///            fold t (P_t+1 running)
///
/// (the plain body's fold waits for the tile's products and they for it: one warpgroup per CTA,
/// 12-18% achieved occupancy; ncu, H100, 2026-12-06). A finished key block is held in registers
/// and flushed (shuffles, stores) at the next tile's start, when no wgmma is in flight, and the
/// running maximum is updated by selects: branches and flushes beside an in-flight wgmma made
/// ptxas serialise every wgmma (C7518). The folds run in the same key order as the plain body's.
/// (An earlier form, each tile's products as two 64-key halves, the first folded while the
/// second's ran, measured no faster than the plain body: RESULTS.md, 2026-12-06.)
///
/// kSplit = false: w's hi part alone (PooledKeysLaunch::split): d/16 wgmma per tile instead of
/// 2·d/16, and the lo fragments are never formed.
template <typename T, int D, int S, bool kPipelined = false, bool kSplit = true>
__device__ inline void pooled_keys_wgmma_block(const PooledKeysLaunch& p, int64_t chunk,
                                               int64_t group, int64_t bh, unsigned char* smem_raw) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(S >= 2 && S <= pooled_keys::kMaxStages, "2 to kMaxStages key tiles in flight");
  constexpr uint32_t kTile = bsw::tile_bytes(D);
  constexpr int kDk = D / 16;
  constexpr int kHalf = pooled_keys::kTileKeys;  // keys of a half tile (blocks: multiples of 64)
  const float kNegInf = -INFINITY;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;
  const int64_t bs = p.block_size;
  int64_t k_lo = 0, k_hi = 0;  // CTA-uniform: a CTA whose group sees no key of its chunk returns
  if (!pooled_keys::ChunkRows::chunk_keys(p, chunk, group, k_lo, k_hi)) return;
  const pooled_keys::ChunkRows cr(p, k_lo, k_hi, group, bh, warp, g, D);
  const int64_t ntiles = div_up(cr.k_hi - cr.k_lo, kTileKeys);
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  unsigned char* tiles = bsw::align1024(smem_raw);
  const uint32_t tiles_addr = ptx::smem_offset(tiles);

  // Tiles 0 .. S-2 in flight, one cp.async group per tile (empty past the last).
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (i < ntiles)
      bsw::load_tile_async<T, D, kThreads>(tiles + i * kTile, kg, p.k_stride[2],
                                           cr.k_lo + i * kTileKeys, p.m, tid);
    ptx::cp_async_commit();
  }
  // w while the first tiles load.
  uint32_t ahi[kDk][4], alo[kDk][4];
  float sigma[2];
  pooled_keys::load_w<T, D>(ahi, alo, sigma, cr.wrow, c4);  // rows past q_blocks: row 0

  float mx[2] = {kNegInf, kNegInf}, sum[2] = {0.f, 0.f};
  // The lazy fold's per-row references (PooledKeysLaunch::lazy_max; plain body only).
  float ref[2] = {kNegInf, kNegInf};
  [[maybe_unused]] const bool lazy = !kPipelined && p.lazy_max;  // CTA-uniform
  // Halves left in the current key block (the chunk starts at a block boundary) and its index:
  // counters, not a 64-bit modulo per half (a division routine).
  const int halves_per_block = static_cast<int>(bs / kHalf);
  int block_left = halves_per_block;
  int64_t kb = cr.k_lo / bs;
  // The pipelined body's finished key blocks not yet flushed: (max, sum) per row and the block
  // (-1: none), slot 0 for a tile's first 64 keys, 1 for its last.
  float held_mx[2][2] = {}, held_sum[2][2] = {};
  int64_t held_kb[2] = {-1, -1};
  // Folds the 64 keys of half `half` of the tile at k0 (at(i, hr, e): the score of row
  // g + 8hr, key 8i + 2c4 + e of the half), then flushes a finished key block (a half never
  // straddles one: the chunk start and bs are multiples of 64), or with kPipelined holds it in
  // `slot` for flush_held.
  const auto fold_half = [&](auto&& at, int64_t k0, int half, int slot) {
    // The pipelined body only reads its accumulators (an in-place write in a branch, to
    // registers the next wgmma takes as its operand, made ptxas serialise every wgmma: C7518).
    constexpr bool kInPlace = !kPipelined;
    const int64_t kh = k0 + half * kHalf;
    if (kh >= cr.k_hi) return;  // CTA-uniform: past the chunk (or every row's causal limit)
    if (kh < cr.warp_kmax) {    // warp-uniform: some row of the warp sees a key of the half
      const bool need_mask = kh + kHalf > cr.warp_kmin;  // warp-uniform
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const auto row = [&](int i, int e) -> float& { return at(i, hr, e); };
        if constexpr (kInPlace)
          pooled_keys::fold_keys_branched(row, sigma[hr], need_mask, kh, cr.kend[hr], c4, mx[hr],
                                          sum[hr], lazy, &ref[hr]);
        else
          pooled_keys::fold_keys<false>(row, sigma[hr], need_mask, kh, cr.kend[hr], c4, mx[hr],
                                        sum[hr]);
      }
    }
    const bool block_end = --block_left == 0 || kh + kHalf >= cr.k_hi;  // CTA-uniform
    const int64_t kb_done = kb;
    block_left = block_end ? halves_per_block : block_left;  // selects (C7518, below)
    kb = block_end ? kb + 1 : kb;
    if constexpr (kPipelined) {
      // Held back until no wgmma is in flight, by selects, not a branch: the flush's shuffles
      // and stores, or even a branch that moves these registers, made ptxas serialise every
      // wgmma (C7518).
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        held_mx[slot][hr] = block_end ? mx[hr] : held_mx[slot][hr];
        held_sum[slot][hr] = block_end ? sum[hr] : held_sum[slot][hr];
        mx[hr] = block_end ? kNegInf : mx[hr];
        sum[hr] = block_end ? 0.f : sum[hr];
      }
      held_kb[slot] = block_end ? kb_done : held_kb[slot];
    } else if (block_end) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        pooled_keys::flush_block(mx[hr], sum[hr], cr.out[hr], kb_done, cr.vis[hr], c4);
    }
  };
  // The held-back key blocks of the pipelined body, flushed (slot 0 first: keys in order).
  const auto flush_held = [&] {
#pragma unroll
    for (int slot = 0; slot < 2; ++slot) {
      if (held_kb[slot] < 0) continue;  // CTA-uniform
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        pooled_keys::flush_block(held_mx[slot][hr], held_sum[slot][hr], cr.out[hr], held_kb[slot],
                                 cr.vis[hr], c4);
      held_kb[slot] = -1;
    }
  };
  // The products of the tile in `stage` (128 keys) into acc, one commit group.
  const auto issue = [&](auto& acc, int stage) {
    constexpr int kN = 2 * static_cast<int>(sizeof(acc) / sizeof(float));
    const uint64_t kd = ptx::sw128_desc(tiles_addr + stage * kTile, 16, 1024);
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDk; ++kk) {
      const uint64_t bk = ptx::desc_advance(kd, (kk / 4) * bsw::kRegionBytes + (kk % 4) * 32);
      ptx::wgmma_rs<T, kN, false>(acc, ahi[kk], bk, kk > 0);
      if constexpr (kSplit) ptx::wgmma_rs<T, kN, false>(acc, alo[kk], bk, true);
    }
    ptx::wgmma_commit();
  };
  // One 128-key tile's two halves folded from acc (acc[4i + 2hr + e]: row g + 8hr, key
  // 8i + 2c4 + e of the tile), in key order; a finished block is flushed or held in the slot
  // of its half.
  const auto fold_tile = [&](auto& acc, int64_t k0) {
#pragma unroll
    for (int half = 0; half < 2; ++half)
      fold_half([&](int i, int hr,
                    int e) -> float& { return acc[4 * (half * (kHalf / 8) + i) + 2 * hr + e]; },
                k0, half, half);
  };
  if constexpr (kPipelined) {
    // Tile t + 1's products run while tile t is folded (two accumulator sets; the loop is
    // unrolled by two so each set is one register array). Per tile t:
    //   wait for tile t's products | flush the blocks fold(t - 1) held (nothing in flight) |
    //   tile t + 1 landed, barrier (every warp is done with tile t - 1's stage) |
    //   load tile t + 2 into that stage | issue tile t + 1's products | fold tile t
    static_assert(S == 3, "the cross-tile pipeline: tiles t (folded), t + 1, t + 2 (loading)");
    float acc0[kTileKeys / 2], acc1[kTileKeys / 2];
    ptx::cp_async_wait_group<S - 2>();  // tile 0 (tile 1 may still be in flight)
    ptx::fence_proxy_async();
    __syncthreads();
    issue(acc0, 0);
    const auto step = [&](auto& cur, auto& next, int64_t t) {
      ptx::wgmma_wait<0>();
      flush_held();
      if (t + 1 < ntiles) {  // CTA-uniform
        ptx::cp_async_wait_group<0>();
        ptx::fence_proxy_async();
      }
      __syncthreads();
      if (t + 2 < ntiles)
        bsw::load_tile_async<T, D, kThreads>(tiles + ((t + 2) % S) * kTile, kg, p.k_stride[2],
                                             cr.k_lo + (t + 2) * kTileKeys, p.m, tid);
      ptx::cp_async_commit();
      if (t + 1 < ntiles) issue(next, static_cast<int>((t + 1) % S));
      fold_tile(cur, cr.k_lo + t * kTileKeys);
    };
    for (int64_t t = 0; t < ntiles; t += 2) {
      step(acc0, acc1, t);
      if (t + 1 < ntiles) step(acc1, acc0, t + 1);
    }
    ptx::wgmma_wait<0>();  // (the last step issued nothing)
    flush_held();
  } else {
    for (int64_t t = 0; t < ntiles; ++t) {
      const int64_t k0 = cr.k_lo + t * kTileKeys;
      // Tile t has landed (this thread's copies, fenced for wgmma's async-proxy reads; then
      // everyone's), and every wgmma of tile t - 1 has completed (each thread waited for its
      // own), so its stage may be refilled.
      ptx::cp_async_wait_group<S - 2>();
      ptx::fence_proxy_async();
      __syncthreads();
      if (t + S - 1 < ntiles)
        bsw::load_tile_async<T, D, kThreads>(tiles + ((t + S - 1) % S) * kTile, kg, p.k_stride[2],
                                             k0 + (S - 1) * kTileKeys, p.m, tid);
      ptx::cp_async_commit();
      float acc[kTileKeys / 2];
      issue(acc, static_cast<int>(t % S));
      ptx::wgmma_wait<0>();
      fold_tile(acc, k0);
    }
  }
  ptx::cp_async_wait_all();  // no copy outlives the CTA (the groups past the last tile are empty)
}

}  // namespace attnpilot::attention::cuda::pooled_keys_wgmma
