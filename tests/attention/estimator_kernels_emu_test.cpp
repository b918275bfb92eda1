/// The CUDA low-rank block estimator's sampled-row score kernel and its selection kernels run on
/// the CPU through the CUDA emulation in tests/cuda_emu (block_scores_block.cuh: mma.sync m16n8k8
/// tf32 and cvt.rna.tf32 emulated by cuda_emu_mma.h; select_block.cuh: the selection warp with its
/// bitonic sort, then the scan on the host as CUB does it on the device, then the scatter), against
/// the CPU twins of estimators.cpp: lowrank_block_scores on fp32 CPU tensors, with the GPU test's
/// tolerances (cuda_estimator_test.cpp) for 3xTF32 and one-pass tf32, and select_blocks on the same
/// scores, whose CSR lists must be equal. Shapes: blocks 64 and 128, causal and not, q_offset > 0,
/// N not a multiple of the block, short query blocks (fewer than 8 rows), two query tiles of 8
/// blocks, ranks padded to 8/16/32/64, a query whose causal limit is a tile's first key, and once
/// more than 128 key blocks (the L rows in the global workspace, not in shared memory). The
/// kernels' inputs (the sampled projected queries and the projected keys) are computed here in
/// float64 and rounded to fp32, as the projection kernel writes them; the unused sample rows are
/// NaN, outputs and scratch are poisoned. Runs everywhere, CI included; the GPU tests check the
/// compiled kernels on the device.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention/block_mask.h"
#include "attention/estimators.h"
#include "attention/plan.h"
#include "tests/attention/test_util.h"

// After LibTorch and GoogleTest: the emulation defines CUDA's keywords as macros.
#include "tests/cuda_emu/cuda_emu.h"
// clang-format off (the emulation must come first)
#include "attention/cuda/block_scores_block.cuh"
#include "attention/cuda/pooled_scores.cuh"
#include "attention/cuda/select_block.cuh"
#include "tests/cuda_emu/cuda_emu_mma.h"
// clang-format on

namespace attnpilot::attention {
namespace {

namespace cu = attnpilot::attention::cuda;
namespace sampled = attnpilot::attention::cuda::sampled;
namespace pooled = attnpilot::attention::cuda::pooled;
namespace selection = attnpilot::attention::cuda::selection;
namespace emu = attnpilot::cuda_emu;

/// The GPU test's tolerances (cuda_estimator_test.cpp): 3xTF32 against the fp32 CPU twin, and
/// the one-pass tf32 mode.
constexpr double kAbsTol = 5e-5;
constexpr double kRelTol = 5e-5;
constexpr double kTf32AbsTol = 3e-2;
constexpr double kTf32RelTol = 1e-2;

struct Shape {
  int64_t b, h, n, m, q_offset, d, r, bs;
  bool causal;
  int grid;  // CTAs of the emulated persistent grid
  std::string str() const {
    return fmt::format("b={} h={} n={} m={} q_offset={} d={} r={} bs={} causal={} grid={}", b, h, n,
                       m, q_offset, d, r, bs, causal, grid);
  }
  int64_t q_blocks() const { return (n + bs - 1) / bs; }
  int64_t k_blocks() const { return (m + bs - 1) / bs; }
};

int64_t padded(int64_t r) {
  int64_t p = 8;
  while (p < r) p *= 2;
  return p;
}

struct Problem {
  torch::Tensor q, k, a_q, a_k;  // fp32 CPU, the CPU twin's inputs
  std::vector<float> qs, kp;     // the kernel's inputs
};

Problem make_problem(const Shape& s, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  Problem p;
  p.q = torch::randn({s.b, s.h, s.n, s.d}, gen);
  p.k = torch::randn({s.b, s.h, s.m, s.d}, gen);
  p.a_q = torch::randn({s.b, s.h, s.d, s.r}, gen) / std::sqrt(static_cast<double>(s.r));
  p.a_k = torch::randn({s.b, s.h, s.d, s.r}, gen);
  const int64_t rp = padded(s.r), qbn = s.q_blocks();
  const auto o64 = torch::dtype(torch::kFloat64);
  // qs [b, h, qb, 8, rp]: sample t of query block qb (estimators.cpp's rows), · a_q ·
  // log2(e)/√d; rows t >= ns are never read (NaN); the rank padding is zero.
  const auto qp = (torch::matmul(p.q.to(o64), p.a_q.to(o64)) *
                   (1.4426950408889634 / std::sqrt(static_cast<double>(s.d))))
                      .to(torch::kFloat)
                      .contiguous();
  const auto kp = torch::matmul(p.k.to(o64), p.a_k.to(o64)).to(torch::kFloat).contiguous();
  const auto qa = qp.accessor<float, 4>();
  const auto ka = kp.accessor<float, 4>();
  p.qs.assign(static_cast<size_t>(s.b * s.h * qbn * 8 * rp), 0.f);
  p.kp.assign(static_cast<size_t>(s.b * s.h * s.m * rp), 0.f);
  for (int64_t bh = 0; bh < s.b * s.h; ++bh) {
    const int64_t bi = bh / s.h, hi = bh % s.h;
    for (int64_t qb = 0; qb < qbn; ++qb) {
      const int64_t i0 = qb * s.bs, rows = std::min(s.bs, s.n - i0),
                    ns = std::min<int64_t>(8, rows);
      for (int64_t t = 0; t < 8; ++t) {
        float* dst = &p.qs[static_cast<size_t>(((bh * qbn + qb) * 8 + t) * rp)];
        if (t >= ns) {
          std::fill(dst, dst + rp, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        const int64_t row = i0 + rows - 1 - (t * rows) / ns;
        for (int64_t c = 0; c < s.r; ++c) dst[c] = qa[bi][hi][row][c];
      }
    }
    for (int64_t j = 0; j < s.m; ++j)
      for (int64_t c = 0; c < s.r; ++c)
        p.kp[static_cast<size_t>((bh * s.m + j) * rp + c)] = ka[bi][hi][j][c];
  }
  return p;
}

struct alignas(16) Chunk16 {
  unsigned char b[16];
};

/// Shared or scratch memory of `bytes` bytes, 16-byte aligned, filled with NaN floats.
std::vector<Chunk16> poisoned(int64_t bytes) {
  std::vector<Chunk16> v(static_cast<size_t>((bytes + 15) / 16 + 1));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (auto& c : v)
    for (int i = 0; i < 4; ++i) std::memcpy(c.b + 4 * i, &nan, 4);
  return v;
}

/// The score kernel as the launcher runs it: a persistent grid of s.grid CTAs sharing the work
/// counter, run one CTA at a time (CTA s.grid - 1 first: it takes every item, so its slice of
/// the workspace holds the L rows when they are not in shared memory; the others then find no
/// work). Scores, shared memory and workspace start poisoned (only the counter is zeroed, as by
/// the launcher's memset); a guard past the workspace must stay untouched.
template <int R>
torch::Tensor emulate_scores(const Shape& s, const Problem& pr, bool split) {
  const int64_t qbn = s.q_blocks(), kbn = s.k_blocks();
  std::vector<float> scores(static_cast<size_t>(s.b * s.h * qbn * kbn),
                            std::numeric_limits<float>::quiet_NaN());
  const int64_t ws_bytes = sampled::score_workspace_bytes(s.grid, kbn);
  constexpr int64_t kGuard = 64;  // floats
  std::vector<Chunk16> ws = poisoned(ws_bytes + kGuard * 4);
  float* wsf = reinterpret_cast<float*>(ws.data());
  std::memset(wsf, 0, sampled::kCounterFloats * 4);
  cu::BlockScoresLaunch p;
  p.qs = pr.qs.data();
  p.kp = pr.kp.data();
  p.scores = scores.data();
  p.workspace = wsf;
  attnpilot::attention::testing::set_launch_geometry(p, s);
  p.rank_pad = R;
  p.split_tf32 = split;
  const int64_t smem_bytes = sampled::score_smem_bytes(R, kbn);
  for (int i = 0; i < s.grid; ++i) {
    const unsigned cta = static_cast<unsigned>((s.grid - 1 + i) % s.grid);
    std::vector<Chunk16> smem = poisoned(smem_bytes);
    const auto body = [&] {
      auto* sm = reinterpret_cast<unsigned char*>(smem.data());
      if (split)
        sampled::block_scores_block<R, true>(p, cta, sm);
      else
        sampled::block_scores_block<R, false>(p, cta, sm);
    };
    emu::run_block(sampled::kScoreThreads, body);
  }
  // Every item was handed out once, and each CTA asked once more to learn there was none left.
  unsigned counter;
  std::memcpy(&counter, wsf, sizeof counter);
  const int64_t work =
      (qbn + sampled::kTileQueryBlocks - 1) / sampled::kTileQueryBlocks * s.b * s.h;
  EXPECT_EQ(counter, static_cast<unsigned>(work + s.grid)) << s.str();
  for (int64_t i = 0; i < kGuard; ++i)
    EXPECT_TRUE(std::isnan(wsf[ws_bytes / 4 + i])) << s.str() << ": workspace guard " << i;
  return torch::from_blob(scores.data(), {s.b, s.h, qbn, kbn}, torch::kFloat).clone();
}

torch::Tensor emulate_scores_any(const Shape& s, const Problem& pr, bool split) {
  switch (padded(s.r)) {
    case 8:
      return emulate_scores<8>(s, pr, split);
    case 16:
      return emulate_scores<16>(s, pr, split);
    case 32:
      return emulate_scores<32>(s, pr, split);
    default:
      return emulate_scores<64>(s, pr, split);
  }
}

torch::Tensor cpu_scores(const Shape& s, const Problem& pr) {
  double flops = 0;
  return lowrank_block_scores(pr.q, pr.k, pr.a_q, pr.a_k, s.bs, s.causal, s.q_offset, &flops);
}

/// Emulated selection as launch_select_blocks runs it (select_kernel: select_rows_per_cta rows
/// per CTA, one warp each):
/// a count budget's lists written by the kernel itself; a mass budget's bitmap and counts, the
/// exclusive scan of the counts on the host (CUB's on the device), then the scatter (4 rows per
/// 128-thread CTA). `capacity` < 0: room for every block of every row (a count budget: exactly
/// its lists, as the launcher sizes col_idx). log2_sums: the scores are per-block log2 sums for
/// the kernel to normalise (SelectLaunch::log2_sums).
BlockMask emulate_select(const torch::Tensor& scores, const HeadPlan& plan, int64_t n, int64_t m,
                         bool causal, int64_t q_offset, int64_t capacity = -1,
                         std::vector<int64_t>* col_all = nullptr, bool log2_sums = false) {
  const auto sc = scores.to(torch::kFloat).contiguous();
  const int64_t b = sc.size(0), h = sc.size(1), qbn = sc.size(2), kbn = sc.size(3);
  const int64_t rows = b * h * qbn, words = (kbn + 31) / 32;
  const bool direct = plan.gamma <= 0;
  std::vector<uint32_t> bitmap(static_cast<size_t>(rows * words), 0xdeadbeefu);
  std::vector<int64_t> counts(static_cast<size_t>(rows + 1), -99);
  counts[static_cast<size_t>(rows)] = 0;  // the launcher's memset
  std::vector<int64_t> row_ptr(static_cast<size_t>(rows + 1), -55);
  if (capacity < 0)
    capacity = direct ? select_blocks(scores, plan, n, m, causal, q_offset).nnz() : rows * kbn;
  std::vector<int64_t> col(static_cast<size_t>(std::max<int64_t>(capacity, 1) + 8), -77);
  cu::SelectLaunch p;
  p.scores = sc.data_ptr<float>();
  p.log2_sums = log2_sums;
  p.rows = rows;
  p.n = n;
  p.m = m;
  p.q_offset = q_offset;
  p.q_blocks = qbn;
  p.k_blocks = kbn;
  p.block_size = static_cast<int>(plan.block_size);
  p.causal = causal;
  p.gamma = plan.gamma;
  p.top_k = plan.top_k;
  p.density = plan.density;
  p.row_ptr = row_ptr.data();
  p.col_idx = col.data();
  p.col_capacity = capacity;
  const int cap = selection::select_cap(kbn);
  selection::dispatch_select(cap, [&](auto entries) {  // the launcher's choice of sort
    constexpr int kE = decltype(entries)::value;
    // The kernel's CTAs: select_rows_per_cta warps, a shared-memory slice each (poisoned).
    constexpr int kRows = selection::select_rows_per_cta(kE);
    const int64_t slice = selection::select_slice_bytes(kE, cap, kbn);
    for (int64_t blk = 0; blk < (rows + kRows - 1) / kRows; ++blk) {
      std::vector<Chunk16> smem(static_cast<size_t>(kRows * slice / 16 + 1));
      std::memset(smem.data(), 0xa5, smem.size() * 16);
      emu::run_block(32 * kRows, [&] {
        auto* sm = reinterpret_cast<unsigned char*>(smem.data());
        const auto b32 = static_cast<unsigned>(blk);
        if (direct)
          selection::select_block<kE, true>(p, b32, nullptr, nullptr, cap, sm, slice);
        else
          selection::select_block<kE, false>(p, b32, bitmap.data(), counts.data(), cap, sm, slice);
      });
    }
  });
  if (!direct) {
    std::exclusive_scan(counts.begin(), counts.end(), row_ptr.begin(), int64_t{0});
    for (int64_t blk = 0; blk < (rows + 3) / 4; ++blk)
      emu::run_block(
          128, [&] { selection::scatter_block(p, static_cast<unsigned>(blk), bitmap.data()); });
  }
  const int64_t nnz = row_ptr[static_cast<size_t>(rows)];
  for (size_t i = static_cast<size_t>(std::min(nnz, capacity)); i < col.size(); ++i)
    EXPECT_EQ(col[i], -77) << "col_idx written past the list or the capacity at " << i;
  if (col_all != nullptr) *col_all = col;
  BlockMask out;
  out.batch = b;
  out.heads = h;
  out.q_blocks = qbn;
  out.k_blocks = kbn;
  out.block_size = plan.block_size;
  out.row_ptr = torch::tensor(row_ptr, torch::kLong);
  out.col_idx = torch::tensor(
      std::vector<int64_t>(col.begin(), col.begin() + std::min(nnz, capacity)), torch::kLong);
  return out;
}

std::vector<HeadPlan> plans(int64_t bs) {
  std::vector<HeadPlan> out;
  for (double gamma : {0.5, 0.9, 0.99}) {
    HeadPlan p = HeadPlan::block_sparse(0.5, bs);
    p.gamma = gamma;
    out.push_back(p);
  }
  for (int64_t top_k : {1, 3, 8}) {
    HeadPlan p = HeadPlan::block_sparse(0.5, bs);
    p.top_k = top_k;
    out.push_back(p);
  }
  for (double density : {0.1, 0.3, 1.0}) out.push_back(HeadPlan::block_sparse(density, bs));
  return out;
}

/// Selection, scan and scatter against select_blocks on the same scores: equal CSR lists.
void expect_same_selection(const torch::Tensor& scores, int64_t n, int64_t m, int64_t bs,
                           bool causal, int64_t q_offset, const std::string& what) {
  for (const HeadPlan& plan : plans(bs)) {
    const std::string w = what + " plan " + plan.to_string();
    const BlockMask want = select_blocks(scores, plan, n, m, causal, q_offset);
    const BlockMask got = emulate_select(scores, plan, n, m, causal, q_offset);
    ASSERT_TRUE(torch::equal(got.row_ptr, want.row_ptr))
        << w << ": row_ptr differs\n got " << got.row_ptr << "\nwant " << want.row_ptr;
    EXPECT_TRUE(torch::equal(got.col_idx, want.col_idx)) << w << ": col_idx differs";
  }
}

std::vector<Shape> score_shapes() {
  return {
      // N not a multiple of the block, queries mid-cache, 3 query blocks, grid of 2.
      {1, 2, 130, 200, 70, 32, 16, 64, true, 2},
      // Block 128, not causal, rank padded 8, more keys than the causal limit would show.
      {2, 1, 200, 300, 10, 24, 5, 128, false, 3},
      // Short query block (5 rows: 5 samples), rank padded to 32, one key block past the diagonal.
      {1, 3, 5, 70, 65, 16, 20, 64, true, 1},
      // Two query tiles of 8 blocks (heaviest first), causal from the start, block 64.
      {1, 1, 600, 600, 0, 16, 8, 64, true, 2},
      // A query whose causal limit is the first key of a 64-key tile (it sees one key of it).
      {1, 2, 1, 129, 128, 16, 16, 128, true, 1},
      // Rank padded to 64 (8 k-steps), block 128, causal, fewer keys than the causal limit.
      {1, 1, 250, 200, 90, 48, 40, 128, true, 1},
  };
}

void check_scores(const Shape& s, const torch::Tensor& got, const torch::Tensor& want_f32,
                  bool split) {
  const std::string what = s.str() + (split ? " 3xTF32" : " tf32");
  ASSERT_EQ(got.sizes(), want_f32.sizes()) << what;
  const auto g = got.to(torch::kDouble), w = want_f32.to(torch::kDouble);
  ASSERT_TRUE(torch::isfinite(g).all().item<bool>()) << what << ": unwritten or NaN scores";
  const double abs_err = (g - w).abs().max().item<double>();
  const double rel_err = ((g - w).norm() / w.norm()).item<double>();
  EXPECT_LE(abs_err, split ? kAbsTol : kTf32AbsTol) << what;
  EXPECT_LE(rel_err, split ? kRelTol : kTf32RelTol) << what;
  // Each row is a distribution over its visible blocks (zero past them, exactly as the CPU).
  EXPECT_LE((g.sum(-1) - 1.0).abs().max().item<double>(), 1e-4) << what;
  EXPECT_TRUE(torch::equal(g == 0, w == 0)) << what << ": zeros (invisible blocks) differ";
  std::printf("%s: max abs err %.2e, rel %.2e\n", what.c_str(), abs_err, rel_err);
}

TEST(EstimatorKernelsEmulated, ScoresMatchCpuTwinAndSelectionMatchesSelectBlocks) {
  uint64_t seed = 4100;
  for (const Shape& s : score_shapes()) {
    const Problem pr = make_problem(s, seed++);
    const auto want = cpu_scores(s, pr);
    for (bool split : {true, false}) {
      const auto got = emulate_scores_any(s, pr, split);
      check_scores(s, got, want, split);
      if (HasFailure()) return;
      // The selection on the kernel's own scores (as the GPU pipeline runs it).
      expect_same_selection(got, s.n, s.m, s.bs, s.causal, s.q_offset,
                            s.str() + (split ? " 3xTF32" : " tf32"));
    }
  }
}

/// More than 128 key blocks: the L rows live in the global workspace (the slice of the CTA that
/// runs the item), not in shared memory; the selection then sorts 256 entries.
TEST(EstimatorKernelsEmulated, LogSumExpRowsInTheGlobalWorkspace) {
  const Shape s{1, 1, 70, 129 * 64 + 5, 129 * 64 + 5 - 70, 16, 8, 64, true, 3};
  ASSERT_GT(s.k_blocks(), sampled::kLseSmemMaxBlocks);
  const Problem pr = make_problem(s, 77);
  const auto want = cpu_scores(s, pr);
  const auto got = emulate_scores_any(s, pr, /*split=*/true);
  check_scores(s, got, want, true);
  expect_same_selection(got, s.n, s.m, s.bs, s.causal, s.q_offset, s.str());
}

/// Scores with many exact ties (multiples of 1/16, 70% zeros of both signs) and values past the
/// visible blocks: the sort's tie order must be std::stable_sort's (lower block first), and
/// every mass is exact in float64, so the lists must be equal whatever the summation order.
/// 300 key blocks (a 512-entry sort, 10 bitmap words), short last query block, causal and not.
TEST(EstimatorKernelsEmulated, SelectionTiesFollowTheStableOrder) {
  std::mt19937_64 rng(5);
  std::uniform_int_distribution<int> level(1, 4), zero(0, 9);
  for (bool causal : {true, false}) {
    for (int64_t bs : {64, 128}) {
      const int64_t kbn = 300, m = kbn * bs - 10, n = 2 * bs + 3;
      const int64_t q_offset = causal ? m - n - bs * 7 : 5;  // some blocks past the causal limit
      const int64_t qbn = (n + bs - 1) / bs;
      auto scores = torch::empty({1, 2, qbn, kbn}, torch::kFloat);
      auto acc = scores.accessor<float, 4>();
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t qb = 0; qb < qbn; ++qb)
          for (int64_t kb = 0; kb < kbn; ++kb) {
            const int v = zero(rng) < 7 ? 0 : level(rng);  // mostly zeros: density 0.3 takes some
            acc[0][h][qb][kb] = v == 0 ? (kb % 2 ? -0.f : 0.f) : static_cast<float>(v) / 16.f;
          }
      expect_same_selection(scores, n, m, bs, causal, q_offset,
                            fmt::format("ties causal={} bs={}", causal, bs));
    }
  }
}

/// Every sort select_row has: rows of 1 to 4 key blocks (a 32-entry register sort of mostly
/// invisible entries), 600 and 1024 (32 entries per lane, the largest register sort) and 1500
/// (past kSelectMaxRegisterCap: the shared-memory sort of 2048 entries). Random scores with
/// some ties, causal and not, every plan of expect_same_selection.
TEST(EstimatorKernelsEmulated, SelectionAtEverySortSize) {
  std::mt19937_64 rng(31);
  std::uniform_int_distribution<int> level(0, 40);
  const int64_t bs = 64;
  for (int64_t kbn : {1, 4, 600, 1024, 1500}) {
    ASSERT_EQ(selection::select_entries(selection::select_cap(kbn)) == 0,
              selection::select_cap(kbn) > selection::kSelectMaxRegisterCap);
    for (bool causal : {true, false}) {
      const int64_t m = kbn * bs - 3, n = std::min<int64_t>(m, 2 * bs + 5);
      const int64_t q_offset = causal ? m - n - (kbn > 4 ? bs * 3 : 0) : 0;
      const int64_t qbn = (n + bs - 1) / bs;
      auto scores = torch::empty({1, 1, qbn, kbn}, torch::kFloat);
      auto acc = scores.accessor<float, 4>();
      for (int64_t qb = 0; qb < qbn; ++qb)
        for (int64_t kb = 0; kb < kbn; ++kb)
          acc[0][0][qb][kb] = static_cast<float>(level(rng)) / 64.f;
      expect_same_selection(scores, n, m, bs, causal, q_offset,
                            fmt::format("k_blocks={} causal={}", kbn, causal));
    }
  }
}

/// Per-block log2 sums (a pooled estimator's rows before normalisation, NaN past each row's
/// visible blocks, as the score kernels leave them): the selection's own normalisation gives the
/// normalisation kernel's floats, so its lists equal select_blocks' on the normalised rows, every
/// plan, every sort size, causal and not.
TEST(EstimatorKernelsEmulated, SelectionNormalisesLog2SumsAsTheNormaliser) {
  std::mt19937_64 rng(77);
  std::normal_distribution<float> nd(0.f, 6.f);
  const int64_t bs = 64;
  for (int64_t kbn : {3, 100, 700, 1200}) {
    for (bool causal : {true, false}) {
      const int64_t m = kbn * bs - 7, n = std::min<int64_t>(m, 3 * bs + 9);
      const int64_t q_offset = causal ? m - n - (kbn > 3 ? bs * 2 : 0) : 0;
      const int64_t qbn = (n + bs - 1) / bs;
      auto log2s = torch::empty({1, 2, qbn, kbn}, torch::kFloat);
      auto acc = log2s.accessor<float, 4>();
      cu::PooledScoresLaunch np;
      np.batch = 1;
      np.heads = 2;
      np.n = n;
      np.m = m;
      np.q_offset = q_offset;
      np.q_blocks = qbn;
      np.k_blocks = kbn;
      np.block_size = static_cast<int>(bs);
      np.causal = causal;
      for (int64_t h = 0; h < 2; ++h)
        for (int64_t qb = 0; qb < qbn; ++qb) {
          const int64_t vis = (pooled::pooled_visible_keys(np, qb) + bs - 1) / bs;
          for (int64_t kb = 0; kb < kbn; ++kb)
            acc[0][h][qb][kb] = kb < vis ? nd(rng) + (kb % 5 == 0 ? 40.f : 0.f)
                                         : std::numeric_limits<float>::quiet_NaN();
        }
      // The normalisation kernel, emulated, on a copy.
      auto normalised = log2s.clone();
      np.scores = normalised.data_ptr<float>();
      for (int64_t row = 0; row < 2 * qbn; ++row)
        emu::run_block(32, [&] { pooled::pooled_normalise_row(np, row); });
      for (const HeadPlan& plan : plans(bs)) {
        const std::string w =
            fmt::format("k_blocks={} causal={} plan {}", kbn, causal, plan.to_string());
        const BlockMask want = select_blocks(normalised, plan, n, m, causal, q_offset);
        const BlockMask got =
            emulate_select(log2s, plan, n, m, causal, q_offset, -1, nullptr, true);
        ASSERT_TRUE(torch::equal(got.row_ptr, want.row_ptr)) << w << ": row_ptr differs";
        EXPECT_TRUE(torch::equal(got.col_idx, want.col_idx)) << w << ": col_idx differs";
      }
    }
  }
}

/// The count budgets' radix select against select_blocks on rows built to stress it: every
/// score equal (all ties: the lowest blocks win), two levels, a few distinct values among
/// zeros, huge and subnormal scores, and scores differing in the last bit only; top_k from 1 to
/// past the visible blocks and densities, at register sizes of 1 to 32 entries per lane.
TEST(EstimatorKernelsEmulated, CountBudgetRadixSelectMatchesSort) {
  std::mt19937_64 rng(123);
  const int64_t bs = 64;
  int cases = 0;
  for (int64_t kbn : {5, 33, 64, 250, 1000}) {
    const int64_t m = kbn * bs, n = std::min<int64_t>(m, 4 * bs);
    const int64_t q_offset = m - n;
    const int64_t qbn = n / bs;
    for (int pattern = 0; pattern < 5; ++pattern) {
      auto scores = torch::empty({1, 1, qbn, kbn}, torch::kFloat);
      auto acc = scores.accessor<float, 4>();
      std::uniform_int_distribution<int> pick(0, 9);
      for (int64_t qb = 0; qb < qbn; ++qb)
        for (int64_t kb = 0; kb < kbn; ++kb) {
          float v = 0.f;
          switch (pattern) {
            case 0:
              v = 0.25f;
              break;
            case 1:
              v = pick(rng) < 5 ? 0.5f : 0.125f;
              break;
            case 2:
              v = pick(rng) == 0 ? static_cast<float>(pick(rng)) : 0.f;
              break;
            case 3:
              v = pick(rng) < 3 ? 3e38f : pick(rng) < 5 ? 1e-44f : 1.f;
              break;
            default:
              v = std::nextafter(1.f, 2.f * static_cast<float>(pick(rng) % 3));
              break;
          }
          acc[0][0][qb][kb] = v;
        }
      std::vector<HeadPlan> ps;
      for (int64_t top_k : {int64_t{1}, int64_t{2}, kbn / 3 + 1, kbn - 1, kbn + 5}) {
        HeadPlan hp = HeadPlan::block_sparse(0.5, bs);
        hp.top_k = top_k;
        ps.push_back(hp);
      }
      for (double density : {0.05, 0.5, 0.97}) ps.push_back(HeadPlan::block_sparse(density, bs));
      for (const HeadPlan& plan : ps) {
        const std::string w =
            fmt::format("k_blocks={} pattern={} plan {}", kbn, pattern, plan.to_string());
        const BlockMask want = select_blocks(scores, plan, n, m, true, q_offset);
        const BlockMask got = emulate_select(scores, plan, n, m, true, q_offset);
        ASSERT_TRUE(torch::equal(got.row_ptr, want.row_ptr)) << w << ": row_ptr differs";
        ASSERT_TRUE(torch::equal(got.col_idx, want.col_idx)) << w << ": col_idx differs";
        ++cases;
      }
    }
  }
  EXPECT_EQ(cases, 5 * 5 * 8);
}

/// A col_idx shorter than the lists: entries past the capacity are never written, the row_ptr
/// still counts every chosen block.
TEST(EstimatorKernelsEmulated, ScatterStopsAtTheCapacity) {
  const Shape s{1, 2, 130, 200, 70, 32, 16, 64, true, 1};
  const Problem pr = make_problem(s, 9);
  const auto scores = emulate_scores_any(s, pr, true);
  HeadPlan plan = HeadPlan::block_sparse(0.5, s.bs);
  plan.gamma = 0.9;
  const BlockMask want = select_blocks(scores, plan, s.n, s.m, s.causal, s.q_offset);
  const int64_t nnz = want.nnz();
  ASSERT_GT(nnz, 2);
  std::vector<int64_t> col;
  const BlockMask got = emulate_select(scores, plan, s.n, s.m, s.causal, s.q_offset, nnz - 2, &col);
  EXPECT_TRUE(torch::equal(got.row_ptr, want.row_ptr));
  EXPECT_TRUE(torch::equal(got.col_idx, want.col_idx.narrow(0, 0, nnz - 2)));
}

}  // namespace
}  // namespace attnpilot::attention
