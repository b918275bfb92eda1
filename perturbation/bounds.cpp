#include "perturbation/bounds.h"

#include <cmath>

#include "common/error.h"

namespace attnpilot::perturbation {
namespace {

torch::Tensor f64(const torch::Tensor& t) { return t.to(torch::kFloat64); }

void check_matrix(const torch::Tensor& t, const char* name) {
  ATTNPILOT_CHECK_ARG(t.defined() && t.dim() >= 2 && t.is_floating_point(),
                      "{} must be a floating [..., m, n] tensor, got shape {}", name,
                      t.defined() ? c10::str(t.sizes()) : std::string("undefined"));
}

void check_sigma(const torch::Tensor& sigma, int64_t rank, const char* what) {
  ATTNPILOT_CHECK_ARG(sigma.defined() && sigma.dim() >= 1 && sigma.is_floating_point(),
                      "sigma must be a floating [..., k] tensor for {}", what);
  ATTNPILOT_CHECK_ARG(rank >= 0 && rank <= sigma.size(-1),
                      "{}: rank = {}, expected 0 <= rank <= {}", what, rank, sigma.size(-1));
}

}  // namespace

torch::Tensor weyl_bound(const torch::Tensor& e) {
  check_matrix(e, "E");
  return torch::linalg_matrix_norm(f64(e), 2);
}

torch::Tensor mirsky_bound(const torch::Tensor& e) {
  check_matrix(e, "E");
  return torch::linalg_matrix_norm(f64(e), "fro");
}

torch::Tensor wedin_sin_theta_bound(const torch::Tensor& residual,
                                    const torch::Tensor& sigma_tilde_r,
                                    const torch::Tensor& sigma_next) {
  auto delta = f64(sigma_tilde_r) - f64(sigma_next);
  auto ratio = f64(residual) / delta.clamp_min(std::numeric_limits<double>::min());
  return torch::where(delta > 0, ratio.clamp_max(1.0), torch::ones_like(ratio));
}

torch::Tensor wedin_a_priori_bound(const torch::Tensor& e_norm2, const torch::Tensor& sigma,
                                   int64_t rank) {
  check_sigma(sigma, rank, "wedin_a_priori_bound");
  ATTNPILOT_CHECK_ARG(rank >= 1 && rank < sigma.size(-1),
                      "wedin_a_priori_bound: rank = {}, expected 1 <= rank < {}", rank,
                      sigma.size(-1));
  auto s = f64(sigma);
  auto e = f64(e_norm2);
  auto delta0 = s.select(-1, rank - 1) - s.select(-1, rank) - e;
  auto ratio = e / delta0.clamp_min(std::numeric_limits<double>::min());
  return torch::where(delta0 > 0, ratio.clamp_max(1.0), torch::ones_like(ratio));
}

torch::Tensor sin_theta(const torch::Tensor& x, const torch::Tensor& y) {
  check_matrix(x, "X");
  check_matrix(y, "Y");
  auto x64 = f64(x), y64 = f64(y);
  auto resid = y64 - torch::matmul(x64, torch::matmul(x64.transpose(-1, -2), y64));
  return torch::linalg_matrix_norm(resid, 2).clamp_max(1.0);
}

torch::Tensor tail_frobenius(const torch::Tensor& sigma, int64_t rank) {
  check_sigma(sigma, rank, "tail_frobenius");
  const int64_t k = sigma.size(-1);
  return f64(sigma).narrow(-1, rank, k - rank).square().sum(-1).sqrt();
}

torch::Tensor tail_spectral(const torch::Tensor& sigma, int64_t rank) {
  check_sigma(sigma, rank, "tail_spectral");
  if (rank >= sigma.size(-1))
    return torch::zeros(sigma.sizes().slice(0, sigma.dim() - 1),
                        sigma.options().dtype(torch::kFloat64));
  return f64(sigma).select(-1, rank).clamp_min(0);
}

torch::Tensor rank_change_frobenius(const torch::Tensor& sigma, int64_t rank_from,
                                    int64_t rank_to) {
  check_sigma(sigma, rank_from, "rank_change_frobenius");
  check_sigma(sigma, rank_to, "rank_change_frobenius");
  const int64_t lo = std::min(rank_from, rank_to), hi = std::max(rank_from, rank_to);
  return f64(sigma).narrow(-1, lo, hi - lo).square().sum(-1).sqrt();
}

torch::Tensor attention_output_bound(const torch::Tensor& score_error,
                                     const torch::Tensor& value_norm_max, double scale) {
  ATTNPILOT_CHECK_ARG(std::isfinite(scale) && scale > 0, "scale = {}, expected > 0", scale);
  return f64(score_error) * scale * f64(value_norm_max) / std::sqrt(2.0);
}

torch::Tensor max_row_norm(const torch::Tensor& v) {
  check_matrix(v, "V");
  return torch::linalg_vector_norm(f64(v), 2, {-1}, false, c10::nullopt).amax(-1);
}

}  // namespace attnpilot::perturbation
