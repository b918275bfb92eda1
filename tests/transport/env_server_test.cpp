// env-server: the C++ server loop against the real CartPole (in-process, batched step with
// auto-reset compared with directly stepped envs), and the built `attnpilot env-server`
// driven from Python through the gymnasium client (check_env + CartPole transitions
// checked against gymnasium's own CartPole-v1).
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <thread>

#include "child_process.h"
#include "env/registry.h"
#include "transport/env_adapter.h"
#include "transport/tensor_codec.h"

namespace attnpilot::transport {
namespace {

namespace fs = std::filesystem;

Message request(MsgType t, uint64_t seq, const std::string& meta) {
  Message m;
  m.type = t;
  m.seq = seq;
  m.meta = meta;
  return m;
}

Received roundtrip(Socket& c, Message m) {
  EXPECT_TRUE(c.send(m, 2000));
  auto r = c.recv(5000);
  if (!r) throw IoError("no reply from the env-server");
  EXPECT_EQ(r->msg.seq, m.seq);
  return *r;
}

TEST(EnvServer, BatchedStepsMatchLocalEnvsWithAutoReset) {
  zmq::context_t ctx;
  EnvServerOptions o;
  o.endpoint = "inproc://env-server-test";
  EnvServer server(ctx, o, "CartPole-v1", registry_factory("CartPole-v1", Config()));
  std::atomic<bool> stop{false};
  std::thread t([&] { server.serve(&stop); });
  Socket c(ctx, zmq::socket_type::dealer, {}, "client");
  c.connect(o.endpoint);

  const auto spec = parse_meta(roundtrip(c, request(MsgType::kSpecRequest, 1, "")).msg);
  EXPECT_EQ(spec.at("action_space").at("type"), "discrete");
  EXPECT_EQ(spec.at("action_space").at("n"), 2);
  EXPECT_EQ(spec.at("observation_space").at("shape"), nlohmann::json::array({4}));

  const int64_t n = 3;
  const uint64_t seed = 42;
  auto reset = roundtrip(c, request(MsgType::kResetRequest, 2, R"({"seed":42,"num_envs":3})"));
  ASSERT_EQ(reset.msg.type, MsgType::kResetReply);
  // Reference: the same envs stepped locally, reset with seed + i, auto-reset with reset().
  std::vector<std::unique_ptr<env::Env>> ref;
  torch::Tensor ref_obs = torch::empty({n, 4});
  for (int64_t i = 0; i < n; ++i) {
    ref.push_back(env::make_env("CartPole-v1"));
    ref_obs[i] = ref[i]->reset(seed + i);
  }
  EXPECT_TRUE(torch::equal(to_torch(reset.msg.tensor("obs")), ref_obs));
  torch::manual_seed(3);
  int finished = 0;
  for (uint64_t step = 0; step < 120; ++step) {
    const torch::Tensor actions = torch::randint(0, 2, {n}, torch::kInt64);
    Message req = request(MsgType::kStepRequest, 10 + step, "");
    req.tensors.push_back(to_blob("actions", actions));
    const auto r = roundtrip(c, req).msg;
    ASSERT_EQ(r.type, MsgType::kStepReply) << r.meta;
    const auto obs = to_torch(r.tensor("obs"));
    const auto fin = to_torch(r.tensor("final_obs"));
    const auto term = to_torch(r.tensor("terminated"));
    for (int64_t i = 0; i < n; ++i) {
      const auto s = ref[i]->step(actions[i]);
      EXPECT_EQ(term[i].item<bool>(), s.terminated);
      EXPECT_FLOAT_EQ(to_torch(r.tensor("rewards"))[i].item<float>(), static_cast<float>(s.reward));
      if (s.done()) {
        ++finished;
        EXPECT_TRUE(torch::equal(fin[i], s.observation));
        EXPECT_TRUE(torch::equal(obs[i], ref[i]->reset()));
      } else {
        EXPECT_TRUE(torch::equal(obs[i], s.observation));
      }
    }
  }
  EXPECT_GT(finished, 3);  // random actions end CartPole episodes in ~20 steps

  // Bad requests are answered with errors naming the problem; the server carries on.
  Message bad = request(MsgType::kStepRequest, 500, "");
  bad.tensors.push_back(to_blob("actions", torch::zeros({5}, torch::kInt64)));
  auto e = roundtrip(c, bad).msg;
  EXPECT_EQ(e.type, MsgType::kError);
  EXPECT_NE(e.meta.find("actions of shape"), std::string::npos) << e.meta;
  Message bad2 = request(MsgType::kStepRequest, 501, "");
  bad2.tensors.push_back(to_blob("actions", torch::full({3}, 7, torch::kInt64)));
  EXPECT_EQ(roundtrip(c, bad2).msg.type, MsgType::kError);
  EXPECT_EQ(roundtrip(c, request(MsgType::kResetRequest, 502, R"({"seed":"x"})")).msg.type,
            MsgType::kError);
  c.send_raw("garbage that is not a frame", 1000);
  EXPECT_EQ(roundtrip(c, request(MsgType::kSpecRequest, 503, "")).msg.type, MsgType::kSpecReply);
  stop = true;
  t.join();
  EXPECT_EQ(server.errors(), 3u);
  EXPECT_EQ(server.decode_counters().total(), 1u);
}

TEST(EnvServer, PythonGymnasiumClientPassesCheckEnvOnCartPole) {
  const char* py = std::getenv("ATTNPILOT_PYTHON");
  const char* src = std::getenv("ATTNPILOT_SOURCE_DIR");
  const char* build = std::getenv("ATTNPILOT_BUILD_DIR");
  if (!py || !*py || !src || !build)
    GTEST_SKIP() << "ATTNPILOT_PYTHON/SOURCE_DIR/BUILD_DIR not set";
  const std::string probe = std::string(py) + " -c 'import gymnasium, zmq, numpy' 2>/dev/null";
  if (std::system(probe.c_str()) != 0) GTEST_SKIP() << py << " lacks gymnasium, pyzmq or numpy";
  const fs::path exe = fs::path(build) / "experiments" / "attnpilot";
  if (!fs::exists(exe)) GTEST_SKIP() << exe << " not built (build the attnpilot target)";

  const fs::path dir = fs::temp_directory_path() / fmt::format("attnpilot-envsrv-{}", getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string ep = "ipc://" + (dir / "env.sock").string();
  testing::ChildProcess server(
      {exe.string(), "env-server", "--bind", ep, "--env", "CartPole-v1", "--run-for", "120"},
      (dir / "server.log").string());
  ASSERT_TRUE(testing::wait_until([&] { return fs::exists(dir / "env.sock"); }, 30))
      << server.log();
  testing::ChildProcess client(
      {py, (fs::path(src) / "tests/transport/python_client_check.py").string(), ep,
       (fs::path(src) / "clients/python").string()},
      (dir / "client.log").string());
  const int rc = client.wait(110);
  EXPECT_EQ(rc, 0) << "client log:\n" << client.log() << "\nserver log:\n" << server.log();
  EXPECT_NE(client.log().find("OK 5"), std::string::npos) << client.log();
  // The malformed frame the client sent was refused and counted, the server kept serving.
  server.signal(SIGTERM);
  EXPECT_EQ(server.wait(10), 0) << server.log();
  EXPECT_NE(server.log().find("refused a"), std::string::npos) << server.log();
  fs::remove_all(dir);
}

}  // namespace
}  // namespace attnpilot::transport
