#pragma once
/// One row's online-softmax step on the scores a lane holds of it, shared by the block-sparse
/// kernels (the mma.sync body, block_sparse_block.cuh, and the wgmma bodies,
/// block_sparse_wgmma_block.cuh), whose accumulator fragments give each lane the columns
/// 8j + 2·c4 + e (j < J, e < 2) of two rows:
///
///   general  x = S·scale_log2, the keys the row mask hides set to -inf (when need_mask),
///            then P = 2^(x - m): the tiles that need the mask, and any tile when
///            scale_log2 <= 0
///   fast     no mask and scale_log2 > 0: the max of S times scale_log2 is the max of x, and
///            P = 2^(S·scale_log2 - m) is one FFMA and one MUFU.EX2 per element
///
/// Two bodies rather than one with the mask predicated off: ptxas if-converts the per-element
/// mask test into predicated instructions, which issue even when their predicate is false. In
/// the wgmma overlap kernel (bf16, d = 128) that made the consumer loop ~1250 instructions per
/// tile and warp against ~550 with the fast body (SASS, 2026-12-06), and the unmasked tiles are
/// all but about one per CTA.
///
/// The reference max m (log2 units) moves lazily: only when the row's max passes it by more
/// than kSoftmaxSlack, so O is rescaled rarely (P stays below 2^kSlack).
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include "attention/cuda/mma_ptx.cuh"

namespace attnpilot::attention::cuda {

/// Log2 headroom of the lazily moved reference max.
inline constexpr float kSoftmaxSlack = 8.f;

/// The step for one row: at(j, e) is a reference to the lane's score of column
/// col0 + 8j + 2·c4 + e, replaced by its probability P (unnormalised); rm (a RowMask) tells the
/// hidden columns when need_mask (kGeneral only). m and l are the row's reference max and this
/// lane's partial sum of P; alpha is the factor O's row must take (1 where m did not move).
/// Returns whether m moved.
template <bool kGeneral, int J, class At, class Mask>
__device__ __forceinline__ bool online_softmax_row(At&& at, const Mask& rm, bool need_mask,
                                                   int col0, int c4, float scale_log2, float& m,
                                                   float& l, float& alpha) {
  const float kNegInf = -__int_as_float(0x7f800000);
  float mx = kNegInf;
  if constexpr (kGeneral) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = at(j, e) * scale_log2;
        if (need_mask) {
          if (rm.hidden(col0 + 8 * j + 2 * c4 + e)) x = kNegInf;
        }
        at(j, e) = x;
        mx = fmaxf(mx, x);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < J; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) mx = fmaxf(mx, at(j, e));
    }
    mx *= scale_log2;  // scale_log2 > 0: the max of the scaled row
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  // m_new = -inf: nothing visible yet; P and l stay zero.
  const float m_old = m;
  const float m_new = mx > m_old + kSoftmaxSlack ? mx : m_old;
  const float a = m_new == m_old ? 1.f : ptx::exp2_approx(m_old - m_new);  // m_old = -inf: 0
  const float base = m_new == kNegInf ? 0.f : m_new;
  float rs = 0.f;
#pragma unroll
  for (int j = 0; j < J; ++j) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float& x = at(j, e);
      const float pe =
          kGeneral ? ptx::exp2_approx(x - base) : ptx::exp2_approx(fmaf(x, scale_log2, -base));
      x = pe;
      rs += pe;
    }
  }
  l = l * a + rs;
  m = m_new;
  alpha = a;
  return m_new != m_old;
}

/// Whether a tile takes the general body: it needs the mask, or the scale is not positive.
__device__ __forceinline__ bool softmax_general(bool need_mask, float scale_log2) {
  return need_mask || !(scale_log2 > 0.f);
}

}  // namespace attnpilot::attention::cuda
