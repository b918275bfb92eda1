#include "experiments/report.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/plot.h"

namespace fs = std::filesystem;
using namespace attnpilot;
using namespace attnpilot::experiments;

namespace {

constexpr double kPi = 3.14159265358979323846;

MethodResult method(const std::string& name, std::vector<double> nll, double flops,
                    double time_us = 0, double control = 0) {
  MethodResult m;
  m.method = name;
  m.seq_nll = std::move(nll);
  m.attn_flops = flops;
  m.attn_time_us = time_us;
  m.control_flops = control;
  m.fidelity = 1.0;
  return m;
}

const ResultRow& find(const std::vector<ResultRow>& rows, const std::string& name) {
  for (const auto& r : rows)
    if (r.method == name) return r;
  throw std::runtime_error("no row " + name);
}

ResultRow row(const std::string& name, double flops, double ppl, double change = 0,
              double time = 1.0) {
  ResultRow r;
  r.method = name;
  r.attn_flops_rel = flops;
  r.attn_time_rel = time;
  r.perplexity = ppl;
  r.ppl_change_pct = change;
  r.ppl_change_ci_low = change - 0.2;
  r.ppl_change_ci_high = change + 0.2;
  r.fidelity = 0.99;
  return r;
}

// A static sweep: the front is r4, r8, r16; r12 is dominated by r8.
std::vector<ResultRow> static_sweep() {
  return {row("dense", 1.0, 10.9), row("static-r4", 0.25, 14.0, 28.0),
          row("static-r8", 0.5, 12.0, 10.0), row("static-r12", 0.6, 12.5, 14.0),
          row("static-r16", 0.75, 11.0, 0.9)};
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no exception)";
}

fs::path temp_dir(const std::string& tag) {
  auto d =
      fs::temp_directory_path() / ("attnpilot_report_" + tag + "_" + std::to_string(::getpid()));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) out.push_back(cur);
  return out;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(' ');
  const auto e = s.find_last_not_of(' ');
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

}  // namespace

TEST(ResultRows, MatchHandComputedValues) {
  const std::vector<double> dense_nll = {2.0, 2.2, 2.4, 2.6};
  const std::vector<double> d = {0.01, 0.03, 0.02, 0.04};
  std::vector<double> pol_nll(4);
  for (int i = 0; i < 4; ++i) pol_nll[i] = dense_nll[i] + d[i];
  MethodResult dense = method("dense", dense_nll, 1000, 500, 0);
  MethodResult pol = method("policy", pol_nll, 400, 300, 50);
  pol.fidelity = 0.97;
  pol.guardrail_violations = 3;
  const auto rows = result_rows({dense, pol});
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[0].method, "dense");
  EXPECT_EQ(rows[1].method, "policy");

  const ResultRow& p = rows[1];
  EXPECT_NEAR(p.attn_flops_rel, 0.4, 1e-15);
  EXPECT_NEAR(p.attn_time_rel, 0.6, 1e-15);
  EXPECT_NEAR(p.control_flops_rel, 0.05, 1e-15);
  EXPECT_NEAR(p.perplexity, std::exp(2.325), 1e-12);
  EXPECT_EQ(p.fidelity, 0.97);
  EXPECT_EQ(p.guardrail_violations, 3);
  // d = .01 .03 .02 .04: mean .025, sample variance 5e-4 / 3, n = 4 (3 dof).
  const double mean = 0.025;
  const double sd = std::sqrt(5e-4 / 3.0);
  const double se = sd / 2.0;
  const double t975_3dof = 3.182446305284263;  // Student-t table, 0.975 quantile, 3 dof
  const double h = t975_3dof * se;
  EXPECT_NEAR(p.ppl_change_pct, 100 * (std::exp(mean) - 1), 1e-10);
  EXPECT_NEAR(p.ppl_change_ci_low, 100 * (std::exp(mean - h) - 1), 1e-9);
  EXPECT_NEAR(p.ppl_change_ci_high, 100 * (std::exp(mean + h) - 1), 1e-9);
  // Two-sided p with 3 dof from the closed-form CDF:
  // F(t) = 1/2 + (1/pi) [ (t/sqrt3) / (1 + t^2/3) + atan(t/sqrt3) ].
  const double t = mean / se;
  const double x = t / std::sqrt(3.0);
  const double cdf = 0.5 + (x / (1 + t * t / 3) + std::atan(x)) / kPi;
  EXPECT_NEAR(p.p_value, 2 * (1 - cdf), 1e-10);
  EXPECT_GT(p.p_value, 0.02);
  EXPECT_LT(p.p_value, 0.04);

  const ResultRow& dr = rows[0];
  EXPECT_EQ(dr.attn_flops_rel, 1.0);
  EXPECT_EQ(dr.attn_time_rel, 1.0);
  EXPECT_NEAR(dr.perplexity, std::exp(2.3), 1e-12);
  EXPECT_EQ(dr.ppl_change_pct, 0.0);
  EXPECT_EQ(dr.ppl_change_ci_low, 0.0);
  EXPECT_EQ(dr.ppl_change_ci_high, 0.0);
  EXPECT_EQ(dr.p_value, 1.0);
}

TEST(ResultRows, TwoSequencesUseOneDegreeOfFreedom) {
  MethodResult dense = method("dense", {1.0, 3.0}, 10);
  MethodResult s = method("static-r4", {1.1, 3.3}, 5);
  const auto rows = result_rows({s, dense});  // dense need not come first
  const ResultRow& r = find(rows, "static-r4");
  // d = .1 .3: mean .2, sd = sqrt(.02), se = .1; t(0.975, 1 dof) = 12.706204736174707.
  const double h = 12.706204736174707 * 0.1;
  EXPECT_NEAR(r.ppl_change_ci_low, 100 * (std::exp(0.2 - h) - 1), 1e-9);
  EXPECT_NEAR(r.ppl_change_ci_high, 100 * (std::exp(0.2 + h) - 1), 1e-9);
  // 1 dof is Cauchy: p = 1 - 2 atan(|t|) / pi with t = 2.
  EXPECT_NEAR(r.p_value, 1 - 2 * std::atan(2.0) / kPi, 1e-10);
  EXPECT_TRUE(std::isnan(r.attn_time_rel)) << "dense time 0 means time was not measured";
}

TEST(ResultRows, BadInputsNameTheMethod) {
  const MethodResult dense = method("dense", {1, 2, 3}, 100);
  const MethodResult pol = method("policy", {1, 2, 3}, 50);
  EXPECT_THROW(result_rows({}), InvalidArgument);

  std::string e = error_of([&] { result_rows({pol}); });
  EXPECT_TRUE(contains(e, "no \"dense\" row") && contains(e, "policy")) << e;

  MethodResult short_run = method("static-r8", {1, 2}, 50);
  e = error_of([&] { result_rows({dense, short_run}); });
  EXPECT_TRUE(contains(e, "static-r8") && contains(e, "2 held-out") && contains(e, "dense has 3"))
      << e;

  e = error_of([&] { result_rows({dense, pol, pol}); });
  EXPECT_TRUE(contains(e, "'policy' appears twice")) << e;

  e = error_of([&] { result_rows({dense, method("a,b", {1, 2, 3}, 1)}); });
  EXPECT_TRUE(contains(e, "'a,b'")) << e;

  e = error_of([&] { result_rows({dense, method("oracle", {1, NAN, 3}, 1)}); });
  EXPECT_TRUE(contains(e, "oracle") && contains(e, "seq_nll[1]")) << e;

  e = error_of([&] { result_rows({dense, method("random", {1, 2, 3}, -5)}); });
  EXPECT_TRUE(contains(e, "random") && contains(e, "attn_flops = -5")) << e;

  e = error_of([&] { result_rows({method("dense", {1, 2, 3}, 0)}); });
  EXPECT_TRUE(contains(e, "dense") && contains(e, "attn_flops = 0")) << e;

  e = error_of([&] { result_rows({method("dense", {1}, 10)}); });
  EXPECT_TRUE(contains(e, "at least 2")) << e;

  MethodResult ragged = pol;
  ragged.mean_rank = {{1, 2}, {3}};
  e = error_of([&] { result_rows({dense, ragged}); });
  EXPECT_TRUE(contains(e, "policy") && contains(e, "mean_rank layer 1")) << e;

  EXPECT_THROW(result_rows({pol}), InvalidArgument);
}

TEST(ResultsCsv, ExactHeaderAndLosslessRoundTrip) {
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<double> noise(0.0, 0.05);
  const int n = 7;
  std::vector<double> base(n);
  for (auto& v : base) v = 3.0 + noise(rng) * 4;
  std::vector<MethodResult> in = {method("dense", base, 1e9, 12345.6)};
  for (const char* name : {"static-r4", "energy-0.95", "random", "oracle", "policy"}) {
    std::vector<double> nll(n);
    for (int i = 0; i < n; ++i) nll[i] = base[i] + std::fabs(noise(rng));
    MethodResult m = method(name, nll, 1e9 * std::uniform_real_distribution<>(0.1, 1)(rng),
                            12345.6 * std::uniform_real_distribution<>(0.1, 1.2)(rng));
    m.fidelity = std::uniform_real_distribution<>(0.8, 1)(rng);
    m.guardrail_violations = static_cast<int64_t>(rng() % 100);
    in.push_back(m);
  }
  auto rows = result_rows(in);
  rows[2].fidelity = 1.0 / 3.0;
  rows[3].attn_time_rel = NAN;
  rows[4].attn_flops_rel = 1e-300;
  const std::string csv = results_csv(rows);
  EXPECT_EQ(csv.substr(0, csv.find('\n')),
            "method,attn_flops_rel,attn_time_rel,perplexity,ppl_change_pct,ppl_change_ci_low,"
            "ppl_change_ci_high,fidelity,guardrail_violations");
  EXPECT_EQ(split(csv, '\n').size(), rows.size() + 1);

  const auto back = parse_results_csv(csv);
  ASSERT_EQ(back.size(), rows.size());
  auto same = [](double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; };
  for (size_t i = 0; i < rows.size(); ++i) {
    SCOPED_TRACE(rows[i].method);
    EXPECT_EQ(back[i].method, rows[i].method);
    EXPECT_TRUE(same(back[i].attn_flops_rel, rows[i].attn_flops_rel));
    EXPECT_TRUE(same(back[i].attn_time_rel, rows[i].attn_time_rel));
    EXPECT_TRUE(same(back[i].perplexity, rows[i].perplexity));
    EXPECT_TRUE(same(back[i].ppl_change_pct, rows[i].ppl_change_pct));
    EXPECT_TRUE(same(back[i].ppl_change_ci_low, rows[i].ppl_change_ci_low));
    EXPECT_TRUE(same(back[i].ppl_change_ci_high, rows[i].ppl_change_ci_high));
    EXPECT_TRUE(same(back[i].fidelity, rows[i].fidelity));
    EXPECT_EQ(back[i].guardrail_violations, rows[i].guardrail_violations);
    EXPECT_TRUE(std::isnan(back[i].p_value)) << "p is not in the CSV";
  }
  EXPECT_EQ(results_csv(back), csv);
}

TEST(ResultsCsv, MalformedInputNamesLineAndColumn) {
  const std::string h = kResultsCsvHeader;
  const std::string good = "dense,1,1,12.5,0,0,0,1,0";
  auto err = [](const std::string& text) {
    try {
      parse_results_csv(text);
    } catch (const FormatError& e) {
      return std::string(e.what());
    }
    return std::string("(no FormatError)");
  };
  EXPECT_TRUE(contains(err(""), "line 1"));
  EXPECT_TRUE(contains(err("method,attn_flops_rel\n" + good + "\n"), "line 1"));
  EXPECT_TRUE(contains(err(h + "\n" + good + "\ndense,1,1\n"), "line 3: 3 fields, expected 9"));
  std::string e = err(h + "\nrandom,0.5,1,abc,0,0,0,1,0\n");
  EXPECT_TRUE(contains(e, "line 2, column 4 (perplexity): 'abc'")) << e;
  e = err(h + "\nrandom,0.5x,1,2,0,0,0,1,0\n");
  EXPECT_TRUE(contains(e, "column 2 (attn_flops_rel)")) << e;
  e = err(h + "\nrandom,0.5,1,2,0,0,0,1,-4\n");
  EXPECT_TRUE(contains(e, "column 9 (guardrail_violations)")) << e;
  e = err(h + "\nrandom,0.5,1,2,0,,0,1,4\n");
  EXPECT_TRUE(contains(e, "column 6 (ppl_change_ci_low): ''")) << e;
  e = err(h + "\n,0.5,1,2,0,0,0,1,4\n");
  EXPECT_TRUE(contains(e, "line 2, column 1 (method)")) << e;
  e = err(h + "\n" + good + "\n\n" + good + "\n");
  EXPECT_TRUE(contains(e, "line 3: 1 fields")) << e;
  // Without a final newline and with CRLF line ends it still parses.
  EXPECT_EQ(parse_results_csv(h + "\r\n" + good).size(), 1u);
}

TEST(Verdict, StaticFrontDropsDominatedPoints) {
  const auto front = static_front(static_sweep());
  ASSERT_EQ(front.size(), 3u);
  EXPECT_EQ(front[0].method, "static-r4");
  EXPECT_EQ(front[1].method, "static-r8");
  EXPECT_EQ(front[2].method, "static-r16");
}

TEST(Verdict, PolicyBelowTheFrontBeatsIt) {
  auto rows = static_sweep();
  rows.push_back(row("policy", 0.625, 11.0, 0.5, 0.8));
  std::string v = verdict(rows);
  // Front at 0.625 between r8 (0.5, 12) and r16 (0.75, 11): 11.5; policy 11.0 is 4.35% lower.
  EXPECT_TRUE(contains(v, "policy beats the best static baseline at matched cost")) << v;
  EXPECT_TRUE(contains(v, "11.0000 against 11.5000")) << v;
  EXPECT_TRUE(contains(v, "static-r8") && contains(v, "static-r16")) << v;
  EXPECT_TRUE(contains(v, "4.35% lower")) << v;
  EXPECT_TRUE(contains(v, "on or beyond the static front: yes")) << v;
  EXPECT_TRUE(contains(v, "All targets hold")) << v;
  EXPECT_TRUE(contains(v, "No evaluated method dominates the policy")) << v;

  // A cheaper non-static baseline with lower perplexity is named although the policy beats
  // the static front.
  rows.push_back(row("oracle", 0.6, 10.99, 0.4, 0.8));
  rows.push_back(row("energy-0.9", 0.7, 10.5, 0.4, 0.8));
  v = verdict(rows);
  EXPECT_TRUE(contains(v, "policy beats the best static baseline at matched cost")) << v;
  EXPECT_TRUE(contains(v, "one strictly lower): oracle.")) << v;
}

TEST(Verdict, PolicyAboveTheFrontLoses) {
  auto rows = static_sweep();
  rows.push_back(row("policy", 0.625, 12.0, 10.1, 0.8));
  const std::string v = verdict(rows);
  EXPECT_TRUE(contains(v, "policy loses to the best static baseline")) << v;
  EXPECT_TRUE(contains(v, "12.0000 against 11.5000")) << v;
  EXPECT_TRUE(contains(v, "4.35% higher")) << v;
  EXPECT_TRUE(contains(v, "<= 1% perplexity increase: not met")) << v;
  EXPECT_TRUE(contains(v, "on or beyond the static front: no")) << v;
  EXPECT_TRUE(contains(v, "Not all targets hold")) << v;
}

TEST(Verdict, PolicyOnTheFrontMatches) {
  auto rows = static_sweep();
  rows.push_back(row("policy", 0.5, 12.005, 10.0));
  const std::string v = verdict(rows);
  EXPECT_TRUE(contains(v, "policy matches the best static baseline")) << v;
  EXPECT_TRUE(contains(v, "against 12.0000")) << v;
}

TEST(Verdict, OutsideTheFrontsCostRange) {
  auto rows = static_sweep();
  rows.push_back(row("policy", 0.1, 15.0, 37.0));
  std::string v = verdict(rows);
  EXPECT_TRUE(contains(v, "below the static front's cost range [0.250x, 0.750x]")) << v;
  EXPECT_TRUE(contains(v, "no matched-cost comparison")) << v;
  EXPECT_TRUE(contains(v, "on or beyond the static front: undetermined")) << v;

  rows.back() = row("policy", 0.1, 13.0, 19.0);
  v = verdict(rows);
  EXPECT_TRUE(contains(v, "policy beats the static baselines")) << v;
  EXPECT_TRUE(contains(v, "below the static front's cost range")) << v;

  rows.back() = row("policy", 0.9, 11.5, 5.0);
  v = verdict(rows);
  EXPECT_TRUE(contains(v, "policy loses to the static baselines")) << v;
  EXPECT_TRUE(contains(v, "above the static front's cost range")) << v;

  rows.back() = row("policy", 0.9, 10.95, 0.4);
  v = verdict(rows);
  EXPECT_TRUE(contains(v, "above the static front's cost range [0.250x, 0.750x]: no matched-cost"))
      << v;
  EXPECT_TRUE(contains(v, ">= 30% fewer score FLOPs: not met (10.0% fewer)")) << v;
}

TEST(Verdict, TargetsAndMissingRows) {
  auto rows = static_sweep();
  rows.push_back(row("policy", 0.625, 11.0, 0.5, NAN));
  std::string v = verdict(rows);
  EXPECT_TRUE(contains(v, "measured attention-time reduction: not measured")) << v;
  EXPECT_TRUE(contains(v, "Not all targets hold")) << v;
  EXPECT_TRUE(contains(v, "fewer score FLOPs: policy.")) << v;  // methods meeting both targets

  rows.back() = row("policy", 0.625, 11.0, 0.5, 1.02);
  v = verdict(rows);
  EXPECT_TRUE(contains(v, "measured attention-time reduction: not met (time 1.020x dense)")) << v;

  v = verdict(static_sweep());
  EXPECT_TRUE(contains(v, "No \"policy\" row")) << v;
  v = verdict({row("dense", 1, 10), row("policy", 0.5, 10.05, 0.5, 0.7)});
  EXPECT_TRUE(contains(v, "No static-r baseline was evaluated")) << v;
  EXPECT_TRUE(contains(v, "undetermined")) << v;
}

TEST(FormatTable, OneLinePerRowWithEveryMethod) {
  const auto rows = static_sweep();
  const std::string t = format_table(rows);
  const auto lines = split(t, '\n');
  ASSERT_EQ(lines.size(), rows.size() + 1);
  for (size_t i = 0; i < rows.size(); ++i)
    EXPECT_EQ(lines[i + 1].substr(0, rows[i].method.size()), rows[i].method);
  EXPECT_TRUE(contains(lines[4], "12.5000")) << lines[4];
}

namespace {

// A full experiment's worth of random results.
std::vector<MethodResult> random_experiment(std::mt19937_64& rng, int n, int layers, int segments) {
  std::normal_distribution<double> z(0.0, 1.0);
  std::vector<double> base(n);
  for (auto& v : base) v = 3.0 + 0.3 * z(rng);
  const double dense_flops = 4e9, dense_time = 2.5e5;
  std::vector<MethodResult> out = {method("dense", base, dense_flops, dense_time)};
  struct Spec {
    const char* name;
    double cost, penalty;
  };
  for (const Spec& s :
       {Spec{"static-r4", 0.25, 0.2}, Spec{"static-r8", 0.5, 0.05}, Spec{"static-r16", 0.75, 0.01},
        Spec{"energy-0.95", 0.55, 0.02}, Spec{"random", 0.5, 0.1}, Spec{"oracle", 0.5, 0.01},
        Spec{"policy", 0.52, 0.015}}) {
    std::vector<double> nll(n);
    for (int i = 0; i < n; ++i) nll[i] = base[i] + s.penalty + 0.01 * z(rng);
    MethodResult m =
        method(s.name, nll, dense_flops * s.cost, dense_time * (s.cost + 0.1), dense_flops * 0.01);
    m.fidelity = 1 - s.penalty;
    m.decisions = 1000;
    m.guardrail_violations = rng() % 5;
    out.push_back(m);
  }
  auto& pol = out.back();
  pol.mean_rank.assign(layers, std::vector<double>(segments));
  for (auto& l : pol.mean_rank)
    for (auto& v : l) v = 4 + 12 * std::uniform_real_distribution<>(0, 1)(rng);
  return out;
}

ExperimentSummary summary_for(int n) {
  ExperimentSummary s;
  s.config_text = "model: runs/default\nseed: 7\n";
  s.model_dir = "runs/default";
  s.model_fingerprint = "abc123";
  s.machine = "{\"cpu\": \"test machine ```\"}";
  s.seed = 7;
  s.eval_sequences = n;
  s.sequence_length = 128;
  s.segment = 32;
  s.ranks = {4, 8, 16};
  s.guardrail_epsilon = 0.05;
  s.cost_source = "flops";
  s.date = "2026-11-29";
  return s;
}

// The rows of report.md's results table: method -> cells.
std::vector<std::vector<std::string>> report_table(const std::string& md) {
  std::vector<std::vector<std::string>> out;
  bool in = false;
  for (const auto& line : split(md, '\n')) {
    if (line.rfind("## Results", 0) == 0) {
      in = true;
      continue;
    }
    if (in && line.rfind("## ", 0) == 0) break;
    if (!in || line.rfind("| ", 0) != 0 || line.rfind("| method", 0) == 0) continue;
    auto cells = split(line, '|');
    std::vector<std::string> row;
    for (size_t i = 1; i < cells.size(); ++i) row.push_back(trim(cells[i]));
    out.push_back(row);
  }
  return out;
}

bool is_png(const fs::path& p) {
  if (!fs::exists(p)) return false;
  const std::string bytes = read_file(p);
  return bytes.size() > 100 && bytes.compare(0, 4, "\x89PNG") == 0;
}

}  // namespace

TEST(WriteReport, WritesEveryFileAndTheTableMatchesTheCsv) {
  std::mt19937_64 rng(std::random_device{}());
  const int n = 6;
  const auto results = random_experiment(rng, n, 4, 5);
  const fs::path d = temp_dir("full");
  const fs::path metrics = d / "metrics.jsonl";
  write_file_atomic(metrics,
                    "{\"step\": 0, \"episode_return_mean\": null}\n"
                    "{\"step\": 512, \"episode_return_mean\": -1.5}\n"
                    "{\"step\": 1024, \"episode_return_mean\": -0.75, \"fps\": 900}\n");
  const fs::path out = d / "run";
  write_report(out, results, summary_for(n), metrics);

  ASSERT_TRUE(fs::exists(out / "results.csv"));
  ASSERT_TRUE(fs::exists(out / "report.md"));
  const auto csv_rows = parse_results_csv(read_file(out / "results.csv"));
  const auto rows = result_rows(results);
  ASSERT_EQ(csv_rows.size(), rows.size());
  for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(csv_rows[i].perplexity, rows[i].perplexity);

  const std::string md = read_file(out / "report.md");
  const auto table = report_table(md);
  ASSERT_EQ(table.size(), csv_rows.size()) << md;
  for (size_t i = 0; i < table.size(); ++i) {
    const auto& c = csv_rows[i];
    const auto& t = table[i];
    SCOPED_TRACE(c.method);
    ASSERT_EQ(t.size(), 10u);
    EXPECT_EQ(t[0], c.method);
    const double want[] = {c.attn_flops_rel, c.attn_time_rel,     c.perplexity,
                           c.ppl_change_pct, c.ppl_change_ci_low, c.ppl_change_ci_high,
                           c.fidelity};
    for (int k = 0; k < 7; ++k) {
      const double got = std::stod(t[k + 1]);
      // The table prints 6 significant digits.
      EXPECT_NEAR(got, want[k], 5e-6 * std::fabs(want[k]) + 1e-300) << "column " << k + 1;
    }
    EXPECT_EQ(std::stoll(t[8]), c.guardrail_violations);
    EXPECT_NEAR(std::stod(t[9]), rows[i].p_value, 5e-3 * rows[i].p_value + 1e-300);
  }

  EXPECT_TRUE(contains(md, verdict(rows))) << md;
  EXPECT_TRUE(contains(md, "fingerprint `abc123`"));
  EXPECT_TRUE(contains(md, "- seed: 7"));
  EXPECT_TRUE(contains(md, "rank grid: 4, 8, 16"));
  EXPECT_TRUE(contains(md, "````\n{\"cpu\": \"test machine ```\"}\n````")) << md;
  EXPECT_TRUE(contains(md, "model: runs/default\nseed: 7"));
  EXPECT_TRUE(contains(md, "| policy | 0.01 | 0.53 | 1000 |")) << md;

  if (gnuplot_available()) {
    EXPECT_TRUE(is_png(out / "pareto.png"));
    EXPECT_TRUE(is_png(out / "rank_heatmap.png"));
    EXPECT_TRUE(is_png(out / "training_curve.png"));
    EXPECT_TRUE(contains(md, "![perplexity against cost")) << md;
    EXPECT_FALSE(contains(md, "was not drawn")) << md;
    EXPECT_EQ(read_file(out / "gnuplot" / "training_curve.dat"), "512 -1.5\n1024 -0.75\n");
  } else {
    EXPECT_TRUE(contains(md,
                         "pareto.png (perplexity against cost, static front as a line) was "
                         "not drawn"))
        << md;
  }
  for (const auto& e : fs::directory_iterator(out))
    EXPECT_EQ(e.path().filename().string().find(".partial"), std::string::npos);
  fs::remove_all(d);
}

TEST(WriteReport, MissingMetricsAndPolicyAreNotedNotFatal) {
  std::mt19937_64 rng(std::random_device{}());
  auto results = random_experiment(rng, 3, 2, 2);
  results.pop_back();  // no policy
  for (auto& r : results) r.attn_time_us = 0;
  const fs::path d = temp_dir("partial");
  write_report(d, results, summary_for(3), d / "absent.jsonl");
  const std::string md = read_file(d / "report.md");
  EXPECT_TRUE(contains(md,
                       "rank_heatmap.png (policy's mean rank over layers x segments) was not "
                       "drawn: no policy was evaluated"))
      << md;
  EXPECT_TRUE(contains(md, "training_curve.png (episode_return_mean against step) was not drawn: " +
                               (d / "absent.jsonl").string() + " does not exist"))
      << md;
  EXPECT_TRUE(contains(md, "No \"policy\" row")) << md;
  EXPECT_TRUE(contains(md, "nan where dense time was not measured")) << md;
  EXPECT_FALSE(fs::exists(d / "rank_heatmap.png"));
  EXPECT_FALSE(fs::exists(d / "training_curve.png"));
  if (gnuplot_available()) {
    EXPECT_TRUE(is_png(d / "pareto.png"));
  }
  fs::remove_all(d);
}

TEST(WriteReport, RejectsBadMetricsAndInconsistentSummary) {
  std::mt19937_64 rng(std::random_device{}());
  const auto results = random_experiment(rng, 3, 2, 2);
  const fs::path d = temp_dir("bad");
  const fs::path metrics = d / "metrics.jsonl";
  write_file_atomic(metrics, "{\"step\": 1, \"episode_return_mean\": 2}\n{\"step\": 2, \"epi\n");
  std::string e = error_of([&] { write_report(d / "out", results, summary_for(3), metrics); });
  EXPECT_TRUE(contains(e, "metrics.jsonl line 2: not JSON")) << e;
  write_file_atomic(metrics, "{\"episode_return_mean\": 2}\n");
  e = error_of([&] { write_report(d / "out", results, summary_for(3), metrics); });
  EXPECT_TRUE(contains(e, "line 1: no numeric \"step\"")) << e;
  EXPECT_FALSE(fs::exists(d / "out" / "results.csv")) << "inputs are checked before writing";

  e = error_of([&] { write_report(d / "out", results, summary_for(4), ""); });
  EXPECT_TRUE(contains(e, "eval_sequences = 4") && contains(e, "3 sequences")) << e;
  fs::remove_all(d);
}

TEST(WriteReport, WithoutGnuplotTheReportSaysSo) {
  std::mt19937_64 rng(std::random_device{}());
  const auto results = random_experiment(rng, 3, 2, 2);
  const fs::path d = temp_dir("nognuplot");
  const fs::path metrics = d / "metrics.jsonl";
  write_file_atomic(metrics, "{\"step\": 1, \"episode_return_mean\": 2}\n");
  // An empty PATH hides gnuplot from common/plot.h.
  const char* old = std::getenv("PATH");
  const std::string saved = old ? old : "";
  ASSERT_EQ(::setenv("PATH", (d / "empty").c_str(), 1), 0);
  ASSERT_FALSE(gnuplot_available());
  write_report(d / "out", results, summary_for(3), metrics);
  ::setenv("PATH", saved.c_str(), 1);
  const std::string md = read_file(d / "out" / "report.md");
  for (const char* name : {"pareto", "rank_heatmap", "training_curve"}) {
    EXPECT_TRUE(contains(md, std::string(name) + ".png (")) << md;
    EXPECT_FALSE(fs::exists(d / "out" / (std::string(name) + ".png"))) << name;
    EXPECT_TRUE(fs::exists(d / "out" / "gnuplot" / (std::string(name) + ".gp"))) << name;
  }
  EXPECT_TRUE(contains(md, "was not drawn: gnuplot is not installed")) << md;
  EXPECT_TRUE(contains(md, "gnuplot is not installed on this machine")) << md;
  EXPECT_TRUE(fs::exists(d / "out" / "results.csv"));
  fs::remove_all(d);
}
