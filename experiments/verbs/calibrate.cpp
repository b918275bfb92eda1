// `attnpilot calibrate`: measures the wall time of run_attention on this machine over
// (queries N, keys M, rank r, head dim d) for dense and low-rank heads and writes the cost
// model's table (attention/cost_model.h) that rewards and reports interpolate.
//
//   grid ─► CostModel::calibrate (progress on stderr) ─► OUT.json (atomic)
//        ─► table on stdout: dense µs and low-rank/dense time ratio per rank
//        ─► OUT.png (gnuplot; data OUT.ratio.dat, script OUT.gp)
#include <fmt/ranges.h>

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <sstream>
#include <tuple>

#include "attention/cost_model.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "common/log.h"
#include "common/plot.h"
#include "experiments/cli.h"

namespace attnpilot::cli {
namespace {

namespace fs = std::filesystem;
using attention::CalibrationOptions;
using attention::CostModel;
using attention::Kind;

struct CalibrateArgs {
  std::string out, device = "cpu", head_dims, query_lengths, key_lengths, ranks;
  int threads = 1, repeats = 0;
  int64_t heads = 0, kv_heads = 0;
  uint64_t seed = 1;
  bool quick = false;
};

/// "32,64" ─► {32, 64}, sorted and without repeats; UsageError naming the flag otherwise.
std::vector<int64_t> parse_list(const std::string& flag, const std::string& s) {
  auto out = parse_positive_list(flag, s);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

/// The table: per (d, N, M) the dense time and each rank's time ratio against dense.
void print_table(const CostModel& cm) {
  const auto& o = cm.options();
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, double> t;  // (d, N, M, r) ─► µs
  for (const auto& p : cm.points()) t[{p.head_dim, p.n_q, p.n_k, p.rank}] = p.median_us;
  std::cout << fmt::format(
      "\ntime of one causal run_attention call of {} query heads ({} key/value heads; batch 1, "
      "fp32, {} thread(s)), median of {} repeats;\nr=k columns: low-rank time (given "
      "projections) / dense time\n",
      o.heads, o.kv_heads == 0 ? o.heads : o.kv_heads, o.threads, o.repeats);
  std::cout << fmt::format("{:>4} {:>5} {:>6} {:>10}", "d", "N", "M", "dense us");
  for (int64_t r : o.ranks) std::cout << fmt::format(" {:>7}", fmt::format("r={}", r));
  std::cout << "\n";
  for (int64_t d : o.head_dims)
    for (int64_t n : o.query_lengths)
      for (int64_t m : o.key_lengths) {
        if (m < n) continue;
        const double dense = t.at({d, n, m, 0});
        std::cout << fmt::format("{:>4} {:>5} {:>6} {:>10.1f}", d, n, m, dense);
        for (int64_t r : o.ranks) {
          if (r > d)
            std::cout << fmt::format(" {:>7}", "-");
          else
            std::cout << fmt::format(" {:>7.3f}", t.at({d, n, m, r}) / dense);
        }
        std::cout << "\n";
      }
}

/// OUT.png: per head dim, low-rank / dense time against rank, one line per (N, M).
void plot_ratios(const CostModel& cm, const fs::path& out) {
  const auto& o = cm.options();
  fs::path png = out, dat = out, gp = out;
  png.replace_extension(".png");
  dat.replace_extension(".ratio.dat");
  gp.replace_extension(".gp");
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t>, double> t;
  for (const auto& p : cm.points()) t[{p.head_dim, p.n_q, p.n_k, p.rank}] = p.median_us;
  std::string data;
  std::vector<std::vector<std::pair<int, std::string>>> blocks(o.head_dims.size());
  int index = 0;
  for (size_t di = 0; di < o.head_dims.size(); ++di) {
    const int64_t d = o.head_dims[di];
    if (cm.ranks_for(d).empty()) continue;
    for (int64_t n : o.query_lengths)
      for (int64_t m : o.key_lengths) {
        if (m < n) continue;
        data += fmt::format("# d={} N={} M={}\n", d, n, m);
        for (int64_t r : cm.ranks_for(d))
          data += fmt::format("{} {:.6f}\n", r, t.at({d, n, m, r}) / t.at({d, n, m, 0}));
        data += "\n\n";
        blocks[di].push_back({index++, fmt::format("N={} M={}", n, m)});
      }
  }
  write_file_atomic(dat, data);
  if (!gnuplot_available()) {
    log::warn(fmt::format("gnuplot not found: skipping {}", png.string()));
    return;
  }
  std::string cpu = cm.machine().value("cpu_model", std::string("unknown CPU"));
  std::replace(cpu.begin(), cpu.end(), '\'', ' ');
  std::string script = fmt::format(
      "set terminal pngcairo size {},520\nset output '{}'\n"
      "set multiplot layout 1,{} title 'low-rank / dense time of one call ({} heads, {}, {} "
      "thread(s))'\n"
      "set logscale x 2\nset xlabel 'rank r'\nset ylabel 'time ratio low-rank / dense'\n"
      "set grid\nset key outside right font ',8'\n",
      600 * o.head_dims.size(), png.string(), o.head_dims.size(), o.heads, cpu, o.threads);
  for (size_t di = 0; di < o.head_dims.size(); ++di) {
    script +=
        fmt::format("set title 'head dim {}'\nplot 1 with lines dt 2 lc 'black' title 'dense'",
                    o.head_dims[di]);
    for (const auto& [i, title] : blocks[di])
      script += fmt::format(", '{}' index {} using 1:2 with linespoints title '{}'", dat.string(),
                            i, title);
    script += "\n";
  }
  script += "unset multiplot\n";
  run_gnuplot(gp, script);
  std::cout << "wrote " << png.string() << "\n";
}

void run_calibrate(const CalibrateArgs& a, const CLI::App& cmd) {
  CalibrationOptions o = a.quick ? CalibrationOptions::quick() : CalibrationOptions{};
  if (cmd.count("--head-dims")) o.head_dims = parse_list("--head-dims", a.head_dims);
  if (cmd.count("--query-lengths"))
    o.query_lengths = parse_list("--query-lengths", a.query_lengths);
  if (cmd.count("--key-lengths")) o.key_lengths = parse_list("--key-lengths", a.key_lengths);
  if (cmd.count("--ranks")) o.ranks = parse_list("--ranks", a.ranks);
  if (a.threads < 1) throw UsageError(fmt::format("--threads {}: expected >= 1", a.threads));
  o.threads = a.threads;
  if (cmd.count("--repeats")) {
    if (a.repeats < 1) throw UsageError(fmt::format("--repeats {}: expected >= 1", a.repeats));
    o.repeats = a.repeats;
  }
  if (cmd.count("--heads")) {
    if (a.heads < 1) throw UsageError(fmt::format("--heads {}: expected >= 1", a.heads));
    o.heads = a.heads;
  }
  if (cmd.count("--kv-heads")) {
    if (a.kv_heads < 0 || (a.kv_heads > 0 && o.heads % a.kv_heads != 0))
      throw UsageError(fmt::format("--kv-heads {}: expected 0 (= --heads) or a divisor of {}",
                                   a.kv_heads, o.heads));
    o.kv_heads = a.kv_heads;
  }
  o.seed = a.seed;
  o.device = parse_device(a.device);
  if (o.query_lengths.back() > o.key_lengths.back())
    throw UsageError(fmt::format(
        "--query-lengths: {} exceeds the largest key length {} (causal queries need M >= N)",
        o.query_lengths.back(), o.key_lengths.back()));
  const fs::path out(a.out);
  if (out.empty()) throw UsageError("--out is empty, expected a file such as calibration.json");
  if (out.has_parent_path()) fs::create_directories(out.parent_path());

  log::info(fmt::format(
      "calibrate: head dims [{}], N [{}], M [{}], ranks [{}], {} heads, {} "
      "repeats, {} thread(s), device {}",
      fmt::join(o.head_dims, ","), fmt::join(o.query_lengths, ","), fmt::join(o.key_lengths, ","),
      fmt::join(o.ranks, ","), o.heads, o.repeats, o.threads, o.device.str()));
  const auto cm = CostModel::calibrate(o, &std::cerr);
  cm.save(out);
  print_table(cm);
  std::cout << "wrote " << out.string() << " (" << cm.points().size() << " points)\n";
  plot_ratios(cm, out);
}

void add_calibrate_verb(CLI::App& root) {
  auto args = std::make_shared<CalibrateArgs>();
  auto* cmd = root.add_subcommand(
      "calibrate",
      "Measure dense and low-rank attention time on this machine over (queries, keys, rank, "
      "head dim); write the cost model's JSON table, a ratio table and a plot");
  cmd->add_option("--out", args->out, "output JSON file (the plot goes next to it as .png)")
      ->required();
  cmd->add_option("--device", args->device, "cpu (the only device with an attention backend)")
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "torch intra-op threads while measuring")
      ->capture_default_str();
  cmd->add_flag(
      "--quick", args->quick,
      "small grid (N 16,64; M 64..512; ranks 4..32; head dim 32; 3 repeats), well under a second");
  cmd->add_option("--head-dims", args->head_dims, "comma-separated head dims (default 32,64)");
  cmd->add_option("--query-lengths", args->query_lengths,
                  "comma-separated queries per call N (default 16,32,64,128)");
  cmd->add_option("--key-lengths", args->key_lengths,
                  "comma-separated keys per call M >= N (default 64,128,256,512,1024)");
  cmd->add_option("--ranks", args->ranks,
                  "comma-separated low-rank score ranks; ranks above a head dim are skipped "
                  "(default 2,4,8,16,32,64)");
  cmd->add_option("--heads", args->heads, "query heads per call (default 4)");
  cmd->add_option("--kv-heads", args->kv_heads,
                  "key/value heads per call (GQA; a divisor of --heads; default = --heads)");
  cmd->add_option(
      "--repeats", args->repeats,
      "timed sweeps of the grid after one warm-up sweep; a point keeps the median (default 5)");
  cmd->add_option("--seed", args->seed, "seed of the random inputs")->capture_default_str();
  cmd->callback([args, cmd] { run_calibrate(*args, *cmd); });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(calibrate, 25, add_calibrate_verb);

}  // namespace attnpilot::cli
