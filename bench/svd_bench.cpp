// svd_bench: the perturbation engine's SVD workloads, medians of repeats, side by side with
// the reference in one run.
//  1. Batches of square (32, 64, 128) and tall (4096×64, 4096×128) matrices: BatchedSvd
//     (automatic backend: torch on CPU, cuSOLVER on CUDA) vs torch::linalg_svd, full SVD;
//     for the tall ones also the top-8 triplets (gesvda on CUDA).
//  2. Per segment of a growing sequence (many heads at once): SubspaceTracker::update with
//     warm starts vs the same update that always recomputes the SVD from scratch.
// Usage: svd_bench [--device cpu|cuda] [--full] [--repeats N] [--threads N]
//   Without --full on CPU the batch counts are scaled down (64 square, 8 tall, 64 heads) so it
//   finishes in about a minute on 2 cores; --full uses the GPU sizes (1024 square, 256 tall).
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <vector>

#include "perturbation/batched_svd.h"
#include "perturbation/tracker.h"

using namespace attnpilot::perturbation;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void sync(const torch::Device& dev) {
  if (dev.is_cuda()) torch::cuda::synchronize(dev.index());
}

// Median seconds of fn over `repeats` runs after one warm-up.
double time_it(const torch::Device& dev, int repeats, const std::function<void()>& fn) {
  fn();
  sync(dev);
  std::vector<double> t;
  for (int i = 0; i < repeats; ++i) {
    auto t0 = Clock::now();
    fn();
    sync(dev);
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return median(t);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"svd_bench: BatchedSvd and SubspaceTracker vs torch::linalg_svd / recomputation"};
  std::string device = "cpu";
  bool full = false;
  int repeats = 5, threads = 1;
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--full", full, "GPU batch sizes (1024 square, 256 tall, 1024 heads)");
  app.add_option("--repeats", repeats, "timed repeats (median reported)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "CPU threads for LibTorch")->check(CLI::Range(1, 256));
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(threads);
  if (device == "cuda" && !torch::cuda::is_available()) {
    std::cerr << "svd_bench: --device cuda but no CUDA device is available\n";
    return 2;
  }
  const torch::Device dev(device == "cuda" ? torch::kCUDA : torch::kCPU);
  const int64_t n_square = full ? 1024 : 64, n_tall = full ? 256 : 8, heads = full ? 1024 : 64;
  std::cout << "svd_bench device=" << device << " threads=" << threads << " repeats=" << repeats
            << (full ? " (full sizes)" : " (scaled-down sizes)") << "\n\n";
  auto opt = torch::TensorOptions().dtype(torch::kFloat32).device(dev);
  torch::manual_seed(0);

  std::cout << "1. batched SVD, fp32, median ms\n";
  std::cout << "shape            batch  rank  backend                   ours_ms   torch_ms  "
               "torch/ours\n";
  struct Shape {
    int64_t m, n, batch, rank;
  };
  std::vector<Shape> shapes = {
      {32, 32, n_square, 0}, {64, 64, n_square, 0},  {128, 128, n_square, 0}, {4096, 64, n_tall, 0},
      {4096, 64, n_tall, 8}, {4096, 128, n_tall, 0}, {4096, 128, n_tall, 8}};
  for (const auto& s : shapes) {
    auto a = torch::randn({s.batch, s.m, s.n}, opt);
    SvdOptions o;
    o.rank = s.rank;
    BatchedSvd svd(o);
    SvdBackend used = SvdBackend::kTorch;
    const double ours = time_it(dev, repeats, [&] { used = svd(a).backend; });
    const double ref = time_it(dev, repeats, [&] {
      auto r = torch::linalg_svd(a, false, c10::nullopt);
      (void)r;
    });
    std::cout << fmt::format("{:>5}x{:<5}      {:>5}  {:>4}  {:<24} {:>9.3f} {:>10.3f} {:>10.2f}\n",
                             s.m, s.n, s.batch,
                             s.rank == 0 ? std::string("all") : std::to_string(s.rank),
                             to_string(used), ours * 1e3, ref * 1e3, ref / ours);
  }

  std::cout << "\n2. incremental tracking per segment (" << heads
            << " heads, T=128 rows per segment, rank 8, 8 segments), median ms per update\n";
  std::cout << "d     warm_ms   recompute_ms  recompute/warm  warm_updates  recomputations  "
               "iterations\n";
  for (int64_t d : {64, 128}) {
    // Low-rank-plus-noise heads, as in attention: a shared 12-dim structure with decay.
    auto decay = torch::pow(0.8, torch::arange(12, opt)).view({1, 12, 1});
    auto basis = torch::randn({heads, 12, d}, opt) * decay;
    std::vector<std::pair<torch::Tensor, torch::Tensor>> segs;
    for (int i = 0; i < 9; ++i) {
      auto q = torch::matmul(torch::randn({heads, 128, 12}, opt), basis) +
               0.05 * torch::randn({heads, 128, d}, opt);
      auto k = torch::matmul(torch::randn({heads, 128, 12}, opt), basis) +
               0.05 * torch::randn({heads, 128, d}, opt);
      segs.emplace_back(q, k);
    }
    TrackerOptions warm_o;
    warm_o.rank = 8;
    TrackerOptions re_o = warm_o;
    re_o.max_sin_theta = 1e-300;  // the gate never passes: every update is a full SVD
    std::vector<double> tw, tr;
    SubspaceTracker warm(d, warm_o), re(d, re_o);
    warm.update(segs[0].first, segs[0].second);
    re.update(segs[0].first, segs[0].second);
    for (int i = 1; i < 9; ++i) {
      sync(dev);
      auto t0 = Clock::now();
      warm.update(segs[i].first, segs[i].second);
      sync(dev);
      tw.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
      t0 = Clock::now();
      re.update(segs[i].first, segs[i].second);
      sync(dev);
      tr.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    const double w = median(tw), r = median(tr);
    std::cout << fmt::format("{:<5} {:>8.3f} {:>13.3f} {:>15.2f} {:>13} {:>15} {:>11}\n", d,
                             w * 1e3, r * 1e3, r / w, warm.stats().warm,
                             warm.stats().recomputations, warm.stats().iterations);
  }
  return 0;
}
