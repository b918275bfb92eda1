#pragma once
/// Our own batched SVD on CUDA (compiled only when ATTNPILOT_CUDA is ON):
///
///   small  [B, m, n], max(m, n) <= 128 ──► one-sided Jacobi kernel, one block per matrix,
///                                          matrix + V in shared memory (jacobi_svd.cu)
///   tall   [B, N, d], N > 128 >= d ─────► one Cholesky pass with a float64 Gram matrix (cuBLAS
///                                          DGEMMs, or our pass kernels, tall_qr.cu) ─► Jacobi
///                                          kernel on R₁ (d×d) ─► U = X·(R₁⁻¹U_R) where κ <~ 1e4;
///                                          the rest Cholesky-QR2 (Householder QR where that is
///                                          not accurate) ─► Jacobi on R ─► U = Q₁·(R₂⁻¹U_R)
///   top-r  core C [B, d, d], warm V₀ ───► block subspace iteration, step by step: two
///                                          batched GEMMs and two Jacobi calls on d×p blocks
///                                          per step; or all steps fused in one kernel
///                                          (topr_svd.cu), one block per matrix (opt-in)
///
/// Results: A ≈ U diag(S) Vᵀ, S descending, U [B, m, k], V [B, n, k]. Everything runs on the
/// caller's current CUDA stream; CUDA errors throw attnpilot::Error naming the call; NaN or
/// Inf in the input throws attnpilot::InvalidArgument naming the matrix.
#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <tuple>

#include "perturbation/batched_svd.h"

namespace attnpilot::perturbation::cuda {

/// How the tall path's passes over X (Gram matrices, X·R⁻¹, the final U) run on CUDA.
/// kCublas: a float64 copy of X, then cuBLAS DGEMMs (the FP64 tensor cores) — the default,
/// measured faster on the H100 (bench/RESULTS.md, 2026-12-05: 4096×64 ×256 Cholesky-QR2 in
/// ~1.3 ms against 4.3 ms). kKernels: our pass kernels (tall_qr.cu: float input read once,
/// float64 sums on the CUDA cores, Q₁ in float), tested against float64 and kept for tuning.
enum class TallPasses { kCublas, kKernels };

struct JacobiOptions {
  int64_t rank = 0;  ///< top-k triplets; 0 = all min(m, n)
  double tol = 0;    ///< relative orthogonality for convergence; 0 = sqrt(m)·machine ε
  int max_sweeps = 100;
  /// Lanes per column pair in the kernel: 0 or 8 = 8; 4 (float with max(m, n) > 64 only) is a
  /// tuning and testing knob, measured slower (doubles and smaller shapes always use 8).
  int lanes = 0;
  /// Scaled rotations: each column carries a scale (a product of cosines, in double) and a
  /// rotation costs two FMAs per row instead of two products and two FMAs (jacobi_sweeps.cuh).
  /// More accurate in the emulation (V orthogonal to 5e-7 against 2e-6 at 128×128), but
  /// 1.1-1.3x slower on the H100 (bench/RESULTS.md, 2026-12-06).
  /// Applies to float with 8 lanes where the kernel does not track its norms (it does for
  /// tall-skinny blocks of more than 64 rows, n <= 32 and m >= 4n); elsewhere it has no effect.
  bool scaled_rotations = false;
  TallPasses tall_passes = TallPasses::kCublas;  ///< the tall path's passes over X
};

/// True when jacobi_svd handles [.., m, n] of this dtype: float32 with max(m, n) <= 128;
/// float64 with max(m, n) <= 64, or max <= 128 and min <= 32.
bool jacobi_supported(int64_t m, int64_t n, torch::ScalarType dtype);

/// True when tall_qr_jacobi_svd handles it: max(m, n) > 128 and the d×d core (d = min(m, n))
/// is jacobi_supported.
bool tall_qr_supported(int64_t m, int64_t n, torch::ScalarType dtype);

/// Small matrices: a [B, m, n] on CUDA, float32/float64, jacobi_supported. Writes into u
/// [B, m, k], s [B, k], v [B, n, k] (same dtype and device, contiguous; every element is
/// written); returns the count of matrices that hit max_sweeps.
int64_t jacobi_svd_out(const torch::Tensor& a, const JacobiOptions& opts, torch::Tensor& u,
                       torch::Tensor& s, torch::Tensor& v);
/// Allocating form; backend = kJacobiKernel.
SvdResult jacobi_svd(const torch::Tensor& a, const JacobiOptions& opts);

/// Tall (or wide) matrices: a [B, m, n] with max(m, n) > 128, tall_qr_supported.
int64_t tall_qr_jacobi_svd_out(const torch::Tensor& a, const JacobiOptions& opts, torch::Tensor& u,
                               torch::Tensor& s, torch::Tensor& v);
/// Allocating form; backend = kTallQrJacobi.
SvdResult tall_qr_jacobi_svd(const torch::Tensor& a, const JacobiOptions& opts);

/// X = Q R with Q = q1·r2inv (orthonormal columns), R upper triangular, from Cholesky-QR2 with
/// float64 Gram matrices, with Householder QR for the matrices where Cholesky-QR2 is not
/// accurate.
struct TallQr {
  /// [B, m, n] Q₁ = X R₁⁻¹: float64 (kCublas), or X's dtype (kKernels: float64 sums, rounded)
  torch::Tensor q1;
  torch::Tensor r;          ///< [B, n, n] float64
  torch::Tensor r2inv;      ///< [B, n, n] float64
  int64_t householder = 0;  ///< matrices that took the Householder fallback
};
/// x [B, m, n] float32 or float64, m >= n >= 1, on any device. kCublas: the passes in LibTorch
/// float64 (cuBLAS DGEMMs on CUDA; the reference the kernels are tested against). kKernels, on
/// CUDA with n <= 128: our kernels (tall_qr.cu: float64 sums, no float64 copy of X).
TallQr tall_cholesky_qr2(const torch::Tensor& x, TallPasses passes = TallPasses::kCublas);

/// G = XᵀX [B, n, n] float64 for x [B, m, n] float32/float64 (tall_qr.cu's Gram kernel on CUDA:
/// exact float products, float64 sums; LibTorch float64 elsewhere or for n > 128).
torch::Tensor tall_gram(const torch::Tensor& x);
/// y = X·W rounded to y's dtype: x [B, m, n] float32/float64, w [B, n, k] float64 (k <= n),
/// y [B, m, k] float32/float64 contiguous (tall_qr.cu's product kernel on CUDA, float64 sums;
/// LibTorch float64 elsewhere).
void tall_product_out(const torch::Tensor& x, const torch::Tensor& w, torch::Tensor& y);

/// Bound on ‖R₁‖_F‖R₁⁻¹‖_F (>= κ(X)) up to which tall_svd_out takes X's SVD from one Cholesky
/// pass.
inline constexpr double kTallOnePassBound = 1e4;

/// How tall_svd_out handled a batch.
struct TallSvdCounts {
  int64_t one_pass = 0;       ///< matrices done by one Cholesky pass (bound <= kTallOnePassBound)
  int64_t two_pass = 0;       ///< the rest, redone by Cholesky-QR2 (Householder included)
  int64_t householder = 0;    ///< of those, matrices that took the Householder fallback
  int64_t not_converged = 0;  ///< the small SVD's count of unconverged matrices
};
/// The n×n SVD the tall path calls: r [B, n, n] (X's dtype, contiguous) into u, s, v [B, n, n],
/// [B, n], [B, n, n] (all n triplets, descending); returns its count of unconverged matrices.
using SmallSvdOut = std::function<int64_t(const torch::Tensor& r, torch::Tensor& u,
                                          torch::Tensor& s, torch::Tensor& v)>;
/// The tall path on any device (tall_qr_jacobi_svd_out's CUDA path passes the Jacobi kernel as
/// `small`; tests on the CPU pass LAPACK): x [B, m, n] float32/float64, m >= n, into ux
/// [B, m, k], s [B, k], vx [B, n, k] (x's dtype and device, contiguous; k = s.size(1) <= n).
/// One Cholesky pass with a float64 Gram matrix; where ‖R₁‖_F‖R₁⁻¹‖_F <= kTallOnePassBound
/// the SVD of R₁ and U = X·(R₁⁻¹U_R), elsewhere the second pass of Cholesky-QR2 from the first
/// (Householder QR where that fails); then one small SVD call on every matrix's R. One host
/// synchronisation to split the batch.
TallSvdCounts tall_svd_out(const torch::Tensor& x, TallPasses passes, const SmallSvdOut& small,
                           torch::Tensor& ux, torch::Tensor& s, torch::Tensor& vx);

/// Replaces the exactly-zero trailing columns of ub [m, k] (m >= k; the Jacobi kernel writes 0
/// where σ_j has no direction, and σ is sorted, so they are last) by an orthonormal completion
/// of the leading unit columns: QR of [leading, random] with a fixed-seed random block.
void complete_zero_columns(torch::Tensor ub, uint64_t seed);

/// True when subspace_iteration_step_cuda handles c [B, d, d], v [B, d, p] (CUDA tensors,
/// float32/float64, jacobi_supported(d, p)).
bool subspace_step_supported(const torch::Tensor& c, const torch::Tensor& v);

/// One block subspace iteration step with Rayleigh–Ritz, the same function as
/// perturbation::subspace_iteration_step: U = basis(C V) (Jacobi on C V), then the SVD
/// Cᵀ U = P Σ Qᵀ (Jacobi) gives the Ritz triplets (U Q, Σ, P), descending. Batched, no
/// per-matrix loop.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> subspace_iteration_step_cuda(
    const torch::Tensor& c, const torch::Tensor& v);

/// Result of the warm-started top-r iteration.
struct TopRResult {
  torch::Tensor u, s, v;     ///< [B, d, p], [B, p], [B, d, p]
  torch::Tensor iterations;  ///< [B] int64, steps taken per matrix
  torch::Tensor converged;   ///< [B] bool, residual <= tol reached
};

/// Leading r triplets of c [B, d, d] by subspace iteration from v0 [B, d, p] (p >= r; the
/// previous segment's V for a warm start). A matrix stops when
/// max_{i<r} max(‖C v_i − σ_i u_i‖, ‖Cᵀ u_i − σ_i v_i‖) <= tol·σ₁, or after max_iters steps.
/// fused = false (default): step by step (two Jacobi launches and batched GEMMs per step; one
/// host synchronisation per step for the active set, the Jacobi statuses read once at the end
/// and the matrices that met a zero column or the sweep limit redone with per-launch checks). fused
/// = true: one kernel runs every step of every matrix (topr_svd.cu; p <= 32) with one host
/// read-back at the end, matrices it cannot finish (a rank-deficient block, a Jacobi step out of
/// sweeps) redone step by step. The fused kernel measured 1.2-2x slower on the H100 at 1024 cores
/// of 128x128 (2026-12-05): one block per matrix makes every Jacobi step a latency chain, and its
/// products run on CUDA cores at low occupancy where the step-by-step path's GEMMs use cuBLAS; it
/// is kept for small batches and as the base of a faster fused design.
TopRResult topr_subspace_iteration(const torch::Tensor& c, const torch::Tensor& v0, int64_t r,
                                   double tol, int max_iters, bool fused = false);

}  // namespace attnpilot::perturbation::cuda
