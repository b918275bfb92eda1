#include "env/env.h"

#include <cstring>

#include "common/error.h"
#include "env/vector_env.h"

namespace attnpilot::env {

torch::Tensor Env::action_mask() const {
  return torch::ones({action_space().mask_size()}, torch::kBool);
}

Wrapper::Wrapper(std::unique_ptr<Env> inner) : inner_(std::move(inner)) {
  ATTNPILOT_CHECK_ARG(inner_ != nullptr, "Wrapper: inner env must not be null");
}

nlohmann::json Wrapper::save_state() const {
  return {{"inner", inner_->save_state()}, {"own", save_own_state()}};
}

void Wrapper::load_state(const nlohmann::json& state) {
  if (!state.contains("inner") || !state.contains("own"))
    throw FormatError(fmt::format("{} wrapper state: expected keys 'inner' and 'own'", name()));
  inner_->load_state(state.at("inner"));
  load_own_state(state.at("own"));
}

Env& Wrapper::unwrapped() {
  Env* e = inner_.get();
  while (auto* w = dynamic_cast<Wrapper*>(e)) e = &w->inner();
  return *e;
}

// ---------------------------------------------------------------------------------------

namespace {
void copy_row(torch::Tensor& batch, int64_t i, const torch::Tensor& obs) {
  auto src = obs.to(torch::kFloat32).contiguous();
  const int64_t row = batch.numel() / batch.size(0);
  ATTNPILOT_CHECK_ARG(src.numel() == row, "VectorEnv: env {} returned {} values, expected {}", i,
                      src.numel(), row);
  std::memcpy(batch.data_ptr<float>() + i * row, src.data_ptr<float>(), row * sizeof(float));
}
}  // namespace

VectorEnv::VectorEnv(std::vector<std::unique_ptr<Env>> envs) : envs_(std::move(envs)) {
  ATTNPILOT_CHECK_ARG(!envs_.empty(), "VectorEnv: needs at least one env");
  for (size_t i = 1; i < envs_.size(); ++i) {
    ATTNPILOT_CHECK_ARG(
        envs_[i]->observation_space() == envs_[0]->observation_space() &&
            envs_[i]->action_space() == envs_[0]->action_space(),
        "VectorEnv: env {} spaces {} / {} differ from env 0's {} / {}", i,
        envs_[i]->observation_space().describe(), envs_[i]->action_space().describe(),
        envs_[0]->observation_space().describe(), envs_[0]->action_space().describe());
  }
}

torch::Tensor VectorEnv::reset(uint64_t seed) {
  std::vector<int64_t> shape{num_envs()};
  for (auto d : observation_space().shape) shape.push_back(d);
  auto obs = torch::empty(shape, torch::kFloat32);
  for (int64_t i = 0; i < num_envs(); ++i) copy_row(obs, i, envs_[i]->reset(seed + i));
  return obs;
}

VectorStep VectorEnv::step(const torch::Tensor& actions) {
  const int64_t n = num_envs();
  ATTNPILOT_CHECK_ARG(actions.defined() && actions.dim() >= 1 && actions.size(0) == n,
                      "VectorEnv::step: actions must have leading dimension {} (num_envs)", n);
  std::vector<int64_t> shape{n};
  for (auto d : observation_space().shape) shape.push_back(d);
  VectorStep out;
  out.observations = torch::empty(shape, torch::kFloat32);
  out.final_observations = torch::zeros(shape, torch::kFloat32);
  out.rewards = torch::empty({n}, torch::kFloat32);
  out.terminated = torch::empty({n}, torch::kBool);
  out.truncated = torch::empty({n}, torch::kBool);
  out.infos.resize(n);
  auto acts = actions.to(torch::kCPU).to(action_space().dtype()).contiguous();
  float* rew = out.rewards.data_ptr<float>();
  bool* term = out.terminated.data_ptr<bool>();
  bool* trunc = out.truncated.data_ptr<bool>();
  for (int64_t i = 0; i < n; ++i) {
    StepResult r = envs_[i]->step(acts[i]);
    rew[i] = static_cast<float>(r.reward);
    term[i] = r.terminated;
    trunc[i] = r.truncated;
    if (r.done()) {
      copy_row(out.final_observations, i, r.observation);
      r.info.tensors["final_observation"] = r.observation;
      copy_row(out.observations, i, envs_[i]->reset());
    } else {
      copy_row(out.observations, i, r.observation);
    }
    out.infos[i] = std::move(r.info);
  }
  if (has_action_mask()) out.action_masks = action_masks();
  return out;
}

torch::Tensor VectorEnv::action_masks() const {
  const int64_t n = num_envs();
  if (action_space().kind == SpaceKind::kBox) return {};
  const int64_t m = action_space().mask_size();
  auto masks = torch::empty({n, m}, torch::kBool);
  for (int64_t i = 0; i < n; ++i) {
    auto mi = envs_[i]->action_mask().to(torch::kBool).contiguous();
    ATTNPILOT_CHECK_ARG(mi.numel() == m, "VectorEnv: env {} mask has {} entries, expected {}", i,
                        mi.numel(), m);
    std::memcpy(masks.data_ptr<bool>() + i * m, mi.data_ptr<bool>(), m * sizeof(bool));
  }
  return masks;
}

nlohmann::json VectorEnv::save_state() const {
  nlohmann::json envs = nlohmann::json::array();
  for (const auto& e : envs_) envs.push_back(e->save_state());
  return {{"envs", envs}};
}

void VectorEnv::load_state(const nlohmann::json& state) {
  if (!state.contains("envs") || !state.at("envs").is_array() ||
      state.at("envs").size() != envs_.size())
    throw FormatError(
        fmt::format("VectorEnv state: expected 'envs' with {} entries", envs_.size()));
  for (size_t i = 0; i < envs_.size(); ++i) envs_[i]->load_state(state.at("envs")[i]);
}

}  // namespace attnpilot::env
