#pragma once
/// Learners: PPO (CleanRL's ppo.py details plus MaskablePPO's masking) and REINFORCE with a
/// learned baseline. Both consume a Batch (agent/rollout.h), so collection and update are
/// separate: the local Trainer and the transport learner drive the same update().
#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "agent/rollout.h"
#include "common/config.h"
#include "policies/actor_critic.h"

namespace attnpilot::agent {

/// Hyperparameters (CleanRL names). YAML keys in section `ppo`.
struct PpoConfig {
  std::string algorithm = "ppo";  ///< "ppo" | "reinforce"
  double learning_rate = 2.5e-4;
  bool anneal_lr = true;  ///< linear decay to 0 over total_steps
  int64_t num_envs = 4;
  int64_t num_steps = 128;  ///< steps per env per rollout
  double gamma = 0.99;
  double gae_lambda = 0.95;  ///< REINFORCE uses 1 (Monte Carlo returns)
  int64_t num_minibatches = 4;
  int64_t update_epochs = 4;
  bool norm_adv = true;
  double clip_coef = 0.2;
  bool clip_vloss = true;
  double ent_coef = 0.01;
  double vf_coef = 0.5;
  double max_grad_norm = 0.5;
  double target_kl = 0;  ///< <= 0: no early stop
  double epsilon = 0;    ///< ε-exploration over allowed actions (mixture policy)
  double adam_eps = 1e-5;
  int64_t batch_size() const { return num_envs * num_steps; }
  static PpoConfig from_config(const Config& cfg);
  nlohmann::json to_json() const;
  static PpoConfig from_json(const nlohmann::json& j);
};

/// What one update reports (averaged over the minibatches it ran).
struct UpdateMetrics {
  double policy_loss = 0, value_loss = 0, entropy = 0, approx_kl = 0, old_approx_kl = 0;
  double clipfrac = 0, explained_variance = 0, learning_rate = 0;
  int64_t epochs = 0, minibatches = 0;
  nlohmann::json to_json() const;
};

/// A learner owns the policy's optimiser and turns batches into parameter updates.
class Learner {
 public:
  virtual ~Learner() = default;
  /// One update on `batch`; minibatch order drawn from `gen`.
  virtual UpdateMetrics update(const Batch& batch, torch::Generator& gen) = 0;
  void set_learning_rate(double lr);
  double learning_rate() const;
  policies::ActorCritic& policy() { return *policy_; }
  std::shared_ptr<policies::ActorCritic> policy_ptr() { return policy_; }
  const PpoConfig& config() const { return cfg_; }
  /// Optimiser state to / from `path` (torch serialization).
  void save_optimizer(const std::filesystem::path& path) const;
  void load_optimizer(const std::filesystem::path& path);

 protected:
  Learner(std::shared_ptr<policies::ActorCritic> policy, PpoConfig cfg);
  std::shared_ptr<policies::ActorCritic> policy_;
  PpoConfig cfg_;
  std::unique_ptr<torch::optim::Adam> opt_;
};

/// PPO: clipped surrogate, clipped value loss, entropy over allowed actions, per-minibatch
/// advantage normalisation, update_epochs x num_minibatches, gradient clipping, target-KL
/// early stop (after the epoch in which approx_kl exceeded it, as CleanRL).
class PpoLearner : public Learner {
 public:
  PpoLearner(std::shared_ptr<policies::ActorCritic> policy, PpoConfig cfg);
  UpdateMetrics update(const Batch& batch, torch::Generator& gen) override;
};

/// REINFORCE with a baseline: one gradient step per batch on
///   -mean(log pi(a|s) * (G - V(s))) - ent_coef * H + vf_coef * 0.5 * mean((V(s) - G)^2),
/// G the discounted return (the Trainer uses gae_lambda = 1 for it: Monte Carlo returns,
/// bootstrapped from V only where a rollout cuts an episode).
class ReinforceLearner : public Learner {
 public:
  ReinforceLearner(std::shared_ptr<policies::ActorCritic> policy, PpoConfig cfg);
  UpdateMetrics update(const Batch& batch, torch::Generator& gen) override;
};

/// PpoLearner or ReinforceLearner per cfg.algorithm.
std::unique_ptr<Learner> make_learner(std::shared_ptr<policies::ActorCritic> policy,
                                      const PpoConfig& cfg);

}  // namespace attnpilot::agent
