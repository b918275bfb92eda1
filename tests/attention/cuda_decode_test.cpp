/// The split-K CUDA decode kernel (decode_attention.cu, cuda_decode.h) against a float64 CPU
/// reference (plain softmax per sequence) on fresh random inputs: projected (e = r) and full
/// (e = d, GQA) keys, dv 64 and 128, ragged lengths with 0 and 1, capacity > length and padded
/// rows (strided views), bf16 and fp16, outputs and workspace poisoned with NaN before each run;
/// and against KVCache in low-rank mode + run_attention on the CPU for one decode step. GPU tests
/// skip without a CUDA device; the argument checks of the launcher and the planner run everywhere.
#include "attention/cuda/cuda_decode.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/cuda/decode_kernels.h"
#include "attention/kv_cache.h"
#include "common/error.h"
#include "tests/attention/cuda_test_util.h"

namespace attnpilot::attention {
namespace {

using testing::expect_close;
using testing::kCuda;
using testing::Tol;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// Tolerances against the float64 reference on the same (rounded) inputs: fp32 arithmetic, the
/// output rounded once to bf16 (2^-9 relative) or fp16 (2^-12). A CPU emulation of the kernel
/// (2026-11-29, 180 random shapes incl. peaked scores) measured at worst: relative 1.8e-3 (bf16)
/// and 2.3e-4 (fp16), absolute 7.8e-3 and 9.8e-4.
Tol tolerance(torch::ScalarType dt) {
  return dt == torch::kBFloat16 ? Tol{6e-3, 2.5e-2} : Tol{1.5e-3, 4e-3};
}

/// out[b, h] = softmax(scale · q[b,h] · k[b, h/(Hq/Hk), 0:len]ᵀ) · v[b, h/(Hq/Hkv), 0:len] in
/// float64 on the CPU, one (b, h) at a time; zeros for len = 0.
torch::Tensor reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const std::vector<int64_t>& lengths, double scale) {
  const auto f = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kDouble); };
  const int64_t b = q.size(0), hq = q.size(1), hk = k.size(1), hkv = v.size(1);
  const auto qd = f(q);
  auto out = torch::zeros({b, hq, v.size(3)}, torch::kDouble);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t len = lengths[static_cast<size_t>(i)];
    if (len == 0) continue;
    for (int64_t h = 0; h < hq; ++h) {
      const auto kh = f(k[i][h / (hq / hk)].narrow(0, 0, len));   // [len, e]
      const auto vh = f(v[i][h / (hq / hkv)].narrow(0, 0, len));  // [len, dv]
      const auto s = torch::mv(kh, qd[i][h]) * scale;
      out[i][h] = torch::mv(vh.t(), torch::softmax(s, 0));
    }
  }
  return out;
}

/// The raw launcher into a NaN-poisoned output and workspace; every CUDA call checked.
torch::Tensor launch(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const std::vector<int64_t>& lengths, double scale,
                     cuda::DecodePlan* plan_out) {
  const int64_t b = q.size(0), hq = q.size(1);
  auto out = torch::full({b, hq, v.size(3)}, kNaN, q.options());
  const auto len = torch::tensor(std::vector<int32_t>(lengths.begin(), lengths.end()), torch::kInt)
                       .to(q.device());
  cuda::DecodeLaunch p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lengths = len.data_ptr<int32_t>();
  p.q_stride[0] = q.stride(0);
  p.q_stride[1] = q.stride(1);
  for (int i = 0; i < 3; ++i) {
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.batch = static_cast<int>(b);
  p.heads = static_cast<int>(hq);
  p.k_heads = static_cast<int>(k.size(1));
  p.v_heads = static_cast<int>(v.size(1));
  p.capacity = k.size(2);
  for (int64_t l : lengths) p.max_length = std::max(p.max_length, l);
  p.e = static_cast<int>(q.size(2));
  p.dv = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  int sms = 0;
  EXPECT_EQ(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0), cudaSuccess);
  const auto plan = cuda::plan_decode(p, sms);
  torch::Tensor ws;
  if (plan.workspace_bytes > 0)
    ws = torch::full({plan.workspace_bytes / 4}, kNaN, q.options().dtype(torch::kFloat));
  const auto type = q.scalar_type() == torch::kBFloat16 ? cuda::DecodeType::kBFloat16
                                                        : cuda::DecodeType::kFloat16;
  const char* failed = "";
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  cudaError_t e = cuda::launch_decode_attention(p, plan, ws.defined() ? ws.data_ptr() : nullptr,
                                                type, stream, &failed);
  EXPECT_EQ(e, cudaSuccess) << failed << ": " << cudaGetErrorString(e);
  e = cudaStreamSynchronize(stream);
  EXPECT_EQ(e, cudaSuccess) << "cudaStreamSynchronize after the kernels: " << cudaGetErrorString(e);
  if (plan_out) *plan_out = plan;
  return out;
}

/// A [b, h, cap, dim] view of a larger random buffer drawn on the GPU: rows padded to dim + pad
/// (pad a multiple of 8), so the strides differ from a packed tensor's.
torch::Tensor cache_view(int64_t b, int64_t h, int64_t cap, int64_t dim, int64_t pad,
                         torch::ScalarType dt) {
  const auto buf =
      torch::randn({b, h, cap, dim + pad}, torch::TensorOptions().device(kCuda)).to(dt);
  return buf.narrow(3, 0, dim);
}

struct HeadCase {
  int64_t hq, hk, hkv;
};

TEST(CudaDecode, KernelMatchesFloat64Reference) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA decode kernel");
  std::mt19937_64 rng(20261129);
  int seed = 0, multi_split = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf})
    for (int64_t e : {8, 16, 24, 32, 64, 128, 256})
      for (int64_t dv : {64, 128}) {
        // Projected keys have one key head per query head; full keys one per kv head (GQA).
        const bool projected = e <= 32;
        std::vector<HeadCase> heads =
            projected ? std::vector<HeadCase>{{4, 4, 4}, {8, 8, 2}, {12, 12, 2}}
                      : std::vector<HeadCase>{{4, 4, 4}, {8, 2, 2}, {6, 2, 2}, {8, 4, 2}};
        for (const HeadCase& hc : heads) {
          auto gen = at::make_generator<at::CPUGeneratorImpl>(500 + seed++);
          std::uniform_int_distribution<int64_t> len_dist(2, 1500);
          const int64_t b = 5;
          // Ragged: 0, 1, one under a tile boundary, random lengths.
          std::vector<int64_t> lengths = {0, 1, 63, len_dist(rng), len_dist(rng)};
          std::shuffle(lengths.begin(), lengths.end(), rng);
          int64_t longest = 0;
          for (int64_t l : lengths) longest = std::max(longest, l);
          const int64_t cap = longest + 1 + static_cast<int64_t>(rng() % 100);
          const double scale = 1.0 / std::sqrt(static_cast<double>(e));
          // Peaked scores: queries x 6 (chunk maxima far apart) or x 40 (logits past 2^128 in
          // log2 units: the combine must shift by the global max).
          const double q_mult = seed % 5 == 0 ? 40.0 : seed % 3 == 0 ? 6.0 : 1.0;
          const auto q = (torch::randn({b, hc.hq, e}, gen) * q_mult).to(kCuda, dt);
          const auto k = cache_view(b, hc.hk, cap, e, 8 * (seed % 2), dt);
          const auto v = cache_view(b, hc.hkv, cap, dv, 8 * ((seed / 2) % 2), dt);
          const std::string what =
              fmt::format("{} e={} dv={} heads {}/{}/{} lengths {} cap {}", c10::toString(dt), e,
                          dv, hc.hq, hc.hk, hc.hkv, fmt::join(lengths, ","), cap);
          cuda::DecodePlan plan;
          const auto out = launch(q, k, v, lengths, scale, &plan);
          multi_split += plan.splits > 1;
          const auto want = reference(q, k, v, lengths, scale);
          expect_close(out, want, tolerance(dt),
                       what + fmt::format(" ({} splits of {})", plan.splits, plan.chunk));
          // Length 0 gives exact zeros.
          const auto oc = out.cpu().to(torch::kDouble);
          for (int64_t i = 0; i < b; ++i) {
            if (lengths[static_cast<size_t>(i)] == 0) {
              EXPECT_EQ(oc[i].abs().max().item<double>(), 0.0) << what << " batch " << i;
            }
          }
          // Same inputs, same bits: a race would show as a difference between runs.
          EXPECT_TRUE(torch::equal(out, launch(q, k, v, lengths, scale, nullptr)))
              << what << ": two runs differ";
          // The tensor-level entry (lengths on the GPU as int64, then on the CPU as int32).
          const auto len64 = torch::tensor(lengths, torch::kLong);
          EXPECT_TRUE(torch::equal(out, decode_attention_cuda(q, k, v, len64.to(kCuda), scale)))
              << what << ": decode_attention_cuda differs from the launcher";
          EXPECT_TRUE(
              torch::equal(out, decode_attention_cuda(q, k, v, len64.to(torch::kInt), scale)))
              << what << ": decode_attention_cuda (CPU lengths) differs from the launcher";
        }
      }
  EXPECT_GT(multi_split, 0) << "no case ran the combining phase";
}

// Long caches: chunks of the maximum size (8·dv keys); hundreds of splits; one split per
// (b, head block) for a short cache; the first sequence of each batch much shorter.
TEST(CudaDecode, LongCachesAndFullGrids) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA decode kernel");
  int seed = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    for (const auto& [b, hc, e, dv, longest] :
         std::vector<std::tuple<int64_t, HeadCase, int64_t, int64_t, int64_t>>{
             {16, {32, 32, 32}, 32, 128, 6000},   // r = 32 keys, no GQA: 1024-key chunks
             {2, {32, 8, 8}, 128, 128, 9000},     // full keys, GQA 4
             {1, {8, 8, 2}, 16, 64, 30000},       // r = 16 keys, GQA 4, dv 64
             {64, {32, 32, 32}, 32, 128, 40}}) {  // short: one split per (b, head)
      auto gen = at::make_generator<at::CPUGeneratorImpl>(900 + seed++);
      std::vector<int64_t> lengths(static_cast<size_t>(b), longest);
      lengths[0] = longest / 7 + 3;
      const double scale = 1.0 / std::sqrt(static_cast<double>(e));
      const auto q = torch::randn({b, hc.hq, e}, gen).to(kCuda, dt);
      const auto k = cache_view(b, hc.hk, longest + 5, e, 0, dt);
      const auto v = cache_view(b, hc.hkv, longest + 5, dv, 0, dt);
      cuda::DecodePlan plan;
      const auto out = launch(q, k, v, lengths, scale, &plan);
      const std::string what = fmt::format(
          "{} b={} heads {}/{}/{} e={} dv={} len={} ({} splits of {})", c10::toString(dt), b, hc.hq,
          hc.hk, hc.hkv, e, dv, longest, plan.splits, plan.chunk);
      expect_close(out, reference(q, k, v, lengths, scale), tolerance(dt), what);
      if (b == 16) {
        EXPECT_EQ(plan.chunk, 8 * dv) << what;
      }
      if (longest >= 9000) {
        EXPECT_GT(plan.splits, 60) << what;
      }
      if (longest == 40) {
        EXPECT_EQ(plan.splits, 1) << what;
      }
    }
  }
}

// The end-to-end twin: one decode step of a low-rank KVCache through run_attention on the CPU
// against q·A_Q and the cache's projected keys and values through the CUDA kernel.
TEST(CudaDecode, MatchesLowRankKvCacheDecodeOnCpu) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA decode kernel");
  const int64_t b = 2, hq = 8, hkv = 2, d = 64, r = 16, prefill = 300;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4242);
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    // Values the kernel's dtype can hold exactly, so both sides see the same inputs.
    const auto rnd = [&](std::vector<int64_t> shape) {
      return torch::randn(shape, gen).to(dt).to(torch::kFloat);
    };
    const auto k = rnd({b, hkv, prefill + 1, d}), v = rnd({b, hkv, prefill + 1, d});
    const auto a_q = rnd({b, hq, d, r}) * 0.3, a_k = rnd({b, hq, d, r}) * 0.3;
    KVCache cache(1);
    cache.append(0, k.narrow(2, 0, prefill), v.narrow(2, 0, prefill));
    cache.compress_keys(0, a_q, a_k);
    cache.append(0, k.narrow(2, prefill, 1), v.narrow(2, prefill, 1));
    ASSERT_TRUE(cache.lowrank(0));
    const auto q = rnd({b, hq, 1, d});
    const auto plan = LayerPlan::uniform(HeadPlan::lowrank(r));
    const auto want = run_attention(cache.inputs(0, q), {plan}).out.squeeze(2);  // [b, hq, dv]
    // The kernel's inputs: q A_Q and the cached K A_K, rounded to the kernel's dtype.
    const auto qp = torch::matmul(q, a_q).squeeze(2).to(kCuda, dt);
    const auto kp = cache.key_proj(0).to(kCuda, dt);
    const auto vv = cache.values(0).to(kCuda, dt);
    const std::vector<int64_t> lengths(static_cast<size_t>(b), cache.length(0));
    const auto got = decode_attention_cuda(qp, kp, vv, torch::tensor(lengths, torch::kLong),
                                           1.0 / std::sqrt(static_cast<double>(d)));
    // Looser than the kernel test: the CPU side scores q A_Q and K A_K in float32 unrounded.
    const Tol tol = dt == torch::kBFloat16 ? Tol{2.5e-2, 6e-2} : Tol{4e-3, 1e-2};
    expect_close(got, want, tol, fmt::format("{} low-rank KVCache decode", c10::toString(dt)));
  }
}

TEST(CudaDecode, TensorEntryRefusesBadArguments) {
  // Without a GPU: CPU tensors are refused before anything touches CUDA.
  const auto qc = torch::zeros({1, 2, 16}), kc = torch::zeros({1, 2, 8, 16});
  EXPECT_THROW(decode_attention_cuda(qc, kc, kc, torch::ones({1}, torch::kInt), 0.25),
               InvalidArgument);
  EXPECT_THROW(decode_attention_cuda(qc.unsqueeze(0), kc, kc, torch::ones({1}, torch::kInt), 0.25),
               InvalidArgument);
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA decode kernel");
  const auto opt = torch::TensorOptions().dtype(torch::kBFloat16).device(kCuda);
  const auto q = torch::randn({2, 4, 32}, opt), k = torch::randn({2, 4, 50, 32}, opt);
  const auto v = torch::randn({2, 2, 50, 64}, opt);
  const auto len = torch::tensor({10, 50}, torch::kInt);
  EXPECT_NO_THROW(decode_attention_cuda(q, k, v, len, 0.2));
  const auto refused = [&](const torch::Tensor& q2, const torch::Tensor& k2,
                           const torch::Tensor& v2, const torch::Tensor& l2, double s,
                           const char* needle) {
    try {
      decode_attention_cuda(q2, k2, v2, l2, s);
    } catch (const InvalidArgument& e) {
      return std::string(e.what()).find(needle) != std::string::npos;
    }
    return false;
  };
  EXPECT_TRUE(refused(q, k, v, torch::tensor({10, 51}, torch::kInt), 0.2, "= 51 outside"));
  EXPECT_TRUE(refused(q, k, v, torch::tensor({-1, 5}, torch::kLong).to(kCuda), 0.2, "= -1"));
  EXPECT_TRUE(refused(q, k, v, torch::tensor({1, 2, 3}, torch::kInt), 0.2, "lengths"));
  EXPECT_TRUE(refused(q, k, v, torch::tensor({1.0, 2.0}), 0.2, "int32 or int64"));
  EXPECT_TRUE(refused(q.to(torch::kHalf), k, v, len, 0.2, "bfloat16 or all float16"));
  EXPECT_TRUE(refused(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat), len, 0.2,
                      "bfloat16 or all float16"));
  EXPECT_TRUE(refused(q, k.narrow(1, 0, 3), v, len, 0.2, "multiple of the key heads 3"));
  EXPECT_TRUE(refused(q, k, torch::randn({2, 3, 50, 64}, opt), len, 0.2, "value heads 3"));
  EXPECT_TRUE(refused(q.narrow(2, 0, 12), k.narrow(3, 0, 12), v, len, 0.2, "key dim 12"));
  EXPECT_TRUE(refused(q, k, torch::randn({2, 2, 50, 96}, opt), len, 0.2, "value dim 96"));
  EXPECT_TRUE(refused(torch::randn({2, 4, 264}, opt), torch::randn({2, 4, 50, 264}, opt), v, len,
                      0.2, "key dim 264"));
  EXPECT_TRUE(refused(q, k, v.narrow(2, 0, 40), len, 0.2, "cap=50"));
  EXPECT_TRUE(refused(q, k, v, len, kNaN, "scale"));
  // A k view starting 2 bytes into its buffer, and one whose rows are 33 elements apart.
  const auto kbuf = torch::randn({2, 4, 50, 40}, opt);
  EXPECT_TRUE(refused(q, kbuf.narrow(3, 1, 32), v, len, 0.2, "16-byte aligned"));
  const auto kodd = torch::randn({2, 4, 50, 33}, opt).narrow(3, 0, 32);
  EXPECT_TRUE(refused(q, kodd, v, len, 0.2, "multiples of 8"));
  EXPECT_TRUE(refused(q, k.cpu(), v, len, 0.2, "one CUDA device"));
}

// Runs without a GPU: the planner's invariants and the launcher's refusals (before any CUDA call).
TEST(CudaDecode, PlanCoversEveryKeyAndFillsTheGrid) {
  cuda::DecodeLaunch p;
  p.batch = 16;
  p.heads = p.k_heads = p.v_heads = 32;
  p.e = 32;
  p.dv = 128;
  p.capacity = p.max_length = 32768;
  auto plan = cuda::plan_decode(p, 132);
  EXPECT_EQ(plan.head_block, 1);
  EXPECT_EQ(plan.chunk, 1024);
  EXPECT_EQ(plan.splits, 32);
  EXPECT_EQ(plan.workspace_bytes, int64_t(16) * 32 * 32 * (128 + 2) * 4);
  std::mt19937_64 rng(3);
  for (int trial = 0; trial < 2000; ++trial) {
    p.batch = 1 + static_cast<int>(rng() % 64);
    p.v_heads = 1 + static_cast<int>(rng() % 8);
    const int group = 1 + static_cast<int>(rng() % 12);
    p.heads = p.v_heads * group;
    p.k_heads = rng() % 2 ? p.heads : p.v_heads;
    p.dv = rng() % 2 ? 64 : 128;
    p.max_length = static_cast<int64_t>(rng() % 200000);
    p.capacity = p.max_length + static_cast<int64_t>(rng() % 10);
    const int sms = 1 + static_cast<int>(rng() % 200);
    plan = cuda::plan_decode(p, sms);
    const std::string what = fmt::format("batch {} heads {}/{} dv {} len {} sms {}", p.batch,
                                         p.heads, p.v_heads, p.dv, p.max_length, sms);
    ASSERT_GE(plan.head_block, 1) << what;
    EXPECT_EQ(group % plan.head_block, 0) << what;
    EXPECT_TRUE(plan.head_block == 8 || group % (2 * plan.head_block) != 0) << what;
    EXPECT_GE(plan.chunk, 64) << what;
    EXPECT_LE(plan.chunk, 8 * p.dv) << what;
    EXPECT_GE(plan.chunk * plan.splits, p.max_length) << what;
    EXPECT_LT(plan.chunk * (plan.splits - 1), std::max<int64_t>(p.max_length, 1)) << what;
    const int64_t ctas = int64_t(p.batch) * (p.heads / plan.head_block) * plan.splits;
    // At least half the 16 CTAs per SM the planner aims for, unless the chunks are at their
    // 64-key minimum or 8·dv maximum (rounding chunks up to 64 keys loses less than half).
    if (plan.chunk > 64 && plan.chunk < 8 * p.dv) {
      EXPECT_GE(ctas * 2, 16 * sms) << what;
    }
  }
}

TEST(CudaDecode, LauncherRefusesArgumentsOutsideItsRange) {
  alignas(16) static unsigned char buf[4096];
  alignas(16) static int32_t lens[4] = {1, 1, 1, 1};
  cuda::DecodeLaunch p;
  p.q = p.k = p.v = buf;
  p.out = buf;
  p.lengths = lens;
  p.batch = 1;
  p.heads = p.k_heads = p.v_heads = 2;
  p.capacity = p.max_length = 4;
  p.k_stride[0] = 64;
  p.k_stride[1] = 32;
  p.k_stride[2] = 8;
  p.v_stride[0] = 512;
  p.v_stride[1] = 256;
  p.v_stride[2] = 64;
  p.e = 8;
  p.dv = 64;
  p.scale = 0.3f;
  const auto plan = cuda::plan_decode(p, 132);
  const auto refused = [&](cuda::DecodeLaunch x, cuda::DecodePlan pl, void* ws) {
    const char* failed = "";
    const cudaError_t e =
        cuda::launch_decode_attention(x, pl, ws, cuda::DecodeType::kBFloat16, nullptr, &failed);
    return e == cudaErrorInvalidValue &&
           std::string(failed).find("launch_decode_attention") != std::string::npos;
  };
  ASSERT_EQ(plan.splits, 1);
  auto x = p;
  x.e = 12;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "key dim 12";
  x = p;
  x.e = 264;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "key dim 264";
  x = p;
  x.dv = 96;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "value dim 96";
  x = p;
  x.heads = 3;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "3 query heads over 2 kv heads";
  x = p;
  x.k = buf + 8;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "k not 16-byte aligned";
  x = p;
  x.v_stride[2] = 68;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "v row stride not a multiple of 8";
  x = p;
  x.scale = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(refused(x, plan, nullptr)) << "infinite scale";
  x = p;
  x.max_length = 5;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "max length past capacity";
  x = p;
  x.lengths = nullptr;
  EXPECT_TRUE(refused(x, plan, nullptr)) << "no lengths";
  auto bad = plan;
  bad.chunk = 2;
  bad.splits = 1;
  EXPECT_TRUE(refused(p, bad, nullptr)) << "chunks that miss keys";
  bad = plan;
  bad.head_block = 2;
  EXPECT_TRUE(refused(p, bad, nullptr)) << "head block of a different group";
  bad = plan;
  bad.chunk = 2;
  bad.splits = 2;
  bad.workspace_bytes = 2 * 2 * (64 + 2) * 4;
  EXPECT_TRUE(refused(p, bad, nullptr)) << "two splits without a workspace";
  bad.workspace_bytes = 4;
  EXPECT_TRUE(refused(p, bad, buf)) << "workspace of the wrong size";
}

}  // namespace
}  // namespace attnpilot::attention
