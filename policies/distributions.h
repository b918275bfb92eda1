#pragma once
/// Categorical distributions over Discrete / MultiDiscrete actions with action masks
/// (Stable-Baselines3's MaskablePPO semantics) and optional ε-exploration.
///
///   logits [B, sum(nvec)] ──split by nvec──► per dimension d: logits_d [B, nvec[d]]
///   masked logits -> -inf before the softmax, so masked actions have probability exactly 0
///   and are never sampled; entropy sums only over allowed actions.
///   ε > 0: p = (1 - ε) softmax(masked logits) + ε uniform(allowed actions) — DR-RL-style
///   exploration restricted to allowed actions, kept on-policy (log_prob is of the mixture).
///
/// log_prob and entropy add over the dimensions. Actions are int64 [B] when nvec has one
/// entry (Discrete), else int64 [B, k].
#include <torch/torch.h>

#include <vector>

namespace attnpilot::policies {

class MaskedCategorical {
 public:
  /// `mask` bool [B, sum(nvec)] or undefined (all allowed); every dimension of every row
  /// must allow at least one action (else InvalidArgument). `epsilon` in [0, 1).
  MaskedCategorical(const torch::Tensor& logits, std::vector<int64_t> nvec,
                    const torch::Tensor& mask = {}, double epsilon = 0.0);
  /// One sample per row, drawn with `gen`.
  torch::Tensor sample(torch::Generator& gen) const;
  /// The most likely allowed action per row (greedy evaluation).
  torch::Tensor mode() const;
  /// Log-probability [B] of `actions`.
  torch::Tensor log_prob(const torch::Tensor& actions) const;
  /// Entropy [B] over allowed actions.
  torch::Tensor entropy() const;
  /// Probabilities [B, sum(nvec)] (0 where masked).
  torch::Tensor probs() const;
  int64_t batch_size() const { return batch_; }

 private:
  std::vector<int64_t> nvec_;
  int64_t batch_;
  std::vector<torch::Tensor> logp_;  ///< per dimension: log-probabilities [B, nvec[d]]
  std::vector<torch::Tensor> mask_;  ///< per dimension: bool [B, nvec[d]] (undefined: all)
};

}  // namespace attnpilot::policies
