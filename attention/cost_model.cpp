#include "attention/cost_model.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <fmt/ranges.h>
#include <gnu/libc-version.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <limits>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include "attention/attention.h"
#include "attention/backend.h"
#include "attention/lowrank.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "common/progress.h"

namespace attnpilot::attention {
namespace {

using json = nlohmann::json;

constexpr const char* kFormat = "attnpilot-cost-model";
constexpr int kVersion = 1;

std::string list_str(const std::vector<int64_t>& v) {
  return fmt::format("[{}]", fmt::join(v, ", "));
}

void check_axis(const std::vector<int64_t>& v, const char* name) {
  ATTNPILOT_CHECK_ARG(!v.empty(), "calibration options: {} is empty", name);
  for (size_t i = 0; i < v.size(); ++i) {
    ATTNPILOT_CHECK_ARG(v[i] >= 1, "calibration options: {} holds {}; expected values >= 1 ({})",
                        name, v[i], list_str(v));
    ATTNPILOT_CHECK_ARG(i == 0 || v[i] > v[i - 1],
                        "calibration options: {} must be strictly increasing; got {}", name,
                        list_str(v));
  }
}

/// Sets torch's intra-op threads for a scope and restores the previous count.
class ThreadsGuard {
 public:
  explicit ThreadsGuard(int n) : previous_(at::get_num_threads()) { at::set_num_threads(n); }
  ~ThreadsGuard() { at::set_num_threads(previous_); }
  ThreadsGuard(const ThreadsGuard&) = delete;
  ThreadsGuard& operator=(const ThreadsGuard&) = delete;

 private:
  int previous_;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Piecewise-linear interpolation of (xs, ys) at x; xs strictly increasing, non-empty.
/// Outside [xs.front(), xs.back()] the edge segment is extended and *outside is set.
double interp1(const std::vector<double>& xs, const std::vector<double>& ys, double x,
               bool* outside) {
  TORCH_INTERNAL_ASSERT(!xs.empty() && xs.size() == ys.size());
  if (x < xs.front() || x > xs.back()) *outside = true;
  if (xs.size() == 1) return ys[0];
  size_t i = std::upper_bound(xs.begin(), xs.end(), x) - xs.begin();  // first xs > x
  i = std::clamp<size_t>(i, 1, xs.size() - 1);                        // segment [i-1, i]
  const double t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]);
  return ys[i - 1] + t * (ys[i] - ys[i - 1]);
}

size_t index_of(const std::vector<int64_t>& v, int64_t x) {
  return std::find(v.begin(), v.end(), x) - v.begin();
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

/// glibc's version and the allocator settings in the environment: the heap's trim and mmap
/// thresholds decide whether large score buffers are page-faulted afresh on every call,
/// which changes the measured time of the larger shapes severalfold.
json allocator() {
  json j{{"glibc", gnu_get_libc_version()}};
  for (const char* v : {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_ARENA_MAX",
                        "GLIBC_TUNABLES", "LD_PRELOAD"})
    if (const char* val = std::getenv(v)) j[v] = val;
  return j;
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        auto s = line.substr(colon + 1);
        s.erase(0, s.find_first_not_of(" \t"));
        return s;
      }
    }
  }
  return "unknown (no 'model name' in /proc/cpuinfo)";
}

// ---- JSON reading with field names in every error ----

const json& field(const json& obj, const std::string& key, const std::string& where) {
  if (!obj.is_object())
    throw FormatError(fmt::format("{}: expected an object, got {}", where, obj.type_name()));
  const auto it = obj.find(key);
  if (it == obj.end())
    throw FormatError(fmt::format("{}{}{}: missing", where, where.empty() ? "" : ".", key));
  return *it;
}

std::string name_of(const std::string& where, const std::string& key) {
  return where.empty() ? key : where + "." + key;
}

void no_unknown_keys(const json& obj, const std::set<std::string>& known,
                     const std::string& where) {
  for (auto it = obj.begin(); it != obj.end(); ++it)
    if (!known.count(it.key()))
      throw FormatError(fmt::format("{}: unknown key '{}'", name_of(where, it.key()), it.key()));
}

int64_t get_int(const json& j, const std::string& name) {
  if (!j.is_number_integer())
    throw FormatError(
        fmt::format("{}: expected an integer, got {} {}", name, j.type_name(), j.dump()));
  return j.get<int64_t>();
}

double get_number(const json& j, const std::string& name) {
  if (!j.is_number())
    throw FormatError(
        fmt::format("{}: expected a number, got {} {}", name, j.type_name(), j.dump()));
  return j.get<double>();
}

std::string get_string(const json& j, const std::string& name) {
  if (!j.is_string())
    throw FormatError(
        fmt::format("{}: expected a string, got {} {}", name, j.type_name(), j.dump()));
  return j.get<std::string>();
}

std::vector<int64_t> get_int_list(const json& j, const std::string& name) {
  if (!j.is_array())
    throw FormatError(
        fmt::format("{}: expected an array of integers, got {}", name, j.type_name()));
  std::vector<int64_t> out;
  for (size_t i = 0; i < j.size(); ++i)
    out.push_back(get_int(j[i], fmt::format("{}[{}]", name, i)));
  return out;
}

}  // namespace

CalibrationOptions CalibrationOptions::quick() {
  CalibrationOptions o;
  o.query_lengths = {16, 64};
  o.key_lengths = {64, 128, 256, 512};
  o.ranks = {4, 8, 16, 32};
  o.head_dims = {32};
  o.repeats = 3;
  return o;
}

void CalibrationOptions::validate() const {
  check_axis(query_lengths, "query_lengths");
  check_axis(key_lengths, "key_lengths");
  check_axis(ranks, "ranks");
  check_axis(head_dims, "head_dims");
  ATTNPILOT_CHECK_ARG(query_lengths.back() <= key_lengths.back(),
                      "calibration options: query_lengths value {} exceeds every key length {} "
                      "(causal queries need M >= N)",
                      query_lengths.back(), list_str(key_lengths));
  ATTNPILOT_CHECK_ARG(heads >= 1, "calibration options: heads {}; expected >= 1", heads);
  ATTNPILOT_CHECK_ARG(kv_heads >= 0 && (kv_heads == 0 || heads % kv_heads == 0),
                      "calibration options: kv_heads {}; expected 0 (= heads) or a divisor of "
                      "heads {}",
                      kv_heads, heads);
  ATTNPILOT_CHECK_ARG(repeats >= 1, "calibration options: repeats {}; expected >= 1", repeats);
  ATTNPILOT_CHECK_ARG(threads >= 1, "calibration options: threads {}; expected >= 1", threads);
}

json CostModel::describe_machine(const CalibrationOptions& o) {
  return json{
      {"cpu_model", cpu_model()},
      {"logical_cores", std::thread::hardware_concurrency()},
      {"threads", o.threads},
      {"torch_version", TORCH_VERSION},
      {"device", o.device.str()},
      {"date", utc_now()},
      {"allocator", allocator()},
      {"timing", fmt::format("wall time (steady_clock) of one run_attention call, median over {} "
                             "timed sweeps of the grid after one warm-up sweep, {} intra-op "
                             "thread(s)",
                             o.repeats, o.threads)}};
}

CostModel CostModel::calibrate(const CalibrationOptions& o, std::ostream* progress) {
  o.validate();
  backend_for(o.device);  // Unavailable before any work when the device has no backend
  ThreadsGuard threads(o.threads);
  torch::NoGradGuard no_grad;
  const int64_t kv = o.kv_heads == 0 ? o.heads : o.kv_heads;

  // Every shape's inputs first, then whole-grid sweeps (see the header).
  struct Shape {
    int64_t d, n, m;
    std::vector<int64_t> ranks;  // case c >= 1 is ranks[c - 1]; case 0 is dense
    std::vector<AttentionInputs> xs;
    std::vector<LayerPlan> plans;
    std::vector<std::vector<double>> us;
  };
  std::vector<Shape> shapes;
  for (int64_t d : o.head_dims) {
    std::vector<int64_t> ranks;
    for (int64_t r : o.ranks)
      if (r <= d) ranks.push_back(r);
    for (int64_t n : o.query_lengths)
      for (int64_t m : o.key_lengths) {
        if (m < n) continue;
        // One generator per shape: a point's inputs do not depend on the rest of the grid.
        auto gen = at::make_generator<at::CPUGeneratorImpl>(
            o.seed * 1000003ULL + static_cast<uint64_t>(d) * 7919ULL +
            static_cast<uint64_t>(n) * 104729ULL + static_cast<uint64_t>(m));
        AttentionInputs in;
        in.q = torch::randn({1, o.heads, n, d}, gen, torch::kFloat).to(o.device);
        in.k = torch::randn({1, kv, m, d}, gen, torch::kFloat).to(o.device);
        in.v = torch::randn({1, kv, m, d}, gen, torch::kFloat).to(o.device);
        in.causal = true;
        in.q_offset = -1;
        Shape sh{d, n, m, ranks, {in}, {LayerPlan::uniform(HeadPlan::dense())}, {}};
        if (!ranks.empty()) {
          // Projections per query head (keys shared by a GQA group), not timed.
          const auto proj =
              lowrank_projections(in.q, in.k.repeat_interleave(o.heads / kv, 1), ranks.back());
          for (int64_t r : ranks) {
            AttentionInputs x = in;
            x.a_q = proj.a_q;
            x.a_k = proj.a_k;
            sh.xs.push_back(x);
            sh.plans.push_back(LayerPlan::uniform(HeadPlan::lowrank(r)));
          }
        }
        sh.us.resize(sh.xs.size());
        shapes.push_back(std::move(sh));
      }
  }
  int64_t total = 0;
  for (const auto& sh : shapes)
    total += (o.repeats + 1) * static_cast<int64_t>(sh.xs.size()) + o.repeats;
  std::unique_ptr<Progress> bar;
  if (progress) bar = std::make_unique<Progress>("calibrate", total, "calls", *progress);

  int64_t done = 0;
  const auto call = [&](const Shape& sh, size_t c) {
    const auto t0 = std::chrono::steady_clock::now();
    const auto res = run_attention(sh.xs[c], {sh.plans[c]});
    if (o.device.is_cuda()) torch::cuda::synchronize();
    const auto t1 = std::chrono::steady_clock::now();
    ++done;
    return std::chrono::duration<double, std::micro>(t1 - t0).count();
  };
  for (int sweep = -1; sweep < o.repeats; ++sweep) {  // sweep -1: warm-up of every case
    for (auto& sh : shapes) {
      if (sweep >= 0) call(sh, 0);  // untimed: this shape's inputs back in cache
      for (size_t c = 0; c < sh.xs.size(); ++c) {
        const double t = call(sh, c);
        if (sweep >= 0) sh.us[c].push_back(t);
      }
      if (bar)
        bar->update(done, fmt::format("sweep {}/{} d={} N={} M={}", sweep + 1, o.repeats, sh.d,
                                      sh.n, sh.m));
    }
  }
  std::vector<CostPoint> points;
  for (const auto& sh : shapes)
    for (size_t c = 0; c < sh.xs.size(); ++c) {
      CostPoint p;
      p.kind = c == 0 ? Kind::kDense : Kind::kLowRank;
      p.n_q = sh.n;
      p.n_k = sh.m;
      p.rank = c == 0 ? 0 : sh.ranks[c - 1];
      p.head_dim = sh.d;
      p.median_us = median(sh.us[c]);
      p.min_us = *std::min_element(sh.us[c].begin(), sh.us[c].end());
      p.max_us = *std::max_element(sh.us[c].begin(), sh.us[c].end());
      points.push_back(p);
    }
  if (bar) bar->finish(fmt::format("{} points", points.size()));
  return from_points(o, std::move(points), describe_machine(o));
}

CostModel CostModel::from_points(const CalibrationOptions& options, std::vector<CostPoint> points,
                                 json machine) {
  options.validate();
  ATTNPILOT_CHECK_ARG(machine.is_object(), "machine: expected a JSON object, got {}",
                      machine.type_name());
  CostModel cm;
  cm.options_ = options;
  cm.points_ = std::move(points);
  cm.machine_ = std::move(machine);
  cm.index();
  return cm;
}

void CostModel::index() {
  const auto& o = options_;
  tables_.clear();
  floor_dense_.assign(o.head_dims.size(), std::numeric_limits<double>::infinity());
  floor_lowrank_ = floor_dense_;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t d : o.head_dims) {
    const size_t nr = ranks_for(d).size();
    tables_.emplace_back(
        o.query_lengths.size(),
        std::vector<std::vector<double>>(o.key_lengths.size(), std::vector<double>(nr + 1, nan)));
  }
  for (size_t i = 0; i < points_.size(); ++i) {
    const CostPoint& p = points_[i];
    const auto name = [&](const char* f) { return fmt::format("points[{}].{}", i, f); };
    ATTNPILOT_CHECK_ARG(p.kind == Kind::kDense || p.kind == Kind::kLowRank,
                        "{} = {}: expected dense or lowrank", name("kind"), kind_name(p.kind));
    const size_t di = index_of(o.head_dims, p.head_dim);
    ATTNPILOT_CHECK_ARG(di < o.head_dims.size(), "{} = {}: not among the head_dims {}",
                        name("head_dim"), p.head_dim, list_str(o.head_dims));
    const size_t ni = index_of(o.query_lengths, p.n_q);
    ATTNPILOT_CHECK_ARG(ni < o.query_lengths.size(), "{} = {}: not among the query_lengths {}",
                        name("n_q"), p.n_q, list_str(o.query_lengths));
    const size_t mi = index_of(o.key_lengths, p.n_k);
    ATTNPILOT_CHECK_ARG(mi < o.key_lengths.size(), "{} = {}: not among the key_lengths {}",
                        name("n_k"), p.n_k, list_str(o.key_lengths));
    ATTNPILOT_CHECK_ARG(p.n_k >= p.n_q, "{} = {} < n_q {}: causal queries need n_k >= n_q",
                        name("n_k"), p.n_k, p.n_q);
    size_t ri = 0;
    if (p.kind == Kind::kDense) {
      ATTNPILOT_CHECK_ARG(p.rank == 0, "{} = {}: dense points have rank 0", name("rank"), p.rank);
    } else {
      const auto rs = ranks_for(p.head_dim);
      ri = index_of(rs, p.rank) + 1;
      ATTNPILOT_CHECK_ARG(ri <= rs.size(), "{} = {}: not among the ranks <= head_dim {}: {}",
                          name("rank"), p.rank, p.head_dim, list_str(rs));
    }
    for (const auto& [f, v] : {std::pair<const char*, double>{"min_us", p.min_us},
                               {"median_us", p.median_us},
                               {"max_us", p.max_us}})
      ATTNPILOT_CHECK_ARG(std::isfinite(v) && v > 0, "{} = {}: expected a finite time > 0 µs",
                          name(f), v);
    ATTNPILOT_CHECK_ARG(p.min_us <= p.median_us && p.median_us <= p.max_us,
                        "{}: expected min_us <= median_us <= max_us; got {} {} {}",
                        fmt::format("points[{}]", i), p.min_us, p.median_us, p.max_us);
    double& cell = tables_[di][ni][mi][ri];
    ATTNPILOT_CHECK_ARG(std::isnan(cell),
                        "points[{}]: a second {} point for head_dim {}, n_q {}, n_k {}, rank {}", i,
                        kind_name(p.kind), p.head_dim, p.n_q, p.n_k, p.rank);
    cell = p.median_us;
    auto& fl = p.kind == Kind::kDense ? floor_dense_[di] : floor_lowrank_[di];
    fl = std::min(fl, p.median_us);
  }
  for (size_t di = 0; di < o.head_dims.size(); ++di) {
    const auto rs = ranks_for(o.head_dims[di]);
    for (size_t ni = 0; ni < o.query_lengths.size(); ++ni)
      for (size_t mi = 0; mi < o.key_lengths.size(); ++mi) {
        if (o.key_lengths[mi] < o.query_lengths[ni]) continue;
        for (size_t ri = 0; ri <= rs.size(); ++ri)
          ATTNPILOT_CHECK_ARG(!std::isnan(tables_[di][ni][mi][ri]),
                              "points: no {} point for head_dim {}, n_q {}, n_k {}{}",
                              ri == 0 ? "dense" : "lowrank", o.head_dims[di], o.query_lengths[ni],
                              o.key_lengths[mi],
                              ri == 0 ? std::string() : fmt::format(", rank {}", rs[ri - 1]));
      }
  }
}

std::vector<int64_t> CostModel::ranks_for(int64_t head_dim) const {
  std::vector<int64_t> out;
  for (int64_t r : options_.ranks)
    if (r <= head_dim) out.push_back(r);
  return out;
}

double CostModel::interpolate(int64_t head_dim, int64_t rank, double n, double m,
                              bool* outside) const {
  const auto& o = options_;
  const size_t di = index_of(o.head_dims, head_dim);
  TORCH_INTERNAL_ASSERT(di < o.head_dims.size());
  std::vector<double> rank_x;
  for (int64_t r : ranks_for(head_dim)) rank_x.push_back(static_cast<double>(r));
  // Rank and M edges are checked once here: per-row extensions below the row's first
  // valid M stay inside the grid (see the header).
  if (m < o.key_lengths.front() || m > o.key_lengths.back()) *outside = true;
  bool ignored = false;
  std::vector<double> n_x, row_t;
  for (size_t ni = 0; ni < o.query_lengths.size(); ++ni) {
    std::vector<double> m_x, m_t;
    for (size_t mi = 0; mi < o.key_lengths.size(); ++mi) {
      if (o.key_lengths[mi] < o.query_lengths[ni]) continue;
      const auto& cell = tables_[di][ni][mi];
      double t = cell[0];
      if (rank > 0) {
        const std::vector<double> ys(cell.begin() + 1, cell.end());
        t = interp1(rank_x, ys, static_cast<double>(rank), outside);
      }
      m_x.push_back(static_cast<double>(o.key_lengths[mi]));
      m_t.push_back(t);
    }
    n_x.push_back(static_cast<double>(o.query_lengths[ni]));
    row_t.push_back(interp1(m_x, m_t, m, &ignored));
  }
  return interp1(n_x, row_t, n, outside);
}

double CostModel::time_us(const HeadPlan& plan, int64_t n_queries, int64_t n_keys, int64_t head_dim,
                          int64_t heads) const {
  const auto& o = options_;
  ATTNPILOT_CHECK_ARG(index_of(o.head_dims, head_dim) < o.head_dims.size(),
                      "cost model: head_dim {} was not calibrated; calibrated head dims: {}",
                      head_dim, list_str(o.head_dims));
  ATTNPILOT_CHECK_ARG(plan.kind == Kind::kDense || plan.kind == Kind::kLowRank,
                      "cost model: plan kind {} has no calibrated times; calibrated kinds: dense, "
                      "lowrank",
                      kind_name(plan.kind));
  ATTNPILOT_CHECK_ARG(n_queries >= 1, "cost model: n_queries {}; expected >= 1", n_queries);
  ATTNPILOT_CHECK_ARG(n_keys >= n_queries,
                      "cost model: n_keys {} < n_queries {}; causal queries at the end of the keys "
                      "need n_keys >= n_queries",
                      n_keys, n_queries);
  ATTNPILOT_CHECK_ARG(heads >= 1, "cost model: heads {}; expected >= 1", heads);
  int64_t rank = 0;
  if (plan.kind == Kind::kLowRank) {
    rank = plan.rank;
    ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= head_dim,
                        "cost model: low-rank rank {} outside [1, head_dim {}]", rank, head_dim);
    ATTNPILOT_CHECK_ARG(!ranks_for(head_dim).empty(),
                        "cost model: no calibrated rank <= head_dim {} (ranks {})", head_dim,
                        list_str(o.ranks));
  }
  bool outside = false;
  double t = interpolate(head_dim, rank, static_cast<double>(n_queries),
                         static_cast<double>(n_keys), &outside);
  if (outside) extrapolations_->fetch_add(1);
  const size_t di = index_of(o.head_dims, head_dim);
  t = std::max(t, rank == 0 ? floor_dense_[di] : floor_lowrank_[di]);
  return t * static_cast<double>(heads) / static_cast<double>(o.heads);
}

double CostModel::relative_time(const HeadPlan& plan, int64_t n_queries, int64_t n_keys,
                                int64_t head_dim) const {
  const int64_t h = options_.heads;
  return time_us(plan, n_queries, n_keys, head_dim, h) /
         time_us(HeadPlan::dense(), n_queries, n_keys, head_dim, h);
}

json CostModel::to_json() const {
  const auto& o = options_;
  json pts = json::array();
  for (const auto& p : points_)
    pts.push_back({{"kind", kind_name(p.kind)},
                   {"n_q", p.n_q},
                   {"n_k", p.n_k},
                   {"rank", p.rank},
                   {"head_dim", p.head_dim},
                   {"median_us", p.median_us},
                   {"min_us", p.min_us},
                   {"max_us", p.max_us}});
  return json{{"format", kFormat},
              {"version", kVersion},
              {"machine", machine_},
              {"options",
               {{"query_lengths", o.query_lengths},
                {"key_lengths", o.key_lengths},
                {"ranks", o.ranks},
                {"head_dims", o.head_dims},
                {"heads", o.heads},
                {"kv_heads", o.kv_heads},
                {"repeats", o.repeats},
                {"device", o.device.str()},
                {"threads", o.threads},
                {"seed", o.seed}}},
              {"points", pts}};
}

void CostModel::save(const std::filesystem::path& path) const {
  write_file_atomic(path, to_json().dump(1) + "\n");
}

CostModel CostModel::load(const std::filesystem::path& path) {
  const std::string text = read_file(path);
  const std::string where = path.string();
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw FormatError(fmt::format("{}: not valid JSON: {}", where, e.what()));
  }
  try {
    if (!j.is_object())
      throw FormatError(fmt::format("top level: expected an object, got {}", j.type_name()));
    no_unknown_keys(j, {"format", "version", "machine", "options", "points"}, "");
    const auto fmt_name = get_string(field(j, "format", ""), "format");
    if (fmt_name != kFormat)
      throw FormatError(fmt::format("format: '{}', expected '{}'", fmt_name, kFormat));
    const int64_t version = get_int(field(j, "version", ""), "version");
    if (version != kVersion)
      throw FormatError(fmt::format("version: {}, expected {}", version, kVersion));
    const json& machine = field(j, "machine", "");
    if (!machine.is_object())
      throw FormatError(fmt::format("machine: expected an object, got {}", machine.type_name()));

    const json& jo = field(j, "options", "");
    if (!jo.is_object())
      throw FormatError(fmt::format("options: expected an object, got {}", jo.type_name()));
    no_unknown_keys(jo,
                    {"query_lengths", "key_lengths", "ranks", "head_dims", "heads", "kv_heads",
                     "repeats", "device", "threads", "seed"},
                    "options");
    CalibrationOptions o;
    const auto opt = [&](const char* k) -> const json& { return field(jo, k, "options"); };
    o.query_lengths = get_int_list(opt("query_lengths"), "options.query_lengths");
    o.key_lengths = get_int_list(opt("key_lengths"), "options.key_lengths");
    o.ranks = get_int_list(opt("ranks"), "options.ranks");
    o.head_dims = get_int_list(opt("head_dims"), "options.head_dims");
    o.heads = get_int(opt("heads"), "options.heads");
    o.kv_heads = get_int(opt("kv_heads"), "options.kv_heads");
    o.repeats = static_cast<int>(get_int(opt("repeats"), "options.repeats"));
    o.threads = static_cast<int>(get_int(opt("threads"), "options.threads"));
    const json& seed = opt("seed");
    if (!seed.is_number_unsigned())
      throw FormatError(
          fmt::format("options.seed: expected an unsigned integer, got {}", seed.dump()));
    o.seed = seed.get<uint64_t>();
    const std::string dev = get_string(opt("device"), "options.device");
    try {
      o.device = torch::Device(dev);
    } catch (const c10::Error&) {
      throw FormatError(fmt::format("options.device: '{}' is not a device (cpu, cuda:N)", dev));
    }
    try {
      o.validate();
    } catch (const InvalidArgument& e) {
      throw FormatError(fmt::format("options: {}", e.what()));
    }

    const json& jp = field(j, "points", "");
    if (!jp.is_array())
      throw FormatError(fmt::format("points: expected an array, got {}", jp.type_name()));
    std::vector<CostPoint> points;
    for (size_t i = 0; i < jp.size(); ++i) {
      const std::string pw = fmt::format("points[{}]", i);
      const json& e = jp[i];
      if (!e.is_object())
        throw FormatError(fmt::format("{}: expected an object, got {}", pw, e.type_name()));
      no_unknown_keys(
          e, {"kind", "n_q", "n_k", "rank", "head_dim", "median_us", "min_us", "max_us"}, pw);
      CostPoint p;
      const std::string kind = get_string(field(e, "kind", pw), pw + ".kind");
      if (kind == "dense")
        p.kind = Kind::kDense;
      else if (kind == "lowrank")
        p.kind = Kind::kLowRank;
      else
        throw FormatError(fmt::format("{}.kind: '{}', expected dense or lowrank", pw, kind));
      p.n_q = get_int(field(e, "n_q", pw), pw + ".n_q");
      p.n_k = get_int(field(e, "n_k", pw), pw + ".n_k");
      p.rank = get_int(field(e, "rank", pw), pw + ".rank");
      p.head_dim = get_int(field(e, "head_dim", pw), pw + ".head_dim");
      p.median_us = get_number(field(e, "median_us", pw), pw + ".median_us");
      p.min_us = get_number(field(e, "min_us", pw), pw + ".min_us");
      p.max_us = get_number(field(e, "max_us", pw), pw + ".max_us");
      points.push_back(p);
    }
    try {
      return from_points(o, std::move(points), machine);
    } catch (const InvalidArgument& e) {
      throw FormatError(e.what());
    }
  } catch (const FormatError& e) {
    throw FormatError(fmt::format("{}: {}", where, e.what()));
  }
}

}  // namespace attnpilot::attention
