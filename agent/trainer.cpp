#include "agent/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <iostream>
#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/log.h"
#include "common/progress.h"
#include "env/registry.h"
#include "env/wrappers.h"

namespace attnpilot::agent {

namespace fs = std::filesystem;

TrainerConfig TrainerConfig::from_config(const std::string& env_name, const Config& root,
                                         int64_t total_steps, uint64_t seed) {
  TrainerConfig c;
  c.env_name = env_name;
  const Config env_section = root.section("env");
  env::make_env(env_name, env_section);  // validates the name and reads the env's keys
  c.env_yaml = env_section.dump();
  c.policy = policies::PolicyConfig::from_config(root.section("policy"));
  c.ppo = PpoConfig::from_config(root.section("ppo"));
  const Config t = root.section("train");
  c.normalize_observation = t.get<bool>("normalize_observation", false);
  c.normalize_reward = t.get<bool>("normalize_reward", false);
  c.checkpoint_every = t.get<int64_t>("checkpoint_every", 0);
  ATTNPILOT_CHECK_ARG(c.checkpoint_every >= 0, "train.checkpoint_every {} must be >= 0",
                      c.checkpoint_every);
  c.total_steps = total_steps;
  c.seed = seed;
  ATTNPILOT_CHECK_ARG(total_steps >= c.ppo.batch_size(),
                      "total steps {} must be at least one batch (num_envs x num_steps = {})",
                      total_steps, c.ppo.batch_size());
  return c;
}

nlohmann::json TrainerConfig::to_json() const {
  return {{"env_name", env_name},
          {"env_yaml", env_yaml},
          {"ppo", ppo.to_json()},
          {"policy", policy.to_json()},
          {"total_steps", total_steps},
          {"seed", seed},
          {"normalize_observation", normalize_observation},
          {"normalize_reward", normalize_reward},
          {"checkpoint_every", checkpoint_every}};
}

TrainerConfig TrainerConfig::from_json(const nlohmann::json& j) {
  try {
    TrainerConfig c;
    c.env_name = j.at("env_name").get<std::string>();
    c.env_yaml = j.at("env_yaml").get<std::string>();
    c.ppo = PpoConfig::from_json(j.at("ppo"));
    c.policy = policies::PolicyConfig::from_json(j.at("policy"));
    c.total_steps = j.at("total_steps").get<int64_t>();
    c.seed = j.at("seed").get<uint64_t>();
    c.normalize_observation = j.at("normalize_observation").get<bool>();
    c.normalize_reward = j.at("normalize_reward").get<bool>();
    c.checkpoint_every = j.at("checkpoint_every").get<int64_t>();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("trainer config JSON: {}", e.what()));
  }
}

// ---------------------------------------------------------------------------------------

std::unique_ptr<env::Env> Trainer::make_one_env() const {
  auto e = env::make_env(cfg_.env_name, Config::parse(cfg_.env_yaml, "env"));
  if (cfg_.normalize_observation) e = std::make_unique<env::NormalizeObservation>(std::move(e));
  if (cfg_.normalize_reward)
    e = std::make_unique<env::NormalizeReward>(std::move(e), cfg_.ppo.gamma);
  return e;
}

Trainer::Trainer(TrainerConfig cfg, fs::path out_dir)
    : cfg_(std::move(cfg)),
      out_dir_(std::move(out_dir)),
      gen_(at::detail::createCPUGenerator(cfg_.seed)) {
  ATTNPILOT_CHECK_ARG(cfg_.total_steps >= cfg_.ppo.batch_size(),
                      "total steps {} must be at least one batch ({})", cfg_.total_steps,
                      cfg_.ppo.batch_size());
  std::vector<std::unique_ptr<env::Env>> envs;
  for (int64_t i = 0; i < cfg_.ppo.num_envs; ++i) envs.push_back(make_one_env());
  envs_ = std::make_unique<env::VectorEnv>(std::move(envs));
  auto policy =
      policies::make_policy(cfg_.policy, envs_->observation_space(), envs_->action_space(), gen_);
  learner_ = make_learner(policy, cfg_.ppo);
  const auto& a = envs_->action_space();
  buffer_ = std::make_unique<RolloutBuffer>(
      cfg_.ppo.num_steps, cfg_.ppo.num_envs, envs_->observation_space().shape,
      a.kind == env::SpaceKind::kMultiDiscrete ? static_cast<int64_t>(a.nvec.size()) : 0,
      envs_->has_action_mask() ? a.mask_size() : 0);
  next_obs_ = envs_->reset(cfg_.seed);
  if (envs_->has_action_mask()) next_mask_ = envs_->action_masks();
  if (!out_dir_.empty()) fs::create_directories(out_dir_);
}

void Trainer::set_total_steps(int64_t n) {
  ATTNPILOT_CHECK_ARG(n >= cfg_.ppo.batch_size(), "total steps {} must be at least one batch ({})",
                      n, cfg_.ppo.batch_size());
  cfg_.total_steps = n;
}

double Trainer::mean_recent_return(size_t last) const {
  if (recent_returns_.empty()) return std::nan("");
  const size_t n = std::min(last, recent_returns_.size());
  double s = 0;
  for (size_t i = recent_returns_.size() - n; i < recent_returns_.size(); ++i)
    s += recent_returns_[i];
  return s / n;
}

void Trainer::record_episode_returns(const std::vector<double>& returns) {
  for (double r : returns) {
    recent_returns_.push_back(r);
    if (recent_returns_.size() > 100) recent_returns_.pop_front();
    ++episodes_;
  }
}

void Trainer::collect() {
  torch::NoGradGuard no_grad;
  rollout_returns_.clear();
  auto& policy = learner_->policy();
  RolloutBuffer& b = *buffer_;
  for (int64_t t = 0; t < b.steps; ++t) {
    b.obs[t].copy_(next_obs_);
    if (b.masks.defined()) b.masks[t].copy_(next_mask_);
    auto out = policy.forward(next_obs_);
    auto dist = policy.distribution(out, next_mask_, cfg_.ppo.epsilon);
    auto action = dist.sample(gen_);
    b.actions[t].copy_(action);
    b.logprobs[t].copy_(dist.log_prob(action));
    b.values[t].copy_(out.value);
    env::VectorStep s = envs_->step(action);
    auto rewards = s.rewards;
    if (s.truncated.any().item<bool>()) {
      // Bootstrap time-limit truncations: r += gamma * V(final observation).
      auto idx = s.truncated.nonzero().squeeze(1);
      auto v = policy.value(s.final_observations.index_select(0, idx));
      rewards.index_add_(0, idx, cfg_.ppo.gamma * v);
    }
    b.rewards[t].copy_(rewards);
    b.dones[t].copy_((s.terminated | s.truncated).to(torch::kFloat32));
    for (const auto& info : s.infos) {
      auto it = info.scalars.find("episode_return");
      if (it == info.scalars.end()) continue;
      rollout_returns_.push_back(it->second);
      record_episode_returns({it->second});
    }
    next_obs_ = s.observations;
    next_mask_ = s.action_masks;
    global_step_ += b.envs;
  }
  if (on_rollout) on_rollout(b);
}

Batch Trainer::make_batch() {
  torch::Tensor next_value;
  {
    torch::NoGradGuard no_grad;
    next_value = learner_->policy().value(next_obs_);
  }
  const double lambda = cfg_.ppo.algorithm == "reinforce" ? 1.0 : cfg_.ppo.gae_lambda;
  return agent::make_batch(*buffer_, next_value, cfg_.ppo.gamma, lambda);
}

void Trainer::write_metrics(const UpdateMetrics& m, double fps) const {
  if (out_dir_.empty()) return;
  nlohmann::json j = m.to_json();
  j["step"] = global_step_;
  j["update"] = updates_;
  j["episodes"] = episodes_;
  const double r = mean_recent_return();
  j["episode_return_mean"] = std::isnan(r) ? nlohmann::json() : nlohmann::json(r);
  if (std::isnan(m.explained_variance)) j["explained_variance"] = nullptr;
  j["fps"] = fps;
  append_line_durable(out_dir_ / "metrics.jsonl", j.dump());
}

int64_t Trainer::run(int64_t until_step, std::ostream* progress) {
  const int64_t batch = cfg_.ppo.batch_size();
  const int64_t limit = until_step < 0 ? cfg_.total_steps : std::min(until_step, cfg_.total_steps);
  const int64_t num_updates = cfg_.total_steps / batch;
  std::unique_ptr<Progress> bar;
  if (progress)
    bar = std::make_unique<Progress>("train " + cfg_.env_name, limit, "steps", *progress);
  int64_t ran = 0;
  while (global_step_ + batch <= limit) {
    if (cfg_.ppo.anneal_lr) {
      const double frac = 1.0 - static_cast<double>(updates_) / num_updates;
      learner_->set_learning_rate(frac * cfg_.ppo.learning_rate);
    }
    const auto t0 = std::chrono::steady_clock::now();
    collect();
    Batch b = make_batch();
    UpdateMetrics m = learner_->update(b, gen_);
    ++updates_;
    ++ran;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    write_metrics(m, batch / std::max(dt, 1e-9));
    if (bar)
      bar->update(global_step_,
                  fmt::format("return {:.1f} kl {:.4f}", mean_recent_return(), m.approx_kl));
    if (!out_dir_.empty() && cfg_.checkpoint_every > 0 && updates_ % cfg_.checkpoint_every == 0)
      save_checkpoint(out_dir_ / "checkpoint");
    if (stop_when && stop_when(*this)) break;
  }
  if (!out_dir_.empty()) save_checkpoint(out_dir_ / "checkpoint");
  if (bar) bar->finish(fmt::format("return {:.1f}", mean_recent_return()));
  return ran;
}

nlohmann::json Trainer::observation_statistics() const {
  const env::Env* e = &envs_->env(0);
  while (e) {
    if (auto* n = dynamic_cast<const env::NormalizeObservation*>(e))
      return n->statistics().to_json();
    auto* w = dynamic_cast<const env::Wrapper*>(e);
    e = w ? &w->inner() : nullptr;
  }
  return nullptr;
}

namespace {
void write_tensors(const fs::path& path,
                   const std::vector<std::pair<std::string, torch::Tensor>>& ts) {
  torch::serialize::OutputArchive ar;
  for (const auto& [k, v] : ts) ar.write(k, v);
  std::ostringstream os;
  ar.save_to(os);
  write_file_atomic(path, os.str());
}

nlohmann::json read_json(const fs::path& p) {
  try {
    return nlohmann::json::parse(read_file(p));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{}: {}", p.string(), e.what()));
  }
}
}  // namespace

void Trainer::save_checkpoint(const fs::path& dir) const {
  const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
  fs::create_directories(parent);
  const fs::path stage =
      parent / fmt::format("{}.staging-{}", dir.filename().string(), static_cast<long>(getpid()));
  fs::remove_all(stage);
  fs::create_directories(stage);
  nlohmann::json manifest = {
      {"format_version", kCheckpointFormatVersion},
      {"env_name", cfg_.env_name},
      {"observation_space", envs_->observation_space().to_json()},
      {"action_space", envs_->action_space().to_json()},
      {"config", cfg_.to_json()},
      {"global_step", global_step_},
      {"updates", updates_},
      {"episodes", episodes_},
      {"recent_returns", std::vector<double>(recent_returns_.begin(), recent_returns_.end())}};
  policies::save_policy(learner_->policy(), cfg_.policy, stage,
                        {{"env_name", cfg_.env_name},
                         {"env_yaml", cfg_.env_yaml},
                         {"observation_statistics", observation_statistics()}});
  learner_->save_optimizer(stage / "optimizer.pt");
  std::vector<std::pair<std::string, torch::Tensor>> ts{{"rng", gen_.get_state()},
                                                        {"next_obs", next_obs_}};
  if (next_mask_.defined()) ts.emplace_back("next_mask", next_mask_);
  write_tensors(stage / "state.pt", ts);
  write_file_atomic(stage / "envs.json", envs_->save_state().dump());
  write_file_atomic(stage / "manifest.json", manifest.dump(2));
  fsync_directory(stage);
  replace_directory(stage, dir);
}

void Trainer::load_checkpoint(const fs::path& dir) {
  const auto manifest = read_json(dir / "manifest.json");
  if (manifest.value("format_version", -1) != kCheckpointFormatVersion)
    throw FormatError(fmt::format(
        "{}: format_version {} (expected {})", (dir / "manifest.json").string(),
        manifest.value("format_version", nlohmann::json()).dump(), kCheckpointFormatVersion));
  if (manifest.value("env_name", "") != cfg_.env_name)
    throw InvalidArgument(fmt::format("checkpoint {} is for env '{}', this run is '{}'",
                                      dir.string(), manifest.value("env_name", ""), cfg_.env_name));
  nlohmann::json pm;
  auto loaded = policies::load_policy(dir, &pm);
  {
    torch::NoGradGuard ng;
    auto dst = learner_->policy().named_parameters();
    auto src = loaded->named_parameters();
    ATTNPILOT_CHECK_ARG(dst.size() == src.size(),
                        "checkpoint {}: policy has {} parameters, this run's has {}", dir.string(),
                        src.size(), dst.size());
    for (const auto& p : src) {
      auto* d = dst.find(p.key());
      ATTNPILOT_CHECK_ARG(d && d->sizes() == p.value().sizes(),
                          "checkpoint {}: parameter '{}' missing or of another shape", dir.string(),
                          p.key());
      d->copy_(p.value());
    }
  }
  learner_->load_optimizer(dir / "optimizer.pt");
  torch::serialize::InputArchive ar;
  const std::string bytes = read_file(dir / "state.pt");
  try {
    ar.load_from(bytes.data(), bytes.size());
    torch::Tensor rng, obs, mask;
    ar.read("rng", rng);
    ar.read("next_obs", obs);
    gen_.set_state(rng);
    next_obs_ = obs;
    if (envs_->has_action_mask()) {
      ar.read("next_mask", mask);
      next_mask_ = mask;
    }
  } catch (const c10::Error& e) {
    throw FormatError(
        fmt::format("{}: {}", (dir / "state.pt").string(), e.what_without_backtrace()));
  }
  envs_->load_state(read_json(dir / "envs.json"));
  try {
    global_step_ = manifest.at("global_step").get<int64_t>();
    updates_ = manifest.at("updates").get<int64_t>();
    episodes_ = manifest.at("episodes").get<int64_t>();
    auto rr = manifest.at("recent_returns").get<std::vector<double>>();
    recent_returns_.assign(rr.begin(), rr.end());
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{}: {}", (dir / "manifest.json").string(), e.what()));
  }
}

std::unique_ptr<Trainer> Trainer::resume(const fs::path& checkpoint, fs::path out_dir) {
  const auto manifest = read_json(checkpoint / "manifest.json");
  if (!manifest.contains("config"))
    throw FormatError(fmt::format("{}: missing 'config'", (checkpoint / "manifest.json").string()));
  auto t = std::make_unique<Trainer>(TrainerConfig::from_json(manifest.at("config")),
                                     std::move(out_dir));
  t->load_checkpoint(checkpoint);
  return t;
}

// ---------------------------------------------------------------------------------------

std::vector<double> evaluate_policy(policies::ActorCritic& policy, const std::string& env_name,
                                    const Config& env_cfg, int64_t episodes, uint64_t seed,
                                    bool greedy, torch::Generator& gen,
                                    const nlohmann::json& obs_statistics) {
  ATTNPILOT_CHECK_ARG(episodes > 0, "evaluate_policy: episodes {} must be > 0", episodes);
  std::unique_ptr<env::Env> e = env::make_env(env_name, env_cfg);
  if (!obs_statistics.is_null()) {
    auto n = std::make_unique<env::NormalizeObservation>(std::move(e));
    nlohmann::json own = {{"rms", obs_statistics}, {"update", false}};
    nlohmann::json st = {{"inner", n->inner().save_state()}, {"own", own}};
    n->load_state(st);
    n->set_update(false);
    e = std::move(n);
  }
  ATTNPILOT_CHECK_ARG(e->observation_space().shape == policy.observation_space().shape &&
                          e->action_space() == policy.action_space(),
                      "evaluate_policy: env {} spaces {} / {} do not match the policy's {} / {}",
                      env_name, e->observation_space().describe(), e->action_space().describe(),
                      policy.observation_space().describe(), policy.action_space().describe());
  torch::NoGradGuard no_grad;
  std::vector<double> returns;
  torch::Tensor obs = e->reset(seed);
  double ret = 0;
  while (static_cast<int64_t>(returns.size()) < episodes) {
    auto out = policy.forward(obs.unsqueeze(0));
    torch::Tensor mask = e->has_action_mask() ? e->action_mask().unsqueeze(0) : torch::Tensor();
    auto dist = policy.distribution(out, mask);
    auto a = (greedy ? dist.mode() : dist.sample(gen)).squeeze(0);
    env::StepResult r = e->step(a);
    ret += r.reward;
    obs = r.observation;
    if (r.done()) {
      returns.push_back(ret);
      ret = 0;
      obs = e->reset();
    }
  }
  return returns;
}

}  // namespace attnpilot::agent
