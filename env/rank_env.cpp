#include "env/rank_env.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "attention/cost_model.h"
#include "attention/kv_cache.h"
#include "attention/plan.h"
#include "common/error.h"
#include "common/log.h"
#include "env/toy_envs.h"
#include "model/checkpoint.h"
#include "model/corpus.h"
#include "model/lm_train.h"
#include "model/tokenizer.h"
#include "model/transformer.h"
#include "perturbation/tracker.h"

namespace attnpilot::env {

namespace fs = std::filesystem;
using attention::HeadPlan;
using attention::LayerPlan;

namespace {

constexpr const char* kName = "RankSelection-v0";
// The trackers' block beyond the tracked rank: r + 4, not the tracker's default
// (perturbation::default_oversample, tuned for the GPU top-r update of 128×128 cores). With
// that default (p = d = 32 at the quickstart's tracked rank 24) the demo's PPO policy kept
// every head dense (2026-12-06; with r + 4 it had chosen lower ranks at +0.13% perplexity).
constexpr int64_t kOversample = 4;

// Estimated FLOPs of the tracker's work (Golub & Van Loan operation counts): Gram updates
// 2·T·d² each for Q and K; per Gram root a symmetric eigendecomposition with vectors
// (≈ 9d³) and two d×d products to assemble root and pseudo-inverse (4d³); the core product
// (2d³); the projections R⁺U_rΣ_r^½ (2·2·d²·p); each subspace iteration C·V and Cᵀ·U
// (4d²p) plus two thin QRs (8dp²); each recomputation a full d×d SVD (≈ 21d³).
double tracker_flops(int64_t heads, int64_t t, int64_t d, int64_t p, int64_t iterations,
                     int64_t recomputations) {
  const double dd = static_cast<double>(d);
  const double per_head =
      4.0 * t * dd * dd + 2.0 * 13.0 * dd * dd * dd + 2.0 * dd * dd * dd + 4.0 * dd * dd * p;
  return heads * per_head + iterations * (4.0 * dd * dd * p + 8.0 * dd * p * p) +
         recomputations * 21.0 * dd * dd * dd;
}

std::vector<std::vector<int32_t>> make_windows(const RankEnvConfig& cfg,
                                               const model::Tokenizer& tok) {
  const fs::path dir(cfg.model);
  model::TrainingState st;
  std::vector<fs::path> corpus_paths = {model::kFortunesDir};
  double fraction = 0.05;
  if (model::TrainingState::read(dir, &st)) {
    corpus_paths.assign(st.corpus.begin(), st.corpus.end());
    fraction = st.validation_fraction;
  }
  const model::Corpus corpus = model::load_corpus(corpus_paths, fraction);
  const fs::path cache =
      cfg.cache_dir.empty() ? dir.parent_path() / "cache" : fs::path(cfg.cache_dir);
  const model::TokenizedCorpus tc = model::tokenize_corpus(corpus, tok, cache);
  const auto& docs = cfg.split == "train" ? tc.train : tc.validation;
  // One stream <s> doc </s> <s> doc </s> ..., as in pretraining, cut into whole windows.
  std::vector<std::vector<int32_t>> windows;
  std::vector<int32_t> cur;
  cur.reserve(cfg.sequence_length);
  auto push = [&](int32_t id) {
    cur.push_back(id);
    if (static_cast<int64_t>(cur.size()) == cfg.sequence_length) {
      windows.push_back(cur);
      cur.clear();
    }
  };
  for (const auto& d : docs) {
    if (cfg.max_sequences > 0 && static_cast<int64_t>(windows.size()) >= cfg.max_sequences) break;
    push(tok.bos_id());
    for (int32_t id : d) push(id);
    push(tok.eos_id());
  }
  if (cfg.max_sequences > 0 && static_cast<int64_t>(windows.size()) > cfg.max_sequences)
    windows.resize(cfg.max_sequences);
  ATTNPILOT_CHECK_ARG(!windows.empty(),
                      "{}: the {} split of {} holds no window of {} tokens ({} documents)", kName,
                      cfg.split, cfg.model, cfg.sequence_length, docs.size());
  return windows;
}

}  // namespace

torch::Tensor retained_energy(const torch::Tensor& sigma, const torch::Tensor& fro2, int64_t rank,
                              int64_t head_dim) {
  if (rank >= head_dim) return torch::ones_like(fro2);
  const int64_t k = std::min<int64_t>(rank, sigma.size(-1));
  const auto kept = sigma.narrow(-1, 0, k).square().sum(-1);
  const auto safe = torch::where(fro2 > 0, fro2, torch::ones_like(fro2));
  return torch::where(fro2 > 0, (kept / safe).clamp(0.0, 1.0), torch::ones_like(fro2));
}

RankEnvConfig RankEnvConfig::from_config(const Config& cfg) {
  RankEnvConfig c;
  c.model = cfg.require<std::string>("model");
  c.split = cfg.get<std::string>("split", c.split);
  c.cache_dir = cfg.get<std::string>("cache_dir", c.cache_dir);
  c.sequence_length = cfg.get<int64_t>("sequence_length", c.sequence_length);
  c.segment = cfg.get<int64_t>("segment", c.segment);
  c.ranks = cfg.get<std::vector<int64_t>>("ranks", c.ranks);
  c.group_size = cfg.get<int64_t>("group_size", c.group_size);
  c.max_sequences = cfg.get<int64_t>("max_sequences", c.max_sequences);
  c.spectrum_features = cfg.get<int64_t>("spectrum_features", c.spectrum_features);
  const Config r = cfg.section("reward");
  c.alpha = r.get<double>("alpha", c.alpha);
  c.beta = r.get<double>("beta", c.beta);
  c.gamma = r.get<double>("gamma", c.gamma);
  c.cosine_weight = r.get<double>("cosine_weight", c.cosine_weight);
  c.kl_weight = r.get<double>("kl_weight", c.kl_weight);
  c.cost = r.get<std::string>("cost", c.cost);
  c.cost_model = r.get<std::string>("cost_model", c.cost_model);
  const Config g = cfg.section("guardrail");
  c.guardrail = g.get<bool>("enabled", c.guardrail);
  c.epsilon = g.get<double>("epsilon", c.epsilon);
  return c;
}

nlohmann::json RankEnvConfig::to_json() const {
  return {{"model", model},
          {"split", split},
          {"cache_dir", cache_dir},
          {"sequence_length", sequence_length},
          {"segment", segment},
          {"ranks", ranks},
          {"group_size", group_size},
          {"max_sequences", max_sequences},
          {"spectrum_features", spectrum_features},
          {"reward",
           {{"alpha", alpha},
            {"beta", beta},
            {"gamma", gamma},
            {"cosine_weight", cosine_weight},
            {"kl_weight", kl_weight},
            {"cost", cost},
            {"cost_model", cost_model}}},
          {"guardrail", {{"enabled", guardrail}, {"epsilon", epsilon}}}};
}

RankEnv::RankEnv(RankEnvConfig cfg) : cfg_(std::move(cfg)) {
  ATTNPILOT_CHECK_ARG(!cfg_.model.empty(), "{}: env.model (a checkpoint folder) is required",
                      kName);
  ATTNPILOT_CHECK_ARG(cfg_.split == "train" || cfg_.split == "validation",
                      "{}: env.split '{}' must be train or validation", kName, cfg_.split);
  ATTNPILOT_CHECK_ARG(cfg_.segment >= 1 && cfg_.sequence_length >= cfg_.segment &&
                          cfg_.sequence_length % cfg_.segment == 0,
                      "{}: env.segment {} must be >= 1 and divide env.sequence_length {}", kName,
                      cfg_.segment, cfg_.sequence_length);
  ATTNPILOT_CHECK_ARG(cfg_.max_sequences >= 0, "{}: env.max_sequences {} must be >= 0", kName,
                      cfg_.max_sequences);
  ATTNPILOT_CHECK_ARG(cfg_.spectrum_features >= 0 && cfg_.spectrum_features <= 64,
                      "{}: env.spectrum_features {} must be in [0, 64]", kName,
                      cfg_.spectrum_features);
  for (double w : {cfg_.alpha, cfg_.beta, cfg_.gamma, cfg_.cosine_weight, cfg_.kl_weight})
    ATTNPILOT_CHECK_ARG(std::isfinite(w) && w >= 0,
                        "{}: reward weights must be finite and >= 0; got {}", kName, w);
  ATTNPILOT_CHECK_ARG(cfg_.cosine_weight + cfg_.kl_weight > 0,
                      "{}: env.reward.cosine_weight + kl_weight must be > 0", kName);
  ATTNPILOT_CHECK_ARG(cfg_.cost == "flops" || cfg_.cost == "time",
                      "{}: env.reward.cost '{}' must be flops or time", kName, cfg_.cost);
  ATTNPILOT_CHECK_ARG(cfg_.epsilon > 0 && cfg_.epsilon <= 1,
                      "{}: env.guardrail.epsilon {} must be in (0, 1]", kName, cfg_.epsilon);

  const fs::path dir(cfg_.model);
  model::Transformer m = model::load_model(dir, torch::kCPU);
  m->eval();
  model_ = m.ptr();
  const auto& mc = model_->config();
  layers_ = mc.num_layers;
  heads_ = mc.num_heads;
  kv_heads_ = mc.num_kv_heads;
  head_dim_ = mc.head_dim;
  vocab_ = mc.vocab_size;
  ATTNPILOT_CHECK_ARG(cfg_.sequence_length <= mc.max_position_embeddings,
                      "{}: env.sequence_length {} exceeds the model's max_position_embeddings {}",
                      kName, cfg_.sequence_length, mc.max_position_embeddings);
  ATTNPILOT_CHECK_ARG(cfg_.group_size >= 1 && heads_ % cfg_.group_size == 0,
                      "{}: env.group_size {} must divide the model's {} query heads", kName,
                      cfg_.group_size, heads_);
  ATTNPILOT_CHECK_ARG(!cfg_.ranks.empty(), "{}: env.ranks is empty", kName);
  ranks_ = cfg_.ranks;
  for (int64_t r : ranks_)
    ATTNPILOT_CHECK_ARG(r >= 1 && r <= head_dim_,
                        "{}: env.ranks holds {}; ranks must be in [1, {}]", kName, r, head_dim_);
  if (std::find(ranks_.begin(), ranks_.end(), head_dim_) == ranks_.end())
    ranks_.push_back(head_dim_);
  std::sort(ranks_.begin(), ranks_.end());
  ranks_.erase(std::unique(ranks_.begin(), ranks_.end()), ranks_.end());
  full_index_ = static_cast<int64_t>(ranks_.size()) - 1;
  tracked_rank_ = ranks_.size() > 1 ? ranks_[ranks_.size() - 2] : 0;

  if (cfg_.cost == "time") {
    ATTNPILOT_CHECK_ARG(!cfg_.cost_model.empty(),
                        "{}: env.reward.cost is time but env.reward.cost_model (the file "
                        "`attnpilot calibrate` writes) is not set",
                        kName);
    cost_model_ =
        std::make_unique<attention::CostModel>(attention::CostModel::load(cfg_.cost_model));
  }

  const auto tok = model::Tokenizer::load(dir / "tokenizer.model");
  windows_ = make_windows(cfg_, tok);

  const int64_t K = static_cast<int64_t>(ranks_.size());
  obs_space_ =
      Space::box({num_groups(), static_cast<int64_t>(feature_names().size())}, -INFINITY, INFINITY);
  act_space_ = Space::multi_discrete(std::vector<int64_t>(num_groups(), K));
  rng_.seed(0);
}

RankEnv::~RankEnv() = default;

std::vector<std::string> RankEnv::feature_names() const {
  std::vector<std::string> f = {"layer", "group", "segment", "spectrum_known"};
  for (int64_t r : ranks_) f.push_back(fmt::format("energy_r{}", r));
  for (int64_t i = 0; i < cfg_.spectrum_features; ++i)
    f.push_back(fmt::format("sigma{}_over_sigma1", i + 2));
  for (const char* n : {"drift", "previous_rank", "previous_fidelity", "previous_kl",
                        "dense_entropy", "cached_fraction"})
    f.push_back(n);
  return f;
}

torch::Tensor RankEnv::reset(uint64_t seed) {
  rng_.seed(seed);
  return reset();
}

torch::Tensor RankEnv::reset() {
  std::uniform_int_distribution<int64_t> pick(0, num_windows() - 1);
  start_episode(pick(rng_));
  return observe();
}

torch::Tensor RankEnv::reset_to_window(int64_t index) {
  ATTNPILOT_CHECK_ARG(index >= 0 && index < num_windows(), "{}: window {} outside [0, {})", kName,
                      index, num_windows());
  start_episode(index);
  return observe();
}

void RankEnv::start_episode(int64_t window) {
  torch::NoGradGuard no_grad;
  window_ = window;
  t_ = 0;
  active_ = true;
  actions_.clear();
  const auto& w = windows_[window];
  tokens_ = torch::tensor(std::vector<int64_t>(w.begin(), w.end()), torch::kInt64).unsqueeze(0);
  // The dense reference of a window is a pure function of it: recomputed only when the
  // window changes (the oracle's probe replays one window many times).
  if (dense_window_ != window) {
    // Segment by segment with its own cache, exactly as the steps run, so that each
    // segment's dense ExecStats (FLOPs as executed, measured time) is the cost reference.
    attention::KVCache dc(layers_);
    std::vector<std::vector<torch::Tensor>> hidden(layers_);
    std::vector<torch::Tensor> logits;
    dense_flops_.clear();
    dense_time_us_.clear();
    for (int64_t t = 0; t < num_segments(); ++t) {
      model::ForwardOptions fo;
      fo.capture = true;
      fo.cache = &dc;
      auto out = model_->forward(tokens_.narrow(1, t * cfg_.segment, cfg_.segment), fo);
      for (int64_t l = 0; l < layers_; ++l) hidden[l].push_back(out.layers[l].hidden_out[0]);
      logits.push_back(out.logits[0]);
      dense_flops_.push_back(out.stats.score_flops + out.stats.other_flops);
      dense_time_us_.push_back(out.stats.time_us);
    }
    dense_hidden_.clear();
    for (auto& h : hidden) dense_hidden_.push_back(torch::cat(h, 0));
    dense_logp_ = torch::log_softmax(torch::cat(logits, 0).to(torch::kFloat32), -1);
    dense_entropy_ = -(dense_logp_.exp() * dense_logp_).sum(-1);
    dense_window_ = window;
  }

  cache_ = std::make_unique<attention::KVCache>(layers_);
  trackers_.clear();
  const int64_t p = tracked_rank_ > 0 ? std::min(head_dim_, tracked_rank_ + kOversample) : 1;
  if (tracked_rank_ > 0) {
    for (int64_t l = 0; l < layers_; ++l) {
      perturbation::TrackerOptions to;
      to.rank = tracked_rank_;
      to.oversample = kOversample;
      to.seed = static_cast<uint64_t>(l);
      trackers_.push_back(std::make_unique<perturbation::SubspaceTracker>(head_dim_, to));
    }
  }
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  sigma_ = torch::zeros({layers_, heads_, p}, f64);
  fro2_ = torch::zeros({layers_, heads_}, f64);
  core_prev_ = torch::Tensor();
  drift_ = torch::zeros({layers_, heads_}, f64);
  prev_ranks_ = torch::full({layers_, heads_}, head_dim_, torch::kInt64);
  prev_index_ = torch::full({num_groups()}, full_index_, torch::kInt64);
  prev_fidelity_ = 1;
  prev_kl_ = 0;
  last_ = RankStepRecord();
}

torch::Tensor RankEnv::head_energy() const {
  const int64_t K = static_cast<int64_t>(ranks_.size());
  auto e = torch::zeros({layers_, heads_, K}, torch::kFloat64);
  if (!spectrum_known()) return e;
  for (int64_t k = 0; k < K; ++k)
    e.select(2, k).copy_(retained_energy(sigma_, fro2_, ranks_[k], head_dim_));
  return e;
}

torch::Tensor RankEnv::action_mask() const {
  const int64_t K = static_cast<int64_t>(ranks_.size()), G = num_groups();
  if (!cfg_.guardrail) return torch::ones({G * K}, torch::kBool);
  auto mask = torch::zeros({G, K}, torch::kBool);
  mask.select(1, full_index_).fill_(true);
  if (active_ && spectrum_known()) {
    // Relative Frobenius tail sqrt(1 − energy) of every head, worst head of each group.
    const auto tail = (1.0 - head_energy()).clamp_min(0.0).sqrt();  // [L, H, K]
    const auto worst =
        std::get<0>(tail.view({layers_, groups_per_layer(), cfg_.group_size, K}).max(2));
    mask = mask | (worst.reshape({G, K}) <= cfg_.epsilon);
  }
  return mask.reshape({G * K});
}

torch::Tensor RankEnv::uniform_action(int64_t rank_index) const {
  ATTNPILOT_CHECK_ARG(rank_index >= 0 && rank_index < static_cast<int64_t>(ranks_.size()),
                      "{}: rank index {} outside [0, {})", kName, rank_index, ranks_.size());
  return torch::full({num_groups()}, rank_index, torch::kInt64);
}

torch::Tensor RankEnv::observe() const {
  const int64_t K = static_cast<int64_t>(ranks_.size()), G = num_groups();
  const int64_t gpl = groups_per_layer(), gs = cfg_.group_size;
  const int64_t F = static_cast<int64_t>(feature_names().size());
  auto obs = torch::zeros({G, F}, torch::kFloat32);
  auto a = obs.accessor<float, 2>();
  const bool known = spectrum_known();
  const auto energy = head_energy();  // [L, H, K]
  const int64_t S = num_segments(), T = cfg_.segment;
  double entropy = 0;
  if (t_ > 0) {
    const int64_t from = (t_ - 1) * T;
    entropy = dense_entropy_.narrow(0, from, T).mean().item<double>() / std::log(vocab_);
  }
  const auto ratio_all = [&] {
    const auto s1 = sigma_.select(2, 0).unsqueeze(-1);
    return torch::where(s1 > 0, sigma_ / torch::where(s1 > 0, s1, torch::ones_like(s1)),
                        torch::zeros_like(sigma_));
  }();
  const int64_t p = sigma_.size(2);
  for (int64_t l = 0; l < layers_; ++l) {
    for (int64_t g = 0; g < gpl; ++g) {
      const int64_t row = l * gpl + g;
      const auto heads = torch::indexing::Slice(g * gs, (g + 1) * gs);
      int64_t j = 0;
      a[row][j++] = layers_ > 1 ? static_cast<float>(l) / (layers_ - 1) : 0.f;
      a[row][j++] = gpl > 1 ? static_cast<float>(g) / (gpl - 1) : 0.f;
      a[row][j++] = static_cast<float>(t_) / S;
      a[row][j++] = known ? 1.f : 0.f;
      const auto e = std::get<0>(energy[l].index({heads}).min(0));  // [K]
      for (int64_t k = 0; k < K; ++k) a[row][j++] = e[k].item<float>();
      const auto ratio = ratio_all[l].index({heads}).mean(0);  // [p]
      for (int64_t i = 0; i < cfg_.spectrum_features; ++i)
        a[row][j++] = (i + 1 < p) ? ratio[i + 1].item<float>() : 0.f;
      a[row][j++] = drift_[l].index({heads}).mean().item<float>();
      a[row][j++] = K > 1 ? static_cast<float>(prev_index_[row].item<int64_t>()) / (K - 1) : 0.f;
      a[row][j++] = static_cast<float>(prev_fidelity_);
      a[row][j++] = static_cast<float>(prev_kl_);
      a[row][j++] = static_cast<float>(entropy);
      a[row][j++] = static_cast<float>(t_ * T) / cfg_.sequence_length;
    }
  }
  return obs;
}

StepResult RankEnv::step(const torch::Tensor& action) { return do_step(action, true); }

StepResult RankEnv::do_step(const torch::Tensor& action, bool record_action) {
  ATTNPILOT_CHECK_ARG(active_, "{}: step() before reset() or after the episode ended", kName);
  act_space_.check(action, "action");
  torch::NoGradGuard no_grad;
  const int64_t K = static_cast<int64_t>(ranks_.size()), G = num_groups();
  const int64_t gpl = groups_per_layer(), gs = cfg_.group_size, T = cfg_.segment;
  const auto idx = action.to(torch::kInt64).contiguous();
  const auto mask = action_mask().view({G, K});
  std::vector<int64_t> chosen(idx.data_ptr<int64_t>(), idx.data_ptr<int64_t>() + G);
  for (int64_t g = 0; g < G; ++g)
    ATTNPILOT_CHECK_ARG(mask[g][chosen[g]].item<bool>(),
                        "{}: rank {} for layer {} head group {} is masked by the guardrail at "
                        "segment {} (allowed: the ranks whose relative score error <= {})",
                        kName, ranks_[chosen[g]], g / gpl, g % gpl, t_, cfg_.epsilon);

  // Plans and executed ranks.
  auto ranks = torch::empty({layers_, heads_}, torch::kInt64);
  std::vector<std::vector<LayerPlan>> plans(layers_);
  std::vector<bool> any_lowrank(layers_, false);
  for (int64_t l = 0; l < layers_; ++l) {
    LayerPlan lp;
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t r = ranks_[chosen[l * gpl + h / gs]];
      ranks[l][h] = r;
      if (r >= head_dim_) {
        lp.heads.push_back(HeadPlan::dense());
      } else {
        lp.heads.push_back(HeadPlan::lowrank(r));
        any_lowrank[l] = true;
      }
    }
    plans[l] = {lp};
  }

  int64_t iters0 = 0, recomp0 = 0;
  for (const auto& tr : trackers_) {
    iters0 += tr->stats().iterations;
    recomp0 += tr->stats().recomputations;
  }
  const int64_t s0 = t_ * T;
  const auto seg = tokens_.narrow(1, s0, T);
  model::ForwardOptions fo;
  fo.plans = &plans;
  fo.capture = true;
  fo.cache = cache_.get();
  const int64_t group = heads_ / kv_heads_;
  fo.before_attention = [&](int64_t l, const torch::Tensor& q, const torch::Tensor& k,
                            attention::AttentionInputs& in) {
    if (trackers_.empty()) return;
    auto& tr = *trackers_[l];
    tr.update(q[0], k[0].repeat_interleave(group, 0));
    if (any_lowrank[l]) {
      const auto pr = tr.projections();
      in.a_q = pr.a_q.unsqueeze(0).to(q.scalar_type());
      in.a_k = pr.a_k.unsqueeze(0).to(q.scalar_type());
    }
  };
  auto out = model_->forward(seg, fo);

  RankStepRecord rec;
  rec.ranks = ranks;
  rec.decisions = layers_ * heads_;
  // Spectra after absorbing this segment (what the executed projections came from).
  const int64_t p = sigma_.size(2);
  auto sigma = torch::zeros_like(sigma_);
  auto fro2 = torch::zeros_like(fro2_);
  std::vector<torch::Tensor> cores;
  int64_t iters1 = 0, recomp1 = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(trackers_.size()); ++l) {
    const auto& tr = *trackers_[l];
    sigma[l].copy_(tr.sigma().narrow(-1, 0, p));
    const auto c = tr.core();
    fro2[l].copy_(c.square().sum({-2, -1}));
    cores.push_back(c);
    iters1 += tr.stats().iterations;
    recomp1 += tr.stats().recomputations;
  }
  // Violations and the perturbation term, per head, on the new spectra.
  double pert = 0;
  for (int64_t l = 0; l < layers_; ++l) {
    for (int64_t h = 0; h < heads_; ++h) {
      const int64_t r = ranks[l][h].item<int64_t>(), rp = prev_ranks_[l][h].item<int64_t>();
      const auto s = sigma[l][h];
      const auto f = fro2[l][h];
      const double e_r = retained_energy(s, f, r, head_dim_).item<double>();
      if (r < head_dim_ && std::sqrt(std::max(0.0, 1.0 - e_r)) > cfg_.epsilon) ++rec.violations;
      if (r != rp) {
        const double e_p = retained_energy(s, f, rp, head_dim_).item<double>();
        pert += std::sqrt(std::abs(e_r - e_p));
      }
    }
  }
  rec.perturbation = pert / (layers_ * heads_);

  // Fidelity against the dense model on the same tokens.
  double cos = 0;
  for (int64_t l = 0; l < layers_; ++l) {
    const auto mine = out.layers[l].hidden_out[0];
    const auto ref = dense_hidden_[l].narrow(0, s0, T);
    cos += torch::cosine_similarity(mine, ref, -1).mean().item<double>();
  }
  rec.cosine = cos / layers_;
  const auto logp = torch::log_softmax(out.logits[0].to(torch::kFloat32), -1);  // [T, V]
  const auto ref_logp = dense_logp_.narrow(0, s0, T);
  rec.kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).mean().item<double>();
  rec.kl = std::max(0.0, rec.kl);
  rec.fidelity = (cfg_.cosine_weight * rec.cosine + cfg_.kl_weight * std::exp(-rec.kl)) /
                 (cfg_.cosine_weight + cfg_.kl_weight);
  // Next-token NLL over the segment's targets (the window's last token has none).
  const int64_t L = cfg_.sequence_length;
  const int64_t n_pred = std::min(T, L - 1 - s0);
  if (n_pred > 0) {
    const auto targets = tokens_[0].narrow(0, s0 + 1, n_pred).unsqueeze(1);
    rec.nll_sum = -logp.narrow(0, 0, n_pred).gather(1, targets).sum().item<double>();
    rec.dense_nll_sum = -ref_logp.narrow(0, 0, n_pred).gather(1, targets).sum().item<double>();
    rec.tokens = n_pred;
  }

  // Cost.
  const int64_t M = s0 + T;
  rec.dense_score_flops = dense_flops_[t_];
  rec.dense_attn_time_us = dense_time_us_[t_];
  rec.score_flops = out.stats.score_flops + out.stats.other_flops;
  rec.attn_time_us = out.stats.time_us;
  rec.control_flops =
      trackers_.empty() ? 0.0
                        : layers_ * tracker_flops(heads_, T, head_dim_, p, 0, 0) +
                              tracker_flops(0, T, head_dim_, p, iters1 - iters0, recomp1 - recomp0);
  if (cost_model_) {
    for (int64_t l = 0; l < layers_; ++l) {
      std::map<int64_t, int64_t> count;  // rank -> heads
      for (int64_t h = 0; h < heads_; ++h) ++count[ranks[l][h].item<int64_t>()];
      for (const auto& [r, n] : count) {
        const HeadPlan hp = r >= head_dim_ ? HeadPlan::dense() : HeadPlan::lowrank(r);
        rec.predicted_time_us += cost_model_->time_us(hp, T, M, head_dim_, n);
      }
      rec.predicted_dense_time_us +=
          cost_model_->time_us(HeadPlan::dense(), T, M, head_dim_, heads_);
    }
    rec.cost = rec.predicted_time_us / rec.predicted_dense_time_us;
  } else {
    rec.cost = rec.score_flops / rec.dense_score_flops;
  }
  rec.reward = cfg_.alpha * rec.fidelity - cfg_.beta * rec.cost - cfg_.gamma * rec.perturbation;

  // Advance the state.
  if (!cores.empty()) {
    const auto core = torch::stack(cores);
    if (core_prev_.defined()) {
      const auto num = (core - core_prev_).square().sum({-2, -1}).sqrt();
      const auto den = core.square().sum({-2, -1}).sqrt();
      drift_ = torch::where(den > 0, num / torch::where(den > 0, den, torch::ones_like(den)),
                            torch::zeros_like(den));
    }
    core_prev_ = core;
  }
  sigma_ = sigma;
  fro2_ = fro2;
  prev_ranks_ = ranks;
  prev_index_ = idx.clone();
  prev_fidelity_ = rec.fidelity;
  prev_kl_ = rec.kl;
  if (record_action) actions_.push_back(chosen);
  ++t_;
  last_ = rec;

  StepResult res;
  res.reward = rec.reward;
  res.terminated = t_ == num_segments();
  if (res.terminated) active_ = false;
  res.observation = observe();
  auto& sc = res.info.scalars;
  sc["fidelity"] = rec.fidelity;
  sc["cosine"] = rec.cosine;
  sc["kl"] = rec.kl;
  sc["cost"] = rec.cost;
  sc["perturbation"] = rec.perturbation;
  sc["score_flops"] = rec.score_flops;
  sc["dense_score_flops"] = rec.dense_score_flops;
  sc["control_flops"] = rec.control_flops;
  sc["attn_time_us"] = rec.attn_time_us;
  sc["dense_attn_time_us"] = rec.dense_attn_time_us;
  sc["nll_sum"] = rec.nll_sum;
  sc["dense_nll_sum"] = rec.dense_nll_sum;
  sc["tokens"] = static_cast<double>(rec.tokens);
  sc["guardrail_violations"] = static_cast<double>(rec.violations);
  sc["mean_rank"] = ranks.to(torch::kFloat64).mean().item<double>();
  res.info.tensors["ranks"] = ranks;
  return res;
}

nlohmann::json RankEnv::save_state() const {
  return {{"rng", rng_to_string(rng_)},
          {"window", window_},
          {"active", active_},
          {"actions", actions_}};
}

void RankEnv::load_state(const nlohmann::json& s) {
  std::vector<std::vector<int64_t>> actions;
  int64_t window = -1;
  bool active = false;
  std::string rng;
  try {
    rng = s.at("rng").get<std::string>();
    window = s.at("window").get<int64_t>();
    active = s.at("active").get<bool>();
    actions = s.at("actions").get<std::vector<std::vector<int64_t>>>();
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{} state: {}", kName, e.what()));
  }
  if (window >= num_windows() || (active && window < 0))
    throw FormatError(
        fmt::format("{} state: window {} outside [0, {})", kName, window, num_windows()));
  if (static_cast<int64_t>(actions.size()) > num_segments())
    throw FormatError(
        fmt::format("{} state: {} actions for {} segments", kName, actions.size(), num_segments()));
  if (window >= 0) {
    // Replaying the recorded actions rebuilds cache, trackers and statistics exactly.
    start_episode(window);
    for (const auto& a : actions) {
      if (static_cast<int64_t>(a.size()) != num_groups())
        throw FormatError(fmt::format("{} state: an action of {} groups, expected {}", kName,
                                      a.size(), num_groups()));
      do_step(torch::tensor(a, torch::kInt64), true);
    }
    active_ = active;
  }
  rng_from_string(rng_, rng);
}

}  // namespace attnpilot::env
