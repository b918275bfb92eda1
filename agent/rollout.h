#pragma once
/// Rollout storage and advantage estimation.
///
///   collect T steps from N envs ──► RolloutBuffer [T, N, ...] ──compute_gae──► Batch [T*N, ...]
///
/// Episode boundaries: dones[t, i] = 1 when env i's episode ended at step t (terminated or
/// truncated). Truncated episodes are bootstrapped by the collector, which adds
/// gamma * V(final observation) to that step's reward (Stable-Baselines3's handling), so
/// GAE can treat every end as terminal.
#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace attnpilot::agent {

/// A flattened batch of experience: what a learner's update() consumes. The transport
/// learner builds one from actor chunks; the local Trainer from its RolloutBuffer.
struct Batch {
  torch::Tensor obs;         ///< float32 [M, obs...]
  torch::Tensor actions;     ///< int64 [M] (Discrete) or [M, k] (MultiDiscrete)
  torch::Tensor logprobs;    ///< float32 [M]: log-probability under the behaviour policy
  torch::Tensor advantages;  ///< float32 [M]
  torch::Tensor returns;     ///< float32 [M]: advantages + values (value targets)
  torch::Tensor values;      ///< float32 [M]: behaviour-time value estimates
  torch::Tensor masks;       ///< bool [M, mask] or undefined (no action masks)
  int64_t size() const { return obs.size(0); }
};

/// Preallocated time-major storage for T steps of N envs.
struct RolloutBuffer {
  /// `action_dims` 0 for Discrete (actions [T, N]), k for MultiDiscrete ([T, N, k]);
  /// `mask_size` 0 when the env has no action masks.
  RolloutBuffer(int64_t steps, int64_t envs, const std::vector<int64_t>& obs_shape,
                int64_t action_dims, int64_t mask_size);
  int64_t steps, envs;
  torch::Tensor obs, actions, logprobs, rewards, dones, values, masks;
};

/// Generalised advantage estimation (Schulman et al.; CleanRL's loop):
///   delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
///   A_t     = delta_t + gamma * lambda * (1 - done_t) * A_{t+1}
/// with V_T = next_value. rewards, values, dones: float32 [T, N]; next_value [N].
/// Returns advantages [T, N] (returns = advantages + values).
torch::Tensor compute_gae(const torch::Tensor& rewards, const torch::Tensor& values,
                          const torch::Tensor& dones, const torch::Tensor& next_value, double gamma,
                          double lambda);

/// Flattens a filled buffer into a Batch with advantages from compute_gae.
Batch make_batch(const RolloutBuffer& buf, const torch::Tensor& next_value, double gamma,
                 double lambda);

}  // namespace attnpilot::agent
