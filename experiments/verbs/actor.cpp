// `attnpilot actor --connect EP --env NAME --seed S`: an actor of remote training. Runs a
// local VectorEnv (any registered environment) with the latest weights from the learner,
// streams trajectory chunks, and reconnects by itself when the learner goes away.
#include <iostream>

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
void add_actor_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("actor", "Remote training actor (not built)");
  cmd->allow_extras();
  cmd->callback([] {
    throw Unavailable(
        "actor needs transport/ (ATTNPILOT_ZMQ=ON) and the RL core (env/, "
        "agent/, policies/)");
  });
}
#else
struct ActorArgs {
  std::string connect, env, config, actor_id;
  uint64_t seed = 1;
  double max_idle_s = 60;
  int max_unacked = 4;
  transport::EndpointFlags flags;
};

void add_actor_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("actor", "Remote training: an actor (connects to a learner)");
  auto a = std::make_shared<ActorArgs>();
  cmd->add_option("--connect", a->connect, "Learner endpoint, e.g. tcp://127.0.0.1:5555")
      ->required();
  cmd->add_option("--env", a->env, "Registered environment name")->required();
  cmd->add_option("--seed", a->seed, "Seed of the envs (seed + i) and action sampling");
  cmd->add_option("--config", a->config, "YAML with env, policy, ppo sections (as the learner's)");
  cmd->add_option("--actor-id", a->actor_id,
                  "Identity for exactly-once counting (default: seed-<SEED>); a restarted "
                  "actor keeps its id");
  cmd->add_option("--max-idle", a->max_idle_s,
                  "Exit (code 1) after this many seconds without hearing from the learner")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--max-unacked", a->max_unacked, "Chunks in flight before waiting for acks")
      ->check(CLI::Range(1, 1024));
  transport::add_endpoint_flags(cmd, a->flags, /*server=*/false);
  cmd->callback([a] {
    transport::install_stop_handlers();
    // One intra-op thread: several actors and the learner share the host's cores, and
    // oversubscribed LibTorch thread pools are slower than one thread each here.
    torch::set_num_threads(1);
    const Config root = a->config.empty() ? Config() : Config::load(a->config);
    // total_steps bounds nothing on the actor (the learner decides when training ends).
    agent::TrainerConfig tc =
        agent::TrainerConfig::from_config(a->env, root, int64_t{1} << 50, a->seed);
    root.check_all_read();
    transport::TrainerActorBackend backend(tc);
    transport::ActorOptions o;
    o.endpoint = a->connect;
    o.env_name = a->env;
    o.actor_id = a->actor_id.empty() ? fmt::format("seed-{}", a->seed) : a->actor_id;
    o.security = a->flags.security();
    o.socket = a->flags.socket();
    o.max_unacked = a->max_unacked;
    o.max_idle_s = a->max_idle_s;
    o.stop_flag = &transport::stop_requested();
    zmq::context_t ctx;
    const transport::ActorResult r = transport::run_actor(ctx, o, backend);
    std::cout << fmt::format("actor {}: {} chunks sent, {} weight updates, {} reconnects{}\n",
                             o.actor_id, r.chunks_sent, r.weights_received, r.reconnects,
                             r.shutdown_received ? ", learner finished" : "");
  });
}
#endif

}  // namespace

ATTNPILOT_REGISTER_VERB(actor, 43, add_actor_verb);

}  // namespace attnpilot::cli
