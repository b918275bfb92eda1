#include "attention/lowrank.h"

#include "common/error.h"

namespace attnpilot::attention {
namespace {

// FLOP estimates for the d×d factorizations (Golub & Van Loan orders of magnitude):
// symmetric eigendecomposition ≈ 9 d³, SVD with vectors ≈ 22 d³.
constexpr double kEighFlops = 9.0;
constexpr double kSvdFlops = 22.0;

/// W Λ^-½ with dropped directions zeroed, and Λ^½ Wᵀ.
std::pair<torch::Tensor, torch::Tensor> gram_factor(const torch::Tensor& x) {
  const auto g = torch::matmul(x.transpose(-2, -1), x);
  auto [lam, w] = torch::linalg_eigh(g);
  const auto lmax = lam.amax(-1, /*keepdim=*/true).clamp_min(1e-300);
  const auto keep = lam > lmax * 1e-12;
  const auto sq = torch::where(keep, lam.clamp_min(0).sqrt(), torch::zeros_like(lam));
  const auto inv_sq = torch::where(keep, 1.0 / sq.clamp_min(1e-300), torch::zeros_like(lam));
  return {w * inv_sq.unsqueeze(-2), sq.unsqueeze(-1) * w.transpose(-2, -1)};
}

}  // namespace

Projections lowrank_projections(const torch::Tensor& q, const torch::Tensor& k, int64_t rank) {
  ATTNPILOT_CHECK_ARG(q.dim() >= 2 && k.dim() == q.dim() && q.size(-1) == k.size(-1),
                      "lowrank_projections: q [..., N, d] and k [..., M, d] must match in rank "
                      "and d (got {}-D d={}, {}-D d={})",
                      q.dim(), q.size(-1), k.dim(), k.size(-1));
  const int64_t d = q.size(-1);
  ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= d, "lowrank_projections: rank {} must be in [1, {}]",
                      rank, d);
  const auto qd = q.to(torch::kDouble), kd = k.to(torch::kDouble);
  auto [rq_pinv, rq] = gram_factor(qd);
  auto [rk_pinv, rk] = gram_factor(kd);
  const auto c = torch::matmul(rq, rk.transpose(-2, -1));
  auto [u, s, vh] = torch::linalg_svd(c, /*full_matrices=*/false, /*driver=*/c10::nullopt);
  const auto root = s.narrow(-1, 0, rank).sqrt().unsqueeze(-2);
  Projections p;
  p.a_q = torch::matmul(rq_pinv, u.narrow(-1, 0, rank) * root).to(q.scalar_type());
  p.a_k =
      torch::matmul(rk_pinv, vh.transpose(-2, -1).narrow(-1, 0, rank) * root).to(q.scalar_type());
  p.sigma = s;
  const double mats = static_cast<double>(q.numel()) / (q.size(-2) * d);
  const double dd = static_cast<double>(d);
  p.flops = mats * (2.0 * (q.size(-2) + k.size(-2)) * dd * dd + 2 * kEighFlops * dd * dd * dd +
                    2.0 * dd * dd * dd + kSvdFlops * dd * dd * dd + 4.0 * dd * dd * rank);
  return p;
}

}  // namespace attnpilot::attention
