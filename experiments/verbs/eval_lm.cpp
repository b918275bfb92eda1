// `attnpilot eval-lm`: perplexity of a checkpoint with a 95% CI over documents, beside an
// add-one unigram baseline.
#include <iostream>

#include "experiments/cli.h"
#include "model/lm_train.h"

namespace attnpilot::cli {
namespace {

struct LmEvalArgs {
  std::string model;
  std::vector<std::string> text;
  std::string device = "auto";
};

void add_eval_lm_verb(CLI::App& root) {
  auto a = std::make_shared<LmEvalArgs>();
  auto* cmd = root.add_subcommand(
      "eval-lm", "Perplexity of a checkpoint (95% CI over documents) beside a unigram baseline");
  cmd->add_option("--model", a->model, "Checkpoint folder (e.g. runs/default/model)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->add_option("--text", a->text,
                  "Text files or folders to evaluate (default: the run's held-out split)")
      ->check(CLI::ExistingPath);
  cmd->add_option("--device", a->device, "cpu, cuda, cuda:N or auto");
  cmd->callback([a] {
    std::vector<std::filesystem::path> texts(a->text.begin(), a->text.end());
    auto e = model::evaluate_lm(a->model, texts, parse_device(a->device), &std::cerr);
    std::cout << model::format_evaluation(e);
  });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(eval_lm, 14, add_eval_lm_verb);

}  // namespace attnpilot::cli
