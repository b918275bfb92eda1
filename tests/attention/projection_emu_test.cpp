/// The low-rank estimator's projection (attention/cuda/projection_block.cuh, step (1) of
/// block_estimator_kernels.h) run on the CPU through the CUDA emulation in tests/cuda_emu, one
/// row per thread (rows_per_thread = 1) and several (rows_per_thread = 4: 4 rows per thread, 2
/// at rank_pad 64, as the launcher maps it), against a float64 LibTorch reference: every row
/// (keys, pooled means) and sampled query rows (estimators.cpp's sample: rows-1 - (t·rows)/ns,
/// slots t >= ns repeating the last), N not a multiple of any CTA's rows, GQA (heads = 2·x_heads),
/// head dims 128, 64, 100 (16-bit rows: the scalar path; fp32: a partial last chunk), 256 and
/// 32, ranks padded to 8/16/32/64 (rank < rank_pad: zero columns; and rank = rank_pad), fp32,
/// bf16 and fp16 input, a shared (a_batch 1) and a per-batch projection with extra columns,
/// strided x ([b, n, x_heads, d] read in place), x not 16-byte aligned (the scalar path for every
/// type), scales != 1. Checks every output element within a float32 accumulation bound, exact
/// zeros past the rank, nothing written past the output (NaN poison), and the two variants
/// bit-identical (same FMA order per element). Runs everywhere, CI included; the GPU test
/// (cuda_estimator_test.cpp) compares the compiled variants on the device.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

// After LibTorch and GoogleTest: the emulation defines CUDA's keywords as macros.
#include "tests/cuda_emu/cuda_emu.h"
// The emulation's 16-bit storage types, declared before the device code that uses them.
#include "tests/cuda_emu/cuda_emu_mma.h"

// Then the device code.
#include "attention/cuda/projection_block.cuh"

namespace {

namespace cu = attnpilot::attention::cuda;
namespace proj = attnpilot::attention::cuda::proj;
namespace emu = attnpilot::cuda_emu;

struct Case {
  int b, h, xh;
  int64_t n, sample_block;  // sample_block 0: every row
  int d, rank, a_batch;
  double scale;
  bool strided = false;    // x stored [b, n, xh, d], read in place
  bool unaligned = false;  // x one element past a 16-byte boundary
  std::string str() const {
    return fmt::format(
        "b={} h={} xh={} n={} sample_block={} d={} rank={} a_batch={} scale={} strided={} "
        "unaligned={}",
        b, h, xh, n, sample_block, d, rank, a_batch, scale, strided, unaligned);
  }
};

int padded(int r) {
  int p = 8;
  while (p < r) p *= 2;
  return p;
}

int64_t rows_out(const Case& c) {
  return c.sample_block > 0 ? 8 * ((c.n + c.sample_block - 1) / c.sample_block) : c.n;
}

/// Input row of output row j, written from estimators.cpp's sampling rule (not from the kernel's
/// helper): slot t of query block qb is its row rows-1 - (t'·rows)/ns, t' = min(t, ns-1).
int64_t source_row(const Case& c, int64_t j) {
  if (c.sample_block == 0) return j;
  const int64_t qb = j / 8, t = j % 8, i0 = qb * c.sample_block;
  const int64_t rows = std::min(c.sample_block, c.n - i0), ns = std::min<int64_t>(8, rows);
  return i0 + rows - 1 - (std::min(t, ns - 1) * rows) / ns;
}

struct Problem {
  torch::Tensor x;        // [b, xh, n, d] in the input dtype (possibly a strided view)
  torch::Tensor a;        // [a_batch, h, d, rank] fp32 view (last dim contiguous, stride rank+3)
  torch::Tensor want;     // [b, h, rows_out, rank] float64
  torch::Tensor bound;    // [b, h, rows_out, rank] float64: Σ_i |x_i|·|a_ic·scale|
  torch::Tensor storage;  // keeps the unaligned buffer alive
};

Problem make_problem(const Case& c, torch::ScalarType dt, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Problem pr;
  const auto xf = torch::randn({c.b, c.xh, c.n, c.d}, gen) * 1.5 + 0.25;
  if (c.strided) {
    pr.x = xf.transpose(1, 2).contiguous().to(dt).transpose(1, 2);  // [b, n, xh, d] storage
  } else if (c.unaligned) {
    pr.storage = torch::empty({xf.numel() + 1}, torch::dtype(dt));
    pr.x = pr.storage.narrow(0, 1, xf.numel()).view(xf.sizes());
    pr.x.copy_(xf.to(dt));
  } else {
    pr.x = xf.to(dt).contiguous();
  }
  pr.a = torch::randn({c.a_batch, c.h, c.d, c.rank + 3}, gen).narrow(3, 0, c.rank);
  const auto x64 = pr.x.to(torch::kDouble);
  const auto a64 = pr.a.to(torch::kDouble) * c.scale;
  const int64_t ro = rows_out(c);
  std::vector<int64_t> idx(static_cast<size_t>(ro));
  for (int64_t j = 0; j < ro; ++j) idx[static_cast<size_t>(j)] = source_row(c, j);
  const auto it = torch::tensor(idx, torch::kLong);
  std::vector<torch::Tensor> want, bound;
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.h; ++h) {
      const auto rows = x64[b][h / (c.h / c.xh)].index_select(0, it);  // [ro, d]
      const auto ah = a64[c.a_batch == 1 ? 0 : b][h];                  // [d, rank]
      want.push_back(torch::matmul(rows, ah));
      bound.push_back(torch::matmul(rows.abs(), ah.abs()));
    }
  pr.want = torch::stack(want).view({c.b, c.h, ro, c.rank});
  pr.bound = torch::stack(bound).view({c.b, c.h, ro, c.rank});
  return pr;
}

/// Runs every CTA of the launcher's grid (rows_per_thread 1 or 4) one after another on NaN-
/// poisoned output (with a poisoned tail of one CTA's rows past its end) and shared memory.
/// Returns the whole buffer, tail included.
template <typename T, int R, int ROWS>
std::vector<float> emulate(const Case& c, const Problem& pr, bool* vectorized) {
  const int64_t ro = rows_out(c), cta_rows = proj::projection_cta_rows(ROWS);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> out(static_cast<size_t>(c.b * c.h * ro * R + cta_rows * R), nan);
  cu::ProjectionLaunch p;
  p.x = pr.x.data_ptr();
  for (int i = 0; i < 3; ++i) {
    p.x_stride[i] = pr.x.stride(i);
    p.a_stride[i] = pr.a.stride(i);
  }
  p.a = pr.a.data_ptr<float>();
  p.a_batch = c.a_batch;
  p.rank = c.rank;
  p.scale = static_cast<float>(c.scale);
  p.out = out.data();
  p.batch = c.b;
  p.heads = c.h;
  p.x_heads = c.xh;
  p.n_in = c.n;
  p.rows_out = ro;
  p.sample_block = c.sample_block;
  p.d = c.d;
  p.rank_pad = R;
  p.rows_per_thread = ROWS == 1 ? 1 : 4;
  *vectorized = proj::projection_vectorized(p, static_cast<int>(sizeof(T)));
  // Shared memory as 16-byte units, poisoned with NaN bytes; stale between CTAs as on the GPU.
  std::vector<float4> smem(
      static_cast<size_t>((proj::projection_smem_bytes<T>(ROWS, c.d, R) + 15) / 16));
  std::memset(smem.data(), 0xff, smem.size() * sizeof(float4));
  const int64_t tiles = (ro + cta_rows - 1) / cta_rows;
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < c.h; ++h)
      for (int64_t t = 0; t < tiles; ++t)
        emu::run_block(proj::kProjThreads, [&] {
          proj::projection_block<T, R, ROWS>(
              p, t, h, b, reinterpret_cast<unsigned char*>(smem.data()), *vectorized);
        });
  return out;
}

/// rows_per_thread 1 or 4 at the case's padded rank, with the launcher's mapping of 4.
template <typename T>
std::vector<float> emulate_any(const Case& c, const Problem& pr, int rows_per_thread,
                               bool* vectorized) {
  const bool one = rows_per_thread == 1;
  switch (padded(c.rank)) {
    case 8:
      return one ? emulate<T, 8, 1>(c, pr, vectorized) : emulate<T, 8, 4>(c, pr, vectorized);
    case 16:
      return one ? emulate<T, 16, 1>(c, pr, vectorized) : emulate<T, 16, 4>(c, pr, vectorized);
    case 32:
      return one ? emulate<T, 32, 1>(c, pr, vectorized) : emulate<T, 32, 4>(c, pr, vectorized);
    default:
      static_assert(proj::projection_rows_per_thread(4, 64) == 2, "the launcher's mapping");
      return one ? emulate<T, 64, 1>(c, pr, vectorized) : emulate<T, 64, 2>(c, pr, vectorized);
  }
}

std::vector<float> run(const Case& c, torch::ScalarType dt, const Problem& pr, int rows,
                       bool* vectorized) {
  switch (dt) {
    case torch::kFloat:
      return emulate_any<float>(c, pr, rows, vectorized);
    case torch::kBFloat16:
      return emulate_any<__nv_bfloat16>(c, pr, rows, vectorized);
    default:
      return emulate_any<__half>(c, pr, rows, vectorized);
  }
}

std::vector<Case> cases() {
  return {
      // Keys: every row, GQA, per-batch projections, 1100 rows (not a multiple of 128 or 512).
      Case{2, 4, 2, 1100, 0, 128, 13, 2, 0.7},
      // Sampled rows of 71 query blocks of 64 (568 slots: a CTA of 512 and a short one), the
      // last block 5 rows (slots 5..7 repeat its last sample), rank 5 of 8.
      Case{1, 2, 1, 64 * 70 + 5, 64, 64, 5, 1, 1.4426950408889634 / 8},
      // Head dim 100 (16-bit: scalar path; fp32: 16-byte loads, a 4-column last chunk), rank
      // 20 of 32, x read in place from [b, n, xh, d], a negative scale.
      Case{2, 2, 2, 700, 0, 100, 20, 1, -1.3, /*strided=*/true},
      // Head dim 256, rank 50 of 64 (2 rows per thread), sampled blocks of 128, GQA.
      Case{1, 2, 1, 128 * 65 + 100, 128, 256, 50, 1, 0.5},
      // x one element past a 16-byte boundary: the scalar path for every input type.
      Case{1, 2, 2, 600, 0, 64, 16, 1, 2.0, false, /*unaligned=*/true},
      // Head dim 256 with rank 31 of 32; per-batch projections.
      Case{2, 1, 1, 530, 0, 256, 31, 2, 1.0},
      // Full rank (8 of 8), three query rows in one block (ns = 3), GQA 4:1, head dim 32.
      Case{1, 4, 1, 3, 128, 32, 8, 1, 0.3},
      // The pooled means: one row per query block, every row, 300 rows, rank 64 of 64.
      Case{1, 2, 2, 300, 0, 128, 64, 1, 0.125},
  };
}

TEST(ProjectionEmulated, BothVariantsMatchFloat64) {
  uint64_t seed = 40;
  double worst = 0;  // largest |error| / (d + 2)·2^-24·bound over every element
  int scalar_runs = 0, vector_runs = 0;
  for (const Case& c : cases()) {
    for (torch::ScalarType dt : {torch::kFloat, torch::kBFloat16, torch::kHalf}) {
      const Problem pr = make_problem(c, dt, seed++);
      const int R = padded(c.rank);
      const int64_t ro = rows_out(c), total = int64_t(c.b) * c.h * ro * R;
      std::vector<float> first;
      for (int rows : {1, 4}) {
        const std::string what =
            fmt::format("{} {} rows_per_thread {}", c.str(), c10::toString(dt), rows);
        bool vectorized = false;
        const auto got_v = run(c, dt, pr, rows, &vectorized);
        (vectorized ? vector_runs : scalar_runs)++;
        // The expected path: 16-byte loads unless x is unaligned or d is not a whole number of
        // 16-byte pieces.
        EXPECT_EQ(vectorized, !c.unaligned && c.d % (16 / pr.x.element_size()) == 0) << what;
        const auto got =
            torch::from_blob(const_cast<float*>(got_v.data()), {c.b, c.h, ro, R}, torch::kFloat)
                .to(torch::kDouble);
        const auto tail =
            torch::from_blob(const_cast<float*>(got_v.data()) + total,
                             {static_cast<int64_t>(got_v.size()) - total}, torch::kFloat);
        EXPECT_TRUE(torch::isnan(tail).all().item<bool>()) << what << ": written past the end";
        ASSERT_TRUE(torch::isfinite(got).all().item<bool>()) << what << ": unwritten outputs";
        if (R > c.rank) {
          EXPECT_EQ(got.narrow(3, c.rank, R - c.rank).abs().max().item<double>(), 0.0)
              << what << ": columns past the rank";
        }
        // fp32 accumulation of d products (each rounded once, a·scale rounded once): at most
        // about (d + 2)·2^-24 of Σ|terms|; a wrong row or column is off by O(|terms|).
        const auto err = (got.narrow(3, 0, c.rank) - pr.want).abs();
        const auto tol = (c.d + 2) * std::ldexp(1.0, -24) * pr.bound + 1e-30;
        const double ratio = (err / tol).max().item<double>();
        worst = std::max(worst, ratio);
        EXPECT_LE(ratio, 1.0) << what << ": max abs error " << err.max().item<double>();
        if (rows == 1) {
          first = got_v;
        } else {
          EXPECT_EQ(std::memcmp(first.data(), got_v.data(), total * sizeof(float)), 0)
              << what << ": the variants differ (same FMA order: expected the same bits)";
        }
      }
    }
  }
  EXPECT_GT(scalar_runs, 0);
  EXPECT_GT(vector_runs, 0);
  std::printf(
      "projection, emulated vs float64: worst error %.3g of the (d + 2)·2^-24 bound (%d "
      "vectorized, %d scalar runs)\n",
      worst, vector_runs, scalar_runs);
}

}  // namespace
