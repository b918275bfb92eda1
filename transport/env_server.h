#pragma once
/// `attnpilot env-server`: serves any registered environment over ZeroMQ so that other RL
/// code (the Python client in clients/python/ included) can drive it.
///
///   client DEALER ── spec_request ─────────────► ROUTER  spec_reply {observation_space,
///                                                        action_space, has_action_mask}
///                 ── reset_request {seed, num_envs} ──►  reset_reply  obs[N,...] (action_mask)
///                 ── step_request actions[N,...] ─────►  step_reply   obs, rewards,
///                                                        terminated, truncated (action_mask)
///
/// Each client (routing id) owns a session of `num_envs` environments seeded
/// seed, seed+1, ...; sessions idle longer than `session_idle_s` are closed. With one env
/// the session follows Gymnasium (the client resets after an episode ends); with several,
/// finished envs are reset automatically (VectorEnv's same-step style) and the reply
/// carries `final_obs` [N, ...] holding the last observation of each finished episode. A bad
/// request is answered with an error message naming what was wrong; the server carries on.
#include <torch/torch.h>

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <zmq.hpp>

#include "transport/security.h"
#include "transport/socket.h"

namespace attnpilot::transport {

/// What the server needs from one environment instance (an adapter over env::Env).
class ServedEnv {
 public:
  virtual ~ServedEnv() = default;
  /// {"type":"box","shape":[...],"low":[...],"high":[...],"dtype":"float32"} or
  /// {"type":"discrete","n":K} or {"type":"multi_discrete","nvec":[...]}.
  virtual nlohmann::json observation_space() const = 0;
  virtual nlohmann::json action_space() const = 0;
  virtual bool has_action_mask() const = 0;
  struct Out {
    torch::Tensor obs;
    double reward = 0;
    bool terminated = false, truncated = false;
    torch::Tensor action_mask;  ///< undefined when the env has none
  };
  virtual Out reset(uint64_t seed) = 0;
  /// Starts a new episode continuing the env's RNG stream (used by auto-reset).
  virtual Out reset_continue() = 0;
  /// `action`: int64 scalar (discrete), int64 [k] (multi-discrete) or float32 [shape] (box).
  virtual Out step(const torch::Tensor& action) = 0;
};

using ServedEnvFactory = std::function<std::unique_ptr<ServedEnv>()>;

struct EnvServerOptions {
  std::string endpoint;
  SecurityConfig security;
  SocketOptions socket;
  int max_sessions = 64;
  int max_envs_per_session = 1024;
  double session_idle_s = 600;
  /// Stop after this many seconds (0: run until stop() or a signal).
  double run_for_s = 0;
};

class EnvServer {
 public:
  EnvServer(zmq::context_t& ctx, EnvServerOptions opts, std::string env_name,
            ServedEnvFactory factory);
  /// The endpoint actually bound.
  std::string endpoint();
  /// Serves until `stop()` is called, `*stop_flag` becomes true, or run_for_s passes.
  void serve(const std::atomic<bool>* stop_flag = nullptr);
  void stop() { stop_ = true; }
  uint64_t requests() const { return requests_; }
  uint64_t errors() const { return errors_; }
  const DecodeCounters& decode_counters() const { return server_.socket->counters(); }

 private:
  struct Session {
    std::vector<std::unique_ptr<ServedEnv>> envs;
    int64_t last_active_ms = 0;
  };
  Message handle(const std::string& peer, const Message& req);
  Message reply_with(MsgType type, uint64_t seq, const std::vector<ServedEnv::Out>& outs,
                     const std::vector<torch::Tensor>* final_obs = nullptr) const;

  EnvServerOptions opts_;
  std::string env_name_;
  ServedEnvFactory factory_;
  std::unique_ptr<ServedEnv> prototype_;
  SecureServer server_;
  std::map<std::string, Session> sessions_;
  std::atomic<bool> stop_{false};
  uint64_t requests_ = 0, errors_ = 0;
};

}  // namespace attnpilot::transport
