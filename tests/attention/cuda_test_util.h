#pragma once
/// Shared helpers of the CUDA attention tests: the device, the skip without a GPU, and the
/// closeness check of a kernel's output against its CPU twin.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

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

}  // namespace attnpilot::attention::testing
