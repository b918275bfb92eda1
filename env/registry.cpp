#include "env/registry.h"

#include <map>
#include <mutex>

#include "common/error.h"
#include "env/rank_env.h"
#include "env/toy_envs.h"
#include "env/wrappers.h"

namespace attnpilot::env {
namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, EnvFactory> factories;
};

void add_builtins(std::map<std::string, EnvFactory>& f) {
  f["RankSelection-v0"] = [](const Config& cfg) -> std::unique_ptr<Env> {
    return std::make_unique<EpisodeStatistics>(
        std::make_unique<RankEnv>(RankEnvConfig::from_config(cfg)));
  };
  f["CartPole-v1"] = [](const Config& cfg) -> std::unique_ptr<Env> {
    const auto steps = cfg.get<int64_t>("max_episode_steps", 500);
    return std::make_unique<EpisodeStatistics>(
        std::make_unique<TimeLimit>(std::make_unique<CartPole>(), steps));
  };
  f["MaskedBandit-v0"] = [](const Config& cfg) -> std::unique_ptr<Env> {
    return std::make_unique<EpisodeStatistics>(std::make_unique<MaskedBandit>(
        cfg.get<int64_t>("arms", 10), cfg.get<int64_t>("min_allowed", 2),
        cfg.get<double>("noise", 0.1)));
  };
  f["TokenChoice-v0"] = [](const Config& cfg) -> std::unique_ptr<Env> {
    return std::make_unique<EpisodeStatistics>(std::make_unique<TokenChoice>(
        cfg.get<int64_t>("tokens", 4), cfg.get<int64_t>("choices", 5)));
  };
  f["Chain-v0"] = [](const Config& cfg) -> std::unique_ptr<Env> {
    auto chain = std::make_unique<Chain>(
        cfg.get<int64_t>("length", 8), cfg.get<double>("slip", 0.1),
        cfg.get<double>("step_reward", -1.0), cfg.get<double>("goal_reward", 10.0));
    const auto steps = cfg.get<int64_t>("max_episode_steps", 50);
    return std::make_unique<EpisodeStatistics>(
        std::make_unique<TimeLimit>(std::move(chain), steps));
  };
}

Registry& registry() {
  static Registry* r = [] {
    auto* reg = new Registry;
    add_builtins(reg->factories);
    return reg;
  }();
  return *r;
}

}  // namespace

void register_env(const std::string& name, EnvFactory factory) {
  ATTNPILOT_CHECK_ARG(!name.empty() && factory, "register_env: needs a name and a factory");
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  ATTNPILOT_CHECK_ARG(!r.factories.count(name), "register_env: '{}' is already registered", name);
  r.factories[name] = std::move(factory);
}

std::unique_ptr<Env> make_env(const std::string& name, const Config& cfg) {
  EnvFactory f;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mu);
    auto it = r.factories.find(name);
    if (it == r.factories.end()) {
      std::string known;
      for (const auto& [k, v] : r.factories) known += (known.empty() ? "" : ", ") + k;
      throw InvalidArgument(fmt::format("unknown env '{}'; registered: {}", name, known));
    }
    f = it->second;
  }
  return f(cfg);
}

std::unique_ptr<VectorEnv> make_vector_env(const std::string& name, int64_t num_envs,
                                           const Config& cfg) {
  ATTNPILOT_CHECK_ARG(num_envs > 0, "make_vector_env: num_envs {} must be > 0", num_envs);
  std::vector<std::unique_ptr<Env>> envs;
  for (int64_t i = 0; i < num_envs; ++i) envs.push_back(make_env(name, cfg));
  return std::make_unique<VectorEnv>(std::move(envs));
}

std::vector<std::string> registered_envs() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> out;
  for (const auto& [k, v] : r.factories) out.push_back(k);
  return out;
}

}  // namespace attnpilot::env
