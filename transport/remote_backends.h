#pragma once
/// The RL core behind the remote roles: both sides are an agent::Trainer built from the
/// same TrainerConfig (env, policy, ppo sections), so remote and local training share the
/// collector, GAE, the PPO update and the checkpoint format.
///
///   actor:   Trainer.collect() ─► Trainer.make_batch() (GAE with behaviour values)
///            ─► chunk {obs, actions, logprobs, advantages, returns, values, masks}
///   learner: chunks ─► concatenated agent::Batch ─► Learner::update (lr annealed by
///            steps used / total steps) ─► weights = policy parameters
#include <memory>

#include "agent/trainer.h"
#include "transport/remote_roles.h"

namespace attnpilot::transport {

/// The policy's parameters and buffers by name (what travels as weights).
NamedParams policy_tensors(policies::ActorCritic& policy);

class TrainerActorBackend : public ActorBackend {
 public:
  explicit TrainerActorBackend(agent::TrainerConfig cfg);
  NamedParams parameters() override { return policy_tensors(trainer_->policy()); }
  Chunk collect() override;
  agent::Trainer& trainer() { return *trainer_; }

 private:
  std::unique_ptr<agent::Trainer> trainer_;
};

class TrainerLearnerBackend : public LearnerBackend {
 public:
  explicit TrainerLearnerBackend(agent::TrainerConfig cfg);
  NamedParams parameters() override { return policy_tensors(trainer_->policy()); }
  nlohmann::json update(const std::vector<Chunk>& chunks) override;
  /// Writes the Trainer checkpoint into `dir`/trainer (same format as `attnpilot train`)
  /// plus the learner's own step counter.
  void save(const std::filesystem::path& dir) override;
  void load(const std::filesystem::path& dir) override;
  agent::Trainer& trainer() { return *trainer_; }

 private:
  agent::TrainerConfig cfg_;
  std::unique_ptr<agent::Trainer> trainer_;
  int64_t steps_used_ = 0;
};

}  // namespace attnpilot::transport
