// Tensor-level checks and layouts around the split-K decode kernel (decode_attention.cu).
#include "attention/cuda/cuda_decode.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "attention/cuda/decode_kernels.h"
#include "common/error.h"

namespace attnpilot::attention {
namespace {

std::string shape_of(const torch::Tensor& t) {
  return t.defined() ? c10::str(t.sizes()) : std::string("undefined");
}

std::string strides_of(const torch::Tensor& t) { return c10::str(t.strides()); }

/// k or v as the kernel reads them: unit last stride, 16-byte aligned start, other strides
/// multiples of 8 elements.
void check_cache_layout(const torch::Tensor& t, const char* name) {
  const bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  ATTNPILOT_CHECK_ARG(ok,
                      "decode_attention_cuda: {} {} with strides {} (start address % 16 = {}): "
                      "expected a unit last stride, a 16-byte aligned start and the other "
                      "strides multiples of 8 elements (a view of a contiguous cache buffer)",
                      name, shape_of(t), strides_of(t),
                      reinterpret_cast<uintptr_t>(t.data_ptr()) % 16);
}

}  // namespace

bool decode_attention_cuda_supports(int64_t e, int64_t dv) {
  return e >= 8 && e <= 256 && dv >= 64 && dv <= 128 &&
         cuda::decode_kernel_supports(static_cast<int>(e), static_cast<int>(dv));
}

torch::Tensor decode_attention_cuda(const torch::Tensor& q_in, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& lengths,
                                    double scale) {
  ATTNPILOT_CHECK_ARG(q_in.defined() && k.defined() && v.defined() && lengths.defined() &&
                          q_in.dim() == 3 && k.dim() == 4 && v.dim() == 4 && lengths.dim() == 1,
                      "decode_attention_cuda: expected q [B, Hq, e], k [B, Hk, cap, e], v [B, "
                      "Hkv, cap, dv], lengths [B]; got {}, {}, {}, {}",
                      shape_of(q_in), shape_of(k), shape_of(v), shape_of(lengths));
  ATTNPILOT_CHECK_ARG(q_in.is_cuda() && k.device() == q_in.device() && v.device() == q_in.device(),
                      "decode_attention_cuda: q, k, v must be on one CUDA device; got {}, {}, {}",
                      q_in.device().str(), k.device().str(), v.device().str());
  ATTNPILOT_CHECK_ARG(lengths.device().is_cpu() || lengths.device() == q_in.device(),
                      "decode_attention_cuda: lengths must be on the CPU or on q's device {}; "
                      "got {}",
                      q_in.device().str(), lengths.device().str());
  const auto dt = q_in.scalar_type();
  ATTNPILOT_CHECK_ARG((dt == torch::kBFloat16 || dt == torch::kHalf) && k.scalar_type() == dt &&
                          v.scalar_type() == dt,
                      "decode_attention_cuda: q, k, v must all be bfloat16 or all float16; got "
                      "{}, {}, {}",
                      c10::toString(dt), c10::toString(k.scalar_type()),
                      c10::toString(v.scalar_type()));
  ATTNPILOT_CHECK_ARG(lengths.scalar_type() == torch::kInt || lengths.scalar_type() == torch::kLong,
                      "decode_attention_cuda: lengths must be int32 or int64; got {}",
                      c10::toString(lengths.scalar_type()));
  const int64_t b = q_in.size(0), hq = q_in.size(1), e = q_in.size(2);
  const int64_t hk = k.size(1), hkv = v.size(1), cap = k.size(2), dv = v.size(3);
  ATTNPILOT_CHECK_ARG(k.size(0) == b && v.size(0) == b && lengths.size(0) == b,
                      "decode_attention_cuda: batch {} of q must match k {}, v {}, lengths {}", b,
                      shape_of(k), shape_of(v), shape_of(lengths));
  ATTNPILOT_CHECK_ARG(k.size(3) == e && v.size(2) == cap,
                      "decode_attention_cuda: k {} must be [B, Hk, cap, e={}] and v {} [B, Hkv, "
                      "cap={}, dv]",
                      shape_of(k), e, shape_of(v), cap);
  ATTNPILOT_CHECK_ARG(hq >= 1 && hk >= 1 && hkv >= 1 && hq % hk == 0 && hq % hkv == 0,
                      "decode_attention_cuda: query heads {} must be a positive multiple of the "
                      "key heads {} and of the value heads {}",
                      hq, hk, hkv);
  ATTNPILOT_CHECK_ARG(decode_attention_cuda_supports(e, dv),
                      "decode_attention_cuda: key dim {} must be a multiple of 8 in [8, 256] and "
                      "value dim {} 64 or 128",
                      e, dv);
  ATTNPILOT_CHECK_ARG(std::isfinite(scale), "decode_attention_cuda: scale {} must be finite",
                      scale);
  ATTNPILOT_CHECK_ARG(b <= 65535 && hq <= 65535,
                      "decode_attention_cuda: batch {} and heads {} must be <= 65535", b, hq);
  check_cache_layout(k, "k");
  check_cache_layout(v, "v");

  // Lengths checked on the host (a device tensor is read back: one synchronisation).
  const auto host_len = lengths.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* len = host_len.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t i = 0; i < b; ++i) {
    ATTNPILOT_CHECK_ARG(len[i] >= 0 && len[i] <= cap && len[i] <= INT32_MAX,
                        "decode_attention_cuda: lengths[{}] = {} outside [0, capacity {}] (or "
                        "past the kernel's int32 lengths)",
                        i, len[i], cap);
    longest = std::max(longest, len[i]);
  }

  c10::cuda::CUDAGuard guard(q_in.device());
  auto out = torch::empty({b, hq, dv}, q_in.options());
  if (b == 0) return out;
  const auto q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  // Device lengths as int32: a CPU tensor goes through pinned memory with an asynchronous copy
  // (the caching host allocator keeps the pinned buffer until the copy has run).
  torch::Tensor dev_len;
  if (lengths.is_cuda()) {
    dev_len = lengths.scalar_type() == torch::kInt && lengths.is_contiguous()
                  ? lengths
                  : lengths.to(torch::kInt).contiguous();
  } else {
    dev_len = host_len.to(torch::kInt)
                  .pin_memory()
                  .to(q.device(), torch::kInt,
                      /*non_blocking=*/true);
  }

  cuda::DecodeLaunch p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lengths = dev_len.data_ptr<int32_t>();
  p.q_stride[0] = q.stride(0);
  p.q_stride[1] = q.stride(1);
  for (int i = 0; i < 3; ++i) {
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.batch = static_cast<int>(b);
  p.heads = static_cast<int>(hq);
  p.k_heads = static_cast<int>(hk);
  p.v_heads = static_cast<int>(hkv);
  p.capacity = cap;
  p.max_length = longest;
  p.e = static_cast<int>(e);
  p.dv = static_cast<int>(dv);
  p.scale = static_cast<float>(scale);
  const int sms = at::cuda::getDeviceProperties(q.get_device())->multiProcessorCount;
  const cuda::DecodePlan plan = cuda::plan_decode(p, sms);
  torch::Tensor workspace;  // fp32 partials, alive until the launches are queued
  if (plan.workspace_bytes > 0)
    workspace = torch::empty({plan.workspace_bytes / 4}, q.options().dtype(torch::kFloat));
  const auto type =
      dt == torch::kBFloat16 ? cuda::DecodeType::kBFloat16 : cuda::DecodeType::kFloat16;
  const char* failed = "launch_decode_attention";
  const cudaError_t err = cuda::launch_decode_attention(
      p, plan, workspace.defined() ? workspace.data_ptr() : nullptr, type,
      at::cuda::getCurrentCUDAStream(q.get_device()).stream(), &failed);
  if (err != cudaSuccess)
    throw Error(fmt::format(
        "decode_attention_cuda: {} failed: {} ({}) for q {}, k {}, v {}, {} splits of {} keys",
        failed, cudaGetErrorName(err), cudaGetErrorString(err), shape_of(q), shape_of(k),
        shape_of(v), plan.splits, plan.chunk));
  return out;
}

}  // namespace attnpilot::attention
