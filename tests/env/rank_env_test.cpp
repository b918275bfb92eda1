// RankSelection-v0 on a tiny model: rewards against values computed here from an
// independent run of the model (projections recomputed from all rows so far, not tracked
// incrementally), the guardrail mask, masked ranks never executed, config errors.
#include "env/rank_env.h"

#include <gtest/gtest.h>

#include <cmath>

#include "attention/cost_model.h"
#include "attention/plan.h"
#include "common/error.h"
#include "env/registry.h"
#include "model/checkpoint.h"
#include "perturbation/projections.h"
#include "rank_fixture.h"

namespace attnpilot::env {
namespace {

RankEnvConfig tiny_config(const std::string& extra = "") {
  return RankEnvConfig::from_config(Config::parse(testing::tiny_rank_env_yaml(extra), "tiny"));
}

TEST(RankEnv, SpacesAndObservationLayout) {
  RankEnv e(tiny_config());
  EXPECT_EQ(e.ranks(), (std::vector<int64_t>{2, 4, 8}));  // the head dim is added
  EXPECT_EQ(e.num_groups(), 2 * 4);
  EXPECT_EQ(e.num_segments(), 4);
  EXPECT_EQ(e.action_space(), Space::multi_discrete(std::vector<int64_t>(8, 3)));
  const auto obs = e.reset(1);
  EXPECT_EQ(obs.sizes(), (std::vector<int64_t>{8, static_cast<int64_t>(e.feature_names().size())}));
  // Before the first segment no spectrum is known: only the exact rank is allowed.
  const auto m = e.action_mask().view({8, 3});
  EXPECT_TRUE(m.select(1, 2).all().item<bool>());
  EXPECT_FALSE(m.narrow(1, 0, 2).any().item<bool>());
  RankEnv grouped(tiny_config("group_size: 2\n"));
  EXPECT_EQ(grouped.num_groups(), 2 * 2);
}

TEST(RankEnv, DenseActionsGiveExactFidelityAndUnitCost) {
  RankEnv e(tiny_config("reward: {alpha: 3, beta: 2, gamma: 5}\n"));
  e.reset(4);
  double nll = 0, dense_nll = 0;
  for (int t = 0; t < 4; ++t) {
    const auto r = e.step(e.uniform_action(e.full_rank_index()));
    const auto& rec = e.last();
    EXPECT_NEAR(rec.cosine, 1.0, 1e-5);
    EXPECT_NEAR(rec.kl, 0.0, 1e-5);
    EXPECT_NEAR(rec.cost, 1.0, 1e-12) << "dense actions must cost what the dense reference does";
    EXPECT_GT(rec.dense_attn_time_us, 0.0);
    EXPECT_EQ(rec.perturbation, 0.0);
    EXPECT_EQ(rec.violations, 0);
    EXPECT_NEAR(r.reward, 3.0 * rec.fidelity - 2.0, 1e-9);
    EXPECT_EQ(r.terminated, t == 3);
    nll += rec.nll_sum;
    dense_nll += rec.dense_nll_sum;
  }
  EXPECT_NEAR(nll, dense_nll, 1e-3);
  EXPECT_THROW(e.step(e.uniform_action(e.full_rank_index())), InvalidArgument);
}

// The reward of low-rank steps, recomputed here: the model runs the same plans with
// projections computed from scratch from every query/key row so far (the tracker's
// incremental answer must agree), then cosine, KL, cost and perturbation follow their
// definitions in env/rank_env.h.
TEST(RankEnv, LowRankRewardsMatchAnIndependentComputation) {
  const double alpha = 7, beta = 2, gamma = 3, wc = 0.4, wk = 0.6;
  RankEnv e(
      tiny_config("guardrail: {enabled: false}\n"
                  "reward: {alpha: 7, beta: 2, gamma: 3, cosine_weight: 0.4, kl_weight: 0.6}\n"));
  e.reset_to_window(3);
  auto m = model::load_model(testing::tiny_rank_model(), torch::kCPU);
  m->eval();
  const auto& mc = m->config();
  const int64_t L = 32, T = 8, H = mc.num_heads, d = mc.head_dim, R = 4;
  torch::NoGradGuard ng;
  // Actions: a rank index per (layer, head) and segment; segment 0 all rank 2.
  const std::vector<std::vector<int64_t>> actions = {{0, 0, 0, 0, 0, 0, 0, 0},
                                                     {1, 0, 2, 1, 0, 1, 1, 2},
                                                     {1, 1, 1, 1, 0, 0, 0, 0},
                                                     {2, 2, 0, 0, 1, 1, 2, 0}};
  const std::vector<int64_t> grid = {2, 4, 8};
  // Independent run.
  std::vector<std::vector<torch::Tensor>> qs(mc.num_layers), ks(mc.num_layers);
  attention::KVCache cache(mc.num_layers);
  const auto tokens = e.window_tokens();
  ASSERT_EQ(tokens.size(1), L);
  model::ForwardOptions dfo;
  dfo.capture = true;
  const auto dense = m->forward(tokens, dfo);
  const auto dense_logp = torch::log_softmax(dense.logits[0], -1);
  // Dense score FLOPs per segment as the executor runs them (segment by segment, cached).
  std::vector<double> dense_flops;
  {
    attention::KVCache dc(mc.num_layers);
    model::ForwardOptions sfo;
    sfo.cache = &dc;
    for (int64_t t = 0; t < 4; ++t) {
      const auto o = m->forward(tokens.narrow(1, t * T, T), sfo);
      dense_flops.push_back(o.stats.score_flops + o.stats.other_flops);
    }
  }
  std::vector<int64_t> prev(mc.num_layers * H, d);
  for (int64_t t = 0; t < 4; ++t) {
    std::vector<std::vector<attention::LayerPlan>> plans(mc.num_layers);
    std::vector<int64_t> ranks(mc.num_layers * H);
    for (int64_t l = 0; l < mc.num_layers; ++l) {
      attention::LayerPlan lp;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t r = grid[actions[t][l * H + h]];
        ranks[l * H + h] = r;
        lp.heads.push_back(r == d ? attention::HeadPlan::dense() : attention::HeadPlan::lowrank(r));
      }
      plans[l] = {lp};
    }
    std::vector<torch::Tensor> sigma(mc.num_layers), fro2(mc.num_layers);
    model::ForwardOptions fo;
    fo.plans = &plans;
    fo.capture = true;
    fo.cache = &cache;
    fo.before_attention = [&](int64_t l, const torch::Tensor& q, const torch::Tensor& k,
                              attention::AttentionInputs& in) {
      qs[l].push_back(q[0]);
      ks[l].push_back(k[0].repeat_interleave(H / mc.num_kv_heads, 0));
      const auto qa = torch::cat(qs[l], 1), ka = torch::cat(ks[l], 1);
      const auto p = perturbation::optimal_score_projections(qa.to(torch::kFloat64),
                                                             ka.to(torch::kFloat64), R);
      in.a_q = p.a_q.unsqueeze(0).to(torch::kFloat32);
      in.a_k = p.a_k.unsqueeze(0).to(torch::kFloat32);
      sigma[l] = p.sigma;
      fro2[l] = p.sigma.square().sum(-1);
    };
    const auto seg = tokens.narrow(1, t * T, T);
    const auto out = m->forward(seg, fo);
    // Expected components.
    double cos = 0;
    for (int64_t l = 0; l < mc.num_layers; ++l)
      cos += torch::cosine_similarity(out.layers[l].hidden_out[0],
                                      dense.layers[l].hidden_out[0].narrow(0, t * T, T), -1)
                 .mean()
                 .item<double>();
    cos /= mc.num_layers;
    const auto logp = torch::log_softmax(out.logits[0], -1);
    const auto ref = dense_logp.narrow(0, t * T, T);
    const double kl = std::max(0.0, (ref.exp() * (ref - logp)).sum(-1).mean().item<double>());
    const double fid = (wc * cos + wk * std::exp(-kl)) / (wc + wk);
    const double M = t * T + T;
    // Executed pairs: the chunked kernel scores whole rows of keys up to the last visible
    // one (T·M for one chunk), with the projections' use on top for low-rank heads.
    const double rect = T * M;
    double flops = 0;
    double pert = 0;
    for (int64_t l = 0; l < mc.num_layers; ++l) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t r = ranks[l * H + h], rp = prev[l * H + h];
        if (r < d) flops += 2.0 * r * rect + 2.0 * T * d * r + 2.0 * M * d * r;
        auto energy = [&](int64_t rr) {
          if (rr >= d) return 1.0;
          return (sigma[l][h].narrow(0, 0, rr).square().sum() / fro2[l][h]).item<double>();
        };
        if (r != rp) pert += std::sqrt(std::abs(energy(r) - energy(rp)));
      }
    }
    pert /= mc.num_layers * H;
    // Dense heads cost what they cost in the dense run (per head: an equal share).
    int64_t dense_heads = 0;
    for (int64_t r : ranks) dense_heads += r == d;
    flops += dense_flops[t] * dense_heads / (H * mc.num_layers);
    const double cost = flops / dense_flops[t];
    const auto res = e.step(torch::tensor(actions[t], torch::kInt64));
    const auto& rec = e.last();
    EXPECT_NEAR(rec.cosine, cos, 1e-4) << "segment " << t;
    EXPECT_NEAR(rec.kl, kl, 1e-4) << "segment " << t;
    EXPECT_NEAR(rec.cost, cost, 1e-9) << "segment " << t;
    EXPECT_NEAR(rec.perturbation, pert, 1e-4) << "segment " << t;
    EXPECT_NEAR(res.reward, alpha * fid - beta * cost - gamma * pert, 1e-3) << "segment " << t;
    EXPECT_GT(rec.kl, 0.0) << "low-rank scores must change the distribution";
    for (int64_t i = 0; i < mc.num_layers * H; ++i)
      EXPECT_EQ(rec.ranks.view(-1)[i].item<int64_t>(), ranks[i]);
    prev = ranks;
  }
}

TEST(RankEnv, MaskedRanksAreNeverExecutedAndViolationsAreCounted) {
  // A tight epsilon masks the low ranks once the spectrum is known.
  RankEnv e(tiny_config("guardrail: {epsilon: 0.05}\n"));
  e.reset(2);
  e.step(e.uniform_action(e.full_rank_index()));
  const auto m = e.action_mask().view({8, 3});
  ASSERT_FALSE(m.all().item<bool>()) << "epsilon 0.05 should mask some rank on a random model";
  for (int64_t g = 0; g < 8; ++g) {
    for (int64_t k = 0; k < 3; ++k) {
      if (m[g][k].item<bool>()) continue;
      auto a = e.uniform_action(e.full_rank_index());
      a[g] = k;
      EXPECT_THROW(e.step(a), InvalidArgument);
      EXPECT_EQ(e.segment_index(), 1) << "a refused action must not advance the episode";
    }
  }
  // Without the guardrail the same ranks run, and each one above epsilon on the spectrum
  // it used counts as a violation.
  RankEnv free(tiny_config("guardrail: {enabled: false, epsilon: 0.05}\n"));
  free.reset(2);
  free.step(free.uniform_action(0));
  const auto energy = free.head_energy();  // after segment 0
  int64_t expected = 0;
  for (int64_t l = 0; l < 2; ++l)
    for (int64_t h = 0; h < 4; ++h)
      expected += std::sqrt(std::max(0.0, 1.0 - energy[l][h][0].item<double>())) > 0.05;
  EXPECT_EQ(free.last().violations, expected);
  EXPECT_GT(expected, 0);
}

TEST(RankEnv, EnergyMatchesTheExactSpectrumOfTheScores) {
  RankEnv e(tiny_config("guardrail: {enabled: false}\n"));
  e.reset_to_window(0);
  e.step(e.uniform_action(e.full_rank_index()));
  const auto energy = e.head_energy();
  // Independent: singular values of Q Kᵀ for layer 0 of the dense model over segment 0.
  auto m = model::load_model(testing::tiny_rank_model(), torch::kCPU);
  torch::NoGradGuard ng;
  model::ForwardOptions fo;
  fo.capture = true;
  const auto out = m->forward(e.window_tokens().narrow(1, 0, 8), fo);
  const auto q = out.layers[0].q[0].to(torch::kFloat64);
  const auto k = out.layers[0].k[0].repeat_interleave(2, 0).to(torch::kFloat64);
  const auto s = torch::linalg_svdvals(torch::matmul(q, k.transpose(1, 2)));  // [H, 8]
  for (int64_t h = 0; h < 4; ++h) {
    const double total = s[h].square().sum().item<double>();
    EXPECT_NEAR(energy[0][h][0].item<double>(),
                s[h].narrow(0, 0, 2).square().sum().item<double>() / total, 1e-6);
    EXPECT_NEAR(energy[0][h][1].item<double>(),
                s[h].narrow(0, 0, 4).square().sum().item<double>() / total, 1e-6);
    EXPECT_EQ(energy[0][h][2].item<double>(), 1.0);
  }
}

TEST(RankEnv, TimeCostComesFromTheCalibratedModel) {
  attention::CalibrationOptions co;
  co.query_lengths = {8};
  co.key_lengths = {8, 16, 24, 32};
  co.ranks = {2, 4};
  co.head_dims = {8};
  co.heads = 4;
  co.kv_heads = 2;
  co.repeats = 1;
  const auto file = testing::tiny_rank_model().parent_path() / "cost_model.json";
  attention::CostModel::calibrate(co).save(file);
  const auto cm = attention::CostModel::load(file);
  RankEnv e(tiny_config(
      "guardrail: {enabled: false}\nreward: {cost: time, cost_model: " + file.string() + "}\n"));
  e.reset_to_window(1);
  e.step(e.uniform_action(e.full_rank_index()));
  EXPECT_NEAR(e.last().cost, 1.0, 1e-12);
  // Layer 0: heads at ranks 2, 2, 4, 8; layer 1: 4, 4, 4, 4 (second segment: 16 keys).
  const auto r = e.step(torch::tensor({0, 0, 1, 2, 1, 1, 1, 1}, torch::kInt64));
  using attention::HeadPlan;
  const double dense = cm.time_us(HeadPlan::dense(), 8, 16, 8, 4);
  const double l0 = cm.time_us(HeadPlan::lowrank(2), 8, 16, 8, 2) +
                    cm.time_us(HeadPlan::lowrank(4), 8, 16, 8, 1) +
                    cm.time_us(HeadPlan::dense(), 8, 16, 8, 1);
  const double l1 = cm.time_us(HeadPlan::lowrank(4), 8, 16, 8, 4);
  EXPECT_NEAR(e.last().cost, (l0 + l1) / (2 * dense), 1e-12);
  EXPECT_NEAR(e.last().predicted_time_us, l0 + l1, 1e-9);
  EXPECT_GT(r.info.scalars.at("attn_time_us"), 0.0);
}

TEST(RankEnv, ConfigErrorsNameTheKey) {
  const std::string model = "model: " + testing::tiny_rank_model().string() + "\n";
  auto bad = [&](const std::string& yaml) {
    try {
      RankEnv e(RankEnvConfig::from_config(Config::parse(model + yaml, "bad")));
    } catch (const InvalidArgument& err) {
      return std::string(err.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(bad("sequence_length: 32\nsegment: 5\n").find("segment 5"), std::string::npos);
  EXPECT_NE(
      bad("sequence_length: 32\nsegment: 8\nranks: [2, 4]\ngroup_size: 3\n").find("group_size 3"),
      std::string::npos);
  EXPECT_NE(bad("sequence_length: 32\nsplit: test\n").find("split 'test'"), std::string::npos);
  EXPECT_NE(bad("sequence_length: 32\nsegment: 8\nranks: [2, 4]\nreward: {cost: time}\n")
                .find("cost_model"),
            std::string::npos);
  EXPECT_NE(bad("sequence_length: 32\nsegment: 8\nranks: [2, 4]\nguardrail: {epsilon: 0}\n")
                .find("epsilon 0"),
            std::string::npos);
  EXPECT_NE(bad("sequence_length: 32\nsegment: 8\nranks: [0, 4]\n").find("ranks holds 0"),
            std::string::npos);
  EXPECT_NE(bad("sequence_length: 128\n").find("max_position_embeddings"), std::string::npos);
  EXPECT_NE(bad("sequence_length: 32\nsegment: 8\nranks: [2, 4]\nreward: {alpha: -1}\n").find("-1"),
            std::string::npos);
}

}  // namespace
}  // namespace attnpilot::env
