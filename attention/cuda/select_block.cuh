#pragma once
/// The estimator's selection and scatter kernels as warp-level device functions
/// (block_estimator.cu's select_kernel and scatter_kernel are thin wrappers around select_row and
/// scatter_block): select_blocks' rule of estimators.cpp on the device, described at the top of
/// block_estimator.cu. Between them the launcher runs a CUB exclusive scan of the counts into
/// row_ptr. Tests also run them on the CPU through tests/cuda_emu/cuda_emu.h (which defines
/// ATTNPILOT_CUDA_EMU and the CUDA names used here), with the scan on the host. Moving the bodies
/// here left the kernels' SASS byte-identical.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/estimator_common.cuh"

namespace attnpilot::attention::cuda::selection {

using est::block_rows;
using est::ceil_div;

/// Sort entries of select_row: the smallest power of two >= k_blocks.
inline int select_cap(int64_t k_blocks) {
  int cap = 1;
  while (cap < k_blocks) cap *= 2;
  return cap;
}
/// Dynamic shared memory of select_row: sort keys [cap] u64, then the bitmap [⌈k_blocks/32⌉] u32.
inline int64_t select_smem_bytes(int cap, int64_t k_blocks) {
  return int64_t(cap) * 8 + ceil_div(k_blocks, 32) * 4;
}

// Ascending 64-bit sort key: descending score, then ascending block index.
__device__ __forceinline__ uint64_t order_key(float score, int64_t kb) {
  uint32_t u = __float_as_uint(score == 0.f ? 0.f : score);  // -0 sorts as +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);            // monotone in the float order
  return (static_cast<uint64_t>(~u) << 32) | static_cast<uint64_t>(kb);
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/// One warp per row: row `row` (b·heads·q_blocks + h·q_blocks + qb) by the 32 threads of a
/// one-warp CTA, its chosen blocks as a bitmap at bitmap[row·words ..] and their count at
/// counts[row]. `smem`: select_smem_bytes(cap, p.k_blocks) bytes, 16-byte aligned: sort keys
/// [cap] (cap = select_cap(k_blocks)), bitmap [words].
__device__ __forceinline__ void select_row(const SelectLaunch& p, int64_t row, uint32_t* bitmap,
                                           int64_t* counts, int cap, unsigned char* smem) {
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);
  const int64_t words = ceil_div(p.k_blocks, 32);
  uint32_t* bits = reinterpret_cast<uint32_t*>(keys + cap);
  const int lane = threadIdx.x;
  const int64_t qb = row % p.q_blocks, bs = p.block_size;
  const float* sc = p.scores + row * p.k_blocks;
  const int64_t first_q = p.q_offset + qb * bs;
  const int64_t last_q = p.q_offset + qb * bs + block_rows(qb, p.n, bs) - 1;
  int64_t vis = p.k_blocks;
  if (p.causal && last_q / bs + 1 < vis) vis = last_q / bs + 1;
  const int64_t d0 = (first_q < p.m - 1 ? first_q : p.m - 1) / bs;
  const int64_t d1 = (last_q < p.m - 1 ? last_q : p.m - 1) / bs;
  const auto forced = [&](int64_t kb) { return kb == 0 || (kb >= d0 && kb <= d1); };

  for (int64_t w = lane; w < words; w += 32) bits[w] = 0u;
  __syncwarp();
  double total = 0;
  for (int64_t kb = lane; kb < vis; kb += 32) total += static_cast<double>(sc[kb]);
  total = warp_sum(total);
  // Forced blocks in the CPU's order: block 0, then the diagonal blocks ascending.
  double mass = 0;
  int64_t count = 0;
  for (int64_t kb = 0; kb < vis; kb = kb == 0 ? (d0 > 1 ? d0 : 1) : kb + 1) {
    if (!forced(kb)) break;
    mass += static_cast<double>(sc[kb]);
    ++count;
    if (lane == 0) bits[kb / 32] |= 1u << (kb % 32);
  }
  __syncwarp();
  const bool by_mass = p.gamma > 0;
  double limit;
  if (by_mass) {
    limit = __dmul_rn(p.gamma, total);
  } else {
    limit = p.top_k > 0 ? static_cast<double>(p.top_k)
                        : ceil(__dsub_rn(__dmul_rn(p.density, static_cast<double>(vis)), 1e-9));
  }
  const int64_t others = vis - count;
  if ((by_mass ? mass : static_cast<double>(count)) < limit && others > 0) {
    for (int64_t i = lane; i < cap; i += 32)
      keys[i] = i < vis && !forced(i) ? order_key(sc[i], i) : ~0ull;
    __syncwarp();
    // Bitonic sort, ascending (the forced and invisible entries, ~0, end up last).
    for (int size = 2; size <= cap; size *= 2) {
      for (int stride = size / 2; stride > 0; stride /= 2) {
        for (int i = lane; i < cap / 2; i += 32) {
          const int lo = 2 * stride * (i / stride) + i % stride, hi = lo + stride;
          const bool up = (lo & size) == 0;
          const uint64_t a = keys[lo], b = keys[hi];
          if ((a > b) == up) {
            keys[lo] = b;
            keys[hi] = a;
          }
        }
        __syncwarp();
      }
    }
    // Walk the order in chunks of 32: an entry is taken when the mass (count) before it is
    // below the limit; scores are >= 0, so the taken entries are a prefix.
    double base = by_mass ? mass : static_cast<double>(count);
    for (int64_t c0 = 0; c0 < others; c0 += 32) {
      const int64_t i = c0 + lane;
      const bool ok = i < others && keys[i] != ~0ull;  // (the second holds by construction)
      const int64_t kb = ok ? static_cast<int64_t>(keys[i] & 0xffffffffu) : 0;
      const double wgt = ok ? (by_mass ? static_cast<double>(sc[kb]) : 1.0) : 0.0;
      double incl = wgt;
#pragma unroll
      for (int o = 1; o < 32; o *= 2) {
        const double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      double excl = __shfl_up_sync(0xffffffffu, incl, 1);
      if (lane == 0) excl = 0;
      const bool take = ok && base + excl < limit;
      if (take) atomicOr(&bits[kb / 32], 1u << (kb % 32));
      const unsigned taken = __ballot_sync(0xffffffffu, take);
      count += __popc(taken);
      base += __shfl_sync(0xffffffffu, incl, 31);
      if (taken != __ballot_sync(0xffffffffu, ok)) break;
    }
  }
  __syncwarp();
  for (int64_t w = lane; w < words; w += 32) bitmap[row * words + w] = bits[w];
  if (lane == 0) counts[row] = count;
}

/// One CTA of 128 threads (`block` is blockIdx.x), one warp per row (row block·4 + warp): the set
/// bits of the row's bitmap, ascending, at col_idx[row_ptr[row] ..); row_ptr holds the exclusive
/// scan of select_row's counts. Warps past the last row return at once (no block barriers).
__device__ __forceinline__ void scatter_block(const SelectLaunch& p, unsigned int block,
                                              const uint32_t* bitmap) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(block) * 4 + threadIdx.x / 32;
  if (row >= p.rows) return;  // whole warps; no block barriers below
  const int64_t words = ceil_div(p.k_blocks, 32);
  int64_t base = p.row_ptr[row];
  for (int64_t w0 = 0; w0 < words; w0 += 32) {
    const int64_t w = w0 + lane;
    uint32_t word = w < words ? bitmap[row * words + w] : 0u;
    const int c = __popc(word);
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    int64_t pos = base + incl - c;
    while (word != 0u) {
      const int bit = __ffs(word) - 1;
      if (pos < p.col_capacity) p.col_idx[pos] = w * 32 + bit;
      ++pos;
      word &= word - 1u;
    }
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
}

}  // namespace attnpilot::attention::cuda::selection
