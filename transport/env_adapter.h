#pragma once
/// Serves an env::Env (any registered environment) through EnvServer.
#include <memory>
#include <string>

#include "common/config.h"
#include "env/env.h"
#include "transport/env_server.h"

namespace attnpilot::transport {

/// ServedEnv over one env::Env: spaces from Space::to_json, actions checked by the env.
class EnvAdapter : public ServedEnv {
 public:
  explicit EnvAdapter(std::unique_ptr<env::Env> e) : env_(std::move(e)) {}
  nlohmann::json observation_space() const override { return env_->observation_space().to_json(); }
  nlohmann::json action_space() const override { return env_->action_space().to_json(); }
  bool has_action_mask() const override { return env_->has_action_mask(); }
  Out reset(uint64_t seed) override;
  Out reset_continue() override;
  Out step(const torch::Tensor& action) override;

 private:
  std::unique_ptr<env::Env> env_;
};

/// A factory making `name` from the registry (env::make_env) with `cfg`.
ServedEnvFactory registry_factory(const std::string& name, const Config& cfg);

}  // namespace attnpilot::transport
