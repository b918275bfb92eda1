#pragma once
/// The rank-selection environment ("RankSelection-v0"): DR-RL's MDP over a real model.
///
/// An episode is one window of `sequence_length` tokens of a text split, processed in
/// segments of `segment` tokens through the model with a KV cache. Each step decides, for
/// every (layer, group of `group_size` query heads), the rank of the query–key scores for
/// the next segment, from the grid `ranks` (the head dim, always on the grid, means exact
/// dense scores). One step covers all layers at once because a layer's inputs depend on
/// every earlier layer's plan: one segment forward per step keeps the MDP exact and cheap.
///
///   step t (segment [tT, tT+T)):
///     obs_t (spectra after segments < t) ──policy──► ranks[L, G] ──► LayerPlans
///     model.forward(segment, cache, before_attention):
///       layer l: q_t, k_t ──► SubspaceTracker_l.update (Gram += ; warm-started SVD)
///                        ──► a_q, a_k (optimal rank-R projections of all tokens so far)
///                        ──► run_attention(lowrank r ≤ R | dense)
///     reward_t = α·fidelity − β·cost − γ·perturbation      (each defined below)
///     obs_{t+1}, mask_{t+1} from the trackers' spectra after segment t
///
/// * fidelity = w_cos·cos + w_kl·exp(−KL): cos is the mean cosine similarity of every
///   layer's output (residual stream) with the dense model's on the same tokens, KL the
///   mean KL(dense ‖ this) of the next-token distributions over the segment. 1 = identical.
/// * cost: "flops": attention-score FLOPs of the segment (rank-r scores plus the use of
///   the projections, Q·A_Q and K·A_K, as ExecStats reports them, i.e. as the kernels
///   execute them) over the dense model's on the same segment (run once per window, segment
///   by segment with its own cache, which is also the fidelity reference); "time": the calibrated
///   cost model's predicted time of the executed plans over its predicted dense time
///   (attention/cost_model.h).
/// * perturbation: mean over heads of ‖S_r − S_r'‖_F / ‖S‖_F when a head's rank moves from
///   r (previous segment) to r' (perturbation/bounds.h rank_change_frobenius; 0 if equal).
///
/// The guardrail masks, per group, every rank whose relative score error
/// ‖S − S_r‖_F/‖S‖_F (the exact Eckart–Young tail of the accumulated scores, from the
/// trackers' spectra known before the step) exceeds `epsilon` for some head of the group;
/// the head dim is always allowed. Before the first segment no spectrum is known, so only
/// the head dim is allowed then. A guardrail violation is an executed rank whose error,
/// on the spectrum the executed projections came from (after absorbing the segment),
/// exceeds epsilon; info reports them (with the guardrail off every action is allowed and
/// violations are still counted).
///
/// Observation: [groups, features] float32, one token per (layer, group), see
/// feature_names(). Action: MultiDiscrete([len(ranks)] * groups), mask [groups·len(ranks)].
#include <torch/torch.h>

#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/config.h"
#include "env/env.h"

namespace attnpilot::model {
class TransformerImpl;
}
namespace attnpilot::perturbation {
class SubspaceTracker;
}
namespace attnpilot::attention {
class KVCache;
class CostModel;
}  // namespace attnpilot::attention

namespace attnpilot::env {

/// Keys of the `env` config section (YAML names in brackets).
struct RankEnvConfig {
  std::string model;              ///< [model] checkpoint folder (config.json, tokenizer.model)
  std::string split = "train";    ///< [split] train | validation (of the model's corpus)
  std::string cache_dir;          ///< [cache_dir] token cache; "" = MODEL/../cache
  int64_t sequence_length = 256;  ///< [sequence_length] tokens per episode
  int64_t segment = 64;           ///< [segment] tokens per step (divides sequence_length)
  std::vector<int64_t> ranks{4, 8, 16, 32};  ///< [ranks] grid; the head dim is added if absent
  int64_t group_size = 1;         ///< [group_size] query heads per decision (divides heads)
  int64_t max_sequences = 0;      ///< [max_sequences] use only the first N windows (0: all)
  double alpha = 50.0;            ///< [reward.alpha] fidelity weight
  double beta = 1.0;              ///< [reward.beta] cost weight
  double gamma = 1.0;             ///< [reward.gamma] perturbation weight
  double cosine_weight = 0.25;    ///< [reward.cosine_weight]
  double kl_weight = 0.75;        ///< [reward.kl_weight]
  std::string cost = "flops";     ///< [reward.cost] flops | time
  std::string cost_model;         ///< [reward.cost_model] calibrate's JSON (cost: time)
  bool guardrail = true;          ///< [guardrail.enabled]
  double epsilon = 0.3;           ///< [guardrail.epsilon] allowed relative score error
  int64_t spectrum_features = 4;  ///< [spectrum_features] σ_2..σ_{k+1} / σ_1 per token

  /// Reads the keys above from an env section; InvalidArgument names a bad key or value.
  static RankEnvConfig from_config(const Config& cfg);
  nlohmann::json to_json() const;
};

/// What one step did (also reported through Info scalars of the same names).
struct RankStepRecord {
  double fidelity = 0, cosine = 0, kl = 0, cost = 0, perturbation = 0, reward = 0;
  double score_flops = 0;         ///< ExecStats score_flops + other_flops (projection use)
  double dense_score_flops = 0;   ///< the same, of the dense model on the same segment
  double dense_attn_time_us = 0;  ///< measured attention time of the dense model, same segment
  double control_flops = 0;       ///< tracker work (Gram updates, factorisations), estimated
  double attn_time_us = 0;        ///< measured attention time (ExecStats.time_us)
  double predicted_time_us = 0, predicted_dense_time_us = 0;  ///< cost: time only
  double nll_sum = 0, dense_nll_sum = 0;  ///< next-token NLL over the segment's targets
  int64_t tokens = 0;                     ///< predicted tokens in the segment
  int64_t violations = 0;                 ///< executed ranks above epsilon (see file comment)
  int64_t decisions = 0;                  ///< (layer, head) executions
  torch::Tensor ranks;                    ///< int64 [layers, heads] executed ranks
};

class RankEnv : public Env {
 public:
  explicit RankEnv(RankEnvConfig cfg);
  ~RankEnv() override;

  std::string name() const override { return "RankSelection-v0"; }
  const Space& observation_space() const override { return obs_space_; }
  const Space& action_space() const override { return act_space_; }
  torch::Tensor reset(uint64_t seed) override;
  torch::Tensor reset() override;
  StepResult step(const torch::Tensor& action) override;
  bool has_action_mask() const override { return true; }
  torch::Tensor action_mask() const override;
  /// {rng, window, actions of the episode so far}; load_state replays the actions, which
  /// rebuilds the cache and trackers exactly (the env is deterministic given them).
  nlohmann::json save_state() const override;
  void load_state(const nlohmann::json& state) override;

  /// Starts an episode on window `index` of the split (evaluation walks them in order).
  torch::Tensor reset_to_window(int64_t index);
  int64_t num_windows() const { return static_cast<int64_t>(windows_.size()); }
  int64_t window() const { return window_; }
  /// Tokens of the current episode's window, int64 [1, sequence_length].
  const torch::Tensor& window_tokens() const { return tokens_; }

  const RankEnvConfig& config() const { return cfg_; }
  const std::vector<int64_t>& ranks() const { return ranks_; }
  int64_t num_layers() const { return layers_; }
  int64_t num_heads() const { return heads_; }
  int64_t head_dim() const { return head_dim_; }
  int64_t groups_per_layer() const { return heads_ / cfg_.group_size; }
  int64_t num_groups() const { return layers_ * groups_per_layer(); }
  int64_t num_segments() const { return cfg_.sequence_length / cfg_.segment; }
  /// Segments already processed in this episode.
  int64_t segment_index() const { return t_; }
  /// Whether a spectrum is known (after the first segment).
  bool spectrum_known() const { return t_ > 0; }
  /// Retained energy Σ_{i≤r}σ_i²/Σσ_i² of the accumulated scores at every grid rank, per
  /// (layer, head), from the spectra known now: float64 [layers, heads, len(ranks)];
  /// zeros before the first segment.
  torch::Tensor head_energy() const;
  /// Names of the observation features, in order.
  std::vector<std::string> feature_names() const;
  /// The record of the last step.
  const RankStepRecord& last() const { return last_; }
  /// Grid index of the head dim (exact scores).
  int64_t full_rank_index() const { return full_index_; }
  /// The action that puts `rank_index` on every group.
  torch::Tensor uniform_action(int64_t rank_index) const;

 private:
  void start_episode(int64_t window);
  torch::Tensor observe() const;
  StepResult do_step(const torch::Tensor& action, bool record_action);

  RankEnvConfig cfg_;
  std::shared_ptr<model::TransformerImpl> model_;
  std::vector<std::vector<int32_t>> windows_;
  std::vector<int64_t> ranks_;
  int64_t layers_ = 0, heads_ = 0, kv_heads_ = 0, head_dim_ = 0, vocab_ = 0, full_index_ = 0;
  int64_t tracked_rank_ = 0;
  Space obs_space_, act_space_;
  std::unique_ptr<attention::CostModel> cost_model_;
  std::mt19937_64 rng_;

  // Episode state.
  int64_t window_ = -1, t_ = 0, dense_window_ = -1;
  bool active_ = false;
  torch::Tensor tokens_;                     // [1, L] int64
  std::vector<torch::Tensor> dense_hidden_;  // per layer [L, hidden] float32
  torch::Tensor dense_logp_;                 // [L, vocab]
  torch::Tensor dense_entropy_;              // [L]
  std::vector<double> dense_flops_, dense_time_us_;  // per segment, as executed
  std::unique_ptr<attention::KVCache> cache_;
  std::vector<std::unique_ptr<perturbation::SubspaceTracker>> trackers_;
  torch::Tensor sigma_;       // [layers, heads, p] float64: spectra after the last segment
  torch::Tensor fro2_;        // [layers, heads] ‖C‖_F²
  torch::Tensor core_prev_;   // [layers, heads, d, d] cores after the segment before
  torch::Tensor drift_;       // [layers, heads] ‖C_t − C_{t−1}‖_F / ‖C_t‖_F
  torch::Tensor prev_ranks_;  // [layers, heads] int64 executed ranks of the last segment
  torch::Tensor prev_index_;  // [groups] int64 grid index chosen last
  double prev_fidelity_ = 1, prev_kl_ = 0;
  std::vector<std::vector<int64_t>> actions_;
  RankStepRecord last_;
};

/// Retained energy at rank r from leading singular values sigma [..., p] (descending) and
/// the total energy fro2 [...] = Σ all σ²: min(1, Σ_{i≤min(r,p)}σ_i² / fro2); 1 where
/// fro2 = 0 or r >= d. Shared by the guardrail mask and the baselines.
torch::Tensor retained_energy(const torch::Tensor& sigma, const torch::Tensor& fro2, int64_t rank,
                              int64_t head_dim);

}  // namespace attnpilot::env
