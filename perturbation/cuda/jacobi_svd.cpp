// Tensor-level host code of our CUDA SVD kernels: argument checks, launches on the current
// stream, status read-back, the Cholesky-QR2 tall path and the top-r subspace iteration.
#include "perturbation/cuda/jacobi_svd.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/error.h"
#include "common/log.h"
#include "perturbation/cuda/jacobi_kernels.h"
#include "perturbation/tracker.h"

namespace attnpilot::perturbation::cuda {
namespace {

/// Throws attnpilot::Error naming the CUDA call and its error.
#define ATTNPILOT_CUDA_CHECK(call)                                                                 \
  do {                                                                                             \
    cudaError_t _e = (call);                                                                       \
    if (_e != cudaSuccess)                                                                         \
      throw ::attnpilot::Error(                                                                    \
          fmt::format("{} failed: {} ({})", #call, cudaGetErrorName(_e), cudaGetErrorString(_e))); \
  } while (0)

std::string dtype_name(const torch::Tensor& t) {
  return std::string(c10::toString(t.scalar_type()));
}

void check_input(const torch::Tensor& a, const char* what) {
  ATTNPILOT_CHECK_ARG(a.defined() && a.dim() == 3 && a.size(1) >= 1 && a.size(2) >= 1,
                      "{} expects a [B, m, n] tensor with m, n >= 1, got {}", what,
                      a.defined() ? c10::str(a.sizes()) : std::string("undefined"));
  ATTNPILOT_CHECK_ARG(a.is_cuda(), "{} needs a CUDA tensor, got one on {}", what, a.device().str());
  ATTNPILOT_CHECK_ARG(a.scalar_type() == torch::kFloat32 || a.scalar_type() == torch::kFloat64,
                      "{} supports float32 and float64, got {}", what, dtype_name(a));
}

void check_output(const torch::Tensor& out, const torch::Tensor& a, std::vector<int64_t> shape,
                  const char* name) {
  ATTNPILOT_CHECK_ARG(out.defined() && out.sizes() == c10::IntArrayRef(shape),
                      "output {} must have shape {}, got {}", name,
                      c10::str(c10::IntArrayRef(shape)),
                      out.defined() ? c10::str(out.sizes()) : std::string("undefined"));
  ATTNPILOT_CHECK_ARG(
      out.scalar_type() == a.scalar_type() && out.device() == a.device() && out.is_contiguous(),
      "output {} must be a contiguous {} tensor on {}, got {} on {}", name, dtype_name(a),
      a.device().str(), dtype_name(out), out.device().str());
}

/// The Jacobi kernels' default relative orthogonality tolerance for m rows: sqrt(m)·ε (LAPACK
/// sgesvj's choice).
double default_jacobi_tol(int64_t m, bool is_double) {
  const double eps = is_double ? std::numeric_limits<double>::epsilon()
                               : static_cast<double>(std::numeric_limits<float>::epsilon());
  return std::sqrt(static_cast<double>(m)) * eps;
}

int64_t output_rank(const JacobiOptions& o, int64_t kmin) {
  ATTNPILOT_CHECK_ARG(o.rank >= 0 && o.rank <= kmin,
                      "SVD rank = {}, expected 0 (all) or 1..{} (= min(m, n))", o.rank, kmin);
  ATTNPILOT_CHECK_ARG(o.tol >= 0 && o.tol < 1, "Jacobi tol = {}, expected in [0, 1)", o.tol);
  ATTNPILOT_CHECK_ARG(o.max_sweeps >= 1, "Jacobi max_sweeps = {}, expected >= 1", o.max_sweeps);
  ATTNPILOT_CHECK_ARG(o.lanes == 0 || o.lanes == 4 || o.lanes == 8,
                      "Jacobi lanes = {}, expected 0 (by shape), 4 or 8", o.lanes);
  return o.rank > 0 ? o.rank : kmin;
}

// Throws InvalidArgument naming the first matrix of `a` [B, m, n] that holds NaN or Inf.
void check_finite(const torch::Tensor& a, const char* what) {
  auto finite = torch::isfinite(a).flatten(1).all(1);
  if (finite.all().item<bool>()) return;
  const int64_t first = (~finite).nonzero().flatten()[0].item<int64_t>();
  throw InvalidArgument(fmt::format(
      "{}: matrix {} of the batch ({} matrices) holds NaN or Inf; the SVD needs finite input", what,
      first, a.size(0)));
}

}  // namespace

void complete_zero_columns(torch::Tensor ub, uint64_t seed) {
  ATTNPILOT_CHECK_ARG(ub.defined() && ub.dim() == 2 && ub.size(0) >= ub.size(1),
                      "complete_zero_columns expects [m, k] with m >= k, got {}",
                      ub.defined() ? c10::str(ub.sizes()) : std::string("undefined"));
  const int64_t m = ub.size(0), k = ub.size(1);
  auto norms = torch::linalg_vector_norm(ub.to(torch::kFloat64), 2, {0}, false, c10::nullopt).cpu();
  const double* np = norms.data_ptr<double>();
  int64_t g = 0;
  while (g < k && np[g] > 0.5) ++g;
  if (g == k) return;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto fill =
      torch::randn({m, k - g}, gen, torch::TensorOptions().dtype(torch::kFloat64)).to(ub.device());
  auto q =
      std::get<0>(torch::linalg_qr(torch::cat({ub.narrow(1, 0, g).to(torch::kFloat64), fill}, 1)));
  ub.narrow(1, g, k - g).copy_(q.narrow(1, g, k - g));
}

bool jacobi_supported(int64_t m, int64_t n, torch::ScalarType dtype) {
  if (dtype != torch::kFloat32 && dtype != torch::kFloat64) return false;
  const int64_t hi = std::max(m, n), lo = std::min(m, n);
  if (lo < 1 || hi > 128) return false;
  return jacobi_kernel_supports(static_cast<int>(hi), static_cast<int>(lo),
                                dtype == torch::kFloat64);
}

bool tall_qr_supported(int64_t m, int64_t n, torch::ScalarType dtype) {
  const int64_t hi = std::max(m, n), lo = std::min(m, n);
  return hi > 128 && hi <= std::numeric_limits<int>::max() && jacobi_supported(lo, lo, dtype);
}

int64_t jacobi_svd_out(const torch::Tensor& a, const JacobiOptions& opts, torch::Tensor& u,
                       torch::Tensor& s, torch::Tensor& v) {
  check_input(a, "Jacobi SVD kernel");
  const int64_t bsz = a.size(0), m_in = a.size(1), n_in = a.size(2);
  ATTNPILOT_CHECK_ARG(jacobi_supported(m_in, n_in, a.scalar_type()),
                      "Jacobi SVD kernel handles max(m, n) <= 128 in float32 (float64: <= 64, "
                      "or <= 128 with min(m, n) <= 32), got {}x{} {}",
                      m_in, n_in, dtype_name(a));
  ATTNPILOT_CHECK_ARG(bsz <= std::numeric_limits<int>::max(),
                      "Jacobi SVD kernel: batch {} exceeds the grid limit {}", bsz,
                      std::numeric_limits<int>::max());
  const bool tr = m_in < n_in;
  const int64_t m = std::max(m_in, n_in), n = std::min(m_in, n_in);
  const int64_t k = output_rank(opts, n);
  check_output(u, a, {bsz, m_in, k}, "U");
  check_output(s, a, {bsz, k}, "S");
  check_output(v, a, {bsz, n_in, k}, "V");
  if (bsz == 0) return 0;
  c10::cuda::CUDAGuard guard(a.device());
  const bool dbl = a.scalar_type() == torch::kFloat64;
  auto ac = a.contiguous();
  auto status = torch::empty({bsz}, a.options().dtype(torch::kInt32));
  const int lanes = jacobi_lanes(static_cast<int>(m), dbl, opts.lanes);
  const int64_t bytes = jacobi_shared_bytes(static_cast<int>(m), static_cast<int>(n), dbl, lanes);
  int optin = 0;
  ATTNPILOT_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, a.get_device()));
  if (bytes > optin)
    throw Unavailable(fmt::format(
        "Jacobi SVD kernel needs {} bytes of shared memory per block for {}x{} {}, the device "
        "allows {}",
        bytes, m, n, dtype_name(a), optin));
  JacobiLaunch p;
  p.a = ac.data_ptr();
  p.batch = bsz;
  p.rows_in = static_cast<int>(m_in);
  p.cols_in = static_cast<int>(n_in);
  p.transpose = tr;
  p.k = static_cast<int>(k);
  // X = Aᵀ when A is wide: then U_A = V_X and V_A = U_X.
  p.ux = tr ? v.data_ptr() : u.data_ptr();
  p.vx = tr ? u.data_ptr() : v.data_ptr();
  p.s = s.data_ptr();
  p.status = status.data_ptr<int>();
  p.tol = opts.tol > 0 ? opts.tol : default_jacobi_tol(m, dbl);
  p.max_sweeps = opts.max_sweeps;
  p.lanes = lanes;
  const char* failed = "launch_jacobi_svd";
  const cudaError_t err =
      launch_jacobi_svd(p, dbl, at::cuda::getCurrentCUDAStream(a.get_device()).stream(), &failed);
  if (err != cudaSuccess)
    throw Error(
        fmt::format("{} failed: {} ({})", failed, cudaGetErrorName(err), cudaGetErrorString(err)));
  auto st = status.cpu();  // synchronises with the stream
  const int* sp = st.data_ptr<int>();
  int64_t not_converged = 0;
  std::vector<int64_t> zero_cols;
  for (int64_t i = 0; i < bsz; ++i) {
    if (sp[i] == kJacobiNonFinite)
      throw InvalidArgument(fmt::format(
          "SVD input matrix {} of the batch ({} matrices, {}x{}) holds NaN or Inf; the SVD "
          "needs finite input",
          i, bsz, m_in, n_in));
    ATTNPILOT_CHECK_ARG(sp[i] >= 0 && sp[i] <= (kJacobiNotConverged | kJacobiZeroColumns),
                        "Jacobi SVD kernel wrote status {} for matrix {}, expected 0..3", sp[i], i);
    if (sp[i] & kJacobiNotConverged) ++not_converged;
    if (sp[i] & kJacobiZeroColumns) zero_cols.push_back(i);
  }
  auto& ux = tr ? v : u;
  for (int64_t i : zero_cols) complete_zero_columns(ux[i], 0x5eed0000ull + i);
  if (not_converged > 0)
    log::warn(
        fmt::format("Jacobi SVD kernel: {} of {} matrices ({}x{}) still rotating after {} "
                    "sweeps",
                    not_converged, bsz, m_in, n_in, opts.max_sweeps));
  return not_converged;
}

/// Allocates U, S, V for `a` [B, m, n] and fills them with `run` (one of the *_out calls).
template <class Run>
SvdResult allocate_and_run(const torch::Tensor& a, const JacobiOptions& opts, const char* what,
                           SvdBackend backend, Run run) {
  check_input(a, what);
  const int64_t bsz = a.size(0), m = a.size(1), n = a.size(2);
  const int64_t k = output_rank(opts, std::min(m, n));
  SvdResult r;
  r.u = torch::empty({bsz, m, k}, a.options());
  r.s = torch::empty({bsz, k}, a.options());
  r.v = torch::empty({bsz, n, k}, a.options());
  r.not_converged = run(a, opts, r.u, r.s, r.v);
  r.backend = backend;
  return r;
}

SvdResult jacobi_svd(const torch::Tensor& a, const JacobiOptions& opts) {
  return allocate_and_run(a, opts, "Jacobi SVD kernel", SvdBackend::kJacobiKernel, jacobi_svd_out);
}

TallQr tall_cholesky_qr2(const torch::Tensor& x) {
  ATTNPILOT_CHECK_ARG(x.defined() && x.dim() == 3 && x.scalar_type() == torch::kFloat64 &&
                          x.size(1) >= x.size(2) && x.size(2) >= 1,
                      "tall_cholesky_qr2 expects a float64 [B, m, n] tensor with m >= n >= 1, "
                      "got {} {}",
                      x.defined() ? c10::str(x.sizes()) : std::string("undefined"),
                      x.defined() ? dtype_name(x) : std::string("-"));
  const int64_t bsz = x.size(0), n = x.size(2);
  // Cholesky-QR2 in float64: X = Q₁R₁, Q₁ = Q R₂, so X = Q R with R = R₂R₁ and Q = Q₁R₂⁻¹.
  // Float64 Gram matrices square cond(X) but stay accurate for cond(X) up to about 1e7, far
  // beyond float32 data; the second pass restores orthogonality to float64 rounding. Where it
  // cannot (Cholesky fails, or Q₁ is far from orthonormal: ‖Q₁ᵀQ₁ − I‖_max > 0.1), Householder
  // QR of that matrix is used instead (Q₁ = Q_H, R = R_H, R₂⁻¹ = I).
  auto o64 = x.options();
  auto eye = torch::eye(n, o64).expand({bsz, n, n}).contiguous();
  auto g1 = torch::bmm(x.transpose(1, 2), x);
  auto [l1, info1] = torch::linalg_cholesky_ex(g1, /*upper=*/false, /*check_errors=*/false);
  auto r1 = l1.transpose(1, 2);
  auto r1inv = torch::linalg_solve_triangular(r1, eye, /*upper=*/true, /*left=*/true,
                                              /*unitriangular=*/false);
  TallQr out;
  out.q1 = torch::bmm(x, r1inv).contiguous();
  auto g2 = torch::bmm(out.q1.transpose(1, 2), out.q1);
  auto [l2, info2] = torch::linalg_cholesky_ex(g2, /*upper=*/false, /*check_errors=*/false);
  auto r2 = l2.transpose(1, 2);
  out.r = torch::bmm(r2, r1).contiguous();
  out.r2inv = torch::linalg_solve_triangular(r2, eye, /*upper=*/true, /*left=*/true,
                                             /*unitriangular=*/false)
                  .contiguous();
  auto g2_finite = torch::isfinite(g2).flatten(1).all(1);
  auto g2_far = (g2 - eye).abs().flatten(1).amax(1) > 0.1;
  auto bad = (info1 != 0) | (info2 != 0) | ~g2_finite | g2_far |
             ~torch::isfinite(out.r).flatten(1).all(1) |
             ~torch::isfinite(out.r2inv).flatten(1).all(1);
  auto bad_idx = bad.nonzero().flatten();
  out.householder = bad_idx.numel();
  if (out.householder > 0) {
    auto [qh, rh] = torch::linalg_qr(x.index_select(0, bad_idx), "reduced");
    out.q1.index_copy_(0, bad_idx, qh.contiguous());
    out.r.index_copy_(0, bad_idx, rh.contiguous());
    out.r2inv.index_copy_(0, bad_idx, eye.index_select(0, bad_idx));
  }
  return out;
}

int64_t tall_qr_jacobi_svd_out(const torch::Tensor& a, const JacobiOptions& opts, torch::Tensor& u,
                               torch::Tensor& s, torch::Tensor& v) {
  check_input(a, "tall QR + Jacobi SVD");
  const int64_t bsz = a.size(0), m_in = a.size(1), n_in = a.size(2);
  ATTNPILOT_CHECK_ARG(tall_qr_supported(m_in, n_in, a.scalar_type()),
                      "tall QR + Jacobi SVD handles max(m, n) > 128 with min(m, n) <= 128 "
                      "(float64: <= 64), got {}x{} {}",
                      m_in, n_in, dtype_name(a));
  const bool tr = m_in < n_in;
  const int64_t n = std::min(m_in, n_in);
  const int64_t k = output_rank(opts, n);
  check_output(u, a, {bsz, m_in, k}, "U");
  check_output(s, a, {bsz, k}, "S");
  check_output(v, a, {bsz, n_in, k}, "V");
  if (bsz == 0) return 0;
  c10::cuda::CUDAGuard guard(a.device());
  check_finite(a, "tall QR + Jacobi SVD");
  // X = A (or Aᵀ) is m×n, m > 128 >= n; X = Q R with Q = Q₁·R₂⁻¹ (tall_cholesky_qr2).
  auto x = (tr ? a.transpose(1, 2) : a).to(torch::kFloat64);
  auto qr = tall_cholesky_qr2(x);
  auto& q1 = qr.q1;
  auto& r = qr.r;
  auto& r2inv = qr.r2inv;
  // SVD of the n×n factor R = U_R Σ V_Rᵀ in the input precision; X = (Q U_R) Σ V_Rᵀ.
  auto rt = r.to(a.scalar_type()).contiguous();
  JacobiOptions ro = opts;
  auto ur = torch::empty({bsz, n, k}, a.options());
  auto vr = torch::empty({bsz, n, k}, a.options());
  const int64_t not_converged = jacobi_svd_out(rt, ro, ur, s, vr);
  auto ux = torch::bmm(q1, torch::bmm(r2inv, ur.to(torch::kFloat64)));  // [B, m, k]
  // A = X (U_A = U_X, V_A = V_R) or A = Xᵀ (U_A = V_R, V_A = U_X).
  (tr ? v : u).copy_(ux);
  (tr ? u : v).copy_(vr);
  return not_converged;
}

SvdResult tall_qr_jacobi_svd(const torch::Tensor& a, const JacobiOptions& opts) {
  return allocate_and_run(a, opts, "tall QR + Jacobi SVD", SvdBackend::kTallQrJacobi,
                          tall_qr_jacobi_svd_out);
}

bool subspace_step_supported(const torch::Tensor& c, const torch::Tensor& v) {
  return c.defined() && v.defined() && c.is_cuda() && v.is_cuda() && c.dim() == 3 && v.dim() == 3 &&
         c.size(1) == c.size(2) && v.size(1) == c.size(1) && v.size(0) == c.size(0) &&
         v.size(2) >= 1 && v.size(2) <= c.size(1) && c.scalar_type() == v.scalar_type() &&
         jacobi_supported(c.size(1), v.size(2), c.scalar_type());
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> subspace_iteration_step_cuda(
    const torch::Tensor& c, const torch::Tensor& v) {
  ATTNPILOT_CHECK_ARG(subspace_step_supported(c, v),
                      "CUDA subspace iteration expects c [B, d, d] and v [B, d, p] on CUDA, "
                      "same float dtype, p <= d <= 128 (float64: d <= 64 or p <= 32), got {} "
                      "and {}",
                      c.defined() ? c10::str(c.sizes()) : std::string("undefined"),
                      v.defined() ? c10::str(v.sizes()) : std::string("undefined"));
  JacobiOptions o;
  // Orthonormal basis of range(C V): the left singular vectors of the d×p block.
  auto uy = jacobi_svd(torch::bmm(c, v), o).u;
  // Cᵀ U = P Σ Qᵀ, so Uᵀ C = Q Σ Pᵀ: the Ritz triplets are (U Q, Σ, P), the same as the
  // Rayleigh–Ritz step of subspace_iteration_step with V' = basis(Cᵀ U).
  auto z = jacobi_svd(torch::bmm(c.transpose(1, 2), uy), o);
  return {torch::bmm(uy, z.v), z.s, z.u};
}

namespace {

// The step-by-step iteration: per step subspace_iteration_step_cuda (two Jacobi launches and
// batched GEMMs) and the residual, the active set shrinking on the host.
TopRResult topr_unfused(const torch::Tensor& c, const torch::Tensor& v0, int64_t r, double tol,
                        int max_iters) {
  const int64_t bsz = c.size(0), d = c.size(1), p = v0.size(2);
  TopRResult out;
  out.u = torch::zeros({bsz, d, p}, c.options());
  out.s = torch::zeros({bsz, p}, c.options());
  out.v = v0.clone();
  auto lopt = c.options().dtype(torch::kLong);
  out.iterations = torch::zeros({bsz}, lopt);
  out.converged = torch::zeros({bsz}, c.options().dtype(torch::kBool));
  auto active = torch::arange(bsz, lopt);
  for (int it = 0; it < max_iters && active.numel() > 0; ++it) {
    const bool all = active.numel() == bsz;
    auto ca = all ? c : c.index_select(0, active);
    auto va = all ? out.v : out.v.index_select(0, active);
    auto [u1, s1, v1] = subspace_iteration_step_cuda(ca, va);
    out.u.index_copy_(0, active, u1);
    out.s.index_copy_(0, active, s1);
    out.v.index_copy_(0, active, v1);
    out.iterations.index_add_(0, active, torch::ones({active.numel()}, lopt));
    auto done = triplet_residual(ca, u1, s1, v1, r) <= tol;
    out.converged.index_fill_(0, active.masked_select(done), true);
    active = active.masked_select(~done);  // synchronises (size known on the host)
  }
  return out;
}

}  // namespace

TopRResult topr_subspace_iteration(const torch::Tensor& c, const torch::Tensor& v0, int64_t r,
                                   double tol, int max_iters, bool fused) {
  ATTNPILOT_CHECK_ARG(subspace_step_supported(c, v0),
                      "top-r subspace iteration expects c [B, d, d] and v0 [B, d, p] on CUDA, "
                      "same float dtype, p <= d <= 128 (float64: d <= 64 or p <= 32), got {} "
                      "and {}",
                      c.defined() ? c10::str(c.sizes()) : std::string("undefined"),
                      v0.defined() ? c10::str(v0.sizes()) : std::string("undefined"));
  const int64_t bsz = c.size(0), d = c.size(1), p = v0.size(2);
  ATTNPILOT_CHECK_ARG(r >= 1 && r <= p, "top-r rank r = {}, expected 1..{} (block size)", r, p);
  ATTNPILOT_CHECK_ARG(tol > 0 && tol < 1, "top-r tol = {}, expected in (0, 1)", tol);
  ATTNPILOT_CHECK_ARG(max_iters >= 1, "top-r max_iters = {}, expected >= 1", max_iters);
  ATTNPILOT_CHECK_ARG(bsz <= std::numeric_limits<int>::max(),
                      "top-r: batch {} exceeds the grid limit {}", bsz,
                      std::numeric_limits<int>::max());
  c10::cuda::CUDAGuard guard(c.device());
  const bool dbl = c.scalar_type() == torch::kFloat64;
  if (!fused || bsz == 0 || !topr_kernel_supports(static_cast<int>(d), static_cast<int>(p), dbl))
    return topr_unfused(c, v0, r, tol, max_iters);
  int optin = 0;
  ATTNPILOT_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c.get_device()));
  if (topr_shared_bytes(static_cast<int>(d), static_cast<int>(p), dbl) > optin)
    return topr_unfused(c, v0, r, tol, max_iters);

  auto cc = c.contiguous(), vc = v0.contiguous();
  TopRResult out;
  out.u = torch::empty({bsz, d, p}, c.options());
  out.s = torch::empty({bsz, p}, c.options());
  out.v = torch::empty({bsz, d, p}, c.options());
  out.iterations = torch::empty({bsz}, c.options().dtype(torch::kLong));
  out.converged = torch::empty({bsz}, c.options().dtype(torch::kBool));
  auto status = torch::empty({bsz}, c.options().dtype(torch::kInt32));
  ToprLaunch l;
  l.c = cc.data_ptr();
  l.v0 = vc.data_ptr();
  l.batch = bsz;
  l.d = static_cast<int>(d);
  l.p = static_cast<int>(p);
  l.r = static_cast<int>(r);
  l.tol = tol;
  l.max_iters = max_iters;
  const JacobiOptions jo;  // the unfused steps' Jacobi settings
  l.jacobi_tol = default_jacobi_tol(d, dbl);
  l.max_sweeps = jo.max_sweeps;
  l.u = out.u.data_ptr();
  l.s = out.s.data_ptr();
  l.v = out.v.data_ptr();
  l.iterations = out.iterations.data_ptr<int64_t>();
  l.converged = out.converged.data_ptr<bool>();
  l.status = status.data_ptr<int>();
  const char* failed = "launch_topr";
  const cudaError_t err =
      launch_topr(l, dbl, at::cuda::getCurrentCUDAStream(c.get_device()).stream(), &failed);
  if (err != cudaSuccess)
    throw Error(
        fmt::format("{} failed: {} ({})", failed, cudaGetErrorName(err), cudaGetErrorString(err)));
  // One read-back: NaN/Inf, and the matrices to redo on the unfused path.
  auto st = status.cpu();
  const int* sp = st.data_ptr<int>();
  std::vector<int64_t> redo;
  for (int64_t i = 0; i < bsz; ++i) {
    if (sp[i] == kJacobiNonFinite)
      throw InvalidArgument(fmt::format(
          "top-r subspace iteration: core {} of the batch ({} matrices, {}x{}) or its warm start "
          "holds NaN or Inf",
          i, bsz, d, d));
    ATTNPILOT_CHECK_ARG(sp[i] == 0 || sp[i] == kToprFallback,
                        "top-r kernel wrote status {} for matrix {}, expected 0 or {}", sp[i], i,
                        kToprFallback);
    if (sp[i] == kToprFallback) redo.push_back(i);
  }
  if (!redo.empty()) {
    auto idx = torch::tensor(redo, torch::TensorOptions().dtype(torch::kLong)).to(c.device());
    auto re = topr_unfused(cc.index_select(0, idx), vc.index_select(0, idx), r, tol, max_iters);
    out.u.index_copy_(0, idx, re.u);
    out.s.index_copy_(0, idx, re.s);
    out.v.index_copy_(0, idx, re.v);
    out.iterations.index_copy_(0, idx, re.iterations);
    out.converged.index_copy_(0, idx, re.converged);
  }
  return out;
}

}  // namespace attnpilot::perturbation::cuda
