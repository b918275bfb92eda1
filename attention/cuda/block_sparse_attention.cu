// Block-sparse flash-attention forward (FlashAttention-2 style), bf16/fp16 in, fp32
// accumulation, tensor cores through inline-PTX mma.sync.m16n8k16, S and P kept in registers.
//
// One CTA of 4 warps per (query tile, query head, batch entry). The query tile is kBM = 64·kM
// rows: kM = 2 (128 rows, each warp 32 rows as two 16-row m-tiles) when the whole CTA lies in
// one query block (block size a multiple of 128, or no CSR lists), kM = 1 (64 rows) for
// blocks of 64. Keys go in tiles of kBN = 64.
//
//   Q tile ──cp.async──► smem ──ldmatrix──► A fragments (kept in registers when kM·d <= 128)
//   K, V tile t+1 ──cp.async (16 B, zero-fill past M)──► the other smem stage, while tile t runs
//   for each visited 64-key tile (CSR blocks split in 64-key tiles, whole-tile skips), in
//   sub-tiles of 32 keys for kM = 2, d = 128 (registers), else the whole tile; a warp skips a
//   causal sub-tile wholly in its own queries' future:
//     S = Q Kᵀ     mma.sync; K by ldmatrix (non-transposed: K rows are Bᵀ columns)
//     softmax      S in registers: scale, mask (only tiles that need it), row max over the
//                  lane quad (__shfl_xor 1, 2), P = 2^(S - m), per-lane partial row sums l
//     O = O·α      only when a row's lazily moved reference max m changed
//     O += P V     P's C-fragments packed pairwise to bf16x2/f16x2 are exactly the A fragments
//                  of the next mma (the FA2 identity); V by ldmatrix.trans
//   out = O / l ──► smem (the warp's own Q rows) ──► 16-byte coalesced stores; l = 0 gives 0.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4):
//   A 16×16 (a0..a3): rows g, g+8 × cols 2c, 2c+1 (a0, a1) and 2c+8, 2c+9 (a2, a3)
//   B 16×8  (b0, b1): rows 2c, 2c+1 (b0) and 2c+8, 2c+9 (b1) × col g
//   C 16×8  (c0..c3): row g (c0, c1) and g+8 (c2, c3) × cols 2c, 2c+1
// so the C fragments of S for keys 16j..16j+7 and 16j+8..16j+15 are the A fragment of P for
// the k-slice j, once packed.
//
// Lazy rescaling. A row's reference max m moves only when a tile's row max exceeds it by more
// than 8 (log2 units), so P <= 2^8 (no overflow in fp32, bf16 or fp16; rounding of P relative
// to its magnitude does not depend on it) and softmax, invariant to the reference, is
// unchanged. Most tiles then skip the O·α multiply.
//
// Masking. A tile is skipped when no query of the CTA can see any of its keys (past M, wholly in
// the causal future, or wholly left of every query's streaming window): skipping equals adding
// zero to the online softmax. Tiles wholly inside the causal region (and, with a window, wholly
// inside every query's window or among the sinks) skip the per-element mask work; the rest test
// each (query, key) pair with the CPU backend's rule. The next visited tile is found before the
// current one is computed, so its loads overlap the math.
//
// Rows without keys. A CSR row with no listed block (or a query whose listed keys are all
// masked) gives exact zeros (l = 0), the contract of Backend::block_sparse for every backend.
//
// Grid: x = query tiles in reverse order (the longest causal rows start first, the short ones
// fill the tail), y = heads, z = batch; one head's query tiles are adjacent, so its K and V
// (16 MB at L = 32k, d = 128) are read from HBM about once and then from the 50 MB L2.
//
// Operation count and floor (L = 32k, 32 heads, d = 128, causal, all blocks): QKᵀ and PV are
// 4·d FLOPs per visible (query, key) pair, 4·128·32·(32k²/2) = 8.8 TFLOP, 8.9 ms at the H200's
// ~990 TFLOP/s dense bf16 (wgmma; cuDNN measured 15.2 ms, ~580 TFLOP/s). Bytes (Q, K, V read
// once, O written once) are 4·32·32k·128·2 = 1.1 GB, 0.22 ms at 4.8 TB/s: compute-bound. At
// density δ both scale with δ (plus the per-query-tile Q and O traffic, 0.5 GB at any δ).
// Expected rate. mma.sync on Hopper issues at about 2/3 of the wgmma rate (FA2, the same
// scheme, runs 330-370 TFLOP/s forward at d = 128 on an H100), ~2700 FLOP/clk per SM. Per
// 64-key tile a warp of 32 rows (kM = 2, d = 128) reads by ldmatrix K 16 KB + V 16 KB + Q 2·8 KB
// (Q once per 32-key sub-tile) for 2·32·64·128·2 = 1.05 MFLOP, 22 FLOP/B: at 128 B/clk per SM
// shared memory allows ~2800 FLOP/clk, about the mma.sync rate (16-row warps would give 16
// FLOP/B, 2048 FLOP/clk: shared-memory-bound, hence 32 rows). exp2 (MUFU, 16/clk per SM):
// 128·64 per CTA tile, ~512 clk against ~1550 clk of mma, on another pipe. Expected 300-380
// TFLOP/s: all blocks at 32k 8.8 TFLOP / 340 TFLOP/s = ~26 ms, so the 80%-of-cuDNN target
// (cuDNN 15.2 ms) is out of reach of mma.sync; it needs wgmma (sm_90a) with producer/consumer
// warpgroups. 10% of blocks at 32k (~0.9 TFLOP listed): ~2.6 ms; 5% at 128k (~7.4 TFLOP):
// ~22 ms.
//
// Resources (ptxas 13.0, sm_90, no spills, 0-byte stack), shared memory (kBM + 4·kBN)·(d + 8)·2
// bytes with padded rows (d + 8 elements: consecutive rows start 16 bytes apart modulo 128, so
// each 8-row ldmatrix phase covers all 32 banks once; the CPU emulation counts 0 conflicted
// phases): d = 128, kM = 2: 255 registers, 102 KB, 2 CTAs per SM; d = 128, kM = 1: 220, 85 KB,
// 2 per SM; d = 64, kM = 2: 255, 54 KB, 2 per SM; d = 64, kM = 1: 135, 45 KB, 3 per SM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/block_sparse_kernels.h"

namespace attnpilot::attention::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBN = kBlockSparseTile;  // keys per step of the key loop
static_assert(kBN == 64, "the S fragment loops assume 64-key tiles");

// Row stride (elements) of the Q, K, V tiles: 8 elements of padding keep 16-byte rows aligned
// and make the 8 rows of each ldmatrix phase hit distinct 16-byte bank groups.
__host__ __device__ constexpr int tile_ld(int d) { return d + 8; }

// Shared memory: Q (kBM rows), then K stage 0, K stage 1, V stage 0, V stage 1 (kBN rows each).
__host__ __device__ constexpr int64_t shared_bytes(int d, int m_tiles) {
  return (int64_t(64) * m_tiles + 4 * kBN) * tile_ld(d) * 2;
}

// ---- PTX wrappers ----

__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16 bytes global -> shared, asynchronous; !valid writes 16 zero bytes (src-size 0 reads
// nothing, src must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_size)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
// Waits until every cp.async group this thread committed has landed.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

// Four 8×8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, r[i] is matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// d = a·b + d, m16n8k16, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T, lo in the low 16 bits (the lower column of a fragment pair).
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

// 2^x (MUFU.EX2; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- end of PTX wrappers ----

// Rows r0 .. r0+kRows-1 of a [rows, D] matrix (row stride `stride` elements) into a kRows × ld
// shared tile by cp.async; rows at or past `limit` are zero (never garbage: 0 · NaN would poison
// P V).
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

template <typename T, int D, int kM>
__global__ void __launch_bounds__(kThreads) block_sparse_fwd_kernel(BlockSparseLaunch p) {
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
  constexpr float kSlack = 8.f;             // log2 headroom of the lazily moved reference max
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = sq + kBM * kLd;      // 2 stages
  T* sv = sk + 2 * kBN * kLd;  // 2 stages

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c4 = lane % 4;  // fragment row group and column pair
  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.heads / p.kv_heads);
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
  const int wrow = warp * 16 * kM;  // this warp's first row in the tile

  const int64_t cta_first = p.q_offset + q0;
  const int64_t cta_last = p.q_offset + (q0 + kBM < p.n ? q0 + kBM : p.n) - 1;

  // The key tiles to visit: listed blocks split into 64-key tiles, or every tile up to the
  // causal cut-off when no CSR lists are given.
  const int tiles_per_block = p.block_size / kBN;
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
  // First key of tile t, or -1 when the whole tile is skipped (the same for every thread of the
  // CTA, so barriers stay uniform).
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
  load_rows_async<T, D, kBM>(sq, qg, p.q_stride[2], q0, p.n, tid);
  int64_t t = next_visited(0);
  if (t < tiles) {
    const int64_t k0 = tile_k0(t);
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
  while (t < tiles) {
    const int64_t k0 = tile_k0(t);
    const int64_t k_last = k0 + kBN - 1;
    const int64_t first_old = k0 > p.sinks ? k0 : p.sinks;
    const bool need_mask =
        k_last >= p.m || (p.causal && k_last > cta_first) ||
        (p.window > 0 && first_old <= k_last && first_old <= cta_last - p.window);
    // Next tile's loads into the other stage, which every warp finished reading before the
    // barrier that ended the previous step.
    const int64_t tn = next_visited(t + 1);
    if (tn < tiles) {
      const int64_t kn = tile_k0(tn);
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

      // Online softmax on rows (mi, g + 8·hr): this lane's columns 8·nj + 2·c4 + e.
      float alpha[kM][2];
      bool rescale = false;
#pragma unroll
      for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          // The CPU backend's rule for key k0 + col: hidden when k >= M, (causal) k > qpos, or
          // (window) sinks <= k <= qpos - window; as tile columns: visible when col < vis_end
          // and not win_lo <= col <= win_hi (bounds clamped to [-1, kBN + 1], 32-bit).
          int vis_end = kBN, win_lo = kBN + 1, win_hi = -1;
          if (need_mask) {
            const int64_t qpos = cta_first + wrow + mi * 16 + g + 8 * hr;
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
          for (int nj = 0; nj < kNt; ++nj) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float x = s[mi][nj][2 * hr + e] * scale_log2;
              if (need_mask) {
                const int col = sub * kSub + nj * 8 + 2 * c4 + e;
                if (col >= vis_end || (col >= win_lo && col <= win_hi)) x = kNegInf;
              }
              s[mi][nj][2 * hr + e] = x;
              mx = fmaxf(mx, x);
            }
          }
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
          mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
          // m_new = -inf: nothing visible yet; P, O and l stay zero.
          const float m_old = m_i[mi][hr];
          const float m_new = mx > m_old + kSlack ? mx : m_old;
          const float a = m_new == m_old ? 1.f : exp2_approx(m_old - m_new);  // m_old = -inf: 0
          rescale |= m_new != m_old;
          const float base = m_new == kNegInf ? 0.f : m_new;
          float rs = 0.f;
#pragma unroll
          for (int nj = 0; nj < kNt; ++nj) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float pe = exp2_approx(s[mi][nj][2 * hr + e] - base);
              s[mi][nj][2 * hr + e] = pe;
              rs += pe;
            }
          }
          l_i[mi][hr] = l_i[mi][hr] * a + rs;
          m_i[mi][hr] = m_new;
          alpha[mi][hr] = a;
        }
      }
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

// ---- launcher (host) ----

template <typename T, int D, int kM>
cudaError_t launch_typed(const BlockSparseLaunch& p, cudaStream_t stream,
                         const char** failed_call) {
  auto kernel = block_sparse_fwd_kernel<T, D, kM>;
  const int64_t bytes = shared_bytes(D, kM);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  if (e != cudaSuccess) {
    *failed_call = "cudaFuncSetAttribute(block_sparse_fwd_kernel, MaxDynamicSharedMemorySize)";
    return e;
  }
  constexpr int kBM = 16 * kM * kWarps;
  const dim3 grid(static_cast<unsigned>((p.n + kBM - 1) / kBM), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, static_cast<size_t>(bytes), stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "block_sparse_fwd_kernel<<<(query tiles, heads, batch), 128, shared bytes>>>";
    return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_for_type(const BlockSparseLaunch& p, cudaStream_t stream,
                            const char** failed_call) {
  // 128-row CTAs when a CTA stays inside one query block (or there are no blocks).
  const bool wide = p.row_ptr == nullptr || p.block_size % 128 == 0;
  if (p.d == 64)
    return wide ? launch_typed<T, 64, 2>(p, stream, failed_call)
                : launch_typed<T, 64, 1>(p, stream, failed_call);
  return wide ? launch_typed<T, 128, 2>(p, stream, failed_call)
              : launch_typed<T, 128, 1>(p, stream, failed_call);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool strides_ok(const int64_t* s) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

}  // namespace

bool block_sparse_kernel_supports(int d, int block_size) {
  return (d == 64 || d == 128) && block_size >= kBN && block_size % kBN == 0;
}

int64_t block_sparse_shared_bytes(int d) { return shared_bytes(d, 2); }

cudaError_t launch_block_sparse_attention(const BlockSparseLaunch& p, ElemType type,
                                          cudaStream_t stream, const char** failed_call) {
  const bool csr = p.row_ptr != nullptr;
  const bool shape_ok = p.batch >= 1 && p.batch <= 65535 && p.heads >= 1 && p.heads <= 65535 &&
                        p.kv_heads >= 1 && p.heads % p.kv_heads == 0 && p.n >= 1 && p.m >= 1 &&
                        (p.n + kBN - 1) / kBN <= 0x7fffffff && p.q_offset >= 0 && p.sinks >= 0 &&
                        p.window >= 0;
  // Without CSR lists every tile is visited; with them the block grid must fit n x m. col_idx
  // may be null only when nothing is listed (row_ptr all zero; the kernel never reads it).
  const bool mask_ok = !csr || (p.q_blocks == (p.n + p.block_size - 1) / p.block_size &&
                                p.k_blocks == (p.m + p.block_size - 1) / p.block_size);
  if (!block_sparse_kernel_supports(p.d, p.block_size) || !shape_ok || !mask_ok || p.q == nullptr ||
      p.k == nullptr || p.v == nullptr || p.out == nullptr || !aligned16(p.q) || !aligned16(p.k) ||
      !aligned16(p.v) || !aligned16(p.out) || !strides_ok(p.q_stride) || !strides_ok(p.k_stride) ||
      !strides_ok(p.v_stride) || !std::isfinite(p.scale)) {
    *failed_call = "launch_block_sparse_attention (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  if (type == ElemType::kBFloat16) return launch_for_type<__nv_bfloat16>(p, stream, failed_call);
  return launch_for_type<__half>(p, stream, failed_call);
}

}  // namespace attnpilot::attention::cuda
