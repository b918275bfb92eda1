#pragma once
/// Raw launchers of the CUDA low-rank block estimator (block_estimator.cu): the GPU twin of
/// estimators.cpp's lowrank_block_scores + select_blocks. No LibTorch types here (nvcc never
/// compiles the LibTorch headers); cuda_estimator.cpp is the tensor-level code.
///
///   k [B, Hkv, M, d] ──(1) projection──► kp [B, H, M, R] fp32               (k · a_k, N×r work)
///                    (projection_block.cuh: 1 or 4 output rows per thread, rows_per_thread)
///   q [B, H, N, d] ──(1) projection of 8 sampled rows per query block──► qs [B, H, QB, 8, R]
///                    (q · a_q · log2(e)/√d)
///   qs, kp ──(2) block scores──► scores [B, H, QB, KB] fp32 (rows sum to 1 over visible blocks)
/// or, with pooled queries (HeadPlan::pool_queries):
///   q ──(LibTorch fp32 block means, cuda_estimator.cpp)──► [B, H, QB, d] ──(1) projection of
///       every row──► pq [B, H, QB, R] (mean query · a_q · log2(e)/√d)
///   pq, kp ──(2p) pooled scores: per-(query block, key block) log-sum-exp into scores, then a
///       normalisation in place──► scores [B, H, QB, KB] fp32 (pooled_scores.cuh)
/// or, for bf16/fp16 keys of d 64 or 128, without projecting the keys:
///   q ──(LibTorch: block means, · A_q · log2(e)/√d, · A_kᵀ; or (1w), the same in one kernel,
///       pooled_w.cuh)──► w [B, H, QB, d]; w, k ──(2k) the same scores on the tensor cores
///       (pooled_keys_mma.cuh), then the same normalisation
///   scores ──(3) selection (one warp per row) ──► bitmap [rows, ⌈KB/32⌉] + counts [rows]
///          ──(4) CUB exclusive scan──► row_ptr [rows+1] ──(5) scatter──► col_idx (ascending)
///
/// Everything stays on the device: no host synchronisation and no host copy of any list.
/// R (the padded rank) is 8, 16, 32 or 64: the projections fill the columns past r with zeros.
#ifndef ATTNPILOT_CUDA_EMU  // tests/cuda_emu/cuda_emu.h declares the CUDA types used here
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>

namespace attnpilot::attention::cuda {

/// Element type of the projected rows, q or k (read in place, fp32 math).
enum class InputType { kFloat32, kBFloat16, kFloat16 };

/// Sampled query rows per query block (estimators.cpp's kLowRankSampleRows).
inline constexpr int kEstimatorSampleRows = 8;
/// Keys per tile of the score kernel; block sizes must be multiples of it.
inline constexpr int kEstimatorKeyTile = 64;
/// Keys per CTA of the pooled score kernel when PooledScoresLaunch::chunk_blocks is 0. Chosen by
/// a work model, not yet by a measurement: under causal masks a chunk's work falls with its
/// position (fewer query blocks see later keys), and at 32k / 32 heads / block 128 the 512 CTAs
/// of 2048-key chunks fit in one wave (4 CTAs per SM at 127 registers) whose time is the first
/// chunk's, twice the average; 1024-key chunks (1024 CTAs, heaviest first) halve that maximum
/// and balance the two waves.
inline constexpr int64_t kPooledChunkKeys = 1024;
/// Largest key-block count the selection kernel sorts in shared memory (per row).
inline constexpr int64_t kEstimatorMaxKeyBlocks = 16384;

/// (1) out[b, h, j, :] = x[b, h / (heads / x_heads), row(j), :] · a[b or 0, h, :, :rank] · scale,
/// zero in the columns past rank. row(j) = j (the keys), or with sample_block = bs > 0 the
/// sampled query row of slot j = 8·qb + t: qb·bs + rows-1 - (t'·rows)/ns, t' = min(t, ns-1),
/// rows = min(bs, n_in - qb·bs), ns = min(8, rows) (estimators.cpp's sample; t >= ns repeat
/// the last sample).
struct ProjectionLaunch {
  const void* x = nullptr;          ///< [batch, x_heads, n_in, d], last dim contiguous
  int64_t x_stride[3] = {0, 0, 0};  ///< element strides over (batch, head, row)
  const float* a = nullptr;         ///< [a_batch, heads, d, >= rank] fp32, last dim contiguous
  int64_t a_stride[3] = {0, 0, 0};  ///< element strides over (batch, head, d row)
  int a_batch = 1;                  ///< 1 (shared by the batch) or batch
  int rank = 0;                     ///< 1 .. rank_pad
  float scale = 1.f;
  float* out = nullptr;  ///< [batch, heads, rows_out, rank_pad] contiguous fp32 (written)
  int batch = 0, heads = 0, x_heads = 0;
  int64_t n_in = 0;          ///< rows of x
  int64_t rows_out = 0;      ///< n_in, or 8·ceil(n_in / sample_block)
  int64_t sample_block = 0;  ///< 0: every row; > 0: the sampled rows of blocks of this size
  int d = 0;                 ///< 1 .. 256
  int rank_pad = 0;          ///< 8, 16, 32 or 64
  /// Output rows per thread (a tuning knob; measure before changing the default): 1, each
  /// float4 of `a` read from shared memory feeds 4 FMAs (measured: 251 µs for k [1, 32, 32768,
  /// 128] bf16 at rank_pad 16 on an H100, bound by those reads); or 4 (2 at rank_pad 64), CTAs
  /// of 512 (256) rows whose float4s of `a` each feed 16 (8) FMAs, at most 48 KB of shared
  /// memory (projection_block.cuh); measured no faster on an H100 (2026-12-05: 0.92-1.26x the
  /// time of 1 row at ranks 8-64). Anything else: invalid.
  int rows_per_thread = 1;
};

/// (2) Block scores of lowrank_block_scores, from sampled projected queries.
struct BlockScoresLaunch {
  /// [batch, heads, q_blocks, 8, rank_pad] fp32: row t of query block qb is query
  /// qb·bs + rows-1 - (t·rows)/ns projected and scaled by log2(e)/√d (rows t >= ns unused).
  const float* qs = nullptr;
  const float* kp = nullptr;  ///< [batch, heads, m, rank_pad] fp32
  float* scores = nullptr;    ///< [batch, heads, q_blocks, k_blocks] fp32, every element written
  /// Scratch of lowrank_block_scores_workspace_bytes(p) bytes (16-byte aligned; never null:
  /// it holds at least the work counter, which the launch zeroes on the stream).
  float* workspace = nullptr;
  int batch = 0, heads = 0;
  int64_t n = 0, m = 0, q_offset = 0;
  int64_t q_blocks = 0, k_blocks = 0;
  int block_size = 0;  ///< multiple of kEstimatorKeyTile
  int rank_pad = 0;    ///< 8, 16, 32 or 64
  bool causal = false;
  /// true: three tf32 products per score (hi·hi + hi·lo + lo·hi, about fp32 accuracy);
  /// false: one (3x less tensor-core work and shared-memory traffic, scores within ~1e-3).
  bool split_tf32 = true;
};

/// (2p) Block scores of lowrank_block_scores(..., pool_queries = true): one row per query block,
/// its mean query projected, scored against every key it sees (j < kend, the CPU twin's kend),
/// softmax over those keys, summed per key block. fp32 CUDA-core math (pooled_scores.cuh).
struct PooledScoresLaunch {
  /// [batch, heads, q_blocks, rank_pad] fp32: the mean of query block qb's rows projected and
  /// scaled by log2(e)/√d (zero past the rank).
  const float* pq = nullptr;
  const float* kp = nullptr;  ///< [batch, heads, m, rank_pad] fp32, 16-byte aligned
  float* scores = nullptr;    ///< [batch, heads, q_blocks, k_blocks] fp32, every element written
  int batch = 0, heads = 0;
  int64_t n = 0, m = 0, q_offset = 0;
  int64_t q_blocks = 0, k_blocks = 0;
  int block_size = 0;  ///< multiple of kEstimatorKeyTile
  int rank_pad = 0;    ///< 8, 16, 32 or 64
  bool causal = false;
  /// Key blocks per CTA of the score kernel (its grid's key chunks); 0: the launcher's choice
  /// (kPooledChunkKeys keys, at least one block).
  int64_t chunk_blocks = 0;
  /// Normalise the rows (the second kernel of launch_pooled_block_scores); false: leave the
  /// per-block log2 sums L in the scores (valid for the visible blocks only) for a selection with
  /// SelectLaunch::log2_sums, which normalises them to the same floats.
  bool normalise = true;
};

/// Largest rank launch_pooled_w takes (pooled_w.cuh's kMaxRank).
inline constexpr int kPooledWMaxRank = 64;

/// (1w) w[b, h, qb, :] = A_k[b or 0, h] · (A_q[b or 0, h]ᵀ · q̄ · scale), q̄ the mean of query
/// block qb's rows (the last block may be short): the d-vector (2k) scores the stored keys with
/// (pooled_w.cuh). fp32 math.
struct PooledWLaunch {
  /// Set: the query blocks' means [batch, heads, q_blocks, d] fp32 contiguous, and only the
  /// products run (pooled_w_products_block; q is not read). Null: the means from q too.
  const float* means = nullptr;
  const void* q = nullptr;          ///< [batch, heads, n, d] of `type`, 16-byte aligned rows
  int64_t q_stride[3] = {0, 0, 0};  ///< element strides over (batch, head, row)
  InputType type = InputType::kBFloat16;
  const float* a_q = nullptr;            ///< [a_batch, heads, d, >= rank] fp32, any strides
  int64_t a_q_stride[4] = {0, 0, 0, 0};  ///< element strides over (batch, head, d row, column)
  const float* a_k = nullptr;            ///< a_q's shape, its own strides
  int64_t a_k_stride[4] = {0, 0, 0, 0};
  int a_batch = 1;     ///< 1 (shared by the batch) or batch
  float* w = nullptr;  ///< [batch, heads, q_blocks, d] fp32 contiguous
  int batch = 0, heads = 0;
  int64_t n = 0, q_blocks = 0;
  int block_size = 0;
  int d = 0;     ///< 64 or 128
  int rank = 0;  ///< 1 .. 64
  float scale = 1.f;
  /// Query blocks per CTA of the kernel from q (pooled_w_block), 1 .. 16; 0: the launcher's
  /// choice (enough CTAs for about four per SM, at most 16 blocks each).
  int blocks_per_cta = 0;
};

/// Most 64-key tiles the tensor-core pooled kernel keeps in flight per CTA (PooledKeysLaunch::
/// stages, CudaEstimatorOptions::pooled_key_stages).
inline constexpr int kPooledKeyMaxStages = 4;

/// (2k) The scores of (2p) from the keys as stored, on the tensor cores (pooled_keys_mma.cuh):
/// the rank-r score of query block qb and key j is w_qb · k_j with w_qb = A_k A_qᵀ q̄_qb, so no
/// key projection is needed. Same output as (2p); bf16 or fp16 keys, d 64 or 128.
struct PooledKeysLaunch {
  /// [batch, heads, q_blocks, d] fp32 contiguous: A_k A_qᵀ (mean query of qb) · log2(e)/√d
  const float* w = nullptr;
  /// [batch, kv_heads, m, d] of `type` (kBFloat16 or kFloat16), d contiguous, 16-byte aligned
  /// rows (k_stride[2] a multiple of 8)
  const void* k = nullptr;
  int64_t k_stride[3] = {0, 0, 0};  ///< element strides over (batch, kv head, row)
  InputType type = InputType::kBFloat16;
  float* scores = nullptr;  ///< [batch, heads, q_blocks, k_blocks] fp32, every element written
  int batch = 0, heads = 0, kv_heads = 0;
  int64_t n = 0, m = 0, q_offset = 0;
  int64_t q_blocks = 0, k_blocks = 0;
  int block_size = 0;  ///< multiple of kEstimatorKeyTile
  int d = 0;           ///< 64 or 128
  bool causal = false;
  /// Key blocks per CTA (its grid's key chunks); 0: the launcher's choice (kPooledChunkKeys
  /// keys, at least one block).
  int64_t chunk_blocks = 0;
  /// Key tiles in flight per CTA (cp.async stages): 2 .. kPooledKeyMaxStages; 0: 2.
  int stages = 0;
  /// The wgmma body (pooled_keys_wgmma.cuh: 128-key tiles, compute capability 9.0 only; an
  /// error elsewhere) instead of the mma.sync one. Same scores up to the order of the sums.
  bool wgmma = false;
  /// The wgmma body's CTAs per SM it is compiled for: 0 or 2, two (~204 registers); 3, three
  /// (capped at 168 registers, ~100 bytes spilled; with 2 stages only, not pipelined). A tuning
  /// knob.
  int ctas_per_sm = 0;
  /// The wgmma body's pipelined form (pooled_keys_wgmma.cuh, kPipelined: tile t + 1's products
  /// run while tile t is folded; stages 0 or 3, not with ctas_per_sm 3).
  bool pipelined = false;
  /// w in two 16-bit parts (hi + lo, the default) or, false, in one (hi alone: half the MMAs;
  /// CudaEstimatorOptions::pooled_key_split).
  bool split = true;
  /// As PooledScoresLaunch::normalise.
  bool normalise = true;
  /// Fold unmasked key halves against a per-row reference without their maximum
  /// (pooled_keys_mma.cuh's fold_keys_branched; CudaEstimatorOptions::pooled_key_lazy_max). Both
  /// bodies; the pipelined wgmma body ignores it.
  bool lazy_max = false;
};

/// The normalisation's launch (pooled_normalise_row reads only the geometry and the scores)
/// for either pooled score launch.
template <class Launch>
PooledScoresLaunch pooled_normalise_launch(const Launch& p) {
  PooledScoresLaunch np;
  np.scores = p.scores;
  np.batch = p.batch;
  np.heads = p.heads;
  np.n = p.n;
  np.m = p.m;
  np.q_offset = p.q_offset;
  np.q_blocks = p.q_blocks;
  np.k_blocks = p.k_blocks;
  np.block_size = p.block_size;
  np.causal = p.causal;
  np.chunk_blocks = p.chunk_blocks;
  return np;
}

/// (3)-(5) select_blocks on device-resident scores, written as CSR lists.
struct SelectLaunch {
  const float* scores = nullptr;  ///< [rows, k_blocks] (rows = batch·heads·q_blocks)
  /// The scores are per-block log2 sums L (the pooled estimators' rows before
  /// launch_pooled_*_scores normalise them, PooledScoresLaunch::normalise = false): the
  /// selection normalises them itself, to the same floats.
  bool log2_sums = false;
  int64_t rows = 0;
  int64_t n = 0, m = 0, q_offset = 0;
  int64_t q_blocks = 0, k_blocks = 0;
  int block_size = 0;
  bool causal = false;
  double gamma = 0;            ///< > 0: fewest blocks reaching gamma·total mass
  int64_t top_k = 0;           ///< else > 0: top_k blocks
  double density = 1;          ///< else ceil(density·visible - 1e-9) blocks
  int64_t* row_ptr = nullptr;  ///< [rows + 1] (written)
  int64_t* col_idx = nullptr;  ///< [col_capacity] (the first row_ptr[rows] written)
  int64_t col_capacity = 0;    ///< entries past it are never written
  /// select_blocks_temp_bytes(rows, k_blocks) bytes; unused (may be null) for a count budget
  /// (gamma <= 0), whose lists are written directly, col_capacity then being exactly their total.
  void* temp = nullptr;
  size_t temp_bytes = 0;
};

/// Bytes of the score kernel's global workspace: 16 for its work counter (the persistent grid's
/// CTAs take work items from it), plus, when its per-warp log-sum-exp rows do not fit in shared
/// memory, a slice per CTA. Queries the current device.
cudaError_t lowrank_block_scores_workspace_bytes(const BlockScoresLaunch& p, size_t* bytes,
                                                 const char** failed_call);
/// Scratch of the selection: bitmap, counts and CUB's scan storage.
cudaError_t select_blocks_temp_bytes(int64_t rows, int64_t k_blocks, size_t* bytes,
                                     const char** failed_call);

/// Each returns cudaSuccess, or the error of the first failing CUDA call with that call's name
/// in *failed_call (cudaErrorInvalidValue, named likewise, for arguments outside the range).
cudaError_t launch_projection(const ProjectionLaunch& p, InputType type, cudaStream_t stream,
                              const char** failed_call);
cudaError_t launch_lowrank_block_scores(const BlockScoresLaunch& p, cudaStream_t stream,
                                        const char** failed_call);
/// Two kernels on `stream`: the pooled scores' per-block log-sum-exps, then their normalisation.
cudaError_t launch_pooled_block_scores(const PooledScoresLaunch& p, cudaStream_t stream,
                                       const char** failed_call);
/// (1w): w of every query block (pooled_w.cuh), one kernel on `stream`: from q, or with
/// PooledWLaunch::means from the means (the products alone).
cudaError_t launch_pooled_w(const PooledWLaunch& p, cudaStream_t stream, const char** failed_call);
/// Two kernels on `stream`: the pooled scores from the stored keys (L per block), then the same
/// normalisation as launch_pooled_block_scores.
cudaError_t launch_pooled_key_scores(const PooledKeysLaunch& p, cudaStream_t stream,
                                     const char** failed_call);
/// The scores alone (no normalisation) by the wgmma body (pooled_keys_wgmma.cu, sm_90a); p
/// checked and its chunk set by launch_pooled_key_scores, which calls it when p.wgmma.
cudaError_t launch_pooled_keys_wgmma(const PooledKeysLaunch& p, cudaStream_t stream,
                                     const char** failed_call);
cudaError_t launch_select_blocks(const SelectLaunch& p, cudaStream_t stream,
                                 const char** failed_call);

}  // namespace attnpilot::attention::cuda
