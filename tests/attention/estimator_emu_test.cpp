/// The pooled-query block scores' device code (attention/cuda/pooled_scores.cuh: the score
/// kernel's CTA body and the normalising warp; attention/cuda/pooled_keys_mma.cuh: the
/// tensor-core body on the stored keys, mma.sync and ldmatrix emulated by cuda_emu_mma.h) run
/// on the CPU through the CUDA emulation in
/// tests/cuda_emu, against the CPU twin lowrank_block_scores(..., pool_queries = true) in
/// float64: N not a multiple of the block, q_offset > 0, causal and not, M != N (fewer keys than
/// the causal limit too), blocks 64 and 128, ranks padded to 8/16/32/64 (two query blocks per
/// thread up to 32, one at 64), two query groups, key chunks of 1..4 blocks and the launcher's
/// default; for the tensor-core body also bf16 and fp16 keys, d 64 and 128, GQA and padded key
/// rows. The inputs of
/// the kernels (the projected block-mean queries and keys) are computed in float64 here and
/// rounded to fp32, as the GPU path's projection kernel writes them. Runs everywhere, CI
/// included; the GPU tests (cuda_estimator_test.cpp) check the compiled kernels on the device.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "attention/estimators.h"
#include "tests/attention/test_util.h"

// After LibTorch and GoogleTest: the emulation defines CUDA's keywords as macros.
#include "tests/cuda_emu/cuda_emu.h"
// clang-format off (the emulation must come first)
#include "attention/cuda/pooled_keys_mma.cuh"
#include "attention/cuda/pooled_keys_wgmma.cuh"
#include "attention/cuda/pooled_scores.cuh"
#include "attention/cuda/pooled_w.cuh"
#include "tests/cuda_emu/cuda_emu_mma.h"
#include "tests/cuda_emu/cuda_emu_wgmma.h"
// clang-format on

namespace {

namespace cu = attnpilot::attention::cuda;
namespace pooled = attnpilot::attention::cuda::pooled;
namespace pooled_keys = attnpilot::attention::cuda::pooled_keys;
namespace pooled_keys_wgmma = attnpilot::attention::cuda::pooled_keys_wgmma;
namespace pooled_w = attnpilot::attention::cuda::pooled_w;
namespace emu = attnpilot::cuda_emu;

/// fp32 rounding of the kernels' inputs (pq, kp) and fp32 dot products, exp2 and sums, amplified
/// by the size of the exponents. Measured on the cases below: at most 8.4e-7 absolute (a case
/// with sharp scores); one key more or less in every query block's softmax moves some score by
/// 1.3e-3 (OneKeyOfMaskIsVisibleAboveTheTolerance), two orders above the tolerance.
constexpr double kAbsTol = 1e-5;

struct Shape {
  int64_t b, h, n, m, q_offset, d, r, bs;
  bool causal;
  int64_t chunk_blocks;  // 0: the launcher's default (kPooledChunkKeys keys)
  std::string str() const {
    return fmt::format("b={} h={} n={} m={} q_offset={} d={} r={} bs={} causal={} chunk={}", b, h,
                       n, m, q_offset, d, r, bs, causal, chunk_blocks);
  }
};

int64_t padded(int64_t r) {
  int64_t p = 8;
  while (p < r) p *= 2;
  return p;
}

struct Problem {
  torch::Tensor q, k, a_q, a_k;  // float64
  std::vector<float> pq, kp;     // the kernels' fp32 inputs, rank padded with zeros
};

/// Queries with a per-head mean direction (so block means are not near zero), keys of unit
/// scale, projections scaled so that the pooled scores s (natural units) have standard
/// deviation about `sharp`: 1 keeps each key's softmax mass near 1/kend (one key more or less
/// shows), 8 makes a few keys dominate (large exponents, the running max's rescaling).
Problem make_problem(const Shape& s, uint64_t seed, double sharp) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  Problem p;
  const auto dir = torch::randn({s.b, s.h, 1, s.d}, gen, o64);
  p.q = 0.5 * torch::randn({s.b, s.h, s.n, s.d}, gen, o64) + dir;
  p.k = torch::randn({s.b, s.h, s.m, s.d}, gen, o64);
  p.a_q =
      torch::randn({1, s.h, s.d, s.r}, gen, o64) * (sharp / std::sqrt(static_cast<double>(s.d)));
  p.a_k = torch::randn({1, s.h, s.d, s.r}, gen, o64) / std::sqrt(static_cast<double>(s.r));
  const int64_t rp = padded(s.r), qbn = (s.n + s.bs - 1) / s.bs;
  // Block means of q, projected, scaled by log2(e)/√d (base 2), as cuda_estimator.cpp does.
  std::vector<torch::Tensor> means;
  for (int64_t qb = 0; qb < qbn; ++qb)
    means.push_back(p.q.narrow(2, qb * s.bs, std::min(s.bs, s.n - qb * s.bs)).mean(2, true));
  const double scale = 1.4426950408889634 / std::sqrt(static_cast<double>(s.d));
  const auto pad = [&](const torch::Tensor& x) {
    const auto y = torch::constant_pad_nd(x, {0, rp - s.r}).to(torch::kFloat).contiguous();
    return std::vector<float>(y.data_ptr<float>(), y.data_ptr<float>() + y.numel());
  };
  p.pq = pad(torch::matmul(torch::cat(means, 2), p.a_q) * scale);
  p.kp = pad(torch::matmul(p.k, p.a_k));
  return p;
}

/// The geometry of either pooled launch struct for shape s, chunk_blocks as the launcher
/// defaults it when the shape gives none.
template <class Launch>
void set_shape(Launch& p, const Shape& s, float* scores) {
  p.scores = scores;
  attnpilot::attention::testing::set_launch_geometry(p, s);
  p.chunk_blocks =
      s.chunk_blocks > 0 ? s.chunk_blocks : std::max<int64_t>(1, cu::kPooledChunkKeys / s.bs);
}

/// pooled_normalise_kernel: 4 warps per CTA, one row each; whole warps past the rows return.
template <class Launch>
void emulate_normalise(const Launch& launch) {
  const cu::PooledScoresLaunch p = cu::pooled_normalise_launch(launch);
  const int64_t rows = int64_t(p.batch) * p.heads * p.q_blocks;
  for (int64_t blk = 0; blk < (rows + 3) / 4; ++blk)
    emu::run_block(128, [&] {
      const int64_t row = blk * 4 + threadIdx.x / 32;
      if (row >= rows) return;
      pooled::pooled_normalise_row(p, row);
    });
}

/// Runs the two kernels as the launcher would (every CTA of the grid, one after another) on
/// poisoned scores. `lse` (if not null) receives the scores between the two kernels.
template <int R>
std::vector<float> emulate(const Shape& s, const Problem& pr, std::vector<float>* lse) {
  cu::PooledScoresLaunch p;
  const int64_t qbn = (s.n + s.bs - 1) / s.bs, kbn = (s.m + s.bs - 1) / s.bs;
  std::vector<float> scores(static_cast<size_t>(s.b * s.h * qbn * kbn),
                            std::numeric_limits<float>::quiet_NaN());
  set_shape(p, s, scores.data());
  p.pq = pr.pq.data();
  p.kp = pr.kp.data();
  p.rank_pad = R;
  std::vector<float> tiles(2 * pooled::kPooledKeyTile * R);  // the CTA's shared memory
  const int64_t chunks = pooled::pooled_chunks(p), groups = pooled::pooled_groups(p);
  for (int64_t bh = 0; bh < s.b * s.h; ++bh)
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t c = 0; c < chunks; ++c)
        emu::run_block(pooled::kPooledThreads,
                       [&] { pooled::pooled_scores_block<R>(p, c, g, bh, tiles.data()); });
  if (lse != nullptr) *lse = scores;
  emulate_normalise(p);
  return scores;
}

std::vector<float> emulate_any(const Shape& s, const Problem& pr, std::vector<float>* lse) {
  switch (padded(s.r)) {
    case 8:
      return emulate<8>(s, pr, lse);
    case 16:
      return emulate<16>(s, pr, lse);
    case 32:
      return emulate<32>(s, pr, lse);
    default:
      return emulate<64>(s, pr, lse);
  }
}

std::vector<Shape> shapes() {
  return {
      // N not a multiple of the block, queries mid-cache, key chunks of 2 blocks.
      Shape{1, 2, 300, 700, 400, 64, 16, 64, true, 2},
      // Rank 5 (padded to 8), one-block chunks, batch 2, N = M = 257 at block 128.
      Shape{2, 1, 257, 257, 0, 32, 5, 128, true, 1},
      // Not causal, M >> N, rank 20 (padded to 32), chunks of 3 blocks (the last one short).
      Shape{1, 2, 100, 1000, 7, 48, 20, 64, false, 3},
      // One query seeing 129 keys: its second key block holds one visible key.
      Shape{1, 1, 1, 129, 128, 64, 16, 128, true, 0},
      // Fewer keys than the causal limit (kend clamped to M), rank 40 (padded to 64).
      Shape{1, 2, 200, 250, 100, 64, 40, 64, true, 2},
      // Not causal, rank 64, block 128, odd lengths.
      Shape{2, 1, 200, 300, 0, 64, 64, 128, false, 0},
      // 261 query blocks: two query groups of the score kernel (256 query blocks each up to
      // rank 32), the launcher's chunks (32 blocks).
      Shape{1, 1, 260 * 64 + 5, 260 * 64 + 5, 0, 32, 16, 64, true, 0},
      // Rank 64 (128 query blocks per group): 140 query blocks, two groups.
      Shape{1, 1, 140 * 64, 700, 3, 64, 64, 64, false, 4},
      // Queries whose causal limit ends a key tile mid-block (kend = 64·k + 1 .. ), block 128.
      Shape{1, 2, 190, 449, 259, 64, 8, 128, true, 1},
  };
}

/// The checks both pooled kernels pass against the CPU twin's scores `want`: the score kernel
/// wrote exactly the visible blocks' L values (`lse`: the scores between the two kernels, the
/// poison left past them), the normaliser every element; rows sum to 1, nothing negative, and
/// the largest error (returned) within tol.
double expect_pooled_scores(const Shape& s, const torch::Tensor& want,
                            const std::vector<float>& got_v, std::vector<float>& lse, double tol,
                            const std::string& what) {
  const int64_t qbn = want.size(2), kbn = want.size(3);
  const auto got = torch::from_blob(const_cast<float*>(got_v.data()), want.sizes(), torch::kFloat)
                       .to(torch::kDouble);
  const auto l = torch::from_blob(lse.data(), want.sizes(), torch::kFloat).to(torch::kDouble);
  for (int64_t qb = 0; qb < qbn; ++qb) {
    const int64_t i0 = qb * s.bs, rows = std::min(s.bs, s.n - i0);
    const int64_t kend = s.causal ? std::min(s.m, s.q_offset + i0 + rows) : s.m;
    const int64_t vis = (kend + s.bs - 1) / s.bs;
    const auto row = l.select(2, qb);
    EXPECT_TRUE(torch::isfinite(row.narrow(2, 0, vis)).all().item<bool>())
        << what << " query block " << qb << ": an L value of a visible block is missing";
    if (vis < kbn) {
      EXPECT_TRUE(torch::isnan(row.narrow(2, vis, kbn - vis)).all().item<bool>())
          << what << " query block " << qb << ": L written past the visible blocks";
    }
  }
  EXPECT_TRUE(torch::isfinite(got).all().item<bool>()) << what << ": unwritten or NaN scores";
  const double err = (got - want).abs().max().item<double>();
  EXPECT_LE(err, tol) << what;
  EXPECT_LE((got.sum(-1) - 1.0).abs().max().item<double>(), 1e-5) << what;
  EXPECT_EQ((got < 0).sum().item<int64_t>(), 0) << what;
  return err;
}

TEST(PooledScoresEmulated, MatchTheCpuTwinInFloat64) {
  uint64_t seed = 11;
  double worst = 0;
  for (const Shape& s : shapes()) {
    const double sharp = seed % 3 == 0 ? 8.0 : 1.0;
    const Problem pr = make_problem(s, seed++, sharp);
    double flops = 0;
    const auto want = attnpilot::attention::lowrank_block_scores(
        pr.q, pr.k, pr.a_q, pr.a_k, s.bs, s.causal, s.q_offset, &flops, /*pool_queries=*/true);
    std::vector<float> lse;
    const auto got_v = emulate_any(s, pr, &lse);
    worst = std::max(worst, expect_pooled_scores(s, want, got_v, lse, kAbsTol,
                                                 fmt::format("{} sharp {}", s.str(), sharp)));
  }
  std::printf("pooled scores, emulated kernels vs float64 CPU twin: max abs error %.3g\n", worst);
}

/// A wrong key limit (one key too many or too few seen by each query block) is caught: the
/// same comparison on the reference recomputed with the causal limit moved by one key.
TEST(PooledScoresEmulated, OneKeyOfMaskIsVisibleAboveTheTolerance) {
  const Shape s{1, 2, 300, 700, 400, 64, 16, 64, true, 2};
  const Problem pr = make_problem(s, 11, 1.0);
  double flops = 0;
  const auto got_v = emulate_any(s, pr, nullptr);
  const auto got =
      torch::from_blob(const_cast<float*>(got_v.data()), {s.b, s.h, 5, 11}, torch::kFloat)
          .to(torch::kDouble);
  for (int64_t shift : {-1, 1}) {
    const auto off = attnpilot::attention::lowrank_block_scores(
        pr.q, pr.k, pr.a_q, pr.a_k, s.bs, s.causal, s.q_offset + shift, &flops, true);
    EXPECT_GT((got - off).abs().max().item<double>(), 10 * kAbsTol) << "shift " << shift;
  }
}

// ---- the tensor-core body on the stored keys (pooled_keys_mma.cuh) ----

/// Its inputs: w = A_k A_qᵀ q̄ · log2(e)/√d (float64, rounded to fp32) and k rounded to T,
/// stored with a row stride of `ld` elements; the CPU twin gets the same rounded keys (in
/// float64, each query head's key head repeated).
struct KeysProblem {
  torch::Tensor q, k64, a_q, a_k;  // float64; k64 [b, h, m, d] (GQA expanded), rounded to T
  std::vector<float> w;
  std::vector<uint16_t> k;  // [b, hkv, m, ld] raw 16-bit values (padding: NaN)
};

template <typename T>
KeysProblem make_keys_problem(const Shape& s, int64_t hkv, int64_t ld, uint64_t seed,
                              double sharp) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const auto o64 = torch::TensorOptions().dtype(torch::kFloat64);
  const bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  KeysProblem p;
  const auto dir = torch::randn({s.b, s.h, 1, s.d}, gen, o64);
  p.q = 0.5 * torch::randn({s.b, s.h, s.n, s.d}, gen, o64) + dir;
  const auto k_raw = torch::randn({s.b, hkv, s.m, s.d}, gen, o64);
  const auto k16 = k_raw.to(bf16 ? torch::kBFloat16 : torch::kHalf);
  p.k64 = k16.to(torch::kFloat64).repeat_interleave(s.h / hkv, 1);
  p.a_q =
      torch::randn({1, s.h, s.d, s.r}, gen, o64) * (sharp / std::sqrt(static_cast<double>(s.d)));
  p.a_k = torch::randn({1, s.h, s.d, s.r}, gen, o64) / std::sqrt(static_cast<double>(s.r));
  const int64_t qbn = (s.n + s.bs - 1) / s.bs;
  std::vector<torch::Tensor> means;
  for (int64_t qb = 0; qb < qbn; ++qb)
    means.push_back(p.q.narrow(2, qb * s.bs, std::min(s.bs, s.n - qb * s.bs)).mean(2, true));
  const double scale = 1.4426950408889634 / std::sqrt(static_cast<double>(s.d));
  const auto w =
      (torch::matmul(torch::matmul(torch::cat(means, 2), p.a_q) * scale, p.a_k.transpose(2, 3)))
          .to(torch::kFloat)
          .contiguous();
  p.w.assign(w.data_ptr<float>(), w.data_ptr<float>() + w.numel());
  const auto bits = k16.contiguous().view(torch::kInt16);
  const int16_t* src = bits.data_ptr<int16_t>();
  p.k.assign(static_cast<size_t>(s.b * hkv * s.m * ld), bf16 ? 0x7fc0 : 0x7e00);
  for (int64_t row = 0; row < s.b * hkv * s.m; ++row)
    for (int64_t c = 0; c < s.d; ++c)
      p.k[static_cast<size_t>(row * ld + c)] = static_cast<uint16_t>(src[row * s.d + c]);
  return p;
}

/// The two kernels as the launcher runs them (every CTA of the grid, then the normaliser), on
/// poisoned scores, with `stages` key tiles in flight per CTA; `lse` (if not null) receives the
/// scores between the two. split = false: w in one 16-bit part (wgmma: 2 or 3 stages, or
/// pipelined). The pipelined wgmma body keeps 3 tiles whatever `stages` says (as the launcher).
template <typename T, int D>
std::vector<float> emulate_keys(const Shape& s, int64_t hkv, int64_t ld, const KeysProblem& pr,
                                std::vector<float>* lse, int stages, bool wgmma,
                                bool pipelined = false, bool split = true, bool lazy = false) {
  cu::PooledKeysLaunch p;
  const int64_t qbn = (s.n + s.bs - 1) / s.bs, kbn = (s.m + s.bs - 1) / s.bs;
  std::vector<float> scores(static_cast<size_t>(s.b * s.h * qbn * kbn),
                            std::numeric_limits<float>::quiet_NaN());
  set_shape(p, s, scores.data());
  p.w = pr.w.data();
  p.k = pr.k.data();
  p.k_stride[0] = hkv * s.m * ld;
  p.k_stride[1] = s.m * ld;
  p.k_stride[2] = ld;
  p.type = std::is_same_v<T, __nv_bfloat16> ? cu::InputType::kBFloat16 : cu::InputType::kFloat16;
  p.kv_heads = static_cast<int>(hkv);
  p.d = D;
  p.split = split;
  p.lazy_max = lazy;
  const int64_t groups = pooled_keys::groups(p), chunks = pooled_keys::chunks(p);
  for (int64_t bh = 0; bh < s.b * s.h; ++bh)
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t g = 0; g < groups; ++g) {
        if (wgmma) {
          // The wgmma body: a 1024-byte aligned window (the emulated wgmma reads it through
          // descriptors), poisoned with NaN before each CTA.
          const auto bytes = static_cast<size_t>(pooled_keys_wgmma::shared_bytes(D, stages));
          std::vector<uint16_t> raw(bytes / 2 + 512,
                                    std::is_same_v<T, __nv_bfloat16> ? 0x7fc0 : 0x7e00);
          auto* base = reinterpret_cast<unsigned char*>(
              (reinterpret_cast<uintptr_t>(raw.data()) + 1023) / 1024 * 1024);
          emu::wgmma::set_shared_window(base, bytes);
          emu::run_block(pooled_keys_wgmma::kThreads, [&] {
            // The pipelined body always keeps three tiles (the launcher's stages 0 or 3).
            if (pipelined && !split)
              pooled_keys_wgmma::pooled_keys_wgmma_block<T, D, 3, true, false>(p, c, g, bh, base);
            else if (pipelined)
              pooled_keys_wgmma::pooled_keys_wgmma_block<T, D, 3, true>(p, c, g, bh, base);
            else if (!split && stages == 2)
              pooled_keys_wgmma::pooled_keys_wgmma_block<T, D, 2, false, false>(p, c, g, bh, base);
            else if (!split)
              pooled_keys_wgmma::pooled_keys_wgmma_block<T, D, 3, false, false>(p, c, g, bh, base);
            else if (stages == 2)
              pooled_keys_wgmma::pooled_keys_wgmma_block<T, D, 2>(p, c, g, bh, base);
            else
              pooled_keys_wgmma::pooled_keys_wgmma_block<T, D, 3>(p, c, g, bh, base);
          });
          continue;
        }
        // The CTA's shared memory, poisoned (NaN) before each CTA.
        std::vector<uint16_t> tiles(pooled_keys::shared_bytes(D, stages) / 2,
                                    std::is_same_v<T, __nv_bfloat16> ? 0x7fc0 : 0x7e00);
        T* smem = reinterpret_cast<T*>(tiles.data());
        emu::run_block(pooled_keys::kThreads, [&] {
          if (stages == 2)
            pooled_keys::pooled_keys_block<T, D, 2>(p, c, g, bh, smem);
          else if (stages == 3)
            pooled_keys::pooled_keys_block<T, D, 3>(p, c, g, bh, smem);
          else
            pooled_keys::pooled_keys_block<T, D, 4>(p, c, g, bh, smem);
        });
      }
  if (lse != nullptr) *lse = scores;
  emulate_normalise(p);
  return scores;
}

struct KeysCase {
  Shape s;
  int64_t hkv, ld;
  bool bf16;
};

/// `pipelined`: the wgmma body's pipelined form (stages 2 or 3); split = false: w in one part;
/// lazy: PooledKeysLaunch::lazy_max.
std::vector<float> emulate_keys_any(const KeysCase& c, const KeysProblem& pr,
                                    std::vector<float>* lse, int stages = 2, bool wgmma = false,
                                    bool pipelined = false, bool split = true, bool lazy = false) {
  const int st = stages;
  const bool pp = pipelined;
  if (c.s.d == 64)
    return c.bf16 ? emulate_keys<__nv_bfloat16, 64>(c.s, c.hkv, c.ld, pr, lse, st, wgmma, pp, split,
                                                    lazy)
                  : emulate_keys<__half, 64>(c.s, c.hkv, c.ld, pr, lse, st, wgmma, pp, split, lazy);
  return c.bf16 ? emulate_keys<__nv_bfloat16, 128>(c.s, c.hkv, c.ld, pr, lse, st, wgmma, pp, split,
                                                   lazy)
                : emulate_keys<__half, 128>(c.s, c.hkv, c.ld, pr, lse, st, wgmma, pp, split, lazy);
}

KeysProblem make_keys_any(const KeysCase& c, uint64_t seed, double sharp) {
  return c.bf16 ? make_keys_problem<__nv_bfloat16>(c.s, c.hkv, c.ld, seed, sharp)
                : make_keys_problem<__half>(c.s, c.hkv, c.ld, seed, sharp);
}

/// w's 16-bit split (scaled to [-1, 1] per row) leaves each element of w off by <= 2^-17 of its
/// row's largest (bf16; 2^-22 for fp16), the twin is float64: on sharp scores (a few keys
/// dominate) a score moves by ~1e-5 (measured 1.1e-5, bf16), on flat ones by < 1e-6; one key
/// more or less on flat scores moves them by ~1e-3, w without its low part by ~1e-3.
constexpr double kKeysAbsTol = 3e-5;
/// w in one 16-bit part (CudaEstimatorOptions::pooled_key_split = false) keeps ~2^-9 of each
/// element of w (bf16; ~2^-12 for fp16): the block scores (a distribution per row) move by up
/// to 4.6e-4 on keys_cases() and 4.3e-3 on ToleranceSeesTheLowPartAndOneKey's sharp bf16 case
/// (measured in this emulation, 2026-12-06).
constexpr double kOnePartAbsTol = 1e-2;

std::vector<KeysCase> keys_cases() {
  return {
      // N not a multiple of the block, queries mid-cache, chunks of 2 blocks, bf16, d 64.
      {Shape{1, 2, 300, 700, 400, 64, 16, 64, true, 2}, 2, 64, true},
      // fp16, d 128, GQA (2 query heads per key head), padded key rows, block 128.
      {Shape{1, 4, 257, 257, 0, 128, 5, 128, true, 1}, 2, 136, false},
      // Not causal, M >> N, rank 20, chunks of 3 blocks (the last one short), batch 2.
      {Shape{2, 1, 100, 1000, 7, 64, 20, 64, false, 3}, 1, 72, true},
      // One query seeing 129 keys: its second key block holds one visible key.
      {Shape{1, 1, 1, 129, 128, 128, 16, 128, true, 0}, 1, 128, false},
      // 70 query blocks: two query groups (64 each), some warps past the last block, fewer keys
      // than the causal limit.
      {Shape{1, 1, 70 * 64 - 3, 60 * 64 + 5, 100, 64, 64, 64, true, 0}, 1, 64, true},
      // Causal limits ending a key tile mid-block, block 128, fp16.
      {Shape{1, 2, 190, 449, 259, 64, 8, 128, true, 1}, 1, 64, false},
  };
}

/// Both bodies (mma.sync; wgmma with `stages` 128-key tiles in flight) on every case against
/// the float64 CPU twin; split = false: w in one part, against kOnePartAbsTol.
void check_keys_against_twin(bool wgmma, int stages, bool pipelined = false, bool split = true,
                             bool lazy = false) {
  uint64_t seed = 31;
  double worst = 0;
  for (const KeysCase& c : keys_cases()) {
    const Shape& s = c.s;
    const double sharp = seed % 2 == 0 ? 8.0 : 1.0;
    const KeysProblem pr = make_keys_any(c, seed++, sharp);
    double flops = 0;
    const auto want = attnpilot::attention::lowrank_block_scores(
        pr.q, pr.k64, pr.a_q, pr.a_k, s.bs, s.causal, s.q_offset, &flops, /*pool_queries=*/true);
    std::vector<float> lse;
    const auto got_v = emulate_keys_any(c, pr, &lse, stages, wgmma, pipelined, split, lazy);
    worst = std::max(worst,
                     expect_pooled_scores(
                         s, want, got_v, lse, split ? kKeysAbsTol : kOnePartAbsTol,
                         fmt::format("{}{} {} hkv={} ld={} {} sharp {}",
                                     wgmma ? (pipelined ? "wgmma pipelined" : "wgmma") : "mma.sync",
                                     split ? "" : " one part", s.str(), c.hkv, c.ld,
                                     c.bf16 ? "bf16" : "fp16", sharp)));
  }
  std::printf(
      "pooled scores on the stored keys (%s%s, %d stages), emulated vs float64 CPU twin: max abs "
      "error %.3g\n",
      wgmma ? (pipelined ? "wgmma pipelined" : "wgmma") : "mma.sync",
      split ? "" : ", w in one part", stages, worst);
}

TEST(PooledKeyScoresEmulated, MatchTheCpuTwinInFloat64) { check_keys_against_twin(false, 2); }

// The wgmma body (128-key tiles: blocks of 64 split a tile in two halves, chunks ending mid
// tile), with 2 and 3 tiles in flight, against the same twin and tolerance.
TEST(PooledKeyScoresEmulated, WgmmaBodyMatchesTheCpuTwinInFloat64) {
  check_keys_against_twin(true, 2);
  check_keys_against_twin(true, 3);
}

// The pipelined wgmma body (tile t + 1's products run while tile t is folded, two accumulator
// sets, three tiles of keys; blocks of 64 end twice per tile, blocks of 128 once, chunk ends mid
// tile): against the twin, and the same bits as the plain wgmma body (the same products and
// folds in the same order; the stages are NaN-poisoned, and the emulated wgmma checks that no
// operand's shared memory changes while it is pending and that no accumulator is read before
// its wait), with w in two parts and in one.
TEST(PooledKeyScoresEmulated, PipelinedWgmmaBodyMatchesThePlainOne) {
  check_keys_against_twin(true, 3, /*pipelined=*/true);
  uint64_t seed = 71;
  for (const KeysCase& c : keys_cases()) {
    const KeysProblem pr = make_keys_any(c, seed++, 8.0);
    for (bool split : {true, false}) {
      const auto plain = emulate_keys_any(c, pr, nullptr, 2, /*wgmma=*/true, false, split);
      const auto piped = emulate_keys_any(c, pr, nullptr, 3, true, /*pipelined=*/true, split);
      ASSERT_EQ(plain.size(), piped.size());
      EXPECT_EQ(std::memcmp(plain.data(), piped.data(), plain.size() * sizeof(float)), 0)
          << c.s.str() << ": pipelined differs from the plain body" << (split ? "" : " (one part)");
    }
  }
}

// The lazy fold (pooled_key_lazy_max: unmasked halves against a per-row reference, no maximum)
// against the exact fold, both bodies, w in two parts and in one, on flat and very sharp scores
// (sharp 48: scores spread over hundreds of log2 units, so halves leave the lazy fold's
// [2^-64, 2^64] window and fall back to the exact fold, above and below the reference: a
// quarter to a half of the lazy halves on these cases, counted in the emulation when this was
// written): the per-block log2 sums within 2e-5 + 2e-6·|L| and the normalised scores within
// 1e-6. Against the twin too.
TEST(PooledKeyScoresEmulated, LazyFoldMatchesTheExactFold) {
  check_keys_against_twin(false, 2, false, true, /*lazy=*/true);
  check_keys_against_twin(true, 2, false, true, /*lazy=*/true);
  // Cases whose warps see whole unmasked halves (a warp's 16 query blocks all real: masks only
  // near each warp's diagonal): the 70-block case, 64 query blocks causal from the start
  // (bf16, d 64), and 32 query blocks not causal (fp16, d 128, chunks of 3 blocks).
  const std::vector<KeysCase> cases = {
      keys_cases()[4],
      {Shape{1, 1, 64 * 64, 64 * 64, 0, 64, 16, 64, true, 0}, 1, 64, true},
      {Shape{1, 1, 32 * 64, 40 * 64 + 9, 0, 128, 8, 64, false, 3}, 1, 128, false},
  };
  uint64_t seed = 131;
  for (double sharp : {1.0, 48.0}) {
    for (const KeysCase& c : cases) {
      const KeysProblem pr = make_keys_any(c, seed++, sharp);
      for (bool wgmma : {false, true}) {
        for (bool split : {true, false}) {
          const std::string what =
              fmt::format("{} sharp {} {}{}", c.s.str(), sharp, wgmma ? "wgmma" : "mma.sync",
                          split ? "" : " one part");
          std::vector<float> l_exact, l_lazy;
          const auto exact = emulate_keys_any(c, pr, &l_exact, 2, wgmma, false, split, false);
          const auto lazy = emulate_keys_any(c, pr, &l_lazy, 2, wgmma, false, split, true);
          ASSERT_EQ(exact.size(), lazy.size());
          double worst_l = 0, worst_s = 0;
          for (size_t i = 0; i < exact.size(); ++i) {
            ASSERT_EQ(std::isnan(l_exact[i]), std::isnan(l_lazy[i])) << what << " at " << i;
            if (!std::isnan(l_exact[i])) {
              ASSERT_TRUE(std::isfinite(l_lazy[i])) << what << " at " << i << ": " << l_lazy[i];
              const double dl = std::abs(static_cast<double>(l_exact[i]) - l_lazy[i]);
              EXPECT_LE(dl, 2e-5 + 2e-6 * std::abs(l_exact[i])) << what << " L at " << i;
              worst_l = std::max(worst_l, dl);
            }
            worst_s = std::max(worst_s, static_cast<double>(std::abs(exact[i] - lazy[i])));
          }
          EXPECT_LE(worst_s, 1e-6) << what;
          // The lazy fold does run (its sums round differently from the exact fold's).
          EXPECT_GT(worst_l, 0.0) << what << ": the lazy fold gave the exact fold's bits";
        }
      }
    }
  }
}

// w in one 16-bit part (pooled_key_split = false), both bodies, against the twin with the looser
// tolerance its rounding needs; and with it the wgmma body (2 and 3 tiles in flight) gives the
// same scores as the mma.sync one up to the order of the fp32 sums.
TEST(PooledKeyScoresEmulated, OnePartOfWMatchesTheCpuTwin) {
  check_keys_against_twin(false, 2, false, /*split=*/false);
  check_keys_against_twin(true, 2, false, /*split=*/false);
  check_keys_against_twin(true, 3, false, /*split=*/false);
  uint64_t seed = 91;
  for (const KeysCase& c : keys_cases()) {
    const KeysProblem pr = make_keys_any(c, seed++, 8.0);
    const auto sync = emulate_keys_any(c, pr, nullptr, 2, false, false, false);
    const auto wg = emulate_keys_any(c, pr, nullptr, 2, true, false, false);
    const auto split = emulate_keys_any(c, pr, nullptr, 2, true);
    double worst = 0, moved = 0;
    for (size_t i = 0; i < sync.size(); ++i) {
      worst = std::max(worst, static_cast<double>(std::abs(sync[i] - wg[i])));
      moved = std::max(moved, static_cast<double>(std::abs(split[i] - wg[i])));
    }
    EXPECT_LE(worst, 1e-5) << c.s.str() << ": the bodies differ with w in one part";
    // Dropping the low part must change something (the one-part kernels do run one part).
    EXPECT_GT(moved, 0.0) << c.s.str() << ": one part gives the two-part bits";
  }
}

/// pooled_w_block (the kernel that forms w = A_k (A_qᵀ q̄ · scale) from q) against the same
/// products in float64 on the values the kernel reads: q in bf16, fp16 and fp32, d 64 and 128,
/// a short last block, q's rows and heads strided (a view of [b, n, h, d]), A shared by the batch
/// or not, A_q narrowed to fewer columns than it stores (row stride > rank), A_k column-major,
/// every CTA of the
/// grid (kWBlocks blocks each, the last CTA partly past q_blocks). w is poisoned first.
/// from_means: pooled_w_products_block instead, on fp32 means of the rounded q (PooledWLaunch::
/// means; kProductBlocks blocks per CTA, q poisoned: it must not be read).
template <typename T, int D>
void check_pooled_w(int64_t b, int64_t h, int64_t n, int64_t bs, int64_t r, int64_t a_batch,
                    uint64_t seed, bool from_means = false, int64_t per_cta_q = 4) {
  const std::string what =
      fmt::format("{} d={} b={} h={} n={} bs={} r={} a_batch={}{}",
                  std::is_same_v<T, float>           ? "fp32"
                  : std::is_same_v<T, __nv_bfloat16> ? "bf16"
                                                     : "fp16",
                  D, b, h, n, bs, r, a_batch, from_means ? " (products from the means)" : "");
  torch::manual_seed(seed);
  // q as the kernel sees it: [b, n, h, d] storage, rows of the (b, h) slice strided by h·d.
  const auto q_store = torch::randn({b, n, h, D}, torch::kDouble) + 0.3;
  std::vector<T> q_raw(static_cast<size_t>(q_store.numel()));
  auto q_used = torch::empty_like(q_store);  // the values after rounding to T
  {
    const auto flat = q_store.contiguous().view({-1});
    auto used = q_used.view({-1});
    for (int64_t i = 0; i < flat.numel(); ++i) {
      const float x = static_cast<float>(flat[i].item<double>());
      if constexpr (std::is_same_v<T, float>) {
        q_raw[i] = x;
        used[i] = static_cast<double>(x);
      } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        q_raw[i] = __float2bfloat16(x);
        used[i] = static_cast<double>(__bfloat162float(q_raw[i]));
      } else {
        q_raw[i] = __float2half(x);
        used[i] = static_cast<double>(__half2float(q_raw[i]));
      }
    }
  }
  const int64_t r_store = r + 3;  // A_q's stored columns: the kernel reads the first r
  const auto a_q = torch::randn({a_batch, h, D, r_store}, torch::kFloat);
  // A_k column-major within each head (as linalg_qr returns it): a column stride of d.
  const auto a_k = torch::randn({a_batch, h, r, D}, torch::kFloat).transpose(2, 3);
  const double scale = 0.125;
  const int64_t qbn = (n + bs - 1) / bs;
  std::vector<float> w(static_cast<size_t>(b * h * qbn * D), std::nanf(""));
  cu::PooledWLaunch p;
  p.q = q_raw.data();
  p.q_stride[0] = n * h * D;
  p.q_stride[1] = D;
  p.q_stride[2] = h * D;
  p.type = std::is_same_v<T, float>           ? cu::InputType::kFloat32
           : std::is_same_v<T, __nv_bfloat16> ? cu::InputType::kBFloat16
                                              : cu::InputType::kFloat16;
  p.a_q = a_q.data_ptr<float>();
  p.a_k = a_k.data_ptr<float>();
  for (int i = 0; i < 4; ++i) {
    p.a_q_stride[i] = a_q.stride(i);
    p.a_k_stride[i] = a_k.stride(i);
  }
  p.a_batch = static_cast<int>(a_batch);
  p.w = w.data();
  p.batch = static_cast<int>(b);
  p.heads = static_cast<int>(h);
  p.n = n;
  p.q_blocks = qbn;
  p.block_size = static_cast<int>(bs);
  p.d = D;
  p.rank = static_cast<int>(r);
  p.scale = static_cast<float>(scale);
  // The float64 reference reads the rounded q (the kernel from q) or the fp32 means (from_means).
  const auto qd = q_used.permute({0, 2, 1, 3});  // [b, h, n, d]
  torch::Tensor means32;                         // [b, h, qbn, d] fp32 contiguous
  if (from_means) {
    means32 = torch::empty({b, h, qbn, D}, torch::kFloat);
    for (int64_t qb = 0; qb < qbn; ++qb)
      means32.select(2, qb).copy_(qd.narrow(2, qb * bs, std::min(bs, n - qb * bs)).mean(2));
    p.means = means32.data_ptr<float>();
    std::memset(q_raw.data(), 0xff, q_raw.size() * sizeof(T));  // NaN in every type
  }
  // From q: blocks_per_cta as given (the last CTA of a head partly past q_blocks).
  p.blocks_per_cta = static_cast<int>(per_cta_q);
  const int per_cta = from_means ? pooled_w::kProductBlocks : static_cast<int>(per_cta_q);
  std::vector<float> smem(
      static_cast<size_t>(from_means ? pooled_w::products_shared_floats<D>(static_cast<int>(r))
                                     : pooled_w::shared_floats<T, D>(static_cast<int>(r))));
  const int64_t groups = (qbn + per_cta - 1) / per_cta;
  for (int64_t bb = 0; bb < b; ++bb)
    for (int64_t hh = 0; hh < h; ++hh)
      for (int64_t g = 0; g < groups; ++g) {
        std::fill(smem.begin(), smem.end(), std::nanf(""));
        emu::run_block(pooled_w::kThreads, [&] {
          if (from_means)
            pooled_w::pooled_w_products_block<D>(p, g, hh, bb, smem.data());
          else
            pooled_w::pooled_w_block<T, D>(p, g, hh, bb, smem.data());
        });
      }
  double worst = 0, size = 0;
  for (int64_t bb = 0; bb < b; ++bb)
    for (int64_t hh = 0; hh < h; ++hh) {
      const auto aq = a_q[a_batch > 1 ? bb : 0][hh].narrow(1, 0, r).to(torch::kDouble);
      const auto ak = a_k[a_batch > 1 ? bb : 0][hh].to(torch::kDouble);
      for (int64_t qb = 0; qb < qbn; ++qb) {
        const int64_t rows = std::min(bs, n - qb * bs);
        const auto mean = from_means ? means32[bb][hh][qb].to(torch::kDouble)
                                     : qd[bb][hh].narrow(0, qb * bs, rows).mean(0);
        const auto want = torch::mv(ak, torch::mv(aq.t(), mean) * scale);
        const auto got =
            torch::from_blob(w.data() + ((bb * h + hh) * qbn + qb) * D, {D}, torch::kFloat)
                .to(torch::kDouble);
        ASSERT_TRUE(torch::isfinite(got).all().item<bool>()) << what << " qb " << qb;
        worst = std::max(worst, (got - want).abs().max().item<double>());
        size = std::max(size, want.abs().max().item<double>());
      }
    }
  // fp32 sums of up to 128 rows and d + r products: ~1e-6 of the values' size.
  EXPECT_LE(worst, 2e-5 * size) << what << " (largest |w| " << size << ")";
  std::printf("pooled_w %s: max abs error %.3g (largest |w| %.3g)\n", what.c_str(), worst, size);
}

TEST(PooledWEmulated, MatchesTheProductsInFloat64) {
  check_pooled_w<__nv_bfloat16, 128>(1, 2, 5 * 64 + 17, 64, 16, 1, 1);
  check_pooled_w<__half, 64>(2, 1, 300, 128, 5, 2, 2);
  check_pooled_w<float, 128>(1, 1, 129, 128, 64, 1, 3);
  check_pooled_w<float, 64>(2, 2, 64 * 9, 64, 1, 2, 4);
  // One block per CTA, three (the last CTA partly past q_blocks), the most (16: 20 blocks, a
  // short last one), and blocks taller than eight rounds of row lanes (d 64 fp32: 32 row
  // lanes, blocks of 320 rows).
  check_pooled_w<__nv_bfloat16, 128>(1, 1, 7 * 64, 64, 16, 1, 11, false, 1);
  check_pooled_w<__half, 128>(1, 2, 10 * 64 - 5, 64, 8, 1, 12, false, 3);
  check_pooled_w<__nv_bfloat16, 64>(1, 1, 20 * 128 - 70, 128, 32, 1, 13, false, 16);
  check_pooled_w<float, 64>(1, 1, 3 * 320 + 1, 320, 16, 1, 14, false, 2);
}

/// The products kernel (the default w path's second step) on fp32 means: two CTAs per head, the
/// second partly past q_blocks, ranks 1 to 64.
TEST(PooledWEmulated, ProductsFromTheMeansMatchFloat64) {
  check_pooled_w<__nv_bfloat16, 128>(1, 2, 41 * 64 + 17, 64, 16, 1, 5, true);
  check_pooled_w<__half, 64>(2, 1, 300, 128, 5, 2, 6, true);
  check_pooled_w<float, 128>(1, 1, 70 * 64, 64, 64, 1, 7, true);
  check_pooled_w<float, 64>(2, 2, 64 * 9, 64, 1, 2, 8, true);
}

// More key tiles in flight per CTA (3 or 4 cp.async stages) change when each tile is loaded,
// not what is computed: the same bits as the two-stage body, on every case (the stages are
// poisoned with NaN, so a tile read before it lands or after it is overwritten shows).
TEST(PooledKeyScoresEmulated, StagesInFlightGiveTheSameBits) {
  uint64_t seed = 51;
  for (const KeysCase& c : keys_cases()) {
    const KeysProblem pr = make_keys_any(c, seed++, 8.0);
    const auto two = emulate_keys_any(c, pr, nullptr, 2);
    for (int stages : {3, 4}) {
      const auto more = emulate_keys_any(c, pr, nullptr, stages);
      ASSERT_EQ(two.size(), more.size());
      EXPECT_EQ(std::memcmp(two.data(), more.data(), two.size() * sizeof(float)), 0)
          << c.s.str() << ": " << stages << " stages differ from 2";
    }
  }
}

/// The split of w matters: with its low part dropped (w rounded to bf16 first, ~2^-9 of each
/// product) the comparison fails on sharp scores; and on flat ones a causal limit moved by one
/// key shows above the tolerance.
TEST(PooledKeyScoresEmulated, ToleranceSeesTheLowPartAndOneKey) {
  const KeysCase c{Shape{1, 2, 300, 700, 400, 64, 16, 64, true, 2}, 2, 64, true};
  const auto run = [&](const KeysProblem& pr) {
    const auto v = emulate_keys_any(c, pr, nullptr);
    return torch::from_blob(const_cast<float*>(v.data()), {1, 2, 5, 11}, torch::kFloat)
        .to(torch::kDouble);
  };
  const auto twin = [&](const KeysProblem& pr, int64_t shift) {
    double flops = 0;
    return attnpilot::attention::lowrank_block_scores(pr.q, pr.k64, pr.a_q, pr.a_k, c.s.bs,
                                                      c.s.causal, c.s.q_offset + shift, &flops,
                                                      /*pool_queries=*/true);
  };
  const KeysProblem flat = make_keys_any(c, 33, 1.0);
  const auto got_flat = run(flat);
  EXPECT_LE((got_flat - twin(flat, 0)).abs().max().item<double>(), kKeysAbsTol);
  for (int64_t shift : {-1, 1}) {
    const double moved = (got_flat - twin(flat, shift)).abs().max().item<double>();
    std::printf("one key %+lld: %.3g\n", static_cast<long long>(shift), moved);
    EXPECT_GT(moved, 10 * kKeysAbsTol) << "shift " << shift;
  }
  KeysProblem sharp = make_keys_any(c, 32, 8.0);
  const auto want = twin(sharp, 0);
  EXPECT_LE((run(sharp) - want).abs().max().item<double>(), kKeysAbsTol);
  for (float& x : sharp.w) x = __bfloat162float(__float2bfloat16(x));
  const double hi_only = (run(sharp) - want).abs().max().item<double>();
  std::printf("w without its low part: %.3g\n", hi_only);
  EXPECT_GT(hi_only, 10 * kKeysAbsTol);
}

}  // namespace
