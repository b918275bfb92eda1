// End to end with the built binary ($ATTNPILOT_BUILD_DIR/experiments/attnpilot) on
// loopback: kill and restart scenarios (actor SIGKILL and restart, actor SIGSTOP noticed,
// learner SIGKILL and --resume with the actors carrying on, no chunk counted twice), and
// (label slow) learner + 4 actors training CartPole to a greedy mean return >= 475.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "agent/trainer.h"
#include "child_process.h"
#include "common/atomic_file.h"
#include "remote_run.h"

namespace attnpilot::transport {
namespace {

namespace fs = std::filesystem;
using testing::ChildProcess;
using testing::wait_until;

TEST(RemoteTraining, ActorAndLearnerKillsAreSurvivedWithoutCountingTwice) {
  RemoteRun r("kill");
  if (!have_binary(r)) GTEST_SKIP() << r.exe << " not built (build the attnpilot target)";
  std::ofstream(r.config) << "ppo:\n  num_envs: 4\n  num_steps: 32\n";
  const int64_t total = 1000 * 1000 * 1000;  // never reached: the test stops the run
  auto learner = std::make_unique<ChildProcess>(r.learner(total, 1024, false), r.log("learner1"));
  auto a0 = std::make_unique<ChildProcess>(r.actor(10), r.log("actor0"));
  ChildProcess a1(r.actor(11), r.log("actor1"));
  ASSERT_TRUE(wait_until([&] { return r.metrics_lines() >= 3; }, 90)) << learner->log();

  ASSERT_TRUE(wait_until(
      [&] {
        const std::string l = learner->log();
        return l.find("actor seed-10 joined") != std::string::npos &&
               l.find("actor seed-11 joined") != std::string::npos;
      },
      60))
      << learner->log();
  // 1. An actor killed with SIGKILL does not stop training.
  a0->signal(SIGKILL);
  a0.reset();
  const int before = r.metrics_lines();
  ASSERT_TRUE(wait_until([&] { return r.metrics_lines() >= before + 2; }, 60)) << learner->log();
  // The dead peer's connection loss was noticed and logged.
  ASSERT_TRUE(wait_until(
      [&] {
        return learner->log().find("connection") != std::string::npos &&
               learner->log().find("lost") != std::string::npos;
      },
      10))
      << learner->log();

  // 2. The restarted actor (same id) rejoins and receives the current weights.
  a0 = std::make_unique<ChildProcess>(r.actor(10), r.log("actor0b"));
  ASSERT_TRUE(wait_until(
      [&] { return a0->log().find("received weights version") != std::string::npos; }, 60))
      << a0->log();
  EXPECT_EQ(a0->log().find("received weights version 0\n"), std::string::npos)
      << "the rejoining actor should get the current (non-initial) weights:\n"
      << a0->log();

  // 3. A stopped (silent) actor is noticed.
  a1.signal(SIGSTOP);
  ASSERT_TRUE(wait_until(
      [&] { return learner->log().find("actor seed-11 silent") != std::string::npos; }, 10))
      << learner->log();
  a1.signal(SIGCONT);

  // 4. The learner killed with SIGKILL restarts from its checkpoint; actors carry on.
  ASSERT_TRUE(wait_until(
      [&] { return fs::exists(r.dir / "out" / "checkpoint" / "remote_state.json"); }, 60));
  learner->signal(SIGKILL);
  learner->wait(10);
  learner.reset();
  const int64_t ckpt_updates = r.state().at("updates").get<int64_t>();
  learner = std::make_unique<ChildProcess>(r.learner(total, 1024, true), r.log("learner2"));
  ASSERT_TRUE(
      wait_until([&] { return learner->log().find("resumed from") != std::string::npos; }, 60))
      << learner->log();
  // Both actors (neither restarted) follow the new learner, which keeps training.
  ASSERT_TRUE(wait_until([&] { return r.metrics_lines() >= ckpt_updates + 3; }, 90))
      << learner->log();
  ASSERT_TRUE(
      wait_until([&] { return a1.log().find("learner restarted") != std::string::npos; }, 30))
      << a1.log();
  // Each actor notices on its own reconnect schedule (a CI run saw a0 a moment after a1).
  EXPECT_TRUE(
      wait_until([&] { return a0->log().find("learner restarted") != std::string::npos; }, 30))
      << a0->log();
  // 5. Stop everything cleanly (SIGTERM: the learner writes a final checkpoint).
  learner->signal(SIGTERM);
  EXPECT_EQ(learner->wait(60), 0) << learner->log();
  a0->signal(SIGTERM);
  a1.signal(SIGTERM);
  EXPECT_EQ(a0->wait(30), 0) << a0->log();
  EXPECT_EQ(a1.wait(30), 0) << a1.log();

  const auto st = r.state();
  EXPECT_GT(st.at("updates").get<int64_t>(), ckpt_updates + 2);
  expect_exactly_once(st);
  std::set<std::string> actors;
  for (const auto& u : st.at("used_chunks")) actors.insert(u[0].get<std::string>());
  EXPECT_EQ(actors, (std::set<std::string>{"seed-10", "seed-11"}));
  // metrics.jsonl: one line per update, updates 1..N without gaps or repeats.
  std::ifstream in(r.dir / "out" / "metrics.jsonl");
  std::string line;
  int64_t expect_update = 1;
  while (std::getline(in, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j.at("update").get<int64_t>(), expect_update) << line;
    ++expect_update;
  }
  EXPECT_EQ(expect_update - 1, st.at("updates").get<int64_t>());
}

}  // namespace
}  // namespace attnpilot::transport
