#pragma once
/// cuSOLVER backends of BatchedSvd (compiled only when ATTNPILOT_CUDA is ON). Inputs are
/// flattened batches [B, m, n] of float32/float64 on one CUDA device; results are
/// U [B, m, k], S [B, k] (descending), V [B, n, k].
#include <torch/torch.h>

#include <cstdint>
#include <memory>

#include "perturbation/batched_svd.h"

namespace attnpilot::perturbation::cuda {

/// Owns a cusolverDnHandle_t and a gesvdjInfo_t (RAII); runs on the current torch CUDA
/// stream of the input's device at each call.
class CusolverSvd {
 public:
  explicit CusolverSvd(const SvdOptions& opts);
  ~CusolverSvd();
  CusolverSvd(const CusolverSvd&) = delete;
  CusolverSvd& operator=(const CusolverSvd&) = delete;

  /// a [B, m, n] on CUDA; backend one of the kCusolver* values.
  SvdResult run(const torch::Tensor& a, SvdBackend backend, int64_t rank);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace attnpilot::perturbation::cuda
