// The CUDA attention backend (backend.h): tensor-level checks and layouts around our
// block-sparse flash-attention kernel (block_sparse_attention.cu), on the caller's current stream.
//
//   sdpa          at::scaled_dot_product_attention (cuDNN / flash on the GPU)
//   attend        one query per sequence (decoding): the split-K decode kernel
//                 (decode_attention.cu), which also reads rank-r projected keys;
//                 from 16 queries on: our kernel with every causally visible block
//   block_sparse  our kernel over the CSR block lists (host lists are copied over; device
//                 lists, as the CUDA estimator writes them, are used in place with no host
//                 round trip, except one scalar read back for the pair count)
//
// Shapes the kernel does not handle (dtypes other than bf16/fp16, head dims other than 64 and
// 128, q and k dims that differ from v's as in low-rank scores, block sizes that are not
// multiples of 64, fewer than 16 queries in attend) run the CPU backend's LibTorch code on the
// GPU tensors: the same function, without our kernel's speed.
//
// Key and value tensors may carry fewer heads than the queries (GQA: query head h reads kv head
// h / (Hq / Hkv)); the kernel reads them in place, the LibTorch paths expand them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "attention/backend.h"
#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/cuda_decode.h"
#include "common/error.h"

namespace attnpilot::attention {
namespace {

/// attend() uses the block-sparse kernel from this many queries on; one query goes to the
/// decode kernel; 2-15 queries would waste most of a query tile and take the LibTorch path.
constexpr int64_t kMinKernelQueries = 16;

std::string shape_of(const torch::Tensor& t) {
  return t.defined() ? c10::str(t.sizes()) : std::string("undefined");
}

void check_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                  const char* what) {
  ATTNPILOT_CHECK_ARG(
      q.defined() && k.defined() && v.defined() && q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
      "cuda {}: q, k, v must be 4-D [b, h, L, e]; got {}, {}, {}", what, shape_of(q), shape_of(k),
      shape_of(v));
  ATTNPILOT_CHECK_ARG(q.is_cuda() && k.device() == q.device() && v.device() == q.device(),
                      "cuda {}: q, k, v must be on one CUDA device; got {}, {}, {}", what,
                      q.device().str(), k.device().str(), v.device().str());
  ATTNPILOT_CHECK_ARG(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == v.size(1) &&
                          k.size(2) == v.size(2) && k.size(3) == q.size(3) && k.size(1) >= 1 &&
                          q.size(1) % k.size(1) == 0,
                      "cuda {}: expected q [b, h, N, e], k [b, hkv, M, e], v [b, hkv, M, dv] with "
                      "h a multiple of hkv; got {}, {}, {}",
                      what, shape_of(q), shape_of(k), shape_of(v));
}

torch::Tensor expand_heads(const torch::Tensor& t, int64_t heads) {
  return t.size(1) == heads ? t : t.repeat_interleave(heads / t.size(1), /*dim=*/1);
}

/// Whether the kernel computes this call: bf16/fp16 throughout, e = dv in {64, 128}, grid
/// limits.
bool kernel_handles(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                    int64_t block_size) {
  const auto dt = q.scalar_type();
  return (dt == torch::kBFloat16 || dt == torch::kHalf) && k.scalar_type() == dt &&
         v.scalar_type() == dt && q.size(3) == v.size(3) &&
         cuda::block_sparse_kernel_supports(static_cast<int>(q.size(3)),
                                            static_cast<int>(block_size)) &&
         q.size(0) <= 65535 && q.size(1) <= 65535 && q.size(2) >= 1 && k.size(2) >= 1;
}

/// t itself when the kernel can read it in place (unit stride in the last dimension, 16-byte
/// aligned start, strides multiples of 8 elements), else a contiguous copy.
torch::Tensor kernel_layout(const torch::Tensor& t) {
  const bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : t.contiguous();
}

void copy_strides(const torch::Tensor& t, int64_t stride[3]) {
  for (int i = 0; i < 3; ++i) stride[i] = t.stride(i);
}

/// Runs the kernel; mask tensors null for the dense (all visible blocks) mode.
torch::Tensor run_kernel(const torch::Tensor& q_in, const torch::Tensor& k_in,
                         const torch::Tensor& v_in, const BlockMask* mask, double scale,
                         bool causal, int64_t q_offset, int64_t sinks, int64_t window) {
  c10::cuda::CUDAGuard guard(q_in.device());
  const auto q = kernel_layout(q_in), k = kernel_layout(k_in), v = kernel_layout(v_in);
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2), d = q.size(3);
  auto out = torch::empty({b, h, n, d}, q.options());
  cuda::BlockSparseLaunch p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  copy_strides(q, p.q_stride);
  copy_strides(k, p.k_stride);
  copy_strides(v, p.v_stride);
  p.batch = static_cast<int>(b);
  p.heads = static_cast<int>(h);
  p.kv_heads = static_cast<int>(k.size(1));
  p.n = n;
  p.m = m;
  p.d = static_cast<int>(d);
  p.q_offset = q_offset;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.sinks = sinks;
  p.window = window;
  torch::Tensor row_ptr, col_idx;  // device copies, alive until the launch is queued
  if (mask != nullptr) {
    row_ptr = mask->row_ptr.to(q.device(), torch::kLong).contiguous();
    col_idx = mask->col_idx.to(q.device(), torch::kLong).contiguous();
    p.row_ptr = row_ptr.data_ptr<int64_t>();
    p.col_idx = col_idx.numel() > 0 ? col_idx.data_ptr<int64_t>() : nullptr;
    p.q_blocks = mask->q_blocks;
    p.k_blocks = mask->k_blocks;
    p.block_size = static_cast<int>(mask->block_size);
  } else {
    p.block_size = cuda::kBlockSparseTile;
  }
  const auto type =
      q.scalar_type() == torch::kBFloat16 ? cuda::ElemType::kBFloat16 : cuda::ElemType::kFloat16;
  const char* failed = "launch_block_sparse_attention";
  const cudaError_t e = cuda::launch_block_sparse_attention(
      p, type, at::cuda::getCurrentCUDAStream(q.get_device()).stream(), &failed);
  if (e != cudaSuccess)
    throw Error(fmt::format("cuda attention: {} failed: {} ({}) for q {}, k {}, block size {}",
                            failed, cudaGetErrorName(e), cudaGetErrorString(e), shape_of(q),
                            shape_of(k), p.block_size));
  return out;
}

class CudaBackend final : public Backend {
 public:
  std::string name() const override { return "cuda"; }

  KernelOut sdpa(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                 bool causal) const override {
    check_inputs(q, k, v, "sdpa");
    KernelOut r;
    r.out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal, std::nullopt,
                                             /*enable_gqa=*/k.size(1) != q.size(1));
    const double n = q.size(2), m = k.size(2);
    r.pairs = static_cast<double>(q.size(0)) * q.size(1) * (causal ? n * (n + 1) / 2 : n * m);
    return r;
  }

  KernelOut attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                   double scale, bool causal, int64_t q_offset) const override {
    check_inputs(q, k, v, "attend");
    const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2);
    const auto dt = q.scalar_type();
    if (n == 1 && q_offset >= 0 && (dt == torch::kBFloat16 || dt == torch::kHalf) &&
        k.scalar_type() == dt && v.scalar_type() == dt &&
        decode_attention_cuda_supports(q.size(3), v.size(3))) {
      // Decoding: the query sits at key position q_offset and sees keys 0..q_offset (causal),
      // or every key; the same length for every sequence of the batch here.
      const int64_t len = causal ? std::min(m, q_offset + 1) : m;
      const auto lengths = torch::full({b}, len, torch::TensorOptions().dtype(torch::kLong));
      KernelOut r;
      r.out = decode_attention_cuda(q.select(2, 0).contiguous(), kernel_layout(k), kernel_layout(v),
                                    lengths, scale)
                  .unsqueeze(2);
      r.pairs = static_cast<double>(b) * h * len;
      return r;
    }
    if (!kernel_handles(q, k, v, cuda::kBlockSparseTile) || n < kMinKernelQueries || q_offset < 0)
      return generic().attend(q, expand_heads(k, h), expand_heads(v, h), scale, causal, q_offset);
    ATTNPILOT_CHECK_ARG(!causal || q_offset + n <= m,
                        "cuda attend: q_offset {} + N {} exceeds key length {}", q_offset, n, m);
    KernelOut r;
    r.out = run_kernel(q, k, v, nullptr, scale, causal, q_offset, 0, 0);
    // Pairs per 64-query tile: its rows times the keys up to its last query's position.
    for (int64_t i0 = 0; i0 < n; i0 += cuda::kBlockSparseTile) {
      const int64_t rows = std::min<int64_t>(cuda::kBlockSparseTile, n - i0);
      const int64_t kend = causal ? std::min(m, q_offset + i0 + rows) : m;
      r.pairs += static_cast<double>(b) * h * rows * kend;
    }
    return r;
  }

  KernelOut block_sparse(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const BlockMask& mask, double scale, bool causal, int64_t q_offset,
                         int64_t sinks, int64_t window) const override {
    check_inputs(q, k, v, "block_sparse");
    const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2);
    const int64_t bs = mask.block_size;
    ATTNPILOT_CHECK_ARG(mask.batch == b && mask.heads == h,
                        "cuda block_sparse: mask covers {} x {} (batch x heads); expected {} x {}",
                        mask.batch, mask.heads, b, h);
    ATTNPILOT_CHECK_ARG(
        bs >= 1 && mask.q_blocks == (n + bs - 1) / bs && mask.k_blocks == (m + bs - 1) / bs,
        "cuda block_sparse: {} x {} blocks of {} do not fit {} queries x {} keys", mask.q_blocks,
        mask.k_blocks, bs, n, m);
    ATTNPILOT_CHECK_ARG(mask.row_ptr.defined() && mask.col_idx.defined() &&
                            mask.row_ptr.scalar_type() == torch::kLong &&
                            mask.col_idx.scalar_type() == torch::kLong && mask.row_ptr.dim() == 1 &&
                            mask.col_idx.dim() == 1 && mask.row_ptr.numel() == mask.rows() + 1,
                        "cuda block_sparse: row_ptr must be int64 [{}] and col_idx int64 [nnz]; "
                        "got {} and {}",
                        mask.rows() + 1, shape_of(mask.row_ptr), shape_of(mask.col_idx));
    ATTNPILOT_CHECK_ARG(q_offset >= 0 && sinks >= 0 && window >= 0,
                        "cuda block_sparse: q_offset {}, sinks {}, window {} must be >= 0",
                        q_offset, sinks, window);
    if (!mask.row_ptr.device().is_cpu()) {
      // Device-resident lists (the CUDA estimator's): used in place, taken as valid (they are
      // built valid; checking them here would need the host round trip this path avoids). The
      // kernel skips listed blocks outside the keys.
      ATTNPILOT_CHECK_ARG(
          mask.row_ptr.device() == q.device() && mask.col_idx.device() == q.device(),
          "cuda block_sparse: device block lists on {} and {}, queries on {}",
          mask.row_ptr.device().str(), mask.col_idx.device().str(), q.device().str());
      if (!kernel_handles(q, k, v, bs))
        return generic().block_sparse(q, expand_heads(k, h), expand_heads(v, h), mask.on_host(),
                                      scale, causal, q_offset, sinks, window);
      KernelOut r;
      r.out = run_kernel(q, k, v, &mask, scale, causal, q_offset, sinks, window);
      r.pairs = mask.listed_pairs(n, m);
      return r;
    }
    // Host lists: checked, then copied to the device for the kernel.
    BlockMask host = mask;
    host.row_ptr = mask.row_ptr.cpu().contiguous();
    host.col_idx = mask.col_idx.cpu().contiguous();
    const int64_t* ptr = host.row_ptr.data_ptr<int64_t>();
    ATTNPILOT_CHECK_ARG(ptr[0] == 0 && ptr[mask.rows()] == host.col_idx.numel(),
                        "cuda block_sparse: row_ptr must run from 0 to nnz {}; got {} .. {}",
                        host.col_idx.numel(), ptr[0], ptr[mask.rows()]);
    for (int64_t row = 0; row < mask.rows(); ++row)
      ATTNPILOT_CHECK_ARG(ptr[row + 1] >= ptr[row],
                          "cuda block_sparse: row_ptr decreases at row {} ({} -> {})", row,
                          ptr[row], ptr[row + 1]);
    if (!kernel_handles(q, k, v, bs))
      return generic().block_sparse(q, expand_heads(k, h), expand_heads(v, h), host, scale, causal,
                                    q_offset, sinks, window);
    KernelOut r;
    r.out = run_kernel(q, k, v, &host, scale, causal, q_offset, sinks, window);
    r.pairs = host.listed_pairs(n, m);
    return r;
  }

 private:
  /// The CPU backend's LibTorch code, which runs on tensors of any device.
  static const Backend& generic() { return backend_for(torch::Device(torch::kCPU)); }
};

}  // namespace

/// The CUDA backend; backend_for (cpu_backend.cpp) returns it for CUDA devices.
const Backend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace attnpilot::attention
