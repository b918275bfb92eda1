// `attnpilot eval CONFIG --out DIR [--policy CKPT]`: the evaluation part of `attnpilot run`
// (the policy and every baseline on held-out text, results.csv, report.md, plots) for a
// policy trained before (DIR/train/checkpoint by default).
#include <filesystem>
#include <iostream>

#include "experiments/cli.h"
#include "experiments/rank_experiment.h"

namespace attnpilot::cli {
namespace {

struct EvalArgs {
  std::string config, out, policy;
};

void add_eval_verb(CLI::App& root) {
  auto a = std::make_shared<EvalArgs>();
  auto* cmd = root.add_subcommand(
      "eval", "Evaluate a trained rank policy and every baseline on held-out text, with a report");
  cmd->add_option("config", a->config, "Experiment YAML the policy was trained with")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", a->out, "Output folder (results.csv, report.md, plots)")->required();
  cmd->add_option("--policy", a->policy,
                  "Trainer checkpoint folder (default: OUT/train/checkpoint)")
      ->check(CLI::ExistingDirectory);
  cmd->callback([a] {
    experiments::RunRequest req;
    req.config = a->config;
    req.out = a->out;
    req.train = false;
    req.calibrate = false;
    req.policy = a->policy;
    const auto rows = experiments::run_rank_experiment(req, &std::cerr);
    std::cout << experiments::format_table(rows);
    std::cout << "report: " << (std::filesystem::path(a->out) / "report.md").string() << "\n";
  });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(eval, 52, add_eval_verb);

}  // namespace attnpilot::cli
