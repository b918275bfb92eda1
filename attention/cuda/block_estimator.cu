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
// the count in pooled_scores.cuh; measured 0.77-0.79 ms for the whole pooled estimator at r = 16
// (H100, 2026-12-06, key projection included). For bf16/fp16 keys of d 64 or 128 the default is
// now the tensor-core kernel on the stored keys (pooled_keys_mma.cuh: 0.56 ms, no projection).
//
// Selection kernel, one warp per row (b, h, qb), select_blocks' rule exactly: the sink block 0
// and the diagonal blocks first (mass summed in the CPU's order), then the other visible blocks
// by descending score, ties to the lower index (64-bit keys ~score<<32 | kb: the order of
// std::stable_sort). A count budget (top_k, density) takes the c smallest keys by a radix
// select in registers (select_block.cuh's take_smallest: ~32 warp counts instead of a sort); its
// row lengths follow from the geometry, so the kernel writes row_ptr and col_idx itself. A mass
// budget sorts the keys (bitonic, in registers up to 1024 blocks, else in shared memory) and
// takes them while mass < gamma·total; its prefix sums are float64 as on the CPU, but summed as
// a warp scan, not one by one: a mask can differ from the CPU's only where a prefix mass lies
// within a few float64 ulps of gamma·total. Then a CUB exclusive scan of the per-row counts
// gives row_ptr, and a scatter (one warp per row, popcount prefix over the row's bitmap) writes
// col_idx in ascending order. With SelectLaunch::log2_sums the kernel first normalises a pooled
// estimator's per-block log2 sums itself (the normalisation kernel's arithmetic).
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
// Expected to approach the byte floor; measured (H100, 2026-12-06, the estimator bench's kproj
// rows, k [1, 32, 32768, 128] bf16) 0.152 / 0.260 / 0.515 / 0.982 ms against one row's 0.166 /
// 0.242 / 0.407 / 1.006 at rank 8 / 16 / 32 / 64 (floors 0.09-0.16): no better, so 1 stays the
// default. Expected:
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
#include "attention/cuda/block_scores_block.cuh"
#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/estimator_common.cuh"
#include "attention/cuda/pooled_keys_mma.cuh"
#include "attention/cuda/pooled_scores.cuh"
#include "attention/cuda/pooled_w.cuh"
#include "attention/cuda/projection_block.cuh"
#include "attention/cuda/select_block.cuh"

namespace attnpilot::attention::cuda {
namespace {

// The sampled-row scores (block_scores_block.cuh) and the selection (select_block.cuh) keep
// their bodies in headers, which the CPU emulation tests also run
// (tests/attention/estimator_kernels_emu_test.cpp).
using est::ceil_div;
using sampled::kCounterFloats;
using sampled::kKeyTile;
using sampled::kRows;
using sampled::kScoreThreads;
using sampled::kTileQueryBlocks;
using selection::select_cap;

// ---- (1) projections (the bodies are in projection_block.cuh) ----

// grid (row tiles of 128·ROWS rows, heads, batch). ROWS = 1: a·scale whole in shared memory
// (d·R floats: over 48 KB for large d·R, the launcher opts in); ROWS > 1: at most 48 KB.
template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(proj::kProjThreads)
    projection_kernel(ProjectionLaunch p, bool vectorized) {
  extern __shared__ __align__(16) unsigned char smem[];
  proj::projection_block<T, R, ROWS>(p, blockIdx.x, blockIdx.y, blockIdx.z, smem, vectorized);
}

// ---- (2) block scores (the body is block_scores_block.cuh's block_scores_block) ----

// kSplit: three tf32 products per score (about fp32), else one (tf32: ~1e-3 relative).
template <int R, bool kSplit>
__global__ void __launch_bounds__(kScoreThreads) block_scores_kernel(BlockScoresLaunch p) {
  extern __shared__ __align__(16) unsigned char smem[];
  sampled::block_scores_block<R, kSplit>(p, blockIdx.x, smem);
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

// The normalisation of the L values in p.scores, in place (both pooled score kernels).
cudaError_t launch_pooled_normalise(const PooledScoresLaunch& p, cudaStream_t stream,
                                    const char** failed_call) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.q_blocks;
  pooled_normalise_kernel<<<static_cast<unsigned>(ceil_div(rows, kNormaliseWarps)),
                            32 * kNormaliseWarps, 0, stream>>>(p, rows);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) *failed_call = "pooled_normalise_kernel<<<rows / 4, 128>>>";
  return e;
}

// ---- (2k) pooled-query block scores from the stored keys (pooled_keys_mma.cuh) ----

// grid (query groups × key chunks, heads, batch): blockIdx.x = group + groups·chunk, so the
// query groups that share a key chunk run side by side (one DRAM read of the chunk).
// S key tiles in flight, in dynamic shared memory (pooled_keys::shared_bytes(D, S)).
template <typename T, int D, int S>
__global__ void __launch_bounds__(pooled_keys::kThreads)
    pooled_keys_kernel(PooledKeysLaunch p, int64_t groups) {
  extern __shared__ __align__(16) unsigned char pooled_keys_smem[];
  // 32-bit division (the grid's x is < 2^31; a 64-bit one calls a division routine).
  const unsigned g32 = static_cast<unsigned>(groups);
  const int64_t group = blockIdx.x % g32, chunk = blockIdx.x / g32;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  pooled_keys::pooled_keys_block<T, D, S>(p, chunk, group, bh,
                                          reinterpret_cast<T*>(pooled_keys_smem));
}

// ---- (1w) w of the pooled queries (the body is pooled_w.cuh's pooled_w_block) ----

// Products alone (PooledWLaunch::means): grid (⌈q_blocks / kProductBlocks⌉, heads, batch),
// pooled_w::kThreads threads, pooled_w::products_shared_floats<D>(p.rank) floats of dynamic
// shared memory.
template <int D>
__global__ void __launch_bounds__(pooled_w::kThreads) pooled_w_products_kernel(PooledWLaunch p) {
  extern __shared__ __align__(16) float pooled_w_products_smem[];
  pooled_w::pooled_w_products_block<D>(p, blockIdx.x, blockIdx.y, blockIdx.z,
                                       pooled_w_products_smem);
}

// From q: grid (⌈q_blocks / blocks_per_cta⌉, heads, batch), pooled_w::kThreads threads.
// Dynamic shared memory: pooled_w::shared_floats<T, D>(p.rank) floats.
template <typename T, int D>
__global__ void __launch_bounds__(pooled_w::kThreads) pooled_w_kernel(PooledWLaunch p) {
  extern __shared__ float pooled_w_smem[];
  pooled_w::pooled_w_block<T, D>(p, blockIdx.x, blockIdx.y, blockIdx.z, pooled_w_smem);
}

// ---- (3) selection (the body is select_block.cuh's select_row) ----

// One warp per row (the body is select_block.cuh's select_block): select_rows_per_cta(E) rows
// per CTA, each warp with its own slice of shared memory. kDirect: a count budget's lists
// written straight into row_ptr / col_idx.
using selection::select_rows_per_cta;
template <int E, bool kDirect>
__global__ void __launch_bounds__(32 * select_rows_per_cta(E))
    select_kernel(SelectLaunch p, uint32_t* bitmap, int64_t* counts, int cap, int64_t slice) {
  extern __shared__ __align__(16) unsigned char smem[];
  selection::select_block<E, kDirect>(p, blockIdx.x, bitmap, counts, cap, smem, slice);
}

// ---- (5) scatter (the body is select_block.cuh's scatter_block) ----

// One warp per row: the set bits of the row's bitmap, ascending, at col_idx[row_ptr[row] ..).
__global__ void __launch_bounds__(128) scatter_kernel(SelectLaunch p, const uint32_t* bitmap) {
  selection::scatter_block(p, blockIdx.x, bitmap);
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
  plan->smem = sampled::score_smem_bytes(R, p.k_blocks);
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
  plan->workspace = static_cast<size_t>(sampled::score_workspace_bytes(plan->grid, p.k_blocks));
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

// The geometry checks both pooled launchers share (after pooled_default_chunk).
template <class Launch>
bool pooled_geometry_ok(const Launch& p) {
  return p.scores != nullptr && p.batch >= 1 && p.batch <= 65535 && p.heads >= 1 &&
         p.heads <= 65535 && p.n >= 1 && p.m >= 1 && p.q_offset >= 0 && p.block_size >= kKeyTile &&
         p.block_size % kKeyTile == 0 && p.q_blocks == ceil_div(p.n, p.block_size) &&
         p.k_blocks == ceil_div(p.m, p.block_size) && p.chunk_blocks >= 1 &&
         static_cast<int64_t>(p.batch) * p.heads * p.q_blocks <=
             int64_t(0x7fffffff) * kNormaliseWarps;
}
// chunk_blocks 0: kPooledChunkKeys keys per CTA, at least one block.
template <class Launch>
void pooled_default_chunk(Launch& p) {
  if (p.chunk_blocks == 0)
    p.chunk_blocks = kPooledChunkKeys / p.block_size > 0 ? kPooledChunkKeys / p.block_size : 1;
}

cudaError_t launch_pooled_block_scores(const PooledScoresLaunch& p_in, cudaStream_t stream,
                                       const char** failed_call) {
  PooledScoresLaunch p = p_in;
  pooled_default_chunk(p);
  const bool ok = pooled_geometry_ok(p) && p.pq != nullptr && p.kp != nullptr &&
                  reinterpret_cast<uintptr_t>(p.kp) % 16 == 0 && rank_ok(p.rank_pad) &&
                  pooled::pooled_chunks(p) * pooled::pooled_groups(p) <= 0x7fffffff;
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
  if (!p.normalise) return cudaSuccess;
  return launch_pooled_normalise(p, stream, failed_call);
}

cudaError_t launch_pooled_w(const PooledWLaunch& p, cudaStream_t stream, const char** failed_call) {
  const int64_t elem = p.type == InputType::kFloat32 ? 4 : 2;
  const int64_t vec = 16 / elem;
  const bool q_ok =
      p.means != nullptr ||
      (p.q != nullptr && reinterpret_cast<uintptr_t>(p.q) % 16 == 0 && p.q_stride[0] % vec == 0 &&
       p.q_stride[1] % vec == 0 && p.q_stride[2] % vec == 0);
  const bool ok = q_ok && p.a_q != nullptr && p.a_k != nullptr && p.w != nullptr &&
                  (p.d == 64 || p.d == 128) && p.rank >= 1 && p.rank <= pooled_w::kMaxRank &&
                  p.batch >= 1 && p.heads >= 1 && p.n >= 1 && p.block_size >= 1 &&
                  p.q_blocks == ceil_div(p.n, p.block_size) &&
                  (p.a_batch == 1 || p.a_batch == p.batch) && p.blocks_per_cta >= 0 &&
                  p.blocks_per_cta <= pooled_w::kWBlocks && p.q_blocks < (int64_t(1) << 31) &&
                  p.heads <= 65535 && p.batch <= 65535;
  if (!ok) {
    *failed_call = "launch_pooled_w (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  if (p.means != nullptr) {
    const dim3 grid(static_cast<unsigned>(ceil_div(p.q_blocks, pooled_w::kProductBlocks)),
                    static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
    const auto launch = [&](auto kernel, int d) {
      const size_t bytes =
          sizeof(float) * (d == 64 ? pooled_w::products_shared_floats<64>(p.rank)
                                   : pooled_w::products_shared_floats<128>(p.rank));
      if (bytes > 48 * 1024) {  // rank 64, d 128: 70 KB
        const cudaError_t e =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
        if (e != cudaSuccess) {
          *failed_call =
              "cudaFuncSetAttribute(pooled_w_products_kernel, MaxDynamicSharedMemorySize)";
          return e;
        }
      }
      kernel<<<grid, pooled_w::kThreads, bytes, stream>>>(p);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess)
        *failed_call = "pooled_w_products_kernel<<<(q_blocks / 32, heads, batch), 256>>>";
      return e;
    };
    return p.d == 64 ? launch(pooled_w_products_kernel<64>, 64)
                     : launch(pooled_w_products_kernel<128>, 128);
  }
  // Blocks per CTA: about four CTAs per SM over the whole grid (A_q and A_k are staged once per
  // CTA; fewer, longer CTAs share them more), at most kWBlocks.
  PooledWLaunch pw = p;
  if (pw.blocks_per_cta == 0) {
    int sms = 0, dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (e != cudaSuccess) {
      *failed_call = "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)";
      return e;
    }
    const int64_t all = p.q_blocks * p.heads * p.batch, want = 4 * int64_t(sms);
    pw.blocks_per_cta = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(pooled_w::kWBlocks, all / std::max<int64_t>(1, want))));
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(pw.q_blocks, pw.blocks_per_cta)),
                  static_cast<unsigned>(p.heads), static_cast<unsigned>(p.batch));
  const char* what = "pooled_w_kernel<<<(q_blocks / blocks_per_cta, heads, batch), 256>>>";
  const auto launch = [&](auto type, auto dim) {
    using T = typename decltype(type)::type;
    constexpr int kD = decltype(dim)::value;
    const size_t bytes = sizeof(float) * pooled_w::shared_floats<T, kD>(p.rank);
    if (bytes > 48 * 1024) {  // rank 64, d 128, 16-bit q: 94 KB
      const cudaError_t e = cudaFuncSetAttribute(
          pooled_w_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
      if (e != cudaSuccess) {
        *failed_call = "cudaFuncSetAttribute(pooled_w_kernel, MaxDynamicSharedMemorySize)";
        return e;
      }
    }
    pooled_w_kernel<T, kD><<<grid, pooled_w::kThreads, bytes, stream>>>(pw);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) *failed_call = what;
    return e;
  };
  using pooled_keys::TypeTag;
  const auto by_dim = [&](auto type) {
    return p.d == 64 ? launch(type, std::integral_constant<int, 64>{})
                     : launch(type, std::integral_constant<int, 128>{});
  };
  if (p.type == InputType::kFloat32) return by_dim(TypeTag<float>{});
  if (p.type == InputType::kBFloat16) return by_dim(TypeTag<__nv_bfloat16>{});
  return by_dim(TypeTag<__half>{});
}

cudaError_t launch_pooled_key_scores(const PooledKeysLaunch& p_in, cudaStream_t stream,
                                     const char** failed_call) {
  PooledKeysLaunch p = p_in;
  pooled_default_chunk(p);
  const bool ok = pooled_geometry_ok(p) && p.w != nullptr && p.k != nullptr &&
                  reinterpret_cast<uintptr_t>(p.k) % 16 == 0 && p.k_stride[0] % 8 == 0 &&
                  p.k_stride[1] % 8 == 0 && p.k_stride[2] % 8 == 0 && p.k_stride[2] >= p.d &&
                  (p.type == InputType::kBFloat16 || p.type == InputType::kFloat16) &&
                  (p.d == 64 || p.d == 128) && p.kv_heads >= 1 && p.heads % p.kv_heads == 0 &&
                  pooled_keys::chunks(p) * pooled_keys::groups(p) <= 0x7fffffff &&
                  (p.stages == 0 || (p.stages >= 2 && p.stages <= pooled_keys::kMaxStages));
  if (!ok) {
    *failed_call = "launch_pooled_key_scores (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  if (p.wgmma) {
    bool sm90 = false;
    cudaError_t e = device_is_sm90(&sm90, failed_call);
    if (e != cudaSuccess) return e;
    if (!sm90) {
      *failed_call =
          "launch_pooled_key_scores (the wgmma body needs a compute capability 9.0 "
          "device)";
      return cudaErrorInvalidValue;
    }
    e = launch_pooled_keys_wgmma(p, stream, failed_call);
    if (e != cudaSuccess || !p.normalise) return e;
    return launch_pooled_normalise(pooled_normalise_launch(p), stream, failed_call);
  }
  const int stages = p.stages > 0 ? p.stages : pooled_keys::kDefaultStages;
  const auto bytes = static_cast<int>(pooled_keys::shared_bytes(p.d, stages));
  cudaError_t e = cudaSuccess;
  pooled_keys::dispatch_config(p, stages, [&](auto type, auto dim, auto st) {
    e = pooled_keys::launch_keys_kernel(
        pooled_keys_kernel<typename decltype(type)::type, decltype(dim)::value,
                           decltype(st)::value>,
        p, bytes, stream, "pooled_keys_kernel<<<(query groups × key chunks, heads, batch), 128>>>",
        failed_call);
  });
  if (e != cudaSuccess || !p.normalise) return e;
  return launch_pooled_normalise(pooled_normalise_launch(p), stream, failed_call);
}

cudaError_t launch_select_blocks(const SelectLaunch& p, cudaStream_t stream,
                                 const char** failed_call) {
  // A count budget (gamma <= 0) knows every row's length from the geometry: its lists are
  // written directly by the selection kernel (no bitmap, scan or scatter, no temp storage).
  const bool direct = p.gamma <= 0;
  const bool ok = p.scores != nullptr && p.row_ptr != nullptr && (direct || p.temp != nullptr) &&
                  p.rows >= 1 && p.rows < 0x7fffffff && p.n >= 1 && p.m >= 1 && p.q_offset >= 0 &&
                  p.block_size >= 1 && p.q_blocks == ceil_div(p.n, p.block_size) &&
                  p.k_blocks == ceil_div(p.m, p.block_size) &&
                  p.k_blocks <= kEstimatorMaxKeyBlocks && p.rows % p.q_blocks == 0 &&
                  (p.col_capacity == 0 || p.col_idx != nullptr) && std::isfinite(p.gamma) &&
                  std::isfinite(p.density);
  size_t need = 0;
  if (ok && !direct) {
    const cudaError_t e = select_blocks_temp_bytes(p.rows, p.k_blocks, &need, failed_call);
    if (e != cudaSuccess) return e;
  }
  if (!ok || (!direct && p.temp_bytes < need)) {
    *failed_call = "launch_select_blocks (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  unsigned char* t = static_cast<unsigned char*>(p.temp);
  uint32_t* bitmap = direct ? nullptr : reinterpret_cast<uint32_t*>(t);
  int64_t* counts =
      direct ? nullptr : reinterpret_cast<int64_t*>(t + bitmap_bytes(p.rows, p.k_blocks));

  cudaError_t e = cudaSuccess;
  if (!direct) {
    e = cudaMemsetAsync(counts + p.rows, 0, sizeof(int64_t), stream);
    if (e != cudaSuccess) {
      *failed_call = "cudaMemsetAsync(counts[rows])";
      return e;
    }
  }
  const int cap = select_cap(p.k_blocks);
  selection::dispatch_select(cap, [&](auto entries) {
    constexpr int kE = decltype(entries)::value;
    const auto go = [&](auto kernel) {
      constexpr int kRows = select_rows_per_cta(kE);
      const int64_t slice = selection::select_slice_bytes(kE, cap, p.k_blocks);
      const int64_t smem = kRows * slice;
      if (smem > 48 * 1024) {
        e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
        if (e != cudaSuccess) {
          *failed_call = "cudaFuncSetAttribute(select_kernel, MaxDynamicSharedMemorySize)";
          return;
        }
      }
      kernel<<<static_cast<unsigned>(ceil_div(p.rows, kRows)), 32 * kRows,
               static_cast<size_t>(smem), stream>>>(p, bitmap, counts, cap, slice);
      e = cudaGetLastError();
      if (e != cudaSuccess) *failed_call = "select_kernel<<<rows / rows per CTA, 32 · rows>>>";
    };
    direct ? go(select_kernel<kE, true>) : go(select_kernel<kE, false>);
  });
  if (e != cudaSuccess || direct) return e;
  void* cub_temp = t + bitmap_bytes(p.rows, p.k_blocks) + counts_bytes(p.rows);
  size_t cub_bytes = p.temp_bytes - bitmap_bytes(p.rows, p.k_blocks) - counts_bytes(p.rows);
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
