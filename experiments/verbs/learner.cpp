// `attnpilot learner --bind EP --env NAME --total-steps N --seed S --out DIR [--resume]`:
// the learner of remote training. Receives trajectory chunks from `attnpilot actor`
// processes, drops those more than --max-lag policy versions old, runs PPO updates,
// broadcasts weights with a version, writes metrics.jsonl and an atomic checkpoint/ every
// --checkpoint-every updates, and resumes from it with --resume (see transport/protocol.h).
#include <iostream>
#include <optional>

#include "common/error.h"
#include "experiments/cli.h"
#if defined(ATTNPILOT_WITH_ZMQ) && defined(ATTNPILOT_WITH_REMOTE_TRAINING)
#include "common/config.h"
#include "transport/cli_options.h"
#include "transport/remote_backends.h"
#define ATTNPILOT_REMOTE_BUILT 1
#endif

namespace attnpilot::cli {
namespace {

#ifndef ATTNPILOT_REMOTE_BUILT
void add_learner_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("learner", "Remote training learner (not built)");
  cmd->allow_extras();
  cmd->callback([] {
    throw Unavailable(
        "learner needs transport/ (ATTNPILOT_ZMQ=ON) and the RL core (env/, "
        "agent/, policies/)");
  });
}
#else
struct LearnerArgs {
  std::string bind, env, out, config;
  int64_t total_steps = 0, steps_per_update = 2048, max_lag = 1, checkpoint_every = 5;
  uint64_t seed = 1;
  bool resume = false;
  double idle_timeout_s = 0;
  std::optional<double> target_return;
  transport::EndpointFlags flags;
};

void add_learner_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("learner", "Remote training: the learner (actors connect to it)");
  auto a = std::make_shared<LearnerArgs>();
  cmd->add_option("--bind", a->bind, "Endpoint to bind, e.g. tcp://127.0.0.1:5555")->required();
  cmd->add_option("--env", a->env, "Registered environment name")->required();
  cmd->add_option("--total-steps", a->total_steps, "Env steps of experience to train on")
      ->required()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", a->seed, "Seed of the policy initialisation and minibatch order");
  cmd->add_option("--out", a->out, "Output folder (metrics.jsonl, checkpoint/)")->required();
  cmd->add_flag("--resume", a->resume, "Continue from --out/checkpoint");
  cmd->add_option("--config", a->config, "YAML with env, policy, ppo, train sections");
  cmd->add_option("--steps-per-update", a->steps_per_update, "Accepted env steps per PPO update")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-lag", a->max_lag, "Drop chunks more than this many versions old")
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--checkpoint-every", a->checkpoint_every, "Updates between checkpoints")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--idle-timeout", a->idle_timeout_s,
                  "Give up (exit 1) when no chunk was accepted for this many seconds (0: never)");
  cmd->add_option("--target-return", a->target_return,
                  "Finish early once the mean return of the last 100 episodes reaches this");
  transport::add_endpoint_flags(cmd, a->flags, /*server=*/true);
  cmd->callback([a] {
    transport::install_stop_handlers();
    // One intra-op thread: several actors and the learner share the host's cores, and
    // oversubscribed LibTorch thread pools are slower than one thread each here.
    torch::set_num_threads(1);
    const Config root = a->config.empty() ? Config() : Config::load(a->config);
    agent::TrainerConfig tc =
        agent::TrainerConfig::from_config(a->env, root, a->total_steps, a->seed);
    root.check_all_read();
    transport::TrainerLearnerBackend backend(tc);
    transport::LearnerOptions o;
    o.endpoint = a->bind;
    o.env_name = a->env;
    o.out_dir = a->out;
    o.total_steps = a->total_steps;
    o.steps_per_update = a->steps_per_update;
    o.max_lag = a->max_lag;
    o.checkpoint_every = a->checkpoint_every;
    o.resume = a->resume;
    o.seed = a->seed;
    o.security = a->flags.security();
    o.socket = a->flags.socket();
    o.stop_flag = &transport::stop_requested();
    o.idle_timeout_s = a->idle_timeout_s;
    if (a->target_return) o.target_return = *a->target_return;
    zmq::context_t ctx;
    const transport::LearnerResult r = transport::run_learner(ctx, o, backend);
    std::cout << fmt::format(
        "learner: {} steps, {} updates, version {}, mean return {:.1f}, "
        "chunks accepted {} stale {} duplicate {}\n",
        r.steps_used, r.updates, r.version, r.mean_return, r.accepted, r.stale, r.duplicates);
  });
}
#endif

}  // namespace

ATTNPILOT_REGISTER_VERB(learner, 42, add_learner_verb);

}  // namespace attnpilot::cli
