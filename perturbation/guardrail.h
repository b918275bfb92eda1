#pragma once
/// The guardrail: turns perturbation bounds into a mask of safe ranks per head, and audits
/// measured errors against their bounds.
///
///   sigma [..., d] ──► bound(r) for each candidate r ──► bound(r) ≤ ε(step) ──► mask [..., R]
///
/// Because the tail energy is an equality (Eckart–Young–Mirsky) and the output bound is a
/// proven upper bound (bounds.h), a rank marked safe never exceeds ε in the bounded quantity.
/// The full rank d has zero tail, so it is safe whenever it is a candidate.
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <vector>

namespace attnpilot::perturbation {

/// Which bounded quantity ε limits.
enum class GuardMetric {
  kRelativeScoreFrobenius,  ///< ‖S − S_r‖_F / ‖S‖_F = sqrt(Σ_{i>r}σ²/Σσ²)
  kScoreSpectral,           ///< ‖S − S_r‖₂ = σ_{r+1} (absolute, score units)
  kOutputFrobenius,         ///< attention_output_bound(tail_frobenius, max‖v‖, scale)
  kOutputRowMax,            ///< attention_output_bound(tail_spectral, max‖v‖, scale)
};

/// ε as a function of the step: constant (start == end or steps == 0) or linear from start
/// to end over `steps` steps, then held at end.
struct EpsilonSchedule {
  double start = 0.05;
  double end = 0.05;
  int64_t steps = 0;
  /// ε at `step` (>= 0).
  double at(int64_t step) const;
};

struct GuardrailOptions {
  GuardMetric metric = GuardMetric::kRelativeScoreFrobenius;
  EpsilonSchedule epsilon;
  double scale = 0;  ///< softmax score scale for the output metrics; 0 = 1/√d
};

/// mask[..., j] = bound(ranks[j]) ≤ ε(step). sigma [..., d] descending singular values of the
/// scores; value_norm_max [...] (max_j ‖v_j‖₂) is required for the output metrics and ignored
/// otherwise. Ranks must lie in [1, d]. Returns a bool tensor [..., ranks.size()].
torch::Tensor safe_rank_mask(const torch::Tensor& sigma, const std::vector<int64_t>& ranks,
                             const GuardrailOptions& opts, int64_t step = 0,
                             const torch::Tensor& value_norm_max = {});

/// The bound values behind safe_rank_mask, float64 [..., ranks.size()].
torch::Tensor rank_bounds(const torch::Tensor& sigma, const std::vector<int64_t>& ranks,
                          const GuardrailOptions& opts, const torch::Tensor& value_norm_max = {});

/// Counts measured-vs-bound checks and logs (common/log.h, warn) every violation:
/// measured > bound·(1 + rel_tol) + abs_tol.
class BoundAudit {
 public:
  explicit BoundAudit(double rel_tol = 1e-9, double abs_tol = 0)
      : rel_tol_(rel_tol), abs_tol_(abs_tol) {}
  /// Records elementwise measured vs bound (same shape); returns violations in this call.
  int64_t record(const std::string& name, const torch::Tensor& measured,
                 const torch::Tensor& bound);
  int64_t checks() const { return checks_; }
  int64_t violations() const { return violations_; }
  /// Largest measured/bound ratio seen (how tight the bound got), 0 before any check.
  double max_ratio() const { return max_ratio_; }

 private:
  double rel_tol_, abs_tol_;
  int64_t checks_ = 0, violations_ = 0;
  double max_ratio_ = 0;
};

}  // namespace attnpilot::perturbation
