#include "transport/remote_backends.h"

#include "common/atomic_file.h"

namespace attnpilot::transport {

NamedParams policy_tensors(policies::ActorCritic& policy) {
  NamedParams out;
  for (const auto& p : policy.named_parameters(/*recurse=*/true))
    out.emplace_back(p.key(), p.value());
  for (const auto& b : policy.named_buffers(/*recurse=*/true)) out.emplace_back(b.key(), b.value());
  return out;
}

TrainerActorBackend::TrainerActorBackend(agent::TrainerConfig cfg)
    : trainer_(std::make_unique<agent::Trainer>(std::move(cfg))) {}

Chunk TrainerActorBackend::collect() {
  const int64_t episodes_before = trainer_->episodes();
  trainer_->collect();
  const agent::Batch b = trainer_->make_batch();
  Chunk c;
  c.tensors = {{"obs", b.obs},           {"actions", b.actions},
               {"logprobs", b.logprobs}, {"advantages", b.advantages},
               {"returns", b.returns},   {"values", b.values}};
  if (b.masks.defined()) c.tensors.emplace_back("masks", b.masks);
  c.steps = b.size();
  const int64_t finished = trainer_->episodes() - episodes_before;
  if (finished > 0) {
    c.episode_return_sum = trainer_->mean_recent_return(static_cast<size_t>(finished)) * finished;
    c.episodes = finished;
  }
  return c;
}

TrainerLearnerBackend::TrainerLearnerBackend(agent::TrainerConfig cfg)
    : cfg_(cfg), trainer_(std::make_unique<agent::Trainer>(std::move(cfg))) {}

nlohmann::json TrainerLearnerBackend::update(const std::vector<Chunk>& chunks) {
  ATTNPILOT_CHECK_ARG(!chunks.empty(), "update needs at least one chunk");
  std::map<std::string, std::vector<torch::Tensor>> parts;
  int64_t steps = 0;
  for (const auto& c : chunks) {
    for (const auto& [name, t] : c.tensors) parts[name].push_back(t);
    steps += c.steps;
  }
  auto cat = [&](const char* name, bool required) -> torch::Tensor {
    auto it = parts.find(name);
    if (it == parts.end() || it->second.size() != chunks.size()) {
      if (!required && it == parts.end()) return {};
      throw FormatError(fmt::format("trajectory chunks lack tensor '{}' (in {} of {})", name,
                                    it == parts.end() ? 0 : it->second.size(), chunks.size()));
    }
    return torch::cat(it->second, 0);
  };
  agent::Batch batch;
  batch.obs = cat("obs", true).to(torch::kFloat32);
  batch.actions = cat("actions", true).to(torch::kInt64);
  batch.logprobs = cat("logprobs", true).to(torch::kFloat32);
  batch.advantages = cat("advantages", true).to(torch::kFloat32);
  batch.returns = cat("returns", true).to(torch::kFloat32);
  batch.values = cat("values", true).to(torch::kFloat32);
  batch.masks = cat("masks", false);
  const int64_t m = batch.size();
  ATTNPILOT_CHECK_ARG(m == steps, "chunks claim {} steps but carry {} rows", steps, m);
  for (const auto* t :
       {&batch.actions, &batch.logprobs, &batch.advantages, &batch.returns, &batch.values}) {
    ATTNPILOT_CHECK_ARG(t->size(0) == m, "chunk tensors disagree on rows: {} vs {}", t->size(0), m);
  }
  const auto& os = trainer_->policy().observation_space().shape;
  ATTNPILOT_CHECK_ARG(batch.obs.dim() == static_cast<int64_t>(os.size()) + 1 &&
                          std::equal(os.begin(), os.end(), batch.obs.sizes().begin() + 1),
                      "observations of shape {} do not match the env's {}",
                      c10::str(batch.obs.sizes()), c10::str(os));
  agent::Learner& learner = trainer_->learner();
  if (cfg_.ppo.anneal_lr) {
    const double frac = std::max(
        0.0, 1.0 - static_cast<double>(steps_used_) / static_cast<double>(cfg_.total_steps));
    learner.set_learning_rate(cfg_.ppo.learning_rate * frac);
  }
  const agent::UpdateMetrics um = learner.update(batch, trainer_->generator());
  steps_used_ += steps;
  return um.to_json();
}

void TrainerLearnerBackend::save(const std::filesystem::path& dir) {
  trainer_->save_checkpoint(dir / "trainer");
  write_file_atomic(dir / "learner_backend.json",
                    nlohmann::json{{"steps_used", steps_used_}}.dump());
}

void TrainerLearnerBackend::load(const std::filesystem::path& dir) {
  trainer_->load_checkpoint(dir / "trainer");
  try {
    steps_used_ = nlohmann::json::parse(read_file(dir / "learner_backend.json"))
                      .at("steps_used")
                      .get<int64_t>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{}: {}", (dir / "learner_backend.json").string(), e.what()));
  }
}

}  // namespace attnpilot::transport
