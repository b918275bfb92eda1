/// The executor's CUDA paths end to end, against the CPU: block masks the CUDA estimator leaves
/// on the device feed the block-sparse kernel with no host lists, and a decoding step (one
/// query, full or rank-r projected keys from a KVCache) runs the decode kernel. GPU tests skip
/// without a CUDA device.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <string>

#include "attention/attention.h"
#include "attention/backend.h"
#include "attention/block_mask.h"
#include "attention/estimators.h"
#include "attention/kv_cache.h"
#include "attention/lowrank.h"
#include "tests/attention/cuda_test_util.h"

namespace attnpilot::attention {
namespace {

using testing::kCuda;

/// bf16 output and P against float32 on the same bf16-rounded inputs (cuda_block_sparse_test's
/// measured bound, with the same margin).
constexpr double kRelTol = 1e-2;

double rel_err(const torch::Tensor& got, const torch::Tensor& want) {
  const auto g = got.to(torch::kCPU, torch::kDouble), w = want.to(torch::kCPU, torch::kDouble);
  EXPECT_TRUE(torch::isfinite(g).all().item<bool>()) << "non-finite output";
  return ((g - w).norm() / w.norm().clamp_min(1e-30)).item<double>();
}

/// Random float inputs rounded to bf16, on the CPU (float32) and the GPU (bf16).
struct Pair {
  AttentionInputs cpu, gpu;
};
Pair random_pair(uint64_t seed, int64_t b, int64_t h, int64_t hkv, int64_t n, int64_t m,
                 int64_t d) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto r = [&](std::initializer_list<int64_t> s) {
    return torch::randn(s, gen).to(torch::kBFloat16).to(torch::kFloat);
  };
  Pair p;
  p.cpu.q = r({b, h, n, d});
  p.cpu.k = r({b, hkv, m, d});
  p.cpu.v = r({b, hkv, m, d});
  // Keys of one block per head pulled towards the mean query, so the estimator has a clear
  // choice besides the sink and the diagonal.
  const auto dir = p.cpu.q.mean(2, true).mean(1, true);
  p.cpu.k.narrow(2, m / 3, 64).add_(2.0 * dir / dir.norm(2, -1, true));
  p.cpu.k = p.cpu.k.to(torch::kBFloat16).to(torch::kFloat);
  p.gpu = p.cpu;
  p.gpu.q = p.cpu.q.to(kCuda, torch::kBFloat16);
  p.gpu.k = p.cpu.k.to(kCuda, torch::kBFloat16);
  p.gpu.v = p.cpu.v.to(kCuda, torch::kBFloat16);
  return p;
}

TEST(CudaExecutor, EstimatorMasksStayOnTheDeviceAndFeedTheKernel) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA attention executor");
  const int64_t b = 2, h = 4, n = 640, m = 640, d = 128;
  auto io = random_pair(71, b, h, h, n, m, d);
  for (int64_t bs : {64, 128}) {
    for (int budget = 0; budget < 3; ++budget) {
      HeadPlan plan = HeadPlan::block_sparse(0.4, bs);
      plan.estimator = BlockEstimator::kLowRank;
      plan.rank = 16;
      if (budget == 1) plan.gamma = 0.9;  // lists sized by the scores (padded device lists)
      if (budget == 2) plan.top_k = 3;
      const std::string what = fmt::format("block {} {}", bs, plan.to_string());
      double flops = 0;
      const auto mask = estimate_block_mask(io.gpu.q, io.gpu.k, plan, true, 0, &flops);
      ASSERT_TRUE(mask.row_ptr.is_cuda() && mask.col_idx.is_cuda()) << what;
      EXPECT_GT(flops, 0) << what;
      const auto host = mask.on_host();
      EXPECT_FALSE(host.row_ptr.is_cuda());
      EXPECT_NO_THROW(host.validate(n, m, true, 0)) << what;
      // Random keys spread the mass, so a gamma budget may keep every block; the others
      // must leave some out.
      if (budget != 1) {
        EXPECT_LT(host.density(n, m, true, 0), 1.0) << what;
      }
      // Pair and key counts summed on the device equal the host loops.
      EXPECT_DOUBLE_EQ(mask.listed_pairs(n, m), host.listed_pairs(n, m)) << what;
      EXPECT_DOUBLE_EQ(mask.listed_keys(m), host.listed_keys(m)) << what;
      // The CUDA backend on the device lists against the CPU backend on the host copy.
      const auto& cuda = backend_for(kCuda);
      const auto& cpu = backend_for(torch::Device(torch::kCPU));
      const double scale = 1.0 / std::sqrt(static_cast<double>(d));
      const auto got = cuda.block_sparse(io.gpu.q, io.gpu.k, io.gpu.v, mask, scale, true, 0, 0, 0);
      const auto want = cpu.block_sparse(io.cpu.q, io.cpu.k, io.cpu.v, host, scale, true, 0, 0, 0);
      EXPECT_LT(rel_err(got.out, want.out), kRelTol) << what;
      EXPECT_DOUBLE_EQ(got.pairs, want.pairs) << what;
      // run_attention with the estimator plan on the GPU (projections, estimate, kernel, all
      // on the device) against the CPU executor given the same mask.
      AttentionInputs cpu_in = io.cpu;
      cpu_in.block_mask = &host;
      const auto g = run_attention(io.gpu, {LayerPlan::uniform(plan)});
      const auto c = run_attention(cpu_in, {LayerPlan::uniform(plan)});
      EXPECT_TRUE(g.out.is_cuda());
      EXPECT_LT(rel_err(g.out, c.out), kRelTol) << what;
      EXPECT_DOUBLE_EQ(g.stats.score_flops, c.stats.score_flops) << what;
      EXPECT_DOUBLE_EQ(g.stats.bytes, c.stats.bytes * 0.5) << what << " (bf16 vs float32 bytes)";
    }
  }
}

TEST(CudaExecutor, DecodeStepsRunTheDecodeKernelAndMatchCpu) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA attention executor");
  const int64_t b = 3, h = 4, hkv = 2, prefix = 333, d = 64, r = 16;
  auto io = random_pair(72, b, h, hkv, prefix + 1, prefix + 1, d);
  // Full keys: one query at the end of the cache (q_offset = M - 1), GQA read in place.
  {
    const auto q = io.gpu.q.narrow(2, prefix, 1), qc = io.cpu.q.narrow(2, prefix, 1);
    AttentionInputs g = io.gpu, c = io.cpu;
    g.q = q;
    c.q = qc;
    g.use_sdpa = c.use_sdpa = false;  // attend(), which sends one query to the decode kernel
    const auto got = run_attention(g, {LayerPlan::uniform(HeadPlan::dense())});
    const auto want = run_attention(c, {LayerPlan::uniform(HeadPlan::dense())});
    EXPECT_LT(rel_err(got.out, want.out), kRelTol) << "full-key decode";
    EXPECT_DOUBLE_EQ(got.stats.score_flops, want.stats.score_flops);
  }
  // Rank-r key cache: prefill, compress the keys, append one token, decode it.
  const auto proj =
      lowrank_projections(io.cpu.q.narrow(2, 0, prefix),
                          io.cpu.k.narrow(2, 0, prefix).repeat_interleave(h / hkv, 1), r);
  KVCache gpu_cache(1), cpu_cache(1);
  gpu_cache.append(0, io.gpu.k.narrow(2, 0, prefix), io.gpu.v.narrow(2, 0, prefix));
  cpu_cache.append(0, io.cpu.k.narrow(2, 0, prefix), io.cpu.v.narrow(2, 0, prefix));
  gpu_cache.compress_keys(0, proj.a_q.to(kCuda, torch::kBFloat16),
                          proj.a_k.to(kCuda, torch::kBFloat16));
  cpu_cache.compress_keys(0, proj.a_q.to(torch::kBFloat16).to(torch::kFloat),
                          proj.a_k.to(torch::kBFloat16).to(torch::kFloat));
  gpu_cache.append(0, io.gpu.k.narrow(2, prefix, 1), io.gpu.v.narrow(2, prefix, 1));
  cpu_cache.append(0, io.cpu.k.narrow(2, prefix, 1), io.cpu.v.narrow(2, prefix, 1));
  const auto plan = LayerPlan::uniform(HeadPlan::lowrank(r));
  const auto got = run_attention(gpu_cache.inputs(0, io.gpu.q.narrow(2, prefix, 1)), {plan});
  const auto want = run_attention(cpu_cache.inputs(0, io.cpu.q.narrow(2, prefix, 1)), {plan});
  EXPECT_TRUE(got.out.is_cuda());
  // The projected keys are rounded to bf16 on the GPU side only: a looser bound.
  EXPECT_LT(rel_err(got.out, want.out), 2 * kRelTol) << "rank-r key cache decode";
  EXPECT_DOUBLE_EQ(got.stats.score_flops, want.stats.score_flops);
}

}  // namespace
}  // namespace attnpilot::attention
