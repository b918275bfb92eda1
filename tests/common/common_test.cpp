#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "common/atomic_file.h"
#include "common/config.h"
#include "common/error.h"
#include "common/hash.h"
#include "common/progress.h"
#include "common/stats.h"

namespace fs = std::filesystem;
using namespace attnpilot;

namespace {
fs::path temp_dir() {
  auto d = fs::temp_directory_path() / ("attnpilot_common_" + std::to_string(::getpid()));
  fs::create_directories(d);
  return d;
}
}  // namespace

TEST(AtomicFile, WritesReplacesAndLeavesNoTemporaries) {
  const auto d = temp_dir();
  const auto f = d / "x.txt";
  write_file_atomic(f, "first");
  write_file_atomic(f, "second");
  EXPECT_EQ(read_file(f), "second");
  int n = 0;
  for (auto& e : fs::directory_iterator(d))
    n += e.path().filename().string().rfind("x.txt", 0) == 0;
  EXPECT_EQ(n, 1);
  EXPECT_THROW(write_file_atomic(d / "no_such_dir" / "y", "z"), IoError);
  EXPECT_THROW(read_file(d / "missing"), IoError);
  fs::remove_all(d);
}

TEST(AtomicFile, ReplaceDirectoryKeepsOnlyTheNewOne) {
  const auto d = temp_dir();
  fs::create_directories(d / "ckpt");
  write_file_atomic(d / "ckpt" / "a", "old");
  fs::create_directories(d / "staged");
  write_file_atomic(d / "staged" / "a", "new");
  replace_directory(d / "staged", d / "ckpt");
  EXPECT_EQ(read_file(d / "ckpt" / "a"), "new");
  EXPECT_FALSE(fs::exists(d / "staged"));
  int n = 0;
  for (auto& e : fs::directory_iterator(d)) (void)e, ++n;
  EXPECT_EQ(n, 1);
  fs::remove_all(d);
}

TEST(Config, TypedGettersAndUnknownKeys) {
  auto c = Config::parse("a: 3\nb: {c: 0.5, typo: 1}\nname: x\n", "test.yaml");
  EXPECT_EQ(c.get<int>("a", 0), 3);
  EXPECT_EQ(c.get<int>("missing", 7), 7);
  auto b = c.section("b");
  EXPECT_DOUBLE_EQ(b.get<double>("c", 0.0), 0.5);
  try {
    c.check_all_read();
    FAIL() << "unread keys must throw";
  } catch (const InvalidArgument& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("b.typo"), std::string::npos) << msg;
    EXPECT_NE(msg.find("name"), std::string::npos) << msg;
    EXPECT_NE(msg.find("test.yaml"), std::string::npos) << msg;
  }
  EXPECT_THROW(c.get<int>("name", 0), InvalidArgument);
  EXPECT_THROW(c.require<int>("nope"), InvalidArgument);
  EXPECT_THROW(Config::parse("[1, 2]"), FormatError);
  EXPECT_THROW(Config::parse("a: [1, 2"), FormatError);
}

TEST(Stats, MeanCIMatchesTTable) {
  // n = 5, t_{0.975, 4} = 2.7764451
  std::vector<double> x{1, 2, 3, 4, 5};
  auto r = mean_ci(x);
  EXPECT_DOUBLE_EQ(r.mean, 3.0);
  const double half = 2.7764451051977987 * std::sqrt(2.5) / std::sqrt(5.0);
  EXPECT_NEAR(r.high - r.mean, half, 1e-9);
  EXPECT_NEAR(r.mean - r.low, half, 1e-9);
  EXPECT_THROW(mean_ci({}), InvalidArgument);
}

TEST(Stats, PairedTTest) {
  std::vector<double> a{1.0, 2.1, 2.9, 4.2, 5.1}, b{1, 2, 3, 4, 5};
  auto r = paired_t_test(a, b);
  // differences 0, .1, -.1, .2, .1: mean .06, sd .1140175
  EXPECT_NEAR(r.diff.mean, 0.06, 1e-12);
  EXPECT_NEAR(r.t, 0.06 / (0.114017542509914 / std::sqrt(5.0)), 1e-6);
  EXPECT_GT(r.p, 0.2);
  EXPECT_LT(r.p, 0.5);
  EXPECT_THROW(paired_t_test({1}, {1, 2}), InvalidArgument);
}

TEST(Fingerprint, SeparatesFieldsAndIsStable) {
  EXPECT_NE(Fingerprint().add("ab").add("c").hex(), Fingerprint().add("a").add("bc").hex());
  EXPECT_EQ(Fingerprint().add("x").add(int64_t{3}).hex(),
            Fingerprint().add("x").add(int64_t{3}).hex());
  EXPECT_EQ(Fingerprint().hex().size(), 16u);
}

TEST(Progress, FormatsDurations) {
  EXPECT_EQ(Progress::format_duration(3.21), "3.2s");
  EXPECT_EQ(Progress::format_duration(125), "2m05s");
  EXPECT_EQ(Progress::format_duration(3725), "1h02m05s");
  std::ostringstream out;
  Progress p("train", 100, "steps", out, 0.0);
  p.update(50, "loss 1.0");
  p.finish();
  EXPECT_NE(out.str().find("50/100"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("ETA"), std::string::npos) << out.str();
  EXPECT_NE(out.str().find("loss 1.0"), std::string::npos) << out.str();
}
