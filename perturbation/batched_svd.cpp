#include "perturbation/batched_svd.h"

#include "common/error.h"

#ifdef ATTNPILOT_WITH_CUDA
#include "perturbation/cuda/cusolver_svd.h"
#include "perturbation/cuda/jacobi_svd.h"
#endif

namespace attnpilot::perturbation {

#ifndef ATTNPILOT_WITH_CUDA
namespace cuda {
// Without a CUDA build the type is never constructed; BatchedSvd's unique_ptr needs it complete.
class CusolverSvd {};
}  // namespace cuda
#endif

std::string to_string(SvdBackend b) {
  switch (b) {
    case SvdBackend::kAuto:
      return "auto";
    case SvdBackend::kTorch:
      return "torch";
    case SvdBackend::kCusolverBatchedJacobi:
      return "cusolver-batched-jacobi";
    case SvdBackend::kCusolverApprox:
      return "cusolver-approx";
    case SvdBackend::kCusolverJacobi:
      return "cusolver-jacobi";
    case SvdBackend::kJacobiKernel:
      return "jacobi-kernel";
    case SvdBackend::kTallQrJacobi:
      return "tall-qr-jacobi";
  }
  return "unknown";
}

bool cusolver_available() {
#ifdef ATTNPILOT_WITH_CUDA
  return torch::cuda::is_available();
#else
  return false;
#endif
}

bool jacobi_kernels_available() { return cusolver_available(); }

SvdBackend choose_svd_backend(const torch::Tensor& a, const SvdOptions& opts) {
  if (opts.backend != SvdBackend::kAuto) return opts.backend;
  if (!a.is_cuda()) return SvdBackend::kTorch;
  const int64_t m = a.size(-2), n = a.size(-1);
#ifdef ATTNPILOT_WITH_CUDA
  if (cuda::jacobi_supported(m, n, a.scalar_type())) return SvdBackend::kJacobiKernel;
  if (cuda::tall_qr_supported(m, n, a.scalar_type())) return SvdBackend::kTallQrJacobi;
#endif
  if (m <= 32 && n <= 32) return SvdBackend::kCusolverBatchedJacobi;
  const int64_t lo = std::min(m, n), hi = std::max(m, n);
  if (opts.rank >= 1 && opts.rank <= lo && hi >= 2 * lo) return SvdBackend::kCusolverApprox;
  return SvdBackend::kCusolverJacobi;
}

BatchedSvd::BatchedSvd(SvdOptions opts) : opts_(opts) {
  ATTNPILOT_CHECK_ARG(opts.rank >= 0, "SvdOptions.rank = {}, expected >= 0 (0 = all)", opts.rank);
  ATTNPILOT_CHECK_ARG(opts.tol >= 0, "SvdOptions.tol = {}, expected >= 0", opts.tol);
  ATTNPILOT_CHECK_ARG(opts.max_sweeps >= 1, "SvdOptions.max_sweeps = {}, expected >= 1",
                      opts.max_sweeps);
}
BatchedSvd::~BatchedSvd() = default;
BatchedSvd::BatchedSvd(BatchedSvd&&) noexcept = default;
BatchedSvd& BatchedSvd::operator=(BatchedSvd&&) noexcept = default;

SvdResult BatchedSvd::operator()(const torch::Tensor& a) {
  ATTNPILOT_CHECK_ARG(a.defined() && a.dim() >= 2 && a.size(-1) >= 1 && a.size(-2) >= 1,
                      "batched SVD expects a [..., m, n] tensor with m, n >= 1, got {}",
                      a.defined() ? c10::str(a.sizes()) : std::string("undefined"));
  ATTNPILOT_CHECK_ARG(a.is_floating_point(), "batched SVD expects a floating dtype, got {}",
                      std::string(c10::toString(a.scalar_type())));
  const int64_t m = a.size(-2), n = a.size(-1), kmin = std::min(m, n);
  ATTNPILOT_CHECK_ARG(opts_.rank <= kmin, "SvdOptions.rank = {} exceeds min(m, n) = {}", opts_.rank,
                      kmin);
  const auto backend = choose_svd_backend(a, opts_);
  auto lead = a.sizes().slice(0, a.dim() - 2).vec();
  auto flat = a.reshape({-1, m, n});
  SvdResult out;
  if (backend == SvdBackend::kTorch) {
    auto [u, s, vh] = torch::linalg_svd(flat, /*full_matrices=*/false, c10::nullopt);
    const int64_t k = opts_.rank > 0 ? opts_.rank : kmin;
    out.u = u.narrow(-1, 0, k);
    out.s = s.narrow(-1, 0, k);
    out.v = vh.transpose(-1, -2).narrow(-1, 0, k);
    out.backend = backend;
  } else {
#ifdef ATTNPILOT_WITH_CUDA
    ATTNPILOT_CHECK_ARG(a.is_cuda(), "SVD backend {} needs a CUDA tensor, got one on {}",
                        to_string(backend), a.device().str());
    if (backend == SvdBackend::kJacobiKernel || backend == SvdBackend::kTallQrJacobi) {
      cuda::JacobiOptions jo;
      jo.rank = opts_.rank;
      jo.tol = opts_.tol;
      jo.max_sweeps = opts_.max_sweeps;
      out = backend == SvdBackend::kJacobiKernel ? cuda::jacobi_svd(flat, jo)
                                                 : cuda::tall_qr_jacobi_svd(flat, jo);
    } else {
      if (!cusolver_) cusolver_ = std::make_unique<cuda::CusolverSvd>(opts_);
      out = cusolver_->run(flat, backend, opts_.rank);
    }
#else
    throw Unavailable(
        fmt::format("SVD backend {} needs CUDA (cuSOLVER or our kernels), but this build has "
                    "ATTNPILOT_CUDA=OFF",
                    to_string(backend)));
#endif
  }
  const int64_t k = out.s.size(-1);
  auto with = [&](std::vector<int64_t> tail) {
    auto s = lead;
    s.insert(s.end(), tail.begin(), tail.end());
    return s;
  };
  out.u = out.u.reshape(with({m, k}));
  out.s = out.s.reshape(with({k}));
  out.v = out.v.reshape(with({n, k}));
  return out;
}

SvdResult batched_svd(const torch::Tensor& a, const SvdOptions& opts) {
  BatchedSvd svd(opts);
  return svd(a);
}

}  // namespace attnpilot::perturbation
