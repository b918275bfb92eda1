// attention_bench: every CPU attention backend against dense, side by side in one run.
//  1. Prefill: L in {512, 1024, 2048, 4096}, head dims {32, 64, 128}, 4 heads, causal.
//     Each backend's median time over repeats, its time ratio against SDPA dense and against
//     the chunked matmul-softmax dense kernel (the like-for-like reference for low-rank
//     scores), and its FLOP ratio against dense (ExecStats.flops(), estimator and
//     projection costs included).
//  2. Decode: one query against a cache of M keys, full key cache vs low-rank key cache
//     (K A_K, r = d/4): time per step and ExecStats bytes.
// Usage: attention_bench [--quick] [--threads N]
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <fmt/format.h>
#include <time.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/kv_cache.h"
#include "attention/lowrank.h"

using namespace attnpilot::attention;
using Clock = std::chrono::steady_clock;

namespace {

/// CPU time of the calling thread in ms: with one intra-op thread this is the compute time,
/// much less disturbed than wall time when other jobs share the machine.
double thread_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Case {
  std::string name;
  HeadPlan plan;
  bool use_sdpa = true;
  bool given_projections = false;
};

std::vector<Case> cases(int64_t d, int64_t len) {
  HeadPlan pooled = HeadPlan::block_sparse(0.25, 64);
  HeadPlan lr_est = pooled;
  lr_est.estimator = BlockEstimator::kLowRank;
  lr_est.rank = d / 4;
  HeadPlan lr_pooled_q = lr_est;
  lr_pooled_q.pool_queries = true;
  HeadPlan vs = pooled;
  vs.estimator = BlockEstimator::kVerticalSlash;
  HeadPlan all = HeadPlan::block_sparse(1.0, 64);
  return {
      {"dense sdpa", HeadPlan::dense(), true},
      {"dense matmul", HeadPlan::dense(), false},
      {"lowrank r=d/4 (given A)", HeadPlan::lowrank(d / 4), true, true},
      {"lowrank r=d/4 (on the fly)", HeadPlan::lowrank(d / 4), true, false},
      {"lowrank r=d (given A)", HeadPlan::lowrank(d), true, true},
      {"sparse all blocks", all},
      {"sparse 25% pooled", pooled},
      {"sparse 25% lowrank-est", lr_est},
      {"sparse 25% lowrank pooled-q", lr_pooled_q},
      {"sparse 25% vert-slash", vs},
      {"streaming 64+L/8", HeadPlan::streaming(len / 8, 64)},
  };
}

void prefill(bool quick) {
  const int64_t heads = 4;
  std::vector<int64_t> lens =
      quick ? std::vector<int64_t>{512, 1024} : std::vector<int64_t>{512, 1024, 2048, 4096};
  std::vector<int64_t> dims = quick ? std::vector<int64_t>{64} : std::vector<int64_t>{32, 64, 128};
  fmt::print("\n== prefill: B=1, H={}, causal, fp32; ratios = backend / reference ==\n", heads);
  fmt::print("{:>5} {:>4}  {:<27} {:>8} {:>7} {:>7} {:>8} {:>7} {:>7} {:>7}\n", "L", "d", "backend",
             "wall ms", "/sdpa", "/matmul", "cpu ms", "/sdpa", "/matmul", "flops");
  for (int64_t len : lens)
    for (int64_t d : dims) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + len + d);
      AttentionInputs in;
      in.q = torch::randn({1, heads, len, d}, gen, torch::kFloat);
      in.k = torch::randn({1, heads, len, d}, gen, torch::kFloat);
      in.v = torch::randn({1, heads, len, d}, gen, torch::kFloat);
      const auto proj = lowrank_projections(in.q, in.k, d);
      const int repeats = len >= 4096 ? 5 : 9;
      // Repeats interleave the backends, so slow phases of a shared machine hit all alike.
      const auto cs = cases(d, len);
      std::vector<AttentionInputs> xs;
      for (const auto& c : cs) {
        AttentionInputs x = in;
        x.use_sdpa = c.use_sdpa;
        if (c.given_projections) {
          x.a_q = proj.a_q;
          x.a_k = proj.a_k;
        }
        xs.push_back(x);
      }
      std::vector<std::vector<double>> ms(cs.size()), cpu(cs.size());
      std::vector<ExecStats> stats(cs.size());
      for (int rep = -1; rep < repeats; ++rep)  // rep -1: warm-up
        for (size_t i = 0; i < cs.size(); ++i) {
          const auto t0 = Clock::now();
          const double c0 = thread_cpu_ms();
          stats[i] = run_attention(xs[i], {LayerPlan::uniform(cs[i].plan)}).stats;
          if (rep >= 0) {
            cpu[i].push_back(thread_cpu_ms() - c0);
            ms[i].push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
          }
        }
      const double t_sdpa = median(ms[0]), t_matmul = median(ms[1]);
      const double c_sdpa = median(cpu[0]), c_matmul = median(cpu[1]);
      const double f_dense = stats[0].flops();
      for (size_t i = 0; i < cs.size(); ++i) {
        const double t = median(ms[i]), c = median(cpu[i]);
        fmt::print(
            "{:>5} {:>4}  {:<27} {:>8.2f} {:>7.3f} {:>7.3f} {:>8.2f} {:>7.3f} {:>7.3f} {:>7.3f}\n",
            len, d, cs[i].name, t, t / t_sdpa, t / t_matmul, c, c / c_sdpa, c / c_matmul,
            stats[i].flops() / f_dense);
      }
      std::fflush(stdout);
    }
}

void decode(bool quick) {
  const int64_t heads = 8, kv_heads = 8, d = 64, r = d / 4, steps = 32;
  fmt::print(
      "\n== decode: B=1, H={}, d={}, one query per step, {} steps; low-rank key cache r={} ==\n",
      heads, d, steps, r);
  fmt::print("{:>6}  {:<24} {:>11} {:>9} {:>11} {:>9} {:>12}\n", "M", "cache", "wall us/step",
             "/full", "cpu us/step", "/full", "bytes ratio");
  for (int64_t m : quick ? std::vector<int64_t>{1024} : std::vector<int64_t>{1024, 4096, 16384}) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(77 + m);
    const auto q = torch::randn({1, heads, m + steps, d}, gen, torch::kFloat);
    const auto k = torch::randn({1, kv_heads, m + steps, d}, gen, torch::kFloat);
    const auto v = torch::randn({1, kv_heads, m + steps, d}, gen, torch::kFloat);
    const auto proj = lowrank_projections(q.narrow(2, 0, m), k.narrow(2, 0, m), r);
    double t_full = 0, c_full = 0, b_full = 0;
    for (bool lowrank : {false, true}) {
      std::vector<double> us, cus;
      double bytes = 0;
      for (int rep = 0; rep < 3; ++rep) {
        KVCache cache(1);
        cache.append(0, k.narrow(2, 0, m), v.narrow(2, 0, m));
        if (lowrank) cache.compress_keys(0, proj.a_q, proj.a_k);
        const auto plan = lowrank ? LayerPlan::uniform(HeadPlan::lowrank(r)) : LayerPlan::dense();
        const auto t0 = Clock::now();
        const double c0 = thread_cpu_ms();
        for (int64_t t = m; t < m + steps; ++t) {
          cache.append(0, k.narrow(2, t, 1), v.narrow(2, t, 1));
          const auto res = run_attention(cache.inputs(0, q.narrow(2, t, 1)), {plan});
          bytes = res.stats.bytes;
        }
        us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / steps);
        cus.push_back((thread_cpu_ms() - c0) * 1e3 / steps);
      }
      const double t = median(us), c = median(cus);
      if (!lowrank) {
        t_full = t;
        c_full = c;
        b_full = bytes;
      }
      fmt::print("{:>6}  {:<24} {:>11.1f} {:>9.3f} {:>11.1f} {:>9.3f} {:>12.3f}\n", m,
                 lowrank ? "low-rank keys (K A_K)" : "full keys (SDPA)", t, t / t_full, c,
                 c / c_full, bytes / b_full);
      std::fflush(stdout);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  at::set_num_threads(1);  // default: one intra-op thread (see thread_cpu_ms)
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      at::set_num_threads(std::atoi(argv[++i]));
    } else {
      fmt::print(stderr, "usage: attention_bench [--quick] [--threads N]\n");
      return 2;
    }
  }
  fmt::print(
      "attention_bench: torch intra-op threads {}; wall and thread-CPU medians; ratios are "
      "backend / reference; flops = ExecStats.flops() / dense SDPA's\n",
      at::get_num_threads());
  prefill(quick);
  decode(quick);
  return 0;
}
