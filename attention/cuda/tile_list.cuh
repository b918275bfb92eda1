#pragma once
/// The key tiles one CTA of a block-sparse attention kernel visits, shared by the mma.sync
/// kernel (block_sparse_block.cuh, 64-key tiles) and the wgmma kernels
/// (block_sparse_wgmma_block.cuh, 128-key tiles), so both apply the CPU backend's visibility
/// rule the same way:
///   - with CSR lists, the listed blocks of the CTA's (batch, head, query block) row, each split
///     into block_size / kBN tiles; without, every tile up to the causal cut-off;
///   - a tile is skipped (k0() = -1) when no query of the CTA sees any of its keys: past M, wholly
///     in the causal future, or wholly left of every query's streaming window (sinks excepted);
///   - need_mask() tells the tiles where some (query, key) pair of the CTA is hidden, and
///     RowMask which columns of one query's row those are.
/// Every thread of a CTA computes the same list, so barriers in the tile loop stay uniform.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "attention/cuda/block_sparse_kernels.h"

namespace attnpilot::attention::cuda {

/// Tiles of kBN keys for a CTA of kBM queries.
template <int kBM, int kBN>
struct TileList {
  const BlockSparseLaunch& p;
  int64_t cta_first = 0, cta_last = 0;  ///< key positions of the CTA's first and last query
  int64_t e0 = 0;                       ///< first CSR entry of the row
  int64_t tiles = 0;                    ///< tiles to consider (visited or skipped)
  int tiles_per_block = 1;

  /// The CTA of queries q0 .. q0 + kBM - 1, query head h, batch entry b.
  __device__ __forceinline__ TileList(const BlockSparseLaunch& launch, int64_t q0, int h, int b)
      : p(launch) {
    cta_first = p.q_offset + q0;
    cta_last = p.q_offset + (q0 + kBM < p.n ? q0 + kBM : p.n) - 1;
    if (p.row_ptr != nullptr) {
      tiles_per_block = p.block_size / kBN;
      const int64_t qb = q0 / p.block_size;
      const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * p.q_blocks + qb;
      e0 = p.row_ptr[row];
      const int64_t e1 = p.row_ptr[row + 1];
      tiles = e1 > e0 ? (e1 - e0) * tiles_per_block : 0;
    } else {
      const int64_t kend = p.causal ? (cta_last + 1 < p.m ? cta_last + 1 : p.m) : p.m;
      tiles = (kend + kBN - 1) / kBN;
    }
  }
  /// First key of tile t, or -1 when no query of the CTA sees any key of it.
  __device__ __forceinline__ int64_t k0(int64_t t) const {
    int64_t k;
    if (p.row_ptr != nullptr) {
      // One tile per block (block_size == kBN) is the common case: no division. Otherwise a
      // 32-bit one (t < 2^31 tiles per row): a 64-bit division is a called subroutine of
      // ~70 instructions, per tile.
      int64_t e = t, part = 0;
      if (tiles_per_block != 1) {
        const uint32_t t32 = static_cast<uint32_t>(t), tpb = static_cast<uint32_t>(tiles_per_block);
        e = t32 / tpb;
        part = t32 % tpb;
      }
      const int64_t kb = p.col_idx[e0 + e];
      if (kb < 0) return -1;  // bad index
      k = kb * p.block_size + part * kBN;
    } else {
      k = t * kBN;
    }
    if (k >= p.m) return -1;                              // past the keys
    if (p.causal && k > cta_last) return -1;              // in every query's future
    const int64_t first_old = k > p.sinks ? k : p.sinks;  // first non-sink key of the tile
    if (p.window > 0 && first_old == k && k + kBN - 1 <= cta_first - p.window) return -1;
    return k;
  }
  /// The first visited tile at or after t (tiles when none).
  __device__ __forceinline__ int64_t next(int64_t t) const {
    while (t < tiles && k0(t) < 0) ++t;
    return t;
  }
  /// Whether tile k .. k + kBN - 1 hides some key from some query of the CTA (past M, causal
  /// future, or left of a window), so the per-element mask must run.
  __device__ __forceinline__ bool need_mask(int64_t k) const {
    const int64_t k_last = k + kBN - 1;
    const int64_t first_old = k > p.sinks ? k : p.sinks;
    return k_last >= p.m || (p.causal && k_last > cta_first) ||
           (p.window > 0 && first_old <= k_last && first_old <= cta_last - p.window);
  }
};

/// The visible columns of one query's row in a tile of kBN keys from k0, by the CPU backend's
/// rule (key k is hidden when k >= M, (causal) k > qpos, or (window) sinks <= k <= qpos -
/// window): column col is visible when col < vis_end and not win_lo <= col <= win_hi (bounds
/// clamped to [-1, kBN + 1], so the per-element test is 32-bit). Default-constructed: all
/// visible (tiles that need no mask).
template <int kBN>
struct RowMask {
  int vis_end = kBN, win_lo = kBN + 1, win_hi = -1;

  RowMask() = default;
  /// The row of the query at key position qpos.
  __device__ __forceinline__ RowMask(const BlockSparseLaunch& p, int64_t k0, int64_t qpos) {
    int64_t end = p.m - k0;
    if (p.causal && qpos + 1 - k0 < end) end = qpos + 1 - k0;
    vis_end = clamp(end);
    if (p.window > 0) {
      win_lo = clamp(p.sinks - k0);
      win_hi = clamp(qpos - p.window - k0);
    }
  }
  /// Bitwise, not short-circuit: one predicated select per element, no branch (with `||` the
  /// compiler emitted a divergent branch per element, 1.1-1.2x slower kernels on an H100).
  __device__ __forceinline__ bool hidden(int col) const {
    return (col >= vis_end) | ((col >= win_lo) & (col <= win_hi));
  }

 private:
  __device__ __forceinline__ static int clamp(int64_t x) {
    return static_cast<int>(x < kBN + 1 ? (x > -1 ? x : -1) : kBN + 1);
  }
};

}  // namespace attnpilot::attention::cuda
