#pragma once
/// N environments stepped as one, with automatic reset (Gymnasium's "next-step" style is
/// NOT used; this is the same-step style of SB3 / EnvPool / CleanRL's RecordEpisodeStatistics):
///
///   actions [N,...] ─► env_i.step(a_i) ─► done_i? ─ yes ─► final_observations[i] = obs,
///                                              │          observations[i] = env_i.reset()
///                                              └ no ──► observations[i] = obs
///
/// so the returned observation of a finished env is already the next episode's first one,
/// the last observation of the finished episode is in final_observations (for bootstrapping
/// truncated episodes), and infos[i] is that env's info from its final step (episode
/// statistics). Env i is seeded seed + i by reset(seed).
#include <torch/torch.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "env/env.h"

namespace attnpilot::env {

/// The result of one batched step.
struct VectorStep {
  torch::Tensor observations;        ///< float32 [N, obs...]: next observations (after auto-reset)
  torch::Tensor rewards;             ///< float32 [N]
  torch::Tensor terminated;          ///< bool [N]
  torch::Tensor truncated;           ///< bool [N]
  torch::Tensor final_observations;  ///< float32 [N, obs...]: rows where done hold the last
                                     ///< observation of the finished episode, others zero
  torch::Tensor action_masks;        ///< bool [N, mask] for `observations`; undefined if no masks
  std::vector<Info> infos;           ///< per env, from this step (before any auto-reset)
};

class VectorEnv {
 public:
  /// Takes ownership of `envs` (at least one; all with equal spaces, else InvalidArgument).
  explicit VectorEnv(std::vector<std::unique_ptr<Env>> envs);
  int64_t num_envs() const { return static_cast<int64_t>(envs_.size()); }
  const Space& observation_space() const { return envs_[0]->observation_space(); }
  const Space& action_space() const { return envs_[0]->action_space(); }
  bool has_action_mask() const { return envs_[0]->has_action_mask(); }
  /// Resets env i with seed + i; returns float32 [N, obs...].
  torch::Tensor reset(uint64_t seed);
  /// Steps every env with actions [N, action...] (int64 for discrete spaces).
  VectorStep step(const torch::Tensor& actions);
  /// bool [N, mask] for the current observations (all true when the envs have no masks).
  torch::Tensor action_masks() const;
  Env& env(int64_t i) { return *envs_.at(i); }
  const Env& env(int64_t i) const { return *envs_.at(i); }
  /// {"envs": [each env's save_state()]}.
  nlohmann::json save_state() const;
  void load_state(const nlohmann::json& state);

 private:
  std::vector<std::unique_ptr<Env>> envs_;
};

}  // namespace attnpilot::env
