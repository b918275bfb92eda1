#pragma once
/// The environment interface (Gymnasium's contract, in C++):
///
///   obs = env.reset(seed)            seeds the env's own RNG, starts an episode
///   r   = env.step(action)           {observation, reward, terminated, truncated, info}
///   env.action_mask()                bool [mask_size]: allowed actions at the current state
///
/// After terminated or truncated the caller must reset() before stepping again (VectorEnv
/// does that automatically). Observations are float32 tensors of observation_space().shape;
/// actions are tensors of action_space() (int64 scalar for Discrete, int64 [k] for
/// MultiDiscrete, float32 for Box). An action outside the space, or one the current mask
/// forbids, throws InvalidArgument. Every env carries its own seeded RNG (no globals);
/// save_state()/load_state() capture everything dynamic (episode state, RNG, wrapper
/// statistics) so a checkpointed run resumes bit-identically.
#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "env/spaces.h"

namespace attnpilot::env {

/// Per-step side information. Well-known keys:
///   scalars  "episode_return", "episode_length"  (EpisodeStatistics, at the episode's end)
///            "time_limit_reached"                (TimeLimit, 1 when it truncated)
///   tensors  "final_observation"                 (VectorEnv, the last observation of an
///                                                 episode that it auto-reset)
struct Info {
  std::map<std::string, double> scalars;
  std::map<std::string, torch::Tensor> tensors;
  bool has(const std::string& key) const { return scalars.count(key) > 0; }
};

/// What step() returns.
struct StepResult {
  torch::Tensor observation;  ///< float32 [obs shape]
  double reward = 0;
  bool terminated = false;  ///< the MDP reached a terminal state (no bootstrap)
  bool truncated = false;   ///< cut short (time limit): bootstrap from observation
  Info info;
  bool done() const { return terminated || truncated; }
};

/// Abstract environment. Implementations: toy envs in env/toy_envs.h, wrappers in
/// env/wrappers.h, layer environments later. Not thread-safe; one env per thread.
class Env {
 public:
  virtual ~Env() = default;
  /// The registry name (e.g. "CartPole-v1").
  virtual std::string name() const = 0;
  virtual const Space& observation_space() const = 0;
  virtual const Space& action_space() const = 0;
  /// Reseeds this env's RNG with `seed` and starts an episode; returns its first observation.
  virtual torch::Tensor reset(uint64_t seed) = 0;
  /// Starts an episode continuing the current RNG stream (Gymnasium's reset(seed=None)).
  virtual torch::Tensor reset() = 0;
  virtual StepResult step(const torch::Tensor& action) = 0;
  /// Whether action_mask() can forbid actions. Box action spaces never have masks.
  virtual bool has_action_mask() const { return false; }
  /// bool [action_space().mask_size()] of allowed actions now; all true by default.
  virtual torch::Tensor action_mask() const;
  /// Everything dynamic, as JSON (episode state, RNG state, statistics).
  virtual nlohmann::json save_state() const = 0;
  /// Restores save_state()'s output; throws FormatError naming a missing/bad field.
  virtual void load_state(const nlohmann::json& state) = 0;
};

/// Base for wrappers: forwards everything to the inner env.
class Wrapper : public Env {
 public:
  explicit Wrapper(std::unique_ptr<Env> inner);
  std::string name() const override { return inner_->name(); }
  const Space& observation_space() const override { return inner_->observation_space(); }
  const Space& action_space() const override { return inner_->action_space(); }
  torch::Tensor reset(uint64_t seed) override { return inner_->reset(seed); }
  torch::Tensor reset() override { return inner_->reset(); }
  StepResult step(const torch::Tensor& action) override { return inner_->step(action); }
  bool has_action_mask() const override { return inner_->has_action_mask(); }
  torch::Tensor action_mask() const override { return inner_->action_mask(); }
  nlohmann::json save_state() const override;
  void load_state(const nlohmann::json& state) override;
  Env& inner() { return *inner_; }
  const Env& inner() const { return *inner_; }
  /// The innermost env under every wrapper.
  Env& unwrapped();

 protected:
  /// Wrapper-specific state stored next to the inner env's ("inner" key).
  virtual nlohmann::json save_own_state() const { return nlohmann::json::object(); }
  virtual void load_own_state(const nlohmann::json& state) {}
  std::unique_ptr<Env> inner_;
};

}  // namespace attnpilot::env
