// BatchedSvd (CPU and, on a CUDA machine, every cuSOLVER backend against the CPU) and the
// incremental SubspaceTracker against recomputation.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <array>
#include <iostream>
#include <vector>

#include "common/error.h"
#include "perturbation/batched_svd.h"
#include "perturbation/bounds.h"
#include "perturbation/tracker.h"
#include "tests/perturbation/random_cases.h"

namespace attnpilot::perturbation {
namespace {

using testing::Family;

torch::Generator make_gen(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Reconstruction, orthonormality and order of an SVD result against a float64 reference.
void expect_valid_svd(const torch::Tensor& a, const SvdResult& r, double tol,
                      const std::string& what) {
  auto a64 = a.to(torch::kFloat64).cpu();
  auto u = r.u.to(torch::kFloat64).cpu(), s = r.s.to(torch::kFloat64).cpu(),
       v = r.v.to(torch::kFloat64).cpu();
  auto ref = torch::linalg_svdvals(a64);
  const int64_t k = s.size(-1);
  auto scale = ref.select(-1, 0).clamp_min(1e-300);
  auto serr = ((s - ref.narrow(-1, 0, k)).abs().amax(-1) / scale).max().item<double>();
  EXPECT_LE(serr, tol) << what << ": singular values";
  EXPECT_TRUE((s.diff(1, -1) <= 1e-12 * scale.unsqueeze(-1)).all().item<bool>())
      << what << ": not descending";
  auto eye = torch::eye(k, torch::kFloat64);
  EXPECT_LE((torch::matmul(u.transpose(-1, -2), u) - eye).abs().max().item<double>(), 10 * tol)
      << what << ": U not orthonormal";
  EXPECT_LE((torch::matmul(v.transpose(-1, -2), v) - eye).abs().max().item<double>(), 10 * tol)
      << what << ": V not orthonormal";
  // Rank-k reconstruction error equals the Eckart–Young tail.
  auto rec = torch::matmul(u * s.unsqueeze(-2), v.transpose(-1, -2));
  auto err = torch::linalg_matrix_norm(a64 - rec, "fro");
  auto tail = tail_frobenius(ref, k);
  EXPECT_LE(((err - tail).abs() / torch::linalg_matrix_norm(a64, "fro").clamp_min(1e-300))
                .max()
                .item<double>(),
            10 * tol)
      << what << ": reconstruction";
}

TEST(BatchedSvd, CpuMatchesFloat64ReferenceWithBatchDims) {
  auto gen = make_gen(21);
  for (auto fam : {Family::kWellConditioned, Family::kRankDeficient, Family::kRepeated}) {
    auto a = testing::random_matrix(fam, 24, 12, 7, gen).reshape({2, 3, 4, 12, 7});
    auto r = batched_svd(a);
    EXPECT_EQ(r.backend, SvdBackend::kTorch);
    ASSERT_EQ(r.u.sizes(), (std::vector<int64_t>{2, 3, 4, 12, 7}));
    ASSERT_EQ(r.v.sizes(), (std::vector<int64_t>{2, 3, 4, 7, 7}));
    expect_valid_svd(a.reshape({-1, 12, 7}),
                     {r.u.reshape({-1, 12, 7}), r.s.reshape({-1, 7}), r.v.reshape({-1, 7, 7})},
                     1e-12, testing::family_name(fam));
    SvdOptions top;
    top.rank = 3;
    auto r3 = batched_svd(a.to(torch::kFloat32), top);
    ASSERT_EQ(r3.s.size(-1), 3);
    expect_valid_svd(a.reshape({-1, 12, 7}),
                     {r3.u.reshape({-1, 12, 3}), r3.s.reshape({-1, 3}), r3.v.reshape({-1, 7, 3})},
                     1e-5, testing::family_name(fam) + " top-3 fp32");
  }
}

TEST(BatchedSvd, AutoChoiceAndBadInput) {
  auto cpu = torch::zeros({4, 8, 8});
  EXPECT_EQ(choose_svd_backend(cpu, {}), SvdBackend::kTorch);
  EXPECT_THROW(batched_svd(torch::zeros({5})), InvalidArgument);
  EXPECT_THROW(batched_svd(torch::zeros({2, 3}, torch::kLong)), InvalidArgument);
  SvdOptions o;
  o.rank = 9;
  EXPECT_THROW(batched_svd(cpu, o), InvalidArgument);
  o.rank = -1;
  EXPECT_THROW(BatchedSvd{o}, InvalidArgument);
  if (!cusolver_available()) {
    SvdOptions c;
    c.backend = SvdBackend::kCusolverBatchedJacobi;
#ifdef ATTNPILOT_WITH_CUDA
    EXPECT_THROW(batched_svd(cpu, c), InvalidArgument);  // CPU tensor for a CUDA backend
#else
    EXPECT_THROW(batched_svd(cpu, c), Unavailable);
#endif
  }
}

// cuSOLVER against the CPU, for each backend and the shapes it serves (GPU machine only).
TEST(BatchedSvdCuda, CusolverBackendsMatchCpu) {
  if (!cusolver_available()) {
    GTEST_SKIP() << "no CUDA device (or ATTNPILOT_CUDA=OFF): cuSOLVER backends not tested here";
  }
  auto gen = make_gen(22);
  struct Case {
    SvdBackend backend;
    int64_t m, n, rank;
    torch::Dtype dtype;
    double tol;
  };
  std::vector<Case> cases = {
      {SvdBackend::kCusolverBatchedJacobi, 32, 32, 0, torch::kFloat32, 2e-5},
      {SvdBackend::kCusolverBatchedJacobi, 20, 9, 0, torch::kFloat64, 1e-11},
      {SvdBackend::kCusolverBatchedJacobi, 9, 20, 0, torch::kFloat32, 2e-5},
      {SvdBackend::kCusolverJacobi, 64, 64, 0, torch::kFloat32, 2e-5},
      {SvdBackend::kCusolverJacobi, 128, 128, 8, torch::kFloat64, 1e-11},
      {SvdBackend::kCusolverApprox, 512, 64, 8, torch::kFloat32, 1e-4},
      {SvdBackend::kCusolverApprox, 64, 512, 8, torch::kFloat64, 1e-9},
  };
  for (const auto& c : cases) {
    auto a = testing::random_matrix(Family::kWellConditioned, 16, c.m, c.n, gen).to(c.dtype);
    SvdOptions o;
    o.backend = c.backend;
    o.rank = c.rank;
    auto r = batched_svd(a.cuda(), o);
    EXPECT_EQ(r.backend, c.backend);
    EXPECT_EQ(r.not_converged, 0);
    const std::string what =
        fmt::format("{} {}x{} rank {}", to_string(c.backend), c.m, c.n, c.rank);
    expect_valid_svd(a, r, c.tol, what);
  }
  // The automatic choice on CUDA: our Jacobi kernel (square/short) and QR + Jacobi (tall).
  auto small = torch::zeros({2, 32, 32}, torch::kCUDA);
  auto tall = torch::zeros({2, 4096, 64}, torch::kCUDA);
  EXPECT_EQ(choose_svd_backend(small, {}), SvdBackend::kJacobiKernel);
  SvdOptions top;
  top.rank = 8;
  EXPECT_EQ(choose_svd_backend(tall, top), SvdBackend::kTallQrJacobi);
  EXPECT_EQ(choose_svd_backend(tall, {}), SvdBackend::kTallQrJacobi);
}

// Segments of a sequence whose queries/keys share a fixed low-rank structure plus noise, so
// successive cores differ by a small perturbation.
struct Stream {
  torch::Tensor basis_q, basis_k;  // [B, r0, d]
  torch::Generator gen;
  std::pair<torch::Tensor, torch::Tensor> next(int64_t t) {
    const int64_t b = basis_q.size(0), r0 = basis_q.size(1), d = basis_q.size(2);
    auto opt = torch::TensorOptions().dtype(torch::kFloat32);
    auto q = torch::matmul(torch::randn({b, t, r0}, gen, opt), basis_q) +
             0.02 * torch::randn({b, t, d}, gen, opt);
    auto k = torch::matmul(torch::randn({b, t, r0}, gen, opt), basis_k) +
             0.02 * torch::randn({b, t, d}, gen, opt);
    return {q, k};
  }
};

Stream make_stream(int64_t b, int64_t d, uint64_t seed,
                   std::vector<float> weights = {1.0f, 0.9f, 0.8f, 0.7f, 0.1f, 0.05f}) {
  Stream s{{}, {}, make_gen(seed)};
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  // Four strong directions and two weak ones: a clear gap after rank 4.
  auto decay = torch::tensor(weights, opt).view({1, 6, 1});
  s.basis_q = torch::randn({b, 6, d}, s.gen, opt) * decay;
  // Keys share the queries' directions (as in heads with a strong diagonal), so the score
  // spectrum inherits the gap; a random key basis would make σ_4 of a random 4×4 block tiny.
  s.basis_k = s.basis_q + 0.1 * torch::randn({b, 6, d}, s.gen, opt) * decay;
  return s;
}

// The Ritz form of the triplet residual (the top-r iteration's stopping test) skips
// ‖Cᵀ u_i − σ_i v_i‖: for a Rayleigh–Ritz step's triplets that side is the compressed SVD's own
// rounding. Checked on CPU steps (QR and LAPACK SVD, float64) from random and warm blocks:
// that side stays at rounding level while C·V's side does not, and both forms agree.
TEST(Tracker, RitzResidualMatchesTheFullResidualAfterAStep) {
  auto gen = make_gen(4242);
  const auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t b = 12, d = 48, p = 10, r = 6;
  const auto decay = torch::pow(0.8, torch::arange(d, o64));
  const auto uq = std::get<0>(torch::linalg_qr(torch::randn({b, d, d}, gen, o64)));
  const auto vq = std::get<0>(torch::linalg_qr(torch::randn({b, d, d}, gen, o64)));
  const auto c = torch::matmul(uq * decay, vq.transpose(1, 2));
  for (bool warm : {false, true}) {
    // warm: the exact leading block plus 1e-3 noise, so C·V's side is small too.
    const auto v0 = warm ? std::get<0>(torch::linalg_qr(vq.narrow(2, 0, p) +
                                                        1e-3 * torch::randn({b, d, p}, gen, o64)))
                         : std::get<0>(torch::linalg_qr(torch::randn({b, d, p}, gen, o64)));
    const auto [u, sg, v] = subspace_iteration_step(c, v0);
    const auto s1 = sg.select(1, 0);
    const auto ur = u.narrow(2, 0, r), vr = v.narrow(2, 0, r);
    const auto sr = sg.narrow(1, 0, r).unsqueeze(1);
    const auto left =
        torch::linalg_vector_norm(torch::matmul(c.transpose(1, 2), ur) - vr * sr, 2, {1}) /
        s1.unsqueeze(1);
    const auto right =
        torch::linalg_vector_norm(torch::matmul(c, vr) - ur * sr, 2, {1}) / s1.unsqueeze(1);
    EXPECT_LE(left.max().item<double>(), 1e-13) << (warm ? "warm" : "random") << " start";
    EXPECT_GE(right.amax(1).min().item<double>(), 1e-9) << "C·V's side measures convergence";
    const auto full = triplet_residual(c, u, sg, v, r);
    const auto ritz = triplet_residual(c, u, sg, v, r, torch::matmul(c, v), /*ritz=*/true);
    EXPECT_TRUE(torch::allclose(full, ritz, 0, 1e-13)) << (warm ? "warm" : "random") << " start";
  }
}

TEST(Tracker, IncrementalAgreesWithRecomputationWithinWedin) {
  const int64_t b = 48, d = 16;
  TrackerOptions o;
  o.rank = 4;
  SubspaceTracker tr(d, o);
  auto st = make_stream(b, d, 31);
  torch::Tensor all_q, all_k;
  for (int seg = 0; seg < 8; ++seg) {
    auto [q, k] = st.next(32);
    tr.update(q, k);
    all_q = seg == 0 ? q : torch::cat({all_q, q}, 1);
    all_k = seg == 0 ? k : torch::cat({all_k, k}, 1);
    // Gram matrices accumulated incrementally equal the recomputed ones.
    auto q64 = all_q.to(torch::kFloat64), k64 = all_k.to(torch::kFloat64);
    EXPECT_TRUE(
        torch::allclose(tr.gram_q(), torch::matmul(q64.transpose(-1, -2), q64), 1e-10, 1e-8));
    // Subspaces: the tracker's leading-r triplets vs an exact SVD of the same core, within
    // Wedin's residual bound (δ = σ̂_r − σ_{r+1} from the exact spectrum).
    auto c = tr.core();
    auto [ue, se, vhe] = torch::linalg_svd(c, false, c10::nullopt);
    auto u = tr.u().narrow(-1, 0, 4), v = tr.v().narrow(-1, 0, 4);
    auto angle = torch::maximum(sin_theta(ue.narrow(-1, 0, 4), u),
                                sin_theta(vhe.transpose(-1, -2).narrow(-1, 0, 4), v));
    auto resid = triplet_residual(c, tr.u(), tr.sigma(), tr.v(), 4) * se.select(-1, 0);
    auto bound = wedin_sin_theta_bound(resid, tr.sigma().select(-1, 3), se.select(-1, 4));
    EXPECT_TRUE((angle <= bound + 1e-10).all().item<bool>())
        << "segment " << seg << " worst angle - bound " << (angle - bound).max().item<double>();
    EXPECT_TRUE((bound < 1e-3).all().item<bool>()) << "segment " << seg << " bound too loose";
    // Projections from the tracker reach Eckart–Young on everything seen so far.
    auto p = tr.projections();
    auto s = torch::matmul(q64, k64.transpose(-1, -2));
    auto sr = torch::matmul(torch::matmul(q64, p.a_q), torch::matmul(k64, p.a_k).transpose(-1, -2));
    auto err = torch::linalg_matrix_norm(s - sr, "fro");
    auto opt = tail_frobenius(torch::linalg_svdvals(s), 4);
    EXPECT_LE(((err - opt).abs() / torch::linalg_matrix_norm(s, "fro")).max().item<double>(), 1e-6)
        << "segment " << seg;
  }
  const auto& stats = tr.stats();
  EXPECT_EQ(stats.updates, 8 * b);
  EXPECT_EQ(stats.warm + stats.recomputations, stats.updates);
  EXPECT_GT(stats.warm, stats.updates / 2) << "most updates should be warm";
  std::cout << "tracker: updates " << stats.updates << ", warm " << stats.warm
            << ", recomputations " << stats.recomputations << ", iterations " << stats.iterations
            << "\n";
}

TEST(Tracker, WarmStartsConvergeInFewerIterationsThanCold) {
  const int64_t b = 32, d = 16;
  TrackerOptions warm_o, cold_o;
  warm_o.rank = cold_o.rank = 4;
  warm_o.max_iters = cold_o.max_iters = 200;
  // Block size = rank and a moderate gap after rank 4 (σ₅/σ₄ ≈ 0.3): subspace iteration
  // converges linearly here, so the starting block matters.
  warm_o.oversample = cold_o.oversample = 0;
  cold_o.warm_start = false;
  cold_o.seed = 5;
  SubspaceTracker warm(d, warm_o), cold(d, cold_o);
  const std::vector<float> w6 = {1.0f, 0.9f, 0.8f, 0.7f, 0.4f, 0.3f};
  auto s1 = make_stream(b, d, 41, w6), s2 = make_stream(b, d, 41, w6);
  for (int seg = 0; seg < 6; ++seg) {
    auto [q, k] = s1.next(32);
    auto [q2, k2] = s2.next(32);
    ASSERT_TRUE(torch::equal(q, q2));
    warm.update(q, k);
    cold.update(q2, k2);
  }
  // Compare the iterations of updates 2..6 (the first warm update is a full SVD).
  const int64_t w = warm.stats().iterations, c = cold.stats().iterations;
  std::cout << "iterations over 5 updates x " << b << " heads: warm " << w << ", cold " << c
            << " (cold includes the first update)\n";
  const int64_t nw = warm.stats().warm, nc = cold.stats().warm;
  EXPECT_GT(nw, b) << "too few warm updates to compare";
  EXPECT_EQ(nc, 6 * b) << "cold iteration should converge within 200 steps";
  ASSERT_GT(w, 0);
  // Iterations per converged update: warm start from the previous subspace vs random start.
  const double per_warm = static_cast<double>(w) / nw, per_cold = static_cast<double>(c) / nc;
  std::cout << "iterations per update: warm " << per_warm << ", cold " << per_cold << "\n";
  EXPECT_LT(per_warm, per_cold);
  // Both end at the same subspace.
  auto angle = sin_theta(warm.u().narrow(-1, 0, 4), cold.u().narrow(-1, 0, 4));
  EXPECT_LT(angle.max().item<double>(), 1e-4);
}

TEST(Tracker, LargePerturbationTriggersRecomputation) {
  const int64_t b = 8, d = 8;
  TrackerOptions o;
  o.rank = 2;
  o.max_sin_theta = 0.99;  // gate on the a-priori Wedin bound
  SubspaceTracker tr(d, o);
  auto gen = make_gen(51);
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  tr.update(torch::randn({b, 20, d}, gen, opt), torch::randn({b, 20, d}, gen, opt));
  EXPECT_EQ(tr.stats().recomputations, b);
  // A segment 100× larger than everything before moves the core far beyond the Wedin gap.
  tr.update(100 * torch::randn({b, 20, d}, gen, opt), 100 * torch::randn({b, 20, d}, gen, opt));
  EXPECT_EQ(tr.stats().recomputations, 2 * b);
  EXPECT_LE(tr.relative_residual().max().item<double>(), 1e-9);
  EXPECT_THROW(tr.update(torch::randn({b, 3, d + 1}), torch::randn({b, 3, d + 1})),
               InvalidArgument);
  EXPECT_THROW(tr.update(torch::randn({b + 1, 3, d}), torch::randn({b + 1, 3, d})),
               InvalidArgument);
  TrackerOptions rank9;
  rank9.rank = 9;  // above the head dim
  EXPECT_THROW(SubspaceTracker(8, rank9), InvalidArgument);
}

TEST(Tracker, BlockSizeFollowsTheOversampling) {
  // Default (-1): r + max(4, r / 2), capped at d; an explicit oversampling is taken as given.
  for (const auto& [r, d, want] : std::vector<std::array<int64_t, 3>>{
           {1, 128, 5}, {8, 128, 12}, {9, 128, 13}, {16, 128, 24}, {24, 32, 32}, {32, 32, 32}}) {
    TrackerOptions o;
    o.rank = r;
    EXPECT_EQ(SubspaceTracker(d, o).block(), want) << "r = " << r << ", d = " << d;
  }
  TrackerOptions o;
  o.rank = 16;
  o.oversample = 2;
  EXPECT_EQ(SubspaceTracker(128, o).block(), 18);
  o.oversample = -2;
  EXPECT_THROW(SubspaceTracker(128, o), InvalidArgument);
}

}  // namespace
}  // namespace attnpilot::perturbation
