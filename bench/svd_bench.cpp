// svd_bench: the perturbation engine's SVD workloads, medians of repeats, side by side with
// the reference in one run.
//  1. Batches of square (32, 64, 128) and tall (4096×64, 4096×128) matrices: BatchedSvd
//     (automatic backend: torch on CPU; on CUDA our Jacobi kernel / tall QR + Jacobi) vs
//     torch::linalg_svd, full SVD; for the tall ones also the top-8 triplets. On CUDA also
//     side by side: cuSOLVER gesvda (gesvdaStridedBatched, via AᵀA; our wrapper and PyTorch's
//     torch::linalg_svd(driver="gesvda"), the reference) and gesvdjBatched
//     (<= 32×32 only), with ratios other/ours.
//  1b. (CUDA) Accuracy on the same shapes with condition number 1e6 (log-spaced spectrum):
//     max |σ − σ_ref| / σ_max against float64 CPU, and orthogonality of U, for ours and gesvda.
//  2. Per segment of a growing sequence (many heads at once): SubspaceTracker::update with
//     warm starts vs the same update that always recomputes the SVD from scratch.
//  1c. (CUDA) Top-r warm-started update of 1024 cores of 128×128 (fp32, r = 8 and 16, block
//     p = r + 4): subspace iteration from the previous V (step by step, and in the fused
//     kernel) vs a full gesvda and our full kernel.
//     (Printed before section 2, whose CUDA tracker runs are the slowest part of the bench.)
// Usage: svd_bench [--device cpu|cuda] [--full] [--repeats N] [--threads N] [--no-tracking]
//                  [--only square|tall|topr]
//   Without --full on CPU the batch counts are scaled down (64 square, 8 tall, 64 heads) so it
//   finishes in about a minute on 2 cores; --full uses the GPU sizes (1024 square, 256 tall).
#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <utility>
#include <vector>

#include "perturbation/batched_svd.h"
#include "perturbation/tracker.h"
#ifdef ATTNPILOT_WITH_CUDA
#include "perturbation/cuda/jacobi_svd.h"
#endif

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
  bool full = false, no_tracking = false;
  int repeats = 5, threads = 1;
  app.add_option("--device", device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_flag("--full", full, "GPU batch sizes (1024 square, 256 tall, 1024 heads)");
  app.add_flag("--no-tracking", no_tracking, "skip section 2 (the slowest part on the GPU)");
  std::string only;
  app.add_option("--only", only,
                 "one part: square (section 1's square rows), tall (its 4096x64 rows, no 1b), "
                 "topr (section 1c); implies --no-tracking")
      ->check(CLI::IsMember({"square", "tall", "topr"}));
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

  const bool cuda = dev.is_cuda();
  std::cout << "1. batched SVD, fp32, median ms (ours = BatchedSvd's automatic backend)\n";
  std::cout
      << "shape            batch  rank  backend                   ours_ms   torch_ms  "
         "torch/ours  gesvda_ms gesvda/ours torch_gesvda_ms tgesvda/ours gesvdjB_ms gesvdjB/ours\n";
  struct Shape {
    int64_t m, n, batch, rank;
  };
  std::vector<Shape> shapes = {
      {32, 32, n_square, 0}, {64, 64, n_square, 0},  {128, 128, n_square, 0}, {4096, 64, n_tall, 0},
      {4096, 64, n_tall, 8}, {4096, 128, n_tall, 0}, {4096, 128, n_tall, 8}};
  if (!only.empty()) no_tracking = true;
  if (only == "topr") shapes.clear();
  if (only == "square" || only == "tall")
    shapes.erase(std::remove_if(shapes.begin(), shapes.end(),
                                [&](const Shape& s) {
                                  return (s.m == s.n) != (only == "square") ||
                                         (only == "tall" && s.n != 64);
                                }),
                 shapes.end());
  auto fmt_ms = [](double t) {
    return t > 0 ? fmt::format("{:.3f}", t * 1e3) : std::string("n/a");
  };
  auto fmt_ratio = [](double t, double ours) {
    return t > 0 ? fmt::format("{:.2f}", t / ours) : std::string("n/a");
  };
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
    double gesvda = 0, torch_gesvda = 0, gesvdj_batched = 0;
    if (cuda) {
      // PyTorch's own gesvda call (the reference column), beside our wrapper of it.
      torch_gesvda = time_it(dev, repeats, [&] {
        auto r = torch::linalg_svd(a, false, c10::string_view("gesvda"));
        (void)r;
      });
      SvdOptions go = o;
      go.backend = SvdBackend::kCusolverApprox;
      BatchedSvd g(go);
      gesvda = time_it(dev, repeats, [&] { (void)g(a); });
      if (s.m <= 32 && s.n <= 32) {
        SvdOptions jo = o;
        jo.backend = SvdBackend::kCusolverBatchedJacobi;
        BatchedSvd j(jo);
        gesvdj_batched = time_it(dev, repeats, [&] { (void)j(a); });
      }
    }
    std::cout << fmt::format(
        "{:>5}x{:<5}      {:>5}  {:>4}  {:<24} {:>9.3f} {:>10.3f} {:>10.2f} {:>10} {:>11} {:>15} "
        "{:>12} {:>10} {:>12}\n",
        s.m, s.n, s.batch, s.rank == 0 ? std::string("all") : std::to_string(s.rank),
        to_string(used), ours * 1e3, ref * 1e3, ref / ours, fmt_ms(gesvda), fmt_ratio(gesvda, ours),
        fmt_ms(torch_gesvda), fmt_ratio(torch_gesvda, ours), fmt_ms(gesvdj_batched),
        fmt_ratio(gesvdj_batched, ours));
#ifdef ATTNPILOT_WITH_CUDA
    if (cuda && s.m == 4096 && s.n == 64 && s.rank == 0) {
      // Where the tall path's time goes (each stage alone, same inputs, median ms), beside the
      // cuBLAS float64 route it replaced (a float64 copy of X, then DGEMMs on it).
      const auto o64 = a.options().dtype(torch::kFloat64);
      auto x64 = a.to(torch::kFloat64);
      auto eye = torch::eye(s.n, o64).expand({s.batch, s.n, s.n}).contiguous();
      auto g1 = cuda::tall_gram(a);
      auto l1 = std::get<0>(torch::linalg_cholesky_ex(g1, false, false));
      auto r1inv = torch::linalg_solve_triangular(l1.transpose(1, 2), eye, true, true, false);
      auto q1 = torch::empty_like(a);
      const double t_cast = time_it(dev, repeats, [&] { (void)a.to(torch::kFloat64); });
      const double t_dgram =
          time_it(dev, repeats, [&] { (void)torch::bmm(x64.transpose(1, 2), x64); });
      const double t_dapply = time_it(dev, repeats, [&] { (void)torch::bmm(x64, r1inv); });
      const double t_gram = time_it(dev, repeats, [&] { (void)cuda::tall_gram(a); });
      const double t_chol =
          time_it(dev, repeats, [&] { (void)torch::linalg_cholesky_ex(g1, false, false); });
      const double t_trsm = time_it(dev, repeats, [&] {
        (void)torch::linalg_solve_triangular(l1.transpose(1, 2), eye, true, true, false);
      });
      const double t_apply = time_it(dev, repeats, [&] { cuda::tall_product_out(a, r1inv, q1); });
      cuda::TallQr qr;
      const double t_qr2 = time_it(
          dev, repeats, [&] { qr = cuda::tall_cholesky_qr2(a, cuda::TallPasses::kKernels); });
      const double t_qr2_cublas = time_it(dev, repeats, [&] { (void)cuda::tall_cholesky_qr2(a); });
      cuda::JacobiOptions jk;
      jk.tall_passes = cuda::TallPasses::kKernels;
      const double t_whole_kernels =
          time_it(dev, repeats, [&] { (void)cuda::tall_qr_jacobi_svd(a, jk); });
      auto rt = qr.r.to(torch::kFloat32).contiguous();
      const double t_jac = time_it(dev, repeats, [&] { (void)cuda::jacobi_svd(rt, {}); });
      auto ur = cuda::jacobi_svd(rt, {}).u.to(torch::kFloat64);
      auto uo = torch::empty_like(a);
      const double t_u = time_it(
          dev, repeats, [&] { cuda::tall_product_out(qr.q1, torch::bmm(qr.r2inv, ur), uo); });
      std::cout << fmt::format(
          "    tall path stages through the pass kernels (ms): Gram kernel {:.3f}, Cholesky "
          "{:.3f}, triangular inverse "
          "{:.3f}, X·R⁻¹ kernel {:.3f}; whole Cholesky-QR2 {:.3f}; Jacobi on R {:.3f}; U = "
          "Q₁·(R₂⁻¹U_R) kernel {:.3f}\n"
          "    cuBLAS float64 route (the default) (ms): to float64 {:.3f}, DGEMM Gram {:.3f}, "
          "DGEMM X·R⁻¹ {:.3f}; whole Cholesky-QR2 {:.3f}\n"
          "    whole SVD through the pass kernels: {:.3f} ms ({:.2f}x the default's)\n",
          t_gram * 1e3, t_chol * 1e3, t_trsm * 1e3, t_apply * 1e3, t_qr2 * 1e3, t_jac * 1e3,
          t_u * 1e3, t_cast * 1e3, t_dgram * 1e3, t_dapply * 1e3, t_qr2_cublas * 1e3,
          t_whole_kernels * 1e3, t_whole_kernels / ours);
      // The one-pass shortcut holds where ‖R₁‖_F‖R₁⁻¹‖_F <= cuda::kTallOnePassBound only (these
      // Gaussian matrices have κ ≈ 1.3); at κ = 1e6 every matrix takes the second pass: the
      // worst case, beside gesvda on the same matrices.
      auto qu = std::get<0>(torch::linalg_qr(torch::randn({s.batch, s.m, s.n}, opt)));
      auto qv = std::get<0>(torch::linalg_qr(torch::randn({s.batch, s.n, s.n}, opt)));
      auto sv = torch::pow(10.0, torch::linspace(0, -6, s.n, opt)).expand({s.batch, s.n});
      auto ill = torch::matmul(qu * sv.unsqueeze(-2), qv.transpose(-1, -2)).contiguous();
      const double t_ill = time_it(dev, repeats, [&] { (void)svd(ill); });
      const double t_ill_gesvda = time_it(dev, repeats, [&] {
        auto r = torch::linalg_svd(ill, false, c10::string_view("gesvda"));
        (void)r;
      });
      std::cout << fmt::format(
          "    κ = 1e6 (no one-pass shortcut, every matrix takes the second pass): ours {:.3f} ms, "
          "gesvda {:.3f} ms ({:.2f}x)\n",
          t_ill * 1e3, t_ill_gesvda * 1e3, t_ill_gesvda / t_ill);
    }
#endif
#ifdef ATTNPILOT_WITH_CUDA
    if (cuda && s.m == s.n && s.m > 64) {  // the layout choice, measured in the same run
      cuda::JacobiOptions j4;
      j4.lanes = 4;
      const double t4 = time_it(dev, repeats, [&] { (void)cuda::jacobi_svd(a, j4); });
      std::cout << fmt::format(
          "    the same kernel with 4 lanes per column pair: {:.3f} ms, {:.2f}x ours\n", t4 * 1e3,
          t4 / ours);
    }
    if (cuda && s.m == s.n) {  // scaled rotations (JacobiOptions::scaled_rotations)
      cuda::JacobiOptions js;
      js.scaled_rotations = true;
      const double ts = time_it(dev, repeats, [&] { (void)cuda::jacobi_svd(a, js); });
      const double tg = time_it(dev, repeats, [&] {
        auto r = torch::linalg_svd(a, false, c10::string_view("gesvda"));
        (void)r;
      });
      std::cout << fmt::format(
          "    the same kernel with scaled rotations: {:.3f} ms, {:.2f}x ours; gesvda again "
          "{:.3f} ms, {:.2f}x scaled\n",
          ts * 1e3, ts / ours, tg * 1e3, tg / ts);
    }
#endif
  }

  if (cuda && only.empty()) {
    std::cout << "\n1b. accuracy, fp32, condition number 1e6 (σ log-spaced over 6 decades), 16 "
                 "matrices per shape, vs float64 CPU: max |σ - σ_ref| / σ_max and max |UᵀU - I|\n";
    std::cout << "shape          ours_sigma_err  ours_orth_U  gesvda_sigma_err  gesvda_orth_U\n";
    auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
    for (auto [m, n] : std::vector<std::pair<int64_t, int64_t>>{
             {32, 32}, {64, 64}, {128, 128}, {4096, 64}, {4096, 128}}) {
      const int64_t b = 16, k = std::min(m, n);
      auto u = std::get<0>(torch::linalg_qr(torch::randn({b, m, k}, o64)));
      auto v = std::get<0>(torch::linalg_qr(torch::randn({b, n, k}, o64)));
      auto sig = torch::pow(10.0, torch::linspace(0, -6, k, o64)).unsqueeze(0).expand({b, k});
      auto a32 = torch::matmul(u * sig.unsqueeze(-2), v.transpose(-1, -2)).to(torch::kFloat32);
      auto sref = torch::linalg_svdvals(a32.to(torch::kFloat64));
      auto ad = a32.to(dev);
      auto errs = [&](const SvdResult& r) {
        auto s = r.s.to(torch::kFloat64).cpu(), uu = r.u.to(torch::kFloat64).cpu();
        const double se = ((s - sref).abs().amax(-1) / sref.select(-1, 0)).max().item<double>();
        const double oe = (torch::matmul(uu.transpose(-1, -2), uu) - torch::eye(k, o64))
                              .abs()
                              .max()
                              .item<double>();
        return std::pair<double, double>{se, oe};
      };
      auto [se, oe] = errs(batched_svd(ad));
      SvdOptions go;
      go.backend = SvdBackend::kCusolverApprox;
      auto [ge, go_e] = errs(batched_svd(ad, go));
      std::cout << fmt::format("{:>5}x{:<5}    {:>14.2e} {:>12.2e} {:>17.2e} {:>14.2e}\n", m, n, se,
                               oe, ge, go_e);
    }
  }

#ifdef ATTNPILOT_WITH_CUDA
  if (cuda && (only.empty() || only == "topr")) {
    std::cout << "\n1c. top-r warm-started update, 1024 cores 128x128 fp32 (σ_i = 0.8^i, the new "
                 "core = old + 1e-3 noise), tol 1e-5·σ₁, median ms\n";
    std::cout << "r   p   topr_ms  gesvda_full_ms  gesvda/topr  ours_full_ms  ours/topr  "
                 "iters_mean  iters_max  converged  fused_kernel_ms  fused/topr\n";
    const int64_t b = 1024, d = 128;
    auto u0 = std::get<0>(torch::linalg_qr(torch::randn({b, d, d}, opt)));
    auto v0f = std::get<0>(torch::linalg_qr(torch::randn({b, d, d}, opt)));
    auto sig = torch::pow(0.8, torch::arange(d, opt)).unsqueeze(0).expand({b, d});
    auto c0 = torch::matmul(u0 * sig.unsqueeze(-2), v0f.transpose(-1, -2));
    auto c1 = c0 + 1e-3 * torch::randn({b, d, d}, opt) / std::sqrt(static_cast<double>(d));
    auto prev = batched_svd(c0);  // the previous segment's factors (our kernel)
    SvdOptions go;
    go.backend = SvdBackend::kCusolverApprox;
    BatchedSvd gesvda(go), ours_full{SvdOptions{}};
    const double tg = time_it(dev, repeats, [&] { (void)gesvda(c1); });
    const double to = time_it(dev, repeats, [&] { (void)ours_full(c1); });
    // r = 16 with wider blocks too: σ_{p+1}/σ_r bounds each step's error reduction (0.8^(p+1-r)
    // here), so a wider block may save a step for what it adds to each.
    for (const auto& rp : std::vector<std::pair<int64_t, int64_t>>{
             {8, 12}, {16, 20}, {16, 24}, {16, 28}, {16, 32}}) {
      const int64_t r = rp.first, p = rp.second;
      auto v0 = prev.v.narrow(2, 0, p).contiguous();
      cuda::TopRResult res;
      const double tt =
          time_it(dev, repeats, [&] { res = cuda::topr_subspace_iteration(c1, v0, r, 1e-5, 20); });
      // The same iteration in the fused kernel (one block per matrix runs every step).
      const double ts = time_it(dev, repeats, [&] {
        (void)cuda::topr_subspace_iteration(c1, v0, r, 1e-5, 20, /*fused=*/true);
      });
      auto it = res.iterations.to(torch::kFloat64);
      std::cout << fmt::format(
          "{:<3} {:<3} {:>8.3f} {:>15.3f} {:>12.2f} {:>13.3f} {:>10.2f} {:>11.2f} "
          "{:>10} {:>10} {:>16.3f} {:>11.2f}\n",
          r, p, tt * 1e3, tg * 1e3, tg / tt, to * 1e3, to / tt, it.mean().item<double>(),
          it.max().item<double>(), res.converged.sum().item<int64_t>(), ts * 1e3, ts / tt);
      if (r != 8) continue;
      // Where one step's time goes (each operation alone on the whole batch, median ms).
      auto cv = torch::bmm(c1, v0);
      auto uy = cuda::jacobi_svd(cv, {}).u;
      auto ctu = torch::bmm(c1.transpose(1, 2), uy);
      auto z = cuda::jacobi_svd(ctu, {});
      const double t_cv = time_it(dev, repeats, [&] { (void)torch::bmm(c1, v0); });
      const double t_j1 = time_it(dev, repeats, [&] { (void)cuda::jacobi_svd(cv, {}); });
      const double t_ctu = time_it(dev, repeats, [&] { (void)torch::bmm(c1.transpose(1, 2), uy); });
      const double t_j2 = time_it(dev, repeats, [&] { (void)cuda::jacobi_svd(ctu, {}); });
      const double t_rot = time_it(dev, repeats, [&] { (void)torch::bmm(uy, z.v); });
      // The stopping test as the step runs it: Ritz triplets, C·V of the new V given (it is
      // the next step's product).
      const auto u1 = torch::bmm(uy, z.v), cv1 = torch::bmm(c1, z.u);
      const double t_res = time_it(
          dev, repeats, [&] { (void)triplet_residual(c1, u1, z.s, z.u, r, cv1, /*ritz=*/true); });
      const double t_step =
          time_it(dev, repeats, [&] { (void)cuda::subspace_iteration_step_cuda(c1, v0); });
      std::cout << fmt::format(
          "    one step at r = 8 (ms): C·V {:.3f}, Jacobi on C·V ({}x{}) {:.3f}, Cᵀ·U {:.3f}, "
          "Jacobi on Cᵀ·U {:.3f}, U·Q {:.3f}, residual {:.3f}; whole checked step {:.3f}\n",
          t_cv * 1e3, d, p, t_j1 * 1e3, t_ctu * 1e3, t_j2 * 1e3, t_rot * 1e3, t_res * 1e3,
          t_step * 1e3);
    }
  }
#endif
  if (no_tracking) return 0;
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
