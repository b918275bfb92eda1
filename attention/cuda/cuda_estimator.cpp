// Tensor-level code of the CUDA low-rank block estimator (cuda_estimator.h): argument checks,
// the query block means of pooled mode (LibTorch reductions on the device), padding of the
// projections to the kernels' rank, and the launches of block_estimator.cu on the current stream.
#include "attention/cuda/cuda_estimator.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/block_sparse_kernels.h"
#include "common/error.h"

namespace attnpilot::attention {
namespace {

constexpr double kLog2e = 1.4426950408889634;

std::string shape_of(const torch::Tensor& t) {
  return t.defined() ? c10::str(t.sizes()) : std::string("undefined");
}

bool io_dtype(torch::ScalarType t) {
  return t == torch::kFloat || t == torch::kBFloat16 || t == torch::kHalf;
}

/// ceil(a / b) (named apart from block_mask.h's ceil_div, which this file also sees).
int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

/// The kernels' rank: 8, 16, 32 or 64.
int64_t padded_rank(int64_t r) {
  int64_t p = 8;
  while (p < r) p *= 2;
  return p;
}

void check_cuda(cudaError_t e, const char* failed, const torch::Tensor& q, const torch::Tensor& k,
                int64_t bs) {
  if (e != cudaSuccess)
    throw Error(fmt::format("cuda estimator: {} failed: {} ({}) for q {}, k {}, block size {}",
                            failed, cudaGetErrorName(e), cudaGetErrorString(e), shape_of(q),
                            shape_of(k), bs));
}

void check_cuda(cudaError_t e, const char* failed, const torch::Tensor& scores, int64_t bs) {
  if (e != cudaSuccess)
    throw Error(fmt::format("cuda selection: {} failed: {} ({}) for scores {}, block size {}",
                            failed, cudaGetErrorName(e), cudaGetErrorString(e), shape_of(scores),
                            bs));
}

/// Shapes, dtypes, rank and block size first, the device last: every check but the device one
/// also fires for CPU tensors.
void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& a_q,
                  const torch::Tensor& a_k, int64_t block_size, int64_t q_offset) {
  ATTNPILOT_CHECK_ARG(q.defined() && k.defined() && q.dim() == 4 && k.dim() == 4,
                      "cuda estimator: q and k must be 4-D [b, h, L, d]; got {} and {}",
                      shape_of(q), shape_of(k));
  ATTNPILOT_CHECK_ARG(io_dtype(q.scalar_type()) && io_dtype(k.scalar_type()),
                      "cuda estimator: q and k must be float32, bfloat16 or float16; got {} and {}",
                      c10::toString(q.scalar_type()), c10::toString(k.scalar_type()));
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3);
  ATTNPILOT_CHECK_ARG(k.size(0) == b && k.size(3) == d && k.size(1) >= 1 && h % k.size(1) == 0,
                      "cuda estimator: expected q [b, h, N, d] and k [b, hkv, M, d] with h a "
                      "multiple of hkv; got {} and {}",
                      shape_of(q), shape_of(k));
  ATTNPILOT_CHECK_ARG(b >= 1 && b <= 65535 && h >= 1 && h <= 65535 && n >= 1 && k.size(2) >= 1,
                      "cuda estimator: batch {} and heads {} must be in [1, 65535] and N {}, M {} "
                      ">= 1",
                      b, h, n, k.size(2));
  ATTNPILOT_CHECK_ARG(d >= 1 && d <= 256, "cuda estimator: head dim {} must be in [1, 256]", d);
  ATTNPILOT_CHECK_ARG(a_q.defined() && a_k.defined() && a_q.dim() == 4 &&
                          a_k.sizes() == a_q.sizes() && (a_q.size(0) == 1 || a_q.size(0) == b) &&
                          a_q.size(1) == h && a_q.size(2) == d,
                      "cuda estimator: a_q and a_k must both be [1 or b={}, h={}, d={}, r]; got {} "
                      "and {}",
                      b, h, d, shape_of(a_q), shape_of(a_k));
  ATTNPILOT_CHECK_ARG(a_q.is_floating_point() && a_k.is_floating_point(),
                      "cuda estimator: a_q and a_k must be floating point; got {} and {}",
                      c10::toString(a_q.scalar_type()), c10::toString(a_k.scalar_type()));
  ATTNPILOT_CHECK_ARG(a_q.size(3) >= 1 && a_q.size(3) <= 64,
                      "cuda estimator: rank {} must be in [1, 64]", a_q.size(3));
  ATTNPILOT_CHECK_ARG(
      block_size >= cuda::kEstimatorKeyTile && block_size % cuda::kEstimatorKeyTile == 0 &&
          block_size <= HeadPlan::kMaxBlockSize,
      "cuda estimator: block size {} must be a multiple of {} in [{}, {}]", block_size,
      cuda::kEstimatorKeyTile, cuda::kEstimatorKeyTile, HeadPlan::kMaxBlockSize);
  ATTNPILOT_CHECK_ARG(div_up(k.size(2), block_size) <= cuda::kEstimatorMaxKeyBlocks,
                      "cuda estimator: {} keys make {} key blocks of {}; at most {} are supported",
                      k.size(2), div_up(k.size(2), block_size), block_size,
                      cuda::kEstimatorMaxKeyBlocks);
  ATTNPILOT_CHECK_ARG(q_offset >= 0, "cuda estimator: q_offset {} must be >= 0", q_offset);
  ATTNPILOT_CHECK_ARG(q.is_cuda() && k.device() == q.device() && a_q.device() == q.device() &&
                          a_k.device() == q.device(),
                      "cuda estimator: q, k, a_q and a_k must be on one CUDA device; got {}, {}, "
                      "{} and {}",
                      q.device().str(), k.device().str(), a_q.device().str(), a_k.device().str());
}

void check_options(const CudaEstimatorOptions& options) {
  ATTNPILOT_CHECK_ARG(options.projection_rows == 1 || options.projection_rows == 4,
                      "cuda estimator: projection_rows {} must be 1 or 4", options.projection_rows);
  ATTNPILOT_CHECK_ARG(options.pooled_chunk_keys >= 0,
                      "cuda estimator: pooled_chunk_keys {} must be >= 0 (0: the default)",
                      options.pooled_chunk_keys);
  ATTNPILOT_CHECK_ARG(
      options.pooled_key_stages == 0 || (options.pooled_key_stages >= 2 &&
                                         options.pooled_key_stages <= cuda::kPooledKeyMaxStages),
      "cuda estimator: pooled_key_stages {} must be in [2, {}] (0: the default)",
      options.pooled_key_stages, cuda::kPooledKeyMaxStages);
  ATTNPILOT_CHECK_ARG(options.pooled_key_ctas_per_sm == 0 || options.pooled_key_ctas_per_sm == 2 ||
                          (options.pooled_key_ctas_per_sm == 3 &&
                           (options.pooled_key_stages == 0 || options.pooled_key_stages == 2)),
                      "cuda estimator: pooled_key_ctas_per_sm {} must be 0, 2, or 3 with "
                      "pooled_key_stages 0 or 2 (got {})",
                      options.pooled_key_ctas_per_sm, options.pooled_key_stages);
  ATTNPILOT_CHECK_ARG(!options.pooled_key_pipelined || options.pooled_key_ctas_per_sm != 3,
                      "cuda estimator: pooled_key_pipelined takes pooled_key_ctas_per_sm 0 or 2 "
                      "(got {})",
                      options.pooled_key_ctas_per_sm);
  ATTNPILOT_CHECK_ARG(
      !options.pooled_key_pipelined || options.pooled_key_stages == 0 ||
          options.pooled_key_stages == 3,
      "cuda estimator: pooled_key_pipelined takes pooled_key_stages 0 or 3 (got {}): the "
      "folded tile, the one whose products run and the one loading",
      options.pooled_key_stages);
}

/// Rows of query block qb and its visible key count (the CPU twin's kend).
int64_t block_rows(int64_t qb, int64_t n, int64_t bs) { return std::min(bs, n - qb * bs); }
int64_t visible_keys(int64_t qb, int64_t n, int64_t m, int64_t bs, bool causal, int64_t q_offset) {
  return causal ? std::min(m, q_offset + qb * bs + block_rows(qb, n, bs)) : m;
}

cuda::InputType input_type(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat      ? cuda::InputType::kFloat32
         : t.scalar_type() == torch::kBFloat16 ? cuda::InputType::kBFloat16
                                               : cuda::InputType::kFloat16;
}

/// out [b, h, rows, rp] = rows of x (every row, or the sampled rows of blocks of sample_block)
/// times a·scale, zero past a's columns.
/// rows_per_thread: CudaEstimatorOptions::projection_rows (1 or 4).
void project(const torch::Tensor& x_in, const torch::Tensor& a_in, double scale,
             int64_t sample_block, const torch::Tensor& out, cudaStream_t stream,
             int rows_per_thread) {
  const auto x = x_in.stride(3) == 1 ? x_in : x_in.contiguous();
  auto a = a_in.to(torch::kFloat);
  if (a.stride(3) != 1) a = a.contiguous();
  cuda::ProjectionLaunch p;
  p.x = x.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.x_stride[i] = x.stride(i);
    p.a_stride[i] = a.stride(i);
  }
  p.a = a.data_ptr<float>();
  p.a_batch = static_cast<int>(a.size(0));
  p.rank = static_cast<int>(a.size(3));
  p.scale = static_cast<float>(scale);
  p.out = out.data_ptr<float>();
  p.batch = static_cast<int>(out.size(0));
  p.heads = static_cast<int>(out.size(1));
  p.x_heads = static_cast<int>(x.size(1));
  p.n_in = x.size(2);
  p.rows_out = out.size(2);
  p.sample_block = sample_block;
  p.d = static_cast<int>(x.size(3));
  p.rank_pad = static_cast<int>(out.size(3));
  p.rows_per_thread = rows_per_thread;
  const char* failed = "launch_projection";
  const cudaError_t e = cuda::launch_projection(p, input_type(x), stream, &failed);
  if (e != cudaSuccess)
    throw Error(fmt::format("cuda estimator: {} failed: {} ({}) projecting {} by {}", failed,
                            cudaGetErrorName(e), cudaGetErrorString(e), shape_of(x_in),
                            shape_of(a_in)));
}

/// Mean of each query block's rows [b, h, ceil(n / bs), d] in fp32, read in q's own dtype (the
/// reductions accumulate in fp32; no fp32 copy of q). The last block may be short.
torch::Tensor block_means(const torch::Tensor& q, int64_t bs) {
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t full = n / bs, tail = n - full * bs;
  std::vector<torch::Tensor> parts;
  if (full > 0)
    parts.push_back(
        q.narrow(2, 0, full * bs).view({b, h, full, bs, d}).mean(3, false, torch::kFloat));
  if (tail > 0) parts.push_back(q.narrow(2, full * bs, tail).mean(2, true, torch::kFloat));
  return parts.size() == 1 ? parts[0].contiguous() : torch::cat(parts, 2);
}

/// w = (q̄ A_q · scale) A_kᵀ [b, h, ceil(n / bs), d] fp32 for q [b, h, n, d] (d 64 or 128),
/// a_q, a_k [1 or b, h, d, r], r <= 64, on `stream`:
/// - options.pooled_w_cublas: LibTorch's block means, two LibTorch (cuBLAS) products and a
///   scaling;
/// - else options.pooled_w_kernel (the default) where q's rows are contiguous and 16-byte
///   aligned: pooled_w.cuh's kernel from q (means and products in one);
/// - else LibTorch's block means and pooled_w.cuh's products kernel.
torch::Tensor pooled_w(const torch::Tensor& q, const torch::Tensor& a_q, const torch::Tensor& a_k,
                       int64_t bs, double scale, const CudaEstimatorOptions& options,
                       cudaStream_t stream) {
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t vec = q.scalar_type() == torch::kFloat ? 4 : 8;
  const bool kernel_ok = !options.pooled_w_cublas && options.pooled_w_kernel &&
                         (d == 64 || d == 128) && a_q.size(3) <= cuda::kPooledWMaxRank &&
                         q.stride(3) == 1 && q.stride(0) % vec == 0 && q.stride(1) % vec == 0 &&
                         q.stride(2) % vec == 0 &&
                         reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0;
  const bool products_ok =
      !options.pooled_w_cublas && (d == 64 || d == 128) && a_q.size(3) <= cuda::kPooledWMaxRank;
  if (!kernel_ok && !products_ok)
    return torch::matmul(torch::matmul(block_means(q, bs), a_q.to(torch::kFloat)) * scale,
                         a_k.to(torch::kFloat).transpose(2, 3))
        .contiguous();
  // fp32, any strides (the usual case: no copy).
  const auto aq = a_q.to(torch::kFloat), ak = a_k.to(torch::kFloat);
  auto w = torch::empty({b, h, div_up(n, bs), d}, q.options().dtype(torch::kFloat));
  torch::Tensor means;  // the products kernel's input (kept alive until the launch)
  cuda::PooledWLaunch p;
  if (!kernel_ok) {
    means = block_means(q, bs);  // contiguous [b, h, q_blocks, d] fp32
    p.means = means.data_ptr<float>();
  } else {
    p.q = q.data_ptr();
    for (int i = 0; i < 3; ++i) p.q_stride[i] = q.stride(i);
    p.type = input_type(q);
  }
  for (int i = 0; i < 4; ++i) {
    p.a_q_stride[i] = aq.stride(i);
    p.a_k_stride[i] = ak.stride(i);
  }
  p.a_q = aq.data_ptr<float>();
  p.a_k = ak.data_ptr<float>();
  p.a_batch = static_cast<int>(aq.size(0));
  p.w = w.data_ptr<float>();
  p.batch = static_cast<int>(b);
  p.heads = static_cast<int>(h);
  p.n = n;
  p.q_blocks = div_up(n, bs);
  p.block_size = static_cast<int>(bs);
  p.d = static_cast<int>(d);
  p.rank = static_cast<int>(a_q.size(3));
  p.scale = static_cast<float>(scale);
  const char* failed = "launch_pooled_w";
  const cudaError_t e = cuda::launch_pooled_w(p, stream, &failed);
  if (e != cudaSuccess)
    throw Error(fmt::format("cuda estimator: {} failed: {} ({}) for q {}, a_q {}, block size {}",
                            failed, cudaGetErrorName(e), cudaGetErrorString(e), shape_of(q),
                            shape_of(a_q), bs));
  return w;
}

/// The geometry fields shared by the score kernels' launch structs (BlockScoresLaunch,
/// PooledScoresLaunch, PooledKeysLaunch) for q [b, h, n, d], k [b, hkv, m, d].
template <class Launch>
void set_geometry(Launch& l, const torch::Tensor& q, const torch::Tensor& k, int64_t bs,
                  bool causal, int64_t q_offset) {
  l.batch = static_cast<int>(q.size(0));
  l.heads = static_cast<int>(q.size(1));
  l.n = q.size(2);
  l.m = k.size(2);
  l.q_offset = q_offset;
  l.q_blocks = div_up(l.n, bs);
  l.k_blocks = div_up(l.m, bs);
  l.block_size = static_cast<int>(bs);
  l.causal = causal;
}

/// Whether the tensor-core pooled kernel (pooled_keys_mma.cuh) takes keys k: bf16 or fp16,
/// head dim 64 or 128, rows contiguous and 16-byte aligned.
bool pooled_keys_mma_handles(const torch::Tensor& k) {
  const int64_t d = k.size(3);
  return (k.scalar_type() == torch::kBFloat16 || k.scalar_type() == torch::kHalf) &&
         (d == 64 || d == 128) && k.stride(3) == 1 && k.stride(0) % 8 == 0 &&
         k.stride(1) % 8 == 0 && k.stride(2) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0;
}

/// Pooled-query scores on the device; see lowrank_block_scores_cuda. options.pooled_key_mma:
/// the tensor-core kernel on the stored keys where pooled_keys_mma_handles(k), else the key
/// projection and the CUDA-core kernel.
/// normalise = false: the rows keep their per-block log2 sums (for a selection with
/// SelectLaunch::log2_sums; entries past a row's visible blocks unwritten).
torch::Tensor pooled_scores_on_device(const torch::Tensor& q_in, const torch::Tensor& k_in,
                                      const torch::Tensor& a_q, const torch::Tensor& a_k,
                                      int64_t bs, bool causal, int64_t q_offset, double* flops,
                                      const CudaEstimatorOptions& options, bool normalise = true) {
  const int proj_rows = options.projection_rows;
  bool key_mma = options.pooled_key_mma;
  // Key blocks per CTA (0: the launchers' default).
  const int64_t chunk_blocks =
      options.pooled_chunk_keys > 0 ? std::max<int64_t>(1, options.pooled_chunk_keys / bs) : 0;
  c10::cuda::CUDAGuard guard(q_in.device());
  const auto stream = at::cuda::getCurrentCUDAStream(q_in.get_device()).stream();
  const int64_t b = q_in.size(0), h = q_in.size(1), n = q_in.size(2), d = q_in.size(3);
  const int64_t m = k_in.size(2), r = a_q.size(3), rp = padded_rank(r);
  const int64_t qbn = div_up(n, bs), kbn = div_up(m, bs);
  const auto fopt = q_in.options().dtype(torch::kFloat);
  key_mma = key_mma && pooled_keys_mma_handles(k_in);

  // The block means of q, projected and scaled by log2(e)/√d like the sampled rows (mean then
  // project: the CPU twin's project then mean up to rounding).
  const double scale = kLog2e / std::sqrt(static_cast<double>(d));
  auto scores = torch::empty({b, h, qbn, kbn}, fopt);
  double pairs = 0;
  for (int64_t i = 0; i < qbn; ++i)
    pairs += static_cast<double>(visible_keys(i, n, m, bs, causal, q_offset));
  const char* failed = "launch_pooled_block_scores";
  if (key_mma) {
    // w = (q̄ A_q · scale) A_kᵀ [b, h, qbn, d], scored against k itself: the rank-r scores
    // without projecting the keys (pooled_w above).
    const auto w = pooled_w(q_in, a_q, a_k, bs, scale, options, stream);
    cuda::PooledKeysLaunch pl;
    pl.w = w.data_ptr<float>();
    pl.k = k_in.data_ptr();
    for (int i = 0; i < 3; ++i) pl.k_stride[i] = k_in.stride(i);
    pl.type = input_type(k_in);
    pl.scores = scores.data_ptr<float>();
    set_geometry(pl, q_in, k_in, bs, causal, q_offset);
    pl.kv_heads = static_cast<int>(k_in.size(1));
    pl.d = static_cast<int>(d);
    pl.chunk_blocks = chunk_blocks;
    pl.stages = options.pooled_key_stages;
    pl.ctas_per_sm = options.pooled_key_ctas_per_sm;
    pl.pipelined = options.pooled_key_pipelined;
    pl.split = options.pooled_key_split;
    pl.normalise = normalise;
    pl.lazy_max = options.pooled_key_lazy_max;
    using Body = CudaEstimatorOptions::PooledKeyBody;
    pl.wgmma = options.pooled_key_body == Body::kWgmma;
    if (options.pooled_key_body == Body::kAuto) {
      const char* failed_query = "";
      check_cuda(cuda::device_is_sm90(&pl.wgmma, &failed_query), failed_query, q_in, k_in, bs);
    }
    failed = "launch_pooled_key_scores";
    check_cuda(cuda::launch_pooled_key_scores(pl, stream, &failed), failed, q_in, k_in, bs);
    // FLOPs: the block means (n·d adds), the projection of the means and its product with
    // A_kᵀ, then 2·2d + 1 per (query block, visible key) pair with w's two 16-bit parts
    // (2d + 1 with one).
    const double per_pair = (options.pooled_key_split ? 4.0 : 2.0) * d + 1;
    *flops += static_cast<double>(b) * h *
              (static_cast<double>(n) * d + 4.0 * qbn * d * r + pairs * per_pair);
    return scores;
  }
  const auto pq = torch::empty({b, h, qbn, rp}, fopt);
  project(block_means(q_in, bs), a_q, scale, 0, pq, stream, proj_rows);
  const auto kp = torch::empty({b, h, m, rp}, fopt);
  project(k_in, a_k, 1.0, 0, kp, stream, proj_rows);
  cuda::PooledScoresLaunch pl;
  pl.pq = pq.data_ptr<float>();
  pl.kp = kp.data_ptr<float>();
  pl.scores = scores.data_ptr<float>();
  set_geometry(pl, q_in, k_in, bs, causal, q_offset);
  pl.rank_pad = static_cast<int>(rp);
  pl.chunk_blocks = chunk_blocks;
  pl.normalise = normalise;
  check_cuda(cuda::launch_pooled_block_scores(pl, stream, &failed), failed, q_in, k_in, bs);
  // FLOPs: the block means (n·d adds), the projections of the means and of the keys, then 2r+1
  // per (query block, visible key) pair.
  *flops += static_cast<double>(b) * h *
            (static_cast<double>(n) * d + 2.0 * (qbn + m) * d * r + pairs * (2.0 * r + 1));
  return scores;
}

/// Sampled-row scores on the device; see lowrank_block_scores_cuda.
torch::Tensor scores_on_device(const torch::Tensor& q_in, const torch::Tensor& k_in,
                               const torch::Tensor& a_q, const torch::Tensor& a_k, int64_t bs,
                               bool causal, int64_t q_offset, double* flops, bool tf32,
                               int proj_rows) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const auto stream = at::cuda::getCurrentCUDAStream(q_in.get_device()).stream();
  const int64_t b = q_in.size(0), h = q_in.size(1), n = q_in.size(2), d = q_in.size(3);
  const int64_t m = k_in.size(2), r = a_q.size(3), rp = padded_rank(r);
  const int64_t qbn = div_up(n, bs), kbn = div_up(m, bs);
  const auto fopt = q_in.options().dtype(torch::kFloat);

  // Projections (one kernel each): the 8 sampled rows of every query block, scaled by
  // log2(e)/√d (the score kernel works in base 2), and every key.
  const auto qs = torch::empty({b, h, qbn * cuda::kEstimatorSampleRows, rp}, fopt);
  const auto kp = torch::empty({b, h, m, rp}, fopt);
  project(q_in, a_q, kLog2e / std::sqrt(static_cast<double>(d)), bs, qs, stream, proj_rows);
  project(k_in, a_k, 1.0, 0, kp, stream, proj_rows);

  auto scores = torch::empty({b, h, qbn, kbn}, fopt);
  cuda::BlockScoresLaunch sl;
  sl.qs = qs.data_ptr<float>();
  sl.kp = kp.data_ptr<float>();
  sl.scores = scores.data_ptr<float>();
  set_geometry(sl, q_in, k_in, bs, causal, q_offset);
  sl.rank_pad = static_cast<int>(rp);
  sl.split_tf32 = !tf32;
  size_t ws_bytes = 0;
  const char* failed = "lowrank_block_scores_workspace_bytes";
  check_cuda(cuda::lowrank_block_scores_workspace_bytes(sl, &ws_bytes, &failed), failed, q_in, k_in,
             bs);
  torch::Tensor ws;
  if (ws_bytes > 0) {
    ws = torch::empty({static_cast<int64_t>(ws_bytes / sizeof(float))}, fopt);
    sl.workspace = ws.data_ptr<float>();
  }
  failed = "launch_lowrank_block_scores";
  check_cuda(cuda::launch_lowrank_block_scores(sl, stream, &failed), failed, q_in, k_in, bs);

  // FLOPs: the sampled rows' and the keys' projections, then 2r+1 per (sampled row, key) pair.
  double pairs = 0, sampled = 0;
  for (int64_t i = 0; i < qbn; ++i) {
    const double s =
        static_cast<double>(std::min<int64_t>(cuda::kEstimatorSampleRows, block_rows(i, n, bs)));
    sampled += s;
    pairs += s * static_cast<double>(visible_keys(i, n, m, bs, causal, q_offset));
  }
  *flops +=
      2.0 * b * h * (sampled + m) * d * r + static_cast<double>(b) * h * pairs * (2.0 * r + 1);
  return scores;
}

/// select_blocks_cuda; log2_sums: the scores are a pooled estimator's per-block log2 sums
/// (pooled_scores_on_device with normalise = false), normalised by the selection kernel.
BlockMask select_on_device(const torch::Tensor& scores_in, const HeadPlan& plan, int64_t n,
                           int64_t m, bool causal, int64_t q_offset,
                           const CudaEstimatorOptions& options, bool log2_sums) {
  ATTNPILOT_CHECK_ARG(scores_in.defined() && scores_in.dim() == 4 && scores_in.is_cuda(),
                      "cuda selection: scores must be a 4-D CUDA tensor [b, h, q_blocks, "
                      "k_blocks]; got {} on {}",
                      shape_of(scores_in),
                      scores_in.defined() ? scores_in.device().str() : std::string("-"));
  ATTNPILOT_CHECK_ARG(plan.kind == Kind::kBlockSparse && plan.block_size >= 1,
                      "cuda selection: plan {} is not a block_sparse plan", plan.to_string());
  const int64_t bs = plan.block_size;
  ATTNPILOT_CHECK_ARG(n >= 1 && m >= 1 && q_offset >= 0 && scores_in.size(2) == div_up(n, bs) &&
                          scores_in.size(3) == div_up(m, bs),
                      "cuda selection: scores {} do not fit n = {} queries and m = {} keys in "
                      "blocks of {} (q_offset {})",
                      shape_of(scores_in), n, m, bs, q_offset);
  ATTNPILOT_CHECK_ARG(scores_in.size(3) <= cuda::kEstimatorMaxKeyBlocks,
                      "cuda selection: {} key blocks; at most {} are supported", scores_in.size(3),
                      cuda::kEstimatorMaxKeyBlocks);
  const auto scores = scores_in.to(torch::kFloat).contiguous();
  c10::cuda::CUDAGuard guard(scores.device());
  const auto stream = at::cuda::getCurrentCUDAStream(scores.get_device()).stream();
  const int64_t b = scores.size(0), h = scores.size(1);
  const int64_t qbn = scores.size(2), kbn = scores.size(3), rows = b * h * qbn;
  // Entries per row: known in advance for a top_k or density budget (select_blocks keeps
  // max(forced, min(budget, visible))), at most the visible blocks with gamma.
  int64_t capacity = 0;
  for (int64_t i = 0; i < qbn; ++i) {
    const int64_t first_q = q_offset + i * bs,
                  last_q = q_offset + i * bs + block_rows(i, n, bs) - 1;
    const int64_t vis = causal ? std::min(kbn, last_q / bs + 1) : kbn;
    int64_t keep = vis;
    if (plan.gamma <= 0) {
      const int64_t d0 = std::min(first_q, m - 1) / bs, d1 = std::min(last_q, m - 1) / bs;
      int64_t forced = 1;  // block 0
      for (int64_t kb = std::max<int64_t>(d0, 1); kb <= d1; ++kb) forced += kb < vis ? 1 : 0;
      const int64_t budget =
          plan.top_k > 0 ? plan.top_k : static_cast<int64_t>(std::ceil(plan.density * vis - 1e-9));
      keep = std::max(forced, std::min(budget, vis));
    }
    capacity += keep;
  }
  capacity *= b * h;
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(scores.device());
  auto row_ptr = torch::empty({rows + 1}, lopt);
  auto col_idx =
      plan.gamma > 0 ? torch::full({capacity}, -1, lopt) : torch::empty({capacity}, lopt);
  // Scratch (bitmap, counts, the scan's storage) for a mass budget only: a count budget's lists
  // are written directly.
  size_t temp_bytes = 0;
  const char* failed = "select_blocks_temp_bytes";
  torch::Tensor temp;
  if (plan.gamma > 0) {
    check_cuda(cuda::select_blocks_temp_bytes(rows, kbn, &temp_bytes, &failed), failed, scores, bs);
    temp = torch::empty({static_cast<int64_t>(temp_bytes)},
                        torch::TensorOptions().dtype(torch::kUInt8).device(scores.device()));
  }
  cuda::SelectLaunch p;
  p.scores = scores.data_ptr<float>();
  p.log2_sums = log2_sums;
  p.rows = rows;
  p.n = n;
  p.m = m;
  p.q_offset = q_offset;
  p.q_blocks = qbn;
  p.k_blocks = kbn;
  p.block_size = static_cast<int>(bs);
  p.causal = causal;
  p.gamma = plan.gamma;
  p.top_k = plan.top_k;
  p.density = plan.density;
  p.row_ptr = row_ptr.data_ptr<int64_t>();
  p.col_idx = capacity > 0 ? col_idx.data_ptr<int64_t>() : nullptr;
  p.col_capacity = capacity;
  p.temp = temp.defined() ? temp.data_ptr() : nullptr;
  p.temp_bytes = temp_bytes;
  failed = "launch_select_blocks";
  check_cuda(cuda::launch_select_blocks(p, stream, &failed), failed, scores, bs);

  BlockMask mask;
  mask.batch = b;
  mask.heads = h;
  mask.q_blocks = qbn;
  mask.k_blocks = kbn;
  mask.block_size = bs;
  mask.row_ptr = row_ptr;
  mask.col_idx = col_idx;
  if (options.exact_nnz && plan.gamma > 0)
    mask.col_idx = col_idx.narrow(0, 0, row_ptr[rows].item<int64_t>());
  return mask;
}

}  // namespace

bool cuda_estimator_handles(const torch::Tensor& q, const torch::Tensor& k, int64_t rank,
                            int64_t block_size) {
  return q.defined() && k.defined() && q.dim() == 4 && k.dim() == 4 && q.is_cuda() &&
         k.device() == q.device() && io_dtype(q.scalar_type()) && io_dtype(k.scalar_type()) &&
         q.size(3) >= 1 && q.size(3) <= 256 && rank >= 1 && rank <= 64 &&
         block_size >= cuda::kEstimatorKeyTile && block_size % cuda::kEstimatorKeyTile == 0 &&
         block_size <= HeadPlan::kMaxBlockSize &&
         div_up(k.size(2), block_size) <= cuda::kEstimatorMaxKeyBlocks;
}

torch::Tensor lowrank_block_scores_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                        const torch::Tensor& a_q, const torch::Tensor& a_k,
                                        int64_t block_size, bool causal, int64_t q_offset,
                                        double* flops, const CudaEstimatorOptions& options) {
  check_options(options);
  check_inputs(q, k, a_q, a_k, block_size, q_offset);
  if (options.pool_queries)
    return pooled_scores_on_device(q, k, a_q, a_k, block_size, causal, q_offset, flops, options);
  return scores_on_device(q, k, a_q, a_k, block_size, causal, q_offset, flops, options.tf32,
                          options.projection_rows);
}

BlockMask estimate_block_mask_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& a_q, const torch::Tensor& a_k,
                                   const HeadPlan& plan, bool causal, int64_t q_offset,
                                   double* flops, const CudaEstimatorOptions& options) {
  ATTNPILOT_CHECK_ARG(q.defined() && q.dim() == 4, "cuda estimator: q must be 4-D; got {}",
                      shape_of(q));
  ATTNPILOT_CHECK_ARG(plan.kind == Kind::kBlockSparse && plan.estimator == BlockEstimator::kLowRank,
                      "cuda estimator: plan {} is not a block_sparse plan with the lowrank "
                      "estimator",
                      plan.to_string());
  plan.validate(q.size(3));
  ATTNPILOT_CHECK_ARG(a_q.defined() && a_k.defined() && a_q.dim() == 4 && a_k.dim() == 4 &&
                          plan.rank <= a_q.size(3) && plan.rank <= a_k.size(3),
                      "cuda estimator: projections a_q {} and a_k {} must be 4-D with at least "
                      "the plan's rank {} columns",
                      shape_of(a_q), shape_of(a_k), plan.rank);
  const int64_t bs = plan.block_size;
  const auto aq = a_q.narrow(3, 0, plan.rank), ak = a_k.narrow(3, 0, plan.rank);
  check_options(options);
  check_inputs(q, k, aq, ak, bs, q_offset);
  // Density 1 without gamma or top_k keeps every visible block whatever the scores: no estimate.
  const bool everything = plan.gamma <= 0 && plan.top_k <= 0 && plan.density >= 1.0;
  torch::Tensor scores;
  // Pooled scores go to the selection as per-block log2 sums: it normalises them itself (the
  // same floats as the normalisation kernel, one launch and one pass over the scores fewer).
  bool log2_sums = false;
  if (everything) {
    scores = torch::zeros({q.size(0), q.size(1), div_up(q.size(2), bs), div_up(k.size(2), bs)},
                          q.options().dtype(torch::kFloat));
  } else if (plan.pool_queries) {
    scores = pooled_scores_on_device(q, k, aq, ak, bs, causal, q_offset, flops, options, false);
    log2_sums = true;
  } else {
    scores = scores_on_device(q, k, aq, ak, bs, causal, q_offset, flops, options.tf32,
                              options.projection_rows);
  }
  return select_on_device(scores, plan, q.size(2), k.size(2), causal, q_offset, options, log2_sums);
}

torch::Tensor lowrank_project_keys_cuda(const torch::Tensor& k, const torch::Tensor& a_k,
                                        const CudaEstimatorOptions& options) {
  ATTNPILOT_CHECK_ARG(k.defined() && k.dim() == 4 && io_dtype(k.scalar_type()),
                      "cuda key projection: k must be a 4-D float32, bfloat16 or float16 tensor "
                      "[b, hkv, M, d]; got {} of {}",
                      shape_of(k), k.defined() ? c10::toString(k.scalar_type()) : "-");
  const int64_t b = k.size(0), hkv = k.size(1), d = k.size(3);
  ATTNPILOT_CHECK_ARG(a_k.defined() && a_k.dim() == 4 && a_k.is_floating_point() &&
                          (a_k.size(0) == 1 || a_k.size(0) == b) && a_k.size(1) >= 1 && hkv >= 1 &&
                          a_k.size(1) % hkv == 0 && a_k.size(2) == d,
                      "cuda key projection: a_k must be floating point [1 or b={}, h (a multiple "
                      "of hkv={}), d={}, r]; got {}",
                      b, hkv, d, shape_of(a_k));
  ATTNPILOT_CHECK_ARG(b >= 1 && b <= 65535 && a_k.size(1) <= 65535 && k.size(2) >= 1,
                      "cuda key projection: batch {} and heads {} must be in [1, 65535] and M {} "
                      ">= 1",
                      b, a_k.size(1), k.size(2));
  ATTNPILOT_CHECK_ARG(d >= 1 && d <= 256, "cuda key projection: head dim {} must be in [1, 256]",
                      d);
  ATTNPILOT_CHECK_ARG(a_k.size(3) >= 1 && a_k.size(3) <= 64,
                      "cuda key projection: rank {} must be in [1, 64]", a_k.size(3));
  check_options(options);
  ATTNPILOT_CHECK_ARG(k.is_cuda() && a_k.device() == k.device(),
                      "cuda key projection: k and a_k must be on one CUDA device; got {} and {}",
                      k.device().str(), a_k.device().str());
  c10::cuda::CUDAGuard guard(k.device());
  const auto stream = at::cuda::getCurrentCUDAStream(k.get_device()).stream();
  const auto kp = torch::empty({b, a_k.size(1), k.size(2), padded_rank(a_k.size(3))},
                               k.options().dtype(torch::kFloat));
  project(k, a_k, 1.0, 0, kp, stream, options.projection_rows);
  return kp;
}

bool cuda_select_handles(const torch::Tensor& scores) {
  return scores.defined() && scores.is_cuda() && scores.dim() == 4 &&
         scores.size(3) <= cuda::kEstimatorMaxKeyBlocks;
}

BlockMask select_blocks_cuda(const torch::Tensor& scores, const HeadPlan& plan, int64_t n,
                             int64_t m, bool causal, int64_t q_offset,
                             const CudaEstimatorOptions& options) {
  return select_on_device(scores, plan, n, m, causal, q_offset, options, false);
}

}  // namespace attnpilot::attention
