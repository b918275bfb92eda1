// The attention cost model: JSON round trip and malformed files, piecewise-linear
// interpolation against hand-computed values on synthetic tables, a real tiny calibration,
// bad inputs, and the `attnpilot calibrate` verb run as a process.
#include "attention/cost_model.h"

#include <ATen/Parallel.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <random>

#include "common/atomic_file.h"
#include "common/error.h"

namespace attnpilot::attention {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

/// A fresh folder under the temp dir, removed when the test passes.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / fmt::format("attnpilot-cm-{}-{}", name, getpid())) {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    if (!::testing::Test::HasFailure()) fs::remove_all(path);
  }
};

using TimeFn = std::function<double(double n, double m, double r)>;  // r = 0: dense

CalibrationOptions synthetic_options() {
  CalibrationOptions o;
  o.query_lengths = {16, 32, 64};
  o.key_lengths = {32, 64, 128, 256};
  o.ranks = {2, 4, 8, 16, 32};  // 32 > head_dim 16: skipped there
  o.head_dims = {16, 32};
  o.heads = 4;
  o.kv_heads = 2;
  o.repeats = 7;
  o.threads = 2;
  o.seed = 99;
  return o;
}

/// Every grid point of `o` with times from f (head dim d adds d / 8 µs), spread ±10%.
std::vector<CostPoint> points_from(const CalibrationOptions& o, const TimeFn& f) {
  std::vector<CostPoint> pts;
  for (int64_t d : o.head_dims)
    for (int64_t n : o.query_lengths)
      for (int64_t m : o.key_lengths) {
        if (m < n) continue;
        std::vector<int64_t> rs{0};
        for (int64_t r : o.ranks)
          if (r <= d) rs.push_back(r);
        for (int64_t r : rs) {
          CostPoint p;
          p.kind = r == 0 ? Kind::kDense : Kind::kLowRank;
          p.n_q = n;
          p.n_k = m;
          p.rank = r;
          p.head_dim = d;
          p.median_us = f(n, m, r) + d / 8.0;
          p.min_us = 0.9 * p.median_us;
          p.max_us = 1.1 * p.median_us;
          pts.push_back(p);
        }
      }
  return pts;
}

/// Multilinear in (n, m, r): reproduced exactly by piecewise-linear interpolation and by the
/// extension of edge cells, everywhere.
double multilinear(double n, double m, double r) {
  if (r == 0) return 7 + 0.5 * n + 0.03 * m + 0.002 * n * m;
  return 5 + 0.3 * n + 0.02 * m + 0.7 * r + 0.001 * n * m + 0.004 * m * r + 0.01 * n * r +
         1e-5 * n * m * r;
}

/// Curved in every axis: interpolation differs from it between grid points.
double curved(double n, double m, double r) {
  if (r == 0) return 3 + n * n / 100 + 3 * std::sqrt(m) + 1e-4 * n * m * std::log(m);
  return 2 + n * n / 200 + 2 * std::sqrt(m) + std::pow(r, 1.5) + 1e-3 * std::sqrt(n * m) * r;
}

double lerp(double x0, double y0, double x1, double y1, double x) {
  return y0 + (x - x0) / (x1 - x0) * (y1 - y0);
}

CostModel synthetic(const TimeFn& f) {
  const auto o = synthetic_options();
  return CostModel::from_points(o, points_from(o, f), json{{"cpu_model", "synthetic"}});
}

// ---------------------------------------------------------------- save / load

TEST(CostModelFile, RoundTripKeepsEveryField) {
  TempDir dir("roundtrip");
  const auto cm = synthetic(curved);
  cm.save(dir.path / "cal.json");
  const auto back = CostModel::load(dir.path / "cal.json");
  const auto &a = cm.options(), &b = back.options();
  EXPECT_EQ(a.query_lengths, b.query_lengths);
  EXPECT_EQ(a.key_lengths, b.key_lengths);
  EXPECT_EQ(a.ranks, b.ranks);
  EXPECT_EQ(a.head_dims, b.head_dims);
  EXPECT_EQ(a.heads, b.heads);
  EXPECT_EQ(a.kv_heads, b.kv_heads);
  EXPECT_EQ(a.repeats, b.repeats);
  EXPECT_EQ(a.threads, b.threads);
  EXPECT_EQ(a.seed, b.seed);
  EXPECT_EQ(a.device, b.device);
  EXPECT_EQ(cm.machine(), back.machine());
  ASSERT_EQ(cm.points().size(), back.points().size());
  for (size_t i = 0; i < cm.points().size(); ++i) {
    const auto &p = cm.points()[i], &q = back.points()[i];
    EXPECT_EQ(p.kind, q.kind);
    EXPECT_EQ(p.n_q, q.n_q);
    EXPECT_EQ(p.n_k, q.n_k);
    EXPECT_EQ(p.rank, q.rank);
    EXPECT_EQ(p.head_dim, q.head_dim);
    EXPECT_EQ(p.median_us, q.median_us);  // JSON keeps doubles exactly (shortest round trip)
    EXPECT_EQ(p.min_us, q.min_us);
    EXPECT_EQ(p.max_us, q.max_us);
  }
  EXPECT_EQ(cm.to_json(), back.to_json());
}

/// Writes `j` and expects load() to throw FormatError whose message contains `needle`.
void expect_format_error(const fs::path& file, const std::string& text, const std::string& needle) {
  write_file_atomic(file, text);
  try {
    CostModel::load(file);
    ADD_FAILURE() << "loaded a malformed file; expected FormatError naming " << needle;
  } catch (const FormatError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
        << "message '" << e.what() << "' does not name " << needle;
  }
}

TEST(CostModelFile, MalformedFilesNameTheField) {
  TempDir dir("malformed");
  const fs::path f = dir.path / "bad.json";
  const json good = synthetic(curved).to_json();
  auto with = [&](const std::function<void(json&)>& edit) {
    json j = good;
    edit(j);
    return j.dump();
  };
  expect_format_error(f, "{ not json", "not valid JSON");
  expect_format_error(f, with([](json& j) { j.erase("points"); }), "points: missing");
  expect_format_error(f, with([](json& j) { j["points"][0].erase("median_us"); }),
                      "points[0].median_us: missing");
  expect_format_error(f, with([](json& j) { j["options"].erase("heads"); }),
                      "options.heads: missing");
  expect_format_error(f, with([](json& j) { j["points"][1]["n_q"] = "16"; }),
                      "points[1].n_q: expected an integer");
  expect_format_error(f, with([](json& j) { j["options"]["ranks"] = "2,4"; }),
                      "options.ranks: expected an array");
  expect_format_error(f, with([](json& j) { j["points"][2]["median_us"] = -3.0; }),
                      "points[2].median_us = -3");
  expect_format_error(f, with([](json& j) { j["points"][2]["min_us"] = 0.0; }),
                      "points[2].min_us = 0");
  expect_format_error(f, with([](json& j) { j["points"][3]["max_us"] = 1e-6; }),
                      "points[3]: expected min_us <= median_us <= max_us");
  expect_format_error(f, with([](json& j) {
                        j["options"]["key_lengths"] = {32, 128, 64, 256};
                      }),
                      "key_lengths must be strictly increasing");
  expect_format_error(f, with([](json& j) {
                        j["options"]["query_lengths"] = {32, 16, 64};
                      }),
                      "query_lengths must be strictly increasing");
  expect_format_error(f, with([](json& j) { j["points"].erase(j["points"].begin() + 1); }),
                      "no lowrank point for head_dim 16, n_q 16, n_k 32, rank 2");
  expect_format_error(f, with([](json& j) { j["points"].push_back(j["points"][0]); }),
                      "a second dense point");
  expect_format_error(f, with([](json& j) { j["points"][0]["kind"] = "streaming"; }),
                      "points[0].kind: 'streaming'");
  expect_format_error(f, with([](json& j) { j["points"][0]["n_k"] = 48; }),
                      "points[0].n_k = 48: not among the key_lengths");
  expect_format_error(f, with([](json& j) { j["options"]["speed"] = 1; }),
                      "options.speed: unknown key");
  expect_format_error(f, with([](json& j) { j["format"] = "other"; }), "format: 'other'");
  expect_format_error(f, with([](json& j) { j["options"]["device"] = "tpu"; }),
                      "options.device: 'tpu'");
  EXPECT_THROW(CostModel::load(dir.path / "absent.json"), IoError);
}

// ---------------------------------------------------------------- interpolation

TEST(CostModelInterpolation, MultilinearTableIsReproducedEverywhere) {
  const auto cm = synthetic(multilinear);
  const auto& o = cm.options();
  const auto f = [](double n, double m, double r, int64_t d) {
    return multilinear(n, m, r) + d / 8.0;
  };
  // Grid points: exact.
  for (const auto& p : cm.points())
    EXPECT_DOUBLE_EQ(
        cm.time_us(p.kind == Kind::kDense ? HeadPlan::dense() : HeadPlan::lowrank(p.rank), p.n_q,
                   p.n_k, p.head_dim, o.heads),
        p.median_us);
  EXPECT_EQ(cm.extrapolations(), 0);
  // Random shapes inside the grid: the same multilinear value.
  std::mt19937 rng(7);
  for (int i = 0; i < 500; ++i) {
    const int64_t d = o.head_dims[rng() % 2];
    const int64_t n = 16 + rng() % 49;  // [16, 64]
    const int64_t m = std::max<int64_t>(n, 32) + rng() % (257 - std::max<int64_t>(n, 32));
    const int64_t r = rng() % 2 ? 0 : 2 + rng() % (std::min<int64_t>(d, 32) - 1);  // [2, d]
    const HeadPlan plan = r == 0 ? HeadPlan::dense() : HeadPlan::lowrank(r);
    const double want = f(n, m, r, d);
    EXPECT_NEAR(cm.time_us(plan, n, m, d, o.heads), want, 1e-9 * want)
        << "d " << d << " n " << n << " m " << m << " r " << r;
  }
  EXPECT_EQ(cm.extrapolations(), 0);
  // Outside the grid (more keys, more queries, rank 1 below the smallest rank 2): the edge cells'
  // extension, still exact for a multilinear table, and each call counted once.
  const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t>> outside = {
      {16, 20, 400, 0}, {16, 100, 300, 0}, {32, 64, 512, 8}, {16, 32, 64, 1}, {32, 80, 100, 3}};
  int64_t count = 0;
  for (const auto& [d, n, m, r] : outside) {
    const HeadPlan plan = r == 0 ? HeadPlan::dense() : HeadPlan::lowrank(r);
    const double want = f(n, m, r, d);
    EXPECT_NEAR(cm.time_us(plan, n, m, d, o.heads), want, 1e-9 * want);
    EXPECT_EQ(cm.extrapolations(), ++count);
  }
  // Rank 3 at d = 32 lies inside [2, 32]: not an extrapolation.
  cm.time_us(HeadPlan::lowrank(3), 20, 40, 32, o.heads);
  EXPECT_EQ(cm.extrapolations(), count);
  // Heads scale linearly; relative_time is the ratio to dense.
  const double t4 = cm.time_us(HeadPlan::lowrank(4), 24, 100, 32, 4);
  EXPECT_NEAR(cm.time_us(HeadPlan::lowrank(4), 24, 100, 32, 8), 2 * t4, 1e-12 * t4);
  EXPECT_NEAR(cm.time_us(HeadPlan::lowrank(4), 24, 100, 32, 1), t4 / 4, 1e-12 * t4);
  EXPECT_NEAR(cm.relative_time(HeadPlan::lowrank(4), 24, 100, 32),
              f(24, 100, 4, 32) / f(24, 100, 0, 32), 1e-9);
  EXPECT_DOUBLE_EQ(cm.relative_time(HeadPlan::dense(), 24, 100, 32), 1.0);
}

TEST(CostModelInterpolation, CurvedTableMatchesHandComputedPiecewiseLinearValues) {
  const auto cm = synthetic(curved);
  const auto g = [](double n, double m, double r) { return curved(n, m, r) + 32 / 8.0; };  // d 32
  const int64_t h = cm.options().heads;
  for (const auto& p : cm.points())
    EXPECT_DOUBLE_EQ(
        cm.time_us(p.kind == Kind::kDense ? HeadPlan::dense() : HeadPlan::lowrank(p.rank), p.n_q,
                   p.n_k, p.head_dim, h),
        p.median_us);
  // Dense (24, 48): cell N [16, 32] x M [32, 64], all four corners measured.
  {
    const double a = lerp(32, g(16, 32, 0), 64, g(16, 64, 0), 48);
    const double b = lerp(32, g(32, 32, 0), 64, g(32, 64, 0), 48);
    const double want = lerp(16, a, 32, b, 24);
    EXPECT_NEAR(cm.time_us(HeadPlan::dense(), 24, 48, 32, h), want, 1e-9);
    EXPECT_GT(std::abs(want - g(24, 48, 0)), 1e-3);  // the table is really curved here
  }
  // Dense (40, 48): row N = 64 has no M < 64, so its first segment [64, 128] is extended.
  {
    const double a = lerp(32, g(32, 32, 0), 64, g(32, 64, 0), 48);
    const double b = lerp(64, g(64, 64, 0), 128, g(64, 128, 0), 48);
    EXPECT_NEAR(cm.time_us(HeadPlan::dense(), 40, 48, 32, h), lerp(32, a, 64, b, 40), 1e-9);
  }
  // Low rank 6 at (20, 200): trilinear in N [16, 32], M [128, 256], r [4, 8].
  {
    auto at = [&](double n, double m) { return lerp(4, g(n, m, 4), 8, g(n, m, 8), 6); };
    const double a = lerp(128, at(16, 128), 256, at(16, 256), 200);
    const double b = lerp(128, at(32, 128), 256, at(32, 256), 200);
    EXPECT_NEAR(cm.time_us(HeadPlan::lowrank(6), 20, 200, 32, h), lerp(16, a, 32, b, 20), 1e-9);
  }
  // Above the grid in M: the last segment [128, 256] extended to 300, counted.
  {
    const double a = lerp(128, g(32, 128, 0), 256, g(32, 256, 0), 300);
    const double b = lerp(128, g(64, 128, 0), 256, g(64, 256, 0), 300);
    EXPECT_NEAR(cm.time_us(HeadPlan::dense(), 48, 300, 32, h), lerp(32, a, 64, b, 48), 1e-9);
    EXPECT_EQ(cm.extrapolations(), 1);
  }
}

TEST(CostModelInterpolation, ExtensionBelowTheGridIsFlooredAtTheSmallestMeasuredTime) {
  const auto cm = synthetic(multilinear);
  // Decoding one query against 8 keys: far below the grid; the multilinear extension
  // (7.75 + 0.5·1 + ...) falls under the smallest dense time, g(16, 32) + 2, and is floored.
  const double smallest = multilinear(16, 32, 0) + 16 / 8.0;
  ASSERT_LT(multilinear(1, 8, 0) + 16 / 8.0, smallest);
  EXPECT_DOUBLE_EQ(cm.time_us(HeadPlan::dense(), 1, 8, 16, cm.options().heads), smallest);
  EXPECT_EQ(cm.extrapolations(), 1);
}

// ---------------------------------------------------------------- bad input

TEST(CostModelInput, BadQueriesThrowInvalidArgumentNamingTheValue) {
  const auto cm = synthetic(curved);
  auto expect_invalid = [&](const std::function<void()>& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no exception; expected InvalidArgument naming " << needle;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_invalid([&] { cm.time_us(HeadPlan::dense(), 16, 64, 48, 4); },
                 "head_dim 48 was not calibrated; calibrated head dims: [16, 32]");
  expect_invalid([&] { cm.time_us(HeadPlan::lowrank(20), 16, 64, 16, 4); },
                 "rank 20 outside [1, head_dim 16]");
  expect_invalid([&] { cm.time_us(HeadPlan::lowrank(0), 16, 64, 16, 4); }, "rank 0");
  expect_invalid([&] { cm.time_us(HeadPlan::dense(), 65, 64, 16, 4); }, "n_keys 64 < n_queries 65");
  expect_invalid([&] { cm.time_us(HeadPlan::dense(), 0, 64, 16, 4); }, "n_queries 0");
  expect_invalid([&] { cm.time_us(HeadPlan::dense(), 16, 64, 16, 0); }, "heads 0");
  expect_invalid([&] { cm.time_us(HeadPlan::streaming(64, 4), 16, 64, 16, 4); },
                 "plan kind streaming has no calibrated times");
  expect_invalid([&] { cm.relative_time(HeadPlan::block_sparse(0.5), 16, 64, 16); },
                 "plan kind block_sparse");
  EXPECT_EQ(cm.extrapolations(), 0);

  auto o = synthetic_options();
  auto pts = points_from(o, curved);
  pts.pop_back();
  expect_invalid([&] { CostModel::from_points(o, pts); }, "no lowrank point for head_dim 32");
  o.ranks = {};
  expect_invalid([&] { CostModel::calibrate(o); }, "ranks is empty");
  o = synthetic_options();
  o.key_lengths = {8, 12};
  expect_invalid([&] { CostModel::calibrate(o); }, "query_lengths value 64 exceeds every key");
  o = synthetic_options();
  o.head_dims = {32, 32};
  expect_invalid([&] { CostModel::calibrate(o); }, "head_dims must be strictly increasing");
  o = synthetic_options();
  o.kv_heads = 3;
  expect_invalid([&] { CostModel::calibrate(o); }, "kv_heads 3");
  o = synthetic_options();
  o.repeats = 0;
  expect_invalid([&] { CostModel::calibrate(o); }, "repeats 0");
}

// ---------------------------------------------------------------- real calibration

TEST(CostModelCalibration, TinyRealCalibrationIsPositiveAndGrowsWithKeys) {
  auto o = CalibrationOptions::quick();
  const int threads_before = at::get_num_threads();
  const auto cm = CostModel::calibrate(o);
  EXPECT_EQ(at::get_num_threads(), threads_before);  // restored
  // 16 x {64..512}: 4 shapes, 64 x {64..512}: 4 shapes; dense + ranks {4, 8, 16, 32} each.
  ASSERT_EQ(cm.points().size(), 8u * 5u);
  for (const auto& p : cm.points()) {
    EXPECT_TRUE(std::isfinite(p.median_us) && p.median_us > 0) << p.median_us;
    EXPECT_LE(p.min_us, p.median_us);
    EXPECT_LE(p.median_us, p.max_us);
    // A grid point predicts its own measurement.
    const HeadPlan plan = p.kind == Kind::kDense ? HeadPlan::dense() : HeadPlan::lowrank(p.rank);
    EXPECT_DOUBLE_EQ(cm.time_us(plan, p.n_q, p.n_k, p.head_dim, o.heads), p.median_us);
  }
  // Twice the keys cost more on average (mean log ratio over every (N, M, 2M) in the grid).
  double log_ratio = 0;
  int pairs = 0;
  for (int64_t n : o.query_lengths)
    for (int64_t m : o.key_lengths)
      if (m >= n && 2 * m <= o.key_lengths.back()) {
        log_ratio += std::log(cm.time_us(HeadPlan::dense(), n, 2 * m, 32, o.heads) /
                              cm.time_us(HeadPlan::dense(), n, m, 32, o.heads));
        ++pairs;
      }
  ASSERT_EQ(pairs, 6);
  EXPECT_GT(log_ratio / pairs, 0.0) << "dense time does not grow with the key length";
  const auto mach = cm.machine();
  for (const char* k :
       {"cpu_model", "logical_cores", "threads", "torch_version", "device", "date", "allocator"})
    EXPECT_TRUE(mach.contains(k)) << k;
  EXPECT_EQ(mach.at("threads"), 1);
  EXPECT_EQ(mach.at("device"), "cpu");
}

// ---------------------------------------------------------------- the verb

#ifdef ATTNPILOT_CLI_BINARY
int run(const std::string& cmd) {
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

TEST(CalibrateVerb, QuickRunWritesALoadableFileAndBadFlagsExit2) {
  TempDir dir("verb");
  const std::string exe = ATTNPILOT_CLI_BINARY;
  const fs::path out = dir.path / "cal.json", log = dir.path / "log.txt";
  ASSERT_EQ(run(fmt::format("'{}' calibrate --quick --out '{}' > '{}' 2>&1", exe, out.string(),
                            log.string())),
            0)
      << read_file(log);
  const auto cm = CostModel::load(out);
  const auto q = CalibrationOptions::quick();
  EXPECT_EQ(cm.options().query_lengths, q.query_lengths);
  EXPECT_EQ(cm.options().key_lengths, q.key_lengths);
  EXPECT_EQ(cm.options().head_dims, q.head_dims);
  EXPECT_EQ(cm.points().size(), 40u);
  const std::string text = read_file(log);
  EXPECT_NE(text.find("dense us"), std::string::npos) << text;  // the table was printed

  EXPECT_EQ(run(fmt::format("'{}' calibrate --quick --head-dims 0 --out '{}' > '{}' 2>&1", exe,
                            (dir.path / "x.json").string(), log.string())),
            2);
  EXPECT_NE(read_file(log).find("--head-dims"), std::string::npos) << read_file(log);
  EXPECT_FALSE(fs::exists(dir.path / "x.json"));
  EXPECT_EQ(run(fmt::format("'{}' calibrate --threads 0 --out '{}' > '{}' 2>&1", exe,
                            (dir.path / "y.json").string(), log.string())),
            2);
  EXPECT_NE(read_file(log).find("--threads"), std::string::npos) << read_file(log);
}
#else
TEST(CalibrateVerb, QuickRunWritesALoadableFileAndBadFlagsExit2) {
  GTEST_SKIP() << "the attnpilot CLI target is not part of this build";
}
#endif

}  // namespace
}  // namespace attnpilot::attention
