#include "policies/distributions.h"

#include <cmath>
#include <limits>

#include "common/error.h"

namespace attnpilot::policies {

MaskedCategorical::MaskedCategorical(const torch::Tensor& logits, std::vector<int64_t> nvec,
                                     const torch::Tensor& mask, double epsilon)
    : nvec_(std::move(nvec)) {
  int64_t total = 0;
  for (auto k : nvec_) {
    ATTNPILOT_CHECK_ARG(k > 0, "MaskedCategorical: nvec entries must be > 0, got {}", k);
    total += k;
  }
  ATTNPILOT_CHECK_ARG(logits.dim() == 2 && logits.size(1) == total,
                      "MaskedCategorical: logits must be [B, {}], got {}", total,
                      c10::str(logits.sizes()));
  ATTNPILOT_CHECK_ARG(epsilon >= 0 && epsilon < 1, "MaskedCategorical: epsilon {} not in [0, 1)",
                      epsilon);
  if (mask.defined())
    ATTNPILOT_CHECK_ARG(mask.scalar_type() == torch::kBool && mask.sizes() == logits.sizes(),
                        "MaskedCategorical: mask must be bool {}, got {} {}",
                        c10::str(logits.sizes()), c10::toString(mask.scalar_type()),
                        c10::str(mask.sizes()));
  batch_ = logits.size(0);
  int64_t off = 0;
  for (auto k : nvec_) {
    auto l = logits.slice(1, off, off + k);
    torch::Tensor m;
    if (mask.defined()) {
      m = mask.slice(1, off, off + k);
      ATTNPILOT_CHECK_ARG(
          m.any(1).all().item<bool>(),
          "MaskedCategorical: a row's mask allows no action in dimension of size {}", k);
      l = l.masked_fill(m.logical_not(), -std::numeric_limits<float>::infinity());
    }
    auto logp = torch::log_softmax(l, 1);
    if (epsilon > 0) {
      auto allowed = m.defined() ? m.to(logits.dtype()) : torch::ones_like(l);
      auto uniform = allowed / allowed.sum(1, true);
      auto p = (1 - epsilon) * logp.exp() + epsilon * uniform;
      if (m.defined()) {
        // log(1) where masked, so the backward pass never divides 0 by 0; then -inf there.
        logp = torch::where(m, p, torch::ones_like(p))
                   .log()
                   .masked_fill(m.logical_not(), -std::numeric_limits<float>::infinity());
      } else {
        logp = p.log();
      }
    }
    logp_.push_back(logp);
    mask_.push_back(m);
    off += k;
  }
}

torch::Tensor MaskedCategorical::sample(torch::Generator& gen) const {
  std::vector<torch::Tensor> cols;
  for (const auto& lp : logp_)
    cols.push_back(torch::multinomial(lp.detach().exp(), 1, false, gen).squeeze(1));
  return nvec_.size() == 1 ? cols[0] : torch::stack(cols, 1);
}

torch::Tensor MaskedCategorical::mode() const {
  std::vector<torch::Tensor> cols;
  for (const auto& lp : logp_) cols.push_back(lp.argmax(1));
  return nvec_.size() == 1 ? cols[0] : torch::stack(cols, 1);
}

torch::Tensor MaskedCategorical::log_prob(const torch::Tensor& actions) const {
  auto a = actions.to(torch::kInt64);
  if (nvec_.size() == 1 && a.dim() == 1) a = a.unsqueeze(1);
  ATTNPILOT_CHECK_ARG(
      a.dim() == 2 && a.size(0) == batch_ && a.size(1) == static_cast<int64_t>(nvec_.size()),
      "log_prob: actions must be [{}, {}], got {}", batch_, nvec_.size(),
      c10::str(actions.sizes()));
  torch::Tensor out;
  for (size_t d = 0; d < nvec_.size(); ++d) {
    auto lp = logp_[d].gather(1, a.select(1, d).unsqueeze(1)).squeeze(1);
    out = d == 0 ? lp : out + lp;
  }
  return out;
}

torch::Tensor MaskedCategorical::entropy() const {
  torch::Tensor out;
  for (size_t d = 0; d < nvec_.size(); ++d) {
    // where() before the product, so masked entries (p = 0, log p = -inf) add 0 and their
    // gradient stays finite.
    auto finite = logp_[d].isfinite();
    auto safe = torch::where(finite, logp_[d], torch::zeros_like(logp_[d]));
    auto h = -(safe.exp() * safe).sum(1);
    out = d == 0 ? h : out + h;
  }
  return out;
}

torch::Tensor MaskedCategorical::probs() const {
  std::vector<torch::Tensor> p;
  for (const auto& lp : logp_) p.push_back(lp.exp());
  return torch::cat(p, 1);
}

}  // namespace attnpilot::policies
