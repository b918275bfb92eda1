// Learner and actor loops with a counting backend (in-process, ipc:// loopback): the
// learner's parameter counts every env step it used, so exactly-once accounting is
// checked against a simple reference (the sum of the steps of the chunks it used). Also:
// an actor replaced by a new one with the same id continues its sequence numbers, a
// resumed learner keeps its ledger, and actors stop on the learner's shutdown.
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <set>
#include <thread>

#include "common/atomic_file.h"
#include "transport/protocol.h"
#include "transport/remote_roles.h"
#include "transport/socket.h"
#include "transport/tensor_codec.h"

namespace attnpilot::transport {
namespace {

namespace fs = std::filesystem;

// Learner: parameter "count" += sum over chunks of sum(x); every x element is 1, so the
// parameter equals the number of env steps used.
class CountingLearner : public LearnerBackend {
 public:
  CountingLearner() : count_(torch::zeros({1}, torch::kFloat64)) {}
  NamedParams parameters() override { return {{"count", count_}}; }
  nlohmann::json update(const std::vector<Chunk>& chunks) override {
    for (const auto& c : chunks) {
      for (const auto& [n, t] : c.tensors)
        if (n == "x") count_ += t.sum().to(torch::kFloat64);
    }
    return {{"count", count_.item<double>()}};
  }
  void save(const fs::path& dir) override { torch::save(count_, (dir / "count.pt").string()); }
  void load(const fs::path& dir) override { torch::load(count_, (dir / "count.pt").string()); }
  double count() const { return count_.item<double>(); }

 private:
  torch::Tensor count_;
};

// Actor: chunks of `steps` ones; records the weights it saw.
class CountingActor : public ActorBackend {
 public:
  explicit CountingActor(int64_t steps) : steps_(steps), w_(torch::zeros({1}, torch::kFloat64)) {}
  NamedParams parameters() override { return {{"count", w_}}; }
  Chunk collect() override {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    Chunk c;
    c.tensors.emplace_back("x", torch::ones({steps_}));
    c.steps = steps_;
    c.episodes = 1;
    c.episode_return_sum = static_cast<double>(steps_);
    return c;
  }
  double seen() const { return w_.item<double>(); }

 private:
  int64_t steps_;
  torch::Tensor w_;
};

struct Fixture {
  fs::path dir;
  std::string ep;
  explicit Fixture(const std::string& name) {
    dir = fs::temp_directory_path() / fmt::format("attnpilot-roles-{}-{}", name, getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    ep = "ipc://" + (dir / "learner.sock").string();
  }
  ~Fixture() { fs::remove_all(dir); }
  LearnerOptions learner(int64_t total, int64_t per_update) const {
    LearnerOptions o;
    o.endpoint = ep;
    o.env_name = "counting";
    o.out_dir = dir / "run";
    o.total_steps = total;
    o.steps_per_update = per_update;
    o.max_lag = 1;
    o.checkpoint_every = 2;
    o.idle_timeout_s = 20;
    return o;
  }
  ActorOptions actor(const std::string& id) const {
    ActorOptions o;
    o.endpoint = ep;
    o.env_name = "counting";
    o.actor_id = id;
    o.max_idle_s = 20;
    return o;
  }
};

nlohmann::json final_state(const Fixture& f) {
  return nlohmann::json::parse(read_file(f.dir / "run" / "checkpoint" / "remote_state.json"));
}

void expect_exactly_once(const nlohmann::json& st, double count) {
  std::set<std::pair<std::string, uint64_t>> seen;
  int64_t steps = 0;
  for (const auto& u : st.at("used_chunks")) {
    EXPECT_TRUE(seen.insert({u[0].get<std::string>(), u[1].get<uint64_t>()}).second)
        << "chunk counted twice: " << u.dump();
    steps += u[2].get<int64_t>();
  }
  EXPECT_EQ(steps, st.at("steps_used").get<int64_t>());
  EXPECT_DOUBLE_EQ(count, static_cast<double>(steps));
}

TEST(Roles, LearnerAndTwoActorsCountEveryStepOnce) {
  Fixture f("two");
  zmq::context_t ctx;
  CountingLearner lb;
  LearnerResult lr;
  std::thread learner([&] { lr = run_learner(ctx, f.learner(2000, 200), lb); });
  CountingActor a0(16), a1(24);
  ActorResult r0, r1;
  std::thread t0([&] { r0 = run_actor(ctx, f.actor("0"), a0); });
  std::thread t1([&] { r1 = run_actor(ctx, f.actor("1"), a1); });
  learner.join();
  t0.join();
  t1.join();
  EXPECT_GE(lr.steps_used, 2000);
  EXPECT_EQ(lr.version, lr.updates);
  EXPECT_TRUE(r0.shutdown_received && r1.shutdown_received);
  EXPECT_GT(r0.chunks_sent, 0u);
  EXPECT_GT(r1.chunks_sent, 0u);
  EXPECT_GT(r0.weights_received, 1u);  // initial weights and later versions
  EXPECT_DOUBLE_EQ(lb.count(), static_cast<double>(lr.steps_used));
  expect_exactly_once(final_state(f), lb.count());
  // One metrics line per update.
  const std::string metrics = read_file(f.dir / "run" / "metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), lr.updates);
}

TEST(Roles, ReplacedActorContinuesItsSequenceAndResumedLearnerKeepsItsLedger) {
  Fixture f("resume");
  zmq::context_t ctx;
  // Phase 1: learner stops itself (stop flag) after some updates; actor "a" is stopped
  // midway and replaced by a new actor "a" that starts with sequence number 0.
  std::atomic<bool> stop_learner{false}, stop_a{false};
  CountingLearner lb1;
  LearnerOptions lo = f.learner(100000, 100);
  lo.stop_flag = &stop_learner;
  std::thread learner([&] { run_learner(ctx, lo, lb1); });
  {
    CountingActor a(10);
    ActorOptions ao = f.actor("a");
    ao.stop_flag = &stop_a;
    std::thread t([&] { run_actor(ctx, ao, a); });
    std::this_thread::sleep_for(std::chrono::milliseconds(600));
    stop_a = true;
    t.join();
  }
  stop_a = false;
  CountingActor a2(10);
  ActorOptions ao2 = f.actor("a");
  ao2.stop_flag = &stop_a;
  std::thread t2([&] { run_actor(ctx, ao2, a2); });
  std::this_thread::sleep_for(std::chrono::milliseconds(600));
  stop_learner = true;
  learner.join();
  stop_a = true;
  t2.join();
  const auto st1 = final_state(f);
  expect_exactly_once(st1, lb1.count());
  const uint64_t expected_a = st1.at("ledger").at("a").get<uint64_t>() + 1;
  EXPECT_GT(expected_a, 1u);

  // Phase 2: a fresh learner refuses the existing checkpoint without --resume, resumes
  // with it, and a new actor "a" gets sequence numbers after the ledger's.
  CountingLearner lb2;
  LearnerOptions lo2 = f.learner(st1.at("steps_used").get<int64_t>() + 300, 100);
  EXPECT_THROW(run_learner(ctx, lo2, lb2), InvalidArgument);
  lo2.resume = true;
  std::thread learner2([&] { run_learner(ctx, lo2, lb2); });
  CountingActor a3(10);
  ActorResult r3;
  std::thread t3([&] { r3 = run_actor(ctx, f.actor("a"), a3); });
  learner2.join();
  t3.join();
  EXPECT_TRUE(r3.shutdown_received);
  const auto st2 = final_state(f);
  expect_exactly_once(st2, lb2.count());  // count restored from the checkpoint, then added to
  std::set<uint64_t> seqs_a;
  for (const auto& u : st2.at("used_chunks"))
    if (u[0] == "a") seqs_a.insert(u[1].get<uint64_t>());
  EXPECT_GE(*seqs_a.rbegin(), expected_a);  // the new actor continued after the ledger
}

// A learner that restarted unseen by the actor: the actor's window of unacknowledged chunks is
// full (the old learner never acked them) and it missed the reconnect, so nothing but a hello
// brings the two together again. A scripted learner (a ROUTER socket here) welcomes the actor,
// takes its first window of chunks without acking them and stays silent: the actor must say
// hello again after a few seconds, and a welcome from a new incarnation must make it drop the
// window and follow the new learner.
TEST(Roles, ActorWithAFullWindowSaysHelloAgainAfterSilence) {
  Fixture f("silent");
  zmq::context_t ctx;
  Socket learner(ctx, zmq::socket_type::router, SocketOptions{}, "scripted learner");
  learner.bind(f.ep);
  std::atomic<bool> stop{false};
  CountingActor a(10);
  ActorOptions ao = f.actor("s");
  ao.stop_flag = &stop;
  std::string actor_error;
  std::thread t([&] {
    try {
      run_actor(ctx, ao, a);
    } catch (const std::exception& e) {
      actor_error = e.what();
    }
  });
  struct StopAndJoin {  // also when an assertion below returns early
    std::atomic<bool>& stop;
    std::thread& t;
    ~StopAndJoin() {
      stop = true;
      if (t.joinable()) t.join();
    }
  } stop_and_join{stop, t};
  auto next = [&](int timeout_ms) { return learner.recv(timeout_ms); };
  auto weights = [](uint64_t incarnation) {
    Message w;
    w.type = MsgType::kWeights;
    w.seq = 0;
    w.meta = nlohmann::json{{"version", 0}, {"incarnation", incarnation}, {"max_lag", 100}}.dump();
    w.tensors = params_to_blobs({{"count", torch::zeros({1}, torch::kFloat64)}});
    return w;
  };
  const auto hello1 = next(10000);
  ASSERT_TRUE(hello1 && hello1->msg.type == MsgType::kHello);
  ASSERT_TRUE(learner.send_to(hello1->envelope, make_welcome(1, 0, 0)));
  ASSERT_TRUE(learner.send_to(hello1->envelope, weights(1)));
  for (int i = 0; i < ao.max_unacked; ++i) {
    const auto c = next(10000);
    ASSERT_TRUE(c && c->msg.type == MsgType::kTrajectory) << "chunk " << i;
  }
  const int64_t t0 = now_ms();
  const auto hello2 = next(15000);  // nothing else may come while the window is full
  const int64_t waited = now_ms() - t0;
  ASSERT_TRUE(hello2) << "no hello after " << waited << " ms of silence; " << actor_error;
  EXPECT_EQ(hello2->msg.type, MsgType::kHello);
  EXPECT_GE(waited, 2000) << "hello again before the silence threshold";
  ASSERT_TRUE(learner.send_to(hello2->envelope, make_welcome(2, 0, 0)));
  ASSERT_TRUE(learner.send_to(hello2->envelope, weights(2)));
  const auto c = next(10000);
  ASSERT_TRUE(c && c->msg.type == MsgType::kTrajectory);
  EXPECT_EQ(nlohmann::json::parse(c->msg.meta).at("incarnation").get<uint64_t>(), 2u)
      << "the actor still follows the first incarnation";
  // Sequence numbers never go back: the dropped chunks' numbers are not reused.
  EXPECT_EQ(c->msg.seq, static_cast<uint64_t>(ao.max_unacked));
  stop = true;
  t.join();
  EXPECT_TRUE(actor_error.empty()) << actor_error;
}

}  // namespace
}  // namespace attnpilot::transport
