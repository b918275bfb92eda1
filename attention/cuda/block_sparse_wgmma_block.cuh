#pragma once
/// The CTA body of the Hopper (sm_90a) block-sparse flash-attention forward kernel:
/// warpgroup MMAs (wgmma) with operands in 128-byte-swizzled shared memory. The algorithm and
/// its masking rules are block_sparse_block.cuh's (the mma.sync kernel, which stays the kernel
/// for other GPUs and for blocks of 64); what differs is where the matrix products run:
///
///   CTA = 2 warpgroups (256 threads), 128 query rows (64 per warpgroup), key tiles of 128
///   Q tile, K and V tiles ──cp.async 16 B, 128B-swizzled──► smem (K, V double-buffered; tile
///                           t+1's loads are issued before tile t's math)
///   per visited 128-key tile, each warpgroup on its 64 rows:
///     S = Q Kᵀ      wgmma m64n128k16, A = Q and B = K from shared memory (both K-major),
///                   d/16 steps, fp32 accumulators in registers (64 per thread)
///     softmax       on the accumulator fragment (rows g, g+8 of each warp's 16; the quad of
///                   lanes sharing a row reduces by __shfl_xor 1, 2), lazy rescaling as in the
///                   mma.sync kernel (reference max moves only by more than 8 in log2 units)
///     O += P V      wgmma m64n{d}k16, A = P from registers (the S fragment packed pairwise to
///                   16 bits is exactly wgmma's register A fragment), B = V from shared memory,
///                   MN-major (imm-trans-b), 8 steps of 16 keys
///   out = O / l ──► the warpgroup's own Q rows in smem (swizzled) ──► 16-byte stores
///
/// Shared memory (each tile 128 rows × d, in d/64 regions of 128 rows × 128 bytes, 1024-byte
/// atoms of 8 rows, chunk j of row r at j ^ (r % 8)): Q, K stage 0, K stage 1, V stage 0, V
/// stage 1 = 5 · 256·d bytes (160 KB at d = 128, 80 KB at d = 64), plus 1 KB to align the base.
/// The same storage serves K as a K-major B (S = Q Kᵀ) and V as an MN-major B (O += P V).
///
/// Synchronisation: cp.async writes are generic-proxy, wgmma reads async-proxy: every thread
/// waits for its copies, fences (fence.proxy.async), then the CTA barrier. Each warpgroup waits
/// for its wgmma groups before touching their accumulators (wgmma.wait_group 0) and fences
/// (wgmma.fence) before issuing the next; the barrier at the end of a tile also guarantees that
/// no warpgroup still reads the stage the next loads overwrite.
///
/// Tests run this body on the CPU through tests/cuda_emu (cuda_emu_wgmma.h emulates wgmma with
/// the PTX ISA's layouts, results held back until the covering wait).
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "attention/cuda/block_sparse_block.cuh"
#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/mma_ptx.cuh"
#include "attention/cuda/wgmma_ptx.cuh"

namespace attnpilot::attention::cuda::block_sparse_wgmma {

using block_sparse::pack2;
using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait_all;
using ptx::exp2_approx;

/// Threads of a CTA: two warpgroups.
inline constexpr int kThreads = 256;
/// Query rows per CTA (64 per warpgroup) and keys per tile.
inline constexpr int kBM = 128;
inline constexpr int kBN = 128;
/// Bytes of one 64-column region of a 128-row tile (128-byte rows).
inline constexpr uint32_t kRegionBytes = 128 * 128;

/// Bytes of one 128-row tile of head dim d.
__host__ __device__ constexpr uint32_t tile_bytes(int d) { return (d / 64) * kRegionBytes; }

/// Dynamic shared memory: Q, two K stages, two V stages, and 1 KB to align the base to 1024.
__host__ __device__ constexpr int64_t shared_bytes(int d) {
  return 5 * int64_t(tile_bytes(d)) + 1024;
}

/// Byte offset of element column `col` (a multiple of 8: the 16-byte chunk's first element)
/// of row `row` in a swizzled tile.
__device__ __forceinline__ uint32_t swizzled(int row, int col) {
  return static_cast<uint32_t>((col / 64) * kRegionBytes + row * 128 +
                               ((((col % 64) / 8) ^ (row % 8)) * 16));
}

/// Rows r0 .. r0+127 of a [rows, D] matrix (row stride `stride` elements) into a swizzled tile
/// by cp.async; rows at or past `limit` are zero.
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(unsigned char* dst, const T* src, int64_t stride,
                                                int64_t r0, int64_t limit, int tid) {
  constexpr int kChunks = D / 8;                // 16-byte chunks per row
  constexpr int kRowStep = kThreads / kChunks;  // rows per pass of the CTA (16 or 32)
  static_assert(kRowStep % 8 == 0 && kBN % kRowStep == 0, "whole passes, row % 8 fixed per thread");
  const int row0 = tid / kChunks, col = (tid % kChunks) * 8;
#pragma unroll
  for (int i = 0; i < kBN / kRowStep; ++i) {
    const int row = row0 + i * kRowStep;
    const bool valid = r0 + row < limit;
    cp_async_16(dst + swizzled(row, col), valid ? src + (r0 + row) * stride + col : src, valid);
  }
}

/// One CTA of kThreads threads: query tile `tile` (rows 128·tile ..), query head h, batch entry
/// b; `smem` holds shared_bytes(D) bytes. Needs block_size % 128 == 0 or no CSR lists. Called
/// by every thread of the CTA (it contains barriers).
template <typename T, int D>
__device__ __forceinline__ void fwd_block(const BlockSparseLaunch& p, unsigned char* smem_raw,
                                          unsigned tile, int h, int b) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr uint32_t kTile = tile_bytes(D);
  constexpr int kDk = D / 16;    // k-steps of S = Q Kᵀ
  constexpr int kKt = kBN / 16;  // k-steps of O += P V
  constexpr int kSn = kBN / 8;   // 8-column chunks of S
  constexpr int kOn = D / 8;     // 8-column chunks of O
  constexpr float kSlack = 8.f;  // log2 headroom of the lazily moved reference max
  // The swizzle works on shared-space address bits: atoms must be 1024-byte aligned.
  unsigned char* sq = smem_raw + (1024 - ptx::smem_offset(smem_raw) % 1024) % 1024;
  unsigned char* sk = sq + kTile;      // 2 stages
  unsigned char* sv = sk + 2 * kTile;  // 2 stages
  const uint32_t q_addr = ptx::smem_offset(sq), k_addr = ptx::smem_offset(sk),
                 v_addr = ptx::smem_offset(sv);

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid % 128) / 32, lane = tid % 32;
  const int g = lane / 4, c4 = lane % 4;
  const int64_t q0 = static_cast<int64_t>(tile) * kBM;
  const int kvh = h / (p.heads / p.kv_heads);
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
  const int wrow = 64 * wg + 16 * warp;  // this warp's first row in the tile

  const int64_t cta_first = p.q_offset + q0;
  const int64_t cta_last = p.q_offset + (q0 + kBM < p.n ? q0 + kBM : p.n) - 1;

  // The key tiles to visit: listed blocks split into 128-key tiles, or every tile up to the
  // causal cut-off when no CSR lists are given (block_sparse_block.cuh's rules).
  const int tiles_per_block = p.row_ptr != nullptr ? p.block_size / kBN : 1;
  int64_t e0 = 0, tiles = 0;
  if (p.row_ptr != nullptr) {
    const int64_t qb = q0 / p.block_size;
    const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * p.q_blocks + qb;
    e0 = p.row_ptr[row];
    const int64_t e1 = p.row_ptr[row + 1];
    tiles = e1 > e0 ? (e1 - e0) * tiles_per_block : 0;
  } else {
    const int64_t kend = p.causal ? (cta_last + 1 < p.m ? cta_last + 1 : p.m) : p.m;
    tiles = (kend + kBN - 1) / kBN;
  }
  const auto tile_k0 = [&](int64_t t) -> int64_t {
    int64_t k0;
    if (p.row_ptr != nullptr) {
      const int64_t kb = p.col_idx[e0 + t / tiles_per_block];
      if (kb < 0) return -1;  // bad index
      k0 = kb * p.block_size + (t % tiles_per_block) * kBN;
    } else {
      k0 = t * kBN;
    }
    if (k0 >= p.m) return -1;                               // past the keys
    if (p.causal && k0 > cta_last) return -1;               // in every query's future
    const int64_t first_old = k0 > p.sinks ? k0 : p.sinks;  // first non-sink key of the tile
    if (p.window > 0 && first_old == k0 && k0 + kBN - 1 <= cta_first - p.window) return -1;
    return k0;
  };
  const auto next_visited = [&](int64_t t) {
    while (t < tiles && tile_k0(t) < 0) ++t;
    return t;
  };

  // Prologue: Q and the first visited K, V tile into stage 0.
  load_tile_async<T, D>(sq, qg, p.q_stride[2], q0, p.n, tid);
  int64_t t = next_visited(0);
  if (t < tiles) {
    const int64_t k0 = tile_k0(t);
    load_tile_async<T, D>(sk, kg, p.k_stride[2], k0, p.m, tid);
    load_tile_async<T, D>(sv, vg, p.v_stride[2], k0, p.m, tid);
  }
  cp_async_commit();
  cp_async_wait_all();
  ptx::fence_proxy_async();
  __syncthreads();

  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = 2^(x·log2 e)
  const float kNegInf = -__int_as_float(0x7f800000);
  // O (unnormalised) for rows g + 8·hr of this warp's 16: o[4i + 2hr + e] is column 8i + 2c4 + e;
  // m the row's reference max (log2 units), l this lane's partial sum of P (the quad sums at
  // the end).
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m_i[2] = {kNegInf, kNegInf}, l_i[2] = {0.f, 0.f};

  int stage = 0;
  while (t < tiles) {
    const int64_t k0 = tile_k0(t);
    const int64_t k_last = k0 + kBN - 1;
    const int64_t first_old = k0 > p.sinks ? k0 : p.sinks;
    const bool need_mask =
        k_last >= p.m || (p.causal && k_last > cta_first) ||
        (p.window > 0 && first_old <= k_last && first_old <= cta_last - p.window);
    // Next tile's loads into the other stage, which both warpgroups finished reading before
    // the barrier that ended the previous step.
    const int64_t tn = next_visited(t + 1);
    if (tn < tiles) {
      const int64_t kn = tile_k0(tn);
      load_tile_async<T, D>(sk + (stage ^ 1) * kTile, kg, p.k_stride[2], kn, p.m, tid);
      load_tile_async<T, D>(sv + (stage ^ 1) * kTile, vg, p.v_stride[2], kn, p.m, tid);
    }
    cp_async_commit();
    const uint32_t ks = k_addr + stage * kTile, vs = v_addr + stage * kTile;

    // S = Q Kᵀ: k-step kk reads 16 columns (32 bytes) of region kk / 4 of Q's rows 64·wg.. and
    // of K; 8-row atoms 1024 bytes apart (SBO), LBO unused for K-major swizzled operands.
    float s[kBN / 2];
    ptx::wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kDk; ++kk) {
      const uint32_t off = (kk / 4) * kRegionBytes + (kk % 4) * 32;
      ptx::wgmma_ss<T, kBN>(s, ptx::sw128_desc(q_addr + wg * 64 * 128 + off, 16, 1024),
                            ptx::sw128_desc(ks + off, 16, 1024), kk > 0);
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();

    // Online softmax on rows g + 8·hr: this lane's columns 8i + 2c4 + e are s[4i + 2hr + e].
    float alpha[2];
    bool rescale = false;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      // The CPU backend's rule for key k0 + col (see block_sparse_block.cuh).
      int vis_end = kBN, win_lo = kBN + 1, win_hi = -1;
      if (need_mask) {
        const int64_t qpos = cta_first + wrow + g + 8 * hr;
        int64_t end = p.m - k0;
        if (p.causal && qpos + 1 - k0 < end) end = qpos + 1 - k0;
        vis_end = static_cast<int>(end < kBN ? (end > -1 ? end : -1) : kBN);
        if (p.window > 0) {
          const int64_t lo = p.sinks - k0, hi = qpos - p.window - k0;
          win_lo = static_cast<int>(lo < kBN + 1 ? (lo > -1 ? lo : -1) : kBN + 1);
          win_hi = static_cast<int>(hi < kBN + 1 ? (hi > -1 ? hi : -1) : kBN + 1);
        }
      }
      float mx = kNegInf;
#pragma unroll
      for (int i = 0; i < kSn; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float x = s[4 * i + 2 * hr + e] * scale_log2;
          if (need_mask) {
            const int col = 8 * i + 2 * c4 + e;
            if (col >= vis_end || (col >= win_lo && col <= win_hi)) x = kNegInf;
          }
          s[4 * i + 2 * hr + e] = x;
          mx = fmaxf(mx, x);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_old = m_i[hr];
      const float m_new = mx > m_old + kSlack ? mx : m_old;
      const float a = m_new == m_old ? 1.f : exp2_approx(m_old - m_new);  // m_old = -inf: 0
      rescale |= m_new != m_old;
      const float base = m_new == kNegInf ? 0.f : m_new;
      float rs = 0.f;
#pragma unroll
      for (int i = 0; i < kSn; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = exp2_approx(s[4 * i + 2 * hr + e] - base);
          s[4 * i + 2 * hr + e] = pe;
          rs += pe;
        }
      }
      l_i[hr] = l_i[hr] * a + rs;
      m_i[hr] = m_new;
      alpha[hr] = a;
    }
    if (rescale) {
#pragma unroll
      for (int i = 0; i < kOn; ++i) {
        o[4 * i + 0] *= alpha[0];
        o[4 * i + 1] *= alpha[0];
        o[4 * i + 2] *= alpha[1];
        o[4 * i + 3] *= alpha[1];
      }
    }

    // O += P V: k-step kt is keys 16kt.. (2048 bytes down the tile); V's two 64-column regions
    // are LBO apart, 8-key atoms SBO apart.
    // P is packed whole before the fence: registers written between two wgmma would make the
    // compiler fence each one (ptxas C7519).
    uint32_t pa[kKt][4];
#pragma unroll
    for (int kt = 0; kt < kKt; ++kt) {
      pa[kt][0] = pack2<T>(s[8 * kt + 0], s[8 * kt + 1]);
      pa[kt][1] = pack2<T>(s[8 * kt + 2], s[8 * kt + 3]);
      pa[kt][2] = pack2<T>(s[8 * kt + 4], s[8 * kt + 5]);
      pa[kt][3] = pack2<T>(s[8 * kt + 6], s[8 * kt + 7]);
    }
    ptx::wgmma_fence();
#pragma unroll
    for (int kt = 0; kt < kKt; ++kt)
      ptx::wgmma_rs<T, D>(o, pa[kt], ptx::sw128_desc(vs + kt * 2048, kRegionBytes, 1024), true);
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();

    // The next tile has landed (every thread's copies, fenced for the async proxy), and both
    // warpgroups are done with this stage.
    cp_async_wait_all();
    ptx::fence_proxy_async();
    __syncthreads();
    stage ^= 1;
    t = tn;
  }

  // out = O / l through this warpgroup's own Q rows (every wgmma that read them has completed:
  // each warpgroup waited for its last group), then 16-byte stores; l = 0 gives 0.
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float l = l_i[hr];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const int row = wrow + g + 8 * hr;
#pragma unroll
    for (int i = 0; i < kOn; ++i)
      *reinterpret_cast<uint32_t*>(sq + swizzled(row, 8 * i) + 4 * c4) =
          pack2<T>(o[4 * i + 2 * hr] * inv, o[4 * i + 2 * hr + 1] * inv);
  }
  __syncthreads();
  constexpr int kChunks = D / 8;
  T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.heads + h) * p.n * D;
#pragma unroll
  for (int i = 0; i < kBM * kChunks / kThreads; ++i) {
    const int c = tid + kThreads * i;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t qi = q0 + r;
    if (qi < p.n)
      *reinterpret_cast<uint4*>(out + qi * D + col) =
          *reinterpret_cast<const uint4*>(sq + swizzled(r, col));
  }
}

}  // namespace attnpilot::attention::cuda::block_sparse_wgmma
