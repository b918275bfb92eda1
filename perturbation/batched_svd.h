#pragma once
/// One interface for the SVD of batches of matrices [..., m, n], backend chosen by device,
/// dtype and shape:
///
///   CPU tensor ──────────────────────────────────────────► torch::linalg_svd   (kTorch)
///   CUDA, max(m, n) <= 128 (float64: <= 64, or min <= 32) ─► our one-sided Jacobi kernel
///                                                             (kJacobiKernel)
///   CUDA, max(m, n) > 128, min(m, n) <= 128 (float64: 64) ─► Cholesky-QR2 + Jacobi on R
///                                                             (kTallQrJacobi)
///   CUDA, otherwise: as before our kernels existed
///     m <= 32 and n <= 32 ────────────────────────────────► cusolverDn?gesvdjBatched
///                                                             (kCusolverBatchedJacobi)
///     top-r of a tall matrix (max >= 2 min, 1 <= r) ───────► gesvdaStridedBatched
///                                                             (kCusolverApprox)
///     everything else ───────────────────────────────────► gesvdj per matrix
///                                                             (kCusolverJacobi)
///
/// gesvda works through AᵀA, so singular values far below σ₁ lose relative accuracy
/// (σ_i with σ_i/σ₁ < ~1e-3 in fp32); it is never chosen while our kernels apply. The
/// cuSOLVER backends stay selectable for comparison (SvdOptions.backend).
/// Results: A ≈ U diag(S) Vᵀ with S descending, U [..., m, k], V [..., n, k], k = rank if
/// given, else min(m, n); dtype of the input (float32 or float64 on CUDA, any float on CPU).
/// The CUDA backends run on the caller's current CUDA stream of the tensor's device; statuses
/// are checked and failures throw attnpilot::Error naming the call; our kernels throw
/// InvalidArgument for NaN/Inf input. Without a CUDA build the CUDA backends throw
/// attnpilot::Unavailable.
#include <torch/torch.h>

#include <cstdint>
#include <memory>
#include <string>

namespace attnpilot::perturbation {

enum class SvdBackend {
  kAuto,
  kTorch,
  kCusolverBatchedJacobi,
  kCusolverApprox,
  kCusolverJacobi,
  kJacobiKernel,  ///< ours: one-sided Jacobi, one block per matrix (perturbation/cuda)
  kTallQrJacobi,  ///< ours: Cholesky-QR2 then the Jacobi kernel on R
};

/// "auto", "torch", "cusolver-batched-jacobi", "cusolver-approx", "cusolver-jacobi",
/// "jacobi-kernel", "tall-qr-jacobi".
std::string to_string(SvdBackend b);

struct SvdOptions {
  SvdBackend backend = SvdBackend::kAuto;  ///< override the automatic choice
  int64_t rank = 0;                        ///< top-r triplets; 0 = all min(m, n)
  double tol = 0;                          ///< Jacobi convergence tolerance; 0 = machine precision
  int max_sweeps = 100;                    ///< Jacobi sweep limit (gesvdj*, our kernels)
};

struct SvdResult {
  torch::Tensor u;                          ///< [..., m, k]
  torch::Tensor s;                          ///< [..., k], descending
  torch::Tensor v;                          ///< [..., n, k]
  SvdBackend backend = SvdBackend::kTorch;  ///< the backend that ran
  int64_t not_converged = 0;  ///< matrices where Jacobi hit max_sweeps (cuSOLVER info > 0)
};

/// Backend the automatic rule picks for this tensor and options (see the file comment).
SvdBackend choose_svd_backend(const torch::Tensor& a, const SvdOptions& opts);

/// True when this build has the cuSOLVER backends and a CUDA device is present.
bool cusolver_available();

/// True when this build has our CUDA kernels (kJacobiKernel, kTallQrJacobi) and a CUDA device
/// is present.
bool jacobi_kernels_available();

namespace cuda {
class CusolverSvd;
}

/// Batched SVD. Holds the cuSOLVER handle and Jacobi parameters (created on first CUDA use,
/// released by the destructor); one object per thread, not shared across threads.
class BatchedSvd {
 public:
  explicit BatchedSvd(SvdOptions opts = {});
  ~BatchedSvd();
  BatchedSvd(BatchedSvd&&) noexcept;
  BatchedSvd& operator=(BatchedSvd&&) noexcept;
  BatchedSvd(const BatchedSvd&) = delete;
  BatchedSvd& operator=(const BatchedSvd&) = delete;

  /// a [..., m, n] with m, n >= 1; leading dims arbitrary (flattened internally).
  SvdResult operator()(const torch::Tensor& a);
  const SvdOptions& options() const { return opts_; }

 private:
  SvdOptions opts_;
  std::unique_ptr<cuda::CusolverSvd> cusolver_;
};

/// One-shot convenience: BatchedSvd(opts)(a).
SvdResult batched_svd(const torch::Tensor& a, const SvdOptions& opts = {});

}  // namespace attnpilot::perturbation
