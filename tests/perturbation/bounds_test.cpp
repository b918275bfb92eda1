// Property tests: every bound in bounds.h holds on >= 10,000 random cases across spectrum
// families (well-conditioned, clustered, repeated, rank-deficient, ill-conditioned, scaled by
// 1e-6 and 1e6), and the guardrail's mask follows from them. Each test prints the bound's
// tightness (median measured/bound over cases where the bound is informative).
#include "perturbation/bounds.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <cmath>
#include <iostream>

#include "common/error.h"
#include "perturbation/guardrail.h"
#include "perturbation/projections.h"
#include "tests/perturbation/random_cases.h"

namespace attnpilot::perturbation {
namespace {

using testing::Family;

constexpr int64_t kPerFamily = 1500;  // 7 families -> 10,500 cases per bound

torch::Generator make_gen(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Perturbations E with ‖E‖ spread over 10 decades relative to ‖A‖.
torch::Tensor random_perturbation(const torch::Tensor& a, torch::Generator& gen) {
  auto opt = a.options();
  auto e = torch::randn(a.sizes(), gen, opt);
  auto rel = torch::pow(10.0, -8.0 + 8.0 * torch::rand({a.size(0), 1, 1}, gen, opt));
  auto na = torch::linalg_matrix_norm(a, "fro").clamp_min(1e-300).view({-1, 1, 1});
  return e / torch::linalg_matrix_norm(e, "fro").view({-1, 1, 1}) * na * rel;
}

// measured/bound over cases where the bound is positive and below `cap`.
double tightness(const torch::Tensor& measured, const torch::Tensor& bound, double cap = 1e300) {
  auto ok = (bound > 0) & (bound < cap);
  return testing::median(measured.masked_select(ok) / bound.masked_select(ok));
}

TEST(Bounds, WeylAndMirskyHoldOnEveryFamily) {
  auto gen = make_gen(11);
  BoundAudit audit;
  std::vector<torch::Tensor> w_m, w_b, m_m, m_b;
  for (auto fam : testing::all_families()) {
    auto a = testing::random_matrix(fam, kPerFamily, 8, 6, gen);
    auto e = random_perturbation(a, gen);
    auto sa = torch::linalg_svdvals(a), se = torch::linalg_svdvals(a + e);
    auto diff = (se - sa).abs();
    // Slack: float64 SVD error, a few ulps of the largest singular value involved.
    auto slack = 1e-13 * (sa.select(-1, 0) + weyl_bound(e));
    auto weyl = diff.amax(-1), weyl_b = weyl_bound(e);
    auto mir = diff.square().sum(-1).sqrt(), mir_b = mirsky_bound(e);
    EXPECT_EQ(audit.record("weyl " + testing::family_name(fam), weyl, weyl_b + slack), 0);
    EXPECT_EQ(audit.record("mirsky " + testing::family_name(fam), mir, mir_b + slack), 0);
    w_m.push_back(weyl), w_b.push_back(weyl_b), m_m.push_back(mir), m_b.push_back(mir_b);
  }
  EXPECT_GE(audit.checks(), 2 * 10000);
  EXPECT_EQ(audit.violations(), 0);
  std::cout << "Weyl tightness (median measured/bound): "
            << tightness(torch::cat(w_m), torch::cat(w_b)) << "\n"
            << "Mirsky tightness (median measured/bound): "
            << tightness(torch::cat(m_m), torch::cat(m_b)) << "\n";
}

TEST(Bounds, WedinSinThetaHoldsAPrioriAndInResidualForm) {
  auto gen = make_gen(12);
  BoundAudit audit;
  std::vector<torch::Tensor> meas, bnd, rmeas, rbnd;
  int64_t informative = 0;
  for (auto fam : testing::all_families()) {
    for (int64_t r : {1, 3}) {
      auto a = testing::random_matrix(fam, kPerFamily, 8, 6, gen);
      auto e = random_perturbation(a, gen);
      auto [ua, sa, vha] = torch::linalg_svd(a, false, c10::nullopt);
      auto [ut, st, vht] = torch::linalg_svd(a + e, false, c10::nullopt);
      auto u1 = ua.narrow(-1, 0, r), v1 = vha.transpose(-1, -2).narrow(-1, 0, r);
      auto ut1 = ut.narrow(-1, 0, r), vt1 = vht.transpose(-1, -2).narrow(-1, 0, r);
      auto angle = torch::maximum(sin_theta(u1, ut1), sin_theta(v1, vt1));
      // A priori: from A's spectrum and ‖E‖₂ only.
      auto b = wedin_a_priori_bound(weyl_bound(e), sa, r);
      // Eigenvector angles of nearly-degenerate float64 problems carry ~eps/gap error.
      auto gap = (sa.select(-1, r - 1) - sa.select(-1, r)).clamp_min(1e-300);
      auto slack = 1e-12 * sa.select(-1, 0) / gap;
      EXPECT_EQ(audit.record("wedin a priori " + testing::family_name(fam), angle, b + slack), 0);
      informative += (b < 1).sum().item<int64_t>();
      meas.push_back(angle), bnd.push_back(b);
      // Residual form: approximate triplets = exact leading triplets of A, matrix M = A + E.
      auto m = a + e;
      auto s1 = sa.narrow(-1, 0, r);
      auto res_r = torch::matmul(m, v1) - u1 * s1.unsqueeze(-2);
      auto res_s = torch::matmul(m.transpose(-1, -2), u1) - v1 * s1.unsqueeze(-2);
      auto resid =
          torch::maximum(torch::linalg_matrix_norm(res_r, 2), torch::linalg_matrix_norm(res_s, 2));
      auto rb = wedin_sin_theta_bound(resid, sa.select(-1, r - 1), st.select(-1, r));
      EXPECT_EQ(audit.record("wedin residual " + testing::family_name(fam), angle, rb + slack), 0);
      rmeas.push_back(angle), rbnd.push_back(rb);
    }
  }
  EXPECT_GE(audit.checks(), 2 * 10000);
  EXPECT_GE(informative, 1000) << "too few cases with a positive Wedin gap to test anything";
  EXPECT_EQ(audit.violations(), 0);
  std::cout << "Wedin a priori: " << informative << " informative cases, tightness "
            << tightness(torch::cat(meas), torch::cat(bnd), 1.0) << "\n"
            << "Wedin residual tightness: " << tightness(torch::cat(rmeas), torch::cat(rbnd), 1.0)
            << "\n";
}

TEST(Bounds, TailEnergyAndRankChangeMatchRankRScores) {
  auto gen = make_gen(13);
  BoundAudit audit;
  std::vector<torch::Tensor> tf_m, tf_b, ts_m, ts_b;
  const int64_t d = 6;
  for (auto fam : testing::all_families()) {
    auto q = testing::random_matrix(fam, kPerFamily, 10, d, gen);
    auto k = testing::random_matrix(Family::kWellConditioned, kPerFamily, 9, d, gen);
    auto s = torch::matmul(q, k.transpose(-1, -2));
    auto norm = torch::linalg_matrix_norm(s, 2).view({-1});
    auto p4 = optimal_score_projections(q, k, 4);
    auto p2 = optimal_score_projections(q, k, 2);
    auto s4 = torch::matmul(torch::matmul(q, p4.a_q), torch::matmul(k, p4.a_k).transpose(-1, -2));
    auto s2 = torch::matmul(torch::matmul(q, p2.a_q), torch::matmul(k, p2.a_k).transpose(-1, -2));
    // The pseudo-inverse drops directions with relative eigenvalue <= 1e-14, which moves S by
    // at most 2·sqrt(1e-14)·‖Q‖₂‖K‖₂ (projections.h); plus float64 rounding.
    auto slack =
        2e-7 * torch::linalg_matrix_norm(q, 2) * torch::linalg_matrix_norm(k, 2) + 1e-12 * norm;
    for (auto [sr, r] : {std::pair{s4, int64_t{4}}, std::pair{s2, int64_t{2}}}) {
      auto ef = torch::linalg_matrix_norm(s - sr, "fro");
      auto es = torch::linalg_matrix_norm(s - sr, 2);
      auto bf = tail_frobenius(p4.sigma, r), bs = tail_spectral(p4.sigma, r);
      EXPECT_EQ(audit.record("tail F " + testing::family_name(fam), ef, bf + slack), 0);
      EXPECT_EQ(audit.record("tail 2 " + testing::family_name(fam), es, bs + slack), 0);
      // Eckart–Young–Mirsky is an equality: the error is also at least the tail.
      EXPECT_TRUE((ef >= bf - slack).all().item<bool>()) << testing::family_name(fam);
      tf_m.push_back(ef), tf_b.push_back(bf), ts_m.push_back(es), ts_b.push_back(bs);
    }
    auto change = torch::linalg_matrix_norm(s4 - s2, "fro");
    auto cb = rank_change_frobenius(p4.sigma, 4, 2);
    EXPECT_EQ(audit.record("rank change " + testing::family_name(fam), change, cb + slack), 0);
    EXPECT_TRUE((change >= cb - slack).all().item<bool>());
  }
  EXPECT_GE(audit.checks(), 5 * 10000);
  EXPECT_EQ(audit.violations(), 0);
  std::cout << "tail Frobenius tightness: " << tightness(torch::cat(tf_m), torch::cat(tf_b))
            << ", tail spectral tightness: " << tightness(torch::cat(ts_m), torch::cat(ts_b))
            << "\n";
}

TEST(Bounds, SoftmaxRowLemmaHolds) {
  // ‖softmax(s + h) − softmax(s)‖₁ ≤ (max h − min h)/2 ≤ ‖h‖₂/√2, including saturated rows.
  auto gen = make_gen(14);
  auto opt = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t rows = 20000, m = 12;
  auto s = torch::randn({rows, m}, gen, opt) *
           torch::pow(10.0, -2.0 + 5.0 * torch::rand({rows, 1}, gen, opt));
  auto h = torch::randn({rows, m}, gen, opt) *
           torch::pow(10.0, -6.0 + 8.0 * torch::rand({rows, 1}, gen, opt));
  auto dp = (torch::softmax(s + h, -1) - torch::softmax(s, -1)).abs().sum(-1);
  auto range_b = (h.amax(-1) - h.amin(-1)) / 2;
  auto l2_b = torch::linalg_vector_norm(h, 2, {-1}, false, c10::nullopt) / std::sqrt(2.0);
  BoundAudit audit(1e-9, 1e-15);
  EXPECT_EQ(audit.record("softmax range", dp, range_b), 0);
  EXPECT_EQ(audit.record("softmax l2", dp, l2_b), 0);
  EXPECT_TRUE((range_b <= l2_b * (1 + 1e-12)).all().item<bool>());
  std::cout << "softmax lemma tightness: range " << tightness(dp, range_b) << ", l2 "
            << tightness(dp, l2_b) << "\n";
}

TEST(Bounds, AttentionOutputBoundHoldsForRankRScores) {
  auto gen = make_gen(15);
  BoundAudit audit;
  std::vector<torch::Tensor> f_m, f_b, r_m, r_b;
  const int64_t n = 10, d = 6, dv = 5;
  int64_t cases = 0;
  for (auto fam : testing::all_families()) {
    for (bool causal : {false, true}) {
      const int64_t b = kPerFamily / 2;
      auto q = testing::random_matrix(fam, b, n, d, gen);
      auto k = testing::random_matrix(Family::kWellConditioned, b, n, d, gen);
      auto v = testing::random_matrix(fam, b, n, dv, gen);
      for (int64_t r : {1, 3}) {
        auto p = optimal_score_projections(q, k, r);
        auto s = torch::matmul(q, k.transpose(-1, -2));
        auto sr = torch::matmul(torch::matmul(q, p.a_q), torch::matmul(k, p.a_k).transpose(-1, -2));
        const double scale = 1.0 / std::sqrt(static_cast<double>(d));
        auto attend = [&](const torch::Tensor& sc) {
          auto x = sc * scale;
          if (causal) {
            auto mask = torch::ones({n, n}, torch::kBool).triu(1);
            x = x.masked_fill(mask, -std::numeric_limits<double>::infinity());
          }
          return torch::matmul(torch::softmax(x, -1), v);
        };
        auto dO = attend(sr) - attend(s);
        auto vmax = max_row_norm(v);
        auto fro = torch::linalg_matrix_norm(dO, "fro");
        auto row = torch::linalg_vector_norm(dO, 2, {-1}, false, c10::nullopt).amax(-1);
        auto qk = torch::linalg_matrix_norm(q, 2) * torch::linalg_matrix_norm(k, 2);
        // The pseudo-inverse drop moves S by at most 2e-7·‖Q‖₂‖K‖₂ (projections.h), which
        // moves the output by at most that times scale·max‖v‖ (the same lemma).
        auto slack = (2e-7 * qk + 1e-12 * torch::linalg_matrix_norm(s, 2)) * scale * vmax;
        auto bf = attention_output_bound(tail_frobenius(p.sigma, r), vmax, scale);
        auto br = attention_output_bound(tail_spectral(p.sigma, r), vmax, scale);
        EXPECT_EQ(audit.record("output F " + testing::family_name(fam), fro, bf + slack), 0);
        EXPECT_EQ(audit.record("output row " + testing::family_name(fam), row, br + slack), 0);
        f_m.push_back(fro), f_b.push_back(bf), r_m.push_back(row), r_b.push_back(br);
        cases += b;
      }
    }
  }
  EXPECT_GE(cases, 10000);
  EXPECT_EQ(audit.violations(), 0);
  std::cout << "attention output bound over " << cases << " cases, tightness: Frobenius "
            << tightness(torch::cat(f_m), torch::cat(f_b)) << ", worst row "
            << tightness(torch::cat(r_m), torch::cat(r_b)) << "\n";
}

TEST(Guardrail, MaskFollowsTheBoundsAndTheSchedule) {
  auto gen = make_gen(16);
  auto sigma = testing::family_spectrum(Family::kIllConditioned, 50, 16, gen);
  GuardrailOptions o;
  o.epsilon = {0.5, 0.01, 10};
  std::vector<int64_t> ranks = {1, 2, 4, 8, 16};
  auto m0 = safe_rank_mask(sigma, ranks, o, 0);
  auto m10 = safe_rank_mask(sigma, ranks, o, 10);
  auto b = rank_bounds(sigma, ranks, o);
  EXPECT_TRUE(torch::equal(m0, b <= 0.5));
  EXPECT_TRUE(torch::equal(m10, b <= 0.01));
  // Full rank is always safe; safety is monotone in the rank; a tighter ε masks more.
  EXPECT_TRUE(m10.select(-1, 4).all().item<bool>());
  EXPECT_TRUE((m0.to(torch::kInt).diff(1, -1) >= 0).all().item<bool>());
  EXPECT_LE(m10.sum().item<int64_t>(), m0.sum().item<int64_t>());
  EXPECT_DOUBLE_EQ(o.epsilon.at(5), 0.5 + (0.01 - 0.5) * 0.5);
  // Output metric needs the value norms and uses 1/√d by default.
  o.metric = GuardMetric::kOutputFrobenius;
  EXPECT_THROW(safe_rank_mask(sigma, ranks, o), InvalidArgument);
  auto vmax = torch::full({50}, 2.0, torch::kFloat64);
  auto ob = rank_bounds(sigma, ranks, o, vmax);
  EXPECT_TRUE(
      torch::allclose(ob.select(-1, 0), tail_frobenius(sigma, 1) * 2.0 / 4.0 / std::sqrt(2.0)));
  EXPECT_THROW(safe_rank_mask(sigma, {0}, GuardrailOptions{}), InvalidArgument);
  EXPECT_THROW(safe_rank_mask(sigma, {17}, GuardrailOptions{}), InvalidArgument);
}

TEST(Guardrail, AuditCountsAndReportsViolations) {
  BoundAudit audit;
  auto bound = torch::tensor({1.0, 2.0, 3.0}, torch::kFloat64);
  EXPECT_EQ(audit.record("ok", torch::tensor({0.5, 2.0, 1.0}, torch::kFloat64), bound), 0);
  EXPECT_EQ(audit.record("bad", torch::tensor({1.5, 2.0, 3.1}, torch::kFloat64), bound), 2);
  EXPECT_EQ(audit.checks(), 6);
  EXPECT_EQ(audit.violations(), 2);
  EXPECT_NEAR(audit.max_ratio(), 1.5, 1e-12);
  EXPECT_THROW(audit.record("shape", torch::zeros({2}), bound), InvalidArgument);
}

}  // namespace
}  // namespace attnpilot::perturbation
