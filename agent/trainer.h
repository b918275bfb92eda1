#pragma once
/// Local training loop: a VectorEnv, a policy, a Learner, checkpoints and metrics.
///
///   ┌──────────── collect(): num_steps x num_envs ────────────┐
///   │ obs, mask ─► policy ─► MaskedCategorical.sample(gen) ─► VectorEnv.step
///   │ (truncated: reward += gamma * V(final_observation))      │
///   └─► RolloutBuffer ─► make_batch (GAE) ─► Learner::update ─► metrics.jsonl, checkpoint/
///
/// Collection and update are separate public steps (collect(), make_batch(), learner()),
/// so a remote learner can call Learner::update on batches built from actor chunks.
/// Everything random flows from one torch::Generator seeded with `seed` (policy init,
/// sampling, minibatch order) and the envs' own RNGs (env i seeded seed + i); a checkpoint
/// stores all of it, so N steps + checkpoint + resume + N steps equals 2N steps exactly.
///
/// YAML config (every key optional; unknown keys are an error in the caller's
/// check_all_read):
///   env:    {...}                         env-specific keys (env/registry.h)
///   policy: {type, hidden, d_model, heads, layers, ff}
///   ppo:    {algorithm, learning_rate, anneal_lr, num_envs, num_steps, gamma, gae_lambda,
///            num_minibatches, update_epochs, norm_adv, clip_coef, clip_vloss, ent_coef,
///            vf_coef, max_grad_norm, target_kl, epsilon, adam_eps}
///   train:  {normalize_observation, normalize_reward, checkpoint_every}
#include <torch/torch.h>

#include <deque>
#include <filesystem>
#include <functional>
#include <iosfwd>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "agent/learners.h"
#include "agent/rollout.h"
#include "common/config.h"
#include "env/vector_env.h"
#include "policies/actor_critic.h"

namespace attnpilot::agent {

struct TrainerConfig {
  std::string env_name;
  std::string env_yaml = "{}";  ///< the env section, as YAML text
  PpoConfig ppo;
  policies::PolicyConfig policy;
  int64_t total_steps = 100000;
  uint64_t seed = 1;
  bool normalize_observation = false;
  bool normalize_reward = false;
  int64_t checkpoint_every = 0;  ///< updates between checkpoints (0: only at the end)

  /// Reads sections env (validated by building one env), policy, ppo, train of `root`.
  static TrainerConfig from_config(const std::string& env_name, const Config& root,
                                   int64_t total_steps, uint64_t seed);
  nlohmann::json to_json() const;
  static TrainerConfig from_json(const nlohmann::json& j);
};

/// Checkpoint format version (manifest.json "format_version").
inline constexpr int kCheckpointFormatVersion = 1;

class Trainer {
 public:
  /// Builds envs, policy (initialised from the seeded generator) and learner.
  /// `out_dir` empty: no metrics or checkpoints are written.
  Trainer(TrainerConfig cfg, std::filesystem::path out_dir = {});
  /// Rebuilds a Trainer from `checkpoint` (its manifest's config) and restores every state.
  static std::unique_ptr<Trainer> resume(const std::filesystem::path& checkpoint,
                                         std::filesystem::path out_dir = {});

  /// Trains whole updates while global_step + batch <= min(until_step, total_steps)
  /// (until_step < 0: total_steps). Writes metrics and checkpoints when out_dir is set;
  /// `progress` (if not null) receives a progress line. Returns the number of updates run.
  int64_t run(int64_t until_step = -1, std::ostream* progress = nullptr);
  /// Collects one rollout into buffer() with the current policy.
  void collect();
  /// The batch of the last rollout (GAE with the value of the next observation).
  Batch make_batch();
  /// Writes a complete checkpoint to `dir` atomically (staged, then replace_directory).
  void save_checkpoint(const std::filesystem::path& dir) const;
  /// Restores a checkpoint written by save_checkpoint of a compatible config.
  void load_checkpoint(const std::filesystem::path& dir);

  /// Called after every collect() (tests inspect the buffer).
  std::function<void(const RolloutBuffer&)> on_rollout;
  /// Checked after every update; true stops run().
  std::function<bool(const Trainer&)> stop_when;

  const TrainerConfig& config() const { return cfg_; }
  void set_total_steps(int64_t n);
  int64_t global_step() const { return global_step_; }
  int64_t updates() const { return updates_; }
  int64_t episodes() const { return episodes_; }
  /// Mean of the last `last` finished episode returns (NaN when none finished).
  double mean_recent_return(size_t last = 100) const;
  /// Returns of the episodes that finished during the last collect() (actors report these).
  const std::vector<double>& last_rollout_returns() const { return rollout_returns_; }
  /// Adds externally collected episode returns to the recent-return window and the episode
  /// count (the remote learner reports actors' episodes this way).
  void record_episode_returns(const std::vector<double>& returns);
  policies::ActorCritic& policy() { return learner_->policy(); }
  Learner& learner() { return *learner_; }
  env::VectorEnv& envs() { return *envs_; }
  const RolloutBuffer& buffer() const { return *buffer_; }
  torch::Generator& generator() { return gen_; }
  /// Observation-normalisation statistics of env 0 (null JSON when not normalising).
  nlohmann::json observation_statistics() const;

 private:
  std::unique_ptr<env::Env> make_one_env() const;
  void write_metrics(const UpdateMetrics& m, double fps) const;
  TrainerConfig cfg_;
  std::filesystem::path out_dir_;
  torch::Generator gen_;
  std::unique_ptr<env::VectorEnv> envs_;
  std::unique_ptr<Learner> learner_;
  std::unique_ptr<RolloutBuffer> buffer_;
  torch::Tensor next_obs_, next_mask_;
  int64_t global_step_ = 0, updates_ = 0, episodes_ = 0;
  std::deque<double> recent_returns_;
  std::vector<double> rollout_returns_;
};

/// Runs `episodes` episodes of `policy` on a fresh `env_name` env (seeded seed, then
/// continuing its RNG) and returns their undiscounted returns. `greedy`: the most likely
/// allowed action; else sampled with `gen`. `obs_statistics` (from
/// Trainer::observation_statistics) normalises observations as in training (frozen).
std::vector<double> evaluate_policy(policies::ActorCritic& policy, const std::string& env_name,
                                    const Config& env_cfg, int64_t episodes, uint64_t seed,
                                    bool greedy, torch::Generator& gen,
                                    const nlohmann::json& obs_statistics = nullptr);

}  // namespace attnpilot::agent
