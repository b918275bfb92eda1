#pragma once
/// Shared helpers for the attention tests: seeded random inputs and error measures.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "attention/attention.h"

namespace attnpilot::attention::testing {

inline torch::Tensor randn(at::IntArrayRef sizes, at::Generator& gen) {
  return torch::randn(sizes, gen, torch::kFloat);
}

/// q [B, Hq, N, d], k/v [B, Hkv, M, d], causal, q_offset = M - N.
inline AttentionInputs random_inputs(uint64_t seed, int64_t b, int64_t hq, int64_t hkv, int64_t n,
                                     int64_t m, int64_t d, double q_scale = 1.0) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  AttentionInputs in;
  in.q = randn({b, hq, n, d}, gen) * q_scale;
  in.k = randn({b, hkv, m, d}, gen);
  in.v = randn({b, hkv, m, d}, gen);
  return in;
}

inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

inline double rel_error(const torch::Tensor& a, const torch::Tensor& ref) {
  return ((a - ref).norm() / ref.norm()).item<double>();
}

/// The geometry fields every estimator kernel launch struct shares (BlockScoresLaunch,
/// PooledScoresLaunch, PooledKeysLaunch), from a test shape with b, h, n, m, q_offset, bs and
/// causal: the tests' counterpart of the library's set_geometry (cuda_estimator.cpp).
template <class Launch, class Shape>
void set_launch_geometry(Launch& p, const Shape& s) {
  p.batch = static_cast<int>(s.b);
  p.heads = static_cast<int>(s.h);
  p.n = s.n;
  p.m = s.m;
  p.q_offset = s.q_offset;
  p.q_blocks = (s.n + s.bs - 1) / s.bs;
  p.k_blocks = (s.m + s.bs - 1) / s.bs;
  p.block_size = static_cast<int>(s.bs);
  p.causal = s.causal;
}

}  // namespace attnpilot::attention::testing
