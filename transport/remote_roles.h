#pragma once
/// The learner and actor roles of remote training (see protocol.h for the messages).
///
///   actor 0 ─┐ trajectory chunks (obs, actions, logp, rewards, ...)      ┌─► metrics.jsonl
///   actor 1 ─┼──────────────────────────► learner ── PPO update ─────────┼─► checkpoint/ (atomic)
///   actor k ─┘ ◄── weights {version} ────  (ROUTER)                      └─► weights to actors
///
/// Both roles are written against small backend interfaces, so the loops here hold all
/// the transport logic (versions, lag, exactly-once ledger, reconnects, checkpoints) and
/// the RL core (agent/, env/, policies/) plugs in through adapters (remote_backends.h).
#include <torch/torch.h>

#include <atomic>
#include <deque>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "transport/protocol.h"
#include "transport/security.h"
#include "transport/socket.h"

namespace attnpilot::transport {

using NamedParams = std::vector<std::pair<std::string, torch::Tensor>>;

/// One rollout chunk as produced by an actor: named tensors, the number of environment
/// steps in it, and the number and return sum of the episodes it finished.
struct Chunk {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  int64_t steps = 0;
  int64_t episodes = 0;
  double episode_return_sum = 0;
};

/// What the learner needs from the RL core.
class LearnerBackend {
 public:
  virtual ~LearnerBackend() = default;
  /// The live policy parameters (their values are broadcast as weights).
  virtual NamedParams parameters() = 0;
  /// Runs one update on accepted chunks (decoded back into tensors); returns metrics.
  virtual nlohmann::json update(const std::vector<Chunk>& chunks) = 0;
  /// Writes / reads the optimiser and policy state in `dir` (an existing folder).
  virtual void save(const std::filesystem::path& dir) = 0;
  virtual void load(const std::filesystem::path& dir) = 0;
};

/// What the actor needs from the RL core.
class ActorBackend {
 public:
  virtual ~ActorBackend() = default;
  virtual NamedParams parameters() = 0;
  /// Collects one chunk with the current parameters from the local VectorEnv.
  virtual Chunk collect() = 0;
};

struct LearnerOptions {
  std::string endpoint;
  std::string env_name;
  std::filesystem::path out_dir;
  int64_t total_steps = 0;
  int64_t steps_per_update = 2048;  ///< accepted env steps that trigger one update
  int64_t max_lag = 1;              ///< older chunks (in policy versions) are dropped
  int64_t checkpoint_every = 5;     ///< updates between checkpoints (and at the end)
  bool resume = false;
  uint64_t seed = 0;
  SecurityConfig security;
  SocketOptions socket;
  /// Stop (with a checkpoint) when this flag becomes true (signal handlers set it).
  const std::atomic<bool>* stop_flag = nullptr;
  /// Give up when no accepted trajectory arrived for this long (0: wait forever).
  double idle_timeout_s = 0;
  /// Finish early (checkpoint, actors told to shut down) once the mean return of the last
  /// 100 episodes reaches this value; NaN: train for total_steps.
  double target_return = std::numeric_limits<double>::quiet_NaN();
};

struct LearnerResult {
  int64_t steps_used = 0, updates = 0, version = 0;
  uint64_t accepted = 0, duplicates = 0, stale = 0;
  double mean_return = 0;  ///< mean return of the last >= 100 finished episodes
};

/// Runs the learner until total_steps of accepted experience were used for updates.
LearnerResult run_learner(zmq::context_t& ctx, const LearnerOptions& opts, LearnerBackend& backend);

struct ActorOptions {
  std::string endpoint;
  std::string env_name;
  std::string actor_id;
  SecurityConfig security;
  SocketOptions socket;
  int max_unacked = 4;  ///< chunks in flight before the actor waits for acks
  /// Exit (code 1) when nothing was heard from the learner for this long.
  double max_idle_s = 60;
  const std::atomic<bool>* stop_flag = nullptr;
};

struct ActorResult {
  uint64_t chunks_sent = 0, weights_received = 0, reconnects = 0;
  bool shutdown_received = false;
};

/// Runs an actor until the learner sends shutdown, `stop_flag`, or max_idle_s of silence
/// (then throws IoError naming the endpoint). After 3 s of silence it says hello again (a
/// learner restarted unseen answers nothing else).
ActorResult run_actor(zmq::context_t& ctx, const ActorOptions& opts, ActorBackend& backend);

}  // namespace attnpilot::transport
