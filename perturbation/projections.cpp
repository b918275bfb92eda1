#include "perturbation/projections.h"

#include <cmath>

#include "common/error.h"

namespace attnpilot::perturbation {
namespace {

void check_options(const ProjectionOptions& opts) {
  ATTNPILOT_CHECK_ARG(std::isfinite(opts.ridge) && opts.ridge >= 0,
                      "ProjectionOptions.ridge = {}, expected a finite value >= 0", opts.ridge);
  ATTNPILOT_CHECK_ARG(std::isfinite(opts.drop_tol) && opts.drop_tol >= 0 && opts.drop_tol < 1,
                      "ProjectionOptions.drop_tol = {}, expected a value in [0, 1)", opts.drop_tol);
}

void check_gram(const torch::Tensor& g, const char* name) {
  ATTNPILOT_CHECK_ARG(g.defined(), "{} is undefined, expected a [..., d, d] tensor", name);
  ATTNPILOT_CHECK_ARG(g.dim() >= 2 && g.size(-1) == g.size(-2) && g.size(-1) >= 1,
                      "{} has shape {}, expected [..., d, d] with d >= 1", name,
                      c10::str(g.sizes()));
  ATTNPILOT_CHECK_ARG(g.is_floating_point(), "{} has dtype {}, expected a floating dtype", name,
                      std::string(c10::toString(g.scalar_type())));
}

}  // namespace

GramRoot gram_root(const torch::Tensor& gram, const ProjectionOptions& opts) {
  check_options(opts);
  check_gram(gram, "gram");
  const int64_t d = gram.size(-1);
  auto g = gram.to(torch::kFloat64);
  g = 0.5 * (g + g.transpose(-1, -2));
  if (opts.ridge > 0) {
    auto tr = g.diagonal(0, -2, -1).sum(-1).clamp_min(0);  // [...]
    auto eye = torch::eye(d, g.options());
    g = g + (opts.ridge / static_cast<double>(d)) * tr.unsqueeze(-1).unsqueeze(-1) * eye;
  }
  auto [lam, w] = torch::linalg_eigh(g);  // ascending
  auto lam_max = std::get<0>(lam.max(-1, /*keepdim=*/true)).clamp_min(0);
  // Keep λ > drop_tol·λ_max and λ > 0; when λ_max = 0 nothing is kept.
  auto keep = (lam > opts.drop_tol * lam_max) & (lam > 0);
  auto lam_k = torch::where(keep, lam, torch::zeros_like(lam));
  auto sq = lam_k.sqrt();
  auto isq = torch::where(keep, lam_k.clamp_min(std::numeric_limits<double>::min()).rsqrt(),
                          torch::zeros_like(lam));
  auto wt = w.transpose(-1, -2);
  GramRoot out;
  out.root = torch::matmul(w * sq.unsqueeze(-2), wt);
  out.pinv = torch::matmul(w * isq.unsqueeze(-2), wt);
  out.rank = keep.sum(-1);
  return out;
}

torch::Tensor score_core(const GramRoot& rq, const GramRoot& rk) {
  // R_K is symmetric, so R_Kᵀ = R_K.
  return torch::matmul(rq.root, rk.root.transpose(-1, -2));
}

std::pair<torch::Tensor, torch::Tensor> projections_from_core_svd(
    const GramRoot& rq, const GramRoot& rk, const torch::Tensor& u, const torch::Tensor& sigma,
    const torch::Tensor& v, int64_t rank) {
  ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= u.size(-1),
                      "rank = {}, expected 1 <= rank <= {} (columns of U)", rank, u.size(-1));
  auto s = sigma.narrow(-1, 0, rank).to(torch::kFloat64).clamp_min(0).sqrt().unsqueeze(-2);
  auto a_q = torch::matmul(rq.pinv, u.narrow(-1, 0, rank).to(torch::kFloat64) * s);
  auto a_k = torch::matmul(rk.pinv, v.narrow(-1, 0, rank).to(torch::kFloat64) * s);
  return {a_q, a_k};
}

ScoreProjections optimal_score_projections_from_gram(const torch::Tensor& gram_q,
                                                     const torch::Tensor& gram_k, int64_t rank,
                                                     const ProjectionOptions& opts) {
  check_gram(gram_q, "gram_q");
  check_gram(gram_k, "gram_k");
  ATTNPILOT_CHECK_ARG(gram_q.sizes() == gram_k.sizes(),
                      "gram_q has shape {} but gram_k has shape {}, expected equal shapes",
                      c10::str(gram_q.sizes()), c10::str(gram_k.sizes()));
  const int64_t d = gram_q.size(-1);
  ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= d, "rank = {}, expected 1 <= rank <= d = {}", rank, d);
  auto rq = gram_root(gram_q, opts);
  auto rk = gram_root(gram_k, opts);
  auto c = score_core(rq, rk);
  auto [u, s, vh] = torch::linalg_svd(c, /*full_matrices=*/false, /*driver=*/c10::nullopt);
  auto v = vh.transpose(-1, -2);
  auto [a_q, a_k] = projections_from_core_svd(rq, rk, u, s, v, rank);
  ScoreProjections out;
  out.a_q = a_q.to(gram_q.scalar_type());
  out.a_k = a_k.to(gram_q.scalar_type());
  out.sigma = s;
  return out;
}

ScoreProjections optimal_score_projections(const torch::Tensor& q, const torch::Tensor& k,
                                           int64_t rank, const ProjectionOptions& opts) {
  ATTNPILOT_CHECK_ARG(q.defined() && k.defined(), "q and k must be defined tensors");
  ATTNPILOT_CHECK_ARG(q.dim() >= 2 && k.dim() >= 2,
                      "q has shape {} and k has shape {}, expected [..., N, d] and [..., M, d]",
                      c10::str(q.sizes()), c10::str(k.sizes()));
  ATTNPILOT_CHECK_ARG(q.is_floating_point() && k.is_floating_point(),
                      "q and k must be floating point, got {} and {}",
                      std::string(c10::toString(q.scalar_type())),
                      std::string(c10::toString(k.scalar_type())));
  ATTNPILOT_CHECK_ARG(q.size(-1) == k.size(-1), "q has head dim {} but k has {}, expected equal",
                      q.size(-1), k.size(-1));
  ATTNPILOT_CHECK_ARG(q.sizes().slice(0, q.dim() - 2) == k.sizes().slice(0, k.dim() - 2),
                      "q has shape {} and k has shape {}, expected equal leading dims",
                      c10::str(q.sizes()), c10::str(k.sizes()));
  ATTNPILOT_CHECK_ARG(q.device() == k.device(), "q is on {} but k is on {}", q.device().str(),
                      k.device().str());
  ATTNPILOT_CHECK_ARG(q.size(-2) >= 1 && k.size(-2) >= 1,
                      "q has {} rows and k has {}, expected at least one each", q.size(-2),
                      k.size(-2));
  auto q64 = q.to(torch::kFloat64);
  auto k64 = k.to(torch::kFloat64);
  auto gq = torch::matmul(q64.transpose(-1, -2), q64);
  auto gk = torch::matmul(k64.transpose(-1, -2), k64);
  auto out = optimal_score_projections_from_gram(gq, gk, rank, opts);
  out.a_q = out.a_q.to(q.scalar_type());
  out.a_k = out.a_k.to(q.scalar_type());
  return out;
}

}  // namespace attnpilot::perturbation
