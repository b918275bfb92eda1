// `attnpilot inspect --model DIR`: validates a checkpoint folder exactly as loading does
// and prints its architecture, parameter count, tensor table and fingerprint. Exit 0 only
// when the model would load; a malformed folder exits 2 with the error (file, tensor,
// rule or config key).
#include <iostream>

#include "common/error.h"
#include "experiments/cli.h"
#include "model/checkpoint.h"

namespace attnpilot::cli {
namespace {

void add_inspect_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand(
      "inspect", "Validate a model folder (config.json + model.safetensors) and describe it");
  auto dir = std::make_shared<std::string>();
  cmd->add_option("--model", *dir, "Checkpoint folder (Hugging Face layout)")
      ->required()
      ->check(CLI::ExistingDirectory);
  cmd->footer("Example: attnpilot inspect --model runs/default/model");
  cmd->callback([dir] {
    try {
      std::cout << model::format_inspect(model::inspect_model(*dir));
    } catch (const IoError& e) {
      // A folder without config.json or model.safetensors is bad input, not a failure.
      throw UsageError(e.what());
    }
  });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(inspect, 12, add_inspect_verb);

}  // namespace attnpilot::cli
