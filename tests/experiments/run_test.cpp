// `attnpilot run` end to end on the tiny model of tests/env/rank_fixture.h: every file is
// written, the CSV has a row per method with sane values, report.md's table equals the CSV,
// and the parts (train --task rank, then eval) reproduce the same evaluation.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "common/atomic_file.h"
#include "experiments/report.h"
#include "tests/env/rank_fixture.h"

namespace attnpilot::experiments {
namespace {

namespace fs = std::filesystem;

std::string binary() {
  const char* b = std::getenv("ATTNPILOT_BUILD_DIR");
  return (fs::path(b && *b ? b : ".") / "experiments" / "attnpilot").string();
}

int run(const std::string& args, const fs::path& log) {
  const std::string cmd =
      "OMP_NUM_THREADS=1 " + binary() + " " + args + " > " + log.string() + " 2>&1";
  const int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Dir {
  fs::path path = fs::temp_directory_path() / ("attnpilot-run-test-" + std::to_string(getpid()));
  Dir() {
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~Dir() {
    if (!::testing::Test::HasFailure()) fs::remove_all(path);
  }
};

std::string tiny_experiment(int64_t eval_sequences) {
  return "experiment:\n  seed: 3\n  train_steps: 64\n  eval_sequences: " +
         std::to_string(eval_sequences) +
         "\n  energy_taus: [0.9]\n  threads: 1\n"
         "env:\n  model: " +
         testing::tiny_rank_model().string() +
         "\n  sequence_length: 32\n  segment: 8\n  ranks: [2, 4]\n"
         "policy:\n  type: mlp\n  hidden: [16]\n"
         "ppo:\n  num_envs: 2\n  num_steps: 8\n  update_epochs: 2\n"
         "train:\n  checkpoint_every: 2\n";
}

TEST(RunVerb, TinyExperimentWritesEveryFileWithSaneValues) {
  if (!fs::exists(binary())) GTEST_SKIP() << binary() << " not built";
  Dir d;
  write_file_atomic(d.path / "exp.yaml", tiny_experiment(6));
  const fs::path out = d.path / "out";
  ASSERT_EQ(
      run("run " + (d.path / "exp.yaml").string() + " --out " + out.string(), d.path / "run.log"),
      0)
      << slurp(d.path / "run.log");
  for (const char* f : {"results.csv", "report.md", "config.yaml", "cost_model.json",
                        "train/metrics.jsonl", "train/checkpoint/manifest.json"})
    EXPECT_TRUE(fs::exists(out / f)) << f;
  for (const char* f : {"pareto.png", "rank_heatmap.png", "training_curve.png"})
    EXPECT_GT(fs::exists(out / f) ? fs::file_size(out / f) : 0, 100u) << f;

  const auto rows = parse_results_csv(slurp(out / "results.csv"));
  std::map<std::string, ResultRow> by;
  for (const auto& r : rows) by[r.method] = r;
  const std::set<std::string> expected = {"dense",  "static-r2", "static-r4", "energy-0.9",
                                          "random", "oracle",    "policy"};
  std::set<std::string> got;
  for (const auto& r : rows) got.insert(r.method);
  EXPECT_EQ(got, expected);
  EXPECT_EQ(by["dense"].attn_flops_rel, 1.0);
  EXPECT_EQ(by["dense"].ppl_change_pct, 0.0);
  EXPECT_NEAR(by["dense"].fidelity, 1.0, 1e-5);
  EXPECT_EQ(by["dense"].guardrail_violations, 0);
  for (const auto& r : rows) {
    EXPECT_TRUE(std::isfinite(r.perplexity) && r.perplexity > 1) << r.method;
    EXPECT_GT(r.attn_flops_rel, 0) << r.method;
    EXPECT_TRUE(std::isfinite(r.attn_time_rel) && r.attn_time_rel > 0) << r.method;
    EXPECT_GT(r.fidelity, 0) << r.method;
    EXPECT_LE(r.fidelity, 1 + 1e-6) << r.method;
    EXPECT_LE(r.ppl_change_ci_low, r.ppl_change_pct) << r.method;
    EXPECT_GE(r.ppl_change_ci_high, r.ppl_change_pct) << r.method;
  }
  // Rank 2 of 8 scores fewer FLOPs than rank 4, and both change the model.
  EXPECT_LT(by["static-r2"].attn_flops_rel, by["static-r4"].attn_flops_rel);
  EXPECT_LT(by["static-r2"].fidelity, 1.0);

  // report.md's table holds the CSV's numbers (6 significant digits there).
  const std::string md = slurp(out / "report.md");
  for (const auto& r : rows) {
    const std::string row = "| " + r.method + " | ";
    const auto at = md.find(row);
    ASSERT_NE(at, std::string::npos) << r.method;
    std::stringstream line(md.substr(at + 2, md.find('\n', at) - at - 2));
    std::vector<std::string> cells;
    std::string cell;
    while (std::getline(line, cell, '|')) {
      const auto b = cell.find_first_not_of(' '), e = cell.find_last_not_of(' ');
      cells.push_back(b == std::string::npos ? "" : cell.substr(b, e - b + 1));
    }
    ASSERT_GE(cells.size(), 9u) << r.method;
    const double csv[] = {
        r.attn_flops_rel,    r.attn_time_rel,      r.perplexity, r.ppl_change_pct,
        r.ppl_change_ci_low, r.ppl_change_ci_high, r.fidelity,   double(r.guardrail_violations)};
    for (int i = 0; i < 8; ++i) {
      const double v = std::stod(cells[i + 1]);
      EXPECT_NEAR(v, csv[i], 1e-5 * std::max(1.0, std::abs(csv[i]))) << r.method << " col " << i;
    }
  }
  EXPECT_NE(md.find("policy"), std::string::npos);

  // The parts: eval alone on the trained policy reproduces the run's evaluation exactly
  // for the deterministic methods (same windows, same greedy policy).
  const fs::path out2 = d.path / "out2";
  ASSERT_EQ(run("eval " + (d.path / "exp.yaml").string() + " --out " + out2.string() +
                    " --policy " + (out / "train" / "checkpoint").string(),
                d.path / "eval.log"),
            0)
      << slurp(d.path / "eval.log");
  const auto rows2 = parse_results_csv(slurp(out2 / "results.csv"));
  ASSERT_EQ(rows2.size(), rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows2[i].method, rows[i].method);
    EXPECT_DOUBLE_EQ(rows2[i].perplexity, rows[i].perplexity) << rows[i].method;
    EXPECT_DOUBLE_EQ(rows2[i].attn_flops_rel, rows[i].attn_flops_rel) << rows[i].method;
  }
}

TEST(RunVerb, AnotherConfigMovesTheOldTrainingAsideInsteadOfResumingIt) {
  if (!fs::exists(binary())) GTEST_SKIP() << binary() << " not built";
  Dir d;
  const fs::path out = d.path / "out";
  write_file_atomic(d.path / "a.yaml", tiny_experiment(2));
  ASSERT_EQ(
      run("train --task rank --config " + (d.path / "a.yaml").string() + " --out " + out.string(),
          d.path / "a.log"),
      0)
      << slurp(d.path / "a.log");
  const std::string first = slurp(out / "train" / "metrics.jsonl");
  // Same config: resumes (nothing left to train), the metrics are untouched.
  ASSERT_EQ(
      run("train --task rank --config " + (d.path / "a.yaml").string() + " --out " + out.string(),
          d.path / "a2.log"),
      0);
  EXPECT_EQ(slurp(out / "train" / "metrics.jsonl"), first);
  // Another seed: the old training is kept beside the new one.
  std::string b = tiny_experiment(2);
  b.replace(b.find("seed: 3"), 7, "seed: 4");
  write_file_atomic(d.path / "b.yaml", b);
  ASSERT_EQ(
      run("train --task rank --config " + (d.path / "b.yaml").string() + " --out " + out.string(),
          d.path / "b.log"),
      0)
      << slurp(d.path / "b.log");
  int aside = 0;
  for (const auto& e : fs::directory_iterator(out))
    if (e.path().filename().string().rfind("train.previous-", 0) == 0) {
      ++aside;
      EXPECT_EQ(slurp(e.path() / "metrics.jsonl"), first);
    }
  EXPECT_EQ(aside, 1);
  EXPECT_TRUE(fs::exists(out / "train" / "checkpoint" / "manifest.json"));
}

TEST(RunVerb, BadConfigsExitTwoNamingTheKey) {
  if (!fs::exists(binary())) GTEST_SKIP() << binary() << " not built";
  Dir d;
  write_file_atomic(d.path / "typo.yaml", tiny_experiment(4) + "experimnt: {}\n");
  EXPECT_EQ(run("run " + (d.path / "typo.yaml").string() + " --out " + (d.path / "o").string(),
                d.path / "typo.log"),
            2);
  EXPECT_NE(slurp(d.path / "typo.log").find("experimnt"), std::string::npos);
  std::string split = tiny_experiment(4);
  split.replace(split.find("  segment: 8"), 12, "  segment: 8\n  split: validation");
  write_file_atomic(d.path / "split.yaml", split);
  EXPECT_EQ(run("run " + (d.path / "split.yaml").string() + " --out " + (d.path / "o").string(),
                d.path / "split.log"),
            2);
  EXPECT_NE(slurp(d.path / "split.log").find("env.split"), std::string::npos);
  write_file_atomic(d.path / "ok.yaml", tiny_experiment(4));
  EXPECT_EQ(run("eval " + (d.path / "ok.yaml").string() + " --out " + (d.path / "o2").string(),
                d.path / "nopolicy.log"),
            2);
  EXPECT_NE(slurp(d.path / "nopolicy.log").find("no trained policy"), std::string::npos);
  EXPECT_EQ(run("train --task rank --env CartPole-v1 --out " + (d.path / "o3").string(),
                d.path / "task.log"),
            2);
}

}  // namespace
}  // namespace attnpilot::experiments
