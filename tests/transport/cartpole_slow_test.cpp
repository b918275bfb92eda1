// Slow end-to-end test (label slow): learner + 4 actors of the built binary train CartPole
// on loopback to a mean return >= 475 over the last 100 episodes within 300k steps, the
// criterion of the single-process test (PpoCartPole), and the saved checkpoint is that trained
// policy.
#include <gtest/gtest.h>

#include "agent/trainer.h"
#include "child_process.h"
#include "remote_run.h"

namespace attnpilot::transport {
namespace {

using testing::ChildProcess;

TEST(RemoteTrainingSlow, LearnerAndFourActorsSolveCartPole) {
  RemoteRun r("cartpole");
  if (!have_binary(r)) GTEST_SKIP() << r.exe << " not built (build the attnpilot target)";
  // rl-zoo's CartPole-v1 PPO settings, split over 4 actors of 8 envs x 32 steps.
  std::ofstream(r.config) << "ppo:\n  num_envs: 8\n  num_steps: 32\n  gamma: 0.98\n"
                             "  gae_lambda: 0.8\n  update_epochs: 20\n  num_minibatches: 4\n"
                             "  ent_coef: 0.0\n  learning_rate: 0.001\n";
  // As PpoCartPole: stop at the first update where the last 100 episodes average >= 475,
  // within 300k steps (a run that trains past it may drift below again, as PPO does).
  const int64_t total = 300 * 1024;
  auto cmd = r.learner(total, 1024, false);
  cmd.insert(cmd.end(), {"--target-return", "475"});
  ChildProcess learner(cmd, r.log("learner"));
  std::vector<std::unique_ptr<ChildProcess>> actors;
  for (int i = 0; i < 4; ++i)
    actors.push_back(
        std::make_unique<ChildProcess>(r.actor(100 + i), r.log(fmt::format("actor{}", i))));
  ASSERT_EQ(learner.wait(420), 0) << learner.log();
  for (auto& a : actors) EXPECT_EQ(a->wait(30), 0) << a->log();
  const auto last = r.last_metrics();
  std::cout << "final metrics: " << last.dump() << "\n";
  ASSERT_TRUE(last.at("episode_return_mean").is_number()) << last.dump();
  EXPECT_GE(last.at("episodes").get<int64_t>(), 100);
  EXPECT_GE(last.at("episode_return_mean").get<double>(), 475.0);
  EXPECT_LE(last.at("step").get<int64_t>(), total);
  // Greedy evaluation of the final checkpoint over 100 episodes. Greedy and sampled returns
  // of one policy differ (runs measured 394.9 greedy against 471.7 sampled, and 500 against 477.5),
  // so this checks that the checkpoint holds a trained policy (an untrained one scores about
  // 10-40), not the 475 criterion a second time.
  auto trainer = agent::Trainer::resume(r.dir / "out" / "checkpoint" / "trainer");
  torch::Generator gen = at::detail::createCPUGenerator(7);
  const auto returns = agent::evaluate_policy(trainer->policy(), "CartPole-v1", Config(), 100,
                                              12345, /*greedy=*/true, gen);
  double mean = 0;
  for (double x : returns) mean += x / returns.size();
  std::cout << "greedy evaluation mean return over 100 episodes: " << mean << "\n";
  EXPECT_GE(mean, 300.0);
  expect_exactly_once(r.state());
}

}  // namespace
}  // namespace attnpilot::transport
