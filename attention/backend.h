#pragma once
/// The kernels behind run_attention, one implementation per device. The executor
/// (attention.cpp) groups heads by plan, builds projections and block masks, and calls
/// one of these per group; FLOPs are derived from the pairs each kernel reports.
///
///   run_attention ──groups──► Backend::{sdpa, attend, block_sparse}   (CPU: cpu_backend.cpp;
///                                                                        CUDA: attention/cuda/)
///
/// The executor passes tensors [b, h, L, e] with key/value heads already expanded to the
/// query heads (the CUDA backend also accepts fewer key/value heads: GQA, read in place).
#include <torch/torch.h>

#include <memory>
#include <string>

#include "attention/block_mask.h"

namespace attnpilot::attention {

/// One kernel call's result: the output and the (query, key) pairs it scored.
struct KernelOut {
  torch::Tensor out;
  double pairs = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  /// LibTorch's fused scaled_dot_product_attention; causal only for square top-left
  /// aligned inputs (the executor checks). Scale 1/√d.
  virtual KernelOut sdpa(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         bool causal) const = 0;
  /// softmax(scale · q kᵀ + causal mask) v, computed in query chunks that skip keys past the
  /// chunk's last visible position. q, k: [b, h, N|M, e] (e = d, or r for projected scores).
  virtual KernelOut attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                           double scale, bool causal, int64_t q_offset) const = 0;
  /// Attention restricted to the key blocks of `mask` (rows for this b x h), plus, when
  /// window > 0, a token-level streaming mask (key < sinks or key > query - window). A query
  /// that sees no listed key gets a zero output row (every backend).
  virtual KernelOut block_sparse(const torch::Tensor& q, const torch::Tensor& k,
                                 const torch::Tensor& v, const BlockMask& mask, double scale,
                                 bool causal, int64_t q_offset, int64_t sinks,
                                 int64_t window) const = 0;
};

/// The backend for tensors on `device`: CPU always; CUDA when this build has the CUDA kernels
/// (attention/cuda/), else Unavailable naming the device.
const Backend& backend_for(const torch::Device& device);

}  // namespace attnpilot::attention
