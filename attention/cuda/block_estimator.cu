// The CUDA low-rank block estimator: rank-r block scores on the tensor cores, then the block
// selection of estimators.cpp's select_blocks, written as CSR lists on the device.
//
// What it computes (the CPU twin, lowrank_block_scores): for each (b, h, query block qb) take
// ns = min(8, rows) evenly spaced query rows (sample[t] = rows-1 - (t·rows)/ns), project them
// (q a_q/√d), score them against every projected key k a_k, hide keys j > q_offset + i (causal)
// and j >= m, softmax per row (fp32), average over the rows and sum per key block:
//
//   score[qb, kb] = (1/ns) Σ_t Σ_{j in kb} exp(s_tj - m_t) / l_t
//                 = (1/ns) Σ_t exp2(L_t[kb] - M_t) / Σ_kb' exp2(L_t[kb'] - M_t)
//
// with L_t[kb] = log2 Σ_{j in kb} 2^(s_tj·log2 e) (a per-(row, key block) log-sum-exp) and
// M_t = max_kb L_t[kb]. One pass over the keys gives every L_t[kb]; a short second pass over the
// L values (KB per row, not M) normalises. The L rows live in shared memory when they fit
// (KB <= 128: 32 KB per CTA), else in a global workspace slice per CTA of a persistent grid.
//
// Score kernel, one CTA of 4 warps per tile of 8 query blocks (heaviest tiles first):
//
//   warp w: rows 0-7 = samples of query block 2w, rows 8-15 = of block 2w+1 (the mma's M = 16)
//   for each 64-key tile up to the tile's last visible key:
//     kp tile ──smem (fp32 split into tf32 hi + lo, rows past m zero)
//     S[16 × 64] = qs·kpᵀ by mma.sync m16n8k8 tf32, three products (hi·hi + hi·lo + lo·hi:
//                  "3xTF32", about fp32 accuracy) or, with split_tf32 = false, one (scores
//                  within ~2e-3 of the fp32 twin in the emulation; a third of the mma and
//                  shared-memory work)
//     mask (only tiles that cross a row's causal limit, m, or hold unused rows), tile max per row
//     (quad shuffles), per-lane Σ 2^(s - max) folded into the key block's running (max, sum)
//   at each key block's end: L_t[kb] = max + log2(quad sum)
//   then per warp: M_t, l_t over L_t[0..vis), scores[qb, kb] (zero past vis)
//
// Pooled queries (HeadPlan::pool_queries; lowrank_block_scores(..., pool_queries = true)): one
// row per query block, the mean of its queries (a LibTorch fp32 reduction in cuda_estimator.cpp)
// projected by the projection kernel below, scored against the keys j < kend on the CUDA cores
// in plain fp32 (pooled_scores.cuh: two query blocks per thread up to rank 32, 128 threads per
// CTA, key tiles of 64 in shared memory read as broadcasts, an online max/sum per key block,
// L[qb, kb] written into the scores, then one warp per row normalises in place). 8x fewer (query,
// key) pairs than the sampled rows at block 128 (1.3e8 at 32k, 32 heads): ~0.1 ms of FFMA/MUFU by
// the count in pooled_scores.cuh. Not measured on a GPU yet; tested on the CPU through
// tests/cuda_emu.
//
// Selection kernel, one warp per row (b, h, qb), select_blocks' rule exactly: the sink block 0
// and the diagonal blocks first (mass summed in the CPU's order), then the other visible blocks
// by descending score, ties to the lower index (a bitonic sort of 64-bit keys ~score<<32 | kb in
// shared memory: the order of std::stable_sort), taken while mass < gamma·total (or count <
// budget). Mass prefix sums are float64 as on the CPU, but summed as a warp scan, not one by
// one: a mask can differ from the CPU's only where a prefix mass lies within a few float64 ulps
// of gamma·total. Then a CUB exclusive scan of the per-row counts gives row_ptr, and a scatter
// (one warp per row, popcount prefix over the row's bitmap) writes col_idx in ascending order.
//
// Operation count and floor (L = 32k, 32 heads, d = 128, r = 16, block 128, causal): sampled
// (row, key) pairs 32 · 8 · Σ_qb kend ≈ 1.07e9; the scores are 16 FMA per pair (34 GFLOP;
// 3xTF32 triples the tensor-core work to ~100 GFLOP: 0.2 ms at the datasheet's ~495 TFLOP/s
// dense tf32, more through mma.sync, which reaches only part of it; one tf32 pass is a third)
// and one exp2 per pair: 1.07e9 MUFU ops at 16/clk/SM (132 SMs, ~1.9 GHz) ≈ 0.27 ms — the
// floor of this design (exp2 throughput). The mask/max/sum epilogue adds ~4 fp32 ops per pair
// (~0.13 ms at 128/clk/SM, overlappable). The projection kernel reads k once (268 MB bf16,
// 56 µs at 4.8 TB/s) and writes kp (67 MB fp32); the sampled query rows are 1/16 of q at block
// 128. Plain fp32 FMAs instead of the tensor cores would be 0.5 ms of FFMA alone.
//
// Projection (projection_block.cuh): measured 251 µs on an H100 for k [1, 32, 32768, 128] bf16 at
// rank_pad 16 (2026-12-05) against the ~0.1 ms byte floor above, bound by the shared-memory float4
// broadcasts of a (one per 4 FMAs: one output row per thread). ProjectionLaunch::rows_per_thread
// = 4 (CudaEstimatorOptions::projection_rows) runs a variant with 4 rows per thread (2 at
// rank_pad 64), so each broadcast feeds 16 FMAs, in CTAs of 512 rows with a staged per 64-byte
// column chunk and at most 48 KB of shared memory; 113-230 registers, no spills (ptxas, sm_90).
// Expected to approach the byte floor; not measured yet, so 1 stays the default. Expected:
// ~0.4-0.5 ms in all at 32k/128 (block 64 doubles the sampled rows and so the pairs); a key-tile
// double buffer and exp2 on the FMA pipe for part of the elements (FlashAttention-3's trick) are
// the next steps if the measurement says so.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cub/device/device_scan.cuh>
#include <type_traits>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/pooled_scores.cuh"
#include "attention/cuda/projection_block.cuh"

namespace attnpilot::attention::cuda {
namespace {

constexpr int kRows = kEstimatorSampleRows;  // 8 sampled rows per query block
constexpr int kKeyTile = kEstimatorKeyTile;  // 64 keys per tile
constexpr int kScoreWarps = 4;               // each warp: 2 query blocks (16 mma rows)
constexpr int kScoreThreads = 32 * kScoreWarps;
constexpr int kTileQueryBlocks = 2 * kScoreWarps;  // query blocks per CTA work item
constexpr int64_t kLseSmemMaxBlocks = 128;         // L rows in shared memory up to this KB

// ---- tensor-core helpers ----
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
// c += a·b for one m16n8k8 tf32 tile (PTX fragment layout: groupID g = lane/4, tig = lane%4;
// a0 (g, tig), a1 (g+8, tig), a2 (g, tig+4), a3 (g+8, tig+4); b0 (k tig, n g), b1 (k tig+4, n g);
// c0 (g, 2tig), c1 (g, 2tig+1), c2 (g+8, 2tig), c3 (g+8, 2tig+1)).
__device__ __forceinline__ void mma_tf32(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// 2^x on the special-function unit, denormal results flushed to zero (a single MUFU.EX2; plain
// exp2f adds range scaling around it). Used for the per-(row, key) terms, each <= 1 and summed
// with at least one term equal to 1, so a flushed 2^-126 changes nothing visible.
__device__ __forceinline__ float exp2_ftz(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}
// ---- end of tensor-core helpers ----

__device__ __forceinline__ float neg_inf() { return -__int_as_float(0x7f800000); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Rows of query block qb (the last block may be short).
__device__ __forceinline__ int64_t block_rows(int64_t qb, int64_t n, int64_t bs) {
  const int64_t i0 = qb * bs;
  return n - i0 < bs ? n - i0 : bs;
}

// Visible key blocks of query block qb: ceil(kend / bs), kend the CPU twin's key count.
__device__ __forceinline__ int64_t visible_blocks(int64_t qb, int64_t n, int64_t m, int64_t bs,
                                                  bool causal, int64_t q_offset) {
  if (!causal) return ceil_div(m, bs);
  const int64_t end = q_offset + qb * bs + block_rows(qb, n, bs);
  return ceil_div(end < m ? end : m, bs);
}

// ---- (1) projections (the bodies are in projection_block.cuh) ----

// grid (row tiles of 128·ROWS rows, heads, batch). ROWS = 1: a·scale whole in shared memory
// (d·R floats: over 48 KB for large d·R, the launcher opts in); ROWS > 1: at most 48 KB.
template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(proj::kProjThreads)
    projection_kernel(ProjectionLaunch p, bool vectorized) {
  extern __shared__ __align__(16) unsigned char smem[];
  proj::projection_block<T, R, ROWS>(p, blockIdx.x, blockIdx.y, blockIdx.z, smem, vectorized);
}

// ---- (2) block scores ----

__host__ __device__ constexpr int key_ld(int r) { return r + 4; }  // conflict-free b loads

// Two buffers (double buffering), each the tf32 hi and lo parts of a key tile.
__host__ __device__ constexpr int64_t score_tile_bytes(int r) {
  return int64_t(4) * kKeyTile * key_ld(r) * 4;
}

// The score kernel's workspace starts with the work counter (16 bytes), then, when the L rows
// do not fit in shared memory, one slice of 4 warps × 16 rows × k_blocks floats per CTA.
constexpr int64_t kCounterFloats = 4;

// kSplit: three tf32 products per score (about fp32), else one (tf32: ~1e-3 relative).
template <int R, bool kSplit>
__global__ void __launch_bounds__(kScoreThreads) block_scores_kernel(BlockScoresLaunch p) {
  constexpr int kLd = key_ld(R);
  constexpr int kKs = R / 8;                  // k-steps of the mma
  constexpr int kTileWords = kKeyTile * kLd;  // one of hi / lo
  constexpr int kLoads = (kKeyTile * R / 4 + kScoreThreads - 1) / kScoreThreads;  // float4s
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ unsigned int next_item;
  // Buffer b: hi parts at tiles + 2b·kTileWords, lo parts after them ([kKeyTile][kLd] each).
  uint32_t* tiles = reinterpret_cast<uint32_t*>(smem);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  const int64_t bs = p.block_size, kbn = p.k_blocks;
  unsigned int* counter = reinterpret_cast<unsigned int*>(p.workspace);
  // This warp's 16 L rows (row 8·half + t: sample t of its query block 2·warp + half).
  float* lse = kbn > kLseSmemMaxBlocks
                   ? p.workspace + kCounterFloats +
                         (static_cast<int64_t>(blockIdx.x) * kScoreWarps + warp) * 16 * kbn
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
              ts += exp2_ftz(s[nt][2 * hf] - tm) + exp2_ftz(s[nt][2 * hf + 1] - tm);
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

// ---- (2p) pooled-query block scores (the bodies are in pooled_scores.cuh) ----

// grid (query groups × key chunks, heads, batch): blockIdx.x = chunk + chunks·(groups-1 - group),
// so the last query groups (the most keys, causal) start first.
template <int R>
__global__ void __launch_bounds__(pooled::kPooledThreads)
    pooled_scores_kernel(PooledScoresLaunch p, int64_t chunks, int64_t groups) {
  __shared__ __align__(16) float tiles[2 * pooled::kPooledKeyTile * R];
  const int64_t chunk = blockIdx.x % chunks, group = groups - 1 - blockIdx.x / chunks;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  pooled::pooled_scores_block<R>(p, chunk, group, bh, tiles);
}

constexpr int kNormaliseWarps = 4;

// One warp per row of the scores.
__global__ void __launch_bounds__(32 * kNormaliseWarps)
    pooled_normalise_kernel(PooledScoresLaunch p, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kNormaliseWarps + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps; no block barriers
  pooled::pooled_normalise_row(p, row);
}

// ---- (3) selection ----

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

// One warp per row. Shared memory: sort keys [cap] (cap = pow2 >= k_blocks), bitmap [words].
__global__ void __launch_bounds__(32)
    select_kernel(SelectLaunch p, uint32_t* bitmap, int64_t* counts, int cap) {
  extern __shared__ __align__(16) unsigned char smem[];
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);
  const int64_t words = ceil_div(p.k_blocks, 32);
  uint32_t* bits = reinterpret_cast<uint32_t*>(keys + cap);
  const int lane = threadIdx.x;
  const int64_t row = blockIdx.x;
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

// ---- (5) scatter ----

// One warp per row: the set bits of the row's bitmap, ascending, at col_idx[row_ptr[row] ..).
__global__ void __launch_bounds__(128) scatter_kernel(SelectLaunch p, const uint32_t* bitmap) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
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

// ---- launchers (host) ----

bool rank_ok(int r) { return r == 8 || r == 16 || r == 32 || r == 64; }

template <typename T>
cudaError_t launch_projection_typed(const ProjectionLaunch& p, cudaStream_t stream,
                                    const char** failed_call) {
  const bool vectorized = proj::projection_vectorized(p, static_cast<int>(sizeof(T)));
  // One row per thread: a whole in shared memory (over 48 KB for large d·R: opt in).
  auto run = [&](auto kernel) -> cudaError_t {
    const int64_t bytes = proj::projection_smem_bytes<T>(1, p.d, p.rank_pad);
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(bytes));
    if (e != cudaSuccess) {
      *failed_call = "cudaFuncSetAttribute(projection_kernel, MaxDynamicSharedMemorySize)";
      return e;
    }
    const dim3 grid(static_cast<unsigned>(ceil_div(p.rows_out, proj::kProjThreads)),
                    static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
    kernel<<<grid, proj::kProjThreads, static_cast<size_t>(bytes), stream>>>(p, vectorized);
    e = cudaGetLastError();
    if (e != cudaSuccess) *failed_call = "projection_kernel<<<(row tiles, heads, batch), 128>>>";
    return e;
  };
  // Several rows per thread: a staged per chunk, at most 48 KB (no opt-in).
  auto run_rows = [&](auto kernel, auto rows_c) -> cudaError_t {
    constexpr int kRowsPerThread = decltype(rows_c)::value;
    const int64_t bytes = proj::projection_smem_bytes<T>(kRowsPerThread, p.d, p.rank_pad);
    const dim3 grid(
        static_cast<unsigned>(ceil_div(p.rows_out, proj::projection_cta_rows(kRowsPerThread))),
        static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
    kernel<<<grid, proj::kProjThreads, static_cast<size_t>(bytes), stream>>>(p, vectorized);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
      *failed_call =
          "projection_kernel<rows per thread>"
          "<<<(row tiles of 128·rows, heads, batch), 128>>>";
    return e;
  };
  using Four = std::integral_constant<int, 4>;
  using Two = std::integral_constant<int, 2>;
  static_assert(
      proj::projection_rows_per_thread(4, 64) == 2 && proj::projection_rows_per_thread(4, 32) == 4,
      "the kernels instantiated below");
  static_assert(proj::projection_smem_bytes<T>(4, 256, 32) <= 48 * 1024 &&
                    proj::projection_smem_bytes<T>(2, 256, 64) <= 48 * 1024,
                "the multi-row variant needs no shared-memory opt-in");
  if (p.rows_per_thread == 1) {
    switch (p.rank_pad) {
      case 8:
        return run(projection_kernel<T, 8, 1>);
      case 16:
        return run(projection_kernel<T, 16, 1>);
      case 32:
        return run(projection_kernel<T, 32, 1>);
      default:
        return run(projection_kernel<T, 64, 1>);
    }
  }
  switch (p.rank_pad) {
    case 8:
      return run_rows(projection_kernel<T, 8, 4>, Four{});
    case 16:
      return run_rows(projection_kernel<T, 16, 4>, Four{});
    case 32:
      return run_rows(projection_kernel<T, 32, 4>, Four{});
    default:  // 4·64 accumulators would not fit in a thread's registers
      return run_rows(projection_kernel<T, 64, 2>, Two{});
  }
}

// Grid, shared memory and workspace of the score kernel (shared by the size query and launch).
struct ScorePlan {
  int grid = 0;
  int64_t smem = 0;
  size_t workspace = 0;
};

template <int R>
cudaError_t plan_scores_typed(const BlockScoresLaunch& p, ScorePlan* plan,
                              const char** failed_call) {
  auto kernel = p.split_tf32 ? block_scores_kernel<R, true> : block_scores_kernel<R, false>;
  const bool in_smem = p.k_blocks <= kLseSmemMaxBlocks;
  plan->smem = score_tile_bytes(R) + (in_smem ? int64_t(kScoreWarps) * 16 * p.k_blocks * 4 : 0);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(plan->smem));
  if (e != cudaSuccess) {
    *failed_call = "cudaFuncSetAttribute(block_scores_kernel, MaxDynamicSharedMemorySize)";
    return e;
  }
  int device = 0, sms = 0, per_sm = 0;
  e = cudaGetDevice(&device);
  if (e != cudaSuccess) {
    *failed_call = "cudaGetDevice";
    return e;
  }
  e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) {
    *failed_call = "cudaDeviceGetAttribute(MultiProcessorCount)";
    return e;
  }
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kScoreThreads,
                                                    static_cast<size_t>(plan->smem));
  if (e != cudaSuccess) {
    *failed_call = "cudaOccupancyMaxActiveBlocksPerMultiprocessor(block_scores_kernel)";
    return e;
  }
  const int64_t work = ceil_div(p.q_blocks, kTileQueryBlocks) * p.batch * p.heads;
  const int64_t slots = int64_t(sms) * (per_sm > 0 ? per_sm : 1);
  plan->grid = static_cast<int>(work < slots ? work : slots);
  plan->workspace =
      kCounterFloats * 4 +
      (in_smem ? 0 : static_cast<size_t>(plan->grid) * kScoreWarps * 16 * p.k_blocks * 4);
  return cudaSuccess;
}

cudaError_t plan_scores(const BlockScoresLaunch& p, ScorePlan* plan, const char** failed_call) {
  switch (p.rank_pad) {
    case 8:
      return plan_scores_typed<8>(p, plan, failed_call);
    case 16:
      return plan_scores_typed<16>(p, plan, failed_call);
    case 32:
      return plan_scores_typed<32>(p, plan, failed_call);
    default:
      return plan_scores_typed<64>(p, plan, failed_call);
  }
}

bool scores_args_ok(const BlockScoresLaunch& p) {
  return p.batch >= 1 && p.heads >= 1 && p.n >= 1 && p.m >= 1 && p.q_offset >= 0 &&
         p.block_size >= kKeyTile && p.block_size % kKeyTile == 0 &&
         p.q_blocks == ceil_div(p.n, p.block_size) && p.k_blocks == ceil_div(p.m, p.block_size) &&
         rank_ok(p.rank_pad) && p.batch <= 65535 && p.heads <= 65535;
}

int select_cap(int64_t k_blocks) {
  int cap = 1;
  while (cap < k_blocks) cap *= 2;
  return cap;
}

// Temp layout: bitmap [rows × words] u32, counts [rows + 1] i64 (8-aligned), CUB storage.
size_t bitmap_bytes(int64_t rows, int64_t k_blocks) {
  return static_cast<size_t>(rows * ceil_div(k_blocks, 32) * 4 + 255) / 256 * 256;
}
size_t counts_bytes(int64_t rows) { return static_cast<size_t>((rows + 1) * 8 + 255) / 256 * 256; }

}  // namespace

cudaError_t lowrank_block_scores_workspace_bytes(const BlockScoresLaunch& p, size_t* bytes,
                                                 const char** failed_call) {
  if (!scores_args_ok(p)) {
    *failed_call = "lowrank_block_scores_workspace_bytes (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  ScorePlan plan;
  const cudaError_t e = plan_scores(p, &plan, failed_call);
  *bytes = plan.workspace;
  return e;
}

cudaError_t select_blocks_temp_bytes(int64_t rows, int64_t k_blocks, size_t* bytes,
                                     const char** failed_call) {
  size_t cub_bytes = 0;
  const cudaError_t e =
      cub::DeviceScan::ExclusiveSum(nullptr, cub_bytes, static_cast<const int64_t*>(nullptr),
                                    static_cast<int64_t*>(nullptr), static_cast<int>(rows + 1));
  if (e != cudaSuccess) {
    *failed_call = "cub::DeviceScan::ExclusiveSum (temp storage size)";
    return e;
  }
  *bytes = bitmap_bytes(rows, k_blocks) + counts_bytes(rows) + cub_bytes;
  return cudaSuccess;
}

cudaError_t launch_projection(const ProjectionLaunch& p, InputType type, cudaStream_t stream,
                              const char** failed_call) {
  const int64_t expect_rows =
      p.sample_block > 0 ? kRows * ceil_div(p.n_in, p.sample_block) : p.n_in;
  const bool ok = p.x != nullptr && p.a != nullptr && p.out != nullptr &&
                  reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && p.batch >= 1 &&
                  p.batch <= 65535 && p.heads >= 1 && p.heads <= 65535 && p.x_heads >= 1 &&
                  p.heads % p.x_heads == 0 && (p.a_batch == 1 || p.a_batch == p.batch) &&
                  p.n_in >= 1 && p.sample_block >= 0 && p.rows_out == expect_rows &&
                  ceil_div(p.rows_out, proj::kProjThreads) <= 0x7fffffff && p.d >= 1 &&
                  p.d <= 256 && rank_ok(p.rank_pad) && p.rank >= 1 && p.rank <= p.rank_pad &&
                  (p.rows_per_thread == 1 || p.rows_per_thread == 4);
  if (!ok) {
    *failed_call = "launch_projection (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  switch (type) {
    case InputType::kFloat32:
      return launch_projection_typed<float>(p, stream, failed_call);
    case InputType::kBFloat16:
      return launch_projection_typed<__nv_bfloat16>(p, stream, failed_call);
    default:
      return launch_projection_typed<__half>(p, stream, failed_call);
  }
}

cudaError_t launch_lowrank_block_scores(const BlockScoresLaunch& p, cudaStream_t stream,
                                        const char** failed_call) {
  if (!scores_args_ok(p) || p.qs == nullptr || p.kp == nullptr || p.scores == nullptr ||
      reinterpret_cast<uintptr_t>(p.kp) % 16 != 0) {
    *failed_call = "launch_lowrank_block_scores (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  ScorePlan plan;
  cudaError_t e = plan_scores(p, &plan, failed_call);
  if (e != cudaSuccess) return e;
  if (p.workspace == nullptr) {
    *failed_call = "launch_lowrank_block_scores (needs the workspace it asked for)";
    return cudaErrorInvalidValue;
  }
  e = cudaMemsetAsync(p.workspace, 0, kCounterFloats * 4, stream);  // the work counter
  if (e != cudaSuccess) {
    *failed_call = "cudaMemsetAsync(block scores work counter)";
    return e;
  }
  const size_t smem = static_cast<size_t>(plan.smem);
  const auto run = [&](auto kernel) { kernel<<<plan.grid, kScoreThreads, smem, stream>>>(p); };
  const bool split = p.split_tf32;
  switch (p.rank_pad) {
    case 8:
      split ? run(block_scores_kernel<8, true>) : run(block_scores_kernel<8, false>);
      break;
    case 16:
      split ? run(block_scores_kernel<16, true>) : run(block_scores_kernel<16, false>);
      break;
    case 32:
      split ? run(block_scores_kernel<32, true>) : run(block_scores_kernel<32, false>);
      break;
    default:
      split ? run(block_scores_kernel<64, true>) : run(block_scores_kernel<64, false>);
      break;
  }
  e = cudaGetLastError();
  if (e != cudaSuccess) *failed_call = "block_scores_kernel<<<persistent grid, 128>>>";
  return e;
}

cudaError_t launch_pooled_block_scores(const PooledScoresLaunch& p_in, cudaStream_t stream,
                                       const char** failed_call) {
  PooledScoresLaunch p = p_in;
  if (p.chunk_blocks == 0)
    p.chunk_blocks = kPooledChunkKeys / p.block_size > 0 ? kPooledChunkKeys / p.block_size : 1;
  const bool ok =
      p.pq != nullptr && p.kp != nullptr && p.scores != nullptr &&
      reinterpret_cast<uintptr_t>(p.kp) % 16 == 0 && p.batch >= 1 && p.batch <= 65535 &&
      p.heads >= 1 && p.heads <= 65535 && p.n >= 1 && p.m >= 1 && p.q_offset >= 0 &&
      p.block_size >= kKeyTile && p.block_size % kKeyTile == 0 &&
      p.q_blocks == ceil_div(p.n, p.block_size) && p.k_blocks == ceil_div(p.m, p.block_size) &&
      rank_ok(p.rank_pad) && p.chunk_blocks >= 1 &&
      pooled::pooled_chunks(p) * pooled::pooled_groups(p) <= 0x7fffffff &&
      static_cast<int64_t>(p.batch) * p.heads * p.q_blocks <= int64_t(0x7fffffff) * kNormaliseWarps;
  if (!ok) {
    *failed_call = "launch_pooled_block_scores (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  const int64_t chunks = pooled::pooled_chunks(p), groups = pooled::pooled_groups(p);
  const dim3 grid(static_cast<unsigned>(chunks * groups), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  const auto run = [&](auto kernel) {
    kernel<<<grid, pooled::kPooledThreads, 0, stream>>>(p, chunks, groups);
  };
  switch (p.rank_pad) {
    case 8:
      run(pooled_scores_kernel<8>);
      break;
    case 16:
      run(pooled_scores_kernel<16>);
      break;
    case 32:
      run(pooled_scores_kernel<32>);
      break;
    default:
      run(pooled_scores_kernel<64>);
      break;
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "pooled_scores_kernel<<<(key chunks × query groups, heads, batch), 128>>>";
    return e;
  }
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_blocks;
  pooled_normalise_kernel<<<static_cast<unsigned>(ceil_div(rows, kNormaliseWarps)),
                            32 * kNormaliseWarps, 0, stream>>>(p, rows);
  e = cudaGetLastError();
  if (e != cudaSuccess) *failed_call = "pooled_normalise_kernel<<<rows / 4, 128>>>";
  return e;
}

cudaError_t launch_select_blocks(const SelectLaunch& p, cudaStream_t stream,
                                 const char** failed_call) {
  const bool ok = p.scores != nullptr && p.row_ptr != nullptr && p.temp != nullptr && p.rows >= 1 &&
                  p.rows < 0x7fffffff && p.n >= 1 && p.m >= 1 && p.q_offset >= 0 &&
                  p.block_size >= 1 && p.q_blocks == ceil_div(p.n, p.block_size) &&
                  p.k_blocks == ceil_div(p.m, p.block_size) &&
                  p.k_blocks <= kEstimatorMaxKeyBlocks && p.rows % p.q_blocks == 0 &&
                  (p.col_capacity == 0 || p.col_idx != nullptr) && std::isfinite(p.gamma) &&
                  std::isfinite(p.density);
  size_t need = 0;
  if (ok) {
    const cudaError_t e = select_blocks_temp_bytes(p.rows, p.k_blocks, &need, failed_call);
    if (e != cudaSuccess) return e;
  }
  if (!ok || p.temp_bytes < need) {
    *failed_call = "launch_select_blocks (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  unsigned char* t = static_cast<unsigned char*>(p.temp);
  uint32_t* bitmap = reinterpret_cast<uint32_t*>(t);
  int64_t* counts = reinterpret_cast<int64_t*>(t + bitmap_bytes(p.rows, p.k_blocks));
  void* cub_temp = t + bitmap_bytes(p.rows, p.k_blocks) + counts_bytes(p.rows);
  size_t cub_bytes = p.temp_bytes - bitmap_bytes(p.rows, p.k_blocks) - counts_bytes(p.rows);

  cudaError_t e = cudaMemsetAsync(counts + p.rows, 0, sizeof(int64_t), stream);
  if (e != cudaSuccess) {
    *failed_call = "cudaMemsetAsync(counts[rows])";
    return e;
  }
  const int cap = select_cap(p.k_blocks);
  const int64_t smem = int64_t(cap) * 8 + ceil_div(p.k_blocks, 32) * 4;
  e = cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem));
  if (e != cudaSuccess) {
    *failed_call = "cudaFuncSetAttribute(select_kernel, MaxDynamicSharedMemorySize)";
    return e;
  }
  select_kernel<<<static_cast<unsigned>(p.rows), 32, static_cast<size_t>(smem), stream>>>(
      p, bitmap, counts, cap);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "select_kernel<<<rows, 32>>>";
    return e;
  }
  e = cub::DeviceScan::ExclusiveSum(cub_temp, cub_bytes, counts, p.row_ptr,
                                    static_cast<int>(p.rows + 1), stream);
  if (e != cudaSuccess) {
    *failed_call = "cub::DeviceScan::ExclusiveSum(counts -> row_ptr)";
    return e;
  }
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "cub::DeviceScan::ExclusiveSum kernels";
    return e;
  }
  if (p.col_capacity > 0) {
    scatter_kernel<<<static_cast<unsigned>(ceil_div(p.rows, 4)), 128, 0, stream>>>(p, bitmap);
    e = cudaGetLastError();
    if (e != cudaSuccess) {
      *failed_call = "scatter_kernel<<<rows / 4, 128>>>";
      return e;
    }
  }
  return cudaSuccess;
}

}  // namespace attnpilot::attention::cuda
