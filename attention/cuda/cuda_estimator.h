#pragma once
/// The low-rank block estimator on the GPU (block_estimator.cu): the CUDA twin of
/// estimators.h's lowrank_block_scores + select_blocks, for CUDA tensors.
///
///   q [B, H, N, d], k [B, Hkv, M, d] (fp32 / bf16 / fp16; fp32 math), a_q, a_k [1 or B, H, d, R]
///     ──► lowrank_block_scores_cuda: scores [B, H, q_blocks, k_blocks] fp32 on q's device
///         (8 sampled query rows per block on the tensor cores, or with pooled queries one mean
///         query per block: against the stored bf16/fp16 keys on the tensor cores, else against
///         the projected keys on the CUDA cores)
///     ──► estimate_block_mask_cuda: BlockMask whose row_ptr / col_idx are CUDA int64 tensors
///   scores of any estimator on the device ──► select_blocks_cuda: the same selection
///
/// No host synchronisation: the sampled-row indices (or the query block means), projections,
/// scores and selection (for a mass budget also a scan and a scatter; a count budget's lists are
/// written by the selection itself) all run on the caller's current stream. The pooled mode's
/// kernels are tested against the CPU twin in a CPU emulation (estimator_emu_test) and on the
/// GPU (cuda_estimator_test, both pooled kernels; H100, 2026-12-06). Note that
/// BlockMask's own comment says its lists are CPU tensors; the masks returned here are not (see
/// estimate_block_mask_cuda). Limits of the kernels: block size a multiple of 64, head dim <= 256,
/// rank <= 64 (padded to 8, 16, 32 or 64 with zero columns), at most 16384 key blocks. Outside
/// them: InvalidArgument.
#include <torch/torch.h>

#include <cstdint>

#include "attention/block_mask.h"
#include "attention/plan.h"

namespace attnpilot::attention {

/// Options of the CUDA estimator.
struct CudaEstimatorOptions {
  /// Score products in one tf32 pass (about 3x less tensor-core work; scores within ~1e-3 of
  /// the fp32 twin) instead of three (hi·hi + hi·lo + lo·hi: about fp32 accuracy, the default).
  bool tf32 = false;
  /// lowrank_block_scores_cuda: one pooled query per block (the mean of its rows), as
  /// lowrank_block_scores(..., pool_queries = true), instead of 8 sampled rows. Plain fp32 (tf32
  /// does not apply). estimate_block_mask_cuda ignores it and follows plan.pool_queries.
  bool pool_queries = false;
  /// estimate_block_mask_cuda with gamma > 0: read nnz back to the host (one synchronisation)
  /// and trim col_idx to it.
  bool exact_nnz = false;
  /// Output rows per thread of the projection kernel (keys, sampled query rows, pooled means):
  /// 1 (the default, measured) or 4 (4 rows per thread, 2 at padded rank 64: each shared-memory
  /// read of the projection matrix feeds 4x the FMAs; ProjectionLaunch::rows_per_thread). Same
  /// results (the same FMA order per element). A tuning knob: 4 measured no faster on an H100
  /// (bench/RESULTS.md, 2026-12-05). Anything else: InvalidArgument.
  int projection_rows = 1;
  /// Pooled queries with bf16/fp16 keys of head dim 64 or 128: score w = A_k A_qᵀ q̄ (per query
  /// block) against the keys as stored, on the tensor cores (w split into two 16-bit parts:
  /// scores within ~1e-5 of the fp32 path), with no key projection. false: project the keys,
  /// then the CUDA-core kernel (the path this one is tested against). Other shapes and types
  /// always take that path.
  bool pooled_key_mma = true;
  /// Keys per CTA of the pooled score kernels (rounded down to whole blocks, at least one); 0:
  /// kPooledChunkKeys (1024, chosen for the CUDA-core kernel). A tuning knob for the
  /// benchmark; results do not depend on it beyond float rounding order. Negative:
  /// InvalidArgument.
  int64_t pooled_chunk_keys = 0;
  /// 64-key tiles each CTA of the tensor-core pooled kernel keeps in flight: 2, 3 or 4; 0: 2.
  /// A tuning knob for the benchmark (the two-stage kernel measured latency-bound, ncu on an
  /// H100, 2026-12-06); the scores do not depend on it. Anything else: InvalidArgument.
  int pooled_key_stages = 0;
  /// Which body computes the tensor-core pooled scores (pooled_key_mma): kAuto, the warpgroup
  /// MMAs on compute capability 9.0 (measured 7-27% faster than mma.sync on an H100,
  /// bench/RESULTS.md, 2026-12-06) and mma.sync elsewhere; kMmaSync; kWgmma
  /// (pooled_keys_wgmma.cuh: 128-key tiles, pooled_key_stages of them in flight; compute
  /// capability 9.0 only, elsewhere the call throws naming that requirement). The bodies give
  /// the same scores up to the order of the fp32 sums.
  enum class PooledKeyBody { kAuto, kMmaSync, kWgmma };
  PooledKeyBody pooled_key_body = PooledKeyBody::kAuto;
  /// CTAs per SM the wgmma body is compiled for: 0 or 2 (the default: ~204 registers), or 3
  /// (registers capped at 168, ~100 bytes spilled; with pooled_key_stages 0 or 2 only, not
  /// pipelined; ignored by the mma.sync body). A tuning knob for the benchmark: the two-CTA
  /// kernel measured latency-bound (12% achieved occupancy), but three measured no faster
  /// (ncu and bench, H100, 2026-12-06). Anything else: InvalidArgument.
  int pooled_key_ctas_per_sm = 0;
  /// The wgmma body in its pipelined form (pooled_keys_wgmma.cuh: the next 128-key tile's
  /// products run while a tile is folded, two accumulator sets, three tiles of keys in shared
  /// memory; pooled_key_stages 0 or 3, pooled_key_ctas_per_sm 0 or 2, else InvalidArgument).
  /// The same scores as the plain wgmma body: bit for bit in the emulation, within 1.2e-7 on the
  /// H100 (the folds compile differently). Ignored by the mma.sync body. Registers (ptxas,
  /// sm_90a, d 128): 254 with w in one part, no spills; 255 and 40 bytes of stack with w in two
  /// parts. Measured slower than the plain body (H100, 2026-12-06, L = 32k, r = 16: 0.476
  /// against 0.423 ms per call with w in two parts, 0.406 against 0.370 with one), so opt-in.
  bool pooled_key_pipelined = false;
  /// The tensor-core pooled scores with w in two 16-bit parts (hi + lo: scores within ~1e-5 of
  /// the fp32 path, the default) or, false, in one (hi alone: half the tensor-core work and
  /// half the A-fragment registers; w then keeps 8 (bf16) or 11 (fp16) bits, and the block
  /// scores move by up to ~5e-3, measured against the float64 twin in the tests; the chosen
  /// masks agreed with the two-part ones on 99.86% of the blocks at L = 32k, 10%: H100,
  /// 2026-12-06; 0.370 against 0.423 ms per call there, the fastest form measured). Either
  /// body, plain or pipelined.
  bool pooled_key_split = true;
  /// The tensor-core pooled path forms w = A_k A_qᵀ q̄ by one kernel (pooled_w.cuh: block means
  /// and both products in fp32, q read once with 16-byte loads, up to 16 query blocks per CTA
  /// sharing A_q and A_k in shared memory, each block's loads issued before the previous block's
  /// reduction), the default; where q's rows are not 16-byte aligned, or with false, LibTorch's
  /// block means and the products kernel. The same w up to the order of the fp32 sums.
  /// Measured (H100, 2026-12-06, tenth session, L = 32k, r = 16, 10%): the kernel 106-108 µs
  /// (ncu) against LibTorch's means (98 µs) plus the products kernel (21 µs); per call 0.338
  /// against 0.368 ms with w in one part, 0.395 against 0.434 with two (r = 32: 0.426 against
  /// 0.472). Its own floor is q's read, 80 µs at 3.35 TB/s.
  bool pooled_w_kernel = true;
  /// w by LibTorch alone: block means, two cuBLAS products and a scaling (LibTorch's TF32 setting
  /// for matmuls applies; the path before 2026-12-06's tenth session), whatever
  /// pooled_w_kernel says. The reference the tests and the bench compare with. (pooled_w.cuh's
  /// products kernel on LibTorch's means, the fallback of pooled_w_kernel, measured as fast as
  /// the two cuBLAS products: ~21 µs at L = 32k, r = 16; ncu, H100, same day.)
  bool pooled_w_cublas = false;
  /// The tensor-core pooled scores fold each unmasked half tile against a per-row reference
  /// carried across key blocks, without the half's maximum (pooled_keys_mma.cuh's
  /// fold_keys_branched: an FMA, an exp2 and an add per score instead of a max, an FMA, an exp2
  /// and an add, the exp2s free of the maximum's dependency chain), falling back to the exact
  /// fold where the sum leaves [2^-64, 2^64]. The default; false: the exact fold everywhere. The
  /// same scores up to the rounding of each exp2's argument (within 1e-6 of the exact fold on
  /// the GPU tests' cases). Either body, not the pipelined one. Measured (H100, 2026-12-06, tenth
  /// session, L = 32k): the two-part score kernel 297 -> 289 µs (ncu); per call 0 to 5% faster
  /// over eight r / density / part combinations, never slower.
  bool pooled_key_lazy_max = true;
};

/// Whether the kernels take this call: q, k CUDA tensors of float32 / bfloat16 / float16 on one
/// device, head dim <= 256, a_q with 1..64 columns (after narrowing to the rank used), block
/// size a multiple of 64, at most 16384 key blocks. The argument checks of the functions below
/// refuse the rest; a caller dispatching on this can run the CPU twin's LibTorch code otherwise.
bool cuda_estimator_handles(const torch::Tensor& q, const torch::Tensor& k, int64_t rank,
                            int64_t block_size);

/// lowrank_block_scores (estimators.h) on CUDA tensors, rank r = a_q.size(3): block sums of
/// softmax((q a_q)(k a_k)ᵀ/√d) averaged over up to 8 evenly spaced rows of each query block
/// (its last row included); zero past a query block's last visible key block. With
/// options.pool_queries, lowrank_block_scores(..., pool_queries = true) instead: one row per
/// query block, its mean query (projected), seeing the keys up to the block's last query. GQA:
/// query head h reads key head h / (H / Hkv). Adds the FLOPs spent to *flops: projections of the
/// sampled rows (pooled: n·d adds for the means and the projections of the means) and of the
/// keys, then 2r+1 per (sampled row or pooled query, visible key) pair.
torch::Tensor lowrank_block_scores_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                        const torch::Tensor& a_q, const torch::Tensor& a_k,
                                        int64_t block_size, bool causal, int64_t q_offset,
                                        double* flops, const CudaEstimatorOptions& options = {});

/// The low-rank estimator of `plan` (kind block_sparse, estimator lowrank, rank <= a_q.size(3):
/// the first plan.rank columns of a_q and a_k are used; sampled rows, or pooled queries when
/// plan.pool_queries) followed by select_blocks' rule, all on the GPU. The returned mask's row_ptr
/// [rows + 1] and col_idx are int64 tensors on q's device. With a top_k or density budget the
/// per-row counts are known in advance and col_idx has exactly row_ptr[rows] entries. With gamma >
/// 0 they depend on the scores: col_idx then has room for every visible block (the sum over rows of
/// visible blocks), its first row_ptr[rows] entries are the lists and the rest are -1, unless
/// options.exact_nnz is true, which reads row_ptr[rows] back to the host (one synchronisation) and
/// trims col_idx to it. A plan that keeps everything (density 1, no gamma or top_k) skips the
/// scores, as the CPU path does, and lists every visible block (no FLOPs counted).
BlockMask estimate_block_mask_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& a_q, const torch::Tensor& a_k,
                                   const HeadPlan& plan, bool causal, int64_t q_offset,
                                   double* flops, const CudaEstimatorOptions& options = {});

/// The estimator's key projection alone (as lowrank_block_scores_cuda runs it): kp [B, H,
/// M, rp] fp32 on k's device, kp[b, h] = k[b, h / (H / Hkv)] · a_k[b or 0, h] with r = a_k.size(3)
/// columns, zero-padded to rp = 8, 16, 32 or 64; H = a_k.size(1). k [B, Hkv, M, d] fp32 / bf16 /
/// fp16 (last dim contiguous or copied), d <= 256, r in [1, 64]; options.projection_rows picks
/// the kernel variant (the bench times both). On the current stream, no synchronisation.
torch::Tensor lowrank_project_keys_cuda(const torch::Tensor& k, const torch::Tensor& a_k,
                                        const CudaEstimatorOptions& options = {});

/// Whether select_blocks_cuda takes these scores: a 4-D CUDA tensor with at most 16384 key
/// blocks.
bool cuda_select_handles(const torch::Tensor& scores);

/// select_blocks (estimators.h) on the GPU for block scores already on the device (any
/// estimator's, e.g. the pooled estimator's LibTorch scores): the same rule, kernels and output
/// as estimate_block_mask_cuda's selection (CSR lists as CUDA int64 tensors, no host round trip;
/// with gamma, col_idx padded with -1 unless options.exact_nnz). scores [B, H, ceil(n / bs),
/// ceil(m / bs)], any float dtype (converted to fp32), zero or ignored past each row's visible
/// blocks.
BlockMask select_blocks_cuda(const torch::Tensor& scores, const HeadPlan& plan, int64_t n,
                             int64_t m, bool causal, int64_t q_offset,
                             const CudaEstimatorOptions& options = {});

}  // namespace attnpilot::attention
