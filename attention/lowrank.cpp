#include "attention/lowrank.h"

#include "common/error.h"
#include "perturbation/projections.h"

namespace attnpilot::attention {
namespace {

// FLOP estimates for the d×d work (Golub & Van Loan orders of magnitude): two Gram matrices
// 2(N+M)d², two symmetric eigendecompositions ≈ 9 d³ each, forming R and R⁺ for both
// sides 4 × 2 d³, the core C 2 d³, its SVD with vectors ≈ 22 d³, A_Q and A_K 2 × 2 d² r.
constexpr double kEighFlops = 9.0;
constexpr double kSvdFlops = 22.0;

}  // namespace

Projections lowrank_projections(const torch::Tensor& q, const torch::Tensor& k, int64_t rank) {
  ATTNPILOT_CHECK_ARG(q.dim() >= 2 && k.dim() == q.dim() && q.size(-1) == k.size(-1),
                      "lowrank_projections: q [..., N, d] and k [..., M, d] must match in rank "
                      "and d (got {}-D d={}, {}-D d={})",
                      q.dim(), q.size(-1), k.dim(), k.size(-1));
  const int64_t d = q.size(-1);
  ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= d, "lowrank_projections: rank {} must be in [1, {}]",
                      rank, d);
  const auto sp = perturbation::optimal_score_projections(q, k, rank);
  Projections p;
  p.a_q = sp.a_q;
  p.a_k = sp.a_k;
  p.sigma = sp.sigma;
  const double mats = static_cast<double>(q.numel()) / (q.size(-2) * d);
  const double dd = static_cast<double>(d);
  p.flops = mats * (2.0 * (q.size(-2) + k.size(-2)) * dd * dd + 2 * kEighFlops * dd * dd * dd +
                    8.0 * dd * dd * dd + 2.0 * dd * dd * dd + kSvdFlops * dd * dd * dd +
                    4.0 * dd * dd * rank);
  return p;
}

}  // namespace attnpilot::attention
