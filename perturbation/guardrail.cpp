#include "perturbation/guardrail.h"

#include <cmath>

#include "common/error.h"
#include "common/log.h"
#include "perturbation/bounds.h"

namespace attnpilot::perturbation {

double EpsilonSchedule::at(int64_t step) const {
  ATTNPILOT_CHECK_ARG(step >= 0, "step = {}, expected >= 0", step);
  ATTNPILOT_CHECK_ARG(std::isfinite(start) && std::isfinite(end) && start >= 0 && end >= 0,
                      "epsilon schedule start = {}, end = {}, expected finite values >= 0", start,
                      end);
  ATTNPILOT_CHECK_ARG(steps >= 0, "epsilon schedule steps = {}, expected >= 0", steps);
  if (steps == 0 || step >= steps) return steps == 0 ? start : end;
  const double t = static_cast<double>(step) / static_cast<double>(steps);
  return start + (end - start) * t;
}

torch::Tensor rank_bounds(const torch::Tensor& sigma, const std::vector<int64_t>& ranks,
                          const GuardrailOptions& opts, const torch::Tensor& value_norm_max) {
  ATTNPILOT_CHECK_ARG(sigma.defined() && sigma.dim() >= 1 && sigma.is_floating_point(),
                      "sigma must be a floating [..., d] tensor");
  ATTNPILOT_CHECK_ARG(!ranks.empty(), "ranks is empty, expected at least one candidate rank");
  const int64_t d = sigma.size(-1);
  for (int64_t r : ranks)
    ATTNPILOT_CHECK_ARG(r >= 1 && r <= d, "candidate rank {} outside [1, {}]", r, d);
  const bool output =
      opts.metric == GuardMetric::kOutputFrobenius || opts.metric == GuardMetric::kOutputRowMax;
  if (output) {
    ATTNPILOT_CHECK_ARG(value_norm_max.defined(),
                        "the output metrics need value_norm_max (max_j ||v_j||), got none");
  }
  const double scale = opts.scale > 0 ? opts.scale : 1.0 / std::sqrt(static_cast<double>(d));
  auto s = sigma.to(torch::kFloat64);
  auto total = s.square().sum(-1).sqrt();
  std::vector<torch::Tensor> cols;
  for (int64_t r : ranks) {
    torch::Tensor b;
    switch (opts.metric) {
      case GuardMetric::kRelativeScoreFrobenius:
        b = torch::where(total > 0, tail_frobenius(s, r) / total.clamp_min(1e-300),
                         torch::zeros_like(total));
        break;
      case GuardMetric::kScoreSpectral:
        b = tail_spectral(s, r);
        break;
      case GuardMetric::kOutputFrobenius:
        b = attention_output_bound(tail_frobenius(s, r), value_norm_max, scale);
        break;
      case GuardMetric::kOutputRowMax:
        b = attention_output_bound(tail_spectral(s, r), value_norm_max, scale);
        break;
    }
    cols.push_back(b);
  }
  return torch::stack(cols, -1);
}

torch::Tensor safe_rank_mask(const torch::Tensor& sigma, const std::vector<int64_t>& ranks,
                             const GuardrailOptions& opts, int64_t step,
                             const torch::Tensor& value_norm_max) {
  const double eps = opts.epsilon.at(step);
  return rank_bounds(sigma, ranks, opts, value_norm_max) <= eps;
}

int64_t BoundAudit::record(const std::string& name, const torch::Tensor& measured,
                           const torch::Tensor& bound) {
  ATTNPILOT_CHECK_ARG(measured.sizes() == bound.sizes(),
                      "{}: measured has shape {} but bound has shape {}", name,
                      c10::str(measured.sizes()), c10::str(bound.sizes()));
  auto m = measured.to(torch::kFloat64).flatten();
  auto b = bound.to(torch::kFloat64).flatten();
  auto bad = (m > b * (1 + rel_tol_) + abs_tol_) | m.isnan() | b.isnan();
  const int64_t n_bad = bad.sum().item<int64_t>();
  checks_ += m.numel();
  violations_ += n_bad;
  auto pos = b > 0;
  if (pos.any().item<bool>()) {
    max_ratio_ =
        std::max(max_ratio_, (m.masked_select(pos) / b.masked_select(pos)).max().item<double>());
  }
  if (n_bad > 0) {
    auto idx = bad.nonzero().flatten();
    const int64_t show = std::min<int64_t>(idx.numel(), 5);
    for (int64_t i = 0; i < show; ++i) {
      const int64_t j = idx[i].item<int64_t>();
      log::warn(fmt::format("bound violated: {} case {} measured {:.6e} > bound {:.6e}", name, j,
                            m[j].item<double>(), b[j].item<double>()));
    }
    if (n_bad > show) log::warn(fmt::format("bound violated: {} ({} more)", name, n_bad - show));
  }
  return n_bad;
}

}  // namespace attnpilot::perturbation
