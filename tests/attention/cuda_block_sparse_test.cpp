/// The CUDA block-sparse flash-attention kernel and the CUDA attention backend against the CPU
/// backend, on fresh random inputs and block masks (empty rows, full rows, ragged lengths, GQA,
/// strided queries, streaming windows), outputs poisoned with NaN before each run. GPU tests skip
/// without a CUDA device; the argument checks of the launcher run everywhere.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/attention.h"
#include "attention/backend.h"
#include "attention/cuda/block_sparse_kernels.h"
#include "common/error.h"
#include "tests/attention/cuda_test_util.h"

namespace attnpilot::attention {
namespace {

using testing::block_sparse_expected;
using testing::block_sparse_tolerance;
using testing::expect_close;
using testing::kCuda;
using testing::random_mask;
using testing::Tol;

/// Whether the current device runs the wgmma kernels (compute capability 9.0).
bool device_is_sm90() {
  bool yes = false;
  const char* failed = "";
  return cuda::device_is_sm90(&yes, &failed) == cudaSuccess && yes;
}

/// Launches the raw kernel (`kernel` picks which) into a NaN-poisoned output; checks every
/// CUDA call.
torch::Tensor launch(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                     const BlockMask* mask, double scale, bool causal, int64_t q_offset,
                     int64_t sinks, int64_t window,
                     cuda::BlockSparseKernel kernel = cuda::BlockSparseKernel::kMmaSync) {
  auto out = torch::full({q.size(0), q.size(1), q.size(2), q.size(3)},
                         std::numeric_limits<float>::quiet_NaN(), q.options());
  torch::Tensor row_ptr, col_idx;
  cuda::BlockSparseLaunch p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.batch = static_cast<int>(q.size(0));
  p.heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.n = q.size(2);
  p.m = k.size(2);
  p.d = static_cast<int>(q.size(3));
  p.q_offset = q_offset;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.sinks = sinks;
  p.window = window;
  p.kernel = kernel;
  p.block_size = cuda::kBlockSparseTile;
  if (mask) {
    row_ptr = mask->row_ptr.to(q.device());
    col_idx = mask->col_idx.to(q.device());
    p.row_ptr = row_ptr.data_ptr<int64_t>();
    p.col_idx = col_idx.numel() ? col_idx.data_ptr<int64_t>() : nullptr;
    p.q_blocks = mask->q_blocks;
    p.k_blocks = mask->k_blocks;
    p.block_size = static_cast<int>(mask->block_size);
  }
  const auto type =
      q.scalar_type() == torch::kBFloat16 ? cuda::ElemType::kBFloat16 : cuda::ElemType::kFloat16;
  const char* failed = "";
  const auto stream = at::cuda::getCurrentCUDAStream().stream();
  cudaError_t e = cuda::launch_block_sparse_attention(p, type, stream, &failed);
  EXPECT_EQ(e, cudaSuccess) << failed << ": " << cudaGetErrorString(e);
  e = cudaStreamSynchronize(stream);
  EXPECT_EQ(e, cudaSuccess) << "cudaStreamSynchronize after the kernel: " << cudaGetErrorString(e);
  return out;
}

const char* kernel_name(cuda::BlockSparseKernel kernel) {
  switch (kernel) {
    case cuda::BlockSparseKernel::kWgmma:
      return "wgmma";
    case cuda::BlockSparseKernel::kWgmmaWs:
      return "wgmma-ws";
    case cuda::BlockSparseKernel::kWgmmaWsOverlap:
      return "wgmma-ws-overlap";
    case cuda::BlockSparseKernel::kWgmmaWsAsync:
      return "wgmma-ws-async";
    case cuda::BlockSparseKernel::kWgmmaWsPersistent:
      return "wgmma-ws-persistent";
    case cuda::BlockSparseKernel::kMmaSync:
      return "mma.sync";
    case cuda::BlockSparseKernel::kAuto:
      break;
  }
  return "auto";
}

/// Random CSR cases of both dtypes and head dims, causal and not, with GQA, for each block size
/// in `block_sizes`, through `kernel`: against the CPU backend, empty rows exactly zero, and two
/// runs bit-identical.
void check_kernel_on_random_masks(cuda::BlockSparseKernel kernel,
                                  std::initializer_list<int64_t> block_sizes, uint64_t seed0) {
  std::mt19937_64 rng(seed0);
  int seed = 0;
  const char* name = kernel_name(kernel);
  for (auto dt : {torch::kBFloat16, torch::kHalf})
    for (int64_t d : {64, 128})
      for (int64_t bs : block_sizes)
        for (bool causal : {true, false})
          for (int64_t groups : {1, 4}) {
            const int64_t b = 2, hkv = 2, h = hkv * groups;
            std::uniform_int_distribution<int64_t> len(1, 400);
            const int64_t n = len(rng);
            const int64_t m = causal ? n + len(rng) / 2 : len(rng);
            const int64_t q_offset = causal ? m - n : len(rng) / 4;
            auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + seed++);
            // Half the cases with peaked scores (queries x4): row maxima move by more than the
            // kernel's lazy-rescale slack, so O is rescaled mid-loop.
            const double q_scale = groups == 4 ? 4.0 : 1.0;
            const auto q = (torch::randn({b, h, n, d}, gen) * q_scale).to(kCuda, dt);
            const auto k = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
            const auto v = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
            const auto rm = random_mask(rng, b, h, n, m, bs);
            const double scale = 1.0 / std::sqrt(static_cast<double>(d));
            const std::string what =
                fmt::format("{} {} d={} bs={} causal={} groups={} n={} m={}", name,
                            c10::toString(dt), d, bs, causal, groups, n, m);
            const auto out = launch(q, k, v, &rm.mask, scale, causal, q_offset, 0, 0, kernel);
            expect_close(out,
                         block_sparse_expected(q, k, v, rm.mask, scale, causal, q_offset, 0, 0),
                         block_sparse_tolerance(dt), what);
            // Rows that list no block are exactly zero.
            const auto oc = out.cpu().to(torch::kFloat);
            const int64_t qbn = rm.mask.q_blocks;
            for (size_t row = 0; row < rm.empty.size(); ++row) {
              if (!rm.empty[row]) continue;
              const int64_t bh = row / qbn, qb = row % qbn;
              const auto rows = oc[bh / h][bh % h].narrow(0, qb * bs, std::min(bs, n - qb * bs));
              ASSERT_EQ(rows.abs().max().item<float>(), 0.f) << what << " empty row " << row;
            }
            // Same inputs, same bits: a race would show as a difference between runs.
            EXPECT_TRUE(
                torch::equal(out, launch(q, k, v, &rm.mask, scale, causal, q_offset, 0, 0, kernel)))
                << what << ": two runs differ";
          }
}

TEST(CudaBlockSparse, KernelMatchesCpuBackend) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  check_kernel_on_random_masks(cuda::BlockSparseKernel::kMmaSync, {64, 128}, 20261129);
}

TEST(CudaBlockSparse, WgmmaKernelMatchesCpuBackend) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  if (!device_is_sm90()) GTEST_SKIP() << "the wgmma kernel needs a compute capability 9.0 GPU";
  for (auto kernel :
       {cuda::BlockSparseKernel::kWgmma, cuda::BlockSparseKernel::kWgmmaWs,
        cuda::BlockSparseKernel::kWgmmaWsOverlap, cuda::BlockSparseKernel::kWgmmaWsAsync,
        cuda::BlockSparseKernel::kWgmmaWsPersistent})
    check_kernel_on_random_masks(kernel, {128, 256}, 20261206);
  // Longer rows (many tiles, every stage reused), no lists, and a streaming window.
  std::mt19937_64 rng(11);
  int seed = 0;
  for (auto kernel : {cuda::BlockSparseKernel::kWgmma, cuda::BlockSparseKernel::kWgmmaWs,
                      cuda::BlockSparseKernel::kWgmmaWsPersistent})
    for (auto dt : {torch::kBFloat16, torch::kHalf})
      for (int64_t d : {64, 128}) {
        const int64_t b = 1, h = 4, hkv = 2, n = 1000, m = 1300, q_offset = m - n;
        auto gen = at::make_generator<at::CPUGeneratorImpl>(900 + seed++);
        const auto q = torch::randn({b, h, n, d}, gen).to(kCuda, dt);
        const auto k = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
        const auto v = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
        const double scale = 1.0 / std::sqrt(static_cast<double>(d));
        const auto what = fmt::format("{} {} d={}", kernel_name(kernel), c10::toString(dt), d);
        const auto all = BlockMask::all_visible(b, h, n, m, 128, true, q_offset);
        const auto dense =
            launch(q, k, v, nullptr, scale, true, q_offset, 0, 0, cuda::BlockSparseKernel::kWgmma);
        expect_close(dense, block_sparse_expected(q, k, v, all, scale, true, q_offset, 0, 0),
                     block_sparse_tolerance(dt), what + " no lists");
        const auto mma = launch(q, k, v, nullptr, scale, true, q_offset, 0, 0);
        expect_close(dense, mma, block_sparse_tolerance(dt), what + " against mma.sync");
        const auto rm = random_mask(rng, b, h, n, m, 128);
        expect_close(
            launch(q, k, v, &rm.mask, scale, true, q_offset, 0, 0, cuda::BlockSparseKernel::kWgmma),
            block_sparse_expected(q, k, v, rm.mask, scale, true, q_offset, 0, 0),
            block_sparse_tolerance(dt), what + " random blocks of 128");
        const int64_t sinks = 4, window = 300;
        const auto sm = streaming_block_mask(b, h, n, m, 128, q_offset, sinks, window);
        expect_close(launch(q, k, v, &sm, scale, true, q_offset, sinks, window, kernel),
                     block_sparse_expected(q, k, v, sm, scale, true, q_offset, sinks, window),
                     block_sparse_tolerance(dt), what + " streaming");
      }
}

// The persistent kernel with many more items than SMs (each CTA walks several, its stage ring
// and Q barriers going round across them): bit-identical to its one-item-per-CTA twin (the same
// arithmetic per item), on random lists with empty rows, no lists, and a window; and against
// the CPU backend on one case.
TEST(CudaBlockSparse, PersistentKernelMatchesItsOneItemTwin) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  if (!device_is_sm90()) GTEST_SKIP() << "the wgmma kernel needs a compute capability 9.0 GPU";
  std::mt19937_64 rng(2026120601);
  int seed = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf})
    for (int64_t d : {64, 128}) {
      // 2 · 16 heads · 22 query tiles = 704 items (the last tile partial).
      const int64_t b = 2, h = 16, hkv = 4, n = 2777, m = 3001, q_offset = m - n;
      auto gen = at::make_generator<at::CPUGeneratorImpl>(5000 + seed++);
      const auto q = torch::randn({b, h, n, d}, gen).to(kCuda, dt);
      const auto k = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
      const auto v = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
      const double scale = 1.0 / std::sqrt(static_cast<double>(d));
      const auto what = fmt::format("persistent {} d={}", c10::toString(dt), d);
      const auto rm = random_mask(rng, b, h, n, m, 128);
      const auto both = [&](const BlockMask* mask, int64_t sinks, int64_t window) {
        const auto twin = launch(q, k, v, mask, scale, true, q_offset, sinks, window,
                                 cuda::BlockSparseKernel::kWgmmaWsAsync);
        const auto got = launch(q, k, v, mask, scale, true, q_offset, sinks, window,
                                cuda::BlockSparseKernel::kWgmmaWsPersistent);
        return std::pair{twin, got};
      };
      {
        const auto [twin, got] = both(&rm.mask, 0, 0);
        EXPECT_TRUE(torch::equal(twin, got)) << what << " random lists";
        if (dt == torch::kBFloat16 && d == 128)
          expect_close(got, block_sparse_expected(q, k, v, rm.mask, scale, true, q_offset, 0, 0),
                       block_sparse_tolerance(dt), what + " random lists");
      }
      {
        const auto [twin, got] = both(nullptr, 0, 0);
        EXPECT_TRUE(torch::equal(twin, got)) << what << " no lists";
      }
      {
        const auto sm = streaming_block_mask(b, h, n, m, 128, q_offset, 4, 700);
        const auto [twin, got] = both(&sm, 4, 700);
        EXPECT_TRUE(torch::equal(twin, got)) << what << " streaming";
      }
    }
}

TEST(CudaBlockSparse, BackendStridedStreamingAndGqaMatchCpu) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  std::mt19937_64 rng(7);
  const auto& cuda_backend = backend_for(kCuda);
  EXPECT_EQ(cuda_backend.name(), "cuda");
  int seed = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf})
    for (int64_t d : {64, 128}) {
      const int64_t b = 2, h = 8, hkv = 2, n = 333, m = 517, q_offset = m - n;
      auto gen = at::make_generator<at::CPUGeneratorImpl>(77 + seed++);
      // q in [b, n, h, d] storage viewed as [b, h, n, d] (the model's layout before transpose).
      const auto q = torch::randn({b, n, h, d}, gen).to(kCuda, dt).transpose(1, 2);
      const auto k = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
      const auto v = torch::randn({b, hkv, m, d}, gen).to(kCuda, dt);
      const double scale = 0.7 / std::sqrt(static_cast<double>(d));
      for (int64_t bs : {64, 128}) {
        const auto rm = random_mask(rng, b, h, n, m, bs);
        // Poison the allocator's next block of the output's size, so unwritten output shows.
        { auto poison = torch::full({b, h, n, d}, NAN, q.options()); }
        const auto got = cuda_backend.block_sparse(q, k, v, rm.mask, scale, true, q_offset, 0, 0);
        expect_close(got.out, block_sparse_expected(q, k, v, rm.mask, scale, true, q_offset, 0, 0),
                     block_sparse_tolerance(dt),
                     fmt::format("backend {} d={} bs={}", c10::toString(dt), d, bs));
        EXPECT_DOUBLE_EQ(got.pairs, rm.mask.listed_pairs(n, m));
      }
      // Streaming: sinks plus a window, through its block mask.
      for (auto [sinks, window] : {std::pair<int64_t, int64_t>{4, 100}, {0, 1}, {70, 250}}) {
        const auto mask = streaming_block_mask(b, h, n, m, 64, q_offset, sinks, window);
        { auto poison = torch::full({b, h, n, d}, NAN, q.options()); }
        const auto got =
            cuda_backend.block_sparse(q, k, v, mask, scale, true, q_offset, sinks, window);
        expect_close(got.out,
                     block_sparse_expected(q, k, v, mask, scale, true, q_offset, sinks, window),
                     block_sparse_tolerance(dt),
                     fmt::format("streaming {} d={} sinks={} window={}", c10::toString(dt), d,
                                 sinks, window));
      }
    }
}

TEST(CudaBlockSparse, AttendMatchesCpu) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  const auto& cuda_backend = backend_for(kCuda);
  const auto& cpu_backend = backend_for(torch::Device(torch::kCPU));
  int seed = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf})
    for (int64_t d : {64, 128})
      // (n, m, causal, q_offset): square causal, queries at the end of a cache, ragged
      // non-causal, a decoding step (n = 1: the decode kernel).
      for (auto [n, m, causal, off] :
           {std::tuple<int64_t, int64_t, bool, int64_t>{300, 300, true, 0},
            {77, 450, true, 373},
            {130, 90, false, 0},
            {1, 260, true, 259}}) {
        auto gen = at::make_generator<at::CPUGeneratorImpl>(300 + seed++);
        const auto q = torch::randn({2, 4, n, d}, gen).to(kCuda, dt);
        const auto k = torch::randn({2, 4, m, d}, gen).to(kCuda, dt);
        const auto v = torch::randn({2, 4, m, d}, gen).to(kCuda, dt);
        const double scale = 1.0 / std::sqrt(static_cast<double>(d));
        { auto poison = torch::full({2, 4, n, d}, NAN, q.options()); }
        const auto got = cuda_backend.attend(q, k, v, scale, causal, off);
        const auto f = [](const torch::Tensor& t) { return t.to(torch::kCPU, torch::kFloat); };
        const auto want = cpu_backend.attend(f(q), f(k), f(v), scale, causal, off).out;
        expect_close(
            got.out, want, block_sparse_tolerance(dt),
            fmt::format("attend {} d={} n={} m={} causal={}", c10::toString(dt), d, n, m, causal));
      }
}

TEST(CudaBlockSparse, RunAttentionPlansOnCudaMatchCpu) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  const int64_t b = 2, h = 8, hkv = 2, n = 384, m = 384, d = 128, bs = 128;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4242);
  AttentionInputs cpu_in;
  // bf16-rounded values, so both sides see the same inputs.
  cpu_in.q = torch::randn({b, h, n, d}, gen).to(torch::kBFloat16).to(torch::kFloat);
  cpu_in.k = torch::randn({b, hkv, m, d}, gen).to(torch::kBFloat16).to(torch::kFloat);
  cpu_in.v = torch::randn({b, hkv, m, d}, gen).to(torch::kBFloat16).to(torch::kFloat);
  AttentionInputs gpu_in = cpu_in;
  gpu_in.q = cpu_in.q.to(kCuda, torch::kBFloat16);
  gpu_in.k = cpu_in.k.to(kCuda, torch::kBFloat16);
  gpu_in.v = cpu_in.v.to(kCuda, torch::kBFloat16);
  // A valid mask (every row lists its diagonal block plus random earlier ones).
  std::mt19937_64 rng(3);
  std::vector<std::vector<int64_t>> rows;
  for (int64_t r = 0; r < b * h * (n / bs); ++r) {
    const int64_t qb = r % (n / bs);
    std::vector<int64_t> list;
    for (int64_t kb = 0; kb < qb; ++kb)
      if (rng() % 2) list.push_back(kb);
    list.push_back(qb);
    rows.push_back(list);
  }
  const auto mask = BlockMask::from_rows(b, h, n / bs, m / bs, bs, rows);
  cpu_in.block_mask = gpu_in.block_mask = &mask;
  HeadPlan sparse = HeadPlan::block_sparse(0.5, bs);
  HeadPlan stream = HeadPlan::streaming(200, 16);
  stream.block_size = 64;
  for (const auto& plan : {sparse, stream, HeadPlan::dense()}) {
    for (bool use_sdpa : {true, false}) {
      cpu_in.use_sdpa = gpu_in.use_sdpa = use_sdpa;
      const auto want = run_attention(cpu_in, {LayerPlan::uniform(plan)});
      const auto got = run_attention(gpu_in, {LayerPlan::uniform(plan)});
      EXPECT_TRUE(got.out.is_cuda());
      expect_close(got.out, want.out, block_sparse_tolerance(torch::kBFloat16),
                   "run_attention " + plan.to_string() + (use_sdpa ? " sdpa" : " matmul"));
      if (plan.kind != Kind::kDense) {
        EXPECT_DOUBLE_EQ(got.stats.score_flops, want.stats.score_flops) << plan.to_string();
      }
    }
  }
}

TEST(CudaBlockSparse, UnsupportedShapesUseTheLibTorchPath) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  // float32, head dim 32, block 32: outside the kernel; the backend still computes the function.
  const int64_t b = 1, h = 4, n = 100, m = 100, d = 32, bs = 32;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto q = torch::randn({b, h, n, d}, gen), k = torch::randn({b, h, m, d}, gen),
             v = torch::randn({b, h, m, d}, gen);
  std::mt19937_64 rng(9);
  const auto rm = random_mask(rng, b, h, n, m, bs);
  const auto got = backend_for(kCuda).block_sparse(q.to(kCuda), k.to(kCuda), v.to(kCuda), rm.mask,
                                                   0.2, false, 0, 0, 0);
  const auto want = backend_for(torch::Device(torch::kCPU))
                        .block_sparse(q, k, v, rm.mask, 0.2, false, 0, 0, 0)
                        .out;
  // Rows without keys are NaN on both sides here (the CPU backend's code); compare the rest.
  const auto fin = torch::isfinite(want);
  const auto g = got.out.cpu();
  EXPECT_TRUE(torch::equal(torch::isfinite(g), fin));
  EXPECT_LT((g.masked_fill(~fin, 0) - want.masked_fill(~fin, 0)).abs().max().item<double>(), 1e-4);
}

TEST(CudaBlockSparse, BadMasksRefused) {
  ATTNPILOT_SKIP_WITHOUT_CUDA("the CUDA block-sparse kernel");
  const auto q = torch::randn({1, 2, 128, 64}).to(kCuda, torch::kBFloat16);
  const auto& be = backend_for(kCuda);
  auto wrong_grid = BlockMask::all_visible(1, 2, 256, 128, 64, false, 0);  // 4 query blocks
  EXPECT_THROW(be.block_sparse(q, q, q, wrong_grid, 0.1, false, 0, 0, 0), InvalidArgument);
  auto decreasing = BlockMask::all_visible(1, 2, 128, 128, 64, false, 0);
  decreasing.row_ptr = torch::tensor(std::vector<int64_t>{0, 2, 1, 3, 8}, torch::kLong);
  try {
    be.block_sparse(q, q, q, decreasing, 0.1, false, 0, 0, 0);
    ADD_FAILURE() << "a decreasing row_ptr was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("row_ptr decreases at row 1"), std::string::npos)
        << e.what();
  }
  auto wrong_heads = BlockMask::all_visible(1, 3, 128, 128, 64, false, 0);
  EXPECT_THROW(be.block_sparse(q, q, q, wrong_heads, 0.1, false, 0, 0, 0), InvalidArgument);
}

// Runs without a GPU: the launcher refuses arguments outside the kernel's range before any CUDA
// call, naming itself.
TEST(CudaBlockSparse, LauncherRefusesArgumentsOutsideItsRange) {
  alignas(16) static unsigned char buf[4096];
  cuda::BlockSparseLaunch p;
  p.q = p.k = p.v = buf;
  p.out = buf;
  p.batch = p.heads = p.kv_heads = 1;
  p.n = p.m = 10;
  p.d = 64;
  p.scale = 0.125f;
  const auto refused = [](cuda::BlockSparseLaunch x) {
    const char* failed = "";
    const cudaError_t e =
        cuda::launch_block_sparse_attention(x, cuda::ElemType::kBFloat16, nullptr, &failed);
    return e == cudaErrorInvalidValue &&
           std::string(failed).find("launch_block_sparse_attention") != std::string::npos;
  };
  auto x = p;
  x.d = 96;
  EXPECT_TRUE(refused(x)) << "head dim 96";
  x = p;
  x.block_size = 32;
  EXPECT_TRUE(refused(x)) << "block size 32";
  x = p;
  x.heads = 3;
  x.kv_heads = 2;
  EXPECT_TRUE(refused(x)) << "3 query heads over 2 kv heads";
  x = p;
  x.q = buf + 8;
  EXPECT_TRUE(refused(x)) << "q not 16-byte aligned";
  x = p;
  x.k_stride[2] = 12;
  EXPECT_TRUE(refused(x)) << "k row stride not a multiple of 8";
  x = p;
  x.scale = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(refused(x)) << "NaN scale";
  x = p;
  x.row_ptr = reinterpret_cast<const int64_t*>(buf);
  x.q_blocks = 2;  // 10 queries in blocks of 64 make 1
  x.k_blocks = 1;
  EXPECT_TRUE(refused(x)) << "block grid that does not fit n";
  x = p;
  x.kernel = cuda::BlockSparseKernel::kWgmma;
  x.row_ptr = reinterpret_cast<const int64_t*>(buf);
  x.q_blocks = x.k_blocks = 1;  // blocks of 64: the wgmma kernel needs multiples of 128
  EXPECT_FALSE(cuda::block_sparse_wgmma_supports(x));
  EXPECT_TRUE(cuda::block_sparse_kernel_supports(128, 128));
  EXPECT_FALSE(cuda::block_sparse_kernel_supports(128, 192 - 1));
  // One CTA of d = 128 must fit two to an H100/H200 SM (228 KB) with the kernel's 96 KB.
  EXPECT_LE(cuda::block_sparse_shared_bytes(128), 113 * 1024);
}

}  // namespace
}  // namespace attnpilot::attention
