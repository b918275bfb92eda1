#pragma once
/// Toy environments with known answers, for testing the learners.
#include <array>
#include <cstdint>
#include <random>
#include <vector>

#include "env/env.h"

namespace attnpilot::env {

/// Serialises / restores a std::mt19937_64 (its full state, as text).
std::string rng_to_string(const std::mt19937_64& rng);
void rng_from_string(std::mt19937_64& rng, const std::string& s);
/// Uniform double in [low, high) from 53 random bits (identical on every platform).
double uniform(std::mt19937_64& rng, double low, double high);
/// Standard normal (Box-Muller, one draw per call; platform independent).
double standard_normal(std::mt19937_64& rng);

/// CartPole with Gymnasium CartPole-v1's dynamics (explicit Euler, tau 0.02, force 10,
/// gravity 9.8, cart 1.0, pole 0.1, half-length 0.5; terminates at |x| > 2.4 or
/// |theta| > 12 degrees; reward 1 per step). Reset draws the state uniform(-0.05, 0.05)
/// from this env's own RNG. State in double, observations float32 [4]. No time limit:
/// the registry adds TimeLimit(500).
class CartPole : public Env {
 public:
  CartPole();
  std::string name() const override { return "CartPole-v1"; }
  const Space& observation_space() const override { return obs_space_; }
  const Space& action_space() const override { return act_space_; }
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  nlohmann::json save_state() const override;
  void load_state(const nlohmann::json& s) override;
  /// Sets the physical state (x, x_dot, theta, theta_dot), as `env.unwrapped.state = ...`.
  void set_physical_state(const std::array<double, 4>& s);
  const std::array<double, 4>& physical_state() const { return state_; }
  /// One step on raw values (no tensors); used by step() and fast paths.
  StepResult step_discrete(int64_t action);

 private:
  torch::Tensor observation() const;
  Space obs_space_, act_space_;
  std::array<double, 4> state_{};
  bool started_ = false, terminated_ = false;
  std::mt19937_64 rng_;
};

/// Masked multi-armed bandit: `arms` arms with fixed means (a fixed permutation of
/// linspace(0, 1, arms)); each episode (one step) allows a random subset of at least
/// `min_allowed` arms (each allowed with probability 1/2). Observation: the mask as
/// float32 [arms]. Reward: mean of the pulled arm + noise * N(0, 1). Pulling a masked arm
/// throws InvalidArgument.
class MaskedBandit : public Env {
 public:
  MaskedBandit(int64_t arms = 10, int64_t min_allowed = 2, double noise = 0.1);
  std::string name() const override { return "MaskedBandit-v0"; }
  const Space& observation_space() const override { return obs_space_; }
  const Space& action_space() const override { return act_space_; }
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  bool has_action_mask() const override { return true; }
  torch::Tensor action_mask() const override;
  nlohmann::json save_state() const override;
  void load_state(const nlohmann::json& s) override;
  const std::vector<double>& means() const { return means_; }
  /// The allowed arm with the highest mean under `mask` (bool [arms]).
  int64_t best_allowed_arm(const torch::Tensor& mask) const;

 private:
  Space obs_space_, act_space_;
  int64_t arms_, min_allowed_;
  double noise_;
  std::vector<double> means_;
  std::vector<uint8_t> allowed_;
  bool pending_ = false;
  std::mt19937_64 rng_;
};

/// Chain MDP: states 0..length-1, state length-1 is the terminal goal. Reset starts
/// uniformly in 0..length-2. Action 0 moves left (clamped at 0), 1 moves right; with
/// probability `slip` the other move happens. Reward `goal_reward` on reaching the goal,
/// `step_reward` otherwise. Observation: one-hot float32 [length].
class Chain : public Env {
 public:
  Chain(int64_t length = 8, double slip = 0.1, double step_reward = -1.0,
        double goal_reward = 10.0);
  std::string name() const override { return "Chain-v0"; }
  const Space& observation_space() const override { return obs_space_; }
  const Space& action_space() const override { return act_space_; }
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  nlohmann::json save_state() const override;
  void load_state(const nlohmann::json& s) override;
  int64_t length() const { return length_; }
  /// Exact state values V^pi(s) of the policy that moves right with probability
  /// p_right[s] (s in 0..length-2), discount gamma, infinite horizon; V(goal) = 0.
  /// Solved as the linear system (I - gamma P) V = r in double precision.
  std::vector<double> analytic_values(const std::vector<double>& p_right, double gamma) const;

 private:
  Space obs_space_, act_space_;
  int64_t length_, pos_ = 0;
  double slip_, step_reward_, goal_reward_;
  bool pending_ = false;
  std::mt19937_64 rng_;
};

/// Per-token choice with masks, the shape of the layer environments (one token per layer or
/// head, one choice per token): each episode (one step) draws a target d_t ~ U(0, 1) per
/// token t. Observation float32 [tokens, 2]: (d_t, t / (tokens - 1)). Action MultiDiscrete
/// [choices] * tokens. Choice k stands for level k / (choices - 1); levels below d_t - 0.5
/// are masked (a guardrail). Reward: mean over tokens of 1 - |level(k_t) - d_t|, so the
/// best allowed choice is the level nearest d_t and oracle_reward() is known per episode.
class TokenChoice : public Env {
 public:
  TokenChoice(int64_t tokens = 4, int64_t choices = 5);
  std::string name() const override { return "TokenChoice-v0"; }
  const Space& observation_space() const override { return obs_space_; }
  const Space& action_space() const override { return act_space_; }
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  bool has_action_mask() const override { return true; }
  torch::Tensor action_mask() const override;
  nlohmann::json save_state() const override;
  void load_state(const nlohmann::json& s) override;
  /// The best achievable reward of the current episode (nearest allowed level per token).
  double oracle_reward() const;

 private:
  double level(int64_t k) const { return static_cast<double>(k) / (choices_ - 1); }
  bool allowed(int64_t t, int64_t k) const { return level(k) >= target_[t] - 0.5; }
  Space obs_space_, act_space_;
  int64_t tokens_, choices_;
  std::vector<double> target_;
  bool pending_ = false;
  std::mt19937_64 rng_;
};

}  // namespace attnpilot::env
