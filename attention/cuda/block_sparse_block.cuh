#pragma once
/// The block-sparse flash-attention forward kernel's CTA body (block_sparse_attention.cu's
/// block_sparse_fwd_kernel is a thin wrapper around fwd_block): the algorithm, fragment layouts,
/// masking and resources are described at the top of block_sparse_attention.cu. Tests also run it
/// on the CPU through tests/cuda_emu/cuda_emu.h (which defines ATTNPILOT_CUDA_EMU and the CUDA
/// names used here); the inline PTX it uses (mma_ptx.cuh) then comes from
/// tests/cuda_emu/cuda_emu_mma.h.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <type_traits>

#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/mma_ptx.cuh"
#include "attention/cuda/online_softmax.cuh"
#include "attention/cuda/tile_list.cuh"

namespace attnpilot::attention::cuda::block_sparse {

using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait_all;
using ptx::ldmatrix_x4;
using ptx::ldmatrix_x4_trans;
using ptx::mma_16816;

/// Warps and threads of a CTA.
inline constexpr int kWarps = 4;
inline constexpr int kThreads = 32 * kWarps;
/// Keys per step of the key loop.
inline constexpr int kBN = kBlockSparseTile;
static_assert(kBN == 64, "the S fragment loops assume 64-key tiles");

/// Row stride (elements) of the Q, K, V tiles: 8 elements of padding keep 16-byte rows aligned
/// and make the 8 rows of each ldmatrix phase hit distinct 16-byte bank groups.
__host__ __device__ constexpr int tile_ld(int d) { return d + 8; }

/// Shared memory: Q (kBM rows), then K stage 0, K stage 1, V stage 0, V stage 1 (kBN rows each).
__host__ __device__ constexpr int64_t shared_bytes(int d, int m_tiles) {
  return (int64_t(64) * m_tiles + 4 * kBN) * tile_ld(d) * 2;
}

/// Query tiles of 64·m_tiles rows: 2 (128 rows) when a CTA stays inside one query block (block
/// sizes that are multiples of 128, or no CSR lists), else 1.
inline int m_tiles_for(const BlockSparseLaunch& p) {
  return p.row_ptr == nullptr || p.block_size % 128 == 0 ? 2 : 1;
}

/// Two floats rounded to T, lo in the low 16 bits (the lower column of a fragment pair).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

/// Rows r0 .. r0+kRows-1 of a [rows, D] matrix (row stride `stride` elements) into a kRows × ld
/// shared tile by cp.async; rows at or past `limit` are zero (never garbage: 0 · NaN would poison
/// P V).
template <typename T, int D, int kRows>
__device__ __forceinline__ void load_rows_async(T* dst, const T* src, int64_t stride, int64_t r0,
                                                int64_t limit, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = tile_ld(D);
  static_assert(kThreads % kChunks == 0 && kRows % (kThreads / kChunks) == 0,
                "whole rows per pass, whole passes per tile");
  constexpr int kRowStep = kThreads / kChunks;  // rows per pass of the CTA
  const int row0 = tid / kChunks, col = (tid % kChunks) * 8;
  const T* s = src + (r0 + row0) * stride + col;
  const int64_t step = kRowStep * stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowStep; ++i) {
    const int row = row0 + i * kRowStep;
    const bool valid = r0 + row < limit;
    cp_async_16(dst + row * kLd + col, valid ? s + i * step : src, valid);
  }
}

/// One CTA of kThreads threads: query tile `tile` (rows 64·kM·tile ..; the grid's x runs over
/// the tiles in reverse order), query head h, batch entry b. `smem` holds shared_bytes(D, kM)
/// bytes, 128-byte aligned. Called by every thread of the CTA (it contains barriers).
template <typename T, int D, int kM>
__device__ __forceinline__ void fwd_block(const BlockSparseLaunch& p, unsigned char* smem,
                                          unsigned tile, int h, int b) {
  constexpr int kBM = 16 * kM * kWarps;  // query rows per CTA
  constexpr int kLd = tile_ld(D);
  constexpr int kDk = D / 16;  // k-steps of S = Q Kᵀ
  // Keys per S sub-tile: 32 when a warp has 32 rows of d = 128 (O takes 128 registers per lane;
  // a 64-key S would take 64 more and spill), else the whole 64-key tile. Each sub-tile is one
  // online-softmax step.
  constexpr int kSub = (kM == 2 && D == 128) ? 32 : kBN;
  constexpr int kNt = kSub / 8;             // n-tiles (8 keys) of S
  constexpr int kKt = kSub / 16;            // k-steps (16 keys) of O += P V
  constexpr int kDn = D / 8;                // n-tiles (8 dims) of O
  constexpr bool kQInRegs = kM * D <= 128;  // Q fragments: kM·D/8 registers per lane
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = sq + kBM * kLd;      // 2 stages
  T* sv = sk + 2 * kBN * kLd;  // 2 stages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c4 = lane % 4;  // fragment row group and column pair
  const int64_t q0 = static_cast<int64_t>(tile) * kBM;
  const int kvh = h / (p.heads / p.kv_heads);
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
  const int wrow = warp * 16 * kM;  // this warp's first row in the tile

  // The key tiles to visit (tile_list.cuh): listed blocks split into 64-key tiles, or every
  // tile up to the causal cut-off when no CSR lists are given.
  const TileList<kBM, kBN> list(p, q0, h, b);
  const int64_t cta_first = list.cta_first;

  // Prologue: Q and the first visited K, V tile into stage 0.
  load_rows_async<T, D, kBM>(sq, qg, p.q_stride[2], q0, p.n, tid);
  int64_t t = list.next(0);
  if (t < list.tiles) {
    const int64_t k0 = list.k0(t);
    load_rows_async<T, D, kBN>(sk, kg, p.k_stride[2], k0, p.m, tid);
    load_rows_async<T, D, kBN>(sv, vg, p.v_stride[2], k0, p.m, tid);
  }
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // A-fragment address of this lane in a 16-row slice: rows lane % 16, column half lane / 16.
  const int a_row = lane % 16, a_col = (lane / 16) * 8;
  uint32_t qf[kQInRegs ? kM : 1][kQInRegs ? kDk : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int mi = 0; mi < kM; ++mi)
#pragma unroll
      for (int kk = 0; kk < kDk; ++kk)
        ldmatrix_x4(qf[mi][kk], sq + (wrow + mi * 16 + a_row) * kLd + kk * 16 + a_col);
  }
  // K (B of S, non-transposed): matrices (keys 0-7, d 0-7), (keys 0-7, d 8-15), (keys 8-15,
  // d 0-7), (keys 8-15, d 8-15) of a 16-key, 16-dim slice.
  const int kb_row = (lane % 8) + 8 * (lane / 16), kb_col = 8 * ((lane / 8) % 2);
  // V (B of O, transposed): matrices (keys 0-7, d 0-7), (keys 8-15, d 0-7), (keys 0-7, d 8-15),
  // (keys 8-15, d 8-15).
  const int vb_row = (lane % 8) + 8 * ((lane / 8) % 2), vb_col = 8 * (lane / 16);

  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = 2^(x·log2 e)
  const float kNegInf = -__int_as_float(0x7f800000);
  // O (unnormalised) for rows (mi, g + 8·hr); m is the row's reference max (log2 units), l this
  // lane's partial sum of P under it (its 2 of every 8 columns; the quad sums at the end).
  float o[kM][kDn][4];
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int dn = 0; dn < kDn; ++dn)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dn][e] = 0.f;
  float m_i[kM][2], l_i[kM][2];
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) m_i[mi][hr] = kNegInf, l_i[mi][hr] = 0.f;

  int stage = 0;
  while (t < list.tiles) {
    const int64_t k0 = list.k0(t);
    const bool need_mask = list.need_mask(k0);
    // Next tile's loads into the other stage, which every warp finished reading before the
    // barrier that ended the previous step.
    const int64_t tn = list.next(t + 1);
    if (tn < list.tiles) {
      const int64_t kn = list.k0(tn);
      load_rows_async<T, D, kBN>(sk + (stage ^ 1) * kBN * kLd, kg, p.k_stride[2], kn, p.m, tid);
      load_rows_async<T, D, kBN>(sv + (stage ^ 1) * kBN * kLd, vg, p.v_stride[2], kn, p.m, tid);
    }
    cp_async_commit();
    const T* ks = sk + stage * kBN * kLd;
    const T* vs = sv + stage * kBN * kLd;

#pragma unroll 1
    for (int sub = 0; sub < kBN / kSub; ++sub) {
      // Causal: a warp whose last query precedes the sub-tile's first key sees none of it (the
      // upper-right part of a diagonal block); it skips the work (no CTA barrier in here).
      if (p.causal && k0 + sub * kSub > cta_first + wrow + 16 * kM - 1) continue;
      // S = Q Kᵀ.
      float s[kM][kNt][4];
#pragma unroll
      for (int mi = 0; mi < kM; ++mi)
#pragma unroll
        for (int nj = 0; nj < kNt; ++nj)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mi][nj][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kDk; ++kk) {
        uint32_t qa[kM][4];
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) {
          if constexpr (kQInRegs) {
#pragma unroll
            for (int e = 0; e < 4; ++e) qa[mi][e] = qf[mi][kk][e];
          } else {
            ldmatrix_x4(qa[mi], sq + (wrow + mi * 16 + a_row) * kLd + kk * 16 + a_col);
          }
        }
#pragma unroll
        for (int nj2 = 0; nj2 < kNt / 2; ++nj2) {
          uint32_t kf[4];
          ldmatrix_x4(kf, ks + (sub * kSub + nj2 * 16 + kb_row) * kLd + kk * 16 + kb_col);
#pragma unroll
          for (int mi = 0; mi < kM; ++mi) {
            mma_16816<T>(s[mi][2 * nj2], qa[mi], kf[0], kf[1]);
            mma_16816<T>(s[mi][2 * nj2 + 1], qa[mi], kf[2], kf[3]);
          }
        }
      }

      // Online softmax on rows (mi, g + 8·hr): this lane's columns 8·nj + 2·c4 + e, in the
      // general or the fast form (online_softmax.cuh; a uniform branch between the two).
      float alpha[kM][2];
      bool rescale = false;
      const auto softmax = [&](auto general) {
        constexpr bool kGeneral = decltype(general)::value;
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            // The CPU backend's rule for the keys of this row (tile_list.cuh).
            const RowMask<kBN> rm =
                kGeneral && need_mask ? RowMask<kBN>(p, k0, cta_first + wrow + mi * 16 + g + 8 * hr)
                                      : RowMask<kBN>();
            rescale |= online_softmax_row<kGeneral, kNt>(
                [&](int j, int e) -> float& { return s[mi][j][2 * hr + e]; }, rm, need_mask,
                sub* kSub, c4, scale_log2, m_i[mi][hr], l_i[mi][hr], alpha[mi][hr]);
          }
        }
      };
      if (softmax_general(need_mask, scale_log2))
        softmax(std::true_type{});
      else
        softmax(std::false_type{});
      if (rescale) {
#pragma unroll
        for (int mi = 0; mi < kM; ++mi)
#pragma unroll
          for (int dn = 0; dn < kDn; ++dn) {
            o[mi][dn][0] *= alpha[mi][0];
            o[mi][dn][1] *= alpha[mi][0];
            o[mi][dn][2] *= alpha[mi][1];
            o[mi][dn][3] *= alpha[mi][1];
          }
      }

      // O += P V.
#pragma unroll
      for (int kt = 0; kt < kKt; ++kt) {
        uint32_t pa[kM][4];
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) {
          pa[mi][0] = pack2<T>(s[mi][2 * kt][0], s[mi][2 * kt][1]);
          pa[mi][1] = pack2<T>(s[mi][2 * kt][2], s[mi][2 * kt][3]);
          pa[mi][2] = pack2<T>(s[mi][2 * kt + 1][0], s[mi][2 * kt + 1][1]);
          pa[mi][3] = pack2<T>(s[mi][2 * kt + 1][2], s[mi][2 * kt + 1][3]);
        }
#pragma unroll
        for (int dn2 = 0; dn2 < kDn / 2; ++dn2) {
          uint32_t vf[4];
          ldmatrix_x4_trans(vf, vs + (sub * kSub + kt * 16 + vb_row) * kLd + dn2 * 16 + vb_col);
#pragma unroll
          for (int mi = 0; mi < kM; ++mi) {
            mma_16816<T>(o[mi][2 * dn2], pa[mi], vf[0], vf[1]);
            mma_16816<T>(o[mi][2 * dn2 + 1], pa[mi], vf[2], vf[3]);
          }
        }
      }
    }

    // The next tile has landed and every warp is done with this stage.
    cp_async_wait_all();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  // out = O / l, staged through this warp's own Q rows (no other warp reads them), then
  // 16-byte stores; rows with l = 0 (no visible key) are zero.
  __syncwarp();
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = l_i[mi][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* row = sq + (wrow + mi * 16 + g + 8 * hr) * kLd + 2 * c4;
#pragma unroll
      for (int dn = 0; dn < kDn; ++dn)
        *reinterpret_cast<uint32_t*>(row + dn * 8) =
            pack2<T>(o[mi][dn][2 * hr] * inv, o[mi][dn][2 * hr + 1] * inv);
    }
  __syncwarp();
  constexpr int kChunks = D / 8;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.heads + h) * p.n * D;
#pragma unroll
  for (int i = 0; i < 16 * kM * kChunks / 32; ++i) {
    const int c = lane + 32 * i;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t qi = q0 + wrow + r;
    if (qi < p.n)
      *reinterpret_cast<uint4*>(out + qi * D + col) =
          *reinterpret_cast<const uint4*>(sq + (wrow + r) * kLd + col);
  }
}

}  // namespace attnpilot::attention::cuda::block_sparse
