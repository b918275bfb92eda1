#pragma once
/// Shared helpers of the CUDA attention tests (on the GPU, and in the CPU emulation of the
/// kernels): the device, the skip without a GPU, the closeness check of a kernel's output against
/// its CPU twin, and the block-sparse cases (tolerances, random CSR lists, the CPU reference).
/// Nothing here needs the CUDA toolkit.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdint>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention/backend.h"
#include "attention/block_mask.h"

namespace attnpilot::attention::testing {

/// The GPU every CUDA attention test runs on.
inline const torch::Device kCuda(torch::kCUDA, 0);

/// Skips the test with a message naming what needs the GPU when no CUDA device is present.
#define ATTNPILOT_SKIP_WITHOUT_CUDA(what)                    \
  if (!torch::cuda::is_available())                          \
  GTEST_SKIP() << "no CUDA device: " << (what)               \
               << " needs a GPU (this test runs on the GPU " \
                  "machine)"

/// Allowed error of a kernel's output: relative (Frobenius norm) and largest absolute.
struct Tol {
  double rel, abs;
};

/// Fails unless `got` (any device) is finite everywhere and within tol of `want`.
inline void expect_close(const torch::Tensor& got, const torch::Tensor& want, Tol tol,
                         const std::string& what) {
  const auto g = got.to(torch::kCPU, torch::kDouble), w = want.to(torch::kCPU, torch::kDouble);
  ASSERT_EQ(g.sizes(), w.sizes()) << what;
  ASSERT_TRUE(torch::isfinite(g).all().item<bool>())
      << what << ": some output elements are NaN/Inf (unwritten poison or a bad softmax)";
  const double rel = ((g - w).norm() / w.norm().clamp_min(1e-30)).item<double>();
  const double mabs = (g - w).abs().max().item<double>();
  EXPECT_LE(rel, tol.rel) << what << " relative error";
  EXPECT_LE(mabs, tol.abs) << what << " max abs error";
}

/// Tolerances of the block-sparse kernel against the float32 CPU backend on the same (rounded)
/// inputs: bf16 / fp16 P and output rounding with fp32 accumulation. Measured in a CPU emulation
/// of the kernel (352 random cases, some with peaked scores, 2026-11-29): worst relative 2.3e-3
/// (bf16) and 3.1e-4 (fp16), worst absolute 1.5e-2 and 1.9e-3.
inline Tol block_sparse_tolerance(torch::ScalarType dt) {
  return dt == torch::kBFloat16 ? Tol{1e-2, 5e-2} : Tol{2e-3, 1e-2};
}

/// Random CSR lists over batch x heads x q_blocks rows: about 12% empty, 18% every key block,
/// the rest a random subset of density 5-70%.
struct RandomMask {
  BlockMask mask;
  std::vector<bool> empty;  ///< per row
};
inline RandomMask random_mask(std::mt19937_64& rng, int64_t batch, int64_t heads, int64_t n,
                              int64_t m, int64_t bs) {
  std::uniform_real_distribution<double> u(0, 1);
  const int64_t qbn = (n + bs - 1) / bs, kbn = (m + bs - 1) / bs;
  std::vector<std::vector<int64_t>> rows;
  RandomMask r;
  for (int64_t row = 0; row < batch * heads * qbn; ++row) {
    std::vector<int64_t> list;
    const double kind = u(rng);
    if (kind >= 0.12) {
      const double density = kind < 0.3 ? 1.0 : 0.05 + 0.65 * u(rng);
      for (int64_t kb = 0; kb < kbn; ++kb)
        if (density >= 1.0 || u(rng) < density) list.push_back(kb);
    }
    r.empty.push_back(list.empty());
    rows.push_back(std::move(list));
  }
  r.mask = BlockMask::from_rows(batch, heads, qbn, kbn, bs, rows);
  return r;
}

/// The block-sparse reference: the CPU backend on float32 CPU copies (kv heads expanded); a
/// query row that sees no listed key is zero from both.
inline torch::Tensor block_sparse_expected(const torch::Tensor& q, const torch::Tensor& k,
                                           const torch::Tensor& v, const BlockMask& mask,
                                           double scale, bool causal, int64_t q_offset,
                                           int64_t sinks, int64_t window) {
  const int64_t g = q.size(1) / k.size(1);
  const auto f = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kFloat); };
  return backend_for(torch::Device(torch::kCPU))
      .block_sparse(f(q), f(k).repeat_interleave(g, 1), f(v).repeat_interleave(g, 1), mask, scale,
                    causal, q_offset, sinks, window)
      .out;
}

}  // namespace attnpilot::attention::testing
