#pragma once
/// The actor/learner protocol on top of the codec, and the learner's bookkeeping that
/// makes trajectory counting exactly-once across actor and learner restarts.
///
///   actor                                   learner (incarnation I, policy version V)
///     │ hello {actor, next_seq}                 │
///     ├────────────────────────────────────────►│ welcome {I, expected_seq, V}
///     │◄────────────────────────────────────────┤ weights {I, V, params}
///     │ trajectory {actor, seq, I, v, steps}    │ ledger: seq <= last[actor] -> duplicate
///     ├────────────────────────────────────────►│         incarnation != I   -> stale
///     │◄────────────────────────────────────────┤         V - v > max_lag    -> stale
///     │ ack {seq, status}                       │         else accepted, counted once
///     │◄────────────── weights {I, V+1} ────────┤ after each PPO update (to every actor)
///     │◄────────────── shutdown ────────────────┤ after --total-steps
///
/// The ledger (last sequence number per actor) is saved inside the learner checkpoint,
/// with the parameters and the step counter, so a restarted learner refuses exactly the
/// trajectories its checkpointed state already counted. Trajectories the crashed learner
/// received after its last checkpoint were lost with it; they are not in the state, so
/// the actors resend their unacknowledged chunks and they are judged again.
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "transport/codec.h"

namespace attnpilot::transport {

/// Verdict on one received trajectory chunk.
enum class Verdict { kAccepted, kDuplicate, kStale };
const char* verdict_name(Verdict v);

/// Per-actor last accepted-or-judged sequence numbers.
class SequenceLedger {
 public:
  /// Judges chunk `seq` of `actor` produced by policy `version` in learner `incarnation`.
  /// Duplicates (seq <= last) are refused without changing anything; otherwise the
  /// sequence number is consumed, and the chunk is stale if from another incarnation or
  /// more than `max_lag` versions behind `current_version`.
  Verdict judge(const std::string& actor, uint64_t seq, uint64_t incarnation,
                uint64_t my_incarnation, int64_t version, int64_t current_version, int64_t max_lag);
  /// Next sequence number the actor should use (last + 1, or 0 if unknown).
  uint64_t expected(const std::string& actor) const;
  size_t actors() const { return last_.size(); }

  nlohmann::json to_json() const;
  /// Throws FormatError naming the bad entry.
  static SequenceLedger from_json(const nlohmann::json& j);

 private:
  std::map<std::string, uint64_t> last_;
};

/// Builders for the protocol's messages (meta JSON with the fields named above).
Message make_hello(const std::string& actor, uint64_t next_seq, const std::string& env);
Message make_welcome(uint64_t incarnation, uint64_t expected_seq, int64_t version);
Message make_ack(uint64_t seq, Verdict v, int64_t version);
Message make_error(uint64_t seq, const std::string& message);

}  // namespace attnpilot::transport
