// `attnpilot pretrain`: train the tokenizer and a transformer language model on a corpus.
#include <cmath>
#include <iostream>

#include "common/config.h"
#include "common/error.h"
#include "experiments/cli.h"
#include "model/lm_train.h"

namespace attnpilot::cli {
namespace {

struct PretrainArgs {
  std::string config;
  std::string out;
  std::vector<std::string> corpus;
  bool resume = false;
  bool force = false;
  std::string device = "auto";
  int64_t seed = -1;
  int64_t steps = -1;
  double max_seconds = 0;
  int64_t stop_at = -1;
};

void run_pretrain(const PretrainArgs& a) {
  Config cfg = Config::load(a.config);
  model::PretrainConfig pc = model::PretrainConfig::from_config(cfg);
  if (!a.corpus.empty()) pc.corpus.assign(a.corpus.begin(), a.corpus.end());
  if (a.seed >= 0) pc.seed = static_cast<uint64_t>(a.seed);
  if (a.steps >= 0) {
    pc.steps = a.steps;
    pc.warmup_steps = std::min(pc.warmup_steps, std::max<int64_t>(0, pc.steps - 1));
  }
  model::PretrainRun run;
  run.out = a.out;
  run.device = parse_device(a.device);
  run.resume = a.resume;
  run.force = a.force;
  run.max_seconds = a.max_seconds;
  run.stop_at_step = a.stop_at;
  run.progress = &std::cerr;
  model::PretrainResult r = model::pretrain(pc, run);
  if (r.reused) {
    std::cout << fmt::format(
        "{}: up to date (finished at step {}); validation loss {:.4f}, perplexity {:.2f}\n",
        r.model_dir.string(), r.step, r.val_loss, std::exp(r.val_loss));
    return;
  }
  std::cout << fmt::format(
      "{}: step {} of {}{}; {} tokens in {:.1f} s ({:.0f} tok/s); validation loss {:.4f} -> "
      "{:.4f} (perplexity {:.2f} -> {:.2f})\n",
      r.model_dir.string(), r.step, pc.steps, r.finished ? " (finished)" : " (resume to finish)",
      r.tokens, r.seconds, r.tokens / std::max(r.seconds, 1e-9), r.first_val_loss, r.val_loss,
      std::exp(r.first_val_loss), std::exp(r.val_loss));
}

void add_pretrain_verb(CLI::App& root) {
  auto a = std::make_shared<PretrainArgs>();
  auto* cmd = root.add_subcommand(
      "pretrain",
      "Train a tokenizer and a transformer language model; the checkpoint goes to OUT/model");
  cmd->add_option("--config", a->config,
                  "YAML with sections model, tokenizer, data, train "
                  "(experiments/configs/default-model.yaml)")
      ->required()
      ->check(CLI::ExistingFile);
  cmd->add_option("--out", a->out, "Run folder (tokenizer, token cache, model/, metrics.jsonl)")
      ->required();
  cmd->add_option("--corpus", a->corpus, "Text files or folders (overrides data.corpus)")
      ->check(CLI::ExistingPath);
  cmd->add_flag("--resume", a->resume,
                "Continue OUT/model if it is this run's (a finished one is reused as is)");
  cmd->add_flag("--force", a->force, "Discard an OUT/model that belongs to another run");
  cmd->add_option("--device", a->device, "cpu, cuda, cuda:N or auto");
  cmd->add_option("--seed", a->seed, "Overrides train.seed")->check(CLI::NonNegativeNumber);
  cmd->add_option("--steps", a->steps, "Overrides train.steps")->check(CLI::PositiveNumber);
  cmd->add_option("--max-seconds", a->max_seconds,
                  "Stop after this many seconds with a checkpoint (resume later)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--stop-at-step", a->stop_at,
                  "Stop at this step with a checkpoint (resume later)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([a] { run_pretrain(*a); });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(pretrain, 13, add_pretrain_verb);

}  // namespace attnpilot::cli
