// env/: spaces, the conformance suite over every registered env, wrappers, toy envs, and
// CartPole against Gymnasium's CartPole-v1.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>

#include "common/error.h"
#include "env/registry.h"
#include "env/toy_envs.h"
#include "env/wrappers.h"
#include "rank_fixture.h"

namespace attnpilot::env {
namespace {

torch::Generator make_gen(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

// ---- spaces --------------------------------------------------------------------------

TEST(Spaces, ContainsAndCheck) {
  auto d = Space::discrete(3);
  EXPECT_TRUE(d.contains(torch::tensor(2, torch::kInt64)));
  EXPECT_FALSE(d.contains(torch::tensor(3, torch::kInt64)));
  EXPECT_FALSE(d.contains(torch::tensor(1.0f)));
  EXPECT_THROW(d.check(torch::tensor(-1, torch::kInt64), "action"), InvalidArgument);
  auto md = Space::multi_discrete({2, 4});
  EXPECT_TRUE(md.contains(torch::tensor({1, 3}, torch::kInt64)));
  EXPECT_FALSE(md.contains(torch::tensor({2, 0}, torch::kInt64)));
  EXPECT_EQ(md.mask_size(), 6);
  auto b = Space::box({2}, -1.0f, 1.0f);
  EXPECT_TRUE(b.contains(torch::tensor({0.5f, -1.0f})));
  EXPECT_FALSE(b.contains(torch::tensor({0.5f, 1.5f})));
  EXPECT_THROW(b.mask_size(), InvalidArgument);
  EXPECT_THROW(Space::discrete(0), InvalidArgument);
  EXPECT_THROW(Space::box({2}, 1.0f, -1.0f), InvalidArgument);
}

TEST(Spaces, JsonRoundTrip) {
  auto high = torch::tensor({4.8f, INFINITY});
  for (const auto& s :
       {Space::discrete(5), Space::multi_discrete({3, 3, 2}), Space::box(-high, high)}) {
    auto j = s.to_json();
    EXPECT_EQ(Space::from_json(nlohmann::json::parse(j.dump())), s) << j.dump();
  }
  EXPECT_THROW(Space::from_json({{"type", "tuple"}}), FormatError);
  EXPECT_THROW(Space::from_json({{"type", "discrete"}}), FormatError);
}

TEST(Spaces, MaskedSamplingNeverDrawsMaskedActions) {
  auto gen = make_gen(3);
  auto md = Space::multi_discrete({4, 3});
  auto mask = torch::tensor({true, false, true, false, false, false, true}, torch::kBool);
  std::vector<int> counts(7, 0);
  for (int i = 0; i < 2000; ++i) {
    auto a = md.sample(gen, mask);
    ASSERT_TRUE(md.contains(a));
    counts[a[0].item<int64_t>()]++;
    counts[4 + a[1].item<int64_t>()]++;
  }
  EXPECT_EQ(counts[1] + counts[3] + counts[4] + counts[5], 0);
  EXPECT_EQ(counts[6], 2000);
  EXPECT_NEAR(counts[0] / 2000.0, 0.5, 0.05);
  EXPECT_THROW(md.sample(gen, torch::zeros({7}, torch::kBool)), InvalidArgument);
}

// ---- conformance suite ------------------------------------------------------------------

/// A random allowed action for `e` now.
torch::Tensor random_action(const Env& e, torch::Generator& gen) {
  return e.action_space().sample(gen, e.has_action_mask() ? e.action_mask() : torch::Tensor());
}

/// The config each registered env is checked with: defaults, except the rank environment,
/// which needs a model (the tiny one of rank_fixture.h).
Config conformance_config(const std::string& name) {
  if (name == "RankSelection-v0") return Config::parse(testing::tiny_rank_env_yaml(), "tiny");
  return Config();
}

std::unique_ptr<Env> make_conformance_env(const std::string& name) {
  return make_env(name, conformance_config(name));
}

class Conformance : public ::testing::TestWithParam<std::string> {};

TEST_P(Conformance, SpacesMatchObservationsAndMasks) {
  auto e = make_conformance_env(GetParam());
  auto gen = make_gen(1);
  const auto& os = e->observation_space();
  ASSERT_EQ(os.kind, SpaceKind::kBox);
  auto obs = e->reset(7);
  ASSERT_TRUE(os.contains(obs)) << os.describe();
  int episodes = 0;
  for (int t = 0; t < 2000 && episodes < 5; ++t) {
    if (e->action_space().kind != SpaceKind::kBox) {
      auto m = e->action_mask();
      ASSERT_EQ(m.scalar_type(), torch::kBool);
      ASSERT_EQ(m.numel(), e->action_space().mask_size());
      ASSERT_TRUE(m.any().item<bool>());
    }
    auto a = random_action(*e, gen);
    ASSERT_TRUE(e->action_space().contains(a));
    auto r = e->step(a);
    ASSERT_TRUE(os.contains(r.observation)) << "step " << t;
    ASSERT_TRUE(std::isfinite(r.reward));
    ASSERT_FALSE(r.terminated && r.truncated);
    if (r.done()) {
      ASSERT_TRUE(r.info.has("episode_return") && r.info.has("episode_length"));
      ++episodes;
      ASSERT_TRUE(os.contains(e->reset()));
    }
  }
  EXPECT_EQ(episodes, 5) << "no env should need 2000 random steps for 5 episodes";
}

TEST_P(Conformance, SeededDeterminism) {
  auto run = [&](uint64_t seed) {
    auto e = make_conformance_env(GetParam());
    auto gen = make_gen(11);
    std::vector<float> trace;
    auto obs = e->reset(seed);
    for (int t = 0; t < 300; ++t) {
      auto a = random_action(*e, gen);
      auto r = e->step(a);
      auto o = r.observation.flatten();
      for (int64_t i = 0; i < o.numel(); ++i) trace.push_back(o[i].item<float>());
      trace.push_back(static_cast<float>(r.reward));
      trace.push_back(r.terminated * 2 + r.truncated);
      if (r.done()) {
        auto o2 = e->reset().flatten();
        for (int64_t i = 0; i < o2.numel(); ++i) trace.push_back(o2[i].item<float>());
      }
    }
    return trace;
  };
  EXPECT_EQ(run(5), run(5));
  EXPECT_NE(run(5), run(6)) << "different seeds should give different trajectories";
}

TEST_P(Conformance, InvalidAndMaskedActionsThrow) {
  auto e = make_conformance_env(GetParam());
  auto gen = make_gen(2);
  e->reset(3);
  const auto& as = e->action_space();
  if (as.kind == SpaceKind::kDiscrete) {
    EXPECT_THROW(e->step(torch::tensor(as.n, torch::kInt64)), InvalidArgument);
    EXPECT_THROW(e->step(torch::tensor(-1, torch::kInt64)), InvalidArgument);
  }
  EXPECT_THROW(e->step(torch::tensor(0.5f)), InvalidArgument);
  if (e->has_action_mask()) {
    // Find an episode whose mask forbids something, then step a forbidden action.
    bool tested = false;
    for (int k = 0; k < 50 && !tested; ++k) {
      auto m = e->action_mask();
      if (m.all().item<bool>()) {
        e->reset();
        continue;
      }
      auto forbidden = (~m).nonzero()[0][0].item<int64_t>();
      if (as.kind == SpaceKind::kDiscrete) {
        EXPECT_THROW(e->step(torch::tensor(forbidden, torch::kInt64)), InvalidArgument);
      } else if (as.kind == SpaceKind::kMultiDiscrete) {
        // An allowed action with one dimension switched to the forbidden choice.
        auto a = as.sample(gen, m);
        int64_t dim = 0, off = 0;
        while (forbidden >= off + as.nvec[dim]) off += as.nvec[dim++];
        a[dim] = forbidden - off;
        EXPECT_THROW(e->step(a), InvalidArgument);
      }
      tested = true;
    }
    EXPECT_TRUE(tested) << "a masked env should forbid some action within 50 episodes";
  }
}

TEST_P(Conformance, VectorEnvAutoResetMatchesSingleEnvs) {
  const int n = 3;
  auto venv = make_vector_env(GetParam(), n, conformance_config(GetParam()));
  std::vector<std::unique_ptr<Env>> singles;
  for (int i = 0; i < n; ++i) singles.push_back(make_conformance_env(GetParam()));
  auto gen = make_gen(4);
  auto obs = venv->reset(100);
  for (int i = 0; i < n; ++i) ASSERT_TRUE(torch::equal(obs[i], singles[i]->reset(100 + i)));
  int dones = 0;
  for (int t = 0; t < 400; ++t) {
    std::vector<torch::Tensor> acts;
    for (int i = 0; i < n; ++i) acts.push_back(random_action(*singles[i], gen));
    auto s = venv->step(torch::stack(acts));
    ASSERT_EQ(s.observations.size(0), n);
    if (venv->has_action_mask()) {
      ASSERT_TRUE(s.action_masks.defined());
    }
    for (int i = 0; i < n; ++i) {
      auto r = singles[i]->step(acts[i]);
      ASSERT_FLOAT_EQ(s.rewards[i].item<float>(), static_cast<float>(r.reward));
      ASSERT_EQ(s.terminated[i].item<bool>(), r.terminated);
      ASSERT_EQ(s.truncated[i].item<bool>(), r.truncated);
      if (r.done()) {
        ++dones;
        ASSERT_TRUE(torch::equal(s.final_observations[i], r.observation));
        ASSERT_TRUE(torch::equal(s.infos[i].tensors.at("final_observation"), r.observation));
        ASSERT_DOUBLE_EQ(s.infos[i].scalars.at("episode_return"),
                         r.info.scalars.at("episode_return"));
        ASSERT_TRUE(torch::equal(s.observations[i], singles[i]->reset()));
      } else {
        ASSERT_TRUE(torch::equal(s.observations[i], r.observation));
        ASSERT_TRUE(torch::equal(s.final_observations[i], torch::zeros_like(r.observation)));
      }
      if (venv->has_action_mask()) {
        ASSERT_TRUE(torch::equal(s.action_masks[i], singles[i]->action_mask()));
      }
    }
  }
  EXPECT_GT(dones, 0);
}

TEST_P(Conformance, SaveLoadStateResumesExactly) {
  auto e = make_conformance_env(GetParam());
  auto gen = make_gen(9);
  e->reset(21);
  for (int t = 0; t < 17; ++t) {
    auto r = e->step(random_action(*e, gen));
    if (r.done()) e->reset();
  }
  const auto state = nlohmann::json::parse(e->save_state().dump());
  const auto gen_state = gen.get_state();
  auto trace = [&](Env& env) {
    std::vector<float> out;
    for (int t = 0; t < 60; ++t) {
      auto r = env.step(random_action(env, gen));
      out.push_back(static_cast<float>(r.reward));
      out.push_back(r.observation.sum().item<float>());
      if (r.done()) out.push_back(env.reset().sum().item<float>());
    }
    return out;
  };
  auto a = trace(*e);
  auto e2 = make_conformance_env(GetParam());
  e2->load_state(state);
  gen.set_state(gen_state);
  EXPECT_EQ(trace(*e2), a);
  EXPECT_THROW(e2->load_state(nlohmann::json::object()), FormatError);
}

INSTANTIATE_TEST_SUITE_P(RegisteredEnvs, Conformance, ::testing::ValuesIn(registered_envs()),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& c : s)
                             if (!std::isalnum(static_cast<unsigned char>(c))) c = '_';
                           return s;
                         });

TEST(Registry, UnknownNameAndKeys) {
  EXPECT_THROW(make_env("NoSuchEnv-v0"), InvalidArgument);
  auto names = registered_envs();
  EXPECT_NE(std::find(names.begin(), names.end(), "CartPole-v1"), names.end());
  EXPECT_THROW(register_env("CartPole-v1", [](const Config&) { return std::unique_ptr<Env>(); }),
               InvalidArgument);
  auto cfg = Config::parse("max_episode_steps: 20\nbogus: 1\n");
  auto e = make_env("CartPole-v1", cfg);
  EXPECT_THROW(cfg.check_all_read(), InvalidArgument);  // "bogus" was never read
}

// ---- wrappers ---------------------------------------------------------------------------

TEST(Wrappers, TimeLimitTruncates) {
  auto e = make_env("CartPole-v1", Config::parse("max_episode_steps: 5"));
  e->reset(0);
  StepResult r;
  for (int t = 0; t < 5; ++t) {
    ASSERT_FALSE(r.done());
    r = e->step(torch::tensor(t % 2, torch::kInt64));
  }
  EXPECT_TRUE(r.truncated);
  EXPECT_FALSE(r.terminated);
  EXPECT_EQ(r.info.scalars.at("episode_length"), 5);
  EXPECT_EQ(r.info.scalars.at("episode_return"), 5);
}

TEST(Wrappers, NormalizeObservationMatchesBatchStatistics) {
  auto e = std::make_unique<NormalizeObservation>(make_env("CartPole-v1"));
  auto raw = make_env("CartPole-v1");
  auto gen = make_gen(5);
  std::vector<torch::Tensor> seen;
  e->reset(3);
  seen.push_back(raw->reset(3).to(torch::kFloat64));
  torch::Tensor last;
  for (int t = 0; t < 500; ++t) {
    auto a = torch::tensor(static_cast<int64_t>(torch::randint(2, {1}, gen).item<int64_t>()));
    auto r = e->step(a);
    auto rr = raw->step(a);
    seen.push_back(rr.observation.to(torch::kFloat64));
    last = r.observation;
    if (r.done()) {
      e->reset();
      seen.push_back(raw->reset().to(torch::kFloat64));
    }
  }
  auto all = torch::stack(seen);
  // With the initial count 1e-4 (mean 0, var 1) the running estimate is the pooled one.
  const double n = all.size(0), c0 = 1e-4;
  auto mean = all.sum(0) / (n + c0);
  auto m2 = (all - all.mean(0)).pow(2).sum(0) + c0 * 1.0 + all.mean(0).pow(2) * c0 * n / (n + c0);
  auto var = m2 / (n + c0);
  const auto& rms = e->statistics();
  for (int i = 0; i < 4; ++i) {
    EXPECT_NEAR(rms.mean()[i], mean[i].item<double>(), 1e-9);
    EXPECT_NEAR(rms.var()[i], var[i].item<double>(), 1e-9 * std::max(1.0, var[i].item<double>()));
  }
  EXPECT_TRUE(e->observation_space().contains(last));
}

TEST(Wrappers, NormalizeRewardScalesByReturnStd) {
  auto e = std::make_unique<NormalizeReward>(make_env("Chain-v0"), 0.9);
  auto raw = make_env("Chain-v0");
  e->reset(1);
  raw->reset(1);
  RunningMeanStd ref(1);
  double g = 0;
  auto gen = make_gen(8);
  for (int t = 0; t < 300; ++t) {
    auto a = torch::tensor(static_cast<int64_t>(torch::randint(2, {1}, gen).item<int64_t>()));
    auto r = e->step(a);
    auto rr = raw->step(a);
    g = g * 0.9 * (rr.terminated ? 0 : 1) + rr.reward;
    ref.update(&g);
    ASSERT_NEAR(r.reward, rr.reward / std::sqrt(ref.var()[0] + 1e-8), 1e-12);
    if (r.done()) {
      e->reset();
      raw->reset();
    }
  }
}

// ---- toy envs -------------------------------------------------------------------------

TEST(CartPole, ResetIsUniformInRange) {
  CartPole c;
  for (uint64_t s = 0; s < 50; ++s) {
    auto o = c.reset(s);
    EXPECT_LE(o.abs().max().item<float>(), 0.05f);
  }
}

TEST(CartPole, MatchesGymnasium) {
  // ATTNPILOT_PYTHON, else the install script's venv (CTest currently passes only the first
  // variable of attnpilot_test's ENVIRONMENT list).
  std::string py = std::getenv("ATTNPILOT_PYTHON") ? std::getenv("ATTNPILOT_PYTHON") : "";
  if (py.empty() && std::getenv("HOME"))
    py = std::string(std::getenv("HOME")) + "/.local/share/attnpilot/venv/bin/python";
  std::string src = std::getenv("ATTNPILOT_SOURCE_DIR") ? std::getenv("ATTNPILOT_SOURCE_DIR") : ".";
  if (!std::filesystem::exists(py)) GTEST_SKIP() << "no Python with gymnasium: " << py;
  const std::string cmd = py + " " + src + "/tests/env/cartpole_reference.py 42 2>/dev/null";
  std::string text;
  if (FILE* f = popen(cmd.c_str(), "r")) {
    char buf[4096];
    size_t k;
    while ((k = fread(buf, 1, sizeof buf, f)) > 0) text.append(buf, k);
    if (pclose(f) != 0) text.clear();
  }
  if (text.empty()) GTEST_SKIP() << "gymnasium is not available under " << py;
  auto ref = nlohmann::json::parse(text);
  int steps = 0, terminations = 0;
  for (const auto& ep : ref["episodes"]) {
    CartPole c;
    c.set_physical_state(ep["state0"].get<std::array<double, 4>>());
    const auto& acts = ep["actions"];
    for (size_t t = 0; t < acts.size(); ++t) {
      auto r = c.step(torch::tensor(acts[t].get<int64_t>(), torch::kInt64));
      for (int i = 0; i < 4; ++i)
        ASSERT_NEAR(r.observation[i].item<float>(), ep["obs"][t][i].get<double>(), 1e-6)
            << "episode step " << t << " component " << i;
      ASSERT_EQ(r.terminated, ep["terminated"][t].get<bool>()) << "step " << t;
      ++steps;
      terminations += r.terminated;
    }
  }
  EXPECT_GT(steps, 200);
  EXPECT_GT(terminations, 5);
}

TEST(MaskedBandit, MeansAndBestArm) {
  MaskedBandit b(6, 2, 0.0);
  auto means = b.means();
  std::sort(means.begin(), means.end());
  for (int i = 0; i < 6; ++i) EXPECT_NEAR(means[i], i / 5.0, 1e-12);
  auto all = torch::ones({6}, torch::kBool);
  EXPECT_EQ(b.means()[b.best_allowed_arm(all)], 1.0);
  for (uint64_t s = 0; s < 100; ++s) {
    auto obs = b.reset(s);
    auto m = b.action_mask();
    EXPECT_GE(m.sum().item<int64_t>(), 2);
    EXPECT_TRUE(torch::equal(obs, m.to(torch::kFloat32)));
    const auto best = b.best_allowed_arm(m);
    auto r = b.step(torch::tensor(best, torch::kInt64));
    EXPECT_DOUBLE_EQ(r.reward, b.means()[best]);  // noise 0
    EXPECT_TRUE(r.terminated);
  }
}

TEST(Chain, AnalyticValuesMatchIterativeEvaluation) {
  Chain c(6, 0.2, -1.0, 10.0);
  const double gamma = 0.95;
  auto gen = make_gen(12);
  std::vector<double> p(5);
  for (auto& x : p) x = torch::rand({1}, gen).item<double>();
  auto v = c.analytic_values(p, gamma);
  // Reference: iterative policy evaluation with the same dynamics, written out.
  std::vector<double> w(6, 0.0);
  for (int it = 0; it < 5000; ++it) {
    std::vector<double> nw(6, 0.0);
    for (int s = 0; s < 5; ++s) {
      const double pr = p[s] * 0.8 + (1 - p[s]) * 0.2;
      const int right = s + 1, left = std::max(s - 1, 0);
      const double rr = right == 5 ? 10.0 : -1.0;
      nw[s] =
          pr * (rr + gamma * (right == 5 ? 0.0 : w[right])) + (1 - pr) * (-1.0 + gamma * w[left]);
    }
    w = nw;
  }
  for (int s = 0; s < 6; ++s) EXPECT_NEAR(v[s], w[s], 1e-9) << s;
  // Monte Carlo check of the dynamics themselves for the always-right policy.
  std::vector<double> right(5, 1.0);
  auto vr = c.analytic_values(right, gamma);
  double sum = 0;
  const int episodes = 4000;
  for (int k = 0; k < episodes; ++k) {
    // Each episode's discounted return minus the analytic value of its start state.
    auto obs = c.reset(1000 + k);
    const int64_t s0 = obs.argmax().item<int64_t>();
    double g = 0, disc = 1;
    for (int t = 0; t < 400; ++t) {
      auto r = c.step(torch::tensor(1, torch::kInt64));
      g += disc * r.reward;
      disc *= gamma;
      if (r.terminated) break;
    }
    sum += g - vr[s0];
  }
  EXPECT_NEAR(sum / episodes, 0.0, 0.15);
}

}  // namespace
}  // namespace attnpilot::env
