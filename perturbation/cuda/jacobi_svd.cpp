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
#include <tuple>
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

namespace {

// The kernel launch of jacobi_svd_out without the status read-back: returns the per-matrix
// status [B] int32 (kJacobi* bits), written on the current stream. Zero-column completion is
// the caller's (jacobi_svd_out does it after reading the statuses).
torch::Tensor jacobi_launch(const torch::Tensor& a, const JacobiOptions& opts, torch::Tensor& u,
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
  auto status = torch::empty({bsz}, a.options().dtype(torch::kInt32));  // always written
  if (bsz == 0) return status;
  c10::cuda::CUDAGuard guard(a.device());
  const bool dbl = a.scalar_type() == torch::kFloat64;
  auto ac = a.contiguous();
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
  p.scaled = opts.scaled_rotations;
  const char* failed = "launch_jacobi_svd";
  const cudaError_t err =
      launch_jacobi_svd(p, dbl, at::cuda::getCurrentCUDAStream(a.get_device()).stream(), &failed);
  if (err != cudaSuccess)
    throw Error(
        fmt::format("{} failed: {} ({})", failed, cudaGetErrorName(err), cudaGetErrorString(err)));
  return status;
}

}  // namespace

int64_t jacobi_svd_out(const torch::Tensor& a, const JacobiOptions& opts, torch::Tensor& u,
                       torch::Tensor& s, torch::Tensor& v) {
  const auto status = jacobi_launch(a, opts, u, s, v);
  const int64_t bsz = a.size(0), m_in = a.size(1), n_in = a.size(2);
  const bool tr = m_in < n_in;
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

namespace {

// Sizes and launches one tall pass (gram or product) for x [B, m, n] on CUDA.
void run_tall_pass(TallPassLaunch& p, const torch::Tensor& x) {
  p.x = x.data_ptr();
  p.x_double = x.scalar_type() == torch::kFloat64;
  p.batch = x.size(0);
  p.rows = x.size(1);
  p.n = static_cast<int>(x.size(2));
  p.x_batch_stride = x.stride(0);
  p.x_ld = x.stride(1);
  ATTNPILOT_CUDA_CHECK(
      cudaDeviceGetAttribute(&p.sm_count, cudaDevAttrMultiProcessorCount, x.get_device()));
  const char* failed = "launch_tall_pass";
  const cudaError_t err =
      launch_tall_pass(p, at::cuda::getCurrentCUDAStream(x.get_device()).stream(), &failed);
  if (err != cudaSuccess)
    throw Error(fmt::format("{} failed: {} ({}) for X {} {}", failed, cudaGetErrorName(err),
                            cudaGetErrorString(err), c10::str(x.sizes()), dtype_name(x)));
}

// Whether the tall-pass kernels take x [B, m, n]: CUDA, n <= 128, rows with unit column stride.
bool tall_pass_kernels(const torch::Tensor& x) {
  return x.is_cuda() && x.size(2) <= 128 && x.size(0) <= 65535 && x.stride(2) == 1 &&
         x.stride(1) >= x.size(2);
}

}  // namespace

torch::Tensor tall_gram(const torch::Tensor& x) {
  ATTNPILOT_CHECK_ARG(
      x.defined() && x.dim() == 3 && x.size(1) >= 1 && x.size(2) >= 1 &&
          (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64),
      "tall_gram expects a float32 or float64 [B, m, n] tensor, got {} {}",
      x.defined() ? c10::str(x.sizes()) : std::string("undefined"),
      x.defined() ? dtype_name(x) : std::string("-"));
  if (!tall_pass_kernels(x)) {
    const auto x64 = x.to(torch::kFloat64);
    return torch::bmm(x64.transpose(1, 2), x64);
  }
  c10::cuda::CUDAGuard guard(x.device());
  auto g = torch::zeros({x.size(0), x.size(2), x.size(2)}, x.options().dtype(torch::kFloat64));
  if (x.size(0) == 0) return g;
  TallPassLaunch p;
  p.gram = g.data_ptr<double>();
  run_tall_pass(p, x);
  return g;
}

void tall_product_out(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y) {
  ATTNPILOT_CHECK_ARG(
      x.defined() && w.defined() && y.defined() && x.dim() == 3 && w.dim() == 3 &&
          w.scalar_type() == torch::kFloat64 && w.size(0) == x.size(0) && w.size(1) == x.size(2) &&
          w.size(2) >= 1 && w.size(2) <= x.size(2) &&
          (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64) &&
          y.sizes() == c10::IntArrayRef({x.size(0), x.size(1), w.size(2)}) &&
          (y.scalar_type() == torch::kFloat32 || y.scalar_type() == torch::kFloat64) &&
          y.is_contiguous() && w.device() == x.device() && y.device() == x.device(),
      "tall_product_out expects X [B, m, n] float32/float64, W [B, n, k] float64 (k <= n) and a "
      "contiguous float32/float64 Y [B, m, k] on X's device, got X {} {}, W {} {}, Y {} {}",
      x.defined() ? c10::str(x.sizes()) : std::string("undefined"),
      x.defined() ? dtype_name(x) : std::string("-"),
      w.defined() ? c10::str(w.sizes()) : std::string("undefined"),
      w.defined() ? dtype_name(w) : std::string("-"),
      y.defined() ? c10::str(y.sizes()) : std::string("undefined"),
      y.defined() ? dtype_name(y) : std::string("-"));
  if (!tall_pass_kernels(x)) {
    y.copy_(torch::bmm(x.to(torch::kFloat64), w));
    return;
  }
  if (x.size(0) == 0 || x.size(1) == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const auto wc = w.contiguous();
  TallPassLaunch p;
  p.w = wc.data_ptr<double>();
  p.k = static_cast<int>(w.size(2));
  p.y = y.data_ptr();
  p.y_double = y.scalar_type() == torch::kFloat64;
  run_tall_pass(p, x);
}

namespace {

void check_tall_input(const torch::Tensor& x, const char* what) {
  ATTNPILOT_CHECK_ARG(
      x.defined() && x.dim() == 3 &&
          (x.scalar_type() == torch::kFloat64 || x.scalar_type() == torch::kFloat32) &&
          x.size(1) >= x.size(2) && x.size(2) >= 1,
      "{} expects a float32 or float64 [B, m, n] tensor with m >= n >= 1, got {} {}", what,
      x.defined() ? c10::str(x.sizes()) : std::string("undefined"),
      x.defined() ? dtype_name(x) : std::string("-"));
}

/// The first Cholesky pass over X: X = Q₁R₁ with Q₁ = X R₁⁻¹ (not formed).
struct TallFirstPass {
  torch::Tensor x;       ///< the passes' input: a float64 copy of X (kCublas) or X (kKernels)
  torch::Tensor r1;      ///< [B, n, n] float64 upper triangular; I where Cholesky failed
  torch::Tensor r1inv;   ///< [B, n, n] float64
  torch::Tensor failed;  ///< [B] bool: Cholesky failed or left non-finite entries
  TallFirstPass select(const torch::Tensor& idx) const {
    return {x.index_select(0, idx), r1.index_select(0, idx), r1inv.index_select(0, idx),
            failed.index_select(0, idx)};
  }
};

torch::Tensor tall_gram_of(const torch::Tensor& z, bool kernels) {
  return kernels ? tall_gram(z) : torch::bmm(z.transpose(1, 2), z);
}

TallFirstPass tall_first_pass(const torch::Tensor& x_in, TallPasses passes) {
  const bool kernels = passes == TallPasses::kKernels;
  TallFirstPass f;
  f.x = !kernels ? torch::empty(x_in.sizes(), x_in.options().dtype(torch::kFloat64)).copy_(x_in)
        : x_in.stride(2) == 1 ? x_in
                              : x_in.contiguous();
  const int64_t bsz = f.x.size(0), n = f.x.size(2);
  const auto o64 = f.x.options().dtype(torch::kFloat64);
  auto [l1, info1] = torch::linalg_cholesky_ex(tall_gram_of(f.x, kernels), /*upper=*/false,
                                               /*check_errors=*/false);
  auto r1 = l1.transpose(1, 2);
  f.failed = (info1 != 0) | ~torch::isfinite(r1).flatten(1).all(1);
  const auto eye = torch::eye(n, o64);
  f.r1 = torch::where(f.failed.view({bsz, 1, 1}), eye, r1).contiguous();
  f.r1inv = torch::linalg_solve_triangular(f.r1, eye.expand({bsz, n, n}), /*upper=*/true,
                                           /*left=*/true, /*unitriangular=*/false)
                .contiguous();
  return f;
}

/// The second pass from the first: Q₁ = X R₁⁻¹, R₂ = chol(Q₁ᵀQ₁), R = R₂R₁; Householder QR
/// where that is not accurate (tall_cholesky_qr2's contract).
TallQr tall_second_pass(const TallFirstPass& f, TallPasses passes) {
  const bool kernels = passes == TallPasses::kKernels;
  const auto& x = f.x;
  const int64_t bsz = x.size(0), m = x.size(1), n = x.size(2);
  const auto o64 = x.options().dtype(torch::kFloat64);
  const auto eye = torch::eye(n, o64);
  // Q₁ = X R₁⁻¹ with float64 sums, stored in the passes' type: for float X (kKernels) its
  // rounding to float perturbs X = Q₁R₁ by ~ε_float·‖X‖ (within the SVD's accuracy), and R₂ is
  // the Cholesky factor of the rounded Q₁'s own Gram matrix, so Q stays orthonormal to float64
  // rounding.
  TallQr out;
  if (kernels) {
    out.q1 = torch::empty({bsz, m, n}, x.options());
    tall_product_out(x, f.r1inv, out.q1);
  } else {
    out.q1 = torch::bmm(x, f.r1inv);
  }
  const auto g2 = tall_gram_of(out.q1, kernels);
  auto [l2, info2] = torch::linalg_cholesky_ex(g2, /*upper=*/false, /*check_errors=*/false);
  auto r2 = l2.transpose(1, 2);
  out.r = torch::bmm(r2, f.r1).contiguous();
  out.r2inv = torch::linalg_solve_triangular(r2, eye.expand({bsz, n, n}), /*upper=*/true,
                                             /*left=*/true, /*unitriangular=*/false)
                  .contiguous();
  // Where Cholesky-QR2 cannot work (a Cholesky fails, or Q₁ is far from orthonormal:
  // ‖Q₁ᵀQ₁ − I‖_max > 0.1), Householder QR of that matrix in float64 instead (Q₁ = Q_H in the
  // passes' type, R = R_H, R₂⁻¹ = I).
  const auto bad = f.failed | (info2 != 0) | ~torch::isfinite(g2).flatten(1).all(1) |
                   ((g2 - eye).abs().flatten(1).amax(1) > 0.1) |
                   ~torch::isfinite(out.r).flatten(1).all(1) |
                   ~torch::isfinite(out.r2inv).flatten(1).all(1);
  const auto bad_idx = bad.nonzero().flatten();
  out.householder = bad_idx.numel();
  if (out.householder > 0) {
    auto [qh, rh] = torch::linalg_qr(x.index_select(0, bad_idx).to(torch::kFloat64), "reduced");
    out.q1.index_copy_(0, bad_idx, qh.to(x.scalar_type()).contiguous());
    out.r.index_copy_(0, bad_idx, rh.contiguous());
    out.r2inv.index_copy_(0, bad_idx, eye.expand({out.householder, n, n}).contiguous());
  }
  return out;
}

}  // namespace

TallQr tall_cholesky_qr2(const torch::Tensor& x_in, TallPasses passes) {
  check_tall_input(x_in, "tall_cholesky_qr2");
  // Cholesky-QR2 with float64 Gram matrices: X = Q₁R₁, Q₁ = Q R₂, so X = Q R with R = R₂R₁ and
  // Q = Q₁R₂⁻¹. Float64 Gram matrices square cond(X) but stay accurate for cond(X) up to about
  // 1e7, far beyond float32 data; the second pass restores orthogonality to float64 rounding.
  return tall_second_pass(tall_first_pass(x_in, passes), passes);
}

TallSvdCounts tall_svd_out(const torch::Tensor& x_in, TallPasses passes, const SmallSvdOut& small,
                           torch::Tensor& ux, torch::Tensor& s, torch::Tensor& vx) {
  check_tall_input(x_in, "tall_svd_out");
  const int64_t bsz = x_in.size(0), m = x_in.size(1), n = x_in.size(2);
  const int64_t k = s.defined() && s.dim() == 2 ? s.size(1) : -1;
  const auto dt = x_in.scalar_type();
  for (const auto& [t, shape, name] : {std::tuple{&ux, std::vector<int64_t>{bsz, m, k}, "U"},
                                       std::tuple{&s, std::vector<int64_t>{bsz, k}, "S"},
                                       std::tuple{&vx, std::vector<int64_t>{bsz, n, k}, "V"}}) {
    ATTNPILOT_CHECK_ARG(
        k >= 1 && k <= n && t->defined() && t->sizes() == c10::IntArrayRef(shape) &&
            t->scalar_type() == dt && t->device() == x_in.device() && t->is_contiguous(),
        "tall_svd_out: output {} must be a contiguous {} tensor {} on {} "
        "(1 <= k <= n = {}), got {}",
        name, dtype_name(x_in), c10::str(c10::IntArrayRef(shape)), x_in.device().str(), n,
        t->defined() ? c10::str(t->sizes()) + " " + dtype_name(*t) : std::string("undefined"));
  }
  TallSvdCounts counts;
  if (bsz == 0) return counts;
  const bool kernels = passes == TallPasses::kKernels;
  // One Cholesky pass: G = XᵀX in float64, R₁ = chol(G). Q₁ = X R₁⁻¹ is orthonormal to about
  // ε₆₄·κ(X)² (the rounding of G and of its Cholesky factor, amplified by 1/σ_min²). Where
  // ‖R₁‖_F‖R₁⁻¹‖_F (>= κ(X), <= n·κ(X)) is at most kTallOnePassBound, that loss is <= ~1e-8
  // (~7e-7 at the analysis' typical constant (√m + √n)·ε₆₄·κ², m = 4096, n = 64), so the SVD of
  // R₁ gives X's: U = X·(R₁⁻¹U_R), no Q₁ formed and no second Gram pass. The rest take the
  // second pass from this one (Cholesky-QR2, Householder QR where that fails too). One host
  // synchronisation, to split the batch.
  const auto first = tall_first_pass(x_in, passes);
  const auto bound =
      torch::linalg_matrix_norm(first.r1, "fro") * torch::linalg_matrix_norm(first.r1inv, "fro");
  const auto one_pass_dev = ~first.failed & torch::isfinite(bound) & (bound <= kTallOnePassBound);
  const auto one_pass = one_pass_dev.cpu();
  std::vector<int64_t> one_idx, redo_idx;
  const bool* op = one_pass.data_ptr<bool>();
  for (int64_t i = 0; i < bsz; ++i) (op[i] ? one_idx : redo_idx).push_back(i);
  counts.one_pass = static_cast<int64_t>(one_idx.size());
  counts.two_pass = static_cast<int64_t>(redo_idx.size());
  const auto to_dev = [&](const std::vector<int64_t>& v) {
    return torch::tensor(v, torch::TensorOptions().dtype(torch::kLong)).to(x_in.device());
  };
  // R (the factor whose SVD is X's) and, per matrix, U = B·W with B = X (one pass) or Q₁, and
  // W = R₁⁻¹ (one pass) or R₂⁻¹, times U_R.
  torch::Tensor r = first.r1, winv = first.r1inv, q1_redo;
  torch::Tensor redo;
  // Every matrix redone (ill-conditioned batches): no subsets gathered or scattered.
  const bool all_redo = counts.one_pass == 0;
  if (counts.two_pass > 0) {
    redo = to_dev(redo_idx);
    const auto qr = tall_second_pass(all_redo ? first : first.select(redo), passes);
    counts.householder = qr.householder;
    q1_redo = qr.q1;
    r = all_redo ? qr.r : r.index_copy(0, redo, qr.r);
    winv = all_redo ? qr.r2inv : winv.index_copy(0, redo, qr.r2inv);
  }
  // The n×n SVD of every R at once (all n triplets), in X's precision.
  auto ur = torch::empty({bsz, n, n}, ux.options()), sr = torch::empty({bsz, n}, ux.options()),
       vr = torch::empty({bsz, n, n}, ux.options());
  counts.not_converged = small(r.to(dt).contiguous(), ur, sr, vr);
  s.copy_(sr.narrow(1, 0, k));
  vx.copy_(vr.narrow(2, 0, k));
  const auto w = torch::bmm(winv, ur.narrow(2, 0, k).to(torch::kFloat64));  // [B, n, k]
  const auto product = [&](const torch::Tensor& base, const torch::Tensor& wi, torch::Tensor& out) {
    if (kernels)
      tall_product_out(base, wi, out);
    else
      out.copy_(torch::bmm(base, wi));
  };
  if (counts.two_pass == 0 || all_redo) {
    product(all_redo ? q1_redo : first.x, w, ux);
    return counts;
  }
  auto u2 = torch::empty({counts.two_pass, m, k}, ux.options());
  product(q1_redo, w.index_select(0, redo), u2);
  ux.index_copy_(0, redo, u2);
  if (counts.one_pass > 0) {
    const auto one = to_dev(one_idx);
    auto u1 = torch::empty({counts.one_pass, m, k}, ux.options());
    product(first.x.index_select(0, one), w.index_select(0, one), u1);
    ux.index_copy_(0, one, u1);
  }
  return counts;
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
  // X = A (or Aᵀ: the float64 copy of the cuBLAS route takes the transpose as is, the pass
  // kernels want rows contiguous); A = X (U_A = U_X, V_A = V_X) or A = Xᵀ (U_A = V_X, V_A = U_X).
  const bool kernels = opts.tall_passes == TallPasses::kKernels;
  const auto x = tr ? (kernels ? a.transpose(1, 2).contiguous() : a.transpose(1, 2)) : a;
  // The n×n SVDs (all n triplets: the one-pass test needs σ_min) by the Jacobi kernel.
  JacobiOptions full = opts;
  full.rank = 0;
  const SmallSvdOut jacobi = [&](const torch::Tensor& r, torch::Tensor& ur, torch::Tensor& sr,
                                 torch::Tensor& vr) { return jacobi_svd_out(r, full, ur, sr, vr); };
  return tall_svd_out(x, opts.tall_passes, jacobi, tr ? v : u, s, tr ? u : v).not_converged;
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

// Writes the matrices of `re` (results for the batch rows idx of `out`) into `out`.
void copy_rows(TopRResult& out, const torch::Tensor& idx, const TopRResult& re) {
  out.u.index_copy_(0, idx, re.u);
  out.s.index_copy_(0, idx, re.s);
  out.v.index_copy_(0, idx, re.v);
  out.iterations.index_copy_(0, idx, re.iterations);
  out.converged.index_copy_(0, idx, re.converged);
}

// subspace_iteration_step_cuda without a host synchronisation: the two Jacobi launches' statuses
// are OR-ed into `status` [B] int32 on the device (negative: NaN or Inf met) for the caller to
// read once. A matrix whose status is not 0 must be redone by the checked step (zero columns
// are not completed here).
// cv = C·V (the caller's product: the previous step's residual computed it).
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> subspace_step_unchecked(
    const torch::Tensor& c, const torch::Tensor& cv, torch::Tensor& status) {
  const int64_t bsz = c.size(0), d = c.size(1), p = cv.size(2);
  const JacobiOptions o;
  auto uy = torch::empty({bsz, d, p}, c.options()), sy = torch::empty({bsz, p}, c.options()),
       vy = torch::empty({bsz, p, p}, c.options());
  status.bitwise_or_(jacobi_launch(cv, o, uy, sy, vy));
  auto zu = torch::empty({bsz, d, p}, c.options()), zs = torch::empty({bsz, p}, c.options()),
       zv = torch::empty({bsz, p, p}, c.options());
  status.bitwise_or_(jacobi_launch(torch::bmm(c.transpose(1, 2), uy), o, zu, zs, zv));
  return {torch::bmm(uy, zv), zs, zu};
}

// The step-by-step iteration. checked = true: per step subspace_iteration_step_cuda (two Jacobi
// launches, each with a status read-back, zero columns completed) and the residual, the active
// set shrinking on the host. checked = false (the default path): the same steps with the Jacobi
// statuses kept on the device, so one synchronisation per step (the active set) and one read of
// the statuses at the end; the matrices whose steps met a zero column or the sweep limit are
// redone checked, and NaN or Inf throws.
TopRResult topr_unfused(const torch::Tensor& c, const torch::Tensor& v0, int64_t r, double tol,
                        int max_iters, bool checked) {
  const int64_t bsz = c.size(0), d = c.size(1), p = v0.size(2);
  TopRResult out;
  out.u = torch::zeros({bsz, d, p}, c.options());
  out.s = torch::zeros({bsz, p}, c.options());
  out.v = v0.clone();
  auto lopt = c.options().dtype(torch::kLong);
  out.iterations = torch::zeros({bsz}, lopt);
  out.converged = torch::zeros({bsz}, c.options().dtype(torch::kBool));
  auto status = torch::zeros({bsz}, c.options().dtype(torch::kInt32));
  auto active = torch::arange(bsz, lopt);
  // C·V of the active matrices: each step's residual computes it for the step's new V, and the
  // next step starts from it (one product per step instead of two).
  torch::Tensor cv;
  for (int it = 0; it < max_iters && active.numel() > 0; ++it) {
    const bool all = active.numel() == bsz;
    auto ca = all ? c : c.index_select(0, active);
    // The active V, gathered only where a step needs V itself (the unchecked steps after the
    // first start from the carried C·V).
    const auto va = [&] { return all ? out.v : out.v.index_select(0, active); };
    torch::Tensor u1, s1, v1;
    if (checked) {
      std::tie(u1, s1, v1) = subspace_iteration_step_cuda(ca, va());
    } else {
      if (!cv.defined()) cv = torch::bmm(ca, va());
      auto st = all ? status : status.index_select(0, active);
      std::tie(u1, s1, v1) = subspace_step_unchecked(ca, cv, st);
      if (!all) status.index_copy_(0, active, st);
    }
    if (all) {  // no index kernels while every matrix is active
      out.u = u1;
      out.s = s1;
      out.v = v1;
      out.iterations.add_(1);
    } else {
      out.u.index_copy_(0, active, u1);
      out.s.index_copy_(0, active, s1);
      out.v.index_copy_(0, active, v1);
      out.iterations.index_add_(0, active, torch::ones({active.numel()}, lopt));
    }
    const auto cv_next = torch::bmm(ca, v1);
    // Ritz triplets (both step forms): ‖Cᵀ u_i − σ_i v_i‖ is the second Jacobi's own residual,
    // so only C·V's side is computed (tracker.h; the tests check both sides in float64).
    const auto done = triplet_residual(ca, u1, s1, v1, r, cv_next, /*ritz=*/true) <= tol;
    out.converged.index_copy_(0, active, done);     // the active ones were not converged
    const auto keep = (~done).nonzero().flatten();  // the one synchronisation of a step
    if (keep.numel() == active.numel()) {
      cv = cv_next;
    } else {
      active = active.index_select(0, keep);
      cv = cv_next.index_select(0, keep);
    }
  }
  if (checked) return out;
  const auto sc = status.cpu();
  const int* sp = sc.data_ptr<int>();
  std::vector<int64_t> redo;
  for (int64_t i = 0; i < bsz; ++i) {
    if (sp[i] < 0)
      throw InvalidArgument(fmt::format(
          "top-r subspace iteration: core {} of the batch ({} matrices, {}x{}) or its warm start "
          "holds NaN or Inf",
          i, bsz, d, d));
    if (sp[i] != 0) redo.push_back(i);
  }
  if (!redo.empty()) {
    auto idx = torch::tensor(redo, torch::TensorOptions().dtype(torch::kLong)).to(c.device());
    auto re = topr_unfused(c.index_select(0, idx), v0.index_select(0, idx), r, tol, max_iters,
                           /*checked=*/true);
    copy_rows(out, idx, re);
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
    return topr_unfused(c, v0, r, tol, max_iters, /*checked=*/false);
  int optin = 0;
  ATTNPILOT_CUDA_CHECK(
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, c.get_device()));
  if (topr_shared_bytes(static_cast<int>(d), static_cast<int>(p), dbl) > optin)
    return topr_unfused(c, v0, r, tol, max_iters, /*checked=*/false);

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
    auto re = topr_unfused(cc.index_select(0, idx), vc.index_select(0, idx), r, tol, max_iters,
                           /*checked=*/false);
    copy_rows(out, idx, re);
  }
  return out;
}

}  // namespace attnpilot::perturbation::cuda
