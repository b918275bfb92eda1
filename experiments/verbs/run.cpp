// `attnpilot run CONFIG --out DIR`: the whole rank-selection experiment (calibration,
// PPO training on the train split, evaluation of the policy and every baseline on held-out
// text, results.csv, report.md, plots); see experiments/rank_experiment.h.
#include <filesystem>
#include <iostream>

#include "experiments/cli.h"
#include "experiments/rank_experiment.h"

namespace attnpilot::cli {
namespace {

struct RunArgs {
  std::string config, out;
  bool no_calibrate = false;
};

void add_run_verb(CLI::App& root) {
  auto a = std::make_shared<RunArgs>();
  auto* cmd = root.add_subcommand(
      "run", "Run a rank-selection experiment: calibrate, train, evaluate, report");
  cmd->add_option("config", a->config, "Experiment YAML (e.g. experiments/quickstart.yaml)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", a->out, "Output folder (results.csv, report.md, plots, train/)")
      ->required();
  cmd->add_flag("--no-calibrate", a->no_calibrate,
                "Skip calibration (keeps DIR/cost_model.json if present)");
  cmd->callback([a] {
    experiments::RunRequest req;
    req.config = a->config;
    req.out = a->out;
    req.calibrate = !a->no_calibrate;
    const auto rows = experiments::run_rank_experiment(req, &std::cerr);
    std::cout << experiments::format_table(rows);
    std::cout << "report: " << (std::filesystem::path(a->out) / "report.md").string() << "\n";
  });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(run, 50, add_run_verb);

}  // namespace attnpilot::cli
