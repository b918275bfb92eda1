#include "env/wrappers.h"

#include <cmath>

#include "common/error.h"

namespace attnpilot::env {

RunningMeanStd::RunningMeanStd(int64_t size, double epsilon)
    : mean_(size, 0.0), var_(size, 1.0), count_(epsilon) {
  ATTNPILOT_CHECK_ARG(size > 0, "RunningMeanStd: size {} must be > 0", size);
}

void RunningMeanStd::update(const double* x) {
  std::vector<double> m(x, x + mean_.size()), v(mean_.size(), 0.0);
  update_moments(m, v, 1.0);
}

void RunningMeanStd::update_moments(const std::vector<double>& bm, const std::vector<double>& bv,
                                    double n) {
  ATTNPILOT_CHECK_ARG(bm.size() == mean_.size() && bv.size() == mean_.size(),
                      "RunningMeanStd: batch of size {} for statistics of size {}", bm.size(),
                      mean_.size());
  const double tot = count_ + n;
  for (size_t i = 0; i < mean_.size(); ++i) {
    const double delta = bm[i] - mean_[i];
    const double m2 = var_[i] * count_ + bv[i] * n + delta * delta * count_ * n / tot;
    mean_[i] += delta * n / tot;
    var_[i] = m2 / tot;
  }
  count_ = tot;
}

nlohmann::json RunningMeanStd::to_json() const {
  return {{"mean", mean_}, {"var", var_}, {"count", count_}};
}

void RunningMeanStd::from_json(const nlohmann::json& j) {
  try {
    auto m = j.at("mean").get<std::vector<double>>();
    auto v = j.at("var").get<std::vector<double>>();
    if (m.size() != mean_.size() || v.size() != mean_.size())
      throw FormatError(fmt::format("RunningMeanStd state: size {} / {}, expected {}", m.size(),
                                    v.size(), mean_.size()));
    mean_ = m;
    var_ = v;
    count_ = j.at("count").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("RunningMeanStd state: {}", e.what()));
  }
}

// ---------------------------------------------------------------------------------------

EpisodeStatistics::EpisodeStatistics(std::unique_ptr<Env> inner) : Wrapper(std::move(inner)) {}

torch::Tensor EpisodeStatistics::reset(uint64_t seed) {
  episode_return_ = 0;
  episode_length_ = 0;
  return inner_->reset(seed);
}

torch::Tensor EpisodeStatistics::reset() {
  episode_return_ = 0;
  episode_length_ = 0;
  return inner_->reset();
}

StepResult EpisodeStatistics::step(const torch::Tensor& action) {
  StepResult r = inner_->step(action);
  episode_return_ += r.reward;
  episode_length_ += 1;
  if (r.done()) {
    r.info.scalars["episode_return"] = episode_return_;
    r.info.scalars["episode_length"] = static_cast<double>(episode_length_);
  }
  return r;
}

nlohmann::json EpisodeStatistics::save_own_state() const {
  return {{"episode_return", episode_return_}, {"episode_length", episode_length_}};
}

void EpisodeStatistics::load_own_state(const nlohmann::json& s) {
  try {
    episode_return_ = s.at("episode_return").get<double>();
    episode_length_ = s.at("episode_length").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("EpisodeStatistics state: {}", e.what()));
  }
}

// ---------------------------------------------------------------------------------------

TimeLimit::TimeLimit(std::unique_ptr<Env> inner, int64_t max_steps)
    : Wrapper(std::move(inner)), max_steps_(max_steps) {
  ATTNPILOT_CHECK_ARG(max_steps > 0, "TimeLimit: max_steps {} must be > 0", max_steps);
}

torch::Tensor TimeLimit::reset(uint64_t seed) {
  elapsed_ = 0;
  return inner_->reset(seed);
}

torch::Tensor TimeLimit::reset() {
  elapsed_ = 0;
  return inner_->reset();
}

StepResult TimeLimit::step(const torch::Tensor& action) {
  StepResult r = inner_->step(action);
  ++elapsed_;
  if (elapsed_ >= max_steps_ && !r.terminated) {
    r.truncated = true;
    r.info.scalars["time_limit_reached"] = 1.0;
  }
  return r;
}

nlohmann::json TimeLimit::save_own_state() const { return {{"elapsed", elapsed_}}; }

void TimeLimit::load_own_state(const nlohmann::json& s) {
  try {
    elapsed_ = s.at("elapsed").get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("TimeLimit state: {}", e.what()));
  }
}

// ---------------------------------------------------------------------------------------

NormalizeObservation::NormalizeObservation(std::unique_ptr<Env> inner, double clip, double epsilon)
    : Wrapper(std::move(inner)),
      rms_(inner_->observation_space().flat_size()),
      clip_(clip),
      epsilon_(epsilon) {
  ATTNPILOT_CHECK_ARG(inner_->observation_space().kind == SpaceKind::kBox,
                      "NormalizeObservation: needs a Box observation space, got {}",
                      inner_->observation_space().describe());
  ATTNPILOT_CHECK_ARG(clip > 0, "NormalizeObservation: clip {} must be > 0", clip);
  space_ = Space::box(inner_->observation_space().shape, static_cast<float>(-clip),
                      static_cast<float>(clip));
}

torch::Tensor NormalizeObservation::normalize(const torch::Tensor& obs) {
  auto x = obs.to(torch::kFloat64).contiguous();
  if (update_) rms_.update(x.data_ptr<double>());
  auto out = torch::empty(obs.sizes(), torch::kFloat32);
  const double* px = x.data_ptr<double>();
  float* po = out.data_ptr<float>();
  const auto& m = rms_.mean();
  const auto& v = rms_.var();
  for (int64_t i = 0; i < x.numel(); ++i) {
    const double z = (px[i] - m[i]) / std::sqrt(v[i] + epsilon_);
    po[i] = static_cast<float>(std::clamp(z, -clip_, clip_));
  }
  return out;
}

torch::Tensor NormalizeObservation::reset(uint64_t seed) { return normalize(inner_->reset(seed)); }
torch::Tensor NormalizeObservation::reset() { return normalize(inner_->reset()); }

StepResult NormalizeObservation::step(const torch::Tensor& action) {
  StepResult r = inner_->step(action);
  r.observation = normalize(r.observation);
  return r;
}

nlohmann::json NormalizeObservation::save_own_state() const {
  return {{"rms", rms_.to_json()}, {"update", update_}};
}

void NormalizeObservation::load_own_state(const nlohmann::json& s) {
  if (!s.contains("rms")) throw FormatError("NormalizeObservation state: missing 'rms'");
  rms_.from_json(s.at("rms"));
  update_ = s.value("update", true);
}

// ---------------------------------------------------------------------------------------

NormalizeReward::NormalizeReward(std::unique_ptr<Env> inner, double gamma, double epsilon)
    : Wrapper(std::move(inner)), rms_(1), gamma_(gamma), epsilon_(epsilon) {
  ATTNPILOT_CHECK_ARG(gamma >= 0 && gamma <= 1, "NormalizeReward: gamma {} not in [0, 1]", gamma);
}

StepResult NormalizeReward::step(const torch::Tensor& action) {
  StepResult r = inner_->step(action);
  discounted_ = discounted_ * gamma_ * (r.terminated ? 0.0 : 1.0) + r.reward;
  if (update_) rms_.update(&discounted_);
  r.reward = r.reward / std::sqrt(rms_.var()[0] + epsilon_);
  return r;
}

nlohmann::json NormalizeReward::save_own_state() const {
  return {{"rms", rms_.to_json()}, {"discounted", discounted_}, {"update", update_}};
}

void NormalizeReward::load_own_state(const nlohmann::json& s) {
  if (!s.contains("rms") || !s.contains("discounted"))
    throw FormatError("NormalizeReward state: expected 'rms' and 'discounted'");
  rms_.from_json(s.at("rms"));
  discounted_ = s.at("discounted").get<double>();
  update_ = s.value("update", true);
}

}  // namespace attnpilot::env
