// Slow end-to-end test (label slow): learner + 4 actors of the built binary train CartPole
// on loopback to a greedy mean return >= 475, as the single process does.
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
  const int64_t total = 160 * 1024;
  ChildProcess learner(r.learner(total, 1024, false), r.log("learner"));
  std::vector<std::unique_ptr<ChildProcess>> actors;
  for (int i = 0; i < 4; ++i)
    actors.push_back(
        std::make_unique<ChildProcess>(r.actor(100 + i), r.log(fmt::format("actor{}", i))));
  ASSERT_EQ(learner.wait(420), 0) << learner.log();
  for (auto& a : actors) EXPECT_EQ(a->wait(30), 0) << a->log();
  std::cout << "final metrics: " << r.last_metrics().dump() << "\n";
  // Greedy evaluation of the final checkpoint.
  auto trainer = agent::Trainer::resume(r.dir / "out" / "checkpoint" / "trainer");
  torch::Generator gen = at::detail::createCPUGenerator(7);
  const auto returns = agent::evaluate_policy(trainer->policy(), "CartPole-v1", Config(), 20, 12345,
                                              /*greedy=*/true, gen);
  double mean = 0;
  for (double x : returns) mean += x / returns.size();
  std::cout << "greedy evaluation mean return over 20 episodes: " << mean << "\n";
  EXPECT_GE(mean, 475.0);
  expect_exactly_once(r.state());
}

}  // namespace
}  // namespace attnpilot::transport
