#pragma once
// A remote-training run folder for end-to-end tests: the learner/actor command lines of
// the built binary, metrics and checkpoint readers, and the exactly-once audit.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>

#include "common/atomic_file.h"

namespace attnpilot::transport {

namespace fs = std::filesystem;

struct RemoteRun {
  fs::path dir, exe, config;
  std::string ep;
  explicit RemoteRun(const std::string& name) {
    const char* build = std::getenv("ATTNPILOT_BUILD_DIR");
    exe = fs::path(build && *build ? build : ATTNPILOT_DEFAULT_BUILD_DIR) / "experiments" /
          "attnpilot";
    dir = fs::temp_directory_path() / fmt::format("attnpilot-remote-{}-{}", name, getpid());
    fs::remove_all(dir);
    fs::create_directories(dir);
    ep = "ipc://" + (dir / "learner.sock").string();
    config = dir / "config.yaml";
  }
  ~RemoteRun() {
    if (!::testing::Test::HasFailure()) fs::remove_all(dir);
  }
  std::vector<std::string> learner(int64_t total, int64_t per_update, bool resume) const {
    std::vector<std::string> a = {exe.string(),
                                  "learner",
                                  "--bind",
                                  ep,
                                  "--env",
                                  "CartPole-v1",
                                  "--total-steps",
                                  std::to_string(total),
                                  "--seed",
                                  "1",
                                  "--out",
                                  (dir / "out").string(),
                                  "--config",
                                  config.string(),
                                  "--steps-per-update",
                                  std::to_string(per_update),
                                  "--checkpoint-every",
                                  "2",
                                  "--heartbeat-ms",
                                  "200",
                                  "--idle-timeout",
                                  "60"};
    if (resume) a.push_back("--resume");
    return a;
  }
  std::vector<std::string> actor(int seed) const {
    return {exe.string(),     "actor",  "--connect",          ep,         "--env",
            "CartPole-v1",    "--seed", std::to_string(seed), "--config", config.string(),
            "--heartbeat-ms", "200",    "--max-idle",         "30"};
  }
  std::string log(const std::string& name) const { return (dir / (name + ".log")).string(); }
  int metrics_lines() const {
    std::ifstream in(dir / "out" / "metrics.jsonl");
    int n = 0;
    std::string line;
    while (std::getline(in, line)) n += !line.empty();
    return n;
  }
  nlohmann::json last_metrics() const {
    std::ifstream in(dir / "out" / "metrics.jsonl");
    std::string line, last;
    while (std::getline(in, line))
      if (!line.empty()) last = line;
    return nlohmann::json::parse(last);
  }
  nlohmann::json state() const {
    return nlohmann::json::parse(read_file(dir / "out" / "checkpoint" / "remote_state.json"));
  }
};

inline bool have_binary(const RemoteRun& r) { return fs::exists(r.exe); }

inline void expect_exactly_once(const nlohmann::json& st) {
  std::set<std::pair<std::string, uint64_t>> seen;
  int64_t steps = 0;
  for (const auto& u : st.at("used_chunks")) {
    EXPECT_TRUE(seen.insert({u[0].get<std::string>(), u[1].get<uint64_t>()}).second)
        << "chunk used twice: " << u.dump();
    steps += u[2].get<int64_t>();
  }
  EXPECT_EQ(steps, st.at("steps_used").get<int64_t>());
}

}  // namespace attnpilot::transport
