/// The CUDA low-rank block estimator against its CPU twin (estimators.h): block scores against
/// lowrank_block_scores on fresh random inputs of many shapes (N != M, q_offset > 0, causal and
/// not, blocks 64 and 128, ranks 4/16/32, GQA, fp32/bf16/fp16, batch and heads > 1), sampled
/// rows and pooled queries, and the CSR masks against select_blocks run on the same scores
/// copied to the CPU (then the masks must be identical) for gamma, top_k and density budgets,
/// directly and through estimate_block_mask's dispatch. Outputs are poisoned before each run. GPU
/// tests skip without a CUDA device; the argument checks run everywhere.
#include "attention/cuda/cuda_estimator.h"

#include <ATen/CPUGeneratorImpl.h>
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/block_sparse_kernels.h"
#include "attention/estimators.h"
#include "common/error.h"

namespace attnpilot::attention {
namespace {

/// Whether the current device runs the wgmma kernels (compute capability 9.0).
bool device_is_sm90() {
  bool yes = false;
  const char* failed = "";
  return attnpilot::attention::cuda::device_is_sm90(&yes, &failed) == cudaSuccess && yes;
}

#define SKIP_WITHOUT_CUDA()                                                                  \
  if (!torch::cuda::is_available())                                                          \
  GTEST_SKIP() << "no CUDA device: the CUDA block estimator needs a GPU (this test runs on " \
                  "the GPU machine)"

const torch::Device kCuda(torch::kCUDA, 0);

/// Scores are probabilities (each row sums to 1). Against the float32 CPU twin on the same
/// (rounded) inputs the kernel differs by fp32 rounding (3xTF32 products, exp2/log2 of the
/// per-block log-sum-exp); a CPU emulation of the kernels measured at most 6.3e-6 absolute and
/// 3.0e-6 relative (norm) error over 450 random cases (2026-11-29), the fp32 CPU twin itself
/// 2.8e-6 from float64. One tf32 product instead of three gives ~2e-3 (the tf32 option).
constexpr double kAbsTol = 5e-5;
constexpr double kRelTol = 5e-5;
/// Pooled queries (CudaEstimatorOptions::pool_queries): plain fp32 on both sides, the GPU
/// projecting the block means, the CPU twin averaging projected rows. The CPU emulation of the
/// kernels (estimator_emu_test) measured at most 8.4e-7 absolute against float64; not yet
/// measured on the GPU, so the sampled mode's tolerance. The tensor-core kernel on the stored
/// keys (bf16/fp16) measured at most 1.1e-5 in the emulation (w split into two 16-bit parts).
constexpr double kPooledAbsTol = 5e-5;
constexpr double kPooledRelTol = 5e-5;
/// w in one 16-bit part (pooled_key_split = false): up to 4.3e-3 in the emulation on sharp bf16
/// scores (estimator_emu_test's kOnePartAbsTol, the same bound) and 4.5e-3 on this test's cases
/// (H100, 2026-12-06).
constexpr double kPooledOnePartAbsTol = 1e-2;
/// The one-pass tf32 mode (CudaEstimatorOptions::tf32): scores from 10-bit-mantissa products;
/// the emulation measured at most 6.6e-3 absolute and 2.7e-3 relative error (130 cases).
constexpr double kTf32AbsTol = 3e-2;
constexpr double kTf32RelTol = 1e-2;

struct Case {
  int64_t b, h, hkv, n, m, q_offset, d, r, bs;
  bool causal;
  torch::ScalarType dt;
  std::string str() const {
    return fmt::format("b={} h={} hkv={} n={} m={} q_offset={} d={} r={} bs={} causal={} {}", b, h,
                       hkv, n, m, q_offset, d, r, bs, causal, c10::toString(dt));
  }
};

struct Inputs {
  torch::Tensor q, k, a_q, a_k;  // on the GPU
};

Inputs make_inputs(const Case& c, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Inputs in;
  in.q = torch::randn({c.b, c.h, c.n, c.d}, gen).to(kCuda, c.dt);
  // Every third case reads k in place from a [b, M, hkv, d] layout (the model's, strided).
  in.k = seed % 3 == 0 ? torch::randn({c.b, c.m, c.hkv, c.d}, gen).to(kCuda, c.dt).transpose(1, 2)
                       : torch::randn({c.b, c.hkv, c.m, c.d}, gen).to(kCuda, c.dt);
  const int64_t ab = seed % 2 == 0 ? 1 : c.b;  // shared or per-batch projections
  in.a_q = (torch::randn({ab, c.h, c.d, c.r}, gen) / std::sqrt(double(c.r))).to(kCuda);
  in.a_k = torch::randn({ab, c.h, c.d, c.r}, gen).to(kCuda);
  return in;
}

/// lowrank_block_scores on float32 CPU copies (key heads expanded for the CPU's matmul).
torch::Tensor cpu_scores(const Case& c, const Inputs& in, double* flops) {
  const auto f = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kFloat); };
  return lowrank_block_scores(f(in.q), f(in.k).repeat_interleave(c.h / c.hkv, 1), f(in.a_q),
                              f(in.a_k), c.bs, c.causal, c.q_offset, flops);
}

/// lowrank_block_scores with pooled queries on float32 CPU copies.
torch::Tensor cpu_pooled_scores(const Case& c, const Inputs& in, double* flops) {
  const auto f = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kFloat); };
  return lowrank_block_scores(f(in.q), f(in.k).repeat_interleave(c.h / c.hkv, 1), f(in.a_q),
                              f(in.a_k), c.bs, c.causal, c.q_offset, flops, /*pool_queries=*/true);
}

/// Adds a per-head direction to q (in q's dtype), scaled so that the pooled scores vary by a
/// few units: block means of plain random rows are near zero and give an almost uniform softmax.
void give_queries_a_direction(const Case& c, Inputs* in, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto dir = torch::randn({c.b, c.h, 1, c.d}, gen).to(kCuda);
  in->q = (in->q.to(torch::kFloat) + 0.25 * dir).to(c.dt);
}

/// Fills the caching allocator's next blocks of these sizes with `value`, so an element the
/// kernels leave unwritten shows.
void poison(const std::vector<int64_t>& numels, double value, torch::ScalarType dt) {
  std::vector<torch::Tensor> held;
  for (int64_t e : numels) held.push_back(torch::full({e}, value, torch::dtype(dt).device(kCuda)));
  torch::cuda::synchronize();
}

/// Random shapes covering the brief's grid: blocks 64/128, ranks 4/16/32, causal and not,
/// N != M with q_offset > 0, GQA, every input dtype.
std::vector<Case> random_cases(std::mt19937_64& rng) {
  std::vector<Case> cases;
  std::uniform_int_distribution<int64_t> len(1, 700);
  int i = 0;
  for (int64_t bs : {64, 128})
    for (int64_t r : {4, 16, 32})
      for (bool causal : {true, false}) {
        Case c;
        c.b = 2;
        c.hkv = 2;
        c.h = i % 2 == 0 ? 4 : 2;
        c.d = i % 3 == 0 ? 64 : 128;
        c.r = r;
        c.bs = bs;
        c.causal = causal;
        c.dt = std::vector<torch::ScalarType>{torch::kFloat, torch::kBFloat16, torch::kHalf}[i % 3];
        c.n = len(rng);
        if (causal) {
          c.m = c.n + (i % 4 == 0 ? 0 : len(rng));
          c.q_offset = i % 4 == 1 ? (c.m - c.n) / 2 : c.m - c.n;  // queries mid-cache or at the end
        } else {
          c.m = len(rng);
          c.q_offset = len(rng) / 5;
        }
        cases.push_back(c);
        ++i;
      }
  // Short query blocks (fewer than 8 rows to sample) and a single key block.
  cases.push_back(Case{1, 3, 1, 5, 70, 65, 64, 16, 64, true, torch::kBFloat16});
  cases.push_back(Case{2, 2, 2, 130, 20, 0, 128, 4, 128, false, torch::kHalf});
  // A query whose causal limit is the first key of a 64-key tile (it sees one key of it).
  cases.push_back(Case{1, 2, 1, 1, 129, 128, 64, 16, 128, true, torch::kFloat});
  // Head dim 36: rows that are not 16-byte multiples take the projection's scalar loads.
  cases.push_back(Case{2, 4, 2, 150, 300, 150, 36, 16, 64, true, torch::kHalf});
  return cases;
}

TEST(CudaEstimator, ScoresMatchCpuTwin) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(20261129);
  uint64_t seed = 100;
  for (const Case& c : random_cases(rng)) {
    const auto in = make_inputs(c, seed++);
    double cpu_flops = 0, gpu_flops = 0;
    const auto want = cpu_scores(c, in, &cpu_flops);
    poison({want.numel()}, std::nan(""), torch::kFloat);
    const auto got = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                               c.q_offset, &gpu_flops);
    ASSERT_TRUE(got.is_cuda()) << c.str();
    EXPECT_TRUE(cuda_estimator_handles(in.q, in.k, c.r, c.bs)) << c.str();
    EXPECT_FALSE(cuda_estimator_handles(in.q, in.k, 80, c.bs)) << c.str() << " rank 80";
    EXPECT_FALSE(cuda_estimator_handles(in.q, in.k, c.r, 96)) << c.str() << " block 96";
    ASSERT_EQ(got.sizes(), want.sizes()) << c.str();
    const auto g = got.cpu().to(torch::kDouble), w = want.to(torch::kDouble);
    ASSERT_TRUE(torch::isfinite(g).all().item<bool>()) << c.str() << ": unwritten or NaN scores";
    const double abs_err = (g - w).abs().max().item<double>();
    const double rel_err = ((g - w).norm() / w.norm()).item<double>();
    EXPECT_LE(abs_err, kAbsTol) << c.str();
    EXPECT_LE(rel_err, kRelTol) << c.str();
    // Every row is a distribution over its visible blocks.
    EXPECT_LE((g.sum(-1) - 1.0).abs().max().item<double>(), 1e-4) << c.str();
    // The CPU projects every query row, the kernel only the sampled ones.
    const int64_t qbn = (c.n + c.bs - 1) / c.bs;
    double sampled = 0;
    for (int64_t qb = 0; qb < qbn; ++qb)
      sampled += std::min<int64_t>(8, std::min(c.bs, c.n - qb * c.bs));
    EXPECT_NEAR(gpu_flops, cpu_flops - 2.0 * c.b * c.h * (c.n - sampled) * c.d * c.r,
                1e-9 * cpu_flops)
        << c.str();
    // The one-pass tf32 mode: same function, looser tolerance.
    CudaEstimatorOptions fast;
    fast.tf32 = true;
    const auto g32 = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                               c.q_offset, &gpu_flops, fast)
                         .cpu()
                         .to(torch::kDouble);
    ASSERT_TRUE(torch::isfinite(g32).all().item<bool>()) << c.str() << " tf32";
    EXPECT_LE((g32 - w).abs().max().item<double>(), kTf32AbsTol) << c.str() << " tf32";
    EXPECT_LE(((g32 - w).norm() / w.norm()).item<double>(), kTf32RelTol) << c.str() << " tf32";
    // Same inputs, same bits: a race would show as a difference between runs.
    EXPECT_TRUE(torch::equal(got, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs,
                                                            c.causal, c.q_offset, &gpu_flops)))
        << c.str() << ": two runs differ";
  }
}

/// The projection kernel's variants (CudaEstimatorOptions::projection_rows 1 and 4: one and
/// several output rows per thread) agree: the key projection alone (every row, GQA, strided k,
/// head dims 36/64/100/128/256, ranks padded to 8..64 with zero columns, every dtype) and the
/// sampled-row and pooled scores, which project sampled query rows and block means too. Both
/// run the same FMAs in the same order per element (the CPU emulation, projection_emu_test, sees
/// identical bits), so ~1e-6 relative is loose.
TEST(CudaEstimator, ProjectionRowsPerThreadAgree) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(20261206);
  uint64_t seed = 500;
  auto cases = random_cases(rng);
  cases.push_back(Case{1, 4, 2, 900, 1500, 600, 256, 50, 128, true, torch::kBFloat16});
  cases.push_back(Case{2, 2, 1, 700, 1100, 400, 100, 64, 64, true, torch::kHalf});
  cases.push_back(Case{1, 2, 2, 520, 2100, 0, 256, 31, 64, false, torch::kFloat});
  CudaEstimatorOptions four;
  four.projection_rows = 4;
  const auto rel = [](const torch::Tensor& a, const torch::Tensor& b) {
    const auto x = a.to(torch::kDouble), y = b.to(torch::kDouble);
    return ((x - y).norm() / y.norm().clamp_min(1e-300)).item<double>();
  };
  for (const Case& c : cases) {
    auto in = make_inputs(c, seed);
    give_queries_a_direction(c, &in, seed++);
    const auto kp1 = lowrank_project_keys_cuda(in.k, in.a_k);
    poison({kp1.numel()}, std::nan(""), torch::kFloat);
    const auto kp4 = lowrank_project_keys_cuda(in.k, in.a_k, four);
    ASSERT_EQ(kp4.sizes(), kp1.sizes()) << c.str();
    ASSERT_TRUE(torch::isfinite(kp4).all().item<bool>()) << c.str() << ": unwritten kp";
    EXPECT_LE(rel(kp4, kp1), 1e-6) << c.str() << " key projection";
    EXPECT_LE((kp4 - kp1).abs().max().item<double>(), 1e-6 * kp1.abs().max().item<double>() + 1e-30)
        << c.str() << " key projection";
    // The key projection against LibTorch on the same (rounded) inputs, fp32 math.
    const auto want = torch::matmul(in.k.to(torch::kFloat).repeat_interleave(c.h / c.hkv, 1),
                                    in.a_k.to(torch::kFloat));
    EXPECT_LE(rel(kp4.narrow(3, 0, c.r), want), 1e-5) << c.str() << " key projection vs matmul";
    if (kp4.size(3) > c.r) {
      EXPECT_EQ(kp4.narrow(3, c.r, kp4.size(3) - c.r).abs().max().item<double>(), 0.0)
          << c.str() << ": columns past the rank";
    }
    double fl = 0;
    for (bool pooled : {false, true}) {
      CudaEstimatorOptions one, many = four;
      one.pool_queries = many.pool_queries = pooled;
      const auto s1 = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                c.q_offset, &fl, one);
      const auto s4 = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                c.q_offset, &fl, many);
      ASSERT_TRUE(torch::isfinite(s4).all().item<bool>()) << c.str() << " pooled " << pooled;
      EXPECT_LE(rel(s4, s1), 1e-6) << c.str() << " pooled " << pooled;
    }
  }
}

TEST(CudaEstimator, ManyKeyBlocksUseTheWorkspace) {
  SKIP_WITHOUT_CUDA();
  // 400+ key blocks: the per-row log-sum-exp rows no longer fit in shared memory.
  for (bool causal : {false, true}) {
    const Case c{1, 2, 1, 200, 26000, causal ? 25800 : 7, 64, 16, 64, causal, torch::kBFloat16};
    const auto in = make_inputs(c, causal ? 7 : 8);
    double fl = 0;
    const auto want = cpu_scores(c, in, &fl).to(torch::kDouble);
    const auto got =
        lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal, c.q_offset, &fl)
            .cpu()
            .to(torch::kDouble);
    ASSERT_TRUE(torch::isfinite(got).all().item<bool>()) << c.str();
    EXPECT_LE((got - want).abs().max().item<double>(), kAbsTol) << c.str();
  }
}

/// Pooled queries (lowrank_block_scores(..., pool_queries = true)) on the GPU against the CPU
/// twin, both kernels (on the stored keys and on the projected keys): every input dtype, GQA,
/// causal and not, odd lengths, strided k, more than 128 query blocks (two query groups of the
/// score kernel) and hundreds of key blocks (many key chunks).
TEST(CudaEstimator, PooledScoresMatchCpuTwin) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(20261202);
  uint64_t seed = 300;
  auto cases = random_cases(rng);
  cases.push_back(Case{1, 2, 1, 9000, 9100, 100, 64, 16, 64, true, torch::kBFloat16});
  cases.push_back(Case{1, 2, 2, 200, 26000, 7, 64, 16, 64, false, torch::kHalf});
  cases.push_back(Case{1, 2, 1, 300, 26000, 25700, 128, 64, 128, true, torch::kBFloat16});
  for (const Case& c : cases) {
    auto in = make_inputs(c, seed);
    give_queries_a_direction(c, &in, seed++);
    double cpu_flops = 0;
    const auto want = cpu_pooled_scores(c, in, &cpu_flops);
    const auto w = want.to(torch::kDouble);
    const int64_t qbn = (c.n + c.bs - 1) / c.bs;
    double pairs = 0;  // Σ over query blocks of the keys each sees
    for (int64_t qb = 0; qb < qbn; ++qb)
      pairs += static_cast<double>(
          c.causal ? std::min(c.m, c.q_offset + qb * c.bs + std::min(c.bs, c.n - qb * c.bs)) : c.m);
    // key_mma: bf16/fp16 keys of d 64 or 128 take the tensor-core kernel on the stored keys;
    // other keys, and key_mma = false, the projected keys.
    for (bool key_mma : {true, false}) {
      CudaEstimatorOptions pooled;
      pooled.pool_queries = true;
      pooled.pooled_key_mma = key_mma;
      pooled.pooled_key_body = CudaEstimatorOptions::PooledKeyBody::kMmaSync;
      const bool on_keys = key_mma && c.dt != torch::kFloat && (c.d == 64 || c.d == 128);
      const std::string what = c.str() + (on_keys ? " (stored keys, tensor cores)" : "");
      double gpu_flops = 0;
      poison({want.numel()}, std::nan(""), torch::kFloat);
      const auto got = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                 c.q_offset, &gpu_flops, pooled);
      ASSERT_TRUE(got.is_cuda()) << what;
      ASSERT_EQ(got.sizes(), want.sizes()) << what;
      const auto g = got.cpu().to(torch::kDouble);
      ASSERT_TRUE(torch::isfinite(g).all().item<bool>()) << what << ": unwritten or NaN scores";
      EXPECT_LE((g - w).abs().max().item<double>(), kPooledAbsTol) << what;
      EXPECT_LE(((g - w).norm() / w.norm()).item<double>(), kPooledRelTol) << what;
      EXPECT_LE((g.sum(-1) - 1.0).abs().max().item<double>(), 1e-4) << what;
      EXPECT_EQ((g < 0).sum().item<int64_t>(), 0) << what;
      const double bh = static_cast<double>(c.b) * c.h;
      if (on_keys) {
        // The block means (n·d adds), the means' projection and its product with A_kᵀ, then
        // 2·2d + 1 per (query block, visible key) pair.
        EXPECT_NEAR(
            gpu_flops,
            bh * (static_cast<double>(c.n) * c.d + 4.0 * qbn * c.d * c.r + pairs * (4.0 * c.d + 1)),
            1e-9 * gpu_flops)
            << what;
      } else {
        // The CPU projects every query row, the GPU the block means (n·d adds to form them).
        EXPECT_NEAR(
            gpu_flops,
            cpu_flops - 2.0 * bh * (c.n - qbn) * c.d * c.r + bh * static_cast<double>(c.n) * c.d,
            1e-9 * cpu_flops)
            << what;
      }
      if (on_keys) {
        // w by the kernel from q (pooled_w_kernel, the default, g above) against LibTorch's
        // block means and the products kernel (pooled_w_kernel = false) within rounding; a
        // strided q (rows h·d apart) reads the same values in the same order, the same bits;
        // rows not 16-byte aligned fall back to LibTorch's means: the bits of pooled_w_kernel =
        // false on that same q (not on the contiguous q: LibTorch's block means of a strided
        // view may sum in another order, 1 ulp apart on the H100).
        CudaEstimatorOptions lt = pooled;
        lt.pooled_w_kernel = false;
        const auto g_lt = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                    c.q_offset, &gpu_flops, lt);
        EXPECT_LE((g_lt.cpu().to(torch::kDouble) - g).abs().max().item<double>(), 1e-5)
            << what << ": the w kernel against LibTorch's means and the products kernel";
        const auto q_strided = in.q.transpose(1, 2).contiguous().transpose(1, 2);
        EXPECT_TRUE(
            torch::equal(got, lowrank_block_scores_cuda(q_strided, in.k, in.a_q, in.a_k, c.bs,
                                                        c.causal, c.q_offset, &gpu_flops, pooled)))
            << what << ": a strided q changes the w kernel's scores";
        const auto q_odd =
            torch::empty({c.b, c.h, c.n, c.d + 1}, in.q.options()).narrow(3, 0, c.d).copy_(in.q);
        const auto want_odd = lowrank_block_scores_cuda(q_odd, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                        c.q_offset, &gpu_flops, lt);
        EXPECT_TRUE(torch::equal(
            want_odd, lowrank_block_scores_cuda(q_odd, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                c.q_offset, &gpu_flops, pooled)))
            << what << ": q rows not 16-byte aligned did not fall back to LibTorch's means";
        // The default w against LibTorch's block means, two cuBLAS products and scaling: the
        // same w up to the order of the fp32 sums.
        CudaEstimatorOptions wc = pooled;
        wc.pooled_w_cublas = true;
        const auto g_wc = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                    c.q_offset, &gpu_flops, wc);
        EXPECT_LE((g_wc.cpu().to(torch::kDouble) - g).abs().max().item<double>(), 1e-5)
            << what << ": the products kernel against cuBLAS's products";
      }
      // tf32 does not apply to the pooled path; same inputs, same bits (no race). Each (query
      // block, key block) value comes from one CTA whatever the key chunks, so other chunk
      // sizes give the same bits too.
      CudaEstimatorOptions pooled_tf32 = pooled;
      pooled_tf32.tf32 = true;
      EXPECT_TRUE(
          torch::equal(got, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                      c.q_offset, &gpu_flops, pooled_tf32)))
          << what << ": two runs differ";
      // Other key tiles in flight: the same bits. Other key chunks per CTA: the same bits with
      // the exact fold; the lazy fold (the default) carries each row's reference across the
      // key blocks of a CTA, so a chunk boundary moves the rounding of its sums (within 1e-6:
      // seen on the H100, 2026-12-06, for a 9000-query case).
      std::vector<std::pair<CudaEstimatorOptions, std::string>> variants;
      for (int stages : {2, 3, 4}) {
        variants.emplace_back(pooled, fmt::format("{} key tiles in flight", stages));
        variants.back().first.pooled_key_stages = stages;
      }
      for (const auto& [opts, name] : variants)
        EXPECT_TRUE(
            torch::equal(got, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                        c.q_offset, &gpu_flops, opts)))
            << what << ": " << name << " change the scores";
      CudaEstimatorOptions exact = pooled;
      exact.pooled_key_lazy_max = false;
      const auto got_exact = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                       c.q_offset, &gpu_flops, exact);
      for (int64_t chunk : {int64_t(1), int64_t(3 * c.bs), int64_t(4096)}) {
        CudaEstimatorOptions chunked = exact;
        chunked.pooled_chunk_keys = chunk;
        EXPECT_TRUE(torch::equal(
            got_exact, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                 c.q_offset, &gpu_flops, chunked)))
            << what << ": key chunks of " << chunk << " keys change the exact fold's scores";
        chunked.pooled_key_lazy_max = true;
        const auto lazy_chunked = lowrank_block_scores_cuda(
            in.q, in.k, in.a_q, in.a_k, c.bs, c.causal, c.q_offset, &gpu_flops, chunked);
        EXPECT_LE((lazy_chunked.cpu().to(torch::kDouble) - g).abs().max().item<double>(), 1e-6)
            << what << ": key chunks of " << chunk << " keys, lazy fold";
      }
      // The wgmma body (compute capability 9.0): the same scores up to the order of its fp32
      // sums, against the twin with the same tolerances; deterministic.
      // kAuto is that body on compute capability 9.0 and mma.sync elsewhere, bit for bit.
      if (on_keys) {
        CudaEstimatorOptions wg = pooled;
        wg.pooled_key_body = device_is_sm90() ? CudaEstimatorOptions::PooledKeyBody::kWgmma
                                              : CudaEstimatorOptions::PooledKeyBody::kMmaSync;
        CudaEstimatorOptions automatic = pooled;
        automatic.pooled_key_body = CudaEstimatorOptions::PooledKeyBody::kAuto;
        EXPECT_TRUE(
            torch::equal(lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                   c.q_offset, &gpu_flops, automatic),
                         lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                   c.q_offset, &gpu_flops, wg)))
            << what << ": kAuto is not the body it names";
        // w in one 16-bit part: each body against the twin (looser tolerance), the bodies
        // against each other, two runs alike, the FLOPs at 2d + 1 per pair.
        std::vector<std::pair<CudaEstimatorOptions, std::string>> one_part;
        one_part.emplace_back(pooled, "mma.sync");
        if (device_is_sm90()) {
          CudaEstimatorOptions wgo = pooled;
          wgo.pooled_key_body = CudaEstimatorOptions::PooledKeyBody::kWgmma;
          one_part.emplace_back(wgo, "wgmma");
          CudaEstimatorOptions three = wgo;
          three.pooled_key_ctas_per_sm = 3;
          one_part.emplace_back(three, "wgmma, three CTAs per SM");
          CudaEstimatorOptions staged = wgo;
          staged.pooled_key_stages = 3;
          one_part.emplace_back(staged, "wgmma, 3 tiles in flight");
          CudaEstimatorOptions piped = wgo;
          piped.pooled_key_pipelined = true;
          one_part.emplace_back(piped, "wgmma pipelined");
        }
        torch::Tensor first;
        for (auto& [opts, name] : one_part) {
          opts.pooled_key_split = false;
          const std::string owhat = what + " w in one part, " + name;
          poison({want.numel()}, std::nan(""), torch::kFloat);
          double one_flops = 0;
          const auto go = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                    c.q_offset, &one_flops, opts);
          const auto god = go.cpu().to(torch::kDouble);
          ASSERT_TRUE(torch::isfinite(god).all().item<bool>()) << owhat << ": unwritten or NaN";
          const double err = (god - w).abs().max().item<double>();
          EXPECT_LE(err, kPooledOnePartAbsTol) << owhat;
          EXPECT_LE((god.sum(-1) - 1.0).abs().max().item<double>(), 1e-4) << owhat;
          EXPECT_TRUE(
              torch::equal(go, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                         c.q_offset, &one_flops, opts)))
              << owhat << ": two runs differ";
          const double bh1 = static_cast<double>(c.b) * c.h;
          EXPECT_NEAR(one_flops / 2,
                      bh1 * (static_cast<double>(c.n) * c.d + 4.0 * qbn * c.d * c.r +
                             pairs * (2.0 * c.d + 1)),
                      1e-9 * one_flops)
              << owhat;
          if (!first.defined())
            first = god;
          else
            EXPECT_LE((god - first).abs().max().item<double>(), 1e-5)
                << owhat << " against the mma.sync body";
          std::printf("%s: max abs error %.3g against the twin\n", owhat.c_str(), err);
        }
      }
      if (on_keys && device_is_sm90()) {
        for (int stages : {2, 3}) {
          CudaEstimatorOptions wg = pooled;
          wg.pooled_key_body = CudaEstimatorOptions::PooledKeyBody::kWgmma;
          wg.pooled_key_stages = stages;
          const std::string wwhat = what + fmt::format(" wgmma, {} tiles in flight", stages);
          poison({want.numel()}, std::nan(""), torch::kFloat);
          const auto gw = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                    c.q_offset, &gpu_flops, wg);
          const auto gwd = gw.cpu().to(torch::kDouble);
          ASSERT_TRUE(torch::isfinite(gwd).all().item<bool>()) << wwhat << ": unwritten or NaN";
          EXPECT_LE((gwd - w).abs().max().item<double>(), kPooledAbsTol) << wwhat;
          EXPECT_LE(((gwd - w).norm() / w.norm()).item<double>(), kPooledRelTol) << wwhat;
          EXPECT_LE((gwd - g).abs().max().item<double>(), 1e-5) << wwhat << " against mma.sync";
          EXPECT_TRUE(
              torch::equal(gw, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                         c.q_offset, &gpu_flops, wg)))
              << wwhat << ": two runs differ";
          // The exact fold (pooled_key_lazy_max = false; gw ran the lazy one, the default): the
          // twin's tolerance, within 1e-6 of the lazy fold, deterministic.
          CudaEstimatorOptions exact = wg;
          exact.pooled_key_lazy_max = false;
          poison({want.numel()}, std::nan(""), torch::kFloat);
          const auto ge = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                    c.q_offset, &gpu_flops, exact);
          const auto ged = ge.cpu().to(torch::kDouble);
          ASSERT_TRUE(torch::isfinite(ged).all().item<bool>()) << wwhat << " exact fold: NaN";
          EXPECT_LE((ged - w).abs().max().item<double>(), kPooledAbsTol) << wwhat << " exact";
          EXPECT_LE((ged - gwd).abs().max().item<double>(), 1e-6)
              << wwhat << " the exact fold against the lazy one";
          EXPECT_TRUE(
              torch::equal(ge, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                         c.q_offset, &gpu_flops, exact)))
              << wwhat << " exact fold: two runs differ";
          if (stages == 2) {  // compiled for three CTAs per SM: the same code, the same bits
            CudaEstimatorOptions three = wg;
            three.pooled_key_ctas_per_sm = 3;
            EXPECT_TRUE(torch::equal(
                gw, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                              c.q_offset, &gpu_flops, three)))
                << wwhat << ": three CTAs per SM change the scores";
          }
          {  // the pipelined form (tile t + 1's products run while tile t is folded)
            CudaEstimatorOptions piped = wg;
            piped.pooled_key_pipelined = true;
            piped.pooled_key_stages = 0;  // its three tiles
            poison({want.numel()}, std::nan(""), torch::kFloat);
            const auto gp = lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                                      c.q_offset, &gpu_flops, piped);
            const auto gpd = gp.cpu().to(torch::kDouble);
            ASSERT_TRUE(torch::isfinite(gpd).all().item<bool>()) << wwhat << " pipelined: NaN";
            EXPECT_LE((gpd - w).abs().max().item<double>(), kPooledAbsTol) << wwhat << " pipelined";
            // The pipelined body folds exactly (no lazy fold): bit-identical to the plain body's
            // exact fold in the emulation; on the H100 (2026-12-06) up to 1.2e-7 apart (1-2 ulp
            // of the scores): the two bodies' folds compile to different instruction sequences,
            // which the emulation does not model.
            EXPECT_LE((gpd - ged).abs().max().item<double>(), 1e-6)
                << wwhat << " pipelined: against the plain wgmma body's exact fold";
            EXPECT_TRUE(torch::equal(
                gp, lowrank_block_scores_cuda(in.q, in.k, in.a_q, in.a_k, c.bs, c.causal,
                                              c.q_offset, &gpu_flops, piped)))
                << wwhat << " pipelined: two runs differ";
          }
        }
      }
    }
  }
}

/// The GPU mask equals select_blocks on the GPU's own scores (the kernels are deterministic, so
/// estimate_block_mask_cuda recomputes exactly these scores).
void expect_same_mask(const Case& c, const Inputs& in, const HeadPlan& plan, bool tf32) {
  const std::string what = c.str() + " plan " + plan.to_string() + (tf32 ? " tf32" : "");
  CudaEstimatorOptions opt;
  opt.tf32 = tf32;
  opt.pool_queries = plan.pool_queries;
  double fl = 0;
  const auto scores = lowrank_block_scores_cuda(in.q, in.k, in.a_q.narrow(3, 0, plan.rank),
                                                in.a_k.narrow(3, 0, plan.rank), c.bs, c.causal,
                                                c.q_offset, &fl, opt);
  const auto want = select_blocks(scores.cpu(), plan, c.n, c.m, c.causal, c.q_offset);
  const int64_t rows = want.rows();
  poison({rows + 1, rows * want.k_blocks}, -77.0, torch::kLong);
  double est_flops = 0;
  const auto got = estimate_block_mask_cuda(in.q, in.k, in.a_q, in.a_k, plan, c.causal, c.q_offset,
                                            &est_flops, opt);
  // A plan that keeps everything needs no estimate (as on the CPU); the others count theirs.
  if (plan.gamma <= 0 && plan.top_k <= 0 && plan.density >= 1.0)
    EXPECT_EQ(est_flops, 0.0) << what;
  else
    EXPECT_GT(est_flops, 0.0) << what;
  ASSERT_TRUE(got.row_ptr.is_cuda() && got.col_idx.is_cuda()) << what;
  EXPECT_EQ(got.batch, want.batch);
  EXPECT_EQ(got.heads, want.heads);
  EXPECT_EQ(got.q_blocks, want.q_blocks);
  EXPECT_EQ(got.k_blocks, want.k_blocks);
  EXPECT_EQ(got.block_size, want.block_size);
  const auto ptr = got.row_ptr.cpu();
  ASSERT_TRUE(torch::equal(ptr, want.row_ptr)) << what << ": row_ptr differs";
  const int64_t nnz = ptr[rows].item<int64_t>();
  ASSERT_LE(nnz, got.col_idx.numel()) << what;
  const auto col = got.col_idx.cpu();
  EXPECT_TRUE(torch::equal(col.narrow(0, 0, nnz), want.col_idx)) << what << ": col_idx differs";
  if (plan.gamma > 0) {
    // Room for every visible block; the unused tail is -1.
    EXPECT_TRUE((col.narrow(0, nnz, col.numel() - nnz) == -1).all().item<bool>()) << what;
    CudaEstimatorOptions exact_opt = opt;
    exact_opt.exact_nnz = true;
    const auto exact = estimate_block_mask_cuda(in.q, in.k, in.a_q, in.a_k, plan, c.causal,
                                                c.q_offset, &fl, exact_opt);
    EXPECT_EQ(exact.col_idx.numel(), nnz) << what;
    EXPECT_TRUE(torch::equal(exact.col_idx.cpu(), want.col_idx)) << what;
  } else {
    EXPECT_EQ(col.numel(), nnz) << what << ": a budget's counts are known in advance";
  }
  BlockMask host = got;
  host.row_ptr = ptr;
  host.col_idx = col.narrow(0, 0, nnz).contiguous();
  EXPECT_NO_THROW(host.validate(c.n, c.m, c.causal, c.q_offset)) << what;
  // estimate_block_mask (estimators.h) sends CUDA tensors to this path, pooled plans included
  // (with its default options: one-pass tf32 off).
  if (!tf32 || plan.pool_queries) {
    const auto via =
        estimate_block_mask(in.q, in.k, plan, c.causal, c.q_offset, &fl, in.a_q, in.a_k);
    ASSERT_TRUE(via.row_ptr.is_cuda() && via.col_idx.is_cuda()) << what << " via dispatch";
    EXPECT_TRUE(torch::equal(via.row_ptr.cpu(), ptr)) << what << " via dispatch";
    EXPECT_TRUE(torch::equal(via.col_idx.cpu(), col)) << what << " via dispatch";
  }
}

TEST(CudaEstimator, MasksMatchCpuSelectionOnTheSameScores) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(77);
  uint64_t seed = 900;
  for (const Case& base : random_cases(rng)) {
    Case c = base;
    c.r = 32;  // the projections carry 32 columns; plans use the first plan.rank of them
    const auto in = make_inputs(c, seed++);
    std::vector<HeadPlan> plans;
    for (double gamma : {0.5, 0.9, 0.99}) {
      HeadPlan p = HeadPlan::block_sparse(0.5, c.bs);
      p.gamma = gamma;
      plans.push_back(p);
    }
    for (int64_t top_k : {1, 3, 8}) {
      HeadPlan p = HeadPlan::block_sparse(0.5, c.bs);
      p.top_k = top_k;
      plans.push_back(p);
    }
    for (double density : {0.1, 0.3, 1.0}) plans.push_back(HeadPlan::block_sparse(density, c.bs));
    int i = 0;
    for (bool pool : {false, true}) {  // 8 sampled rows, then one pooled query per block
      for (HeadPlan p : plans) {
        p.estimator = BlockEstimator::kLowRank;
        p.rank = std::vector<int64_t>{4, 16, 32}[i++ % 3];
        p.pool_queries = pool;
        expect_same_mask(c, in, p, /*tf32=*/i % 2 == 0);
      }
    }
  }
}

// ---- argument checks: these run everywhere (CPU tensors fail the shape, dtype, rank, block
// size and plan checks before the device check) ----

HeadPlan lowrank_plan(double density, int64_t bs, int64_t rank) {
  HeadPlan p = HeadPlan::block_sparse(density, bs);
  p.estimator = BlockEstimator::kLowRank;
  p.rank = rank;
  return p;
}

/// Runs f, expecting InvalidArgument whose message contains `needle`.
template <typename F>
void expect_invalid(F f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no InvalidArgument (expected one mentioning '" << needle << "')";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Scores of another estimator already on the GPU (the pooled estimator's LibTorch code):
// select_blocks_cuda, and estimate_block_mask's dispatch to it, give select_blocks' mask on the
// device.
TEST(CudaEstimator, DeviceScoresOfOtherEstimatorsAreSelectedOnTheDevice) {
  SKIP_WITHOUT_CUDA();
  std::mt19937_64 rng(78);
  uint64_t seed = 950;
  for (const Case& base : random_cases(rng)) {
    Case c = base;
    c.hkv = c.h;  // the pooled estimator's LibTorch code takes one key head per query head
    const auto in = make_inputs(c, seed++);
    for (double gamma : {0.0, 0.9}) {
      for (int64_t top_k : {0, 3}) {
        HeadPlan p = HeadPlan::block_sparse(0.3, c.bs);
        p.gamma = gamma;
        p.top_k = top_k;
        p.estimator = BlockEstimator::kPooled;
        const std::string what = c.str() + " plan " + p.to_string();
        double fl = 0;
        const auto scores = pooled_block_scores(in.q, in.k, c.bs, c.causal, c.q_offset, &fl);
        ASSERT_TRUE(scores.is_cuda()) << what;
        const auto want = select_blocks(scores.cpu(), p, c.n, c.m, c.causal, c.q_offset);
        poison({want.rows() + 1, want.rows() * want.k_blocks}, -77.0, torch::kLong);
        const auto direct = select_blocks_cuda(scores, p, c.n, c.m, c.causal, c.q_offset);
        const auto via = estimate_block_mask(in.q, in.k, p, c.causal, c.q_offset, &fl);
        for (const BlockMask* got : {&direct, &via}) {
          ASSERT_TRUE(got->row_ptr.is_cuda() && got->col_idx.is_cuda()) << what;
          const auto h = got->on_host();
          EXPECT_TRUE(torch::equal(h.row_ptr, want.row_ptr)) << what << ": row_ptr differs";
          EXPECT_TRUE(torch::equal(h.col_idx, want.col_idx)) << what << ": col_idx differs";
        }
      }
    }
  }
  const auto s = torch::rand({1, 2, 3, 4}, kCuda);
  HeadPlan p = HeadPlan::block_sparse(0.5, 64);
  expect_invalid([&] { select_blocks_cuda(s, p, 100, 256, true, 0); }, "do not fit");
  expect_invalid([&] { select_blocks_cuda(s.cpu(), p, 150, 256, true, 0); }, "CUDA tensor");
}

TEST(CudaEstimator, BadArgumentsAreRefused) {
  const auto q = torch::randn({1, 2, 100, 64}), k = torch::randn({1, 2, 120, 64});
  const auto a = torch::randn({1, 2, 64, 16});
  double fl = 0;
  EXPECT_FALSE(cuda_estimator_handles(q, k, 16, 64)) << "CPU tensors";
  expect_invalid([&] { lowrank_block_scores_cuda(q.to(torch::kInt), k, a, a, 64, true, 0, &fl); },
                 "Int");
  expect_invalid(
      [&] {
        lowrank_block_scores_cuda(q, torch::randn({1, 2, 120, 32}), a, a, 64, true, 0, &fl);
      },
      "[1, 2, 120, 32]");
  expect_invalid(
      [&] {
        lowrank_block_scores_cuda(q, torch::randn({1, 3, 120, 64}), a, a, 64, true, 0, &fl);
      },
      "multiple of hkv");
  expect_invalid([&] { lowrank_block_scores_cuda(q[0], k, a, a, 64, true, 0, &fl); }, "4-D");
  expect_invalid(
      [&] {
        lowrank_block_scores_cuda(q, k, torch::randn({1, 2, 64, 80}), torch::randn({1, 2, 64, 80}),
                                  64, true, 0, &fl);
      },
      "rank 80");
  expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a.narrow(3, 0, 8), 64, true, 0, &fl); },
                 "a_q and a_k");
  expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 96, true, 0, &fl); }, "block size 96");
  expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, -3, &fl); }, "q_offset -3");
  expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, 0, &fl); }, "CUDA device");
  CudaEstimatorOptions three_rows;
  three_rows.projection_rows = 3;
  expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, 0, &fl, three_rows); },
                 "projection_rows 3");
  expect_invalid([&] { lowrank_project_keys_cuda(k, a, three_rows); }, "projection_rows 3");
  for (int stages : {1, 5, -2}) {
    CudaEstimatorOptions bad_stages;
    bad_stages.pooled_key_stages = stages;
    expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, 0, &fl, bad_stages); },
                   fmt::format("pooled_key_stages {}", stages));
  }
  CudaEstimatorOptions bad_piped;
  bad_piped.pooled_key_pipelined = true;
  bad_piped.pooled_key_ctas_per_sm = 3;
  expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, 0, &fl, bad_piped); },
                 "pooled_key_pipelined");
  for (int stages : {2, 4}) {
    CudaEstimatorOptions bad_piped_stages;
    bad_piped_stages.pooled_key_pipelined = true;
    bad_piped_stages.pooled_key_stages = stages;
    expect_invalid(
        [&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, 0, &fl, bad_piped_stages); },
        fmt::format("pooled_key_stages 0 or 3 (got {})", stages));
  }
  for (const auto& [ctas, stages] : std::vector<std::pair<int, int>>{{1, 0}, {4, 0}, {3, 3}}) {
    CudaEstimatorOptions bad_ctas;
    bad_ctas.pooled_key_ctas_per_sm = ctas;
    bad_ctas.pooled_key_stages = stages;
    expect_invalid([&] { lowrank_block_scores_cuda(q, k, a, a, 64, true, 0, &fl, bad_ctas); },
                   fmt::format("pooled_key_ctas_per_sm {}", ctas));
  }
  expect_invalid(
      [&] {
        lowrank_project_keys_cuda(k, torch::randn({1, 3, 64, 16}));
      },
      "[1, 3, 64, 16]");
  expect_invalid([&] { lowrank_project_keys_cuda(k, a); }, "CUDA device");
  // Plans: wrong estimator, rank above the projections, a budget outside its range.
  auto pooled = lowrank_plan(0.5, 64, 8);
  pooled.estimator = BlockEstimator::kPooled;
  expect_invalid([&] { estimate_block_mask_cuda(q, k, a, a, pooled, true, 0, &fl); },
                 "lowrank estimator");
  expect_invalid(
      [&] { estimate_block_mask_cuda(q, k, a, a, lowrank_plan(0.5, 64, 32), true, 0, &fl); },
      "rank 32");
  auto gamma = lowrank_plan(0.5, 64, 8);
  gamma.gamma = 1.5;
  EXPECT_THROW(estimate_block_mask_cuda(q, k, a, a, gamma, true, 0, &fl), InvalidArgument);
  EXPECT_THROW(estimate_block_mask_cuda(q, k, a, a, lowrank_plan(0.0, 64, 8), true, 0, &fl),
               InvalidArgument);
  expect_invalid(
      [&] { estimate_block_mask_cuda(q, k, a, a, lowrank_plan(0.5, 64, 8), true, 0, &fl); },
      "CUDA device");
}

TEST(CudaEstimator, LaunchersRefuseArgumentsOutsideTheirRange) {
  alignas(16) static float buf[1024];
  // Runs the call, then checks its error and the call it names (in that order).
  const auto refused = [](const std::function<cudaError_t(const char**)>& call, const char* name) {
    const char* failed = "";
    const cudaError_t e = call(&failed);
    return e == cudaErrorInvalidValue && std::string(failed).find(name) != std::string::npos;
  };
  cuda::ProjectionLaunch pl;
  pl.x = pl.a = buf;
  pl.out = buf;
  pl.batch = pl.heads = pl.x_heads = 1;
  pl.n_in = pl.rows_out = 10;
  pl.d = 64;
  pl.rank = 4;
  pl.rank_pad = 12;  // not 8, 16, 32 or 64
  const auto project = [&](const char** f) {
    return cuda::launch_projection(pl, cuda::InputType::kFloat32, nullptr, f);
  };
  EXPECT_TRUE(refused(project, "launch_projection")) << "rank 12";
  pl.rank_pad = 16;
  pl.d = 300;
  EXPECT_TRUE(refused(project, "launch_projection")) << "head dim 300";
  pl.d = 64;
  pl.sample_block = 64;  // 10 rows in blocks of 64 give 8 sampled slots, not 10
  EXPECT_TRUE(refused(project, "launch_projection")) << "sampled rows 10";
  pl.sample_block = 0;
  pl.rows_per_thread = 3;  // 1 or 4
  EXPECT_TRUE(refused(project, "launch_projection")) << "3 rows per thread";

  cuda::BlockScoresLaunch sl;
  sl.qs = sl.kp = buf;
  sl.scores = buf;
  sl.batch = sl.heads = 1;
  sl.n = sl.m = 100;
  sl.q_blocks = sl.k_blocks = 2;
  sl.block_size = 96;  // not a multiple of 64
  sl.rank_pad = 16;
  size_t bytes = 0;
  const auto workspace = [&](const char** f) {
    return cuda::lowrank_block_scores_workspace_bytes(sl, &bytes, f);
  };
  const auto scores = [&](const char** f) {
    return cuda::launch_lowrank_block_scores(sl, nullptr, f);
  };
  EXPECT_TRUE(refused(workspace, "lowrank_block_scores_workspace_bytes")) << "block size 96";
  EXPECT_TRUE(refused(scores, "launch_lowrank_block_scores")) << "block size 96";
  sl.block_size = 64;
  sl.q_blocks = 3;  // 100 queries in blocks of 64 make 2
  EXPECT_TRUE(refused(scores, "launch_lowrank_block_scores")) << "3 query blocks for 100 rows";

  cuda::PooledScoresLaunch pool;
  pool.pq = pool.kp = buf;
  pool.scores = buf;
  pool.batch = pool.heads = 1;
  pool.n = pool.m = 100;
  pool.q_blocks = pool.k_blocks = 2;
  pool.block_size = 96;  // not a multiple of 64
  pool.rank_pad = 16;
  const auto pooled = [&](const char** f) {
    return cuda::launch_pooled_block_scores(pool, nullptr, f);
  };
  EXPECT_TRUE(refused(pooled, "launch_pooled_block_scores")) << "block size 96";
  pool.block_size = 64;
  pool.rank_pad = 12;
  EXPECT_TRUE(refused(pooled, "launch_pooled_block_scores")) << "rank 12";
  pool.rank_pad = 16;
  pool.chunk_blocks = -1;
  EXPECT_TRUE(refused(pooled, "launch_pooled_block_scores")) << "chunk of -1 blocks";

  cuda::PooledKeysLaunch keys;  // otherwise in range: 100 keys of d = 64, blocks of 64
  keys.w = buf;
  keys.k = buf;
  keys.k_stride[0] = keys.k_stride[1] = 64 * 100;
  keys.k_stride[2] = 64;
  keys.scores = buf;
  keys.batch = keys.heads = keys.kv_heads = 1;
  keys.n = keys.m = 100;
  keys.q_blocks = keys.k_blocks = 2;
  keys.block_size = 64;
  keys.d = 64;
  const auto key_scores = [&](const char** f) {
    return cuda::launch_pooled_key_scores(keys, nullptr, f);
  };
  for (int stages : {1, 5}) {
    keys.stages = stages;
    EXPECT_TRUE(refused(key_scores, "launch_pooled_key_scores")) << stages << " stages";
  }
  keys.stages = 0;
  keys.d = 96;
  EXPECT_TRUE(refused(key_scores, "launch_pooled_key_scores")) << "head dim 96";

  cuda::SelectLaunch p;
  int64_t ptr[8];
  p.scores = buf;
  p.row_ptr = ptr;
  p.temp = buf;
  p.temp_bytes = sizeof(buf);
  p.n = 100;
  p.m = 64 * (cuda::kEstimatorMaxKeyBlocks + 1);  // too many key blocks to sort
  p.block_size = 64;
  p.q_blocks = 2;
  p.k_blocks = cuda::kEstimatorMaxKeyBlocks + 1;
  p.rows = 2;
  const auto select = [&](const char** f) { return cuda::launch_select_blocks(p, nullptr, f); };
  EXPECT_TRUE(refused(select, "launch_select_blocks")) << "too many key blocks";
}

}  // namespace
}  // namespace attnpilot::attention
