// PPO on CartPole-v1: mean return >= 475 over the last 100 episodes within 300,000 steps,
// for three fixed seeds (labelled `slow`).
#include <gtest/gtest.h>

#include <chrono>

#include "agent/trainer.h"

namespace attnpilot::agent {
namespace {

TEST(PpoCartPole, Reaches475WithinThreeHundredThousandSteps) {
  torch::set_num_threads(1);
  for (uint64_t seed : {1, 2, 3}) {
    auto root = Config::parse(
        "ppo: {num_envs: 8, num_steps: 32, learning_rate: 0.001, gamma: 0.98, gae_lambda: 0.8,"
        " num_minibatches: 1, update_epochs: 20, ent_coef: 0.0, clip_vloss: false}\n",
        "cartpole");
    auto cfg = TrainerConfig::from_config("CartPole-v1", root, 300000, seed);
    root.check_all_read();
    Trainer t(cfg);
    t.stop_when = [](const Trainer& tr) {
      return tr.episodes() >= 100 && tr.mean_recent_return(100) >= 475.0;
    };
    const auto t0 = std::chrono::steady_clock::now();
    t.run();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::cout << fmt::format(
        "seed {}: mean return {:.1f} over the last 100 episodes at step {} "
        "({:.1f} s)\n",
        seed, t.mean_recent_return(100), t.global_step(), s);
    EXPECT_GE(t.mean_recent_return(100), 475.0) << "seed " << seed;
    EXPECT_LE(t.global_step(), 300000);
  }
}

}  // namespace
}  // namespace attnpilot::agent
