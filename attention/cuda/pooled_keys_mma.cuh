#pragma once
/// Block-level device code of the pooled-query block scores on the tensor cores, against the
/// keys as stored (block_estimator.cu's pooled_keys_kernel is a thin wrapper around
/// pooled_keys_block): the same scores as pooled_scores.cuh, the GPU twin of estimators.cpp's
/// lowrank_block_scores(..., pool_queries = true), without the key projection.
///
/// The rank-r score of query block qb and key j is (q̄_qb A_q)·(k_j A_k) = w_qb · k_j with
/// w_qb = A_k A_qᵀ q̄_qb (a d-vector per query block, computed by LibTorch in fp32, scaled by
/// log2(e)/√d). Scoring w against k itself reads k once (d 16-bit values per key) instead of
/// projecting it first (the projection kernel reads k and writes kp: 0.24 ms of the 0.81 ms
/// pooled estimator at 32k on an H100, 2026-12-05); the products run on the tensor cores:
///
///   w [64 query blocks × d] fp32 ──per row, scaled by a power of two σ into [-1, 1] and split
///       into hi + lo (16-bit, T = k's type: |w/σ - hi - lo| <= 2^-17 (bf16) or 2^-22 (fp16))
///       ──► A fragments in registers (each warp 16 query blocks, 2·d/16 · 4 registers)
///   k [keys × d] ──cp.async, 64-key tiles, 2 to 4 in flight──► smem ──ldmatrix──► B fragments
///   S[16 × 64] = σ·(hi·kᵀ + lo·kᵀ)   mma.sync m16n8k16, fp32 accumulators (2·d/16·8 per tile)
///   per row and key block: keys j >= kend masked, lane-local running (max, Σ 2^(s - max)),
///   combined over the lane quad at the block's end: L[qb, kb] = log2 Σ_{j in kb} 2^(s_j)
///   (then pooled_scores.cuh's pooled_normalise_row, as for the CUDA-core kernel)
///
/// k is exact in T; the split keeps ~16 (bf16) or ~21 (fp16) bits of w, so the scores match
/// the fp32 kernel's to ~1e-5 of their size. One CTA of 4 warps per (b·h, group of 64 query
/// blocks, chunk of chunk_blocks key blocks), the chunk cut at the group's last kend; grid x =
/// group + groups·chunk, so the groups sharing a key chunk run side by side (the chunk is read
/// from DRAM once, the other groups hit L2).
///
/// Work at L = 32k, 32 heads, d = 128, block 128, causal: 1.35e8 (query block, key) pairs,
/// 2·128 MACs each on the tensor cores (69 GFLOP: ~0.07 ms at 990 TFLOP/s, ~0.11 ms at the
/// ~60% mma.sync reaches), one exp2 per pair (~0.04 ms of MUFU), k read once (268 MB, 0.08 ms).
/// Measured (H100, 2026-12-06, r = 16 and 32 alike): the whole pooled estimator 0.56-0.57 ms
/// (block means, this kernel, normalisation, selection) against 0.77 / 1.2 ms with the key
/// projection and the CUDA-core kernel; the kernel's own share is not yet profiled.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/block_sparse_block.cuh"
#include "attention/cuda/mma_ptx.cuh"
#include "attention/cuda/pooled_scores.cuh"

namespace attnpilot::attention::cuda::pooled_keys {

using block_sparse::load_rows_async;
using block_sparse::pack2;
using block_sparse::tile_ld;

/// Warps, threads and query blocks (16 per warp: the mma's M) of a CTA; keys per tile.
inline constexpr int kWarps = 4;
inline constexpr int kThreads = 32 * kWarps;
inline constexpr int kGroupBlocks = 16 * kWarps;
inline constexpr int kTileKeys = kEstimatorKeyTile;
static_assert(kThreads == block_sparse::kThreads, "load_rows_async's thread count");

/// Key tiles a CTA keeps in flight (cp.async stages): 2 by default, up to kMaxStages
/// (PooledKeysLaunch::stages). ncu (H100, 2026-12-06) found the two-stage kernel latency-bound:
/// 3 CTAs of 4 warps per SM (164 registers), tensor pipe 34%, DRAM 20%.
inline constexpr int kDefaultStages = 2;
inline constexpr int kMaxStages = kPooledKeyMaxStages;

/// Shared memory of a CTA: `stages` key tiles of 64 rows × tile_ld(D) 16-bit elements.
__host__ __device__ constexpr int64_t shared_bytes(int d, int stages = kDefaultStages) {
  return int64_t(stages) * kTileKeys * tile_ld(d) * 2;
}

using pooled::div_up;
/// The CPU twin's kend of query block qb.
__host__ __device__ inline int64_t visible_keys(const PooledKeysLaunch& p, int64_t qb) {
  return pooled::pooled_visible_keys(p, qb);
}

/// Query groups and key chunks of the grid (chunk_blocks >= 1).
__host__ __device__ inline int64_t groups(const PooledKeysLaunch& p) {
  return div_up(p.q_blocks, kGroupBlocks);
}
__host__ __device__ inline int64_t chunks(const PooledKeysLaunch& p) {
  return div_up(p.k_blocks, p.chunk_blocks);
}

/// A type as a value, for dispatch_config's callback.
template <typename T>
struct TypeTag {
  using type = T;
};

/// The launchers' dispatch over p's key type (bf16 or fp16), head dim (64 or 128) and `stages`
/// (2, 3 or 4): f(TypeTag<T>, integral_constant D, integral_constant S), once.
template <class F>
void dispatch_config(const PooledKeysLaunch& p, int stages, F&& f) {
  const auto by_stages = [&](auto type, auto dim) {
    if (stages == 2)
      f(type, dim, std::integral_constant<int, 2>{});
    else if (stages == 3)
      f(type, dim, std::integral_constant<int, 3>{});
    else
      f(type, dim, std::integral_constant<int, 4>{});
  };
  const bool bf16 = p.type == InputType::kBFloat16;
  if (p.d == 64)
    bf16 ? by_stages(TypeTag<__nv_bfloat16>{}, std::integral_constant<int, 64>{})
         : by_stages(TypeTag<__half>{}, std::integral_constant<int, 64>{});
  else
    bf16 ? by_stages(TypeTag<__nv_bfloat16>{}, std::integral_constant<int, 128>{})
         : by_stages(TypeTag<__half>{}, std::integral_constant<int, 128>{});
}

#ifndef ATTNPILOT_CUDA_EMU
/// The grid of either pooled-key kernel: x = group + groups·chunk, y = head, z = batch entry.
inline dim3 keys_grid(const PooledKeysLaunch& p) {
  return dim3(static_cast<unsigned>(chunks(p) * groups(p)), static_cast<unsigned>(p.heads),
              static_cast<unsigned>(p.batch));
}

/// Launches one pooled-key kernel (kernel(p, groups), kThreads threads, `bytes` of dynamic
/// shared memory) on `stream`, opting in to more than 48 KB only where needed (the default
/// mma.sync launch makes no such driver call); a failure names `what`.
template <class Kernel>
cudaError_t launch_keys_kernel(Kernel kernel, const PooledKeysLaunch& p, int bytes,
                               cudaStream_t stream, const char* what, const char** failed_call) {
  if (bytes > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e != cudaSuccess) {
      *failed_call = "cudaFuncSetAttribute(pooled keys kernel, MaxDynamicSharedMemorySize)";
      return e;
    }
  }
  kernel<<<keys_grid(p), kThreads, static_cast<size_t>(bytes), stream>>>(p, groups(p));
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) *failed_call = what;
  return e;
}
#endif

/// x rounded to T (to nearest even), as a float.
template <typename T>
__device__ __forceinline__ float round_to(float x);
template <>
__device__ __forceinline__ float round_to<__nv_bfloat16>(float x) {
  return __bfloat162float(__float2bfloat16(x));
}
template <>
__device__ __forceinline__ float round_to<__half>(float x) {
  return __half2float(__float2half(x));
}

/// This thread's two rows of w (g and g + 8 of its warp's 16) as hi and lo A fragments of
/// m16n8k16 (a0: row g, columns 2c4, 2c4+1 of the k-step; a1: row g+8; a2, a3: columns + 8),
/// each row divided by sigma[hr], a power of two >= its largest |w| (1 for a zero row).
template <typename T, int D>
__device__ __forceinline__ void load_w(uint32_t (&hi)[D / 16][4], uint32_t (&lo)[D / 16][4],
                                       float (&sigma)[2], const float* const (&row)[2], int c4) {
  // This thread's 2·d/4 values, as float2 loads (columns 2c4, 2c4 + 1: 8-byte aligned).
  float2 v[2][D / 16][2];
  float mx[2] = {0.f, 0.f};
#pragma unroll
  for (int hr = 0; hr < 2; ++hr)
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        v[hr][kk][half] = *reinterpret_cast<const float2*>(row[hr] + 16 * kk + 8 * half + 2 * c4);
        mx[hr] = fmaxf(mx[hr], fmaxf(fabsf(v[hr][kk][half].x), fabsf(v[hr][kk][half].y)));
      }
  float inv[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
    int ex = 0;
    frexpf(mx[hr], &ex);  // mx < 2^ex (0 for mx = 0)
    sigma[hr] = mx[hr] > 0.f ? ldexpf(1.f, ex) : 1.f;
    inv[hr] = mx[hr] > 0.f ? ldexpf(1.f, -ex) : 1.f;
  }
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float x0 = v[hr][kk][half].x * inv[hr], x1 = v[hr][kk][half].y * inv[hr];
        const float h0 = round_to<T>(x0), h1 = round_to<T>(x1);
        hi[kk][2 * half + hr] = pack2<T>(h0, h1);  // exact
        lo[kk][2 * half + hr] = pack2<T>(x0 - h0, x1 - h1);
      }
}

/// One row's 64 keys of a tile (this lane's kTileKeys / 4 of them, at(i, e) the raw product of
/// key k0 + 8i + 2c4 + e, to be scaled by sigma), folded into the lane-local running max mx and
/// Σ 2^(s - mx) of the current key block (s = at·sigma). kMayMask: keys at or past kend are
/// masked when need_mask (false: no key of the tile is masked, need_mask is ignored and no
/// masking code runs; callers branch on the warp-uniform need_mask). sigma is a power of two,
/// so scaling commutes exactly with the max and fuses exactly into the exponent's FMA: per
/// score a max, an FMA, an exp2 and an add (and with a mask a comparison and a select). The
/// maxima and sums run as four interleaved chains (one warp per scheduler: the latency of one
/// long chain would show). The masked scores are written back as -inf (in place), or with
/// kInPlace = false recomputed instead and the running max updated by selects: for the
/// pipelined wgmma body, which folds beside an in-flight wgmma.
template <bool kInPlace = true, bool kMayMask = true, class At>
__device__ __forceinline__ void fold_keys(At&& at, float sigma, bool need_mask, int64_t k0,
                                          int64_t kend, int c4, float& mx, float& sum) {
  const float kNegInf = -INFINITY;
  constexpr int kChains = 4;
  // Keys 8i + e >= lim of this lane are masked (lim in [0, 64]: the tile's 64 keys or none).
  int lim = kTileKeys;
  if constexpr (kMayMask) {
    int64_t rel = kend - k0 - 2 * c4;
    rel = rel < 0 ? 0 : rel > kTileKeys ? kTileKeys : rel;
    lim = need_mask ? static_cast<int>(rel) : kTileKeys;
  }
  const auto masked = [&](int i, int e) {
    if constexpr (kMayMask) return 8 * i + e >= lim ? kNegInf : at(i, e);
    return at(i, e);
  };
  float tm[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) tm[c] = kNegInf;
#pragma unroll
  for (int i = 0; i < kTileKeys / 8; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float x = masked(i, e);
      if constexpr (kInPlace && kMayMask) at(i, e) = x;
      tm[(2 * i + e) % kChains] = fmaxf(tm[(2 * i + e) % kChains], x);
    }
  float tmax = fmaxf(fmaxf(tm[0], tm[1]), fmaxf(tm[2], tm[3]));
  tmax *= sigma;  // exact (a power of two; -inf stays -inf)
  if constexpr (kInPlace) {
    if (tmax > mx) {
      sum *= ptx::exp2_approx(mx - tmax);  // mx = -inf: sum is 0 and stays 0
      mx = tmax;
    }
  } else {  // the same by selects (no per-thread branch beside an in-flight wgmma)
    const float new_mx = fmaxf(mx, tmax);
    sum *= new_mx == mx ? 1.f : ptx::exp2_approx(mx - new_mx);
    mx = new_mx;
  }
  const float neg_base = mx == kNegInf ? 0.f : -mx;  // all masked so far: adds 0
  float acc[kChains] = {};
#pragma unroll
  for (int i = 0; i < kTileKeys / 8; ++i)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float x = kInPlace ? at(i, e) : masked(i, e);
      acc[(2 * i + e) % kChains] += ptx::exp2_approx(fmaf(x, sigma, neg_base));
    }
  sum += (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

/// Where the lazy fold accepts its sum (fold_keys_branched): 2^-64 <= Σ 2^(s - ref) <= 2^64.
inline constexpr float kLazyLow = 0x1p-64f, kLazyHigh = 0x1p64f;

/// fold_keys with the mask code only where the warp-uniform need_mask asks for it (a branch:
/// not for the pipelined wgmma body, whose folds run beside an in-flight wgmma).
///
/// lazy (PooledKeysLaunch::lazy_max): an unmasked half is first folded against the row's
/// reference `ref` (the thread's last exact running maximum, carried across key blocks) with no
/// maximum at all: Σ 2^(s - ref), an FMA, an exp2 and an add per score, the exp2s independent
/// of any reduction. The sum is kept when it lies in [kLazyLow, kLazyHigh] (no term overflows,
/// the largest is within 2^70 of 1, so the terms it drops, below 2^-126, are below 2^-56 of it:
/// the exact fold drops them too, or adds them below its rounding); the block's running pair then
/// becomes (ref, sum + that sum). Else (the scores moved far from ref; rare) the half is folded
/// exactly, and ref becomes the new running maximum. Invariant: a block's running mx, once
/// finite, equals ref. The scores are those of the exact fold up to the rounding of the exp2
/// arguments (one ulp of each term); deterministic, but since ref crosses the key blocks of a
/// CTA, where a key chunk starts changes their last bits (within 1e-6 on the GPU tests).
template <class At>
__device__ __forceinline__ void fold_keys_branched(At&& at, float sigma, bool need_mask, int64_t k0,
                                                   int64_t kend, int c4, float& mx, float& sum,
                                                   bool lazy = false, float* ref = nullptr) {
  if (need_mask) {
    fold_keys<true, true>(at, sigma, true, k0, kend, c4, mx, sum);
  } else {
    if (lazy && *ref != -INFINITY) {
      constexpr int kChains = 4;
      const float neg_ref = -*ref;
      float acc[kChains] = {};
#pragma unroll
      for (int i = 0; i < kTileKeys / 8; ++i)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          acc[(2 * i + e) % kChains] += ptx::exp2_approx(fmaf(at(i, e), sigma, neg_ref));
      const float t = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      if (t >= kLazyLow && t <= kLazyHigh) {  // (false for NaN)
        sum = mx == -INFINITY ? t : sum + t;  // mx is -inf or ref
        mx = *ref;
        return;
      }
    }
    fold_keys<true, false>(at, sigma, false, k0, kend, c4, mx, sum);
  }
  if (lazy && mx != -INFINITY) *ref = mx;
}

/// The end of key block kb for one row: the lane quad's partial (mx, sum) pairs combine into
/// L = log2 Σ 2^(s_j), written to out[kb] by lane c4 = 0 when kb < vis (a key of kb is visible
/// to the row, so the max is finite and the sum >= 1); mx and sum start over. Every lane of
/// the warp calls it (shuffles).
__device__ __forceinline__ void flush_block(float& mx, float& sum, float* out, int64_t kb,
                                            int64_t vis, int c4) {
  const float kNegInf = -INFINITY;
  float m_all = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, 2));
  const float base = m_all == kNegInf ? 0.f : m_all;
  float l = mx == kNegInf ? 0.f : sum * ptx::exp2_approx(mx - base);
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  if (c4 == 0 && kb < vis) out[kb] = m_all + log2f(l);
  mx = kNegInf;
  sum = 0.f;
}

/// What a CTA of either score body (this one, pooled_keys_wgmma.cuh) and its threads work on:
/// the CTA's keys [k_lo, k_hi) (its chunk, cut at its last query block's kend; empty: nothing
/// to do), the thread's warp's query blocks (16 from qb0: the keys the warp's last and first
/// see, warp_kmax and warp_kmin) and the thread's two rows g and g + 8 (their kend, visible
/// blocks, score rows and w rows; rows past q_blocks: kend 0, w and scores of row 0).
struct ChunkRows {
  int64_t k_lo = 0, k_hi = 0;
  int64_t warp_kmax = 0, warp_kmin = 0;
  int64_t kend[2], vis[2];
  float* out[2];
  const float* wrow[2];

  /// The CTA's keys [k_lo, k_hi) alone: a CTA with none returns before the per-row set-up (a
  /// third of a causal grid's CTAs; before this, such a CTA ran 322 instructions per warp with
  /// the grid decode: ncu, H100, 2026-12-06).
  __device__ __forceinline__ static bool chunk_keys(const PooledKeysLaunch& p, int64_t chunk,
                                                    int64_t group, int64_t& k_lo, int64_t& k_hi) {
    const int64_t bs = p.block_size, first = group * kGroupBlocks;
    const int64_t qb_cta_last =
        first + kGroupBlocks <= p.q_blocks ? first + kGroupBlocks - 1 : p.q_blocks - 1;
    k_lo = chunk * p.chunk_blocks * bs;
    k_hi = (chunk + 1) * p.chunk_blocks * bs;
    const int64_t kend_cta = visible_keys(p, qb_cta_last);
    if (k_hi > kend_cta) k_hi = kend_cta;
    return k_lo < k_hi;
  }

  /// The per-row set-up, for a CTA whose chunk_keys [lo, hi) are not empty (computed once, by
  /// the caller's early-exit test).
  __device__ __forceinline__ ChunkRows(const PooledKeysLaunch& p, int64_t lo, int64_t hi,
                                       int64_t group, int64_t bh, int warp, int g, int d)
      : k_lo(lo), k_hi(hi) {
    const int64_t bs = p.block_size, first = group * kGroupBlocks;
    const int64_t qb0 = first + 16 * warp;
    const int64_t qb_last = qb0 + 15 < p.q_blocks ? qb0 + 15 : p.q_blocks - 1;
    warp_kmax = qb0 < p.q_blocks ? visible_keys(p, qb_last) : 0;
    warp_kmin = qb0 + 15 < p.q_blocks ? visible_keys(p, qb0) : 0;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int64_t qb = qb0 + g + 8 * hr;
      const bool active = qb < p.q_blocks;
      kend[hr] = active ? visible_keys(p, qb) : 0;
      vis[hr] = div_up(kend[hr], bs);
      out[hr] = p.scores + (bh * p.q_blocks + (active ? qb : 0)) * p.k_blocks;
      wrow[hr] = p.w + (bh * p.q_blocks + (active ? qb : 0)) * d;
    }
  }
};

/// One CTA (kThreads threads, all of which call it: it holds barriers): query blocks group·64 ..
/// group·64 + 63, key blocks chunk·chunk_blocks .. of head bh = b·heads + h; writes L[qb, kb]
/// into p.scores for the visible key blocks kb < vis(qb) of its chunk, nothing else. `tiles`:
/// shared_bytes(D, S) bytes, 16-byte aligned. S key tiles are in flight (tile t + S - 1 is
/// loaded while tile t is scored); the scores do not depend on S.
template <typename T, int D, int S = kDefaultStages>
__device__ inline void pooled_keys_block(const PooledKeysLaunch& p, int64_t chunk, int64_t group,
                                         int64_t bh, T* tiles) {
  constexpr int kLd = tile_ld(D);
  constexpr int kDk = D / 16;
  const float kNegInf = -INFINITY;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, c4 = lane % 4;
  const int64_t bs = p.block_size;
  int64_t k_lo = 0, k_hi = 0;
  if (!ChunkRows::chunk_keys(p, chunk, group, k_lo, k_hi)) return;  // CTA-uniform: no key seen
  const ChunkRows cr(p, k_lo, k_hi, group, bh, warp, g, D);
  const int64_t ntiles = div_up(cr.k_hi - cr.k_lo, kTileKeys);
  const int64_t b = bh / p.heads, h = bh % p.heads;
  const int64_t kvh = h / (p.heads / p.kv_heads);
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  // K rows as B of S (non-transposed, as block_sparse_block.cuh's S = Q Kᵀ).
  const int kb_row = (lane % 8) + 8 * (lane / 16), kb_col = 8 * ((lane / 8) % 2);

  static_assert(S >= 2 && S <= kMaxStages, "2 to kMaxStages key tiles in flight");
  // Tiles 0 .. S-2 in flight; one cp.async group per tile (empty past the last), so "tile t
  // has landed" is "all but the S-2 newest groups have".
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    if (i < ntiles)
      load_rows_async<T, D, kTileKeys>(tiles + i * kTileKeys * kLd, kg, p.k_stride[2],
                                       cr.k_lo + i * kTileKeys, p.m, tid);
    ptx::cp_async_commit();
  }
  // w while the first tiles load.
  uint32_t ahi[kDk][4], alo[kDk][4];
  float sigma[2];
  load_w<T, D>(ahi, alo, sigma, cr.wrow, c4);  // rows past q_blocks read row 0 (all masked)

  // Lane-local running max and Σ 2^(s - max) of the current key block, per row; the tiles
  // left in that block (64-key tiles; the chunk starts at a block boundary) and its index.
  float mx[2] = {kNegInf, kNegInf}, sum[2] = {0.f, 0.f};
  float ref[2] = {kNegInf, kNegInf};  // the lazy fold's per-row references (p.lazy_max)
  const int tiles_per_block = static_cast<int>(bs / kTileKeys);
  int block_left = tiles_per_block;
  int64_t kb = cr.k_lo / bs;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t k0 = cr.k_lo + t * kTileKeys;
    ptx::cp_async_wait_group<S - 2>();  // this thread's copies of tile t have landed ...
    __syncthreads();  // ... everyone's, and every warp is done with tile t-1 and its stage
    // Tile t + S - 1 into the stage tile t - 1 used.
    if (t + S - 1 < ntiles)
      load_rows_async<T, D, kTileKeys>(tiles + ((t + S - 1) % S) * kTileKeys * kLd, kg,
                                       p.k_stride[2], k0 + (S - 1) * kTileKeys, p.m, tid);
    ptx::cp_async_commit();
    const int stage = static_cast<int>(t % S);
    if (k0 < cr.warp_kmax) {  // warp-uniform: some row of the warp sees a key of the tile
      const T* ks = tiles + stage * kTileKeys * kLd;
      float s[kTileKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kTileKeys / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kDk; ++kk)
#pragma unroll
        for (int np = 0; np < kTileKeys / 16; ++np) {
          uint32_t bf[4];
          ptx::ldmatrix_x4(bf, ks + (16 * np + kb_row) * kLd + 16 * kk + kb_col);
          ptx::mma_16816<T>(s[2 * np], ahi[kk], bf[0], bf[1]);
          ptx::mma_16816<T>(s[2 * np + 1], ahi[kk], bf[2], bf[3]);
          if (p.split) {  // CTA-uniform
            ptx::mma_16816<T>(s[2 * np], alo[kk], bf[0], bf[1]);
            ptx::mma_16816<T>(s[2 * np + 1], alo[kk], bf[2], bf[3]);
          }
        }
      const bool need_mask = k0 + kTileKeys > cr.warp_kmin;  // warp-uniform
#pragma unroll
      for (int hr = 0; hr < 2; ++hr)
        fold_keys_branched([&](int i, int e) -> float& { return s[i][2 * hr + e]; }, sigma[hr],
                           need_mask, k0, cr.kend[hr], c4, mx[hr], sum[hr], p.lazy_max, &ref[hr]);
    }
    // End of a key block (tiles never straddle one: the chunk start and bs are multiples of 64) or
    // of the CTA's keys (by counters, not a 64-bit modulo per tile: a division routine).
    if (--block_left == 0 || t + 1 == ntiles) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) flush_block(mx[hr], sum[hr], cr.out[hr], kb, cr.vis[hr], c4);
      block_left = tiles_per_block;
      ++kb;
    }
  }
  ptx::cp_async_wait_all();  // no copy outlives the CTA (the groups past the last tile are empty)
}

}  // namespace attnpilot::attention::cuda::pooled_keys
