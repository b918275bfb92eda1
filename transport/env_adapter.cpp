#include "transport/env_adapter.h"

#include "env/registry.h"

namespace attnpilot::transport {

ServedEnv::Out EnvAdapter::reset(uint64_t seed) {
  Out o;
  o.obs = env_->reset(seed);
  if (env_->has_action_mask()) o.action_mask = env_->action_mask();
  return o;
}

ServedEnv::Out EnvAdapter::reset_continue() {
  Out o;
  o.obs = env_->reset();
  if (env_->has_action_mask()) o.action_mask = env_->action_mask();
  return o;
}

ServedEnv::Out EnvAdapter::step(const torch::Tensor& action) {
  const env::StepResult r = env_->step(action);
  Out o;
  o.obs = r.observation;
  o.reward = r.reward;
  o.terminated = r.terminated;
  o.truncated = r.truncated;
  if (env_->has_action_mask()) o.action_mask = env_->action_mask();
  return o;
}

ServedEnvFactory registry_factory(const std::string& name, const Config& cfg) {
  return [name, cfg] { return std::make_unique<EnvAdapter>(env::make_env(name, cfg)); };
}

}  // namespace attnpilot::transport
