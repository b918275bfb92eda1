// policies/: masked categorical distributions against direct formulas, the MLP and
// transformer actor-critics (shapes, seeding, attention across tokens), export round trip.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "common/error.h"
#include "policies/actor_critic.h"
#include "policies/distributions.h"

namespace attnpilot::policies {
namespace {

torch::Generator make_gen(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

TEST(MaskedCategorical, MatchesDirectFormulas) {
  auto gen = make_gen(1);
  auto logits = torch::randn({5, 7}, gen, torch::kFloat32);
  auto mask = torch::rand({5, 7}, gen) > 0.4;
  mask.select(1, 2).fill_(true);  // every row allows something
  MaskedCategorical d(logits, {7}, mask);
  auto ld = logits.to(torch::kFloat64);
  for (int64_t b = 0; b < 5; ++b) {
    double z = 0;
    for (int64_t k = 0; k < 7; ++k)
      if (mask[b][k].item<bool>()) z += std::exp(ld[b][k].item<double>());
    double h = 0;
    for (int64_t k = 0; k < 7; ++k) {
      const double p = mask[b][k].item<bool>() ? std::exp(ld[b][k].item<double>()) / z : 0.0;
      EXPECT_NEAR(d.probs()[b][k].item<double>(), p, 1e-6);
      if (p > 0) h -= p * std::log(p);
    }
    EXPECT_NEAR(d.entropy()[b].item<double>(), h, 1e-5);
  }
  auto a = torch::full({5}, 2, torch::kInt64);
  auto lp = d.log_prob(a);
  for (int64_t b = 0; b < 5; ++b)
    EXPECT_NEAR(std::exp(lp[b].item<double>()), d.probs()[b][2].item<double>(), 1e-6);
}

TEST(MaskedCategorical, HundredThousandSamplesNeverMasked) {
  auto gen = make_gen(2);
  auto logits = torch::randn({1000, 6}, gen);
  logits.select(1, 0).fill_(8.0);  // masked arm with by far the largest logit
  auto mask = torch::ones({1000, 6}, torch::kBool);
  mask.select(1, 0).fill_(false);
  mask.select(1, 3).fill_(false);
  MaskedCategorical d(logits, {6}, mask);
  auto counts = torch::zeros({6}, torch::kFloat64);
  auto expected = d.probs().to(torch::kFloat64).sum(0) * 100;
  for (int rep = 0; rep < 100; ++rep) {
    auto s = d.sample(gen);
    ASSERT_TRUE(mask.gather(1, s.unsqueeze(1)).all().item<bool>());
    counts.index_add_(0, s, torch::ones({1000}, torch::kFloat64));
  }
  EXPECT_EQ(counts[0].item<double>(), 0);
  EXPECT_EQ(counts[3].item<double>(), 0);
  for (int k : {1, 2, 4, 5})  // frequencies within 5 sigma of the probabilities
    EXPECT_NEAR(counts[k].item<double>(), expected[k].item<double>(),
                5 * std::sqrt(expected[k].item<double>()) + 1);
}

TEST(MaskedCategorical, EpsilonMixesOnlyAllowedActions) {
  auto logits = torch::tensor({{5.0f, 0.0f, 0.0f, 0.0f}});
  auto mask = torch::tensor({{true, true, false, true}});
  MaskedCategorical d(logits, {4}, mask, 0.3);
  MaskedCategorical g(logits, {4}, mask, 0.0);
  auto p = d.probs()[0], pg = g.probs()[0];
  for (int k = 0; k < 4; ++k) {
    const double u = k == 2 ? 0.0 : 1.0 / 3;
    EXPECT_NEAR(p[k].item<double>(), 0.7 * pg[k].item<double>() + 0.3 * u, 1e-6);
  }
  EXPECT_EQ(p[2].item<float>(), 0.0f);
  EXPECT_THROW(MaskedCategorical(logits, {4}, mask, 1.0), InvalidArgument);
  auto lg = logits.clone().requires_grad_(true);
  MaskedCategorical dg(lg, {4}, mask, 0.3);
  (dg.entropy().sum() + dg.log_prob(torch::tensor({1}, torch::kInt64)).sum()).backward();
  EXPECT_TRUE(lg.grad().isfinite().all().item<bool>()) << lg.grad();
}

TEST(MaskedCategorical, MultiDiscreteFactorsAndGradientsStayFinite) {
  auto logits = torch::randn({3, 5}, make_gen(4)).requires_grad_(true);
  auto mask = torch::tensor({{true, false, true, true, false},
                             {false, true, false, false, true},
                             {true, true, true, true, true}});
  MaskedCategorical d(logits, {2, 3}, mask);
  auto a = torch::tensor({{0, 1}, {1, 2}, {1, 0}}, torch::kInt64);
  MaskedCategorical d0(logits.slice(1, 0, 2), {2}, mask.slice(1, 0, 2));
  MaskedCategorical d1(logits.slice(1, 2, 5), {3}, mask.slice(1, 2, 5));
  EXPECT_TRUE(
      torch::allclose(d.log_prob(a), d0.log_prob(a.select(1, 0)) + d1.log_prob(a.select(1, 1))));
  EXPECT_TRUE(torch::allclose(d.entropy(), d0.entropy() + d1.entropy()));
  (d.entropy().sum() + d.log_prob(a).sum()).backward();
  EXPECT_TRUE(logits.grad().isfinite().all().item<bool>());
  EXPECT_EQ(logits.grad()[0][1].item<float>(), 0.0f);  // masked entries get no gradient
  auto bad = mask.clone();
  bad[0][0] = false;
  bad[0][1] = false;
  EXPECT_THROW(MaskedCategorical(logits, {2, 3}, bad), InvalidArgument);
}

TEST(Networks, InitLinearIsOrthogonal) {
  auto gen = make_gen(5);
  torch::nn::Linear tall(8, 16), wide(16, 8);
  init_linear(tall, 2.0, gen);
  init_linear(wide, 0.5, gen);
  EXPECT_TRUE(torch::allclose(tall->weight.t().mm(tall->weight), 4 * torch::eye(8), 1e-4, 1e-4));
  EXPECT_TRUE(torch::allclose(wide->weight.mm(wide->weight.t()), 0.25 * torch::eye(8), 1e-4, 1e-4));
  EXPECT_EQ(tall->bias.abs().sum().item<float>(), 0);
}

struct Case {
  std::string type;
  env::Space obs, act;
};

std::vector<Case> cases() {
  return {
      {"mlp", env::Space::box({4}, -1, 1), env::Space::discrete(3)},
      {"mlp", env::Space::box({5, 3}, -1, 1), env::Space::multi_discrete({4, 4, 4, 4, 4})},
      {"transformer", env::Space::box({4}, -1, 1), env::Space::discrete(3)},
      {"transformer", env::Space::box({5, 3}, -1, 1), env::Space::multi_discrete({4, 4, 4, 4, 4})},
      {"transformer", env::Space::box({5, 3}, -1, 1), env::Space::multi_discrete({2, 3})}};
}

TEST(Networks, ShapesSeedingAndExportRoundTrip) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("attnpilot_pol_" + std::to_string(getpid()));
  for (const auto& c : cases()) {
    PolicyConfig cfg;
    cfg.type = c.type;
    auto g1 = make_gen(7), g2 = make_gen(7), g3 = make_gen(8);
    auto p1 = make_policy(cfg, c.obs, c.act, g1);
    auto p2 = make_policy(cfg, c.obs, c.act, g2);
    auto p3 = make_policy(cfg, c.obs, c.act, g3);
    std::vector<int64_t> shape{6};
    for (auto d : c.obs.shape) shape.push_back(d);
    auto x = torch::randn(shape, make_gen(1));
    auto o1 = p1->forward(x), o2 = p2->forward(x), o3 = p3->forward(x);
    ASSERT_EQ(o1.logits.sizes(), (std::vector<int64_t>{6, c.act.mask_size()})) << c.type;
    ASSERT_EQ(o1.value.sizes(), (std::vector<int64_t>{6}));
    EXPECT_TRUE(torch::equal(o1.logits, o2.logits)) << "same seed, same network";
    EXPECT_FALSE(torch::equal(o1.value, o3.value)) << "different seed, different network";
    std::filesystem::create_directories(dir);
    save_policy(*p1, cfg, dir, {{"note", "test"}});
    nlohmann::json m;
    auto loaded = load_policy(dir, &m);
    EXPECT_EQ(m["note"], "test");
    EXPECT_EQ(m["kind"], c.type);
    auto ol = loaded->forward(x);
    EXPECT_TRUE(torch::equal(ol.logits, o1.logits));
    EXPECT_TRUE(torch::equal(ol.value, o1.value));
  }
  std::filesystem::remove_all(dir);
  EXPECT_THROW(load_policy(dir), IoError);
}

TEST(Networks, TransformerAttendsAcrossTokens) {
  PolicyConfig cfg;
  cfg.type = "transformer";
  cfg.layers = 2;
  auto gen = make_gen(3);
  auto obs = env::Space::box({6, 4}, -1, 1);
  auto p = std::dynamic_pointer_cast<TransformerActorCritic>(
      make_policy(cfg, obs, env::Space::multi_discrete({3, 3, 3, 3, 3, 3}), gen));
  ASSERT_TRUE(p && p->per_token());
  auto x = torch::randn({2, 6, 4}, make_gen(2));
  auto y = x.clone();
  y[0][5] += 1.0;  // change only token 5 of sample 0
  auto lx = p->forward(x).logits.reshape({2, 6, 3});
  auto ly = p->forward(y).logits.reshape({2, 6, 3});
  // Token 0's logits change through attention; sample 1 does not change at all.
  EXPECT_GT((lx[0][0] - ly[0][0]).abs().max().item<float>(), 1e-7);
  EXPECT_TRUE(torch::equal(lx[1], ly[1]));
  EXPECT_THROW(make_policy(cfg, env::Space::box({2, 2, 2}, -1, 1), env::Space::discrete(2), gen),
               InvalidArgument);
  EXPECT_THROW(make_policy(cfg, obs, env::Space::box({2}, -1, 1), gen), Unavailable);
}

}  // namespace
}  // namespace attnpilot::policies
