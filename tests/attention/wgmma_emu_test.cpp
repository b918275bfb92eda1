/// The CPU emulation of Hopper's wgmma (tests/cuda_emu/cuda_emu_wgmma.h), called through the
/// kernels' wrappers (attention/cuda/wgmma_ptx.cuh): random bf16 and fp16 products, m64n64 and
/// m64n128, A from shared memory and from registers, K of 64 and 128 in k16 steps with the
/// descriptors advanced as a kernel advances them, operand tiles written by this test's own
/// 128-byte-swizzle layout into a poisoned window, against a double reference; one and two
/// warpgroups; the held-back results (written at the covering wait, chained accumulators); and
/// each misuse check. Also cuda_emu.h's warpgroup collective.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// After GoogleTest: the emulation defines CUDA's keywords as macros.
#include "tests/cuda_emu/cuda_emu.h"
// clang-format off (the emulation must come first)
#include "attention/cuda/wgmma_ptx.cuh"
// clang-format on

namespace attnpilot::attention {
namespace {

namespace emu = attnpilot::cuda_emu;
namespace ptx = cuda::ptx;

/// Byte offset of element (row, col) of a tile in the canonical 128-byte-swizzle layout:
/// 64-column regions of `rows` rows × 128 bytes, one after the other; in a region, row r at
/// 128·r, its 16-byte chunk j (columns 8j..8j+7) at chunk position j ^ (r % 8). K-major
/// operands are tiles of MN rows × K columns, MN-major ones of K rows × N columns.
size_t sw128_offset(int rows, int row, int col) {
  const int region = col / 64, chunk = (col % 64) / 8;
  return static_cast<size_t>(region) * static_cast<size_t>(rows) * 128 +
         static_cast<size_t>(row) * 128 + static_cast<size_t>((chunk ^ (row % 8)) * 16) +
         static_cast<size_t>(2 * (col % 8));
}

/// A shared-memory window: 1024-byte aligned, 0xff bytes (NaN in bf16 and fp16) until written.
class Window {
 public:
  explicit Window(size_t bytes) : buf_(bytes + 1024, 0xff), bytes_(bytes) {
    base_ = buf_.data() + (1024 - reinterpret_cast<uintptr_t>(buf_.data()) % 1024) % 1024;
    emu::wgmma::set_shared_window(base_, bytes_);
  }
  unsigned char* base() const { return base_; }
  size_t bytes() const { return bytes_; }
  void put(size_t off, uint16_t bits) {
    ASSERT_LE(off + 2, bytes_);
    std::memcpy(base_ + off, &bits, sizeof bits);
  }

 private:
  std::vector<unsigned char> buf_;
  unsigned char* base_;
  size_t bytes_;
};

template <typename T>
uint16_t to_bits(float x);
template <>
uint16_t to_bits<__nv_bfloat16>(float x) {
  return emu::float_to_bf16_bits(x);
}
template <>
uint16_t to_bits<__half>(float x) {
  return emu::float_to_half_bits(x);
}
template <typename T>
double value(uint16_t bits) {
  return std::is_same_v<T, __half> ? emu::half_bits_to_float(bits) : emu::bf16_bits_to_float(bits);
}

/// The D fragment (wgmma_ptx.cuh): d[4i + e] of thread tid is row 64·wg + 16w + g + 8·(e / 2),
/// column 8i + 2c + e % 2 (wg the warpgroup, w its warp, g = lane / 4, c = lane % 4).
int d_row(int tid, int idx) {
  const int lane = tid % 32;
  return 64 * (tid / 128) + 16 * ((tid % 128) / 32) + lane / 4 + 8 * ((idx % 4) / 2);
}
int d_col(int tid, int idx) { return 8 * (idx / 4) + 2 * (tid % 4) + idx % 2; }

/// D = A·Bᵀ (wgmma_ss, B stored N×K K-major) or A·B (wgmma_rs, A from registers, B stored K×N
/// MN-major) over K in k16 steps, by `threads` / 128 warpgroups on rows 64·wg.., against a
/// double reference; `preset` starts from random accumulators (acc on every step), else the
/// first step has acc = false (over NaN accumulators).
template <typename T, int N>
void check_product(bool rs, int K, int threads, uint64_t seed, bool preset,
                   bool rs_k_major = false) {
  SCOPED_TRACE(::testing::Message()
               << (rs ? (rs_k_major ? "wgmma_rs K-major B" : "wgmma_rs") : "wgmma_ss") << " "
               << (std::is_same_v<T, __half> ? "fp16" : "bf16") << " N " << N << " K " << K
               << " threads " << threads << " seed " << seed << (preset ? " preset" : ""));
  const int M = 64 * (threads / 128);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  std::vector<uint16_t> a(static_cast<size_t>(M * K)), bt(static_cast<size_t>(N * K));  // bt[n][k]
  for (auto& x : a) x = to_bits<T>(u(rng));
  for (auto& x : bt) x = to_bits<T>(u(rng));
  const auto A = [&](int r, int k) { return a[static_cast<size_t>(r * K + k)]; };
  const auto Bt = [&](int n, int k) { return bt[static_cast<size_t>(n * K + k)]; };

  // A (wgmma_ss) at 0, B after it; 1 KB of poison past B.
  const size_t a_bytes = rs ? 0 : static_cast<size_t>(M) * K * 2;
  const size_t b_bytes = static_cast<size_t>(N) * K * 2;
  Window win(a_bytes + b_bytes + 1024);
  if (!rs)
    for (int r = 0; r < M; ++r)
      for (int k = 0; k < K; ++k) win.put(sw128_offset(M, r, k), A(r, k));
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < K; ++k)
      win.put(a_bytes + (rs && !rs_k_major ? sw128_offset(K, k, n) : sw128_offset(N, n, k)),
              Bt(n, k));

  constexpr int kD = N / 2;
  std::vector<float> init(static_cast<size_t>(threads * kD)), out(init.size());
  for (auto& x : init) x = preset ? u(rng) * 8.f : std::numeric_limits<float>::quiet_NaN();
  unsigned char* base = win.base();
  emu::run_block(threads, [&] {
    const int tid = static_cast<int>(threadIdx.x), wg = tid / 128;
    const int lane = tid % 32, row0 = 64 * wg + 16 * ((tid % 128) / 32) + lane / 4;
    const int c = lane % 4;
    const uint32_t a_addr = ptx::smem_offset(base), b_addr = ptx::smem_offset(base + a_bytes);
    float d[kD];
    for (int i = 0; i < kD; ++i) d[i] = init[static_cast<size_t>(tid * kD + i)];
    ptx::wgmma_fence();
    for (int s = 0; s < K / 16; ++s) {
      const bool acc = preset || s > 0;
      if (rs) {
        // The m16n8k16 A fragment of rows row0, row0 + 8, columns 16s + 2c (+1, +8, +9).
        const auto pair = [&](int r, int k) {
          return static_cast<uint32_t>(A(r, k)) | static_cast<uint32_t>(A(r, k + 1)) << 16;
        };
        const int k0 = 16 * s + 2 * c;
        const uint32_t regs[4] = {pair(row0, k0), pair(row0 + 8, k0), pair(row0, k0 + 8),
                                  pair(row0 + 8, k0 + 8)};
        if (rs_k_major) {
          // B stored N×K as wgmma_ss's: 32 bytes into the row of region s / 4.
          const uint32_t b_at = b_addr + (s / 4) * N * 128 + static_cast<uint32_t>((s % 4) * 32);
          ptx::wgmma_rs<T, N, false>(d, regs, ptx::sw128_desc(b_at, 16, 1024), acc);
        } else {
          // k-step s: 16 rows of 128 bytes further; the N regions K·128 bytes (LBO) apart.
          ptx::wgmma_rs<T, N>(d, regs, ptx::sw128_desc(b_addr + s * 2048, K * 128, 1024), acc);
        }
      } else {
        // k-step s: 32 bytes into the row of region s / 4; 8-row atoms 1024 bytes apart.
        const uint32_t k_off = static_cast<uint32_t>((s % 4) * 32);
        const uint32_t a_at = a_addr + (s / 4) * M * 128 + wg * 64 * 128 + k_off;
        const uint32_t b_at = b_addr + (s / 4) * N * 128 + k_off;
        ptx::wgmma_ss<T, N>(d, ptx::sw128_desc(a_at, 16, 1024), ptx::sw128_desc(b_at, 16, 1024),
                            acc);
      }
    }
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    for (int i = 0; i < kD; ++i) out[static_cast<size_t>(tid * kD + i)] = d[i];
  });

  std::vector<int> seen(static_cast<size_t>(M * N), 0);
  int bad = 0;
  for (int tid = 0; tid < threads; ++tid)
    for (int i = 0; i < kD; ++i) {
      const int r = d_row(tid, i), n = d_col(tid, i);
      ++seen[static_cast<size_t>(r * N + n)];
      const double c = init[static_cast<size_t>(tid * kD + i)];
      double want = preset ? c : 0.0, mag = preset ? std::fabs(c) : 0.0;
      for (int k = 0; k < K; ++k) {
        const double p = value<T>(A(r, k)) * value<T>(Bt(n, k));
        want += p;
        mag += std::fabs(p);
      }
      const float got = out[static_cast<size_t>(tid * kD + i)];
      if (!(std::fabs(got - want) <= 1e-6 * mag + 1e-30) && ++bad <= 5)
        ADD_FAILURE() << "D(" << r << ", " << n << ") = " << got << ", want " << want << " (thread "
                      << tid << ", d[" << i << "])";
    }
  EXPECT_EQ(bad, 0);
  for (int x : seen) ASSERT_EQ(x, 1) << "the fragments cover every element of D once";
}

// desc_advance (one add on the descriptor's low word) gives the descriptor of the moved
// address, for every 16-byte start in a 228 KB shared window and advances up to 64 KB.
TEST(WgmmaEmu, DescriptorAdvanceMatchesARebuiltDescriptor) {
  std::mt19937 rng(11);
  std::uniform_int_distribution<uint32_t> start(0, (164 * 1024) / 16), step(0, (64 * 1024) / 16);
  for (int i = 0; i < 10000; ++i) {
    const uint32_t a = 16 * start(rng), b = 16 * step(rng);
    for (uint32_t lbo : {16u, 16384u})
      ASSERT_EQ(ptx::desc_advance(ptx::sw128_desc(a, lbo, 1024), b),
                ptx::sw128_desc(a + b, lbo, 1024))
          << "start " << a << " advanced by " << b << " with LBO " << lbo;
  }
}

TEST(WgmmaEmu, RandomProductsMatchTheReference) {
  uint64_t seed = 1;
  for (int threads : {128, 256})
    for (int K : {64, 128})
      for (bool rs : {false, true})
        for (bool preset : {false, true}) {
          check_product<__nv_bfloat16, 64>(rs, K, threads, seed++, preset);
          check_product<__nv_bfloat16, 128>(rs, K, threads, seed++, preset);
          check_product<__half, 64>(rs, K, threads, seed++, preset);
          check_product<__half, 128>(rs, K, threads, seed++, preset);
          if (rs) {  // B K-major (imm-trans-b = 0), as the pooled-key scores use it
            check_product<__nv_bfloat16, 64>(rs, K, threads, seed++, preset, true);
            check_product<__half, 128>(rs, K, threads, seed++, preset, true);
          }
        }
}

// ---- held-back results ----

/// A 64×16 A at 0 and a 64×16 Bᵀ (N = 64) at 8192, K-major, of small integers (one k16 step), exact
/// in bf16 and in the fp32 accumulators.
struct SmallProblem {
  Window win{32 * 1024};
  uint32_t a_addr = 0, b_addr = 8192;
  SmallProblem() {
    for (int r = 0; r < 64; ++r)
      for (int k = 0; k < 16; ++k) {
        win.put(a_addr + sw128_offset(64, r, k), to_bits<__nv_bfloat16>(float(a(r, k))));
        win.put(b_addr + sw128_offset(64, r, k), to_bits<__nv_bfloat16>(float(bt(r, k))));
      }
  }
  static int a(int r, int k) { return (r + 2 * k) % 5 - 2; }
  static int bt(int n, int k) { return (3 * n + k) % 7 - 3; }
  /// (A·Bᵀ)(r, n).
  static float product(int r, int n) {
    int s = 0;
    for (int k = 0; k < 16; ++k) s += a(r, k) * bt(n, k);
    return static_cast<float>(s);
  }
  uint64_t a_desc() const { return ptx::sw128_desc(a_addr, 16, 1024); }
  uint64_t b_desc() const { return ptx::sw128_desc(b_addr, 16, 1024); }
  void issue(float (&d)[32], bool acc) const {
    ptx::wgmma_ss<__nv_bfloat16, 64>(d, a_desc(), b_desc(), acc);
  }
};

TEST(WgmmaEmu, ResultsAreWrittenAtTheCoveringWait) {
  SmallProblem pb;
  std::vector<std::string> failures;
  emu::run_block(128, [&] {
    const int tid = static_cast<int>(threadIdx.x);
    const auto expect_all = [&](const float(&d)[32], float scale, float offset, const char* at) {
      for (int i = 0; i < 32; ++i) {
        const float want = scale * SmallProblem::product(d_row(tid, i), d_col(tid, i)) + offset;
        if (d[i] != want) {
          failures.push_back(std::string(at) + ": thread " + std::to_string(tid) + " d[" +
                             std::to_string(i) + "] = " + std::to_string(d[i]) + ", want " +
                             std::to_string(want));
          return;
        }
      }
    };
    float d1[32], d2[32];
    for (int i = 0; i < 32; ++i) d1[i] = d2[i] = -7.f;
    // Two groups: wait<1> completes the older only.
    ptx::wgmma_fence();
    pb.issue(d1, false);
    expect_all(d1, 0.f, -7.f, "d1 after issue");
    ptx::wgmma_commit();
    expect_all(d1, 0.f, -7.f, "d1 after commit");
    pb.issue(d2, true);
    ptx::wgmma_commit();
    expect_all(d2, 0.f, -7.f, "d2 after its commit");
    ptx::wgmma_wait<1>();
    expect_all(d1, 1.f, 0.f, "d1 after wait<1>");
    expect_all(d2, 0.f, -7.f, "d2 after wait<1>");
    ptx::wgmma_wait<0>();
    expect_all(d2, 1.f, -7.f, "d2 after wait<0>");
    // Chained accumulators: the second wgmma into d1 starts from the first's pending result.
    ptx::wgmma_fence();
    pb.issue(d1, true);
    ptx::wgmma_commit();
    pb.issue(d1, true);
    ptx::wgmma_commit();
    expect_all(d1, 1.f, 0.f, "d1 before the chained waits");
    ptx::wgmma_wait<1>();
    expect_all(d1, 2.f, 0.f, "d1 after the first chained wgmma");
    ptx::wgmma_wait<0>();
    expect_all(d1, 3.f, 0.f, "d1 after the second chained wgmma");
    // An uncommitted wgmma stays pending through wait<0>; acc = false ignores d.
    ptx::wgmma_fence();
    pb.issue(d2, false);
    ptx::wgmma_wait<0>();
    expect_all(d2, 1.f, -7.f, "d2 after wait<0> with the wgmma uncommitted");
    ptx::wgmma_commit();
    ptx::wgmma_wait<0>();
    expect_all(d2, 1.f, 0.f, "d2 after commit and wait<0>");
    // Empty groups count as groups.
    ptx::wgmma_fence();
    pb.issue(d1, false);
    ptx::wgmma_commit();
    ptx::wgmma_commit();
    ptx::wgmma_wait<1>();
    expect_all(d1, 1.f, 0.f, "d1 after wait<1> behind an empty group");
    ptx::wgmma_wait<0>();
  });
  for (size_t i = 0; i < failures.size() && i < 5; ++i) ADD_FAILURE() << failures[i];
  EXPECT_TRUE(failures.empty());
}

// ---- misuse ----

/// The what() of the std::logic_error f throws ("" if none; other exceptions propagate).
std::string logic_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::logic_error& e) {
    return e.what();
  }
  return "";
}

#define EXPECT_LOGIC_ERROR(stmt, text)                                                \
  do {                                                                                \
    EXPECT_THROW(stmt, std::logic_error);                                             \
    const std::string what_ = logic_error_of([&] { stmt; });                          \
    EXPECT_NE(what_.find(text), std::string::npos) << "message: \"" << what_ << "\""; \
  } while (0)

// cp.async (cuda_emu_mma.h): the source is read at issue, the destination written only at the
// wait that covers the copy; wait_group N leaves the N newest committed groups in flight.
TEST(WgmmaEmu, CpAsyncLandsAtTheCoveringWait) {
  alignas(16) static unsigned char src[48], dst[48];
  for (int i = 0; i < 48; ++i) src[i] = static_cast<unsigned char>(i + 1);
  std::memset(dst, 0xee, sizeof dst);
  emu::run_block(32, [&] {
    if (threadIdx.x != 0) return;
    emu::mma::cp_async_16(dst, src, true);
    emu::mma::cp_async_commit();
    emu::mma::cp_async_16(dst + 16, src + 16, true);
    emu::mma::cp_async_commit();
    emu::mma::cp_async_16(dst + 32, src, false);  // zero fill, left uncommitted
    src[0] = 99;                                  // after issue: the copy read 1
    EXPECT_EQ(dst[0], 0xee) << "a copy landed before its wait";
    ptx::cp_async_wait_group<1>();  // the older group only
    EXPECT_EQ(dst[0], 1);
    EXPECT_EQ(dst[16], 0xee);
    ptx::cp_async_wait_group<0>();  // every committed group; the open copy stays in flight
    EXPECT_EQ(dst[16], 17);
    EXPECT_EQ(dst[32], 0xee);
    emu::mma::cp_async_wait_all();  // commits and lands it
    EXPECT_EQ(dst[32], 0);
  });
}

// mbarriers and named barriers (cuda_emu_wgmma.h): a parity wait returns once that phase has
// completed; bar.sync waits for `count` arrivals, bar.arrive does not wait.
TEST(WgmmaEmu, MbarriersAndNamedBarriers) {
  alignas(1024) static unsigned char window[1024];
  emu::wgmma::set_shared_window(window, sizeof window);
  auto* bar = reinterpret_cast<uint64_t*>(window);
  static int stage_value = 0, seen[64];
  emu::run_block(64, [&] {
    const int t = threadIdx.x;
    if (t == 0) ptx::mbar_init(bar, 32);
    __syncthreads();
    if (t < 32) {  // producers: write, then arrive; twice (phases 0 and 1)
      if (t == 0) stage_value = 1;
      ptx::mbar_arrive(bar);
      ptx::named_bar_sync(1, 64);  // the consumers have read phase 0's value
      if (t == 0) stage_value = 2;
      ptx::mbar_arrive(bar);
    } else {  // consumers
      ptx::mbar_wait(bar, 0);
      seen[t] = stage_value;
      ptx::named_bar_arrive(1, 64);
      ptx::mbar_wait(bar, 1);
      seen[t] += 10 * stage_value;
    }
  });
  for (int t = 32; t < 64; ++t) EXPECT_EQ(seen[t], 21) << "consumer " << t;
  // A wait for a phase that never completes is a deadlock, not a hang.
  EXPECT_THROW(emu::run_block(32,
                              [&] {
                                if (threadIdx.x == 0) ptx::mbar_init(bar, 33);
                                __syncthreads();
                                ptx::mbar_arrive(bar);
                                ptx::mbar_wait(bar, 0);
                              }),
               std::runtime_error);
}

TEST(WgmmaEmu, MissingFenceThrows) {
  SmallProblem pb;
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      pb.issue(d, false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "no wgmma_fence");
  // A wait ends the fence: the next wgmma needs another.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(d, false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                      pb.issue(d, true);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "no wgmma_fence");
}

TEST(WgmmaEmu, NonUniformOperandsThrow) {
  SmallProblem pb;
  // One thread's B descriptor 32 bytes further.
  EXPECT_LOGIC_ERROR(
      emu::run_block(256,
                     [&] {
                       const int tid = static_cast<int>(threadIdx.x);
                       float d[32] = {};
                       ptx::wgmma_fence();
                       ptx::wgmma_ss<__nv_bfloat16, 64>(
                           d, pb.a_desc(),
                           ptx::sw128_desc(pb.b_addr + (tid == 77 + 128 ? 32 : 0), 16, 1024),
                           false);
                       ptx::wgmma_commit();
                       ptx::wgmma_wait<0>();
                     }),
      "different descriptors");
  // A different acc flag, a different type.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(d, threadIdx.x == 5);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "different acc");
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      if (threadIdx.x == 100)
                                        ptx::wgmma_ss<__half, 64>(d, pb.a_desc(), pb.b_desc(),
                                                                  false);
                                      else
                                        pb.issue(d, false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "different wgmma instructions");
  // A thread that skips a wgmma pairs its next one with the others' first: caught when they
  // differ, else a deadlock when the others' second waits for it.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      if (threadIdx.x != 9) pb.issue(d, false);
                                      pb.issue(d, true);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "different acc");
  EXPECT_THROW(emu::run_block(128,
                              [&] {
                                float d[32] = {};
                                ptx::wgmma_fence();
                                if (threadIdx.x != 9) pb.issue(d, false);
                                pb.issue(d, false);
                                ptx::wgmma_commit();
                                ptx::wgmma_wait<0>();
                              }),
               std::runtime_error);
  // A thread that never issues it: a deadlock, not a hang.
  EXPECT_THROW(emu::run_block(128,
                              [&] {
                                float d[32] = {};
                                ptx::wgmma_fence();
                                if (threadIdx.x != 3) pb.issue(d, false);
                                ptx::wgmma_commit();
                                ptx::wgmma_wait<0>();
                              }),
               std::runtime_error);
  // A block that does not hold a whole warpgroup.
  EXPECT_LOGIC_ERROR(emu::run_block(64,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(d, false);
                                    }),
                     "not 128 threads");
}

TEST(WgmmaEmu, UnsupportedDescriptorsThrow) {
  SmallProblem pb;
  const auto run_with = [&](uint64_t a_desc) {
    emu::run_block(128, [&] {
      float d[32] = {};
      ptx::wgmma_fence();
      ptx::wgmma_ss<__nv_bfloat16, 64>(d, a_desc, pb.b_desc(), false);
      ptx::wgmma_commit();
      ptx::wgmma_wait<0>();
    });
  };
  const uint64_t ok = pb.a_desc(), no_layout = ok & ~(uint64_t(3) << 62);
  EXPECT_NO_THROW(run_with(ok));
  EXPECT_LOGIC_ERROR(run_with(no_layout | uint64_t(2) << 62), "layout type 2");  // 64B swizzle
  EXPECT_LOGIC_ERROR(run_with(no_layout), "layout type 0");                      // interleave
  EXPECT_LOGIC_ERROR(run_with(ok | uint64_t(3) << 49), "base offset 3");
  EXPECT_LOGIC_ERROR(run_with(ok | uint64_t(1) << 47), "reserved bits");
  // Atoms off the 1024-byte grid: a start at row 1 of an atom, an SBO of 512.
  EXPECT_LOGIC_ERROR(run_with(ptx::sw128_desc(pb.a_addr + 128, 16, 1024)), "bits 7-9");
  EXPECT_LOGIC_ERROR(run_with(ptx::sw128_desc(pb.a_addr, 16, 512)), "SBO 512");
  // MN-major: LBO must be atom-aligned too.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      const uint32_t a[4] = {};
                                      ptx::wgmma_fence();
                                      ptx::wgmma_rs<__nv_bfloat16, 64>(
                                          d, a, ptx::sw128_desc(pb.b_addr, 16, 1024), false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "LBO 16");
}

TEST(WgmmaEmu, OutsideTheWindowThrows) {
  SmallProblem pb;  // a 32 KB window
  // B's 64 rows (8 atoms) from 28 KB run past the end.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      ptx::wgmma_ss<__nv_bfloat16, 64>(
                                          d, pb.a_desc(), ptx::sw128_desc(28 * 1024, 16, 1024),
                                          false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "outside the window");
  // The MN-major B's second 64 columns (LBO) past the end.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[64] = {};
                                      const uint32_t a[4] = {};
                                      ptx::wgmma_fence();
                                      ptx::wgmma_rs<__nv_bfloat16, 128>(
                                          d, a, ptx::sw128_desc(pb.b_addr, 32 * 1024, 1024), false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "outside the window");
  // smem_offset of pointers outside the window.
  unsigned char* base = pb.win.base();
  EXPECT_EQ(ptx::smem_offset(base + 100), 100u);
  EXPECT_THROW(ptx::smem_offset(base + pb.win.bytes()), std::logic_error);
  const int elsewhere = 0;
  EXPECT_THROW(ptx::smem_offset(&elsewhere), std::logic_error);
  EXPECT_THROW(emu::run_block(128, [&] { (void)ptx::smem_offset(&elsewhere); }), std::logic_error);
}

TEST(WgmmaEmu, UnalignedWindowThrows) {
  std::vector<unsigned char> buf(4096);
  unsigned char* aligned =
      buf.data() + (1024 - reinterpret_cast<uintptr_t>(buf.data()) % 1024) % 1024;
  EXPECT_THROW(emu::wgmma::set_shared_window(aligned + 16, 1024), std::invalid_argument);
  EXPECT_THROW(emu::run_block(128, [&] { emu::wgmma::set_shared_window(aligned + 512, 1024); }),
               std::invalid_argument);
  EXPECT_NO_THROW(emu::wgmma::set_shared_window(aligned, 1024));
}

TEST(WgmmaEmu, OperandOverwrittenInFlightThrows) {
  SmallProblem pb;
  // Thread `writer` overwrites shared byte `at` between issue and wait (barriers order it), or
  // after the wait when !in_flight.
  const auto run = [&](bool rs, uint32_t at, bool in_flight) {
    SmallProblem fresh;
    emu::run_block(256, [&] {
      const int tid = static_cast<int>(threadIdx.x);
      float d[32] = {};
      const uint32_t a[4] = {};
      ptx::wgmma_fence();
      if (rs)
        ptx::wgmma_rs<__nv_bfloat16, 64>(d, a, ptx::sw128_desc(fresh.b_addr, 8192, 1024), false);
      else
        fresh.issue(d, false);
      ptx::wgmma_commit();
      if (!in_flight) ptx::wgmma_wait<0>();
      __syncthreads();
      if (tid == 200) fresh.win.base()[at] ^= 0x40;
      __syncthreads();
      ptx::wgmma_wait<0>();
    });
  };
  // A's row 37 (warp 2's), element 2 (chunk 0, stored at 0 ^ 5); B's row 50, element 11
  // (chunk 1, at 1 ^ 2), of the wgmma_ss; B's k-row 11 of the wgmma_rs.
  EXPECT_LOGIC_ERROR(run(false, pb.a_addr + 37 * 128 + 5 * 16 + 4, true),
                     "wgmma_ss A element (37, 2)");
  EXPECT_LOGIC_ERROR(run(false, pb.b_addr + 50 * 128 + 3 * 16 + 6, true),
                     "wgmma_ss B element (50, 11)");
  EXPECT_LOGIC_ERROR(run(true, pb.b_addr + 11 * 128 + 3, true), "wgmma_rs B element (11");
  EXPECT_NO_THROW(run(false, pb.a_addr + 37 * 128 + 5 * 16 + 4, false));
  EXPECT_NO_THROW(run(true, pb.b_addr + 11 * 128 + 3, false));
  // Bytes the wgmma did not read (A's columns 16.. of the row) may change.
  EXPECT_NO_THROW(run(false, pb.a_addr + 37 * 128 + ((2 ^ (37 % 8)) * 16), true));
}

TEST(WgmmaEmu, AccumulatorWrittenInFlightThrows) {
  SmallProblem pb;
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(d, true);
                                      ptx::wgmma_commit();
                                      if (threadIdx.x == 40) d[7] = 1.f;
                                      ptx::wgmma_wait<0>();
                                    }),
                     "d[7]");
  // Overlapping but different accumulator arrays.
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[64] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(*reinterpret_cast<float(*)[32]>(d), false);
                                      pb.issue(*reinterpret_cast<float(*)[32]>(d + 16), false);
                                      ptx::wgmma_commit();
                                      ptx::wgmma_wait<0>();
                                    }),
                     "overlaps");
}

TEST(WgmmaEmu, FinishingWithPendingWgmmaThrows) {
  SmallProblem pb;
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(d, false);
                                      ptx::wgmma_commit();
                                      if (threadIdx.x != 0) ptx::wgmma_wait<0>();
                                    }),
                     "thread 0 finished with 1 wgmma not completed");
  EXPECT_LOGIC_ERROR(emu::run_block(128,
                                    [&] {
                                      float d[32] = {};
                                      ptx::wgmma_fence();
                                      pb.issue(d, false);
                                      ptx::wgmma_wait<0>();  // nothing committed
                                    }),
                     "1 not committed");
}

TEST(CudaEmuWarpgroup, ExchangeAmongTheWarpgroup) {
  std::vector<long> sums(256), firsts(256);
  emu::run_block(256, [&] {
    const int tid = static_cast<int>(threadIdx.x);
    emu::Block::current_block()->warpgroup_exchange(&tid, sizeof tid, [&](auto thread_bytes) {
      long s = 0;
      for (int t = 0; t < 128; ++t) {
        int v;
        std::memcpy(&v, thread_bytes(t), sizeof v);
        s += v;
        if (t == 0) firsts[static_cast<size_t>(tid)] = v;
      }
      sums[static_cast<size_t>(tid)] = s;
    });
  });
  for (int tid = 0; tid < 256; ++tid) {
    const long g0 = 128 * (tid / 128);
    EXPECT_EQ(firsts[static_cast<size_t>(tid)], g0);
    EXPECT_EQ(sums[static_cast<size_t>(tid)], 128 * g0 + 127 * 128 / 2);
  }
  // A thread of the warpgroup that never arrives: a deadlock error.
  EXPECT_THROW(emu::run_block(256,
                              [&] {
                                const int tid = static_cast<int>(threadIdx.x);
                                if (tid == 130) return;
                                emu::Block::current_block()->warpgroup_exchange(&tid, sizeof tid,
                                                                                [](auto) {});
                              }),
               std::runtime_error);
}

}  // namespace
}  // namespace attnpilot::attention
