// `attnpilot env-server --bind EP --env NAME`: serves a registered environment over
// ZeroMQ (specs, reset, batched step) for remote RL code, e.g. the Python client in
// clients/python/ (a gymnasium.Env).
#include <iostream>

#include "common/error.h"
#include "experiments/cli.h"
#if defined(ATTNPILOT_WITH_ZMQ) && defined(ATTNPILOT_WITH_ENV_SERVER)
#include "common/config.h"
#include "env/registry.h"
#include "transport/cli_options.h"
#include "transport/env_adapter.h"
#define ATTNPILOT_ENV_SERVER_BUILT 1
#endif

namespace attnpilot::cli {
namespace {

struct EnvServerArgs {
  std::string bind, env, env_config;
  double run_for_s = 0;
  int max_sessions = 64;
  transport::EndpointFlags flags;
};

#ifndef ATTNPILOT_ENV_SERVER_BUILT
void add_env_server_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("env-server", "Serve an environment over ZeroMQ (not built)");
  cmd->allow_extras();
  cmd->callback([] {
    throw Unavailable(
        "env-server needs transport/ (ATTNPILOT_ZMQ=ON, libzmq3-dev, cppzmq-dev) "
        "and env/; this build has neither or only one");
  });
}
#else
void add_env_server_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand(
      "env-server", "Serve an environment over ZeroMQ (Python client: clients/python)");
  auto a = std::make_shared<EnvServerArgs>();
  cmd->add_option("--bind", a->bind, "Endpoint, e.g. tcp://127.0.0.1:5555 or ipc:///tmp/env.sock")
      ->required();
  cmd->add_option("--env", a->env, "Registered environment name (e.g. CartPole-v1)")->required();
  cmd->add_option("--env-config", a->env_config, "YAML file of the environment's keys");
  cmd->add_option("--run-for", a->run_for_s, "Stop after this many seconds (0: until a signal)");
  cmd->add_option("--max-sessions", a->max_sessions, "Most clients served at once")
      ->check(CLI::Range(1, 100000));
  transport::add_endpoint_flags(cmd, a->flags, /*server=*/true);
  cmd->callback([a] {
    transport::install_stop_handlers();
    const Config cfg = a->env_config.empty() ? Config() : Config::load(a->env_config);
    // Build one env now so that an unknown name or config key fails before binding.
    env::make_env(a->env, cfg);
    cfg.check_all_read();
    zmq::context_t ctx;
    transport::EnvServerOptions o;
    o.endpoint = a->bind;
    o.security = a->flags.security();
    o.socket = a->flags.socket();
    o.max_sessions = a->max_sessions;
    o.run_for_s = a->run_for_s;
    transport::EnvServer server(ctx, o, a->env, transport::registry_factory(a->env, cfg));
    std::cout << "serving " << a->env << " on " << server.endpoint() << std::endl;
    server.serve(&transport::stop_requested());
  });
}

#endif

}  // namespace

ATTNPILOT_REGISTER_VERB(env_server, 41, add_env_server_verb);

}  // namespace attnpilot::cli
