#pragma once
/// Optimal rank-r query–key score projections (../shared/DESIGN.md, "Rank-r scores that are
/// optimal, and cheap to update").
///
///   Q [N,d] ──► G_Q = QᵀQ ──► R_Q = G_Q^½ (symmetric)  ┐
///                                                      ├─► C = R_Q R_K (d×d) = U Σ Vᵀ
///   K [M,d] ──► G_K = KᵀK ──► R_K = G_K^½ (symmetric)  ┘
///
///   A_Q = R_Q⁺ U_r Σ_r^½,   A_K = R_K⁺ V_r Σ_r^½   ──►  (Q A_Q)(K A_K)ᵀ = best rank-r of Q Kᵀ
///
/// Why it is exact: any R with RᵀR = G gives Q = Q̂ R with Q̂ = Q R⁺ orthonormal on the
/// column space of Q, so S = Q Kᵀ = Q̂ C K̂ᵀ and the singular values of S are those of C.
/// (Q A_Q)(K A_K)ᵀ = Q̂ U_r Σ_r V_rᵀ K̂ᵀ is the truncated SVD of S (Eckart–Young), with
/// ‖S − S_r‖_F² = Σ_{i>r} σ_i² and ‖S − S_r‖₂ = σ_{r+1}. The symmetric square root (rather
/// than an eigenvector-ordered or Cholesky factor) is used because it is a continuous function
/// of G, so U and V live in the fixed d-coordinates and can warm-start the next segment's
/// SVD (see tracker.h).
///
/// Rank deficiency (N < d, repeated tokens, zero rows): G = W Λ Wᵀ; eigenvalues with
/// λ_i ≤ opts.drop_tol · λ_max (λ_max = largest eigenvalue; all of them when λ_max = 0) are
/// treated as exactly zero, so R⁺ = W Λ⁺^½ Wᵀ is the Moore–Penrose pseudo-inverse of the
/// truncated factor. The result is still the exact optimum on the retained column space, and
/// the discarded part of S has norm ≤ 2·sqrt(drop_tol)·‖Q‖₂·‖K‖₂ (= 2e-7·‖Q‖₂‖K‖₂ at the
/// default drop_tol = 1e-14, below fp32 rounding of the inputs).
/// A zero Q or K gives σ = 0 and zero projections. Never NaN for finite input.
///
/// Optional Tikhonov ridge (opts.ridge = ρ > 0): G ← G + ρ·(tr G / d)·I before factoring.
/// The projections are then optimal for the regularised problem, not for S; ρ = 0 (default)
/// uses only the pseudo-inverse rule above.
///
/// All work is in float64 on the input's device; projections come back in the input dtype.
#include <torch/torch.h>

#include <cstdint>

namespace attnpilot::perturbation {

/// How the Gram matrices are regularised (see the file comment).
struct ProjectionOptions {
  /// Relative Tikhonov regularisation ρ: G ← G + ρ·(tr G / d)·I. 0 = none (pseudo-inverse).
  double ridge = 0;
  /// Relative eigenvalue cut: λ_i ≤ drop_tol·λ_max counts as zero. Must be in [0, 1).
  double drop_tol = 1e-14;
};

/// Projections A_Q, A_K and the spectrum of S = Q Kᵀ.
struct ScoreProjections {
  torch::Tensor a_q, a_k;  ///< [..., d, r] so (Q a_q)(K a_k)ᵀ is the best rank-r approx of Q Kᵀ
  torch::Tensor sigma;     ///< [..., d] singular values of S (= of the core C), descending, float64
};

/// Symmetric square root of a Gram matrix and its pseudo-inverse, both float64 [..., d, d].
struct GramRoot {
  torch::Tensor root;  ///< R = W Λ^½ Wᵀ (dropped eigenvalues set to 0)
  torch::Tensor pinv;  ///< R⁺ = W Λ⁺^-½ Wᵀ
  torch::Tensor rank;  ///< [...] int64, number of retained eigenvalues
};

/// Factor symmetric PSD Gram matrices [..., d, d] (any float dtype; symmetrised first).
GramRoot gram_root(const torch::Tensor& gram, const ProjectionOptions& opts = {});

/// The d×d core C = R_Q R_Kᵀ (float64) from two Gram roots.
torch::Tensor score_core(const GramRoot& rq, const GramRoot& rk);

/// q [..., N, d], k [..., M, d] (equal leading dims, any N, M >= 1), rank in [1, d].
/// a_q/a_k in q's dtype, sigma float64.
ScoreProjections optimal_score_projections(const torch::Tensor& q, const torch::Tensor& k,
                                           int64_t rank, const ProjectionOptions& opts = {});

/// The same from Gram matrices G_Q = QᵀQ and G_K = KᵀK [..., d, d] (e.g. accumulated over
/// segments in float64). Projections come back in gram_q's dtype.
ScoreProjections optimal_score_projections_from_gram(const torch::Tensor& gram_q,
                                                     const torch::Tensor& gram_k, int64_t rank,
                                                     const ProjectionOptions& opts = {});

/// Projections from a core factorisation already computed (C = U Σ Vᵀ with U, V [..., d, p],
/// sigma [..., p] descending, p >= rank): A_Q = R_Q⁺ U_r Σ_r^½, A_K = R_K⁺ V_r Σ_r^½ (float64).
/// Used by the incremental tracker.
std::pair<torch::Tensor, torch::Tensor> projections_from_core_svd(
    const GramRoot& rq, const GramRoot& rk, const torch::Tensor& u, const torch::Tensor& sigma,
    const torch::Tensor& v, int64_t rank);

}  // namespace attnpilot::perturbation
