// Optimal rank-r score projections against a float64 SVD of S = Q Kᵀ (Eckart–Young).
#include "perturbation/projections.h"

#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <iostream>

#include "common/error.h"
#include "tests/perturbation/random_cases.h"

namespace attnpilot::perturbation {
namespace {

using testing::Family;

torch::Generator make_gen(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

// Frobenius error of the rank-r scores and the Eckart–Young optimum, per batch element.
struct ErrorCheck {
  torch::Tensor err, opt, norm;  // [batch] float64
};

ErrorCheck check_rank(const torch::Tensor& q, const torch::Tensor& k, int64_t r,
                      const ProjectionOptions& opts = {}, bool check_sigma = true) {
  auto p = optimal_score_projections(q, k, r, opts);
  auto q64 = q.to(torch::kFloat64), k64 = k.to(torch::kFloat64);
  auto s = torch::matmul(q64, k64.transpose(-1, -2));
  auto sr = torch::matmul(torch::matmul(q64, p.a_q.to(torch::kFloat64)),
                          torch::matmul(k64, p.a_k.to(torch::kFloat64)).transpose(-1, -2));
  auto sig = torch::linalg_svdvals(s);
  ErrorCheck c;
  c.err = torch::linalg_matrix_norm(s - sr, "fro");
  const int64_t tail = std::max<int64_t>(0, sig.size(-1) - r);
  c.opt = sig.narrow(-1, sig.size(-1) - tail, tail).square().sum(-1).sqrt();
  c.norm = torch::linalg_matrix_norm(s, "fro");
  // The reported spectrum matches the float64 singular values of S (first min(N,M,d) of them).
  const int64_t m = std::min(sig.size(-1), p.sigma.size(-1));
  auto sdiff = (p.sigma.narrow(-1, 0, m) - sig.narrow(-1, 0, m)).abs().amax(-1);
  auto smax = sig.select(-1, 0);
  EXPECT_TRUE(!check_sigma || (sdiff <= 1e-6 * smax + 1e-300).all().item<bool>())
      << "sigma mismatch, worst " << (sdiff / smax.clamp_min(1e-300)).max().item<double>();
  EXPECT_FALSE(p.a_q.isnan().any().item<bool>() || p.a_k.isnan().any().item<bool>());
  EXPECT_FALSE(p.sigma.isnan().any().item<bool>());
  return c;
}

TEST(Projections, ReachEckartYoungOnEveryFamily) {
  auto gen = make_gen(1);
  const int64_t batch = 64, n = 48, m = 40, d = 16;
  double worst = 0;
  for (auto fam : testing::all_families()) {
    // Q and K with the family's spectrum, rounded to fp32 as the attention path sees them.
    auto q = testing::random_matrix(fam, batch, n, d, gen).to(torch::kFloat32);
    auto k = testing::random_matrix(Family::kWellConditioned, batch, m, d, gen).to(torch::kFloat32);
    for (int64_t r : {1, 3, 8, 15, 16}) {
      auto c = check_rank(q, k, r);
      auto rel = ((c.err - c.opt).abs() / c.norm.clamp_min(1e-300));
      worst = std::max(worst, rel.max().item<double>());
      EXPECT_TRUE((rel <= 1e-5).all().item<bool>())
          << testing::family_name(fam) << " r=" << r << " worst |err-opt|/|S| "
          << rel.max().item<double>();
    }
  }
  std::cout << "worst |err - eckart_young| / ||S||_F over all families: " << worst << "\n";
}

TEST(Projections, Float64InputIsOptimalToMachinePrecision) {
  auto gen = make_gen(2);
  auto q = testing::random_matrix(Family::kWellConditioned, 32, 30, 12, gen);
  auto k = testing::random_matrix(Family::kClustered, 32, 50, 12, gen);
  for (int64_t r : {2, 6, 11}) {
    auto c = check_rank(q, k, r);
    EXPECT_LE(((c.err - c.opt).abs() / c.norm).max().item<double>(), 1e-9) << "r=" << r;
  }
}

TEST(Projections, RankDeficientInputsNeverNaN) {
  auto gen = make_gen(3);
  const int64_t d = 16;
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  // Short segment N < d.
  auto q_short = torch::randn({4, 3, d}, gen, opt);
  auto k = torch::randn({4, 20, d}, gen, opt);
  // Repeated tokens: every row identical.
  auto q_rep = torch::randn({4, 1, d}, gen, opt).expand({4, 20, d}).contiguous();
  // Zero queries, and a single token.
  auto q_zero = torch::zeros({4, 20, d}, opt);
  auto q_one = torch::randn({4, 1, d}, gen, opt);
  // (queries, rank of S): a rank >= rank(S) must reproduce S.
  std::vector<std::pair<torch::Tensor, int64_t>> cases = {
      {q_short, 3}, {q_rep, 1}, {q_zero, 0}, {q_one, 1}};
  for (auto& [qq, rank_s] : cases) {
    for (int64_t r : {1, 2, 5, 16}) {
      auto c = check_rank(qq, k, r);
      auto rel = (c.err - c.opt).abs() / c.norm.clamp_min(1e-30);
      EXPECT_TRUE((rel <= 1e-5).all().item<bool>())
          << "rows=" << qq.size(1) << " r=" << r << " rel " << rel.max().item<double>();
      if (r >= rank_s) {
        EXPECT_TRUE((c.err <= 1e-5 * c.norm).all().item<bool>())
            << "rows=" << qq.size(1) << " r=" << r << " must reproduce S";
      }
    }
  }
  // Zero queries: zero spectrum and zero projections.
  auto p = optimal_score_projections(q_zero, k, 4);
  EXPECT_EQ(p.sigma.abs().max().item<double>(), 0.0);
  EXPECT_EQ(p.a_q.abs().max().item<double>(), 0.0);
}

TEST(Projections, GramVariantMatchesDirectAndBatchDimsAreFree) {
  auto gen = make_gen(4);
  auto opt = torch::TensorOptions().dtype(torch::kFloat32);
  auto q = torch::randn({2, 3, 25, 8}, gen, opt);
  auto k = torch::randn({2, 3, 31, 8}, gen, opt);
  auto p = optimal_score_projections(q, k, 4);
  ASSERT_EQ(p.a_q.sizes(), (std::vector<int64_t>{2, 3, 8, 4}));
  ASSERT_EQ(p.sigma.sizes(), (std::vector<int64_t>{2, 3, 8}));
  EXPECT_EQ(p.a_q.scalar_type(), torch::kFloat32);
  auto q64 = q.to(torch::kFloat64), k64 = k.to(torch::kFloat64);
  auto pg = optimal_score_projections_from_gram(torch::matmul(q64.transpose(-1, -2), q64),
                                                torch::matmul(k64.transpose(-1, -2), k64), 4);
  EXPECT_TRUE(torch::allclose(pg.sigma, p.sigma, 1e-10, 1e-12));
  // Compare the rank-4 scores (projections are unique only up to signs within the subspace).
  auto s1 = torch::matmul(torch::matmul(q64, p.a_q.to(torch::kFloat64)),
                          torch::matmul(k64, p.a_k.to(torch::kFloat64)).transpose(-1, -2));
  auto s2 = torch::matmul(torch::matmul(q64, pg.a_q), torch::matmul(k64, pg.a_k).transpose(-1, -2));
  EXPECT_LE((s1 - s2).abs().max().item<double>(), 1e-4 * s2.abs().max().item<double>());
}

TEST(Projections, LeadingColumnsAreTheLowerRankOptimum) {
  auto gen = make_gen(5);
  auto q = testing::random_matrix(Family::kWellConditioned, 16, 20, 10, gen);
  auto k = testing::random_matrix(Family::kWellConditioned, 16, 20, 10, gen);
  auto p8 = optimal_score_projections(q, k, 8);
  auto p3 = optimal_score_projections(q, k, 3);
  auto sr8 = torch::matmul(torch::matmul(q, p8.a_q.narrow(-1, 0, 3)),
                           torch::matmul(k, p8.a_k.narrow(-1, 0, 3)).transpose(-1, -2));
  auto sr3 = torch::matmul(torch::matmul(q, p3.a_q), torch::matmul(k, p3.a_k).transpose(-1, -2));
  EXPECT_LE((sr8 - sr3).abs().max().item<double>(), 1e-9);
}

TEST(Projections, RidgeIsFiniteAndNeverBeatsTheOptimum) {
  auto gen = make_gen(6);
  auto q = testing::random_matrix(Family::kIllConditioned, 32, 20, 12, gen);
  auto k = testing::random_matrix(Family::kWellConditioned, 32, 20, 12, gen);
  ProjectionOptions o;
  o.ridge = 1e-3;
  auto c = check_rank(q, k, 5, o, /*check_sigma=*/false);
  EXPECT_TRUE((c.err >= c.opt * (1 - 1e-9)).all().item<bool>());
  EXPECT_FALSE(c.err.isnan().any().item<bool>());
}

TEST(Projections, BadInputThrowsNamingTheValue) {
  auto q = torch::randn({10, 8});
  auto k = torch::randn({10, 8});
  EXPECT_THROW(optimal_score_projections(q, k, 0), InvalidArgument);
  EXPECT_THROW(optimal_score_projections(q, k, 9), InvalidArgument);
  EXPECT_THROW(optimal_score_projections(q, torch::randn({10, 7}), 2), InvalidArgument);
  EXPECT_THROW(optimal_score_projections(torch::randn({2, 10, 8}), torch::randn({3, 10, 8}), 2),
               InvalidArgument);
  ProjectionOptions bad;
  bad.ridge = -1;
  EXPECT_THROW(optimal_score_projections(q, k, 2, bad), InvalidArgument);
  try {
    optimal_score_projections(q, k, 12);
    FAIL() << "expected InvalidArgument";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("12"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace attnpilot::perturbation
