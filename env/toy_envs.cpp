#include "env/toy_envs.h"

#include <cmath>
#include <sstream>

#include "common/error.h"

namespace attnpilot::env {

std::string rng_to_string(const std::mt19937_64& rng) {
  std::ostringstream os;
  os << rng;
  return os.str();
}

void rng_from_string(std::mt19937_64& rng, const std::string& s) {
  std::istringstream is(s);
  is >> rng;
  if (is.fail()) throw FormatError("RNG state: not a std::mt19937_64 state string");
}

double uniform(std::mt19937_64& rng, double low, double high) {
  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;
  return low + (high - low) * u;
}

double standard_normal(std::mt19937_64& rng) {
  double u1 = uniform(rng, 0.0, 1.0);
  const double u2 = uniform(rng, 0.0, 1.0);
  if (u1 <= 0) u1 = 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
}

namespace {

int64_t discrete_action(const torch::Tensor& action, const Space& space, const std::string& env) {
  ATTNPILOT_CHECK_ARG(
      action.defined() && action.numel() == 1 &&
          (action.scalar_type() == torch::kInt64 || action.scalar_type() == torch::kInt32),
      "{}: action must be an int64 scalar", env);
  const int64_t a = action.item<int64_t>();
  ATTNPILOT_CHECK_ARG(a >= 0 && a < space.n, "{}: action {} is not in {}", env, a,
                      space.describe());
  return a;
}

template <typename F>
auto with_format_errors(const std::string& what, F&& f) {
  try {
    return f();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{} state: {}", what, e.what()));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------
// CartPole (Gymnasium classic_control/cartpole.py, kinematics_integrator "euler").

namespace {
constexpr double kGravity = 9.8, kMassCart = 1.0, kMassPole = 0.1;
constexpr double kTotalMass = kMassPole + kMassCart, kLength = 0.5;
constexpr double kPoleMassLength = kMassPole * kLength, kForceMag = 10.0, kTau = 0.02;
constexpr double kThetaThreshold = 12 * 2 * M_PI / 360, kXThreshold = 2.4;
}  // namespace

CartPole::CartPole() : rng_(0) {
  auto high = torch::tensor({static_cast<float>(kXThreshold * 2), INFINITY,
                             static_cast<float>(kThetaThreshold * 2), INFINITY});
  obs_space_ = Space::box(-high, high);
  act_space_ = Space::discrete(2);
}

torch::Tensor CartPole::observation() const {
  auto obs = torch::empty({4}, torch::kFloat32);
  float* p = obs.data_ptr<float>();
  for (int i = 0; i < 4; ++i) p[i] = static_cast<float>(state_[i]);
  return obs;
}

torch::Tensor CartPole::reset(uint64_t seed) {
  rng_.seed(seed);
  return reset();
}

torch::Tensor CartPole::reset() {
  for (auto& s : state_) s = uniform(rng_, -0.05, 0.05);
  started_ = true;
  terminated_ = false;
  return observation();
}

void CartPole::set_physical_state(const std::array<double, 4>& s) {
  state_ = s;
  started_ = true;
  terminated_ = false;
}

StepResult CartPole::step(const torch::Tensor& action) {
  return step_discrete(discrete_action(action, act_space_, name()));
}

StepResult CartPole::step_discrete(int64_t action) {
  ATTNPILOT_CHECK_ARG(started_, "CartPole-v1: step() before reset()");
  ATTNPILOT_CHECK_ARG(!terminated_, "CartPole-v1: step() after the episode terminated; reset()");
  ATTNPILOT_CHECK_ARG(action == 0 || action == 1, "CartPole-v1: action {} is not in Discrete(2)",
                      action);
  auto [x, x_dot, theta, theta_dot] = state_;
  const double force = action == 1 ? kForceMag : -kForceMag;
  const double costheta = std::cos(theta);
  const double sintheta = std::sin(theta);
  const double temp = (force + kPoleMassLength * (theta_dot * theta_dot) * sintheta) / kTotalMass;
  const double thetaacc = (kGravity * sintheta - costheta * temp) /
                          (kLength * (4.0 / 3.0 - kMassPole * (costheta * costheta) / kTotalMass));
  const double xacc = temp - kPoleMassLength * thetaacc * costheta / kTotalMass;
  x = x + kTau * x_dot;
  x_dot = x_dot + kTau * xacc;
  theta = theta + kTau * theta_dot;
  theta_dot = theta_dot + kTau * thetaacc;
  state_ = {x, x_dot, theta, theta_dot};
  StepResult r;
  r.terminated =
      x < -kXThreshold || x > kXThreshold || theta < -kThetaThreshold || theta > kThetaThreshold;
  terminated_ = r.terminated;
  r.reward = 1.0;
  r.observation = observation();
  return r;
}

nlohmann::json CartPole::save_state() const {
  return {{"state", state_},
          {"started", started_},
          {"terminated", terminated_},
          {"rng", rng_to_string(rng_)}};
}

void CartPole::load_state(const nlohmann::json& s) {
  with_format_errors("CartPole-v1", [&] {
    state_ = s.at("state").get<std::array<double, 4>>();
    started_ = s.at("started").get<bool>();
    terminated_ = s.at("terminated").get<bool>();
    rng_from_string(rng_, s.at("rng").get<std::string>());
    return 0;
  });
}

// ---------------------------------------------------------------------------------------

MaskedBandit::MaskedBandit(int64_t arms, int64_t min_allowed, double noise)
    : arms_(arms), min_allowed_(min_allowed), noise_(noise), rng_(0) {
  ATTNPILOT_CHECK_ARG(arms >= 2, "MaskedBandit: arms {} must be >= 2", arms);
  ATTNPILOT_CHECK_ARG(min_allowed >= 1 && min_allowed <= arms,
                      "MaskedBandit: min_allowed {} must be in [1, arms={}]", min_allowed, arms);
  ATTNPILOT_CHECK_ARG(noise >= 0, "MaskedBandit: noise {} must be >= 0", noise);
  obs_space_ = Space::box({arms}, 0.0f, 1.0f);
  act_space_ = Space::discrete(arms);
  // Means: linspace(0, 1, arms) in a fixed shuffled order (Fisher-Yates, fixed seed), so the
  // best allowed arm is not simply the highest allowed index.
  means_.resize(arms);
  for (int64_t i = 0; i < arms; ++i) means_[i] = static_cast<double>(i) / (arms - 1);
  std::mt19937_64 perm(20240611);
  for (int64_t i = arms - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(perm() % static_cast<uint64_t>(i + 1));
    std::swap(means_[i], means_[j]);
  }
  allowed_.assign(arms, 1);
}

torch::Tensor MaskedBandit::reset(uint64_t seed) {
  rng_.seed(seed);
  return reset();
}

torch::Tensor MaskedBandit::reset() {
  int64_t count = 0;
  for (auto& a : allowed_) {
    a = (rng_() >> 63) ? 1 : 0;
    count += a;
  }
  // Top up to min_allowed with uniformly chosen masked arms.
  while (count < min_allowed_) {
    const int64_t j = static_cast<int64_t>(rng_() % static_cast<uint64_t>(arms_));
    if (!allowed_[j]) {
      allowed_[j] = 1;
      ++count;
    }
  }
  pending_ = true;
  auto obs = torch::empty({arms_}, torch::kFloat32);
  for (int64_t i = 0; i < arms_; ++i) obs.data_ptr<float>()[i] = allowed_[i];
  return obs;
}

torch::Tensor MaskedBandit::action_mask() const {
  auto m = torch::empty({arms_}, torch::kBool);
  for (int64_t i = 0; i < arms_; ++i) m.data_ptr<bool>()[i] = allowed_[i] != 0;
  return m;
}

int64_t MaskedBandit::best_allowed_arm(const torch::Tensor& mask) const {
  ATTNPILOT_CHECK_ARG(mask.numel() == arms_, "best_allowed_arm: mask has {} entries, expected {}",
                      mask.numel(), arms_);
  auto m = mask.to(torch::kBool).contiguous();
  int64_t best = -1;
  for (int64_t i = 0; i < arms_; ++i)
    if (m.data_ptr<bool>()[i] && (best < 0 || means_[i] > means_[best])) best = i;
  ATTNPILOT_CHECK_ARG(best >= 0, "best_allowed_arm: the mask allows no arm");
  return best;
}

StepResult MaskedBandit::step(const torch::Tensor& action) {
  ATTNPILOT_CHECK_ARG(pending_, "MaskedBandit-v0: step() without an episode; reset()");
  const int64_t a = discrete_action(action, act_space_, name());
  ATTNPILOT_CHECK_ARG(allowed_[a], "MaskedBandit-v0: arm {} is masked in this episode", a);
  StepResult r;
  r.reward = means_[a] + noise_ * standard_normal(rng_);
  r.terminated = true;
  pending_ = false;
  r.observation = torch::zeros({arms_}, torch::kFloat32);
  return r;
}

nlohmann::json MaskedBandit::save_state() const {
  return {{"allowed", allowed_}, {"pending", pending_}, {"rng", rng_to_string(rng_)}};
}

void MaskedBandit::load_state(const nlohmann::json& s) {
  with_format_errors("MaskedBandit-v0", [&] {
    auto a = s.at("allowed").get<std::vector<uint8_t>>();
    if (static_cast<int64_t>(a.size()) != arms_)
      throw FormatError(
          fmt::format("MaskedBandit-v0 state: {} arms, expected {}", a.size(), arms_));
    allowed_ = a;
    pending_ = s.at("pending").get<bool>();
    rng_from_string(rng_, s.at("rng").get<std::string>());
    return 0;
  });
}

// ---------------------------------------------------------------------------------------

Chain::Chain(int64_t length, double slip, double step_reward, double goal_reward)
    : length_(length), slip_(slip), step_reward_(step_reward), goal_reward_(goal_reward), rng_(0) {
  ATTNPILOT_CHECK_ARG(length >= 2, "Chain: length {} must be >= 2", length);
  ATTNPILOT_CHECK_ARG(slip >= 0 && slip < 0.5, "Chain: slip {} must be in [0, 0.5)", slip);
  obs_space_ = Space::box({length}, 0.0f, 1.0f);
  act_space_ = Space::discrete(2);
}

torch::Tensor Chain::reset(uint64_t seed) {
  rng_.seed(seed);
  return reset();
}

torch::Tensor Chain::reset() {
  pos_ = static_cast<int64_t>(rng_() % static_cast<uint64_t>(length_ - 1));
  pending_ = true;
  auto obs = torch::zeros({length_}, torch::kFloat32);
  obs.data_ptr<float>()[pos_] = 1;
  return obs;
}

StepResult Chain::step(const torch::Tensor& action) {
  ATTNPILOT_CHECK_ARG(pending_, "Chain-v0: step() without an episode; reset()");
  int64_t a = discrete_action(action, act_space_, name());
  if (uniform(rng_, 0.0, 1.0) < slip_) a = 1 - a;
  pos_ = a == 1 ? pos_ + 1 : std::max<int64_t>(pos_ - 1, 0);
  StepResult r;
  r.terminated = pos_ == length_ - 1;
  r.reward = r.terminated ? goal_reward_ : step_reward_;
  pending_ = !r.terminated;
  r.observation = torch::zeros({length_}, torch::kFloat32);
  r.observation.data_ptr<float>()[pos_] = 1;
  return r;
}

std::vector<double> Chain::analytic_values(const std::vector<double>& p_right, double gamma) const {
  const int64_t n = length_ - 1;  // non-terminal states
  ATTNPILOT_CHECK_ARG(static_cast<int64_t>(p_right.size()) == n,
                      "analytic_values: p_right has {} entries, expected {}", p_right.size(), n);
  ATTNPILOT_CHECK_ARG(gamma >= 0 && gamma < 1, "analytic_values: gamma {} not in [0, 1)", gamma);
  // (I - gamma P) V = r over non-terminal states; the goal has value 0.
  auto A = torch::eye(n, torch::kFloat64);
  auto b = torch::zeros({n}, torch::kFloat64);
  for (int64_t s = 0; s < n; ++s) {
    const double pr = p_right[s] * (1 - slip_) + (1 - p_right[s]) * slip_;  // moves right
    const int64_t right = s + 1, left = std::max<int64_t>(s - 1, 0);
    const double r_right = right == length_ - 1 ? goal_reward_ : step_reward_;
    b[s] = pr * r_right + (1 - pr) * step_reward_;
    if (right < n) A[s][right] = A[s][right].item<double>() - gamma * pr;
    A[s][left] = A[s][left].item<double>() - gamma * (1 - pr);
  }
  auto v = torch::linalg_solve(A, b);
  std::vector<double> out(length_, 0.0);
  for (int64_t s = 0; s < n; ++s) out[s] = v[s].item<double>();
  return out;
}

nlohmann::json Chain::save_state() const {
  return {{"pos", pos_}, {"pending", pending_}, {"rng", rng_to_string(rng_)}};
}

void Chain::load_state(const nlohmann::json& s) {
  with_format_errors("Chain-v0", [&] {
    pos_ = s.at("pos").get<int64_t>();
    pending_ = s.at("pending").get<bool>();
    rng_from_string(rng_, s.at("rng").get<std::string>());
    return 0;
  });
}

// ---------------------------------------------------------------------------------------

TokenChoice::TokenChoice(int64_t tokens, int64_t choices)
    : tokens_(tokens), choices_(choices), target_(tokens, 0.0), rng_(0) {
  ATTNPILOT_CHECK_ARG(tokens >= 2, "TokenChoice: tokens {} must be >= 2", tokens);
  ATTNPILOT_CHECK_ARG(choices >= 2, "TokenChoice: choices {} must be >= 2", choices);
  obs_space_ = Space::box({tokens, 2}, 0.0f, 1.0f);
  act_space_ = Space::multi_discrete(std::vector<int64_t>(tokens, choices));
}

torch::Tensor TokenChoice::reset(uint64_t seed) {
  rng_.seed(seed);
  return reset();
}

torch::Tensor TokenChoice::reset() {
  auto obs = torch::empty({tokens_, 2}, torch::kFloat32);
  float* p = obs.data_ptr<float>();
  for (int64_t t = 0; t < tokens_; ++t) {
    // Rounded to float so the observation carries the target exactly.
    target_[t] = static_cast<float>(uniform(rng_, 0.0, 1.0));
    p[2 * t] = static_cast<float>(target_[t]);
    p[2 * t + 1] = static_cast<float>(static_cast<double>(t) / (tokens_ - 1));
  }
  pending_ = true;
  return obs;
}

torch::Tensor TokenChoice::action_mask() const {
  auto m = torch::empty({tokens_ * choices_}, torch::kBool);
  for (int64_t t = 0; t < tokens_; ++t)
    for (int64_t k = 0; k < choices_; ++k) m.data_ptr<bool>()[t * choices_ + k] = allowed(t, k);
  return m;
}

double TokenChoice::oracle_reward() const {
  double sum = 0;
  for (int64_t t = 0; t < tokens_; ++t) {
    double best = -1;
    for (int64_t k = 0; k < choices_; ++k)
      if (allowed(t, k)) best = std::max(best, 1.0 - std::abs(level(k) - target_[t]));
    sum += best;
  }
  return sum / tokens_;
}

StepResult TokenChoice::step(const torch::Tensor& action) {
  ATTNPILOT_CHECK_ARG(pending_, "TokenChoice-v0: step() without an episode; reset()");
  act_space_.check(action, "TokenChoice-v0: action");
  const auto ac = action.contiguous();
  const int64_t* a = ac.data_ptr<int64_t>();
  double sum = 0;
  for (int64_t t = 0; t < tokens_; ++t) {
    ATTNPILOT_CHECK_ARG(allowed(t, a[t]), "TokenChoice-v0: choice {} of token {} is masked", a[t],
                        t);
    sum += 1.0 - std::abs(level(a[t]) - target_[t]);
  }
  StepResult r;
  r.reward = sum / tokens_;
  r.terminated = true;
  pending_ = false;
  r.observation = torch::zeros({tokens_, 2}, torch::kFloat32);
  return r;
}

nlohmann::json TokenChoice::save_state() const {
  return {{"target", target_}, {"pending", pending_}, {"rng", rng_to_string(rng_)}};
}

void TokenChoice::load_state(const nlohmann::json& s) {
  with_format_errors("TokenChoice-v0", [&] {
    auto t = s.at("target").get<std::vector<double>>();
    if (static_cast<int64_t>(t.size()) != tokens_)
      throw FormatError(
          fmt::format("TokenChoice-v0 state: {} tokens, expected {}", t.size(), tokens_));
    target_ = t;
    pending_ = s.at("pending").get<bool>();
    rng_from_string(rng_, s.at("rng").get<std::string>());
    return 0;
  });
}

}  // namespace attnpilot::env
