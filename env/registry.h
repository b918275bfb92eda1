#pragma once
/// Environments by name. The built-in ones (see env/toy_envs.h) are registered on first use:
///   "CartPole-v1"      CartPole with a 500-step TimeLimit (keys: max_episode_steps)
///   "MaskedBandit-v0"  masked multi-armed bandit (keys: arms, min_allowed, noise)
///   "Chain-v0"         chain MDP with analytic values (keys: length, slip, step_reward,
///                      goal_reward, max_episode_steps)
///   "TokenChoice-v0"   per-token masked MultiDiscrete choice (keys: tokens, choices)
///   "RankSelection-v0" rank selection on a model's attention (env/rank_env.h, keys:
///                      RankEnvConfig)
/// Every env made here is wrapped in EpisodeStatistics (outermost). Each factory reads its
/// keys from the Config; the caller runs check_all_read() so an unknown key is an error.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/config.h"
#include "env/env.h"
#include "env/vector_env.h"

namespace attnpilot::env {

using EnvFactory = std::function<std::unique_ptr<Env>(const Config& cfg)>;

/// Adds `name` (InvalidArgument if taken). Other folders register their envs with this.
void register_env(const std::string& name, EnvFactory factory);
/// Builds `name` with `cfg` (env-specific keys); InvalidArgument lists known names if unknown.
std::unique_ptr<Env> make_env(const std::string& name, const Config& cfg = Config());
/// `num_envs` copies of make_env(name, cfg).
std::unique_ptr<VectorEnv> make_vector_env(const std::string& name, int64_t num_envs,
                                           const Config& cfg = Config());
/// Sorted names of every registered env.
std::vector<std::string> registered_envs();

}  // namespace attnpilot::env
