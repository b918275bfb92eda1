#pragma once
/// Actor-critic networks over the env spaces, and their export format.
///
///   MLP (CleanRL's PPO agent):  obs ─flatten─► [Linear─tanh]×L ─► Linear ─► logits [B, mask]
///                                          └─► [Linear─tanh]×L ─► Linear ─► value [B]
///   Transformer (DR-RL's policy over real token sets):
///     obs [B, T, F] (a 1-D obs [B, D] is D tokens of 1 feature)
///       ─► Linear(F, d) + position embedding [T, d]
///       ─► pre-norm encoder blocks (multi-head self-attention over the T tokens, MLP)
///       ─► per-token head Linear(d, K) ─► logits [B, T*K]   (MultiDiscrete with nvec = [K]*T)
///          pooled (mean over tokens) head Linear(d, n)      (Discrete, other MultiDiscrete)
///       ─► pooled ─► Linear(d, 1) ─► value [B]
///
/// Initialisation draws from an explicit torch::Generator (orthogonal weights, CleanRL's
/// gains: sqrt(2) hidden, 0.01 policy head, 1 value head), so a seed fixes the network.
/// Export: `save_policy(dir)` writes policy.pt (the module's parameters) and
/// policy.json (manifest: format version, kind, spaces, config); `load_policy(dir)` rebuilds
/// the network from the manifest and loads the parameters.
#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/config.h"
#include "env/spaces.h"
#include "policies/distributions.h"

namespace attnpilot::policies {

/// Network hyperparameters. YAML keys (section `policy`): type (mlp|transformer), hidden
/// (list), d_model, heads, layers, ff.
struct PolicyConfig {
  std::string type = "mlp";
  std::vector<int64_t> hidden{64, 64};  ///< MLP hidden widths (actor and critic each)
  int64_t d_model = 32, heads = 2, layers = 1, ff = 64;  ///< transformer
  static PolicyConfig from_config(const Config& cfg);
  nlohmann::json to_json() const;
  static PolicyConfig from_json(const nlohmann::json& j);
};

struct PolicyOutput {
  torch::Tensor logits;  ///< float32 [B, action mask_size]
  torch::Tensor value;   ///< float32 [B]
};

/// Base of the actor-critic networks. `obs` is float32 [B, obs shape...].
class ActorCritic : public torch::nn::Module {
 public:
  ActorCritic(env::Space observation_space, env::Space action_space);
  virtual PolicyOutput forward(const torch::Tensor& obs) = 0;
  /// Value only (cheaper where the network allows).
  virtual torch::Tensor value(const torch::Tensor& obs) { return forward(obs).value; }
  /// The action distribution for `obs` with `mask` (bool [B, mask] or undefined).
  MaskedCategorical distribution(const PolicyOutput& out, const torch::Tensor& mask,
                                 double epsilon = 0.0) const;
  const env::Space& observation_space() const { return obs_space_; }
  const env::Space& action_space() const { return act_space_; }
  /// nvec of the action space ({n} for Discrete).
  const std::vector<int64_t>& action_nvec() const { return nvec_; }
  virtual std::string kind() const = 0;

 protected:
  env::Space obs_space_, act_space_;
  std::vector<int64_t> nvec_;
};

/// Orthogonal initialisation of a Linear layer from `gen` (bias zero).
void init_linear(torch::nn::Linear& layer, double gain, torch::Generator& gen);

class MlpActorCritic : public ActorCritic {
 public:
  MlpActorCritic(env::Space observation_space, env::Space action_space,
                 const std::vector<int64_t>& hidden, torch::Generator& gen);
  PolicyOutput forward(const torch::Tensor& obs) override;
  torch::Tensor value(const torch::Tensor& obs) override;
  std::string kind() const override { return "mlp"; }

 private:
  torch::nn::Sequential actor_{nullptr}, critic_{nullptr};
};

class TransformerActorCritic : public ActorCritic {
 public:
  TransformerActorCritic(env::Space observation_space, env::Space action_space,
                         const PolicyConfig& cfg, torch::Generator& gen);
  PolicyOutput forward(const torch::Tensor& obs) override;
  std::string kind() const override { return "transformer"; }
  /// Whether logits come from per-token heads (MultiDiscrete nvec = [K] * T).
  bool per_token() const { return per_token_; }

 private:
  struct Block {
    torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
    torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
  };
  torch::Tensor encode(const torch::Tensor& obs);
  int64_t tokens_, features_, d_model_, heads_;
  bool per_token_ = false;
  torch::nn::Linear embed_{nullptr}, policy_head_{nullptr}, value_head_{nullptr};
  torch::Tensor pos_;
  torch::nn::LayerNorm ln_final_{nullptr};
  std::vector<Block> blocks_;
};

/// Builds the network named by cfg.type for the given spaces (Box action spaces throw
/// Unavailable: only categorical action spaces are supported).
std::shared_ptr<ActorCritic> make_policy(const PolicyConfig& cfg, const env::Space& obs_space,
                                         const env::Space& act_space, torch::Generator& gen);

/// Manifest format version written by save_policy.
inline constexpr int kPolicyFormatVersion = 1;
/// Writes `dir`/policy.pt and `dir`/policy.json (dir must exist). `extra` is merged into
/// the manifest (env name, normalisation statistics, ...).
void save_policy(const ActorCritic& policy, const PolicyConfig& cfg,
                 const std::filesystem::path& dir,
                 const nlohmann::json& extra = nlohmann::json::object());
/// Rebuilds and loads a policy written by save_policy; throws FormatError on a bad
/// manifest (naming the field) or IoError when files are missing.
std::shared_ptr<ActorCritic> load_policy(const std::filesystem::path& dir,
                                         nlohmann::json* manifest = nullptr);

}  // namespace attnpilot::policies
