#pragma once
/// Optimal rank-r score projections (see ../shared/DESIGN.md, "Rank-r scores"):
///
///   S = Q Kᵀ,  R_Q = (QᵀQ)^½, R_K = (KᵀK)^½ (so Q = Q̂ R_Q, Q̂ orthonormal)
///   C = R_Q R_Kᵀ = U Σ Vᵀ  (d×d)   ──►  A_Q = R_Q⁺ U_r Σ_r^½,  A_K = R_K⁺ V_r Σ_r^½
///
/// so (Q A_Q)(K A_K)ᵀ = Q̂ U_r Σ_r V_rᵀ K̂ᵀ, the best rank-r approximation of S (Eckart–Young),
/// with squared Frobenius error Σ_{i>r} σ_i². Columns are ordered by σ, so the first r'
/// columns of a rank-r projection are the rank-r' optimum. Computed in float64 by
/// perturbation::optimal_score_projections (symmetric Gram roots, pseudo-inverse for rank
/// deficiency); this wrapper adds the FLOP count the executor reports.
#include <torch/torch.h>

#include <cstdint>

namespace attnpilot::attention {

struct Projections {
  torch::Tensor a_q, a_k;  ///< [..., d, r], dtype of q
  torch::Tensor sigma;     ///< [..., d] singular values of S (descending), float64
  double flops = 0;        ///< Gram matrices + factorizations (estimated constants, see .cpp)
};

/// q [..., N, d], k [..., M, d] with equal leading dims. Rank r in [1, d]. Directions of a
/// rank-deficient Gram matrix (relative eigenvalue <= 1e-12) are dropped; a rank above the
/// numerical rank of S gives zero columns.
Projections lowrank_projections(const torch::Tensor& q, const torch::Tensor& k, int64_t rank);

}  // namespace attnpilot::attention
