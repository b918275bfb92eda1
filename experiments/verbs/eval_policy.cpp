// `attnpilot eval-policy`: mean return of a trained policy with a 95% confidence interval.
#include <ATen/CPUGeneratorImpl.h>

#include <filesystem>
#include <iostream>

#include "agent/trainer.h"
#include "common/config.h"
#include "common/stats.h"
#include "experiments/cli.h"
#include "policies/actor_critic.h"

namespace attnpilot::cli {
namespace {

namespace fs = std::filesystem;

struct PolicyEvalArgs {
  std::string env, checkpoint;
  int64_t episodes = 100;
  uint64_t seed = 12345;
  bool stochastic = false;
};

void run_eval(const PolicyEvalArgs& a) {
  torch::set_num_threads(1);
  fs::path dir(a.checkpoint);
  if (!fs::exists(dir / "policy.json") && fs::exists(dir / "checkpoint" / "policy.json"))
    dir = dir / "checkpoint";
  if (!fs::exists(dir / "policy.json"))
    throw UsageError(
        fmt::format("--checkpoint {}: no policy.json there (nor in checkpoint/)", a.checkpoint));
  nlohmann::json manifest;
  auto policy = policies::load_policy(dir, &manifest);
  const std::string trained_on = manifest.value("env_name", "");
  if (trained_on != a.env)
    throw UsageError(fmt::format("--env {}: the policy in {} was trained on '{}'", a.env,
                                 dir.string(), trained_on));
  const Config env_cfg = Config::parse(manifest.value("env_yaml", "{}"), "checkpoint env config");
  torch::Generator gen = at::detail::createCPUGenerator(a.seed);
  auto returns =
      agent::evaluate_policy(*policy, a.env, env_cfg, a.episodes, a.seed, !a.stochastic, gen,
                             manifest.value("observation_statistics", nlohmann::json()));
  const MeanCI ci = mean_ci(returns, 0.95);
  std::cout << fmt::format(
      "{} ({} policy, {}): mean return {:.3f} ± {:.3f} (95% CI [{:.3f}, {:.3f}], "
      "sd {:.3f}) over {} episodes\n",
      a.env, policy->kind(), a.stochastic ? "sampled" : "greedy", ci.mean, ci.high - ci.mean,
      ci.low, ci.high, ci.stddev, ci.n);
}

void add_eval_policy_verb(CLI::App& root) {
  auto args = std::make_shared<PolicyEvalArgs>();
  auto* cmd = root.add_subcommand("eval-policy", "Mean return of a trained policy (95% CI)");
  cmd->add_option("--env", args->env, "Environment name the policy was trained on")->required();
  cmd->add_option("--checkpoint", args->checkpoint, "Checkpoint folder (or a train --out folder)")
      ->required();
  cmd->add_option("--episodes", args->episodes, "Episodes to run")->check(CLI::PositiveNumber);
  cmd->add_option("--seed", args->seed, "Seed of the evaluation env (and of sampling)");
  cmd->add_flag("--stochastic", args->stochastic, "Sample actions instead of the greedy action");
  cmd->callback([args] { run_eval(*args); });
}

}  // namespace
ATTNPILOT_REGISTER_VERB(eval_policy, 31, add_eval_policy_verb);
}  // namespace attnpilot::cli
