#pragma once
/// The rank-selection experiment: train a policy on the rank environment, then evaluate it
/// and every baseline on held-out text, and write the report.
///
///   CONFIG ──► calibrate (DIR/cost_model.json) ──► train PPO on RankSelection-v0 (train
///   split; DIR/train/metrics.jsonl, DIR/train/checkpoint, resumable)
///     ──► evaluate on the validation split, the same windows for every method:
///           dense | static-r<r> | energy-<τ> | random | oracle | policy
///     ──► DIR/results.csv, DIR/report.md, DIR/*.png (experiments/report.h)
///
/// Static and energy baselines run without the guardrail (their violations are counted);
/// random, the oracle and the policy choose among the ranks the guardrail allows.
/// The oracle is one-step greedy on the true reward: at each segment, for each layer in
/// turn, it tries every rank of the grid for that layer (each group takes the smallest
/// allowed rank >= it), keeping the one with the best immediate reward, by replaying the
/// episode on a probe environment.
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "common/config.h"
#include "env/rank_env.h"
#include "experiments/report.h"

namespace attnpilot::policies {
class ActorCritic;
}

namespace attnpilot::experiments {

/// Chooses an action (int64 [groups]) for the env's current state; `mask` is the env's
/// action mask (bool [groups·ranks]).
using RankController = std::function<torch::Tensor(env::RankEnv& env, const torch::Tensor& obs,
                                                   const torch::Tensor& mask)>;

/// Every group at rank index `k` of the grid.
RankController static_controller(int64_t k);
/// Per group the smallest grid rank keeping >= tau of the energy for every head of the
/// group (the spectrum known before the segment; exact scores before the first).
RankController energy_controller(double tau);
/// Uniform over the allowed ranks of each group, from `gen` (seeded by the caller).
RankController random_controller(std::shared_ptr<torch::Generator> gen);
/// One-step greedy on the true reward (see the file comment). `probe` must be built with
/// the same config as the evaluated env.
RankController oracle_controller(std::shared_ptr<env::RankEnv> probe);
/// The policy's most likely allowed action. `obs_statistics`: the trainer's observation
/// normalisation statistics (null when it did not normalise).
RankController policy_controller(std::shared_ptr<policies::ActorCritic> policy,
                                 const nlohmann::json& obs_statistics);

/// Runs `controller` on windows [0, sequences) of env's split and sums what the steps
/// report into a MethodResult named `name`.
MethodResult evaluate_method(env::RankEnv& env, const std::string& name,
                             const RankController& controller, int64_t sequences,
                             std::ostream* progress = nullptr);

/// `attnpilot run` settings (section `experiment` of the config).
struct ExperimentConfig {
  uint64_t seed = 1;
  int64_t train_steps = 20000;  ///< PPO environment steps
  int64_t eval_sequences = 32;  ///< held-out windows (validation split)
  std::vector<double> energy_taus{0.9, 0.95, 0.99};
  bool random = true, oracle = true;
  bool calibrate = true;  ///< run `calibrate` (quick grid) into DIR/cost_model.json
  int threads = 1;        ///< LibTorch CPU threads
  static ExperimentConfig from_config(const Config& cfg);
};

/// What `attnpilot run` does (see the file comment); `parts` selects "calibrate", "train",
/// "eval" (all three for run).
struct RunRequest {
  std::filesystem::path config, out;
  bool train = true, eval = true, calibrate = true;
  std::filesystem::path policy;  ///< eval only: a trainer checkpoint (default DIR/train/checkpoint)
};

/// Runs the parts; writes progress to `progress`. Returns the result rows (empty when eval
/// is off).
std::vector<ResultRow> run_rank_experiment(const RunRequest& req, std::ostream* progress);

}  // namespace attnpilot::experiments
