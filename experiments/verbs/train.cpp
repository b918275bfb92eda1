// `attnpilot train`: PPO / REINFORCE on a registered environment, with metrics.jsonl,
// checkpoints (DIR/checkpoint) and resume.
#include <chrono>
#include <filesystem>
#include <iostream>
#include <optional>

#include "agent/trainer.h"
#include "common/config.h"
#include "common/error.h"
#include "common/log.h"
#include "experiments/cli.h"
#include "experiments/rank_experiment.h"

namespace attnpilot::cli {
namespace {

namespace fs = std::filesystem;

struct TrainArgs {
  std::string env, out, config;
  int64_t total_steps = 0;
  uint64_t seed = 1;
  bool resume = false;
  int threads = 1;
  std::optional<double> target_return;
  std::string task;
};

void run_train(const TrainArgs& a) {
  if (!a.task.empty()) {
    if (!a.env.empty() || a.total_steps > 0 || a.resume || a.target_return)
      throw UsageError(
          "--task rank takes its environment, steps and resumption from the experiment config "
          "(--config) and OUT; drop --env, --total-steps, --resume and --target-return");
    if (a.config.empty()) throw UsageError("--task rank needs --config (an experiment YAML)");
    experiments::RunRequest req;
    req.config = a.config;
    req.out = a.out;
    req.eval = false;
    experiments::run_rank_experiment(req, &std::cerr);
    std::cout << fmt::format("rank policy: {}\n",
                             (fs::path(a.out) / "train" / "checkpoint").string());
    return;
  }
  if (a.env.empty()) throw UsageError("--env is required (or --task rank)");
  if (a.total_steps <= 0) throw UsageError("--total-steps is required (or --task rank)");
  if (a.threads < 1) throw UsageError(fmt::format("--threads {}: must be >= 1", a.threads));
  torch::set_num_threads(a.threads);
  const fs::path out(a.out);
  const fs::path ckpt = out / "checkpoint";
  std::unique_ptr<agent::Trainer> trainer;
  if (a.resume) {
    if (!a.config.empty())
      throw UsageError(
          "--config cannot be combined with --resume: the checkpoint carries its config");
    if (!fs::exists(ckpt / "manifest.json"))
      throw UsageError(fmt::format("--resume: no checkpoint at {}", ckpt.string()));
    trainer = agent::Trainer::resume(ckpt, out);
    if (trainer->config().env_name != a.env)
      throw UsageError(fmt::format("--env {}: the checkpoint in {} is for {}", a.env, out.string(),
                                   trainer->config().env_name));
    trainer->set_total_steps(a.total_steps);
    log::info(fmt::format("resumed {} at step {} (update {})", a.env, trainer->global_step(),
                          trainer->updates()));
  } else {
    if (fs::exists(ckpt))
      throw UsageError(fmt::format("{} already holds a checkpoint; pass --resume or another --out",
                                   out.string()));
    Config cfg = a.config.empty() ? Config() : Config::load(a.config);
    auto tc = agent::TrainerConfig::from_config(a.env, cfg, a.total_steps, a.seed);
    cfg.check_all_read();
    trainer = std::make_unique<agent::Trainer>(tc, out);
  }
  if (a.target_return) {
    const double target = *a.target_return;
    trainer->stop_when = [target](const agent::Trainer& t) {
      return t.episodes() >= 100 && t.mean_recent_return(100) >= target;
    };
  }
  const auto t0 = std::chrono::steady_clock::now();
  trainer->run(-1, &std::cerr);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << fmt::format(
      "{}: {} steps, {} updates, {} episodes, mean return (last 100) {:.2f}, {:.1f} s; "
      "checkpoint {}\n",
      a.env, trainer->global_step(), trainer->updates(), trainer->episodes(),
      trainer->mean_recent_return(), s, ckpt.string());
}

void add_train_verb(CLI::App& root) {
  auto args = std::make_shared<TrainArgs>();
  auto* cmd = root.add_subcommand("train", "Train a policy with PPO/REINFORCE on a registered env");
  cmd->add_option("--env", args->env, "Environment name (e.g. CartPole-v1)");
  cmd->add_option("--task", args->task,
                  "rank: the training part of `attnpilot run` (rank selection on the config's "
                  "model; --config is the experiment YAML, the policy goes to OUT/train)")
      ->check(CLI::IsMember({"rank"}));
  cmd->add_option("--total-steps", args->total_steps,
                  "Environment steps to train for (--task rank: experiment.train_steps)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args->seed, "Seed of every RNG (policy, sampling, envs)");
  cmd->add_option("--out", args->out, "Output folder (metrics.jsonl, checkpoint/)")->required();
  cmd->add_option("--config", args->config, "YAML config (sections env, policy, ppo, train)")
      ->check(CLI::ExistingFile);
  cmd->add_flag("--resume", args->resume, "Continue from OUT/checkpoint");
  cmd->add_option("--threads", args->threads, "LibTorch CPU threads (1 keeps runs reproducible)");
  cmd->add_option("--target-return", args->target_return,
                  "Stop early once the mean return of the last 100 episodes reaches this");
  cmd->callback([args] { run_train(*args); });
}

}  // namespace
ATTNPILOT_REGISTER_VERB(train, 30, add_train_verb);
}  // namespace attnpilot::cli
