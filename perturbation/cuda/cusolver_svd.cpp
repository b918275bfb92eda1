// cuSOLVER backends of BatchedSvd: gesvdjBatched (≤ 32×32), gesvdaStridedBatched (top-r of
// tall matrices), gesvdj per matrix (everything else). Layout: cuSOLVER is column-major, so
// each [m, n] matrix is copied to a [n, m] row-major tensor (= column-major m×n, lda = m), and
// U, V come back as [k, m] / [k, n] row-major (= column-major m×k, n×k) and are transposed.
#include "perturbation/cuda/cusolver_svd.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cusolverDn.h>

#include <string>
#include <vector>

#include "common/error.h"
#include "common/log.h"

namespace attnpilot::perturbation::cuda {
namespace {

const char* status_name(cusolverStatus_t s) {
  switch (s) {
    case CUSOLVER_STATUS_SUCCESS:
      return "CUSOLVER_STATUS_SUCCESS";
    case CUSOLVER_STATUS_NOT_INITIALIZED:
      return "CUSOLVER_STATUS_NOT_INITIALIZED";
    case CUSOLVER_STATUS_ALLOC_FAILED:
      return "CUSOLVER_STATUS_ALLOC_FAILED";
    case CUSOLVER_STATUS_INVALID_VALUE:
      return "CUSOLVER_STATUS_INVALID_VALUE";
    case CUSOLVER_STATUS_ARCH_MISMATCH:
      return "CUSOLVER_STATUS_ARCH_MISMATCH";
    case CUSOLVER_STATUS_EXECUTION_FAILED:
      return "CUSOLVER_STATUS_EXECUTION_FAILED";
    case CUSOLVER_STATUS_INTERNAL_ERROR:
      return "CUSOLVER_STATUS_INTERNAL_ERROR";
    case CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED:
      return "CUSOLVER_STATUS_MATRIX_TYPE_NOT_SUPPORTED";
    case CUSOLVER_STATUS_NOT_SUPPORTED:
      return "CUSOLVER_STATUS_NOT_SUPPORTED";
    default:
      return "unknown cusolverStatus_t";
  }
}

}  // namespace

/// Throws attnpilot::Error naming the cuSOLVER call and its status.
#define ATTNPILOT_CUSOLVER_CHECK(call)                                                            \
  do {                                                                                            \
    cusolverStatus_t _st = (call);                                                                \
    if (_st != CUSOLVER_STATUS_SUCCESS)                                                           \
      throw ::attnpilot::Error(                                                                   \
          fmt::format("{} failed with {} ({})", #call, status_name(_st), static_cast<int>(_st))); \
  } while (0)

namespace {

// Overloads so one template serves float and double.
cusolverStatus_t gesvdj_batched_buffer(cusolverDnHandle_t h, int m, int n, const float* a,
                                       const float* s, const float* u, const float* v, int* lw,
                                       gesvdjInfo_t p, int b) {
  return cusolverDnSgesvdjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, m, n, a, m, s, u, m, v, n,
                                             lw, p, b);
}
cusolverStatus_t gesvdj_batched_buffer(cusolverDnHandle_t h, int m, int n, const double* a,
                                       const double* s, const double* u, const double* v, int* lw,
                                       gesvdjInfo_t p, int b) {
  return cusolverDnDgesvdjBatched_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, m, n, a, m, s, u, m, v, n,
                                             lw, p, b);
}
cusolverStatus_t gesvdj_batched(cusolverDnHandle_t h, int m, int n, float* a, float* s, float* u,
                                float* v, float* w, int lw, int* info, gesvdjInfo_t p, int b) {
  return cusolverDnSgesvdjBatched(h, CUSOLVER_EIG_MODE_VECTOR, m, n, a, m, s, u, m, v, n, w, lw,
                                  info, p, b);
}
cusolverStatus_t gesvdj_batched(cusolverDnHandle_t h, int m, int n, double* a, double* s, double* u,
                                double* v, double* w, int lw, int* info, gesvdjInfo_t p, int b) {
  return cusolverDnDgesvdjBatched(h, CUSOLVER_EIG_MODE_VECTOR, m, n, a, m, s, u, m, v, n, w, lw,
                                  info, p, b);
}
cusolverStatus_t gesvdj_buffer(cusolverDnHandle_t h, int m, int n, const float* a, const float* s,
                               const float* u, const float* v, int* lw, gesvdjInfo_t p) {
  return cusolverDnSgesvdj_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, 1, m, n, a, m, s, u, m, v, n, lw,
                                      p);
}
cusolverStatus_t gesvdj_buffer(cusolverDnHandle_t h, int m, int n, const double* a, const double* s,
                               const double* u, const double* v, int* lw, gesvdjInfo_t p) {
  return cusolverDnDgesvdj_bufferSize(h, CUSOLVER_EIG_MODE_VECTOR, 1, m, n, a, m, s, u, m, v, n, lw,
                                      p);
}
cusolverStatus_t gesvdj_one(cusolverDnHandle_t h, int m, int n, float* a, float* s, float* u,
                            float* v, float* w, int lw, int* info, gesvdjInfo_t p) {
  return cusolverDnSgesvdj(h, CUSOLVER_EIG_MODE_VECTOR, 1, m, n, a, m, s, u, m, v, n, w, lw, info,
                           p);
}
cusolverStatus_t gesvdj_one(cusolverDnHandle_t h, int m, int n, double* a, double* s, double* u,
                            double* v, double* w, int lw, int* info, gesvdjInfo_t p) {
  return cusolverDnDgesvdj(h, CUSOLVER_EIG_MODE_VECTOR, 1, m, n, a, m, s, u, m, v, n, w, lw, info,
                           p);
}
cusolverStatus_t gesvda_buffer(cusolverDnHandle_t h, int r, int m, int n, const float* a,
                               const float* s, const float* u, const float* v, int* lw, int b) {
  return cusolverDnSgesvdaStridedBatched_bufferSize(
      h, CUSOLVER_EIG_MODE_VECTOR, r, m, n, a, m, static_cast<long long>(m) * n, s, r, u, m,
      static_cast<long long>(m) * r, v, n, static_cast<long long>(n) * r, lw, b);
}
cusolverStatus_t gesvda_buffer(cusolverDnHandle_t h, int r, int m, int n, const double* a,
                               const double* s, const double* u, const double* v, int* lw, int b) {
  return cusolverDnDgesvdaStridedBatched_bufferSize(
      h, CUSOLVER_EIG_MODE_VECTOR, r, m, n, a, m, static_cast<long long>(m) * n, s, r, u, m,
      static_cast<long long>(m) * r, v, n, static_cast<long long>(n) * r, lw, b);
}
cusolverStatus_t gesvda(cusolverDnHandle_t h, int r, int m, int n, const float* a, float* s,
                        float* u, float* v, float* w, int lw, int* info, double* res, int b) {
  return cusolverDnSgesvdaStridedBatched(
      h, CUSOLVER_EIG_MODE_VECTOR, r, m, n, a, m, static_cast<long long>(m) * n, s, r, u, m,
      static_cast<long long>(m) * r, v, n, static_cast<long long>(n) * r, w, lw, info, res, b);
}
cusolverStatus_t gesvda(cusolverDnHandle_t h, int r, int m, int n, const double* a, double* s,
                        double* u, double* v, double* w, int lw, int* info, double* res, int b) {
  return cusolverDnDgesvdaStridedBatched(
      h, CUSOLVER_EIG_MODE_VECTOR, r, m, n, a, m, static_cast<long long>(m) * n, s, r, u, m,
      static_cast<long long>(m) * r, v, n, static_cast<long long>(n) * r, w, lw, info, res, b);
}

int to_int(int64_t v, const char* what) {
  ATTNPILOT_CHECK_ARG(v >= 0 && v <= std::numeric_limits<int>::max(),
                      "{} = {} does not fit cuSOLVER's 32-bit int", what, v);
  return static_cast<int>(v);
}

}  // namespace

struct CusolverSvd::Impl {
  SvdOptions opts;
  int device = -1;
  cusolverDnHandle_t handle = nullptr;
  gesvdjInfo_t params = nullptr;

  ~Impl() { release(); }

  void release() {
    // Destruction statuses are not thrown from a destructor; failures are logged.
    if (params != nullptr && cusolverDnDestroyGesvdjInfo(params) != CUSOLVER_STATUS_SUCCESS)
      log::warn("cusolverDnDestroyGesvdjInfo failed");
    if (handle != nullptr && cusolverDnDestroy(handle) != CUSOLVER_STATUS_SUCCESS)
      log::warn("cusolverDnDestroy failed");
    params = nullptr;
    handle = nullptr;
    device = -1;
  }

  void ensure(int dev) {
    if (handle != nullptr && device == dev) return;
    release();
    ATTNPILOT_CUSOLVER_CHECK(cusolverDnCreate(&handle));
    ATTNPILOT_CUSOLVER_CHECK(cusolverDnCreateGesvdjInfo(&params));
    if (opts.tol > 0) ATTNPILOT_CUSOLVER_CHECK(cusolverDnXgesvdjSetTolerance(params, opts.tol));
    ATTNPILOT_CUSOLVER_CHECK(cusolverDnXgesvdjSetMaxSweeps(params, opts.max_sweeps));
    ATTNPILOT_CUSOLVER_CHECK(cusolverDnXgesvdjSetSortEig(params, 1));
    device = dev;
  }

  template <typename T>
  SvdResult run_typed(const torch::Tensor& a, SvdBackend backend, int64_t rank) {
    const int b = to_int(a.size(0), "batch"), m = to_int(a.size(1), "m"),
              n = to_int(a.size(2), "n");
    const int kmin = std::min(m, n);
    auto opt = a.options();
    auto iopt = opt.dtype(torch::kInt32);
    SvdResult out;
    out.backend = backend;
    torch::Tensor info, u, s, v;  // u, v as [B, m, k], [B, n, k]
    if (backend == SvdBackend::kCusolverBatchedJacobi) {
      ATTNPILOT_CHECK_ARG(m <= 32 && n <= 32,
                          "gesvdjBatched handles matrices up to 32x32, got {}x{}", m, n);
      auto acm = a.transpose(1, 2).contiguous();  // column-major m×n, lda = m
      auto scm = torch::empty({b, kmin}, opt);
      auto ucm = torch::empty({b, m, m}, opt);  // column-major m×m
      auto vcm = torch::empty({b, n, n}, opt);  // column-major n×n
      info = torch::zeros({b}, iopt);
      int lwork = 0;
      ATTNPILOT_CUSOLVER_CHECK(gesvdj_batched_buffer(handle, m, n, acm.data_ptr<T>(),
                                                     scm.data_ptr<T>(), ucm.data_ptr<T>(),
                                                     vcm.data_ptr<T>(), &lwork, params, b));
      auto work = torch::empty({std::max(lwork, 1)}, opt);
      ATTNPILOT_CUSOLVER_CHECK(gesvdj_batched(
          handle, m, n, acm.data_ptr<T>(), scm.data_ptr<T>(), ucm.data_ptr<T>(), vcm.data_ptr<T>(),
          work.data_ptr<T>(), lwork, info.data_ptr<int>(), params, b));
      s = scm;
      u = ucm.transpose(1, 2).narrow(2, 0, kmin);
      v = vcm.transpose(1, 2).narrow(2, 0, kmin);
    } else if (backend == SvdBackend::kCusolverJacobi) {
      auto acm = a.transpose(1, 2).contiguous();
      auto scm = torch::empty({b, kmin}, opt);
      auto ucm = torch::empty({b, kmin, m}, opt);  // column-major m×k, ldu = m
      auto vcm = torch::empty({b, kmin, n}, opt);  // column-major n×k, ldv = n
      info = torch::zeros({b}, iopt);
      int lwork = 0;
      ATTNPILOT_CUSOLVER_CHECK(gesvdj_buffer(handle, m, n, acm.data_ptr<T>(), scm.data_ptr<T>(),
                                             ucm.data_ptr<T>(), vcm.data_ptr<T>(), &lwork, params));
      auto work = torch::empty({std::max(lwork, 1)}, opt);
      for (int i = 0; i < b; ++i) {
        ATTNPILOT_CUSOLVER_CHECK(gesvdj_one(
            handle, m, n, acm[i].data_ptr<T>(), scm[i].data_ptr<T>(), ucm[i].data_ptr<T>(),
            vcm[i].data_ptr<T>(), work.data_ptr<T>(), lwork, info.data_ptr<int>() + i, params));
      }
      s = scm;
      u = ucm.transpose(1, 2);
      v = vcm.transpose(1, 2);
    } else if (backend == SvdBackend::kCusolverApprox) {
      // gesvda needs rows >= cols: for a wide matrix take the SVD of Aᵀ and swap U and V.
      const bool wide = m < n;
      auto at = wide ? a.transpose(1, 2) : a;
      const int mm = wide ? n : m, nn = wide ? m : n;
      const int r = to_int(rank > 0 ? rank : nn, "rank");
      ATTNPILOT_CHECK_ARG(r >= 1 && r <= nn, "gesvda rank = {}, expected 1 <= rank <= {}", r, nn);
      auto acm = at.transpose(1, 2).contiguous();  // column-major mm×nn
      auto scm = torch::empty({b, r}, opt);
      auto ucm = torch::empty({b, r, mm}, opt);
      auto vcm = torch::empty({b, r, nn}, opt);
      info = torch::zeros({b}, iopt);
      int lwork = 0;
      ATTNPILOT_CUSOLVER_CHECK(gesvda_buffer(handle, r, mm, nn, acm.data_ptr<T>(),
                                             scm.data_ptr<T>(), ucm.data_ptr<T>(),
                                             vcm.data_ptr<T>(), &lwork, b));
      auto work = torch::empty({std::max(lwork, 1)}, opt);
      ATTNPILOT_CUSOLVER_CHECK(gesvda(handle, r, mm, nn, acm.data_ptr<T>(), scm.data_ptr<T>(),
                                      ucm.data_ptr<T>(), vcm.data_ptr<T>(), work.data_ptr<T>(),
                                      lwork, info.data_ptr<int>(),
                                      /*h_R_nrmF=*/nullptr, b));  // null: no residual norm,
      // which cuSOLVER computes at great cost (and with a host sync) when asked; PyTorch passes
      // null too. Measured 2026-11-29 on the H200: with the residual, 1024 × 128×128 took 77 ms.
      s = scm;
      auto uu = ucm.transpose(1, 2), vv = vcm.transpose(1, 2);
      u = wide ? vv : uu;
      v = wide ? uu : vv;
    } else {
      throw InvalidArgument(fmt::format("CusolverSvd cannot run backend {}", to_string(backend)));
    }
    auto info_h = info.cpu();
    const int* ip = info_h.data_ptr<int>();
    for (int i = 0; i < b; ++i) {
      if (ip[i] < 0)
        throw Error(fmt::format("cuSOLVER {} rejected parameter {} (info = {}) for matrix {}",
                                to_string(backend), -ip[i], ip[i], i));
      if (ip[i] > 0) ++out.not_converged;
    }
    if (out.not_converged > 0)
      log::warn(fmt::format("cuSOLVER {}: {} of {} matrices did not converge in {} sweeps",
                            to_string(backend), out.not_converged, b, opts.max_sweeps));
    // Sort descending (gesvdj sorts; gesvda's order is not documented) and keep top-k.
    auto [ss, idx] = s.sort(-1, /*descending=*/true);
    u = u.gather(2, idx.unsqueeze(1).expand({b, u.size(1), idx.size(1)}));
    v = v.gather(2, idx.unsqueeze(1).expand({b, v.size(1), idx.size(1)}));
    const int64_t k = rank > 0 ? std::min<int64_t>(rank, ss.size(1)) : ss.size(1);
    out.s = ss.narrow(1, 0, k);
    out.u = u.narrow(2, 0, k);
    out.v = v.narrow(2, 0, k);
    return out;
  }
};

CusolverSvd::CusolverSvd(const SvdOptions& opts) : impl_(std::make_unique<Impl>()) {
  impl_->opts = opts;
}

CusolverSvd::~CusolverSvd() = default;

SvdResult CusolverSvd::run(const torch::Tensor& a, SvdBackend backend, int64_t rank) {
  ATTNPILOT_CHECK_ARG(a.is_cuda(), "cuSOLVER SVD needs a CUDA tensor, got one on {}",
                      a.device().str());
  ATTNPILOT_CHECK_ARG(a.dim() == 3, "cuSOLVER SVD expects [B, m, n], got {}", c10::str(a.sizes()));
  c10::cuda::CUDAGuard guard(a.device());
  impl_->ensure(a.device().index());
  ATTNPILOT_CUSOLVER_CHECK(
      cusolverDnSetStream(impl_->handle, at::cuda::getCurrentCUDAStream(a.device().index())));
  if (a.scalar_type() == torch::kFloat32) return impl_->run_typed<float>(a, backend, rank);
  if (a.scalar_type() == torch::kFloat64) return impl_->run_typed<double>(a, backend, rank);
  throw InvalidArgument(fmt::format("cuSOLVER SVD supports float32 and float64, got {}",
                                    std::string(c10::toString(a.scalar_type()))));
}

}  // namespace attnpilot::perturbation::cuda
