/// The CUDA block-sparse flash-attention kernel (attention/cuda/block_sparse_block.cuh) and the
/// split-K decode kernels (attention/cuda/decode_block.cuh) run on the CPU through the CUDA
/// emulation (tests/cuda_emu: fibers per thread, block barriers, warp shuffles, and
/// cuda_emu_mma.h's ldmatrix / mma.sync / cp.async with the PTX fragment layouts), against the
/// same CPU references and tolerances as the GPU tests (cuda_block_sparse_test.cpp,
/// cuda_decode_test.cpp), on small shapes: bf16 and fp16, head dims 64 and 128, blocks of 64 and
/// 128 (64- and 128-row CTAs), causal and not, GQA, random CSR lists with empty and partial rows,
/// no lists, a streaming window, strided queries; decode with projected and full keys, every head
/// block (1, 2, 4, 8 query heads per CTA), ragged lengths with 0 and 1, one split and several.
/// Outputs, workspace and shared memory are poisoned with NaN first. Runs everywhere, CI
/// included; the GPU tests check the compiled kernels on the device.
#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/backend.h"
#include "attention/block_mask.h"
#include "tests/attention/cuda_test_util.h"

// After LibTorch and GoogleTest: the emulation defines CUDA's keywords as macros.
#include "tests/cuda_emu/cuda_emu.h"
// clang-format off (the emulation must come first)
#include "attention/cuda/block_sparse_block.cuh"
#include "attention/cuda/block_sparse_wgmma_block.cuh"
#include "attention/cuda/decode_block.cuh"
#include "tests/cuda_emu/cuda_emu_mma.h"
#include "tests/cuda_emu/cuda_emu_wgmma.h"
// clang-format on

namespace attnpilot::attention {
namespace {

namespace emu = attnpilot::cuda_emu;
namespace bsk = cuda::block_sparse;
namespace bsw = cuda::block_sparse_wgmma;
namespace dk = cuda::decode;
using testing::block_sparse_expected;
using testing::block_sparse_tolerance;
using testing::expect_close;
using testing::random_mask;
using testing::Tol;

/// A byte buffer aligned to `align` bytes (the kernels' dynamic shared memory).
class Shared {
 public:
  explicit Shared(int64_t bytes, int align = 128)
      : buf_(static_cast<size_t>(bytes + align)), align_(align) {}
  /// The buffer filled with 0xff bytes: NaN as bf16, fp16 and fp32, so reading shared memory
  /// before writing it shows in the output.
  unsigned char* poisoned() {
    std::memset(buf_.data(), 0xff, buf_.size());
    return buf_.data() + (align_ - reinterpret_cast<uintptr_t>(buf_.data()) % align_) % align_;
  }

 private:
  std::vector<unsigned char> buf_;
  int align_;
};

// ---- 16-bit conversions of the emulation ----

TEST(CudaEmuFloat16, ConversionsRoundLikeTorch) {
  // Every 16-bit pattern to float, and back.
  std::vector<int16_t> all(65536);
  for (int i = 0; i < 65536; ++i) all[static_cast<size_t>(i)] = static_cast<int16_t>(i);
  const auto bits = torch::tensor(all, torch::kShort);
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    const auto as_float = bits.view(dt).to(torch::kFloat);
    const float* want = as_float.data_ptr<float>();
    for (int i = 0; i < 65536; ++i) {
      const auto h = static_cast<uint16_t>(i);
      const float got =
          dt == torch::kHalf ? emu::half_bits_to_float(h) : emu::bf16_bits_to_float(h);
      if (std::isnan(want[i])) {
        ASSERT_TRUE(std::isnan(got)) << i;
        continue;
      }
      ASSERT_EQ(got, want[i]) << c10::toString(dt) << " bits " << i;
      const uint16_t back =
          dt == torch::kHalf ? emu::float_to_half_bits(got) : emu::float_to_bf16_bits(got);
      ASSERT_EQ(back, h) << c10::toString(dt) << " bits " << i;
    }
  }
  // Random float patterns (all exponents, ties included by zeroing low mantissa bits) against
  // torch's round-to-nearest-even.
  std::mt19937_64 rng(5);
  std::vector<int32_t> fb(1 << 20);
  for (size_t i = 0; i < fb.size(); ++i) {
    auto x = static_cast<uint32_t>(rng());
    if (i % 3 == 0) x &= ~0xfffu;  // exact ties and near-ties for both types
    if (i % 5 == 0) x = (x & 0x807fffffu) | ((100u + static_cast<uint32_t>(rng() % 60)) << 23);
    fb[i] = static_cast<int32_t>(x);
  }
  const auto floats = torch::tensor(fb, torch::kInt).view(torch::kFloat);
  const float* f = floats.data_ptr<float>();
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    const auto rounded = floats.to(dt).view(torch::kShort);
    const int16_t* want = rounded.data_ptr<int16_t>();
    for (size_t i = 0; i < fb.size(); ++i) {
      if (std::isnan(f[i])) continue;
      const uint16_t got =
          dt == torch::kHalf ? emu::float_to_half_bits(f[i]) : emu::float_to_bf16_bits(f[i]);
      ASSERT_EQ(got, static_cast<uint16_t>(want[i])) << c10::toString(dt) << " of " << f[i];
    }
  }
}

// ---- block-sparse attention ----

/// The grid of block_sparse_fwd_kernel<T, D, kM>, one emulated CTA at a time.
template <typename T, int D, int kM>
void run_block_sparse(const cuda::BlockSparseLaunch& p) {
  constexpr int kBM = 16 * kM * bsk::kWarps;
  const auto tiles = static_cast<unsigned>((p.n + kBM - 1) / kBM);
  Shared smem(bsk::shared_bytes(D, kM));
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads; ++h)
      for (unsigned x = 0; x < tiles; ++x) {
        unsigned char* s = smem.poisoned();
        emu::run_block(bsk::kThreads, [&] { bsk::fwd_block<T, D, kM>(p, s, tiles - 1 - x, h, b); });
      }
}

template <typename T>
void run_block_sparse_typed(const cuda::BlockSparseLaunch& p) {
  const bool wide = bsk::m_tiles_for(p) == 2;
  if (p.d == 64) {
    wide ? run_block_sparse<T, 64, 2>(p) : run_block_sparse<T, 64, 1>(p);
  } else {
    wide ? run_block_sparse<T, 128, 2>(p) : run_block_sparse<T, 128, 1>(p);
  }
}

/// The grid of block_sparse_wgmma_kernel<T, D> (block_sparse_wgmma.cu), one emulated CTA at a
/// time; the shared window starts 1024-byte aligned, as the CTA's shared memory does on the GPU.
/// persistent_ctas > 0: the persistent body on that many CTAs, each over its share of the items.
template <typename T, int D>
void run_block_sparse_wgmma(const cuda::BlockSparseLaunch& p, bool ws, bool overlap,
                            bool async_arrive, int persistent_ctas) {
  const auto tiles = static_cast<unsigned>((p.n + bsw::kBM - 1) / bsw::kBM);
  const int64_t bytes = ws ? bsw::ws_shared_bytes(D) : bsw::shared_bytes(D);
  const int64_t total = bsw::work_items(p);
  Shared smem(bytes, 1024);
  const auto run_ws = [&](const bsw::ItemSchedule& sched) {
    unsigned char* s = smem.poisoned();
    emu::wgmma::set_shared_window(s, static_cast<size_t>(bytes));
    if (persistent_ctas > 0)
      emu::run_block(bsw::kWsThreads,
                     [&] { bsw::fwd_block_ws<T, D, true, true, true>(p, s, sched); });
    else if (async_arrive)
      emu::run_block(bsw::kWsThreads, [&] { bsw::fwd_block_ws<T, D, true, true>(p, s, sched); });
    else if (overlap)
      emu::run_block(bsw::kWsThreads, [&] { bsw::fwd_block_ws<T, D, true>(p, s, sched); });
    else
      emu::run_block(bsw::kWsThreads, [&] { bsw::fwd_block_ws<T, D, false>(p, s, sched); });
  };
  if (persistent_ctas > 0) {
    for (int cta = 0; cta < persistent_ctas; ++cta) run_ws({total, persistent_ctas, cta});
    return;
  }
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads; ++h)
      for (unsigned x = 0; x < tiles; ++x) {
        if (ws) {
          // The grid's item order: blockIdx.x fastest (work_item maps it to the last tile first).
          run_ws({total, total, (int64_t(b) * p.heads + h) * tiles + x});
          continue;
        }
        unsigned char* s = smem.poisoned();
        emu::wgmma::set_shared_window(s, static_cast<size_t>(bytes));
        emu::run_block(bsw::kThreads, [&] { bsw::fwd_block<T, D>(p, s, tiles - 1 - x, h, b); });
      }
}

/// Which emulated kernel body runs.
/// kWgmmaWsPersistent runs on 2 CTAs (several items each, the stage ring and the Q barriers
/// going round across items).
enum class Body { kMmaSync, kWgmma, kWgmmaWs, kWgmmaWsOverlap, kWgmmaWsAsync, kWgmmaWsPersistent };

const char* body_name(Body body) {
  switch (body) {
    case Body::kMmaSync:
      return "mma.sync";
    case Body::kWgmma:
      return "wgmma";
    case Body::kWgmmaWs:
      return "wgmma-ws";
    case Body::kWgmmaWsOverlap:
      return "wgmma-ws-overlap";
    case Body::kWgmmaWsAsync:
      return "wgmma-ws-async";
    case Body::kWgmmaWsPersistent:
      return "wgmma-ws-persistent";
  }
  return "?";
}

/// The emulated kernel body into a NaN-poisoned output (the GPU test's launch(), on the CPU).
torch::Tensor emu_block_sparse(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const BlockMask* mask, double scale,
                               bool causal, int64_t q_offset, int64_t sinks, int64_t window,
                               Body body = Body::kMmaSync) {
  auto out = torch::full({q.size(0), q.size(1), q.size(2), q.size(3)},
                         std::numeric_limits<float>::quiet_NaN(), q.options());
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
  p.block_size = cuda::kBlockSparseTile;
  if (mask) {
    p.row_ptr = mask->row_ptr.data_ptr<int64_t>();
    p.col_idx = mask->col_idx.numel() ? mask->col_idx.data_ptr<int64_t>() : nullptr;
    p.q_blocks = mask->q_blocks;
    p.k_blocks = mask->k_blocks;
    p.block_size = static_cast<int>(mask->block_size);
  }
  if (body != Body::kMmaSync) {
    if (!cuda::block_sparse_wgmma_supports(p))
      throw std::invalid_argument("emu_block_sparse: the wgmma kernel does not take this shape");
    const bool bf16 = q.scalar_type() == torch::kBFloat16;
    const int pc = body == Body::kWgmmaWsPersistent ? 2 : 0;
    const bool as = pc > 0 || body == Body::kWgmmaWsAsync, ov = as || body == Body::kWgmmaWsOverlap,
               ws = ov || body == Body::kWgmmaWs;
    if (p.d == 64)
      bf16 ? run_block_sparse_wgmma<__nv_bfloat16, 64>(p, ws, ov, as, pc)
           : run_block_sparse_wgmma<__half, 64>(p, ws, ov, as, pc);
    else
      bf16 ? run_block_sparse_wgmma<__nv_bfloat16, 128>(p, ws, ov, as, pc)
           : run_block_sparse_wgmma<__half, 128>(p, ws, ov, as, pc);
  } else if (q.scalar_type() == torch::kBFloat16) {
    run_block_sparse_typed<__nv_bfloat16>(p);
  } else {
    run_block_sparse_typed<__half>(p);
  }
  return out;
}

/// Random CSR cases (GQA, peaked scores, strided queries, empty rows) of every dtype, head dim,
/// block size in `block_sizes` and causal flag, against the CPU backend.
void check_random_masks(Body body, std::initializer_list<int64_t> block_sizes, uint64_t seed0) {
  std::mt19937_64 rng(seed0);
  int seed = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf})
    for (int64_t d : {64, 128})
      for (int64_t bs : block_sizes)
        for (bool causal : {true, false}) {
          // GQA in every other case; peaked scores (queries x4, so row maxima move past the
          // lazy-rescale slack mid-loop) in the GQA cases.
          const int64_t groups = seed % 2 == 0 ? 2 : 1, hkv = 1, h = hkv * groups, b = 1;
          std::uniform_int_distribution<int64_t> len(bs / 2, 2 * bs + 40);
          const int64_t n = len(rng);
          const int64_t m = causal ? n + len(rng) / 4 : len(rng);
          const int64_t q_offset = causal ? m - n : len(rng) / 4;
          auto gen = at::make_generator<at::CPUGeneratorImpl>(2000 + seed);
          const double q_scale = groups == 2 ? 4.0 : 1.0;
          // Queries in [b, n, h, d] storage in half the cases (strides not of a packed tensor).
          const auto q = seed % 4 < 2
                             ? (torch::randn({b, h, n, d}, gen) * q_scale).to(dt)
                             : (torch::randn({b, n, h, d}, gen) * q_scale).to(dt).transpose(1, 2);
          const auto k = torch::randn({b, hkv, m, d}, gen).to(dt);
          const auto v = torch::randn({b, hkv, m, d}, gen).to(dt);
          ++seed;
          const auto rm = random_mask(rng, b, h, n, m, bs);
          const double scale = 1.0 / std::sqrt(static_cast<double>(d));
          const std::string what =
              fmt::format("{} {} d={} bs={} causal={} groups={} n={} m={}", body_name(body),
                          c10::toString(dt), d, bs, causal, groups, n, m);
          const auto out = emu_block_sparse(q, k, v, &rm.mask, scale, causal, q_offset, 0, 0, body);
          expect_close(out, block_sparse_expected(q, k, v, rm.mask, scale, causal, q_offset, 0, 0),
                       block_sparse_tolerance(dt), what);
          // Rows that list no block are exactly zero.
          const auto oc = out.to(torch::kFloat);
          for (size_t row = 0; row < rm.empty.size(); ++row) {
            if (!rm.empty[row]) continue;
            const int64_t qb = static_cast<int64_t>(row) % rm.mask.q_blocks;
            const int64_t bh = static_cast<int64_t>(row) / rm.mask.q_blocks;
            const auto rows = oc[bh / h][bh % h].narrow(0, qb * bs, std::min(bs, n - qb * bs));
            ASSERT_EQ(rows.abs().max().item<float>(), 0.f) << what << " empty row " << row;
          }
        }
}

TEST(AttentionEmu, BlockSparseKernelMatchesCpuBackend) {
  check_random_masks(Body::kMmaSync, {64, 128}, 20261205);
  EXPECT_EQ(emu::mma::ldmatrix_conflicted_phases(), 0u)
      << "ldmatrix phases with shared-memory bank conflicts (the padded rows should avoid them)";
}

// The wgmma kernel (128-row CTAs of two warpgroups, 128-key tiles) on blocks of 128 and 256.
TEST(AttentionEmu, WgmmaBlockSparseKernelMatchesCpuBackend) {
  check_random_masks(Body::kWgmma, {128, 256}, 20261206);
}

// The warp-specialised wgmma body (producer warpgroup, mbarrier stages, consumers taking turns).
TEST(AttentionEmu, WarpSpecialisedWgmmaKernelMatchesCpuBackend) {
  check_random_masks(Body::kWgmmaWs, {128, 256}, 20261207);
  check_random_masks(Body::kWgmmaWsOverlap, {128, 256}, 20261208);
  check_random_masks(Body::kWgmmaWsAsync, {128, 256}, 20261209);
  check_random_masks(Body::kWgmmaWsPersistent, {128, 256}, 20261210);
  // Long rows: 12 key tiles per CTA, so each of the 3 stages goes round 4 times (the mbarrier
  // phases alternate), with the last CTA's rows partly past n.
  const int64_t b = 1, h = 2, hkv = 1, n = 200, m = 1500, q_offset = m - n, d = 64;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(4321);
  const auto q = torch::randn({b, h, n, d}, gen).to(torch::kBFloat16);
  const auto k = torch::randn({b, hkv, m, d}, gen).to(torch::kBFloat16);
  const auto v = torch::randn({b, hkv, m, d}, gen).to(torch::kBFloat16);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const auto all = BlockMask::all_visible(b, h, n, m, 128, true, q_offset);
  for (Body body :
       {Body::kWgmmaWs, Body::kWgmmaWsOverlap, Body::kWgmmaWsAsync, Body::kWgmmaWsPersistent})
    expect_close(emu_block_sparse(q, k, v, &all, scale, true, q_offset, 0, 0, body),
                 block_sparse_expected(q, k, v, all, scale, true, q_offset, 0, 0),
                 block_sparse_tolerance(torch::kBFloat16),
                 fmt::format("{}, 12 tiles", body_name(body)));
}

// Every body's softmax has a fast form for unmasked tiles with a positive scale (the max of
// S scaled after the reduction, one FFMA per exponent); a zero or negative scale takes the
// general form on every tile. Both against the CPU backend, over several tiles per CTA.
TEST(AttentionEmu, SoftmaxFormsMatchCpuBackendForAnyScale) {
  const int64_t b = 1, h = 2, hkv = 1, n = 260, m = 700, q_offset = m - n, d = 64;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(97);
  const auto q = torch::randn({b, h, n, d}, gen).to(torch::kBFloat16);
  const auto k = torch::randn({b, hkv, m, d}, gen).to(torch::kBFloat16);
  const auto v = torch::randn({b, hkv, m, d}, gen).to(torch::kBFloat16);
  for (bool causal : {true, false}) {
    const auto all = BlockMask::all_visible(b, h, n, m, 128, causal, q_offset);
    for (double scale : {0.9 / std::sqrt(static_cast<double>(d)), 0.0, -0.6})
      for (Body body : {Body::kMmaSync, Body::kWgmma, Body::kWgmmaWsOverlap, Body::kWgmmaWsAsync,
                        Body::kWgmmaWsPersistent})
        expect_close(emu_block_sparse(q, k, v, &all, scale, causal, q_offset, 0, 0, body),
                     block_sparse_expected(q, k, v, all, scale, causal, q_offset, 0, 0),
                     block_sparse_tolerance(torch::kBFloat16),
                     fmt::format("{} scale {} causal {}", body_name(body), scale, causal));
  }
}

// No CSR lists (every tile up to the causal cut-off, 128-row CTAs), and a streaming window with
// sinks through its block mask.
TEST(AttentionEmu, BlockSparseDenseAndStreamingMatchCpuBackend) {
  int seed = 0;
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    const int64_t b = 1, h = 2, hkv = 1, n = 150, m = 230, q_offset = m - n, d = 64;
    auto gen = at::make_generator<at::CPUGeneratorImpl>(300 + seed++);
    const auto q = torch::randn({b, h, n, d}, gen).to(dt);
    const auto k = torch::randn({b, hkv, m, d}, gen).to(dt);
    const auto v = torch::randn({b, hkv, m, d}, gen).to(dt);
    const double scale = 0.7 / std::sqrt(static_cast<double>(d));
    const auto all = BlockMask::all_visible(b, h, n, m, 64, true, q_offset);
    expect_close(emu_block_sparse(q, k, v, nullptr, scale, true, q_offset, 0, 0),
                 block_sparse_expected(q, k, v, all, scale, true, q_offset, 0, 0),
                 block_sparse_tolerance(dt), fmt::format("{} no lists", c10::toString(dt)));
    const int64_t sinks = 4, window = 70;
    const auto mask = streaming_block_mask(b, h, n, m, 64, q_offset, sinks, window);
    expect_close(emu_block_sparse(q, k, v, &mask, scale, true, q_offset, sinks, window),
                 block_sparse_expected(q, k, v, mask, scale, true, q_offset, sinks, window),
                 block_sparse_tolerance(dt), fmt::format("{} streaming", c10::toString(dt)));
    // The wgmma kernel: no lists (128-key tiles up to the causal cut-off), and a window
    // through blocks of 128 (a window shorter than a tile, sinks inside the first tile).
    const auto mask128 = streaming_block_mask(b, h, n, m, 128, q_offset, sinks, window);
    for (Body body : {Body::kWgmma, Body::kWgmmaWs, Body::kWgmmaWsOverlap, Body::kWgmmaWsAsync,
                      Body::kWgmmaWsPersistent}) {
      const char* name = body_name(body);
      expect_close(emu_block_sparse(q, k, v, nullptr, scale, true, q_offset, 0, 0, body),
                   block_sparse_expected(q, k, v, all, scale, true, q_offset, 0, 0),
                   block_sparse_tolerance(dt),
                   fmt::format("{} {} no lists", name, c10::toString(dt)));
      expect_close(emu_block_sparse(q, k, v, &mask128, scale, true, q_offset, sinks, window, body),
                   block_sparse_expected(q, k, v, mask128, scale, true, q_offset, sinks, window),
                   block_sparse_tolerance(dt),
                   fmt::format("{} {} streaming", name, c10::toString(dt)));
    }
  }
}

// ---- decode attention ----

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

/// The GPU test's tolerances (cuda_decode_test.cpp).
Tol decode_tolerance(torch::ScalarType dt) {
  return dt == torch::kBFloat16 ? Tol{6e-3, 2.5e-2} : Tol{1.5e-3, 4e-3};
}

/// out[b, h] = softmax(scale · q[b,h] · k[b, h/(Hq/Hk), 0:len]ᵀ) · v[b, h/(Hq/Hkv), 0:len] in
/// float64, one (b, h) at a time; zeros for len = 0 (the GPU test's reference).
torch::Tensor decode_reference(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const std::vector<int64_t>& lengths,
                               double scale) {
  const auto f = [](const torch::Tensor& t) { return t.to(torch::kDouble); };
  const int64_t b = q.size(0), hq = q.size(1), hk = k.size(1), hkv = v.size(1);
  const auto qd = f(q);
  auto out = torch::zeros({b, hq, v.size(3)}, torch::kDouble);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t len = lengths[static_cast<size_t>(i)];
    if (len == 0) continue;
    for (int64_t h = 0; h < hq; ++h) {
      const auto kh = f(k[i][h / (hq / hk)].narrow(0, 0, len));
      const auto vh = f(v[i][h / (hq / hkv)].narrow(0, 0, len));
      out[i][h] = torch::mv(vh.t(), torch::softmax(torch::mv(kh, qd[i][h]) * scale, 0));
    }
  }
  return out;
}

/// Both phases of decode_split_kernel / decode_combine_kernel<T, TPR, DV, HG>, one emulated CTA
/// at a time, phase 1's shared memory poisoned.
template <typename T, int TPR, int DV, int HG>
void run_decode(const cuda::DecodeLaunch& p, const cuda::DecodePlan& plan, float* ws) {
  ASSERT_EQ(dk::threads_per_row(p.e), TPR);
  ASSERT_EQ(p.dv, DV);
  ASSERT_EQ(plan.head_block, HG);
  Shared smem(dk::phase1_shared_bytes(HG, DV));
  for (int b = 0; b < p.batch; ++b)
    for (int hb = 0; hb < p.heads / HG; ++hb)
      for (int64_t s = 0; s < plan.splits; ++s) {
        unsigned char* sm = smem.poisoned();
        emu::run_block(dk::kThreads, [&] {
          dk::split_block<T, TPR, DV, HG>(p, plan.chunk, plan.splits, ws, sm,
                                          static_cast<unsigned>(s), static_cast<unsigned>(hb),
                                          static_cast<unsigned>(b));
        });
      }
  if (plan.splits == 1) return;
  for (int64_t bh = 0; bh < int64_t(p.batch) * p.heads; ++bh)
    emu::run_block(DV, [&] {
      dk::combine_block<T, DV>(p, plan.chunk, plan.splits, ws, static_cast<unsigned>(bh));
    });
}

/// One decode case: the instantiation <TPR, DV, HG> the launcher would pick for it.
struct DecodeCase {
  int64_t e, dv, hq, hk, hkv;
};

/// The emulated kernels into a NaN-poisoned output and workspace, the split planned for a GPU
/// of `sms` multiprocessors.
template <typename T, int TPR, int DV, int HG>
torch::Tensor emu_decode(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const std::vector<int64_t>& lengths, double scale, int sms,
                         cuda::DecodePlan* plan_out) {
  const int64_t b = q.size(0), hq = q.size(1);
  auto out = torch::full({b, hq, v.size(3)}, kNaN, q.options());
  const std::vector<int32_t> len32(lengths.begin(), lengths.end());
  cuda::DecodeLaunch p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lengths = len32.data();
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
  const auto plan = dk::make_plan(p, sms);
  std::vector<float> ws(static_cast<size_t>(plan.workspace_bytes / 4),
                        std::numeric_limits<float>::quiet_NaN());
  run_decode<T, TPR, DV, HG>(p, plan, ws.data());
  *plan_out = plan;
  return out;
}

/// A [b, h, cap, dim] view of a larger random buffer: rows padded to dim + pad.
torch::Tensor cache_view(at::Generator& gen, int64_t b, int64_t h, int64_t cap, int64_t dim,
                         int64_t pad, torch::ScalarType dt) {
  return torch::randn({b, h, cap, dim + pad}, gen).to(dt).narrow(3, 0, dim);
}

template <int TPR, int DV, int HG>
void check_decode(const DecodeCase& dc, int& seed, int& multi_split, int& one_split) {
  std::mt19937_64 rng(40 + seed);
  for (auto dt : {torch::kBFloat16, torch::kHalf}) {
    // Planned for a GPU of one multiprocessor (16 CTAs): a cache longer than 64 keys takes
    // several splits (phase 2 combines them), one of at most 64 keys a single split (phase 1
    // writes the output).
    for (bool short_cache : {false, true}) {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(900 + seed++);
      std::uniform_int_distribution<int64_t> len_dist(65, 300);
      std::vector<int64_t> lengths = {0, 1, short_cache ? 37 : 63,
                                      short_cache ? 64 : len_dist(rng)};
      std::shuffle(lengths.begin(), lengths.end(), rng);
      const int64_t b = static_cast<int64_t>(lengths.size());
      const int64_t cap =
          *std::max_element(lengths.begin(), lengths.end()) + 1 + static_cast<int64_t>(rng() % 40);
      const double scale = 1.0 / std::sqrt(static_cast<double>(dc.e));
      const double q_mult = seed % 3 == 0 ? 6.0 : 1.0;  // peaked scores now and then
      const auto q = (torch::randn({b, dc.hq, dc.e}, gen) * q_mult).to(dt);
      const auto k = cache_view(gen, b, dc.hk, cap, dc.e, 8 * (seed % 2), dt);
      const auto v = cache_view(gen, b, dc.hkv, cap, dc.dv, 8 * ((seed / 2) % 2), dt);
      cuda::DecodePlan plan;
      const torch::Tensor out =
          dt == torch::kBFloat16
              ? emu_decode<__nv_bfloat16, TPR, DV, HG>(q, k, v, lengths, scale, 1, &plan)
              : emu_decode<__half, TPR, DV, HG>(q, k, v, lengths, scale, 1, &plan);
      const std::string what = fmt::format(
          "{} e={} dv={} heads {}/{}/{} lengths {} cap {} ({} splits of {})", c10::toString(dt),
          dc.e, dc.dv, dc.hq, dc.hk, dc.hkv, fmt::join(lengths, ","), cap, plan.splits, plan.chunk);
      EXPECT_EQ(plan.splits > 1, !short_cache) << what;
      multi_split += plan.splits > 1;
      one_split += plan.splits == 1;
      expect_close(out, decode_reference(q, k, v, lengths, scale), decode_tolerance(dt), what);
      // Length 0 gives exact zeros.
      const torch::Tensor oc = out.to(torch::kDouble);
      for (int64_t i = 0; i < b; ++i) {
        if (lengths[static_cast<size_t>(i)] == 0) {
          EXPECT_EQ(oc[i].abs().max().item<double>(), 0.0) << what << " batch " << i;
        }
      }
    }
  }
}

TEST(AttentionEmu, DecodeKernelsMatchFloat64Reference) {
  int seed = 0, multi_split = 0, one_split = 0;
  // <threads per key row (e / 8 rounded up to a power of 2), dv, query heads per CTA>.
  // Projected keys (one key head per query head): rank 16, no GQA.
  check_decode<2, 64, 1>({16, 64, 2, 2, 2}, seed, multi_split, one_split);
  // Rank 24 (a partial 16-byte column group per row), GQA 3: one head per CTA.
  check_decode<4, 64, 1>({24, 64, 3, 3, 1}, seed, multi_split, one_split);
  // Rank 32, GQA 4: four heads per CTA, each its own key head.
  check_decode<4, 128, 4>({32, 128, 4, 4, 1}, seed, multi_split, one_split);
  // Rank 8, GQA 8: eight heads per CTA.
  check_decode<1, 64, 8>({8, 64, 8, 8, 1}, seed, multi_split, one_split);
  // Full keys d = 128 with GQA 2: two heads per CTA sharing the key head.
  check_decode<16, 128, 2>({128, 128, 4, 2, 2}, seed, multi_split, one_split);
  // Full keys d = 256 (a whole warp per key row), no GQA.
  check_decode<32, 64, 1>({256, 64, 1, 1, 1}, seed, multi_split, one_split);
  EXPECT_GT(multi_split, 0) << "no case ran the combining phase";
  EXPECT_GT(one_split, 0) << "no case wrote the output from phase 1";
}

}  // namespace
}  // namespace attnpilot::attention
