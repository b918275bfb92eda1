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
/// Two CTA bodies share the tile list, the swizzled loads and the softmax step:
///   fwd_block     the above: every thread loads, one CTA barrier per tile, so both warpgroups
///                 wait for their S and run their softmax at the same time (tensor cores idle)
///   fwd_block_ws  warp-specialised, FlashAttention-3's scheme: a producer warpgroup (56
///                 registers) streams Q and kStages K/V stages by cp.async and signals each stage
///                 on an mbarrier (its threads wait for their copies and fence first); two
///                 consumer warpgroups (224 registers) wait on those, take turns issuing their
///                 S = QKᵀ (named barriers: one's softmax runs while the other's GEMM does) and
///                 release each stage on an "empty" mbarrier after their P V. Variants:
///                 kOverlap (each consumer's softmax beside its previous P V) and kAsyncArrive
///                 (the producer signals a stage by cp.async.mbarrier.arrive, never waiting for
///                 its own copies), both together the default kernel (kAuto); with both,
///                 kPersistent: one CTA per SM over many work items, the stage ring running on
///                 from one item into the next
///
///   producer WG0:  Q ─► [K0 V0] [K1 V1] [K2 V2] [K0 V0] ...   (wait empty[s] before reuse)
///                       │full    │full    │full
///   consumer WG1:  S0 softmax PV0 │ S1 softmax PV1 │ ...     (S issue when it is WG1's turn)
///   consumer WG2:      S0 softmax PV0 │ S1 softmax PV1 │ ...
///
/// Tests run both bodies on the CPU through tests/cuda_emu (cuda_emu_wgmma.h emulates wgmma
/// with the PTX ISA's layouts, results held back until the covering wait, and the mbarriers and
/// named barriers).
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "attention/cuda/block_sparse_block.cuh"
#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/mma_ptx.cuh"
#include "attention/cuda/online_softmax.cuh"
#include "attention/cuda/tile_list.cuh"
#include "attention/cuda/wgmma_ptx.cuh"

namespace attnpilot::attention::cuda::block_sparse_wgmma {

using block_sparse::pack2;
using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait_all;

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
/// by cp.async, by kNt threads (tid < kNt); rows at or past `limit` are zero.
template <typename T, int D, int kNt = kThreads>
__device__ __forceinline__ void load_tile_async(unsigned char* dst, const T* src, int64_t stride,
                                                int64_t r0, int64_t limit, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kRowStep =
      kNt / kChunks;  // rows per pass (16 or 32 of 256 threads, 8 or 16 of 128)
  static_assert(kRowStep % 8 == 0 && kBN % kRowStep == 0, "whole passes, row % 8 fixed per thread");
  const int row0 = tid / kChunks, col = (tid % kChunks) * 8;
  // The swizzled column of this thread's chunk is the same in every pass (kRowStep % 8 == 0).
  unsigned char* d = dst + swizzled(row0, col);
  const T* g = src + (r0 + row0) * stride + col;
  if (r0 + kBN <= limit) {
    // Every row in range (all tiles but one past the end): no per-row test or zero fill, the
    // source advanced by one add per pass. The general form below cost the producer ~16
    // instructions per copy (ncu, 2026-12-06: ~560 per tile and warp, a third of the issue slots
    // of the sub-partitions it shares with the consumers).
    const int64_t step = int64_t(kRowStep) * stride;
#pragma unroll
    for (int i = 0; i < kBN / kRowStep; ++i, g += step)
      cp_async_16(d + i * kRowStep * 128, g, true);
    return;
  }
  const int64_t valid_rows = limit - r0 - row0;  // passes i with i·kRowStep < this are in range
#pragma unroll
  for (int i = 0; i < kBN / kRowStep; ++i) {
    const bool valid = i * kRowStep < valid_rows;
    cp_async_16(d + i * kRowStep * 128, valid ? g + i * kRowStep * stride : src, valid);
  }
}

/// The key tiles of one CTA (tile_list.cuh): 128-key tiles for 128 queries.
using TileList = cuda::TileList<kBM, kBN>;
using cuda::RowMask;

/// Online-softmax state of one thread's two rows (g and g + 8 of its warp's 16): the reference
/// max m (log2 units; moved lazily) and this lane's partial sum l of P.
struct SoftmaxRows {
  float m[2], l[2];
};

/// One tile's softmax on S (the m64n128 accumulator fragment of this thread: s[4i + 2hr + e]
/// is row g + 8hr, column 8i + 2c4 + e) in the general or the fast form (online_softmax.cuh):
/// mask (when need_mask), scale, row max over the lane quad, P = 2^(S - m) in place, l and m
/// updated; alpha[hr] is the factor O's row must take (1 where m did not move), and the return
/// value whether any did. qpos0 is the key position of row g's query.
template <bool kGeneral>
__device__ __forceinline__ bool softmax_rows(float (&s)[kBN / 2], float (&alpha)[2],
                                             SoftmaxRows& st, const BlockSparseLaunch& p,
                                             int64_t k0, bool need_mask, int64_t qpos0,
                                             float scale_log2, int c4) {
  bool rescale = false;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    // The CPU backend's rule for the keys of this row (tile_list.cuh).
    const RowMask<kBN> rm =
        kGeneral && need_mask ? RowMask<kBN>(p, k0, qpos0 + 8 * hr) : RowMask<kBN>();
    rescale |= online_softmax_row<kGeneral, kBN / 8>(
        [&](int j, int e) -> float& { return s[4 * j + 2 * hr + e]; }, rm, need_mask, 0, c4,
        scale_log2, st.m[hr], st.l[hr], alpha[hr]);
  }
  return rescale;
}

/// softmax_rows in the form the tile takes (a uniform branch between the two bodies).
__device__ __forceinline__ bool softmax_probs(float (&s)[kBN / 2], float (&alpha)[2],
                                              SoftmaxRows& st, const BlockSparseLaunch& p,
                                              int64_t k0, bool need_mask, int64_t qpos0,
                                              float scale_log2, int c4) {
  if (softmax_general(need_mask, scale_log2))
    return softmax_rows<true>(s, alpha, st, p, k0, need_mask, qpos0, scale_log2, c4);
  return softmax_rows<false>(s, alpha, st, p, k0, false, qpos0, scale_log2, c4);
}

/// O's rows g and g + 8 times alpha[0] and alpha[1].
template <int D>
__device__ __forceinline__ void rescale_o(float (&o)[D / 2], const float (&alpha)[2]) {
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    o[4 * i + 0] *= alpha[0];
    o[4 * i + 1] *= alpha[0];
    o[4 * i + 2] *= alpha[1];
    o[4 * i + 3] *= alpha[1];
  }
}

/// softmax_probs, then O rescaled where m moved.
template <int D>
__device__ __forceinline__ void softmax_step(float (&s)[kBN / 2], float (&o)[D / 2],
                                             SoftmaxRows& st, const BlockSparseLaunch& p,
                                             int64_t k0, bool need_mask, int64_t qpos0,
                                             float scale_log2, int c4) {
  float alpha[2];
  if (softmax_probs(s, alpha, st, p, k0, need_mask, qpos0, scale_log2, c4)) rescale_o<D>(o, alpha);
}

/// S = Q Kᵀ for one warpgroup's 64 rows (qa: shared address of its first Q row in region 0;
/// ka: the K stage): k-step kk reads 16 columns (32 bytes) of region kk / 4; 8-row atoms 1024
/// bytes apart (SBO), LBO unused for K-major swizzled operands. Issued and committed, not waited.
template <typename T, int D>
__device__ __forceinline__ void issue_s(float (&s)[kBN / 2], uint32_t qa, uint32_t ka) {
  const uint64_t qd = ptx::sw128_desc(qa, 16, 1024), kd = ptx::sw128_desc(ka, 16, 1024);
  ptx::wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const uint32_t off = (kk / 4) * kRegionBytes + (kk % 4) * 32;
    ptx::wgmma_ss<T, kBN>(s, ptx::desc_advance(qd, off), ptx::desc_advance(kd, off), kk > 0);
  }
  ptx::wgmma_commit();
}

/// P as wgmma register A fragments: k-step kt (keys 16kt..) from S's column chunks 2kt, 2kt+1.
template <typename T>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kBN / 16][4], const float (&s)[kBN / 2]) {
#pragma unroll
  for (int kt = 0; kt < kBN / 16; ++kt) {
    pa[kt][0] = pack2<T>(s[8 * kt + 0], s[8 * kt + 1]);
    pa[kt][1] = pack2<T>(s[8 * kt + 2], s[8 * kt + 3]);
    pa[kt][2] = pack2<T>(s[8 * kt + 4], s[8 * kt + 5]);
    pa[kt][3] = pack2<T>(s[8 * kt + 6], s[8 * kt + 7]);
  }
}

/// O += P V with P packed (pack_p) and V at va: k-step kt is keys 16kt.. (2048 bytes down the
/// tile); V's two 64-column regions are LBO apart, 8-key atoms SBO apart. Committed, not waited.
template <typename T, int D>
__device__ __forceinline__ void issue_pv_packed(float (&o)[D / 2],
                                                const uint32_t (&pa)[kBN / 16][4], uint32_t va) {
  const uint64_t vd = ptx::sw128_desc(va, kRegionBytes, 1024);
  ptx::wgmma_fence();
#pragma unroll
  for (int kt = 0; kt < kBN / 16; ++kt)
    ptx::wgmma_rs<T, D>(o, pa[kt], ptx::desc_advance(vd, kt * 2048), true);
  ptx::wgmma_commit();
}

/// O += P V from S's probabilities: P packed whole before the fence (registers written between
/// two wgmma make the compiler fence each one, ptxas C7519). Committed, not waited.
template <typename T, int D>
__device__ __forceinline__ void issue_pv(float (&o)[D / 2], const float (&s)[kBN / 2],
                                         uint32_t va) {
  uint32_t pa[kBN / 16][4];
  pack_p<T>(pa, s);
  issue_pv_packed<T, D>(o, pa, va);
}

/// 1 / l of a row from the lane quad's partial sums l (0 where l = 0: a row that saw no key).
__device__ __forceinline__ float inverse_row_sum(float l) {
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  return l > 0.f ? 1.f / l : 0.f;
}

/// out = O / l for this thread's two rows, written into the swizzled staging tile `stage` (the
/// warpgroup's own Q rows; row = the tile row of row g); l = 0 gives 0.
template <typename T, int D>
__device__ __forceinline__ void stage_output(unsigned char* stage, const float (&o)[D / 2],
                                             const SoftmaxRows& st, int row, int c4) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float inv = inverse_row_sum(st.l[hr]);
    const int r = row + 8 * hr;
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint32_t*>(stage + swizzled(r, 8 * i) + 4 * c4) =
          pack2<T>(o[4 * i + 2 * hr] * inv, o[4 * i + 2 * hr + 1] * inv);
  }
}

/// Rows [r_begin, r_end) of the swizzled staging tile to out rows q0 + r (those below n), by
/// `threads` threads from index `tid`, 16 bytes each.
template <typename T, int D>
__device__ __forceinline__ void store_output(const unsigned char* stage, T* out, int64_t q0,
                                             int64_t n, int r_begin, int r_end, int tid,
                                             int threads) {
  constexpr int kChunks = D / 8;
  for (int c = tid; c < (r_end - r_begin) * kChunks; c += threads) {
    const int r = r_begin + c / kChunks, col = (c % kChunks) * 8;
    const int64_t qi = q0 + r;
    if (qi < n)
      *reinterpret_cast<uint4*>(out + qi * D + col) =
          *reinterpret_cast<const uint4*>(stage + swizzled(r, col));
  }
}

/// The CTA's shared memory, 1024-byte aligned (the swizzle works on shared-space address bits).
__device__ __forceinline__ unsigned char* align1024(unsigned char* smem_raw) {
  return smem_raw + (1024 - ptx::smem_offset(smem_raw) % 1024) % 1024;
}

/// One CTA of kThreads threads: query tile `tile` (rows 128·tile ..), query head h, batch entry
/// b; `smem` holds shared_bytes(D) bytes. Needs block_size % 128 == 0 or no CSR lists. Called
/// by every thread of the CTA (it contains barriers).
template <typename T, int D>
__device__ __forceinline__ void fwd_block(const BlockSparseLaunch& p, unsigned char* smem_raw,
                                          unsigned tile, int h, int b) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  constexpr uint32_t kTile = tile_bytes(D);
  unsigned char* sq = align1024(smem_raw);
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
  const TileList list(p, q0, h, b);

  // Prologue: Q and the first visited K, V tile into stage 0.
  load_tile_async<T, D>(sq, qg, p.q_stride[2], q0, p.n, tid);
  int64_t t = list.next(0);
  if (t < list.tiles) {
    const int64_t k0 = list.k0(t);
    load_tile_async<T, D>(sk, kg, p.k_stride[2], k0, p.m, tid);
    load_tile_async<T, D>(sv, vg, p.v_stride[2], k0, p.m, tid);
  }
  cp_async_commit();
  cp_async_wait_all();
  ptx::fence_proxy_async();
  __syncthreads();

  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = 2^(x·log2 e)
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  const float kNegInf = -__int_as_float(0x7f800000);
  SoftmaxRows st{{kNegInf, kNegInf}, {0.f, 0.f}};

  int stage = 0;
  while (t < list.tiles) {
    const int64_t k0 = list.k0(t);
    // Next tile's loads into the other stage, which both warpgroups finished reading before
    // the barrier that ended the previous step.
    const int64_t tn = list.next(t + 1);
    if (tn < list.tiles) {
      const int64_t kn = list.k0(tn);
      load_tile_async<T, D>(sk + (stage ^ 1) * kTile, kg, p.k_stride[2], kn, p.m, tid);
      load_tile_async<T, D>(sv + (stage ^ 1) * kTile, vg, p.v_stride[2], kn, p.m, tid);
    }
    cp_async_commit();
    float s[kBN / 2];
    issue_s<T, D>(s, q_addr + wg * 64 * 128, k_addr + stage * kTile);
    ptx::wgmma_wait<0>();
    softmax_step<D>(s, o, st, p, k0, list.need_mask(k0), list.cta_first + wrow + g, scale_log2, c4);
    issue_pv<T, D>(o, s, v_addr + stage * kTile);
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
  // each warpgroup waited for its last group), then 16-byte stores.
  stage_output<T, D>(sq, o, st, wrow + g, c4);
  __syncthreads();
  store_output<T, D>(sq, static_cast<T*>(p.out) + (static_cast<int64_t>(b) * p.heads + h) * p.n * D,
                     q0, p.n, 0, kBM, tid, kThreads);
}

// ---- the warp-specialised body ----

/// Threads of a warp-specialised CTA: a producer and two consumer warpgroups.
inline constexpr int kWsThreads = 384;
/// K/V stages of the warp-specialised body: with 3, a stage's "full" signal never waits for the
/// stage the consumers are on (d = 128: Q + 3·(K + V) = 224 KB of the 227 KB an SM gives).
inline constexpr int kWsStages = 3;
/// Registers per thread after setmaxnreg (384 threads enter with 168 = 65536/384, rounded down
/// to 8): 56 for the producer (40 spilled its address arithmetic), 224 for the consumers
/// (128·56 + 256·224 <= 65536).
inline constexpr int kProducerRegs = 56;
inline constexpr int kConsumerRegs = 224;
/// mbarriers: Q full, Q empty (persistent CTAs), K full and V full per stage, stage empty per
/// stage.
__host__ __device__ constexpr int ws_barriers() { return 2 + 3 * kWsStages; }

/// Dynamic shared memory of the warp-specialised body: Q, kWsStages K and V tiles, the
/// mbarriers, each stage's first key (int64), and 1 KB to align the base.
__host__ __device__ constexpr int64_t ws_shared_bytes(int d) {
  return (1 + 2 * int64_t(kWsStages)) * tile_bytes(d) + 8 * ws_barriers() + 8 * kWsStages + 1024;
}

/// One work item of the warp-specialised body: a CTA's 128 queries of one (batch, head).
struct WorkItem {
  unsigned tile;  ///< query tile (rows 128·tile ..)
  int h, b;
};

/// Work items in the order of the non-persistent grid (blockIdx.x fastest over query tiles,
/// last tile first: within a (batch, head) the longest causal rows start first).
__host__ __device__ inline int64_t work_items(const BlockSparseLaunch& p) {
  return (p.n + kBM - 1) / kBM * p.heads * p.batch;
}
__device__ __forceinline__ WorkItem work_item(const BlockSparseLaunch& p, int64_t w) {
  const int64_t tiles = (p.n + kBM - 1) / kBM, x = w % tiles, bh = w / tiles;
  return {static_cast<unsigned>(tiles - 1 - x), static_cast<int>(bh % p.heads),
          static_cast<int>(bh / p.heads)};
}

/// The items of CTA `cta` of `ctas`: in round j, item j·ctas + cta (even rounds) or
/// j·ctas + ctas - 1 - cta (odd rounds). Rows shorten along a (batch, head), so the zig-zag
/// gives every CTA a similar total where a plain stride would give CTA 0 the longest item of
/// every round. With ctas = work_items, item `cta` alone (the non-persistent grid).
struct ItemSchedule {
  int64_t total, ctas, cta;
  /// Item of round j, or -1 where the last round has none for this CTA.
  __device__ __forceinline__ int64_t item(int64_t j) const {
    const int64_t w = j * ctas + ((j & 1) ? ctas - 1 - cta : cta);
    return w < total ? w : -1;
  }
  /// Whether there is no round j (nor any later).
  __device__ __forceinline__ bool done(int64_t j) const { return j * ctas >= total; }
};

/// f(item, q0, list, done) for each work item of sched in order (item: its (tile, head,
/// batch); q0: its first query row; list: its key tiles; done: the items before it), as both
/// roles of a warp-specialised CTA walk them. Without kPersistent, sched's one item with no
/// loop around it (so nothing is hoisted out of a loop that runs once).
template <bool kPersistent, class F>
__device__ __forceinline__ void for_each_item(const BlockSparseLaunch& p, const ItemSchedule& sched,
                                              F&& f) {
  int64_t done = 0;
  for (int64_t j = 0; kPersistent ? !sched.done(j) : j < 1; ++j) {
    const int64_t w = sched.item(j);
    if (w < 0) continue;
    const WorkItem it = work_item(p, w);
    const int64_t q0 = static_cast<int64_t>(it.tile) * kBM;
    const TileList list(p, q0, it.h, it.b);
    f(it, q0, list, done++);
  }
}

/// Where a role is in the ring of kWsStages stages: the stage of its current use, that use's
/// mbarrier phase parity, and whether the ring has gone round once (the stage was used
/// before). 32-bit counters stepped by next(): a running 64-bit use count needed a 64-bit
/// division by 3 for the stage and the phase of every tile.
struct StageRing {
  int s = 0;
  unsigned phase = 0;
  bool wrapped = false;
  __device__ __forceinline__ void next() {
    if (++s == kWsStages) {
      s = 0;
      phase ^= 1u;
      wrapped = true;
    }
  }
};

/// out = O / l of this thread's two rows (row = the tile row of row g) straight from registers
/// to out rows q0 + row (those below n), 4 bytes per column pair: the persistent body's Q tile
/// already holds the next item's queries, so there is no staging tile.
template <typename T, int D>
__device__ __forceinline__ void store_output_regs(T* out, const float (&o)[D / 2],
                                                  const SoftmaxRows& st, int64_t q0, int64_t n,
                                                  int row, int c4) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float inv = inverse_row_sum(st.l[hr]);
    const int64_t qi = q0 + row + 8 * hr;
    if (qi < n) {
      T* dst = out + qi * D + 2 * c4;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(dst + 8 * i) =
            pack2<T>(o[4 * i + 2 * hr] * inv, o[4 * i + 2 * hr + 1] * inv);
    }
  }
}

/// The warp-specialised CTA (kWsThreads threads) over the work items `sched` gives it (one in
/// the plain grid; several for a persistent CTA); the rest as fwd_block. kOverlap: each
/// consumer also overlaps its softmax of tile i with its own P V of tile i-1 (FlashAttention-3's
/// intra-warpgroup pipelining: S_i and PV_{i-1} are issued together, the softmax waits for S_i
/// only, O is rescaled once PV_{i-1} has landed). kAsyncArrive: the producer signals each stage
/// by cp.async.mbarrier.arrive (the arrival made by the hardware once the thread's copies have
/// landed) instead of waiting for its copies and fencing them itself, so it never stalls on a
/// load; each consumer thread fences (fence.proxy.async) after its wait instead. kPersistent
/// (with both): one CTA per SM walks many items and the stage ring runs on across them, so the
/// next item's first K and V (and, once the consumers have issued their last S, its Q) load
/// while the consumers finish the current one; the output goes from registers to global memory.
///
/// Only the producer walks the tile list (CSR reads, skipped tiles): it writes each stage's first
/// key into stage_k0[stage] before the stage's K-full arrival, and after an item's last tile a
/// -1 into the next stage, signalled the same way (and its V full, so the phases of a stage's
/// two barriers stay together), which ends the consumers' loop over that item. The consumers'
/// loop has no global load and no list arithmetic in it; it issues GEMMs and the softmax.
///
///   producer:  K0 V0 Q | K1 V1 | ... | end ║ K0' V0' (wait Q empty) Q' | K1' V1' | ...
///   consumers:   S0 .. S_last, Q empty ─┘ P V_last, out = O / l ║ S0' ...
template <typename T, int D, bool kOverlap = false, bool kAsyncArrive = false,
          bool kPersistent = false>
__device__ __forceinline__ void fwd_block_ws(const BlockSparseLaunch& p, unsigned char* smem_raw,
                                             const ItemSchedule& sched) {
  static_assert(D == 64 || D == 128, "head dims 64 and 128");
  static_assert(!kPersistent || (kOverlap && kAsyncArrive),
                "the persistent body is the overlap kernel with asynchronous arrivals");
  constexpr uint32_t kTile = tile_bytes(D);
  constexpr int kS = kWsStages;
  unsigned char* sq = align1024(smem_raw);
  unsigned char* sk = sq + kTile;       // kS stages
  unsigned char* sv = sk + kS * kTile;  // kS stages
  uint64_t* bars = reinterpret_cast<uint64_t*>(sv + kS * kTile);
  uint64_t* q_full = bars;
  uint64_t* q_empty = bars + 1;
  uint64_t* k_full = bars + 2;
  uint64_t* v_full = bars + 2 + kS;
  uint64_t* empty = bars + 2 + 2 * kS;
  int64_t* stage_k0 = reinterpret_cast<int64_t*>(bars + ws_barriers());
  const int tid = threadIdx.x, wg = tid / 128;
  // K full: the 128 producer threads' arrivals, plus with kAsyncArrive one ordinary arrival by
  // producer thread 0 that publishes stage_k0 (a cp.async arrival orders copies, not stores).
  constexpr unsigned kKFullCount = kAsyncArrive ? 129 : 128;
  if (tid == 0) {
    ptx::mbar_init(q_full, 128);
    ptx::mbar_init(q_empty, 8);  // one arrival per consumer warp
    for (int s = 0; s < kS; ++s) {
      ptx::mbar_init(k_full + s, kKFullCount);
      ptx::mbar_init(v_full + s, 128);
      ptx::mbar_init(empty + s, 8);  // one arrival per consumer warp
    }
  }
  __syncthreads();

  if (wg == 0) {
    // Producer: 128 threads copy; each waits for its own copies of a tile, fences them for the
    // async proxy and arrives on the tile's barrier; the barrier completes when all 128 have.
    ptx::setmaxnreg_dec<kProducerRegs>();
    // The stage of the next stage use (a visited tile or an item's end marker, counted across
    // items): free once the consumers released its previous use; then its first key goes into
    // stage_k0.
    StageRing ring;
    const auto claim = [&](int64_t k0) {
      const int s = ring.s;
      if (ring.wrapped) ptx::mbar_wait(empty + s, ring.phase ^ 1u);
      if (tid == 0) {
        stage_k0[s] = k0;
        if constexpr (kAsyncArrive) ptx::mbar_arrive(k_full + s);
      }
      return s;
    };
    // The end marker: stage_k0 = -1, K full (and V full) signalled by ordinary arrivals.
    const auto finish = [&] {
      const int s = claim(-1);
      ptx::mbar_arrive(k_full + s);
      if constexpr (kPersistent) ptx::mbar_arrive(v_full + s);
      ring.next();
    };
    for_each_item<kPersistent>(
        p, sched, [&](const WorkItem& it, int64_t q0, const TileList& list, int64_t items) {
          const int kvh = it.h / (p.heads / p.kv_heads);
          const T* qg = static_cast<const T*>(p.q) + it.b * p.q_stride[0] + it.h * p.q_stride[1];
          const T* kg = static_cast<const T*>(p.k) + it.b * p.k_stride[0] + kvh * p.k_stride[1];
          const T* vg = static_cast<const T*>(p.v) + it.b * p.v_stride[0] + kvh * p.v_stride[1];
          if constexpr (kAsyncArrive) {
            const auto load_kv = [&](int64_t t) {
              const int64_t k0 = list.k0(t);
              const int s = claim(k0);
              load_tile_async<T, D, 128>(sk + s * kTile, kg, p.k_stride[2], k0, p.m, tid);
              ptx::cp_async_mbar_arrive(k_full + s);
              load_tile_async<T, D, 128>(sv + s * kTile, vg, p.v_stride[2], k0, p.m, tid);
              ptx::cp_async_mbar_arrive(v_full + s);
              ring.next();
            };
            // The first tile's K and V go first, into a stage the consumers may already have
            // released; Q once the consumers have issued their last S of the previous item (their
            // arrival on Q empty).
            int64_t t = list.next(0);
            if (t < list.tiles) load_kv(t);
            if (kPersistent && items > 0)
              ptx::mbar_wait(q_empty, static_cast<unsigned>((items - 1) & 1));
            load_tile_async<T, D, 128>(sq, qg, p.q_stride[2], q0, p.n, tid);
            ptx::cp_async_mbar_arrive(q_full);
            if (t < list.tiles)
              for (t = list.next(t + 1); t < list.tiles; t = list.next(t + 1)) load_kv(t);
            finish();
            return;
          }
          load_tile_async<T, D, 128>(sq, qg, p.q_stride[2], q0, p.n, tid);
          cp_async_commit();
          // Groups in flight: Q, then per tile K and V. After issuing tile i, tile i-1's K and V
          // (or Q, at i = 0) are waited for and signalled.
          int64_t prev_stage = -1;
          for (int64_t t = list.next(0); t < list.tiles; t = list.next(t + 1), ring.next()) {
            const int64_t k0 = list.k0(t);
            const int s = claim(k0);
            load_tile_async<T, D, 128>(sk + s * kTile, kg, p.k_stride[2], k0, p.m, tid);
            cp_async_commit();
            load_tile_async<T, D, 128>(sv + s * kTile, vg, p.v_stride[2], k0, p.m, tid);
            cp_async_commit();
            if (prev_stage < 0) {  // Q (the oldest group) has landed
              ptx::cp_async_wait_group<2>();
              ptx::fence_proxy_async();
              ptx::mbar_arrive(q_full);
            } else {
              ptx::cp_async_wait_group<3>();  // the previous tile's K
              ptx::fence_proxy_async();
              ptx::mbar_arrive(k_full + prev_stage);
              ptx::cp_async_wait_group<2>();  // and its V
              ptx::fence_proxy_async();
              ptx::mbar_arrive(v_full + prev_stage);
            }
            prev_stage = s;
          }
          if (prev_stage < 0) {  // no tile: Q alone
            ptx::cp_async_wait_group<0>();
            ptx::fence_proxy_async();
            ptx::mbar_arrive(q_full);
          } else {
            ptx::cp_async_wait_group<1>();
            ptx::fence_proxy_async();
            ptx::mbar_arrive(k_full + prev_stage);
            ptx::cp_async_wait_group<0>();
            ptx::fence_proxy_async();
            ptx::mbar_arrive(v_full + prev_stage);
          }
          finish();
        });
  } else {
    // Consumers: warpgroup c = wg - 1 on rows 64c .. 64c + 63.
    ptx::setmaxnreg_inc<kConsumerRegs>();
    // A full stage (or Q): with kAsyncArrive the copies are the producer's generic-proxy writes,
    // seen through the barrier; this thread fences them for its wgmma's async-proxy reads.
    const auto wait_full = [](uint64_t* bar, unsigned parity) {
      ptx::mbar_wait(bar, parity);
      if constexpr (kAsyncArrive) ptx::fence_proxy_async();
    };
    // The stage use the consumers are at (as the producer counts them, across items), and its
    // first key once its K is in (-1: the item's end marker).
    StageRing ring;
    const auto next_k0 = [&] {
      wait_full(k_full + ring.s, ring.phase);
      return stage_k0[ring.s];
    };
    const int c = wg - 1, ctid = tid - 128, warp = (ctid % 128) / 32, lane = tid % 32;
    const int g = lane / 4, c4 = lane % 4;
    const int wrow = 64 * c + 16 * warp;
    const uint32_t q_addr = ptx::smem_offset(sq) + c * 64 * 128, k_addr = ptx::smem_offset(sk),
                   v_addr = ptx::smem_offset(sv);
    const float scale_log2 = p.scale * 1.4426950408889634f;
    const float kNegInf = -__int_as_float(0x7f800000);
    for_each_item<kPersistent>(
        p, sched, [&](const WorkItem& it, int64_t q0, const TileList& list, int64_t items) {
          float o[D / 2];
#pragma unroll
          for (int x = 0; x < D / 2; ++x) o[x] = 0.f;
          SoftmaxRows st{{kNegInf, kNegInf}, {0.f, 0.f}};
          // Turns (named barriers 1 and 2, 256 threads: the waiting warpgroup and the other's
          // arrival): consumer c issues its S = QKᵀ after bar.sync(1 + c), then lets the other go.
          // Consumer 0 goes first (consumer 1 arrives on barrier 1 once Q is in) and takes one
          // more turn at the end, so every arrival of an item is matched within it. Consumer 1
          // arrives only after its Q wait: the next item's Q waits for Q empty, which consumer 0
          // signals after that last turn. Arriving before the wait (as the persistent kernel
          // first did) let consumer 1 arrive twice on barrier 1 while consumer 0 was still
          // short of its last turn: the barrier completed on consumer 1's arrivals alone, and
          // the CTA hung (H100, 2026-12-06; the emulator now fails on a second arrival).
          wait_full(q_full, static_cast<unsigned>(items & 1));
          if (c == 1) ptx::named_bar_arrive(1, 256);
          const int64_t qpos0 = list.cta_first + wrow + g;
          // Called when the end marker (the ring's current use) has been read: every S of the
          // item has completed, so Q and the marker's stage are released.
          const auto end_of_item = [&] {
            if (c == 0) ptx::named_bar_sync(1, 256);
            if (kPersistent && lane == 0) {
              ptx::mbar_arrive(empty + ring.s);
              ptx::mbar_arrive(q_empty);
            }
            ring.next();
          };
          if constexpr (!kOverlap) {
            for (;; ring.next()) {
              const int64_t k0 = next_k0();
              if (k0 < 0) break;
              const int s = ring.s;
              float sc[kBN / 2];
              ptx::named_bar_sync(1 + c, 256);
              issue_s<T, D>(sc, q_addr, k_addr + s * kTile);
              ptx::named_bar_arrive(2 - c, 256);
              ptx::wgmma_wait<0>();
              softmax_step<D>(sc, o, st, p, k0, list.need_mask(k0), qpos0, scale_log2, c4);
              wait_full(v_full + s, ring.phase);
              issue_pv<T, D>(o, sc, v_addr + s * kTile);
              ptx::wgmma_wait<0>();
              if (lane == 0) ptx::mbar_arrive(empty + s);  // this warp is done with stage s
            }
            end_of_item();
          } else {
            // P of the previous tile waits in pa for its P V, issued beside the next tile's S. The
            // first tile is peeled so the loop body has no branch around its wgmma (ptxas
            // serialises wgmma on divergent paths, C7518).
            uint32_t pa[kBN / 16][4];
            int64_t k0 = next_k0();
            if (k0 < 0) {
              end_of_item();
            } else {
              int prev = ring.s;  // stage of the tile whose P V is pending
              unsigned prev_phase = ring.phase;
              {
                float sc[kBN / 2];
                ptx::named_bar_sync(1 + c, 256);
                issue_s<T, D>(sc, q_addr, k_addr + prev * kTile);
                ptx::named_bar_arrive(2 - c, 256);
                ptx::wgmma_wait<0>();
                float alpha[2];  // O is still zero: nothing to rescale
                softmax_probs(sc, alpha, st, p, k0, list.need_mask(k0), qpos0, scale_log2, c4);
                pack_p<T>(pa, sc);
              }
              for (ring.next();; ring.next()) {
                k0 = next_k0();
                if (k0 < 0) break;
                const int s = ring.s;
                const unsigned phase = ring.phase;
                wait_full(v_full + prev, prev_phase);
                float sc[kBN / 2];
                ptx::named_bar_sync(1 + c, 256);
                issue_s<T, D>(sc, q_addr, k_addr + s * kTile);
                issue_pv_packed<T, D>(o, pa, v_addr + prev * kTile);
                ptx::named_bar_arrive(2 - c, 256);
                ptx::wgmma_wait<1>();  // this tile's S (the last tile's P V may still run)
                float alpha[2];
                const bool rescale =
                    softmax_probs(sc, alpha, st, p, k0, list.need_mask(k0), qpos0, scale_log2, c4);
                ptx::wgmma_wait<0>();  // the last tile's P V: its stage is free, O may be rescaled
                if (lane == 0) ptx::mbar_arrive(empty + prev);
                if (rescale) rescale_o<D>(o, alpha);
                pack_p<T>(pa, sc);
                prev = s;
                prev_phase = phase;
              }
              end_of_item();
              wait_full(v_full + prev, prev_phase);  // the last tile's P V
              issue_pv_packed<T, D>(o, pa, v_addr + prev * kTile);
              ptx::wgmma_wait<0>();
              if (lane == 0) ptx::mbar_arrive(empty + prev);
            }
          }
          T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(it.b) * p.heads + it.h) * p.n * D;
          if constexpr (kPersistent) {
            store_output_regs<T, D>(out, o, st, q0, p.n, wrow + g, c4);
          } else {
            // out = O / l through this warpgroup's own Q rows (its last S, the last read of them,
            // has completed), then its 128 threads store its 64 rows.
            stage_output<T, D>(sq, o, st, wrow + g, c4);
            ptx::named_bar_sync(3 + c, 128);
            store_output<T, D>(sq, out, q0, p.n, 64 * c, 64 * c + 64, ctid % 128, 128);
          }
        });
  }
}

}  // namespace attnpilot::attention::cuda::block_sparse_wgmma
