/// Unit tests: plan validation, FLOP accounting against hand formulas, block masks,
/// estimators, projections and the low-rank key cache.
#include <gtest/gtest.h>

#include <limits>

#include "attention/attention.h"
#include "attention/backend.h"
#include "attention/estimators.h"
#include "attention/kv_cache.h"
#include "attention/lowrank.h"
#include "common/error.h"
#include "tests/attention/test_util.h"

namespace attnpilot::attention {
namespace {

using testing::max_abs_diff;
using testing::random_inputs;

/// Runs f and returns the InvalidArgument message ("" if nothing was thrown).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "";
}

TEST(Plans, BadPlansRefusedWithClearErrors) {
  const auto in = random_inputs(1, 1, 2, 2, 16, 16, 8);
  auto msg = [&](const HeadPlan& p, int64_t layer = -1) {
    auto x = in;
    x.layer = layer;
    return error_of([&] { run_attention(x, {LayerPlan{{HeadPlan::dense(), p}}}); });
  };
  EXPECT_EQ(msg(HeadPlan::lowrank(9), 3),
            "layer 3: head 1: lowrank plan: rank 9 must be in [1, head_dim=8]");
  EXPECT_NE(msg(HeadPlan::lowrank(0)).find("rank 0"), std::string::npos);
  EXPECT_NE(msg(HeadPlan::block_sparse(0.0)).find("density 0 must be in (0, 1]"),
            std::string::npos);
  EXPECT_NE(msg(HeadPlan::block_sparse(1.5)).find("density 1.5"), std::string::npos);
  EXPECT_NE(msg(HeadPlan::block_sparse(0.5, 0)).find("block_size 0"), std::string::npos);
  EXPECT_NE(msg(HeadPlan::block_sparse(0.5, 1 << 20)).find("block_size 1048576"),
            std::string::npos);
  HeadPlan g = HeadPlan::block_sparse(0.5);
  g.gamma = 2;
  EXPECT_NE(msg(g).find("gamma 2"), std::string::npos);
  HeadPlan lr = HeadPlan::block_sparse(0.5);
  lr.estimator = BlockEstimator::kLowRank;
  EXPECT_NE(msg(lr).find("lowrank estimator: rank 0"), std::string::npos);
  EXPECT_NE(msg(HeadPlan::streaming(0, 4), 0).find("layer 0: head 1: streaming plan: window 0"),
            std::string::npos);
  EXPECT_NE(msg(HeadPlan::streaming(4, -1)).find("sinks -1"), std::string::npos);
  // Plan count and head count.
  EXPECT_NE(error_of([&] {
              run_attention(in, {LayerPlan::dense(), LayerPlan::dense()});
            }).find("2 plans for a batch of 1"),
            std::string::npos);
  EXPECT_NE(
      error_of([&] {
        run_attention(in, {LayerPlan{{HeadPlan::dense(), HeadPlan::dense(), HeadPlan::dense()}}});
      }).find("3 head plans; expected 1 or num_heads=2"),
      std::string::npos);
  EXPECT_THROW(parse_kind("sparse"), InvalidArgument);
  EXPECT_EQ(parse_estimator("vertical_slash"), BlockEstimator::kVerticalSlash);
  // Streaming without causal masking is refused.
  auto nc = in;
  nc.causal = false;
  EXPECT_NE(error_of([&] {
              run_attention(nc, {LayerPlan::uniform(HeadPlan::streaming(4, 1))});
            }).find("streaming needs causal"),
            std::string::npos);
}

TEST(Flops, MatchHandFormulas) {
  const int64_t B = 2, H = 3, N = 300, d = 16;
  auto in = random_inputs(2, B, H, H, N, N, d);
  // Dense SDPA: causal pairs N(N+1)/2.
  auto r = run_attention(in, {LayerPlan::dense()});
  EXPECT_DOUBLE_EQ(r.stats.score_flops, 2.0 * B * H * (N * (N + 1) / 2.0) * d);
  EXPECT_DOUBLE_EQ(r.stats.value_flops, r.stats.score_flops);
  EXPECT_DOUBLE_EQ(r.stats.other_flops, 0);
  // Chunked matmul kernel (chunks of 128 rows score keys up to the chunk's last row).
  const double chunk_pairs = 128.0 * 128 + 128.0 * 256 + 44.0 * 300;
  in.use_sdpa = false;
  r = run_attention(in, {LayerPlan::dense()});
  EXPECT_DOUBLE_EQ(r.stats.score_flops, 2.0 * B * H * chunk_pairs * d);
  // Low rank r = 4 with given projections: scores at rank 4, values at d, projections
  // Q A_Q and K A_K in other_flops.
  const auto p = lowrank_projections(in.q, in.k, d);
  in.a_q = p.a_q;
  in.a_k = p.a_k;
  r = run_attention(in, {LayerPlan::uniform(HeadPlan::lowrank(4))});
  EXPECT_DOUBLE_EQ(r.stats.score_flops, 2.0 * B * H * chunk_pairs * 4);
  EXPECT_DOUBLE_EQ(r.stats.value_flops, 2.0 * B * H * chunk_pairs * d);
  EXPECT_DOUBLE_EQ(r.stats.other_flops, 2.0 * B * H * (N + N) * d * 4);
  // On the fly, the factorization cost is added.
  in.a_q = in.a_k = torch::Tensor();
  const auto r2 = run_attention(in, {LayerPlan::uniform(HeadPlan::lowrank(4))});
  EXPECT_DOUBLE_EQ(r2.stats.other_flops,
                   r.stats.other_flops + lowrank_projections(in.q, in.k, 4).flops);
  // Streaming N = 64, block 16, sinks 4, window 16: blocks {0}, {0,1}, {0,1,2}, {0,2,3}.
  auto s = random_inputs(3, 1, 2, 2, 64, 64, d);
  HeadPlan st = HeadPlan::streaming(16, 4);
  st.block_size = 16;
  r = run_attention(s, {LayerPlan::uniform(st)});
  EXPECT_DOUBLE_EQ(r.stats.score_flops, 2.0 * 2 * (16.0 * (16 + 32 + 48 + 48)) * d);
  // Block-sparse with an explicit mask over 40 x 40 (blocks of 16: 16, 16, 8 long).
  auto bsin = random_inputs(4, 1, 1, 1, 40, 40, d);
  const auto mask = BlockMask::from_rows(1, 1, 3, 3, 16, {{0}, {0, 1}, {1, 2}});
  bsin.block_mask = &mask;
  r = run_attention(bsin, {LayerPlan::uniform(HeadPlan::block_sparse(0.5, 16))});
  EXPECT_DOUBLE_EQ(r.stats.score_flops, 2.0 * (16 * 16 + 16 * 32 + 8 * (16 + 8)) * d);
  EXPECT_DOUBLE_EQ(r.stats.other_flops, 0);
  // Pooled estimator cost: pooling (N+M)d + block scores 2 * qb * kb * d.
  bsin.block_mask = nullptr;
  r = run_attention(bsin, {LayerPlan::uniform(HeadPlan::block_sparse(0.5, 16))});
  EXPECT_DOUBLE_EQ(r.stats.other_flops, (40.0 + 40) * d + 2.0 * 3 * 3 * d);
}

TEST(BlockMasks, ValidationNamesTheProblem) {
  auto ok = BlockMask::from_rows(1, 1, 2, 2, 8, {{0}, {0, 1}});
  EXPECT_NO_THROW(ok.validate(16, 16, true, 0));
  EXPECT_NE(error_of([&] { ok.validate(20, 16, true, 0); }).find("do not fit 20 queries"),
            std::string::npos);
  auto unsorted = BlockMask::from_rows(1, 1, 2, 2, 8, {{0}, {1, 0}});
  EXPECT_NE(error_of([&] { unsorted.validate(16, 16, true, 0); }).find("not ascending"),
            std::string::npos);
  auto range = BlockMask::from_rows(1, 1, 2, 2, 8, {{0}, {0, 2}});
  EXPECT_NE(error_of([&] { range.validate(16, 16, true, 0); }).find("key block 2"),
            std::string::npos);
  // Query block 0 (positions 0..7) listing only key block 1 sees no key.
  auto blind = BlockMask::from_rows(1, 1, 2, 2, 8, {{1}, {0, 1}});
  EXPECT_NE(error_of([&] { blind.validate(16, 16, true, 0); }).find("row 0"), std::string::npos);
  EXPECT_NO_THROW(blind.validate(16, 16, false, 0));
  // A bad mask passed to run_attention is refused before any kernel runs.
  auto in = random_inputs(5, 1, 1, 1, 16, 16, 8);
  in.block_mask = &blind;
  EXPECT_THROW(run_attention(in, {LayerPlan::uniform(HeadPlan::block_sparse(0.5, 8))}),
               InvalidArgument);
  // select() keeps the right rows.
  auto two = BlockMask::from_rows(1, 2, 1, 2, 8, {{0}, {0, 1}});
  const auto sel = two.select({0}, {1});
  EXPECT_EQ(sel.row(0, 0, 0), (std::vector<int64_t>{0, 1}));
}

TEST(BlockMasks, QueriesThatSeeNoKeyGetZerosFromTheCpuBackend) {
  // Head 0 lists nothing for query block 1; head 1 lists block 1 (in the causal future of
  // nothing: its own positions). Backends give zero rows there, never softmax's NaN.
  auto in = random_inputs(11, 1, 2, 2, 16, 16, 8);
  const auto mask = BlockMask::from_rows(1, 2, 2, 2, 8, {{0}, {}, {0}, {1}});
  const auto& cpu = backend_for(torch::Device(torch::kCPU));
  const auto out = cpu.block_sparse(in.q, in.k, in.v, mask, 0.5, true, 0, 0, 0).out;
  ASSERT_TRUE(torch::isfinite(out).all().item<bool>());
  EXPECT_EQ(out[0][0].narrow(0, 8, 8).abs().max().item<double>(), 0.0);
  // Head 1, block 1: attends only to keys 8..i, so row 8 is v[8] exactly.
  EXPECT_LT((out[0][1][8] - in.v[0][1][8]).abs().max().item<double>(), 1e-6);
  // Rows with keys are unaffected: head 0, query 3 attends to keys 0..3.
  const auto s = torch::matmul(in.q[0][0][3], in.k[0][0].narrow(0, 0, 4).t()) * 0.5;
  const auto want = torch::matmul(torch::softmax(s, -1), in.v[0][0].narrow(0, 0, 4));
  EXPECT_LT((out[0][0][3] - want).abs().max().item<double>(), 1e-6);
  // A NaN input still propagates (bad input is never silently zeroed).
  auto bad = in.q.clone();
  bad[0][0][3][0] = std::numeric_limits<float>::quiet_NaN();
  const auto nan_out = cpu.block_sparse(bad, in.k, in.v, mask, 0.5, true, 0, 0, 0).out;
  EXPECT_TRUE(torch::isnan(nan_out[0][0][3]).all().item<bool>());
}

/// Keys of block `hot` point along the mean query direction, so every query attends there.
AttentionInputs planted(int64_t hot, int64_t len, int64_t d, int64_t bs) {
  auto in = random_inputs(7, 1, 2, 2, len, len, d);
  const auto dir = in.q.mean(2, true);  // [1,2,1,d]
  in.q = in.q + 3 * dir / dir.norm(2, -1, true);
  in.k.narrow(2, hot * bs, bs).add_(6 * dir / dir.norm(2, -1, true));
  return in;
}

TEST(Estimators, FindAPlantedBlockAndKeepSinkAndDiagonal) {
  const int64_t len = 256, d = 32, bs = 32, hot = 3;
  const auto in = planted(hot, len, d, bs);
  for (int variant = 0; variant < 4; ++variant) {
    const BlockEstimator est = std::vector<BlockEstimator>{
        BlockEstimator::kPooled, BlockEstimator::kLowRank, BlockEstimator::kVerticalSlash,
        BlockEstimator::kLowRank}[variant];
    HeadPlan p = HeadPlan::block_sparse(0.5, bs);
    p.estimator = est;
    p.pool_queries = variant == 3;  // the low-rank estimator with one pooled query per block
    p.rank = 8;
    p.top_k = 3;  // sink + diagonal + one more: the planted block
    double flops = 0;
    const auto mask = estimate_block_mask(in.q, in.k, p, true, 0, &flops);
    EXPECT_NO_THROW(mask.validate(len, len, true, 0));
    EXPECT_GT(flops, 0) << estimator_name(est);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t qb = 0; qb < len / bs; ++qb) {
        const auto row = mask.row(0, h, qb);
        EXPECT_EQ(row.front(), 0) << estimator_name(est);
        EXPECT_EQ(row.back(), qb) << estimator_name(est);
        if (qb > hot + 1) {
          EXPECT_NE(std::find(row.begin(), row.end(), hot), row.end())
              << estimator_name(est) << " head " << h << " query block " << qb;
          EXPECT_EQ(row.size(), 3u) << estimator_name(est);
        }
      }
  }
}

// pooled_block_scores against block means, scores and a softmax written out in float64, with a
// short last block on both sides, an offset of the queries and both masks.
TEST(Estimators, PooledScoresMatchAnExplicitReference) {
  struct Shape {
    int64_t n, m, bs, q_offset;
    bool causal;
  };
  for (const Shape& c : {Shape{100, 130, 32, 30, true}, Shape{64, 64, 32, 0, true},
                         Shape{70, 45, 16, 0, false}, Shape{1, 200, 64, 199, true}}) {
    const auto in = random_inputs(11 + c.n, 2, 3, 3, c.n, c.m, 24);
    double flops = 0;
    const auto got = pooled_block_scores(in.q, in.k, c.bs, c.causal, c.q_offset, &flops);
    const int64_t qb_n = (c.n + c.bs - 1) / c.bs, kb_n = (c.m + c.bs - 1) / c.bs;
    ASSERT_EQ(got.sizes(), (std::vector<int64_t>{2, 3, qb_n, kb_n}));
    const auto q = in.q.to(torch::kDouble), k = in.k.to(torch::kDouble);
    auto mean_rows = [&](const torch::Tensor& x, int64_t i, int64_t len) {
      const int64_t r0 = i * c.bs, r1 = std::min(len, r0 + c.bs);
      return x.narrow(2, r0, r1 - r0).mean(2);  // [b, h, d]
    };
    for (int64_t qb = 0; qb < qb_n; ++qb) {
      const int64_t last_q = c.q_offset + std::min(c.n, (qb + 1) * c.bs) - 1;
      const int64_t vis = c.causal ? std::min(kb_n, last_q / c.bs + 1) : kb_n;
      auto s = torch::empty({2, 3, vis}, torch::kDouble);
      for (int64_t kb = 0; kb < vis; ++kb)
        s.select(2, kb).copy_((mean_rows(q, qb, c.n) * mean_rows(k, kb, c.m)).sum(-1) /
                              std::sqrt(24.0));
      const auto want = torch::softmax(s, -1);
      const auto row = got.select(2, qb).to(torch::kDouble);
      EXPECT_LE((row.narrow(2, 0, vis) - want).abs().max().item<double>(), 1e-5)
          << "n " << c.n << " m " << c.m << " query block " << qb;
      if (vis < kb_n) {
        EXPECT_EQ(row.narrow(2, vis, kb_n - vis).abs().max().item<double>(), 0.0);
      }
    }
  }
}

// lowrank_block_scores with pooled queries against the same quantity written out in float64:
// the block's mean projected query against every key up to its last query, softmax, block sums.
TEST(Estimators, LowRankPooledQueriesMatchAnExplicitReference) {
  struct Shape {
    int64_t n, m, bs, q_offset;
    bool causal;
  };
  for (const Shape& c :
       {Shape{100, 130, 32, 30, true}, Shape{70, 45, 16, 0, false}, Shape{1, 200, 64, 199, true}}) {
    const int64_t d = 24, r = 5;
    const auto in = random_inputs(31 + c.n, 1, 2, 2, c.n, c.m, d);
    auto gen = at::make_generator<at::CPUGeneratorImpl>(77 + c.n);
    const auto a_q = torch::randn({1, 2, d, r}, gen), a_k = torch::randn({1, 2, d, r}, gen);
    double flops = 0, sampled_flops = 0;
    const auto got = lowrank_block_scores(in.q, in.k, a_q, a_k, c.bs, c.causal, c.q_offset, &flops,
                                          /*pool_queries=*/true);
    (void)lowrank_block_scores(in.q, in.k, a_q, a_k, c.bs, c.causal, c.q_offset, &sampled_flops);
    if (c.n >= 8 * 2) {
      EXPECT_LT(flops, sampled_flops) << "pooling scores fewer pairs";
    }
    const int64_t qb_n = (c.n + c.bs - 1) / c.bs, kb_n = (c.m + c.bs - 1) / c.bs;
    const auto qp =
        torch::matmul(in.q.to(torch::kDouble), a_q.to(torch::kDouble)) / std::sqrt(24.0);
    const auto kp = torch::matmul(in.k.to(torch::kDouble), a_k.to(torch::kDouble));
    for (int64_t qb = 0; qb < qb_n; ++qb) {
      const int64_t i0 = qb * c.bs, rows = std::min(c.bs, c.n - i0);
      const int64_t kend = c.causal ? std::min(c.m, c.q_offset + i0 + rows) : c.m;
      const int64_t vis = (kend + c.bs - 1) / c.bs;
      const auto pq = qp.narrow(2, i0, rows).mean(2, true);  // [1, 2, 1, r]
      const auto mass =
          torch::softmax(torch::matmul(pq, kp.narrow(2, 0, kend).transpose(-2, -1)), -1);
      for (int64_t head = 0; head < 2; ++head)
        for (int64_t kb = 0; kb < kb_n; ++kb) {
          const double want = kb < vis ? mass[0][head][0]
                                             .narrow(0, kb * c.bs, std::min(c.bs, kend - kb * c.bs))
                                             .sum()
                                             .item<double>()
                                       : 0.0;
          EXPECT_NEAR(got[0][head][qb][kb].item<double>(), want, 1e-5)
              << "n " << c.n << " head " << head << " query block " << qb << " key block " << kb;
        }
    }
  }
}

TEST(Estimators, GammaKeepsFewestBlocksReachingMass) {
  const auto scores = torch::tensor({0.05, 0.1, 0.6, 0.15, 0.1}, torch::kDouble).view({1, 1, 1, 5});
  HeadPlan p = HeadPlan::block_sparse(1.0, 4);
  p.gamma = 0.75;
  // Query block 0 with q_offset 16 (positions 16..19): diagonal block 4; sink 0.
  // Forced {0, 4} = 0.15, then 2 (0.6) -> 0.75 reaches gamma.
  const auto m = select_blocks(scores, p, 4, 20, true, 16);
  EXPECT_EQ(m.row(0, 0, 0), (std::vector<int64_t>{0, 2, 4}));
  p.gamma = 0;
  p.top_k = 4;
  EXPECT_EQ(select_blocks(scores, p, 4, 20, true, 16).row(0, 0, 0),
            (std::vector<int64_t>{0, 2, 3, 4}));
}

TEST(LowRank, ProjectionsAreOptimal) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(8);
  const auto q = torch::randn({3, 100, 16}, gen, torch::kDouble);
  const auto k = torch::randn({3, 120, 16}, gen, torch::kDouble);
  const auto s = torch::matmul(q, k.transpose(-2, -1));
  const auto sv = torch::linalg_svdvals(s);  // true singular values of S
  for (int64_t r : {1, 4, 16}) {
    const auto p = lowrank_projections(q, k, r);
    const auto approx =
        torch::matmul(torch::matmul(q, p.a_q), torch::matmul(k, p.a_k).transpose(-2, -1));
    const auto err2 = (s - approx).pow(2).sum({-2, -1});
    const auto tail = sv.narrow(-1, r, 16 - r).pow(2).sum(-1);
    EXPECT_LT((err2 - tail).abs().max().item<double>(), 1e-8 * s.pow(2).sum().item<double>())
        << "rank " << r;
    EXPECT_LT((p.sigma - sv.narrow(-1, 0, 16)).abs().max().item<double>(), 1e-8);
  }
  // Rank-deficient queries (N < d) still give an exact full-rank reconstruction.
  const auto q1 = torch::randn({1, 3, 16}, gen, torch::kDouble);
  const auto p1 = lowrank_projections(q1, k.narrow(0, 0, 1), 16);
  const auto s1 = torch::matmul(q1, k.narrow(0, 0, 1).transpose(-2, -1));
  EXPECT_LT(max_abs_diff(torch::matmul(torch::matmul(q1, p1.a_q),
                                       torch::matmul(k.narrow(0, 0, 1), p1.a_k).transpose(-2, -1)),
                         s1),
            1e-8);
}

TEST(KVCache, LowRankKeyCacheDecodesLikeRecomputeAndReadsFewerBytes) {
  const int64_t B = 2, Hq = 4, Hkv = 2, len = 80, prefill = 48, d = 32, r = 8;
  auto full = random_inputs(9, B, Hq, Hkv, len, len, d);
  const auto proj = lowrank_projections(full.q.narrow(2, 0, prefill),
                                        full.k.narrow(2, 0, prefill).repeat_interleave(2, 1), r);
  full.a_q = proj.a_q;
  full.a_k = proj.a_k;
  const auto plan = LayerPlan::uniform(HeadPlan::lowrank(r));
  const auto ref = run_attention(full, {plan}).out;
  KVCache lowrank(1), plain(1);
  lowrank.append(0, full.k.narrow(2, 0, prefill), full.v.narrow(2, 0, prefill));
  plain.append(0, full.k.narrow(2, 0, prefill), full.v.narrow(2, 0, prefill));
  const double full_key_bytes = lowrank.key_bytes(0);
  lowrank.compress_keys(0, proj.a_q, proj.a_k);
  EXPECT_TRUE(lowrank.lowrank(0));
  EXPECT_FALSE(lowrank.keys(0).defined());
  EXPECT_DOUBLE_EQ(lowrank.key_bytes(0), full_key_bytes * (Hq * r) / double(Hkv * d));
  for (int64_t t = prefill; t < len; ++t) {
    lowrank.append(0, full.k.narrow(2, t, 1), full.v.narrow(2, t, 1));
    plain.append(0, full.k.narrow(2, t, 1), full.v.narrow(2, t, 1));
    const auto q = full.q.narrow(2, t, 1);
    const auto a = run_attention(lowrank.inputs(0, q), {plan});
    auto pin = plain.inputs(0, q);
    pin.a_q = proj.a_q;
    pin.a_k = proj.a_k;
    const auto b = run_attention(pin, {plan});
    ASSERT_LT(max_abs_diff(a.out, ref.narrow(2, t, 1)), 1e-5) << "t=" << t;
    EXPECT_LT(a.stats.bytes, b.stats.bytes);
    EXPECT_LT(a.stats.other_flops, b.stats.other_flops);  // no K A_K recomputation
  }
  // A dense plan cannot run on projected keys.
  EXPECT_THROW(run_attention(lowrank.inputs(0, full.q.narrow(2, len - 1, 1)), {LayerPlan::dense()}),
               InvalidArgument);
  EXPECT_THROW(run_attention(lowrank.inputs(0, full.q.narrow(2, len - 1, 1)),
                             {LayerPlan::uniform(HeadPlan::lowrank(r + 1))}),
               InvalidArgument);
  EXPECT_THROW(lowrank.append(1, full.k, full.v), InvalidArgument);
}

}  // namespace
}  // namespace attnpilot::attention
