#pragma once
/// The rank-selection experiment's results: relative costs, perplexities with paired
/// confidence intervals against dense, results.csv, the honest verdict, report.md and the
/// gnuplot figures. Pure functions of their inputs (the runner fills MethodResult).
///
///   MethodResult[] ──result_rows──► ResultRow[] ──results_csv──► DIR/results.csv
///        │                               ├──verdict──────────► sentence in report.md
///        │                               └──format_table─────► terminal table
///        └──write_report──► DIR/{results.csv, report.md, pareto.png, rank_heatmap.png,
///                                training_curve.png}   (figures drawn from gnuplot/ data)
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace attnpilot::experiments {

/// One evaluated method over the same held-out sequences (equal token count per sequence).
struct MethodResult {
  /// dense, static-r<rank>, energy-<tau>, random, oracle or policy.
  std::string method;
  /// Per held-out sequence: mean next-token NLL (nats/token), same order for every method.
  std::vector<double> seq_nll;
  /// Attention-score FLOPs summed over the run (score computation and projection use).
  double attn_flops = 0;
  /// Measured attention time summed over the run (0 in the dense row: not measured).
  double attn_time_us = 0;
  /// Perturbation-engine overhead (Gram updates, SVDs) summed over the run.
  double control_flops = 0;
  /// Mean fidelity against dense (1 = identical).
  double fidelity = 0;
  /// Times an executed rank violated the guardrail.
  int64_t guardrail_violations = 0;
  /// (segment, layer, head) executions.
  int64_t decisions = 0;
  /// [layer][segment] mean executed rank over sequences and heads (the policy heatmap).
  std::vector<std::vector<double>> mean_rank;
};

/// The settings that report.md lists.
struct ExperimentSummary {
  std::string config_text;        ///< the YAML config as run
  std::string model_dir;          ///< checkpoint folder
  std::string model_fingerprint;  ///< model fingerprint (hash of config and weights)
  std::string machine;            ///< free text or a JSON dump of the machine description
  uint64_t seed = 0;
  int64_t eval_sequences = 0;   ///< held-out sequences evaluated
  int64_t sequence_length = 0;  ///< tokens per sequence
  int64_t segment = 0;          ///< tokens per decision segment
  std::vector<int64_t> ranks;   ///< the rank grid
  double guardrail_epsilon = 0;
  std::string cost_source;  ///< "flops" or "time (calibrated: FILE)"
  std::string date;         ///< when the experiment ran
};

/// One results.csv row: a method relative to the "dense" row.
struct ResultRow {
  std::string method;
  double attn_flops_rel = 0;  ///< attn_flops / dense.attn_flops
  double attn_time_rel = 0;   ///< attn_time_us / dense.attn_time_us (NaN: dense time is 0)
  double perplexity = 0;      ///< exp(mean(seq_nll))
  /// 100 (exp(mean d) - 1) with d_i = seq_nll_i - dense.seq_nll_i.
  double ppl_change_pct = 0;
  double ppl_change_ci_low = 0;   ///< 100 (exp(mean d - h) - 1), h the 95% t half-width
  double ppl_change_ci_high = 0;  ///< 100 (exp(mean d + h) - 1)
  double fidelity = 0;
  int64_t guardrail_violations = 0;
  /// Two-sided paired t-test against dense. Not in the CSV (NaN after parsing).
  double p_value = 0;
  /// control_flops / dense.attn_flops. Not in the CSV (NaN after parsing).
  double control_flops_rel = 0;
};

/// The exact first line of results.csv.
inline constexpr const char* kResultsCsvHeader =
    "method,attn_flops_rel,attn_time_rel,perplexity,ppl_change_pct,ppl_change_ci_low,"
    "ppl_change_ci_high,fidelity,guardrail_violations";

/// Relative perplexity difference (percent) within which the policy "matches" the static
/// front at the same cost in verdict().
inline constexpr double kMatchTolerancePct = 0.1;

/// One row per method, in input order. Throws InvalidArgument naming the method when the
/// "dense" row is missing or repeated, a method is repeated or has a name unusable in CSV,
/// sequence counts differ from dense's or are below 2 (no interval), an NLL is not finite,
/// a cost is negative or not finite, or dense's attn_flops is not positive.
std::vector<ResultRow> result_rows(const std::vector<MethodResult>& results);

/// results.csv text: kResultsCsvHeader, then one line per row. Numbers are written in the
/// shortest form that parses back to the same double (nan / inf where they occur).
std::string results_csv(const std::vector<ResultRow>& rows);

/// Parses results_csv's format (header exactly, nine fields per line). Throws FormatError
/// naming the line and column of the first problem.
std::vector<ResultRow> parse_results_csv(const std::string& text);

/// The honest verdict: the policy against the lower-left Pareto front of the static-r rows
/// in (attn_flops_rel, perplexity), the front's perplexity interpolated piecewise linearly
/// at the policy's cost (outside the front's cost range it says so and compares by
/// dominance only), then the targets: <= 1% perplexity increase with >= 30% fewer
/// score FLOPs, and a measured attention-time reduction.
std::string verdict(const std::vector<ResultRow>& rows);

/// The static-r rows on the lower-left Pareto front, sorted by increasing cost.
std::vector<ResultRow> static_front(const std::vector<ResultRow>& rows);

/// A plain-text table for the terminal.
std::string format_table(const std::vector<ResultRow>& rows);

/// Writes DIR/results.csv, DIR/report.md, and with gnuplot DIR/pareto.png (perplexity
/// against relative score FLOPs and, when measured, time), DIR/rank_heatmap.png (the
/// policy's mean_rank) and DIR/training_curve.png (episode_return_mean against step from
/// `metrics_jsonl`; skipped with a note when the path is empty or absent). Plot data and
/// scripts go to DIR/gnuplot/. A figure that cannot be drawn (gnuplot missing or failing)
/// is noted in report.md and logged; every file is written atomically. Throws like
/// result_rows, and FormatError naming the line of a malformed metrics_jsonl.
void write_report(const std::filesystem::path& dir, const std::vector<MethodResult>& results,
                  const ExperimentSummary& summary, const std::filesystem::path& metrics_jsonl);

}  // namespace attnpilot::experiments
