/// Conformance suite, in the OpenSpiel manner: every backend configuration runs the same
/// checks against dense_reference on fresh seeded random inputs.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <functional>

#include "attention/attention.h"
#include "attention/estimators.h"
#include "attention/kv_cache.h"
#include "attention/lowrank.h"
#include "tests/attention/test_util.h"

namespace attnpilot::attention {
namespace {

using testing::max_abs_diff;
using testing::random_inputs;
using testing::rel_error;

constexpr double kExactTol = 1e-5;
constexpr int64_t kBlock = 32;

/// A backend configuration: a plan ladder of growing budget whose last rung is exact.
struct BackendCase {
  std::string name;
  std::function<std::vector<HeadPlan>(int64_t d, int64_t len)> ladder;
  bool causal_only = false;
  bool use_sdpa = true;
};

HeadPlan sparse(double density, BlockEstimator est, int64_t rank = 0) {
  HeadPlan p = HeadPlan::block_sparse(density, kBlock);
  p.estimator = est;
  p.rank = rank;
  return p;
}

HeadPlan sparse_gamma(double gamma) {
  HeadPlan p = HeadPlan::block_sparse(1.0, kBlock);
  p.gamma = gamma;
  return p;
}

HeadPlan streaming(int64_t window, int64_t sinks) {
  HeadPlan p = HeadPlan::streaming(window, sinks);
  p.block_size = kBlock;
  return p;
}

std::vector<BackendCase> all_cases() {
  return {
      {"dense_sdpa", [](int64_t, int64_t) { return std::vector<HeadPlan>{HeadPlan::dense()}; }},
      {"dense_matmul", [](int64_t, int64_t) { return std::vector<HeadPlan>{HeadPlan::dense()}; },
       false, false},
      {"lowrank",
       [](int64_t d, int64_t) {
         return std::vector<HeadPlan>{HeadPlan::lowrank(d / 8), HeadPlan::lowrank(d / 4),
                                      HeadPlan::lowrank(d / 2), HeadPlan::lowrank(d)};
       }},
      {"sparse_pooled",
       [](int64_t, int64_t) {
         return std::vector<HeadPlan>{
             sparse(0.25, BlockEstimator::kPooled), sparse(0.5, BlockEstimator::kPooled),
             sparse(0.75, BlockEstimator::kPooled), sparse(1.0, BlockEstimator::kPooled)};
       }},
      {"sparse_lowrank_estimator",
       [](int64_t d, int64_t) {
         return std::vector<HeadPlan>{sparse(0.25, BlockEstimator::kLowRank, d / 4),
                                      sparse(0.5, BlockEstimator::kLowRank, d / 4),
                                      sparse(0.75, BlockEstimator::kLowRank, d / 4),
                                      sparse(1.0, BlockEstimator::kLowRank, d / 4)};
       }},
      {"sparse_vertical_slash",
       [](int64_t, int64_t) {
         return std::vector<HeadPlan>{sparse(0.25, BlockEstimator::kVerticalSlash),
                                      sparse(0.5, BlockEstimator::kVerticalSlash),
                                      sparse(0.75, BlockEstimator::kVerticalSlash),
                                      sparse(1.0, BlockEstimator::kVerticalSlash)};
       },
       true},
      {"sparse_gamma",
       [](int64_t, int64_t) {
         return std::vector<HeadPlan>{sparse_gamma(0.5), sparse_gamma(0.8), sparse_gamma(0.95),
                                      sparse_gamma(1.0)};
       }},
      {"streaming",
       [](int64_t, int64_t len) {
         return std::vector<HeadPlan>{streaming(16, 4), streaming(48, 4), streaming(96, 4),
                                      streaming(len, 4)};
       },
       true},
  };
}

class Conformance : public ::testing::TestWithParam<BackendCase> {
 protected:
  // Correctness only: one intra-op thread keeps the suite fast on shared 2-core CI machines
  // (two OpenMP threads spin-wait badly when the cores are oversubscribed).
  static void SetUpTestSuite() { at::set_num_threads(1); }

  AttentionResult run(AttentionInputs in, const HeadPlan& p) const {
    in.use_sdpa = GetParam().use_sdpa;
    return run_attention(in, {LayerPlan::uniform(p)});
  }
};

TEST_P(Conformance, EqualsDenseAtFullBudget) {
  const auto& c = GetParam();
  // Ragged lengths (not block multiples), batch 2, 4 heads, d = 32.
  for (bool causal : {true, false}) {
    if (!causal && c.causal_only) continue;
    for (auto [n, m] : {std::pair<int64_t, int64_t>{200, 200}, {70, 200}}) {
      if (!causal && n != m) continue;
      auto in = random_inputs(11 + n, 2, 4, 4, n, m, 32);
      in.causal = causal;
      const auto exact = c.ladder(32, m).back();
      const auto r = run(in, exact);
      EXPECT_LT(max_abs_diff(r.out, dense_reference(in)), kExactTol)
          << c.name << " causal=" << causal << " n=" << n << " m=" << m;
      EXPECT_GT(r.stats.score_flops, 0);
      EXPECT_EQ(r.stats.calls, 1);
    }
  }
}

TEST_P(Conformance, ErrorShrinksMonotonically) {
  const auto& c = GetParam();
  const int64_t len = 256, d = 32;
  // Queries scaled so attention is peaked enough for budgets to matter.
  const auto in = random_inputs(23, 1, 4, 4, len, len, d, 2.0);
  const auto ref = dense_reference(in);
  double prev = std::numeric_limits<double>::infinity();
  const auto ladder = c.ladder(d, len);
  for (size_t i = 0; i < ladder.size(); ++i) {
    const double err = rel_error(run(in, ladder[i]).out, ref);
    EXPECT_LE(err, prev + 1e-7) << c.name << " rung " << i << " " << ladder[i].to_string();
    prev = err;
  }
  EXPECT_LT(prev, kExactTol) << c.name;
  if (ladder.size() > 1) {
    EXPECT_GT(rel_error(run(in, ladder.front()).out, ref), 1e-3)
        << c.name << ": the smallest budget should not already be exact";
  }
}

TEST_P(Conformance, CausalMaskingExact) {
  const auto& c = GetParam();
  const int64_t len = 192, d = 32, cut = 128;  // cut is a block boundary
  auto in = random_inputs(31, 2, 4, 4, len, len, d);
  // Frozen side inputs: projections and block masks computed once from the original data,
  // so only the kernels' masking decides what the first `cut` rows see.
  const auto proj = lowrank_projections(in.q, in.k, d);
  in.a_q = proj.a_q;
  in.a_k = proj.a_k;
  const auto plan = c.ladder(d, len)[c.ladder(d, len).size() / 2];
  BlockMask mask;
  if (plan.kind == Kind::kBlockSparse) {
    double flops = 0;
    mask = estimate_block_mask(in.q, in.k, plan, true, 0, &flops, in.a_q, in.a_k);
    in.block_mask = &mask;
  }
  const auto before = run(in, plan).out;
  auto perturbed = in;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(99);
  perturbed.k = in.k.clone();
  perturbed.v = in.v.clone();
  perturbed.k.narrow(2, cut, len - cut).copy_(torch::randn({2, 4, len - cut, d}, gen) * 5);
  perturbed.v.narrow(2, cut, len - cut).copy_(torch::randn({2, 4, len - cut, d}, gen) * 5);
  const auto after = run(perturbed, plan).out;
  EXPECT_EQ(max_abs_diff(before.narrow(2, 0, cut), after.narrow(2, 0, cut)), 0.0) << c.name;
  EXPECT_GT(max_abs_diff(before.narrow(2, cut, len - cut), after.narrow(2, cut, len - cut)), 1e-3)
      << c.name << ": the perturbation must reach later rows";
}

TEST_P(Conformance, MixedBatchEqualsEachAlone) {
  const auto& c = GetParam();
  const int64_t len = 160, d = 32;
  const auto in = random_inputs(41, 3, 4, 4, len, len, d);
  const auto mid = c.ladder(d, len)[c.ladder(d, len).size() / 2];
  // Per sequence: mid, dense, mid with mixed heads.
  LayerPlan mixed{{mid, HeadPlan::dense(), HeadPlan::lowrank(8), streaming(40, 2)}};
  if (c.causal_only) mixed.heads[2] = mid;
  const std::vector<LayerPlan> plans{LayerPlan::uniform(mid), LayerPlan::dense(), mixed};
  auto batched_in = in;
  batched_in.use_sdpa = c.use_sdpa;
  const auto batched = run_attention(batched_in, plans);
  ExecStats alone_sum;
  for (int64_t b = 0; b < 3; ++b) {
    AttentionInputs one = batched_in;
    one.q = in.q.narrow(0, b, 1);
    one.k = in.k.narrow(0, b, 1);
    one.v = in.v.narrow(0, b, 1);
    const auto alone = run_attention(one, {plans[b]});
    alone_sum += alone.stats;
    EXPECT_LT(max_abs_diff(batched.out.narrow(0, b, 1), alone.out), 1e-6) << c.name << " b=" << b;
    // Heads of the mixed plan equal the same heads run with a uniform plan.
    if (b == 2)
      for (int64_t h = 0; h < 4; ++h) {
        const auto uni = run_attention(one, {LayerPlan::uniform(mixed.head(h))});
        EXPECT_LT(max_abs_diff(alone.out.narrow(1, h, 1), uni.out.narrow(1, h, 1)), 1e-6)
            << c.name << " head " << h;
      }
  }
  EXPECT_NEAR(batched.stats.flops(), alone_sum.flops(), 1e-6 * alone_sum.flops()) << c.name;
}

TEST_P(Conformance, GroupedQueryAttention) {
  const auto& c = GetParam();
  const int64_t len = 128, d = 32;
  auto in = random_inputs(53, 2, 8, 2, len, len, d);
  in.use_sdpa = c.use_sdpa;
  const auto ladder = c.ladder(d, len);
  EXPECT_LT(
      max_abs_diff(run_attention(in, {LayerPlan::uniform(ladder.back())}).out, dense_reference(in)),
      kExactTol)
      << c.name;
  // A reduced plan with GQA equals the same plan on explicitly repeated keys and values.
  auto expanded = in;
  expanded.k = in.k.repeat_interleave(4, 1);
  expanded.v = in.v.repeat_interleave(4, 1);
  const auto mid = ladder[ladder.size() / 2];
  EXPECT_LT(max_abs_diff(run_attention(in, {LayerPlan::uniform(mid)}).out,
                         run_attention(expanded, {LayerPlan::uniform(mid)}).out),
            1e-6)
      << c.name;
}

TEST_P(Conformance, CachedDecodingEqualsRecompute) {
  const auto& c = GetParam();
  const int64_t len = 96, prefill = 64, d = 32;
  auto full = random_inputs(61, 2, 4, 2, len, len, d);
  full.use_sdpa = c.use_sdpa;
  // Plans whose per-query result does not depend on the other queries: the exact rung for
  // block-sparse (estimates differ between a 1-query step and a prefill), the mid rung
  // otherwise; low-rank with projections fixed at prefill.
  const auto ladder = c.ladder(d, len);
  HeadPlan plan =
      ladder.back().kind == Kind::kBlockSparse || ladder.size() < 2 ? ladder.back() : ladder[1];
  if (plan.kind == Kind::kLowRank) {
    const auto kx = full.k.narrow(2, 0, prefill).repeat_interleave(2, 1);
    const auto p = lowrank_projections(full.q.narrow(2, 0, prefill), kx, d);
    full.a_q = p.a_q;
    full.a_k = p.a_k;
  }
  const auto ref = run_attention(full, {LayerPlan::uniform(plan)}).out;
  KVCache cache(2);
  auto step = [&](int64_t t0, int64_t t1) {
    cache.append(1, full.k.narrow(2, t0, t1 - t0), full.v.narrow(2, t0, t1 - t0));
    auto in = cache.inputs(1, full.q.narrow(2, t0, t1 - t0));
    in.use_sdpa = c.use_sdpa;
    in.a_q = full.a_q;
    in.a_k = full.a_k;
    return run_attention(in, {LayerPlan::uniform(plan)});
  };
  const auto pre = step(0, prefill);
  EXPECT_LT(max_abs_diff(pre.out, ref.narrow(2, 0, prefill)), 1e-5) << c.name;
  for (int64_t t = prefill; t < len; ++t) {
    const auto r = step(t, t + 1);
    ASSERT_LT(max_abs_diff(r.out, ref.narrow(2, t, 1)), 1e-5) << c.name << " t=" << t;
  }
  EXPECT_EQ(cache.length(1), len);
  EXPECT_EQ(cache.length(0), 0);
}

INSTANTIATE_TEST_SUITE_P(Backends, Conformance, ::testing::ValuesIn(all_cases()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace attnpilot::attention
