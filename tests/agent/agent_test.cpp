// agent/: GAE against direct formulas, PPO on the masked bandit and the chain MDP (known
// answers), checkpoint/resume bit-identity, metrics and config handling.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "agent/trainer.h"
#include "common/error.h"
#include "env/registry.h"
#include "env/toy_envs.h"

namespace attnpilot::agent {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir(const std::string& name) {
  auto d = fs::temp_directory_path() / fmt::format("attnpilot_agent_{}_{}", name, getpid());
  fs::remove_all(d);
  return d;
}

TrainerConfig make_config(const std::string& env, const std::string& yaml, int64_t steps,
                          uint64_t seed) {
  auto root = Config::parse(yaml, "test");
  auto c = TrainerConfig::from_config(env, root, steps, seed);
  root.check_all_read();
  return c;
}

TEST(Gae, MatchesDirectFormulas) {
  torch::set_num_threads(1);
  auto gen = at::detail::createCPUGenerator(1);
  const int64_t T = 9, N = 3;
  auto r = torch::randn({T, N}, gen), v = torch::randn({T, N}, gen), nv = torch::randn({N}, gen);
  auto d = (torch::rand({T, N}, gen) < 0.3).to(torch::kFloat32);
  const double gamma = 0.9;
  // lambda = 1: discounted return to the episode end (or bootstrap at T) minus V.
  auto a1 = compute_gae(r, v, d, nv, gamma, 1.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t t = 0; t < T; ++t) {
      double g = 0, disc = 1;
      int64_t k = t;
      for (; k < T; ++k) {
        g += disc * r[k][i].item<double>();
        disc *= gamma;
        if (d[k][i].item<float>() > 0) break;
      }
      if (k == T) g += disc * nv[i].item<double>();
      EXPECT_NEAR(a1[t][i].item<double>(), g - v[t][i].item<double>(), 1e-5);
    }
  // lambda = 0: one-step TD errors.
  auto a0 = compute_gae(r, v, d, nv, gamma, 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t t = 0; t < T; ++t) {
      const double next = t == T - 1 ? nv[i].item<double>() : v[t + 1][i].item<double>();
      const double td = r[t][i].item<double>() + gamma * next * (1 - d[t][i].item<double>()) -
                        v[t][i].item<double>();
      EXPECT_NEAR(a0[t][i].item<double>(), td, 1e-5);
    }
  EXPECT_THROW(compute_gae(r, v, d.slice(0, 0, 2), nv, gamma, 0.9), InvalidArgument);
}

TEST(Ppo, MaskedBanditNeverSamplesMaskedArmsAndLearnsBestAllowed) {
  torch::set_num_threads(1);
  auto cfg = make_config("MaskedBandit-v0",
                         "env: {arms: 8, noise: 0.1}\n"
                         "ppo: {num_envs: 8, num_steps: 25, learning_rate: 0.001, ent_coef: 0.003,"
                         " update_epochs: 2, num_minibatches: 2}\n",
                         100000, 3);
  Trainer t(cfg);
  int64_t samples = 0, masked_draws = 0;
  t.on_rollout = [&](const RolloutBuffer& b) {
    // Bandit episodes last one step: every sample finishes an episode.
    EXPECT_EQ(static_cast<int64_t>(t.last_rollout_returns().size()), b.steps * b.envs);
    auto m = b.masks.reshape({-1, b.masks.size(2)});
    auto a = b.actions.reshape({-1, 1});
    samples += a.size(0);
    masked_draws += (~m.gather(1, a)).sum().item<int64_t>();
  };
  t.run();
  EXPECT_EQ(samples, 100000);
  EXPECT_EQ(masked_draws, 0);
  // Greedy policy on fresh masks: picks the best allowed arm.
  env::MaskedBandit bandit(8, 2, 0.1);
  int best = 0;
  const int trials = 1000;
  torch::NoGradGuard ng;
  for (int k = 0; k < trials; ++k) {
    auto obs = bandit.reset(777000 + k);
    auto mask = bandit.action_mask();
    auto out = t.policy().forward(obs.unsqueeze(0));
    auto a = t.policy().distribution(out, mask.unsqueeze(0)).mode().item<int64_t>();
    ASSERT_TRUE(mask[a].item<bool>());
    best += a == bandit.best_allowed_arm(mask);
  }
  std::cout << "bandit: best allowed arm chosen in " << best << "/" << trials << "\n";
  EXPECT_GE(best, 0.95 * trials);
}

TEST(Ppo, ChainValueEstimatesMatchAnalyticValues) {
  torch::set_num_threads(1);
  auto cfg = make_config("Chain-v0",
                         "env: {length: 8, slip: 0.1}\n"
                         "ppo: {num_envs: 8, num_steps: 64, learning_rate: 0.002, gamma: 0.99,"
                         " gae_lambda: 0.95, ent_coef: 0.0, clip_vloss: false, vf_coef: 1.0}\n",
                         80000, 5);
  Trainer t(cfg);
  t.run();
  env::Chain chain(8, 0.1);
  std::vector<double> p_right;
  std::vector<double> critic;
  torch::NoGradGuard ng;
  for (int64_t s = 0; s < 7; ++s) {
    auto obs = torch::zeros({1, 8});
    obs[0][s] = 1;
    auto out = t.policy().forward(obs);
    p_right.push_back(torch::softmax(out.logits, 1)[0][1].item<double>());
    critic.push_back(out.value.item<double>());
  }
  auto v = chain.analytic_values(p_right, 0.99);
  for (int64_t s = 0; s < 7; ++s) {
    std::cout << fmt::format("chain state {}: p_right {:.3f} critic {:.3f} analytic {:.3f}\n", s,
                             p_right[s], critic[s], v[s]);
    EXPECT_NEAR(critic[s], v[s], 0.05 * std::abs(v[s])) << "state " << s;
  }
}

TEST(Trainer, ResumeIsBitIdenticalToStraightRun) {
  torch::set_num_threads(1);
  const std::string yaml =
      "ppo: {num_envs: 4, num_steps: 32, num_minibatches: 2, update_epochs: 2, target_kl: 0.5}\n"
      "train: {normalize_observation: true, normalize_reward: true}\n";
  const int64_t n = 3 * 128;
  auto cfg = make_config("CartPole-v1", yaml, 2 * n, 11);
  Trainer straight(cfg);
  EXPECT_EQ(straight.run(), 6);

  const auto dir = temp_dir("resume");
  Trainer first(cfg, dir);
  EXPECT_EQ(first.run(n), 3);
  ASSERT_TRUE(fs::exists(dir / "checkpoint" / "manifest.json"));
  auto resumed = Trainer::resume(dir / "checkpoint", dir);
  EXPECT_EQ(resumed->global_step(), n);
  EXPECT_EQ(resumed->run(), 3);
  EXPECT_EQ(resumed->global_step(), straight.global_step());

  auto a = straight.policy().named_parameters();
  auto b = resumed->policy().named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& p : a) EXPECT_TRUE(torch::equal(p.value(), *b.find(p.key()))) << p.key();
  EXPECT_EQ(straight.observation_statistics(), resumed->observation_statistics());
  EXPECT_EQ(straight.envs().save_state(), resumed->envs().save_state());

  std::ifstream f(dir / "metrics.jsonl");
  std::string line;
  int lines = 0;
  while (std::getline(f, line)) {
    auto j = nlohmann::json::parse(line);
    for (const char* k : {"step", "episode_return_mean", "policy_loss", "value_loss", "entropy",
                          "approx_kl", "clipfrac", "fps"})
      EXPECT_TRUE(j.contains(k)) << k;
    EXPECT_EQ(j["step"], (lines + 1) * 128);
    ++lines;
  }
  EXPECT_EQ(lines, 6);
  fs::remove_all(dir);
}

TEST(Trainer, ConfigErrorsNameTheKey) {
  auto root = Config::parse("ppo: {learning_rat: 0.1}\n", "cfg.yaml");
  TrainerConfig::from_config("CartPole-v1", root, 1000, 1);
  try {
    root.check_all_read();
    FAIL() << "unknown key accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("learning_rat"), std::string::npos) << e.what();
  }
  EXPECT_THROW(TrainerConfig::from_config("CartPole-v1", Config::parse("ppo: {num_minibatches: 3}"),
                                          1000, 1),
               InvalidArgument);
  EXPECT_THROW(TrainerConfig::from_config("CartPole-v1", Config(), 10, 1), InvalidArgument);
  EXPECT_THROW(TrainerConfig::from_config("Nope-v0", Config(), 1000, 1), InvalidArgument);
}

/// Trains on MaskedBandit-v0 with `yaml` and returns how often the greedy policy picks the
/// best allowed arm on 500 fresh masks; checks that no masked arm was ever sampled.
double bandit_accuracy(const std::string& yaml, int64_t steps, uint64_t seed) {
  auto cfg = make_config("MaskedBandit-v0", yaml, steps, seed);
  Trainer t(cfg);
  int64_t masked_draws = 0;
  t.on_rollout = [&](const RolloutBuffer& b) {
    auto m = b.masks.reshape({-1, b.masks.size(2)});
    masked_draws += (~m.gather(1, b.actions.reshape({-1, 1}))).sum().item<int64_t>();
  };
  t.run();
  EXPECT_EQ(masked_draws, 0);
  env::MaskedBandit bandit(8, 2, 0.1);
  int best = 0;
  torch::NoGradGuard ng;
  for (int k = 0; k < 500; ++k) {
    auto obs = bandit.reset(555000 + k);
    auto mask = bandit.action_mask();
    auto out = t.policy().forward(obs.unsqueeze(0));
    best += t.policy().distribution(out, mask.unsqueeze(0)).mode().item<int64_t>() ==
            bandit.best_allowed_arm(mask);
  }
  return best / 500.0;
}

TEST(Trainer, ReinforceWithBaselineLearnsTheBandit) {
  torch::set_num_threads(1);
  const double acc = bandit_accuracy(
      "env: {arms: 8}\n"
      "ppo: {algorithm: reinforce, num_envs: 16, num_steps: 8, learning_rate: 0.003,"
      " num_minibatches: 1, ent_coef: 0.0}\n",
      40000, 4);
  std::cout << "reinforce bandit accuracy " << acc << "\n";
  EXPECT_GE(acc, 0.9);
}

TEST(Trainer, TransformerPolicyWithEpsilonExplorationLearnsTheBandit) {
  torch::set_num_threads(1);
  const double acc = bandit_accuracy(
      "env: {arms: 8}\n"
      "policy: {type: transformer, d_model: 16, heads: 2, layers: 1, ff: 32}\n"
      "ppo: {num_envs: 16, num_steps: 8, learning_rate: 0.003, epsilon: 0.05,"
      " num_minibatches: 2, update_epochs: 2}\n",
      40000, 6);
  std::cout << "transformer bandit accuracy " << acc << "\n";
  EXPECT_GE(acc, 0.9);
}

TEST(Trainer, PerTokenTransformerLearnsTokenChoice) {
  torch::set_num_threads(1);
  // MultiDiscrete with per-token masks through VectorEnv, Trainer and the transformer's
  // per-token heads: the greedy policy approaches the per-episode oracle.
  auto cfg = make_config("TokenChoice-v0",
                         "env: {tokens: 4, choices: 5}\n"
                         "policy: {type: transformer, d_model: 16, heads: 2, layers: 1, ff: 32}\n"
                         "ppo: {num_envs: 16, num_steps: 8, learning_rate: 0.003,"
                         " num_minibatches: 2, update_epochs: 4, ent_coef: 0.0}\n",
                         40000, 8);
  Trainer t(cfg);
  int64_t masked_draws = 0;
  t.on_rollout = [&](const RolloutBuffer& b) {
    auto m = b.masks.reshape({-1, 4, 5});
    auto a = b.actions.reshape({-1, 4, 1});
    masked_draws += (~m.gather(2, a)).sum().item<int64_t>();
  };
  t.run();
  EXPECT_EQ(masked_draws, 0);
  env::TokenChoice e(4, 5);
  double regret = 0;
  torch::NoGradGuard ng;
  for (int k = 0; k < 300; ++k) {
    auto obs = e.reset(999000 + k);
    const double oracle = e.oracle_reward();
    auto out = t.policy().forward(obs.unsqueeze(0));
    auto a = t.policy().distribution(out, e.action_mask().unsqueeze(0)).mode().squeeze(0);
    regret += oracle - e.step(a).reward;
  }
  regret /= 300;
  std::cout << "token choice: mean regret vs oracle " << regret << "\n";
  EXPECT_LT(regret, 0.02);
}

}  // namespace
}  // namespace attnpilot::agent
