#pragma once
/// Wrappers (Gymnasium's): EpisodeStatistics, TimeLimit, NormalizeObservation,
/// NormalizeReward, plus RunningMeanStd, the shared running-moment estimator.
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "env/env.h"

namespace attnpilot::env {

/// Running mean and variance (Chan et al. parallel update), as Gymnasium's RunningMeanStd:
/// starts at mean 0, var 1, count `epsilon`.
class RunningMeanStd {
 public:
  explicit RunningMeanStd(int64_t size = 1, double epsilon = 1e-4);
  /// Adds one sample of `size` values.
  void update(const double* x);
  /// Adds a batch: mean, (population) variance and count of `n` samples.
  void update_moments(const std::vector<double>& batch_mean, const std::vector<double>& batch_var,
                      double n);
  const std::vector<double>& mean() const { return mean_; }
  const std::vector<double>& var() const { return var_; }
  double count() const { return count_; }
  nlohmann::json to_json() const;
  void from_json(const nlohmann::json& j);

 private:
  std::vector<double> mean_, var_;
  double count_;
};

/// Adds info scalars "episode_return" and "episode_length" on the step that ends an episode.
class EpisodeStatistics : public Wrapper {
 public:
  explicit EpisodeStatistics(std::unique_ptr<Env> inner);
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;

 protected:
  nlohmann::json save_own_state() const override;
  void load_own_state(const nlohmann::json& s) override;

 private:
  double episode_return_ = 0;
  int64_t episode_length_ = 0;
};

/// Truncates an episode after `max_steps` steps (truncated = true unless it terminated on
/// the same step; info "time_limit_reached" = 1 when it truncated).
class TimeLimit : public Wrapper {
 public:
  TimeLimit(std::unique_ptr<Env> inner, int64_t max_steps);
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  int64_t max_steps() const { return max_steps_; }

 protected:
  nlohmann::json save_own_state() const override;
  void load_own_state(const nlohmann::json& s) override;

 private:
  int64_t max_steps_, elapsed_ = 0;
};

/// Observations become (obs - mean) / sqrt(var + eps), clipped to [-clip, clip], with the
/// running statistics updated from every observation while update() is on (turn it off for
/// evaluation). The observation space becomes Box(-clip, clip) of the same shape.
class NormalizeObservation : public Wrapper {
 public:
  NormalizeObservation(std::unique_ptr<Env> inner, double clip = 10.0, double epsilon = 1e-8);
  const Space& observation_space() const override { return space_; }
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  void set_update(bool on) { update_ = on; }
  const RunningMeanStd& statistics() const { return rms_; }

 protected:
  nlohmann::json save_own_state() const override;
  void load_own_state(const nlohmann::json& s) override;

 private:
  torch::Tensor normalize(const torch::Tensor& obs);
  Space space_;
  RunningMeanStd rms_;
  double clip_, epsilon_;
  bool update_ = true;
};

/// Rewards are divided by the running standard deviation of the discounted return
/// (Gymnasium's NormalizeReward): G <- G * gamma * (1 - terminated) + r; r / sqrt(var(G) + eps).
class NormalizeReward : public Wrapper {
 public:
  NormalizeReward(std::unique_ptr<Env> inner, double gamma = 0.99, double epsilon = 1e-8);
  StepResult step(const torch::Tensor& action) override;
  void set_update(bool on) { update_ = on; }
  const RunningMeanStd& statistics() const { return rms_; }

 protected:
  nlohmann::json save_own_state() const override;
  void load_own_state(const nlohmann::json& s) override;

 private:
  RunningMeanStd rms_;
  double gamma_, epsilon_, discounted_ = 0;
  bool update_ = true;
};

}  // namespace attnpilot::env
