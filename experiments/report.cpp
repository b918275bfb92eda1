#include "experiments/report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string_view>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/log.h"
#include "common/plot.h"
#include "common/stats.h"

namespace attnpilot::experiments {
namespace {

namespace fs = std::filesystem;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr int kCsvColumns = 9;
constexpr const char* kCsvColumnNames[kCsvColumns] = {"method",
                                                      "attn_flops_rel",
                                                      "attn_time_rel",
                                                      "perplexity",
                                                      "ppl_change_pct",
                                                      "ppl_change_ci_low",
                                                      "ppl_change_ci_high",
                                                      "fidelity",
                                                      "guardrail_violations"};

// The targets.
constexpr double kMaxPplIncreasePct = 1.0;
constexpr double kMaxFlopsRel = 0.70;

bool is_static(const std::string& method) { return method.rfind("static-r", 0) == 0; }

// Method names go unquoted into CSV and gnuplot label data.
void check_method_name(const std::string& m) {
  ATTNPILOT_CHECK_ARG(!m.empty(), "method name is empty");
  for (char c : m) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '-' || c == '_' || c == '.' || c == '+';
    ATTNPILOT_CHECK_ARG(
        ok, "method name '{}' has character '{}'; expected letters, digits and - _ . +", m, c);
  }
}

void check_cost(const MethodResult& r, const char* name, double v) {
  ATTNPILOT_CHECK_ARG(std::isfinite(v) && v >= 0, "method '{}': {} = {} must be finite and >= 0",
                      r.method, name, v);
}

// Shortest text that parses back to the same double.
std::string num(double v) { return fmt::format("{}", v); }

std::string signed_pct(double v) { return fmt::format("{:+.2f}%", v); }

// A Markdown code fence longer than any run of backticks in `text`.
std::string fence_for(const std::string& text) {
  size_t longest = 0, run = 0;
  for (char c : text) {
    run = c == '`' ? run + 1 : 0;
    longest = std::max(longest, run);
  }
  return std::string(std::max<size_t>(3, longest + 1), '`');
}

// gnuplot single-quoted string: a quote is written twice.
std::string gp_quote(const fs::path& p) {
  std::string out = "'";
  for (char c : p.string()) {
    out += c;
    if (c == '\'') out += '\'';
  }
  return out + "'";
}

// Lower-left Pareto front of rows under (cost(row), perplexity), increasing cost.
template <typename Cost>
std::vector<ResultRow> front_by(const std::vector<ResultRow>& rows, Cost cost) {
  std::vector<ResultRow> pts;
  for (const auto& r : rows)
    if (is_static(r.method) && std::isfinite(cost(r)) && std::isfinite(r.perplexity))
      pts.push_back(r);
  std::stable_sort(pts.begin(), pts.end(), [&](const ResultRow& a, const ResultRow& b) {
    return cost(a) != cost(b) ? cost(a) < cost(b) : a.perplexity < b.perplexity;
  });
  std::vector<ResultRow> front;
  for (const auto& r : pts)
    if (front.empty() || r.perplexity < front.back().perplexity) front.push_back(r);
  return front;
}

double flops_cost(const ResultRow& r) { return r.attn_flops_rel; }
double time_cost(const ResultRow& r) { return r.attn_time_rel; }

std::string point(const ResultRow& r) {
  return fmt::format("{} ({:.3f}x, ppl {:.4f})", r.method, r.attn_flops_rel, r.perplexity);
}

// Sentence comparing the policy with the static front at its cost.
// Sets *on_front to +1 (on or beyond), -1 (behind) or 0 (undetermined).
std::string compare_with_front(const ResultRow& p, const std::vector<ResultRow>& front,
                               int* on_front) {
  *on_front = 0;
  if (front.empty())
    return "No static-r baseline was evaluated, so there is no matched-cost comparison.";
  const double c = p.attn_flops_rel;
  const ResultRow& lo = front.front();
  const ResultRow& hi = front.back();
  const std::string range = fmt::format("[{:.3f}x, {:.3f}x]", lo.attn_flops_rel, hi.attn_flops_rel);
  if (c < lo.attn_flops_rel) {
    if (p.perplexity <= lo.perplexity) {
      *on_front = 1;
      return fmt::format(
          "The learned policy beats the static baselines: at {:.3f}x dense score FLOPs it is "
          "cheaper than the cheapest front point {} with no higher perplexity ({:.4f}); its cost "
          "lies below the static front's cost range {}, so there is no interpolated comparison.",
          c, point(lo), p.perplexity, range);
    }
    return fmt::format(
        "The policy's cost {:.3f}x lies below the static front's cost range {}: no matched-cost "
        "comparison is possible; it is cheaper than {} but its perplexity is higher ({:.4f}).",
        c, range, point(lo), p.perplexity);
  }
  if (c > hi.attn_flops_rel) {
    if (p.perplexity >= hi.perplexity) {
      *on_front = -1;
      return fmt::format(
          "The learned policy loses to the static baselines: at {:.3f}x dense score FLOPs its "
          "perplexity {:.4f} is no better than {}, which costs less; its cost lies above the "
          "static front's cost range {}.",
          c, p.perplexity, point(hi), range);
    }
    return fmt::format(
        "The policy's cost {:.3f}x lies above the static front's cost range {}: no matched-cost "
        "comparison is possible; it costs more than {} and its perplexity is lower ({:.4f}).",
        c, range, point(hi), p.perplexity);
  }
  double f = lo.perplexity;
  std::string where = fmt::format("at {}", point(lo));
  for (size_t i = 0; i + 1 < front.size(); ++i) {
    const ResultRow& a = front[i];
    const ResultRow& b = front[i + 1];
    if (c >= a.attn_flops_rel && c <= b.attn_flops_rel) {
      const double t = (c - a.attn_flops_rel) / (b.attn_flops_rel - a.attn_flops_rel);
      f = a.perplexity + t * (b.perplexity - a.perplexity);
      where = fmt::format("interpolated between {} and {}", point(a), point(b));
      break;
    }
  }
  const double gap = 100.0 * (p.perplexity / f - 1.0);
  std::string outcome;
  if (gap < -kMatchTolerancePct) {
    outcome = "beats";
    *on_front = 1;
  } else if (gap > kMatchTolerancePct) {
    outcome = "loses to";
    *on_front = -1;
  } else {
    outcome = "matches";
    *on_front = 1;
  }
  return fmt::format(
      "The learned policy {} the best static baseline at matched cost: at {:.3f}x dense score "
      "FLOPs its perplexity is {:.4f} against {:.4f} on the static front ({}), {:.2f}% {} "
      "(within {}% counts as a match).",
      outcome, c, p.perplexity, f, where, std::fabs(gap), gap <= 0 ? "lower" : "higher",
      kMatchTolerancePct);
}

double parse_number(std::string_view s, int line, int col) {
  double v = 0;
  const char* b = s.data();
  const char* e = s.data() + s.size();
  auto [ptr, ec] = std::from_chars(b, e, v);
  if (s.empty() || ec != std::errc() || ptr != e)
    throw FormatError(fmt::format("results CSV line {}, column {} ({}): '{}' is not a number", line,
                                  col, kCsvColumnNames[col - 1], s));
  return v;
}

int64_t parse_count(std::string_view s, int line, int col) {
  int64_t v = 0;
  auto [ptr, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || ec != std::errc() || ptr != s.data() + s.size() || v < 0)
    throw FormatError(
        fmt::format("results CSV line {}, column {} ({}): '{}' is not a non-negative integer", line,
                    col, kCsvColumnNames[col - 1], s));
  return v;
}

// Training-curve points (step, episode_return_mean) from metrics.jsonl; lines whose
// episode_return_mean is null or absent are skipped.
std::vector<std::pair<double, double>> read_training_curve(const fs::path& path) {
  std::vector<std::pair<double, double>> pts;
  std::istringstream in(read_file(path));
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.empty()) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw FormatError(fmt::format("{} line {}: not JSON ({})", path.string(), n, e.what()));
    }
    if (!j.is_object())
      throw FormatError(fmt::format("{} line {}: expected a JSON object", path.string(), n));
    if (!j.contains("step") || !j["step"].is_number())
      throw FormatError(fmt::format("{} line {}: no numeric \"step\"", path.string(), n));
    if (!j.contains("episode_return_mean") || j["episode_return_mean"].is_null()) continue;
    if (!j["episode_return_mean"].is_number())
      throw FormatError(fmt::format("{} line {}: \"episode_return_mean\" is {}, expected a number",
                                    path.string(), n, j["episode_return_mean"].dump()));
    pts.emplace_back(j["step"].get<double>(), j["episode_return_mean"].get<double>());
  }
  return pts;
}

// Runs gnuplot writing to a temporary PNG that is renamed over `png` when complete.
// Returns "" on success, otherwise the reason the figure is missing.
std::string draw(const fs::path& dir, const std::string& name, const std::string& size,
                 const std::string& body) {
  const fs::path gp_dir = dir / "gnuplot";
  const fs::path png = dir / (name + ".png");
  const fs::path tmp = gp_dir / (name + ".png.partial");
  const std::string script =
      fmt::format("set terminal pngcairo noenhanced size {}\nset output {}\n{}", size,
                  gp_quote(tmp), body) +
      "set output\n";
  try {
    run_gnuplot(gp_dir / (name + ".gp"), script);
    if (!fs::exists(tmp)) throw Error(fmt::format("gnuplot wrote no {}", tmp.string()));
    fs::rename(tmp, png);
    fsync_directory(dir);
    return "";
  } catch (const Error& e) {
    log::warn(fmt::format("{}.png not drawn: {}", name, e.what()));
    return e.what();
  } catch (const fs::filesystem_error& e) {
    log::warn(fmt::format("{}.png not drawn: {}", name, e.what()));
    return e.what();
  }
}

std::string pareto_body(const fs::path& gp, const std::vector<ResultRow>& rows, bool with_time) {
  std::string pts, ffl, ftm;
  for (const auto& r : rows)
    pts += fmt::format("{} {} {} {}\n", num(r.attn_flops_rel), num(r.attn_time_rel),
                       num(r.perplexity), r.method);
  for (const auto& r : front_by(rows, flops_cost))
    ffl += fmt::format("{} {}\n", num(r.attn_flops_rel), num(r.perplexity));
  std::string pol;
  for (const auto& r : rows)
    if (r.method == "policy")
      pol =
          fmt::format("{} {} {}\n", num(r.attn_flops_rel), num(r.attn_time_rel), num(r.perplexity));
  write_file_atomic(gp / "pareto_points.dat", pts);
  write_file_atomic(gp / "pareto_policy.dat", pol);
  write_file_atomic(gp / "pareto_front_flops.dat", ffl);
  auto panel = [&](const char* xlabel, int xcol, const fs::path& front_file, bool has_front) {
    std::string s = fmt::format(
        "set xlabel '{}'\nset ylabel 'perplexity (held-out)'\nset grid\nset key below "
        "horizontal\nset bmargin 6\n"
        "set offsets graph 0.03, graph 0.12, graph 0.06, graph 0.04\nplot ",
        xlabel);
    if (has_front)
      s += fmt::format("{} using 1:2 with linespoints lw 2 pt 6 title 'static front', ",
                       gp_quote(front_file));
    s += fmt::format(
        "{0} using {1}:3 with points pt 7 ps 1.3 title 'methods', "
        "{0} using {1}:3:4 with labels left offset 0.8,0.6 font ',9' notitle",
        gp_quote(gp / "pareto_points.dat"), xcol);
    if (!pol.empty())
      s += fmt::format(", {} using {}:3 with points pt 5 ps 2 lc rgb 'red' title 'policy'",
                       gp_quote(gp / "pareto_policy.dat"), xcol);
    s += "\n";
    return s;
  };
  std::string body;
  body += with_time ? "set multiplot layout 1,2 title 'perplexity against attention cost'\n"
                    : "set title 'perplexity against attention-score FLOPs'\n";
  body += panel("attention-score FLOPs relative to dense", 1, gp / "pareto_front_flops.dat",
                !ffl.empty());
  if (with_time) {
    for (const auto& r : front_by(rows, time_cost))
      ftm += fmt::format("{} {}\n", num(r.attn_time_rel), num(r.perplexity));
    write_file_atomic(gp / "pareto_front_time.dat", ftm);
    body += panel("measured attention time relative to dense", 2, gp / "pareto_front_time.dat",
                  !ftm.empty());
    body += "unset multiplot\n";
  }
  return body;
}

}  // namespace

std::vector<ResultRow> result_rows(const std::vector<MethodResult>& results) {
  ATTNPILOT_CHECK_ARG(!results.empty(), "result_rows: no methods; expected at least \"dense\"");
  const MethodResult* dense = nullptr;
  std::set<std::string> seen;
  std::vector<std::string> names;
  for (const auto& r : results) {
    check_method_name(r.method);
    ATTNPILOT_CHECK_ARG(seen.insert(r.method).second, "result_rows: method '{}' appears twice",
                        r.method);
    names.push_back(r.method);
    if (r.method == "dense") dense = &r;
  }
  ATTNPILOT_CHECK_ARG(dense != nullptr,
                      "result_rows: no \"dense\" row among methods [{}]; every row is relative "
                      "to dense",
                      fmt::join(names, ", "));
  ATTNPILOT_CHECK_ARG(dense->seq_nll.size() >= 2,
                      "method 'dense': {} held-out sequences; at least 2 are needed for a "
                      "confidence interval",
                      dense->seq_nll.size());
  ATTNPILOT_CHECK_ARG(std::isfinite(dense->attn_flops) && dense->attn_flops > 0,
                      "method 'dense': attn_flops = {} must be positive", dense->attn_flops);
  for (const auto& r : results) {
    ATTNPILOT_CHECK_ARG(r.seq_nll.size() == dense->seq_nll.size(),
                        "method '{}': {} held-out sequences, but dense has {}; the comparison "
                        "is paired over the same sequences",
                        r.method, r.seq_nll.size(), dense->seq_nll.size());
    for (size_t i = 0; i < r.seq_nll.size(); ++i)
      ATTNPILOT_CHECK_ARG(std::isfinite(r.seq_nll[i]),
                          "method '{}': seq_nll[{}] = {} is not finite", r.method, i, r.seq_nll[i]);
    check_cost(r, "attn_flops", r.attn_flops);
    check_cost(r, "attn_time_us", r.attn_time_us);
    check_cost(r, "control_flops", r.control_flops);
    ATTNPILOT_CHECK_ARG(std::isfinite(r.fidelity), "method '{}': fidelity = {} is not finite",
                        r.method, r.fidelity);
    ATTNPILOT_CHECK_ARG(r.guardrail_violations >= 0 && r.decisions >= 0,
                        "method '{}': guardrail_violations = {} and decisions = {} must be >= 0",
                        r.method, r.guardrail_violations, r.decisions);
    for (size_t l = 1; l < r.mean_rank.size(); ++l)
      ATTNPILOT_CHECK_ARG(r.mean_rank[l].size() == r.mean_rank[0].size(),
                          "method '{}': mean_rank layer {} has {} segments, layer 0 has {}",
                          r.method, l, r.mean_rank[l].size(), r.mean_rank[0].size());
  }

  std::vector<ResultRow> rows;
  for (const auto& r : results) {
    ResultRow row;
    row.method = r.method;
    row.attn_flops_rel = r.attn_flops / dense->attn_flops;
    row.attn_time_rel = dense->attn_time_us > 0 ? r.attn_time_us / dense->attn_time_us : kNaN;
    row.perplexity = std::exp(mean_ci(r.seq_nll).mean);
    const PairedTest t = paired_t_test(r.seq_nll, dense->seq_nll, 0.95);
    row.ppl_change_pct = 100.0 * std::expm1(t.diff.mean);
    row.ppl_change_ci_low = 100.0 * std::expm1(t.diff.low);
    row.ppl_change_ci_high = 100.0 * std::expm1(t.diff.high);
    row.p_value = t.p;
    row.fidelity = r.fidelity;
    row.guardrail_violations = r.guardrail_violations;
    row.control_flops_rel = r.control_flops / dense->attn_flops;
    rows.push_back(row);
  }
  return rows;
}

std::string results_csv(const std::vector<ResultRow>& rows) {
  std::string out = std::string(kResultsCsvHeader) + "\n";
  for (const auto& r : rows) {
    check_method_name(r.method);
    out += fmt::format("{},{},{},{},{},{},{},{},{}\n", r.method, num(r.attn_flops_rel),
                       num(r.attn_time_rel), num(r.perplexity), num(r.ppl_change_pct),
                       num(r.ppl_change_ci_low), num(r.ppl_change_ci_high), num(r.fidelity),
                       r.guardrail_violations);
  }
  return out;
}

std::vector<ResultRow> parse_results_csv(const std::string& text) {
  std::vector<std::string> lines;
  {
    std::string cur;
    for (char c : text) {
      if (c == '\n') {
        if (!cur.empty() && cur.back() == '\r') cur.pop_back();
        lines.push_back(cur);
        cur.clear();
      } else {
        cur += c;
      }
    }
    if (!cur.empty()) lines.push_back(cur);
  }
  if (lines.empty() || lines[0] != kResultsCsvHeader)
    throw FormatError(fmt::format("results CSV line 1: header '{}', expected '{}'",
                                  lines.empty() ? "" : lines[0], kResultsCsvHeader));
  std::vector<ResultRow> rows;
  for (size_t i = 1; i < lines.size(); ++i) {
    const int ln = static_cast<int>(i + 1);
    std::vector<std::string_view> f;
    std::string_view s(lines[i]);
    size_t start = 0;
    while (true) {
      const size_t comma = s.find(',', start);
      f.push_back(s.substr(start, comma == std::string_view::npos ? s.npos : comma - start));
      if (comma == std::string_view::npos) break;
      start = comma + 1;
    }
    if (static_cast<int>(f.size()) != kCsvColumns)
      throw FormatError(
          fmt::format("results CSV line {}: {} fields, expected {}", ln, f.size(), kCsvColumns));
    ResultRow r;
    r.method = std::string(f[0]);
    try {
      check_method_name(r.method);
    } catch (const InvalidArgument& e) {
      throw FormatError(fmt::format("results CSV line {}, column 1 (method): {}", ln, e.what()));
    }
    r.attn_flops_rel = parse_number(f[1], ln, 2);
    r.attn_time_rel = parse_number(f[2], ln, 3);
    r.perplexity = parse_number(f[3], ln, 4);
    r.ppl_change_pct = parse_number(f[4], ln, 5);
    r.ppl_change_ci_low = parse_number(f[5], ln, 6);
    r.ppl_change_ci_high = parse_number(f[6], ln, 7);
    r.fidelity = parse_number(f[7], ln, 8);
    r.guardrail_violations = parse_count(f[8], ln, 9);
    r.p_value = kNaN;
    r.control_flops_rel = kNaN;
    rows.push_back(r);
  }
  return rows;
}

std::vector<ResultRow> static_front(const std::vector<ResultRow>& rows) {
  return front_by(rows, flops_cost);
}

std::string verdict(const std::vector<ResultRow>& rows) {
  const ResultRow* p = nullptr;
  for (const auto& r : rows)
    if (r.method == "policy") p = &r;
  std::vector<std::string> meeting;
  for (const auto& r : rows)
    if (r.ppl_change_pct <= kMaxPplIncreasePct && r.attn_flops_rel <= kMaxFlopsRel)
      meeting.push_back(r.method);
  const std::string others =
      meeting.empty()
          ? "No evaluated method reaches <= 1% perplexity increase with >= 30% fewer score FLOPs."
          : fmt::format("Methods with <= 1% perplexity increase and >= 30% fewer score FLOPs: {}.",
                        fmt::join(meeting, ", "));
  if (p == nullptr)
    return "No \"policy\" row: the learned policy was not evaluated, so there is no verdict on "
           "it. " +
           others;

  int on_front = 0;
  std::string out = compare_with_front(*p, static_front(rows), &on_front) + " ";
  std::vector<std::string> dominating;
  for (const auto& r : rows)
    if (&r != p && r.attn_flops_rel <= p->attn_flops_rel && r.perplexity <= p->perplexity &&
        (r.attn_flops_rel < p->attn_flops_rel || r.perplexity < p->perplexity))
      dominating.push_back(r.method);
  out += dominating.empty()
             ? "No evaluated method dominates the policy (no more score FLOPs and no higher "
               "perplexity). "
             : fmt::format(
                   "Methods that dominate the policy (no more score FLOPs and no higher "
                   "perplexity, one strictly lower): {}. ",
                   fmt::join(dominating, ", "));
  const bool ppl_ok = p->ppl_change_pct <= kMaxPplIncreasePct;
  const bool flops_ok = p->attn_flops_rel <= kMaxFlopsRel;
  const bool time_measured = std::isfinite(p->attn_time_rel);
  const bool time_ok = time_measured && p->attn_time_rel < 1.0;
  const double fewer = 100.0 * (1.0 - p->attn_flops_rel);
  out += fmt::format(
      "Targets for the policy: <= 1% perplexity increase: {} ({}, 95% CI [{}, {}]); "
      ">= 30% fewer score FLOPs: {} ({:.1f}% {}); measured attention-time reduction: {}; "
      "on or beyond the static front: {}. ",
      ppl_ok ? "met" : "not met", signed_pct(p->ppl_change_pct), signed_pct(p->ppl_change_ci_low),
      signed_pct(p->ppl_change_ci_high), flops_ok ? "met" : "not met", std::fabs(fewer),
      fewer >= 0 ? "fewer" : "more",
      !time_measured
          ? "not measured"
          : fmt::format("{} (time {:.3f}x dense)", time_ok ? "met" : "not met", p->attn_time_rel),
      on_front > 0   ? "yes"
      : on_front < 0 ? "no"
                     : "undetermined");
  out += ppl_ok && flops_ok && time_ok && on_front > 0 ? "All targets hold. "
                                                       : "Not all targets hold. ";
  return out + others;
}

std::string format_table(const std::vector<ResultRow>& rows) {
  size_t w = 6;
  for (const auto& r : rows) w = std::max(w, r.method.size());
  std::string out =
      fmt::format("{:<{}}  {:>9}  {:>9}  {:>10}  {:>8}  {:>19}  {:>8}  {:>10}  {:>8}\n", "method",
                  w, "FLOPs rel", "time rel", "perplexity", "ppl chg%", "95% CI (%)", "fidelity",
                  "violations", "p");
  for (const auto& r : rows)
    out += fmt::format(
        "{:<{}}  {:>9.4f}  {:>9.4f}  {:>10.4f}  {:>+8.3f}  {:>19}  {:>8.4f}  {:>10}  {:>8.2g}\n",
        r.method, w, r.attn_flops_rel, r.attn_time_rel, r.perplexity, r.ppl_change_pct,
        fmt::format("[{:+.3f}, {:+.3f}]", r.ppl_change_ci_low, r.ppl_change_ci_high), r.fidelity,
        r.guardrail_violations, r.p_value);
  return out;
}

void write_report(const fs::path& dir, const std::vector<MethodResult>& results,
                  const ExperimentSummary& summary, const fs::path& metrics_jsonl) {
  const std::vector<ResultRow> rows = result_rows(results);
  const size_t n_seq = results.front().seq_nll.size();
  ATTNPILOT_CHECK_ARG(summary.eval_sequences == static_cast<int64_t>(n_seq),
                      "summary.eval_sequences = {} but every method has {} sequences",
                      summary.eval_sequences, n_seq);
  const MethodResult* policy = nullptr;
  for (const auto& r : results)
    if (r.method == "policy") policy = &r;
  const bool have_metrics = !metrics_jsonl.empty() && fs::exists(metrics_jsonl);
  std::vector<std::pair<double, double>> curve;
  if (have_metrics) curve = read_training_curve(metrics_jsonl);

  fs::create_directories(dir / "gnuplot");
  const fs::path gp = dir / "gnuplot";
  write_file_atomic(dir / "results.csv", results_csv(rows));

  // Figures: each returns "" when drawn, else the reason.
  std::string pareto_note, heat_note, curve_note;
  bool with_time = true;
  for (const auto& r : rows) with_time = with_time && std::isfinite(r.attn_time_rel);
  pareto_note =
      draw(dir, "pareto", with_time ? "1500,600" : "900,600", pareto_body(gp, rows, with_time));

  if (policy == nullptr || policy->mean_rank.empty() || policy->mean_rank[0].empty()) {
    heat_note = policy == nullptr ? "no policy was evaluated" : "the policy row has no mean_rank";
  } else {
    std::string dat;
    for (size_t l = 0; l < policy->mean_rank.size(); ++l)
      for (size_t s = 0; s < policy->mean_rank[l].size(); ++s)
        dat += fmt::format("{} {} {}\n", s, l, num(policy->mean_rank[l][s]));
    write_file_atomic(gp / "rank_heatmap.dat", dat);
    std::string body =
        "set title 'policy: mean executed rank (held-out text)'\nset xlabel 'segment'\n"
        "set ylabel 'layer'\nset cblabel 'mean rank'\nset ytics 1\nset palette rgb 33,13,10\n" +
        fmt::format("set xrange [-0.5:{}]\nset yrange [-0.5:{}]\n",
                    policy->mean_rank[0].size() - 0.5, policy->mean_rank.size() - 0.5);
    if (!summary.ranks.empty()) {
      const auto [mn, mx] = std::minmax_element(summary.ranks.begin(), summary.ranks.end());
      if (*mx > *mn) body += fmt::format("set cbrange [{}:{}]\n", *mn, *mx);
    }
    body += fmt::format(
        "plot {} using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder palette "
        "notitle\n",
        gp_quote(gp / "rank_heatmap.dat"));
    heat_note = draw(dir, "rank_heatmap", "900,600", body);
  }

  if (!have_metrics) {
    curve_note = metrics_jsonl.empty() ? "no training metrics were given"
                                       : fmt::format("{} does not exist", metrics_jsonl.string());
  } else if (curve.empty()) {
    curve_note = fmt::format("{} has no episode_return_mean values", metrics_jsonl.string());
  } else {
    std::string dat;
    for (auto [s, v] : curve) dat += fmt::format("{} {}\n", num(s), num(v));
    write_file_atomic(gp / "training_curve.dat", dat);
    curve_note = draw(
        dir, "training_curve", "900,600",
        fmt::format("set title 'training: mean episode return'\nset xlabel 'environment step'\n"
                    "set ylabel 'episode_return_mean'\nset grid\n"
                    "plot {} using 1:2 with linespoints lw 2 pt 7 ps 0.6 notitle\n",
                    gp_quote(gp / "training_curve.dat")));
  }

  // report.md
  std::string md = "# Rank selection: results\n\n";
  md += fmt::format("Date: {}\n\n## Verdict\n\n{}\n\n", summary.date, verdict(rows));
  md += fmt::format("## Results on held-out text ({} sequences x {} tokens)\n\n", n_seq,
                    summary.sequence_length);
  md +=
      "| method | attn_flops_rel | attn_time_rel | perplexity | ppl_change_pct | "
      "ppl_change_ci_low | ppl_change_ci_high | fidelity | guardrail_violations | p_value |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const auto& r : rows)
    md += fmt::format(
        "| {} | {:.6g} | {:.6g} | {:.6g} | {:.6g} | {:.6g} | {:.6g} | {:.6g} | {} | "
        "{:.3g} |\n",
        r.method, r.attn_flops_rel, r.attn_time_rel, r.perplexity, r.ppl_change_pct,
        r.ppl_change_ci_low, r.ppl_change_ci_high, r.fidelity, r.guardrail_violations, r.p_value);
  md += fmt::format(
      "\nCosts are relative to dense (attention-score FLOPs; measured attention time{}). "
      "Perplexity change is relative to dense, paired over the same {} sequences: the mean of "
      "per-sequence NLL differences d with its 95% Student-t interval, reported as "
      "100 (exp(d) - 1), and a two-sided paired t-test (p_value), computed with Boost.Math. "
      "Exact values are in results.csv.\n\n",
      with_time ? "" : "; nan where dense time was not measured", n_seq);

  md +=
      "## Control-plane overhead\n\nStated separately from the attention cost above: "
      "perturbation-engine FLOPs (Gram updates, SVDs) relative to dense attention-score FLOPs.\n\n"
      "| method | control_flops_rel | attention + control (rel) | decisions | violations per "
      "decision |\n|---|---:|---:|---:|---:|\n";
  for (size_t i = 0; i < rows.size(); ++i)
    md += fmt::format(
        "| {} | {:.6g} | {:.6g} | {} | {} |\n", rows[i].method, rows[i].control_flops_rel,
        rows[i].attn_flops_rel + rows[i].control_flops_rel, results[i].decisions,
        results[i].decisions > 0
            ? fmt::format("{:.4g}", static_cast<double>(results[i].guardrail_violations) /
                                        static_cast<double>(results[i].decisions))
            : std::string("-"));

  md += "\n## Figures\n\n";
  auto figure = [&](const std::string& name, const std::string& caption, const std::string& note) {
    if (note.empty())
      md += fmt::format("![{}]({}.png)\n\n", caption, name);
    else
      md += fmt::format("{}.png ({}) was not drawn: {}.\n\n", name, caption, note);
  };
  figure("pareto", "perplexity against cost, static front as a line", pareto_note);
  figure("rank_heatmap", "policy's mean rank over layers x segments", heat_note);
  figure("training_curve", "episode_return_mean against step", curve_note);
  if (!gnuplot_available())
    md +=
        "gnuplot is not installed on this machine; the plot scripts and data are in "
        "gnuplot/.\n\n";

  std::string ranks = fmt::format("{}", fmt::join(summary.ranks, ", "));
  md += "## Settings\n\n";
  md += fmt::format("- model: `{}` (fingerprint `{}`)\n", summary.model_dir,
                    summary.model_fingerprint);
  md += fmt::format("- seed: {}\n", summary.seed);
  md += fmt::format("- held-out sequences: {} x {} tokens, segments of {} tokens\n",
                    summary.eval_sequences, summary.sequence_length, summary.segment);
  md += fmt::format("- rank grid: {}\n", ranks.empty() ? "(none)" : ranks);
  md += fmt::format("- guardrail epsilon: {}\n", summary.guardrail_epsilon);
  md += fmt::format("- cost in the reward: {}\n", summary.cost_source);
  md += fmt::format("- training metrics: {}\n\n",
                    metrics_jsonl.empty() ? "(none)" : metrics_jsonl.string());
  auto block = [](std::string text) {
    while (!text.empty() && text.back() == '\n') text.pop_back();
    return text;
  };
  const std::string mf = fence_for(summary.machine);
  md += fmt::format("## Machine\n\n{}\n{}\n{}\n\n", mf, block(summary.machine), mf);
  const std::string cf = fence_for(summary.config_text);
  md += fmt::format("## Config\n\n{}yaml\n{}\n{}\n", cf, block(summary.config_text), cf);
  write_file_atomic(dir / "report.md", md);
}

}  // namespace attnpilot::experiments
