/// The Jacobi SVD kernels' block-level device code (perturbation/cuda/jacobi_sweeps.cuh) run on
/// the CPU through the CUDA emulation in tests/cuda_emu: the same source as on the GPU, every
/// layout (4 or 8 lanes per column pair, with and without tracked norms, float and double),
/// against LibTorch's float64 SVD. Runs everywhere, CI included; the GPU tests
/// (jacobi_svd_cuda_test.cpp) check the compiled kernels on the device.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "perturbation/tracker.h"

// After LibTorch and GoogleTest: the emulation defines CUDA's keywords as macros.
#include "tests/cuda_emu/cuda_emu.h"
// clang-format off (the emulation must come first)
#include "perturbation/cuda/jacobi_sweeps.cuh"
#include "perturbation/cuda/tall_blocks.cuh"
#include "perturbation/cuda/topr_block.cuh"
// clang-format on

namespace {

namespace jac = attnpilot::perturbation::cuda::jacobi;
namespace emu = attnpilot::cuda_emu;

struct Svd {
  torch::Tensor u, s, v;  // float64: [m, n], [n], [n, n], σ descending
  bool converged = false;
};

/// One emulated thread block doing what jacobi_svd_kernel does for X (m×n, m >= n): X and
/// V = I into "shared memory", power-of-two scaling, sweeps, σ and their order.
template <typename T, int LANES, int TM, bool TRACK, bool FULL = false, bool SCALED = false>
Svd emulated_svd(const torch::Tensor& x64, int max_sweeps = 100, bool lapack_stop = true,
                 double scale_floor = jac::kScaleFloor) {
  const int m = static_cast<int>(x64.size(0)), n = static_cast<int>(x64.size(1));
  const int npad = jac::next_pow2(n < 2 ? 2 : n);
  const int lda = jac::leading_dim(m, sizeof(T), LANES),
            ldv = jac::leading_dim(n, sizeof(T), LANES);
  std::vector<T> a(static_cast<size_t>(npad) * lda, T(0)), v(static_cast<size_t>(npad) * ldv, T(0));
  const auto xc = x64.contiguous();
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) a[j * lda + i] = static_cast<T>(xc[i][j].item<double>());
    v[j * ldv + j] = T(1);
  }
  std::vector<double> sig(npad);
  std::vector<int> order(npad);
  std::vector<T> nrm(npad);
  std::vector<double> dsc(2 * static_cast<size_t>(npad));
  int rotated[jac::kSweepSharedInts] = {};
  unsigned long long max_bits = 0;
  bool converged = false;
  int expo = 0;
  const T tol =
      static_cast<T>(std::sqrt(static_cast<double>(m)) * std::numeric_limits<T>::epsilon());
  const int threads = std::max(32, LANES * npad / 2);
  emu::run_block(threads, [&] {
    double local_max = 0;
    for (int idx = threadIdx.x; idx < npad * lda; idx += blockDim.x)
      local_max = std::max(local_max, std::fabs(static_cast<double>(a[idx])));
    if (threadIdx.x == 0) max_bits = 0;
    __syncthreads();
    const int e = jac::scale_pow2(a.data(), npad * lda, local_max, &max_bits);
    const bool c = jac::sweeps<T, LANES, TM, TM, TRACK, FULL, SCALED>(
        a.data(), lda, v.data(), ldv, m, n, npad, tol, max_sweeps, rotated, nrm.data(), lapack_stop,
        dsc.data(), scale_floor);
    jac::column_order(a.data(), lda, m, npad, sig.data(), order.data());
    if (threadIdx.x == 0) {
      converged = c;
      expo = e;
    }
  });
  Svd out;
  out.converged = converged;
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  out.u = torch::zeros({m, n}, o64);
  out.v = torch::zeros({n, n}, o64);
  out.s = torch::zeros({n}, o64);
  for (int r = 0; r < n; ++r) {
    const int j = order[r];
    out.s[r] = std::ldexp(sig[j], expo);
    for (int i = 0; i < m; ++i) out.u[i][r] = static_cast<double>(a[j * lda + i]) / sig[j];
    for (int i = 0; i < n; ++i) out.v[i][r] = static_cast<double>(v[j * ldv + i]);
  }
  return out;
}

torch::Tensor matrix_with_spectrum(int64_t m, int64_t n, const torch::Tensor& sigma,
                                   uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto u = std::get<0>(torch::linalg_qr(torch::randn({m, n}, gen, o64)));
  auto v = std::get<0>(torch::linalg_qr(torch::randn({n, n}, gen, o64)));
  return torch::matmul(u * sigma.unsqueeze(0), v.t());
}

template <typename T, int LANES, int TM, bool TRACK, bool FULL = false, bool SCALED = false>
void expect_accurate(const torch::Tensor& x, double tol, const std::string& what,
                     double scale_floor = jac::kScaleFloor) {
  const Svd r = emulated_svd<T, LANES, TM, TRACK, FULL, SCALED>(x, 100, true, scale_floor);
  const std::string w = what + " lanes " + std::to_string(LANES) + (TRACK ? " tracked" : "") +
                        (FULL ? " full tiles" : "") + (SCALED ? " scaled" : "");
  EXPECT_TRUE(r.converged) << w;
  const auto ref = torch::linalg_svdvals(x);
  const double smax = ref[0].item<double>();
  const int64_t n = x.size(1);
  const auto eye = torch::eye(n, torch::kFloat64);
  EXPECT_LE((r.s - ref).abs().max().item<double>() / smax, tol) << w << ": σ";
  EXPECT_TRUE((r.s.diff() <= 0).all().item<bool>()) << w << ": σ not descending";
  EXPECT_LE((torch::matmul(r.u.t(), r.u) - eye).abs().max().item<double>(), tol) << w << ": U";
  EXPECT_LE((torch::matmul(r.v.t(), r.v) - eye).abs().max().item<double>(), tol) << w << ": V";
  const auto rec = torch::matmul(r.u * r.s.unsqueeze(0), r.v.t());
  EXPECT_LE(((rec - x).norm() / x.norm()).item<double>(), tol) << w << ": reconstruction";
  if (std::getenv("JACOBI_PRINT"))
    std::cout << w << " sigma " << (r.s - ref).abs().max().item<double>() / smax << " U "
              << (torch::matmul(r.u.t(), r.u) - eye).abs().max().item<double>() << " V "
              << (torch::matmul(r.v.t(), r.v) - eye).abs().max().item<double>() << " rec "
              << ((rec - x).norm() / x.norm()).item<double>() << "\n";
}

TEST(JacobiEmulated, EveryLayoutMatchesFloat64) {
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto gauss = [&](int64_t m, int64_t n, uint64_t seed) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    return torch::randn({m, n}, gen, o64);
  };
  const auto graded = matrix_with_spectrum(32, 32, torch::logspace(0, -6, 32, 10, o64), 5);
  const auto clustered = matrix_with_spectrum(
      24, 16, torch::cat({torch::ones({8}, o64), 1e-3 * torch::ones({8}, o64)}), 6);
  // float, 8 lanes (32-row tiles), exact and tracked norms.
  for (const auto& [x, name] :
       std::vector<std::pair<torch::Tensor, std::string>>{{gauss(32, 32, 1), "32x32"},
                                                          {gauss(20, 13, 2), "20x13"},
                                                          {graded, "32x32 cond 1e6"},
                                                          {clustered, "24x16 clustered"}}) {
    expect_accurate<float, 8, 1, false>(x, 1e-5, name);
    expect_accurate<float, 8, 1, true>(x, 1e-5, name);
    expect_accurate<float, 4, 2, false>(x, 1e-5, name);               // 16-row tiles
    expect_accurate<float, 8, 1, false, false, true>(x, 1e-5, name);  // scaled rotations
    // Scales folded into the columns after almost every rotation (a floor of 0.99 instead of
    // 2^-20): the fold paths of the fixed and the moving column.
    expect_accurate<float, 8, 1, false, false, true>(x, 1e-5, name + " folding", 0.99);
  }
  // Taller blocks: two and four 32-row tiles, the top-r path's shape class.
  expect_accurate<float, 8, 2, true>(gauss(64, 12, 3), 1e-5, "64x12");
  expect_accurate<float, 8, 4, true>(gauss(100, 9, 4), 1e-5, "100x9");
  expect_accurate<float, 8, 4, false>(gauss(100, 9, 4), 1e-5, "100x9");
  // double.
  expect_accurate<double, 8, 1, false>(gauss(24, 24, 7), 1e-12, "24x24");
  expect_accurate<double, 8, 1, true>(gauss(24, 24, 7), 1e-12, "24x24");
  expect_accurate<double, 8, 1, false, false, true>(gauss(24, 24, 7), 1e-12, "24x24");
}

// Full tiles (no bounds tests in the tile loops; the kernel launched at 128×128): 128×128, the
// largest shape, where the rotations' rounding accumulates most; 64×64 at condition number 1e6
// (20 sweeps; 128×128 would take 17 s here); 40×36, whose last tiles are partly zero padding.
// Scaled rotations (opt-in) at 64×64 only. JACOBI_PRINT=1 prints each case's errors.
TEST(JacobiEmulated, FullTilesMatchFloat64) {
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto g128 = torch::randn({128, 128}, gen, o64);
  const auto c64 = matrix_with_spectrum(64, 64, torch::logspace(0, -6, 64, 10, o64), 8);
  expect_accurate<float, 8, 4, false, true>(g128, 1e-5, "128x128");
  expect_accurate<float, 8, 2, false, true>(c64, 1e-5, "64x64 cond 1e6");
  expect_accurate<float, 8, 2, false, true, true>(c64, 1e-5, "64x64 cond 1e6");
  expect_accurate<float, 8, 2, false, true>(torch::randn({40, 36}, gen, o64), 1e-5, "40x36");
}

// LAPACK's stopping test (sweeps(..., lapack_stop = true), the default) against stopping only
// after a sweep that rotates nothing. (a) A matrix whose columns are orthogonal but for one pair
// with |cos| = 3·tol: one sweep rotates that pair by a negligible angle, and LAPACK's test stops
// there, where the other rule needs a second, confirming sweep. (b) Random spectra: never more
// sweeps, and the same accuracy (a numpy model of the ordering at 128×128 saves 0.4 sweeps of
// 8.5 on average for Gaussian matrices; at 32×32 fewer matrices show a saving).
TEST(JacobiEmulated, LapackStoppingTestSavesTheConfirmingSweep) {
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto converges = [](const torch::Tensor& x, int s, bool lapack) {
    return emulated_svd<float, 8, 1, false>(x, s, lapack).converged;
  };
  const double tol = std::sqrt(32.0) * std::numeric_limits<float>::epsilon();
  auto qgen = at::make_generator<at::CPUGeneratorImpl>(40);
  // Orthogonal columns of norms 2, 1, 0.9 ... 0.1 (well separated: the rotation's angle is
  // about |cos|·σ₀σ₁/(σ₀² − σ₁²), as small as the |cos| itself).
  const auto norms =
      torch::cat({torch::tensor({2.0, 1.0}, o64), torch::linspace(0.9, 0.1, 30, o64)});
  auto x = std::get<0>(torch::linalg_qr(torch::randn({32, 32}, qgen, o64))) * norms.unsqueeze(0);
  x.select(1, 1).add_(3 * tol * x.select(1, 0) * (x.select(1, 1).norm() / x.select(1, 0).norm()));
  EXPECT_TRUE(converges(x, 1, true)) << "LAPACK's test should stop after one sweep";
  EXPECT_FALSE(converges(x, 1, false)) << "one sweep rotated: the plain rule needs a second";
  EXPECT_TRUE(converges(x, 2, false));

  std::vector<std::pair<torch::Tensor, std::string>> cases;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(30);
  cases.push_back({torch::randn({32, 32}, gen, o64), "gauss"});
  cases.push_back(
      {matrix_with_spectrum(32, 32, torch::logspace(0, -6, 32, 10, o64), 35), "cond 1e6"});
  cases.push_back(
      {matrix_with_spectrum(32, 32, 1 + 1e-3 * torch::randn({32}, o64), 36), "clustered"});
  for (const auto& [xc, name] : cases) {
    int b = 1;  // the fewest sweeps without LAPACK's test, counting up
    while (b < 41 && !converges(xc, b, false)) ++b;
    EXPECT_LE(b, 40) << name;
    EXPECT_TRUE(converges(xc, b, true)) << name << ": more sweeps with LAPACK's test";
    expect_accurate<float, 8, 1, false>(xc, 1e-5, name);
  }
}

TEST(JacobiEmulated, SweepLimitIsReported) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
  const auto x = torch::randn({32, 32}, gen, torch::TensorOptions().dtype(torch::kFloat64));
  EXPECT_FALSE((emulated_svd<float, 8, 1, false>(x, 1).converged));
}

/// The batched kernel's whole block (jacobi::svd_block: load, transposition, checks, sweeps,
/// outputs and status) on host memory, one emulated block per matrix.
template <typename T, int LANES, int TM, bool TRACK, bool SCALED = false>
std::vector<int> emulated_kernel(const torch::Tensor& a, int k, int max_sweeps, torch::Tensor& u,
                                 torch::Tensor& s, torch::Tensor& v) {
  const int64_t batch = a.size(0);
  const int rows = static_cast<int>(a.size(1)), cols = static_cast<int>(a.size(2));
  const bool tr = rows < cols;
  const int m = std::max(rows, cols), n = std::min(rows, cols);
  const auto dt = sizeof(T) == 8 ? torch::kFloat64 : torch::kFloat32;
  const auto ac = a.to(dt).contiguous();
  auto ux = torch::full({batch, m, k}, std::nan(""), torch::TensorOptions().dtype(dt));
  auto vx = torch::full({batch, n, k}, std::nan(""), torch::TensorOptions().dtype(dt));
  s = torch::full({batch, k}, std::nan(""), torch::TensorOptions().dtype(dt));
  std::vector<int> status(static_cast<size_t>(batch), -99);
  attnpilot::perturbation::cuda::JacobiLaunch p;
  p.a = ac.data_ptr();
  p.batch = batch;
  p.rows_in = rows;
  p.cols_in = cols;
  p.transpose = tr;
  p.k = k;
  p.ux = ux.data_ptr();
  p.vx = vx.data_ptr();
  p.s = s.data_ptr();
  p.status = status.data();
  p.tol = std::sqrt(static_cast<double>(m)) * std::numeric_limits<T>::epsilon();
  p.max_sweeps = max_sweeps;
  std::vector<double> smem_words(
      static_cast<size_t>(jac::svd_block_shared_bytes(m, n, sizeof(T), LANES) / 8 + 2));
  for (int64_t b = 0; b < batch; ++b) {
    int rotated[jac::kSweepSharedInts] = {};
    unsigned long long max_bits = 0;
    emu::run_block(jac::svd_block_threads(n, LANES), [&] {
      jac::svd_block<T, LANES, TM, TRACK, false, SCALED>(
          p, b, reinterpret_cast<unsigned char*>(smem_words.data()), rotated, &max_bits);
    });
  }
  // A = X (U = U_X, V = V_X) or A = Xᵀ (U = V_X, V = U_X).
  u = (tr ? vx : ux).to(torch::kFloat64);
  v = (tr ? ux : vx).to(torch::kFloat64);
  s = s.to(torch::kFloat64);
  return status;
}

TEST(JacobiEmulated, KernelBlockTallWideTopKAndStatuses) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(21);
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  struct Case {
    int64_t rows, cols;
    int k;
  };
  // The last case again with scaled rotations (their scales in the block's shared memory, folded
  // into the columns before the outputs).
  int index = 0;
  for (const Case& c :
       {Case{40, 24, 24}, Case{24, 40, 24}, Case{33, 33, 5}, Case{9, 1, 1}, Case{40, 24, 24}}) {
    const bool scaled = ++index == 5;
    auto a = torch::randn({3, c.rows, c.cols}, gen, o64);
    a[1].zero_();  // no direction at all: zero U columns, flagged
    torch::Tensor u, s, v;
    const auto st = scaled ? emulated_kernel<float, 8, 2, false, true>(a, c.k, 100, u, s, v)
                           : emulated_kernel<float, 8, 2, false>(a, c.k, 100, u, s, v);
    const std::string what = std::to_string(c.rows) + "x" + std::to_string(c.cols) + " k " +
                             std::to_string(c.k) + (scaled ? " scaled" : "");
    EXPECT_EQ(st[0], 0) << what;
    EXPECT_EQ(st[1], attnpilot::perturbation::cuda::kJacobiZeroColumns) << what;
    EXPECT_EQ(st[2], 0) << what;
    EXPECT_TRUE(torch::isfinite(u).all().item<bool>() && torch::isfinite(s).all().item<bool>() &&
                torch::isfinite(v).all().item<bool>())
        << what << ": an output was not written";
    EXPECT_EQ(s[1].abs().max().item<double>(), 0.0) << what;
    for (int64_t b : {0, 2}) {
      const auto ref = torch::linalg_svdvals(a[b]).narrow(0, 0, c.k);
      const double smax = ref[0].item<double>();
      EXPECT_LE((s[b] - ref).abs().max().item<double>() / smax, 1e-5) << what;
      const auto eye = torch::eye(c.k, o64);
      EXPECT_LE((torch::matmul(u[b].t(), u[b]) - eye).abs().max().item<double>(), 1e-5) << what;
      EXPECT_LE((torch::matmul(v[b].t(), v[b]) - eye).abs().max().item<double>(), 1e-5) << what;
      // A v_i = σ_i u_i for the k leading triplets.
      const auto res = torch::matmul(a[b], v[b]) - u[b] * s[b].unsqueeze(0);
      EXPECT_LE(res.abs().max().item<double>() / smax, 1e-5) << what;
    }
  }
  // NaN: status -1 and nothing else written for that matrix; a sweep limit of 1: flagged.
  auto a = torch::randn({2, 16, 16}, gen, o64);
  a[0][3][4] = std::nan("");
  torch::Tensor u, s, v;
  auto st = emulated_kernel<double, 8, 1, false>(a, 16, 100, u, s, v);
  EXPECT_EQ(st[0], attnpilot::perturbation::cuda::kJacobiNonFinite);
  EXPECT_EQ(st[1], 0);
  st = emulated_kernel<double, 8, 1, false>(a.narrow(0, 1, 1), 16, 1, u, s, v);
  EXPECT_EQ(st[0], attnpilot::perturbation::cuda::kJacobiNotConverged);
}

/// The fused top-r kernel's whole block (topr::topr_block), one emulated block per core.
template <typename T>
struct ToprOut {
  torch::Tensor u, s, v;  // float64
  std::vector<int> status;
  std::vector<int64_t> iterations;
  std::vector<char> converged;  // bool storage for ToprLaunch
};

template <typename T, int TM>
ToprOut<T> emulated_topr(const torch::Tensor& c, const torch::Tensor& v0, int r, double tol,
                         int max_iters) {
  namespace cu = attnpilot::perturbation::cuda;
  const int64_t batch = c.size(0);
  const int d = static_cast<int>(c.size(1)), pp = static_cast<int>(v0.size(2));
  const auto dt = sizeof(T) == 8 ? torch::kFloat64 : torch::kFloat32;
  const auto cc = c.to(dt).contiguous(), vc = v0.to(dt).contiguous();
  const auto opt = torch::TensorOptions().dtype(dt);
  auto u = torch::full({batch, d, pp}, std::nan(""), opt),
       s = torch::full({batch, pp}, std::nan(""), opt),
       v = torch::full({batch, d, pp}, std::nan(""), opt);
  ToprOut<T> out;
  out.status.assign(static_cast<size_t>(batch), -99);
  out.iterations.assign(static_cast<size_t>(batch), -1);
  out.converged.assign(static_cast<size_t>(batch), 0);
  cu::ToprLaunch l;
  l.c = cc.data_ptr();
  l.v0 = vc.data_ptr();
  l.batch = batch;
  l.d = d;
  l.p = pp;
  l.r = r;
  l.tol = tol;
  l.max_iters = max_iters;
  l.jacobi_tol = std::sqrt(static_cast<double>(d)) * std::numeric_limits<T>::epsilon();
  l.max_sweeps = 100;
  l.u = u.data_ptr();
  l.s = s.data_ptr();
  l.v = v.data_ptr();
  l.iterations = out.iterations.data();
  l.converged = reinterpret_cast<bool*>(out.converged.data());
  l.status = out.status.data();
  const auto layout = cu::topr::make_layout(d, pp, sizeof(T), 8);
  std::vector<double> smem(static_cast<size_t>(cu::topr::layout_bytes(layout, sizeof(T)) / 8 + 2));
  for (int64_t b = 0; b < batch; ++b) {
    int rotated[jac::kSweepSharedInts] = {};
    unsigned long long max_bits = 0;
    T sv[cu::topr::kMaxP];
    double res[cu::topr::kMaxP];
    emu::run_block(cu::topr::topr_threads(pp, 8), [&] {
      cu::topr::topr_block<T, 8, TM>(l, b, reinterpret_cast<unsigned char*>(smem.data()), rotated,
                                     &max_bits, sv, res);
    });
  }
  out.u = u.to(torch::kFloat64);
  out.s = s.to(torch::kFloat64);
  out.v = v.to(torch::kFloat64);
  return out;
}

/// Runs the fused iteration on the cores c1 (core 1 zero) in T and checks every finished core.
template <typename T>
void expect_topr_converges(const torch::Tensor& c1, const torch::Tensor& v0, int64_t r, double tol,
                           const std::string& what) {
  namespace cu = attnpilot::perturbation::cuda;
  const int64_t pp = v0.size(2);
  const auto o = emulated_topr<T, 2>(c1, v0, static_cast<int>(r), tol, 30);
  // Non-dependent copies (the checks below need no `template` keywords).
  const torch::Tensor u = o.u, sv = o.s, v = o.v;
  const std::vector<int> status = o.status;
  const std::vector<int64_t> iterations = o.iterations;
  const std::vector<char> converged = o.converged;
  EXPECT_EQ(status[1], cu::kToprFallback) << what << ": a zero core has no direction";
  for (int64_t i : {0, 2}) {
    EXPECT_EQ(status[static_cast<size_t>(i)], 0) << what;
    EXPECT_TRUE(converged[static_cast<size_t>(i)]) << what;
    EXPECT_GE(iterations[static_cast<size_t>(i)], 1) << what;
    const auto ref = torch::linalg_svdvals(c1[i]);
    const double s1 = ref[0].item<double>();
    EXPECT_LE((sv[i].narrow(0, 0, r) - ref.narrow(0, 0, r)).abs().max().item<double>() / s1,
              10 * tol)
        << what;
    const auto eye = torch::eye(pp, torch::kFloat64);
    EXPECT_LE((torch::matmul(u[i].t(), u[i]) - eye).abs().max().item<double>(), 1e-5) << what;
    EXPECT_LE((torch::matmul(v[i].t(), v[i]) - eye).abs().max().item<double>(), 1e-5) << what;
    // The triplet residual the kernel stopped on, recomputed in float64.
    const auto ur = u[i].narrow(1, 0, r), vr = v[i].narrow(1, 0, r);
    const auto sr = sv[i].narrow(0, 0, r).unsqueeze(0);
    const double r1 = (torch::matmul(c1[i], vr) - ur * sr).norm(2, {0}).max().item<double>();
    const double r2 = (torch::matmul(c1[i].t(), ur) - vr * sr).norm(2, {0}).max().item<double>();
    EXPECT_LE(std::max(r1, r2) / s1, 2 * tol + 1e-6) << what << ": residual";
  }
}

TEST(ToprEmulated, FusedIterationConvergesToTheLeadingTriplets) {
  namespace cu = attnpilot::perturbation::cuda;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(31);
  auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t b = 3, d = 40, r = 4, pp = 8;
  auto uu = std::get<0>(torch::linalg_qr(torch::randn({b, d, d}, gen, o64)));
  auto vv = std::get<0>(torch::linalg_qr(torch::randn({b, d, d}, gen, o64)));
  auto sig = torch::pow(0.75, torch::arange(d, o64));
  auto c0 = torch::matmul(uu * sig.unsqueeze(0).unsqueeze(0), vv.transpose(1, 2));
  auto c1 = c0 + 1e-3 * torch::randn({b, d, d}, gen, o64) / std::sqrt(static_cast<double>(d));
  auto v0 = vv.narrow(2, 0, pp).contiguous();  // the previous segment's exact leading block
  c1[1].zero_();
  expect_topr_converges<float>(c1, v0, r, 1e-5, "float");
  expect_topr_converges<double>(c1, v0, r, 1e-10, "double");
  // One step from a cold start gives the Ritz triplets of the CPU step (QR, then the SVD of the
  // p×p compression): the same values, the same vectors up to sign.
  auto cold = std::get<0>(torch::linalg_qr(torch::randn({b, d, pp}, gen, o64)));
  const auto one = emulated_topr<double, 2>(c1, cold, static_cast<int>(r), 1e-10, 1);
  auto [cu_u, cu_s, cu_v] =
      attnpilot::perturbation::subspace_iteration_step(c1[0].unsqueeze(0), cold[0].unsqueeze(0));
  EXPECT_EQ(one.iterations[0], 1);
  EXPECT_LE((one.s[0] - cu_s[0]).abs().max().item<double>(), 1e-10);
  EXPECT_GE(torch::matmul(one.u[0].t(), cu_u[0]).diagonal().abs().min().item<double>(), 1 - 1e-8);
  EXPECT_GE(torch::matmul(one.v[0].t(), cu_v[0]).diagonal().abs().min().item<double>(), 1 - 1e-8);
  auto bad = c1.clone();
  bad[2][5][6] = std::nan("");
  const auto nan = emulated_topr<float, 2>(bad, v0, static_cast<int>(r), 1e-5, 30);
  EXPECT_EQ(nan.status[2], cu::kJacobiNonFinite);
  EXPECT_EQ(nan.status[0], 0);
}

// The tall path's pass bodies (tall_blocks.cuh): the Gram matrix accumulated over two row ranges
// of one matrix (the atomics of two blocks), and the product over a row range, for every padded
// width, float and double input, n not a multiple of 8 and a row stride past n, against
// LibTorch in float64. Rows outside the range must stay untouched.
template <typename T, int NP>
void check_tall_passes(int n, int k, int64_t m, uint64_t seed) {
  namespace tl = attnpilot::perturbation::cuda::tall;
  ASSERT_EQ(tl::padded_width(n), NP);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t ld = n + 3;
  auto xs = torch::randn({m, ld}, gen, o64);
  if (std::is_same<T, float>::value) xs = xs.to(torch::kFloat32).to(torch::kFloat64);
  std::vector<T> x(static_cast<size_t>(m * ld));
  for (int64_t i = 0; i < m * ld; ++i) x[i] = static_cast<T>(xs.view(-1)[i].item<double>());
  const auto x64 = xs.narrow(1, 0, n);
  const std::string what = fmt::format("NP {} n {} k {} m {} {}", NP, n, k, m,
                                       std::is_same<T, float>::value ? "float" : "double");

  std::vector<double> g(static_cast<size_t>(n) * n, 0.0);
  std::vector<double> smem(static_cast<size_t>(tl::gram_shared_bytes(NP) / 8));
  const int64_t split = m / 2 + 5;
  for (auto [r0, r1] : {std::pair<int64_t, int64_t>{0, split}, {split, m}})
    emu::run_block(tl::gram_threads(NP), [&, r0 = r0, r1 = r1] {
      tl::gram_block<T, NP>(x.data(), ld, n, r0, r1, g.data(), smem.data());
    });
  const auto gref = torch::matmul(x64.t(), x64);
  const auto gemu = torch::from_blob(g.data(), {n, n}, o64).clone();
  EXPECT_LE((gemu - gref).abs().max().item<double>(), 1e-13 * gref.abs().max().item<double>())
      << what << ": Gram";

  const auto w = torch::randn({n, k}, gen, o64);
  const int64_t r0 = 7, r1 = m - 3;
  std::vector<float> y(static_cast<size_t>(m * k), std::numeric_limits<float>::quiet_NaN());
  std::vector<double> psmem(static_cast<size_t>(tl::product_shared_bytes(NP) / 8));
  emu::run_block(tl::kProductThreads, [&] {
    tl::product_block<T, float, NP>(x.data(), ld, n, w.data_ptr<double>(), k, r0, r1, y.data(), k,
                                    psmem.data());
  });
  const auto yemu = torch::from_blob(y.data(), {m, k}, torch::kFloat32).to(torch::kFloat64);
  const auto yref = torch::matmul(x64, w);
  const auto inside = yemu.narrow(0, r0, r1 - r0), ref_in = yref.narrow(0, r0, r1 - r0);
  EXPECT_LE((inside - ref_in).abs().max().item<double>(), 2e-7 * ref_in.abs().max().item<double>())
      << what << ": product";
  EXPECT_TRUE(torch::isnan(yemu.narrow(0, 0, r0)).all().item<bool>() &&
              torch::isnan(yemu.narrow(0, r1, m - r1)).all().item<bool>())
      << what << ": product wrote rows outside its range";
}

TEST(TallPassesEmulated, GramAndProductMatchFloat64) {
  check_tall_passes<float, 32>(5, 5, 300, 1);
  check_tall_passes<float, 32>(32, 20, 260, 2);
  check_tall_passes<double, 32>(24, 24, 131, 3);
  check_tall_passes<float, 64>(64, 64, 300, 4);
  check_tall_passes<double, 64>(33, 8, 150, 5);
  check_tall_passes<float, 128>(100, 100, 100, 6);
  check_tall_passes<float, 128>(128, 16, 70, 7);
}

// The emulation itself: shuffles within group masks, the barrier's OR, and a barrier that not
// every thread reaches reported instead of hanging.
TEST(CudaEmulation, ShufflesBarriersAndDeadlocks) {
  std::vector<int> sums(64), any(64);
  emu::run_block(64, [&] {
    const int t = threadIdx.x;
    const unsigned gmask = 0xffu << (8 * ((t % 32) / 8));
    int v = t;
    for (int off = 1; off < 8; off <<= 1) v += __shfl_xor_sync(gmask, v, off);
    sums[t] = v;
    any[t] = __syncthreads_or(t == 37);
  });
  for (int t = 0; t < 64; ++t) {
    const int g0 = t / 8 * 8;
    EXPECT_EQ(sums[t], 8 * g0 + 28) << "thread " << t;
    EXPECT_EQ(any[t], 1) << "thread " << t;
  }
  EXPECT_THROW(emu::run_block(64,
                              [&] {
                                if (threadIdx.x < 32) __syncthreads();
                              }),
               std::runtime_error);
  // A missing barrier: thread t writes x[t], then reads x[t - 1] in the same phase. Visiting the
  // threads in index order would always show the new value (the writer ran first); the
  // emulation's shuffled order must expose the stale one for some threads.
  std::vector<int> x(256, 0), seen(256, -1);
  emu::run_block(256, [&] {
    const int t = threadIdx.x;
    x[t] = 1;
    seen[t] = t > 0 ? x[t - 1] : 1;
    __syncthreads();
  });
  EXPECT_GT(std::count(seen.begin(), seen.end(), 0), 10)
      << "a read racing a write in the same phase never saw the old value";
  EXPECT_GT(std::count(seen.begin(), seen.end(), 1), 10);
}

}  // namespace
