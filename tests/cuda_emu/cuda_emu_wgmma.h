#pragma once
/// CPU emulation of Hopper's warpgroup tensor-core instructions (sm_90a) that
/// attention/cuda/wgmma_ptx.cuh wraps, on top of cuda_emu.h's fibers and cuda_emu_mma.h's 16-bit
/// types (namespace attnpilot::cuda_emu::wgmma):
///
///   set_shared_window(base, bytes)   registers the emulated CTA's dynamic shared memory (base
///                                    1024-byte aligned, else std::invalid_argument); call it
///                                    before run_block
///   smem_offset(p)                   p - base: the "shared-space address" descriptors hold; the
///                                    128-byte swizzle works on its bits 4-6 XOR 7-9, which
///                                    offsets from a 1024-aligned base model (std::logic_error
///                                    when p is outside the window or none is set)
///   wgmma_fence / _commit / _wait<N>   wgmma.fence / commit_group / wait_group N (per thread)
///   fence_proxy_async()              fence.proxy.async.shared::cta: nothing to do
///   wgmma_ss<T, N>(d, a, b, acc)     wgmma.mma_async m64nNk16 f32 += T·T, A (64×16) and B (N×16)
///                                    K-major in shared memory: d = A·Bᵀ (+ d when acc)
///   wgmma_rs<T, N, kMnB>(d, a, b, acc)  the same with A from registers and B (16×N) MN-major
///                                    (kMnB, imm-trans-b = 1) or K-major: d = A·B (+ d)
/// T is __nv_bfloat16 or __half, N is 64 or 128. For the warp-specialised kernel, also:
///
///   mbar_init(bar, count) / mbar_arrive(bar) / mbar_wait(bar, parity)   an mbarrier at a shared
///                                    address: `count` arrivals complete a phase; the wait
///                                    blocks the fiber until the phase of that parity has
///                                    completed (the current phase's parity differs); arriving
///                                    at an uninitialised barrier, or more often than a phase
///                                    holds, is impossible to tell apart here and an error only
///                                    for the first
///   named_bar_sync / named_bar_arrive(id, count)   bar.sync / bar.arrive: a barrier id 1..15
///                                    completes when `count` threads (a multiple of 32, the
///                                    same count from everyone in one use) have arrived; sync
///                                    waits for that, arrive does not; a syncing thread first
///                                    sits out 1 to 64 rounds (a late warp), and a thread
///                                    arriving twice in one use is an error (on the GPU its
///                                    second arrival counts toward the first use)
///   setmaxnreg_dec<N> / _inc<N>      nothing to do (registers are not modelled)
///   cp_async_wait_group<N>           cp.async.wait_group N (cuda_emu_mma.h's cp.async)
///   cp_async_mbar_arrive(bar)        cp.async.mbarrier.arrive.noinc: arrives once this thread's
///                                    earlier copies have landed (emulated late, see below)
///
/// Layouts are wgmma_ptx.cuh's (its header comment; w = warp of the warpgroup, g = lane / 4,
/// c = lane % 4): d[4i + e] is row 16w + g + 8·(e / 2), column 8i + 2c + (e % 2); the register A
/// of warp w is the mma.sync m16n8k16 A fragment of rows 16w..16w+15. Descriptors: start, LBO and
/// SBO in 16-byte units (bits 0-13, 16-29, 32-45), base offset bits 49-51, layout type bits
/// 62-63; only type 1 (128-byte swizzle) with base offset 0 is emulated, anything else, or a
/// reserved bit set, is a std::logic_error naming the value, and so are atoms that are not
/// 1024-byte aligned (start bits 7-9, SBO, and for MN-major LBO, not multiples of 1024: the
/// header's precondition; starts may move by 16-byte steps inside a row, as the 32-byte k-step
/// advance does). K-major element (mn, k) sits at s + (mn / 8)·SBO + (mn % 8)·128 + 2k, MN-major
/// element (k, n) at s + (n / 64)·LBO + 2·(n % 64) + (k / 8)·SBO + (k % 8)·128, then the byte
/// address is swizzled, addr ^ (((addr >> 7) & 7) << 4), and every element read is checked
/// against the window (std::logic_error).
///
/// Each wgmma is one Block::warpgroup_exchange: all 128 threads of the warpgroup must issue it
/// with the same instruction (ss / rs, N, T), descriptors and acc flag (a thread that skips one
/// pairs its next wgmma with the others' skipped one: an error when the two differ, else a
/// deadlock error when the others' next wgmma waits for it in vain, as for a thread that never
/// arrives). The 16 exact products are summed in double with the accumulator input and rounded
/// once to float (as mma_16816; the hardware's order and rounding are unspecified).
///
/// Asynchrony: operands (shared memory, A registers, the accumulator input) are read at issue,
/// but the result is held back, per thread, until the wgmma_wait that covers its group:
/// wgmma_commit closes the wgmmas issued since the last commit into a group (an empty one when
/// there were none), wgmma_wait<N> writes the results of all but the N newest committed groups
/// into their d arrays, oldest first; uncommitted wgmmas stay pending. A wgmma into a d array
/// that still has a pending result takes that result as its accumulator input (the hardware
/// chains same-accumulator wgmmas in order). So a kernel that reads d before the covering wait
/// sees the stale values. Misuse, each a std::logic_error:
///   - a wgmma issued with no wgmma_fence since the thread's last wgmma_wait (or since the thread
///     started);
///   - d written while a wgmma into it is pending (at completion d must still hold what it held
///     at issue, or the chained predecessor's result), or a wgmma into an array that partly
///     overlaps a pending one's;
///   - shared-memory operand bytes changed while the wgmma that read them is pending: at the
///     first completion in each warp the bytes of that warp's A rows and of all of B are read
///     again and compared with what was read at issue;
///   - a thread whose body returns with wgmmas issued but not completed by a wait
///     (Block::extension's thread_exit).
/// Not modelled: the register A operands' lifetime (they are copied at issue; changing them while
/// the wgmma is pending goes unseen), a d array that goes out of scope while pending (the wait
/// writes into dead stack), fence.proxy.async (generic-proxy writes are visible at once: a missing
/// proxy fence goes unseen; a missing barrier shows through the fibers' random order), divergence
/// of fence / commit / wait within a warpgroup (each thread keeps its own groups), other swizzles,
/// shapes and types, sparse and transposed-A forms, and timing.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "tests/cuda_emu/cuda_emu.h"
#include "tests/cuda_emu/cuda_emu_mma.h"

namespace attnpilot::cuda_emu::wgmma {

namespace detail {

struct Window {
  unsigned char* base = nullptr;
  size_t bytes = 0;
};
inline Window& window() {
  static Window w;
  return w;
}

inline std::string hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

[[noreturn]] inline void fail(const std::string& msg) {
  throw std::logic_error("cuda_emu: " + msg);
}

template <typename T>
struct Type;
template <>
struct Type<__nv_bfloat16> {
  static constexpr int kId = 0;
  static float value(uint16_t bits) { return bf16_bits_to_float(bits); }
};
template <>
struct Type<__half> {
  static constexpr int kId = 1;
  static float value(uint16_t bits) { return half_bits_to_float(bits); }
};

/// A descriptor's byte fields.
struct Desc {
  uint32_t start, lbo, sbo;
};

/// Decodes a 128-byte-swizzle descriptor; `mn_major` also needs LBO on 1024-byte atoms.
inline Desc decode(uint64_t desc, const char* what, bool mn_major) {
  const std::string name = std::string(what) + " descriptor " + hex(desc);
  const uint64_t layout = desc >> 62, base_offset = (desc >> 49) & 7u;
  if (layout != 1)
    fail(name + " has layout type " + std::to_string(layout) +
         "; only 1 (128-byte swizzle) is emulated");
  if (base_offset != 0)
    fail(name + " has base offset " + std::to_string(base_offset) + "; only 0 is emulated");
  constexpr uint64_t kReserved = (3ull << 14) | (3ull << 30) | (7ull << 46) | (0x3ffull << 52);
  if (desc & kReserved) fail(name + " sets reserved bits " + hex(desc & kReserved));
  const Desc d{static_cast<uint32_t>(desc & 0x3fffu) << 4,
               static_cast<uint32_t>((desc >> 16) & 0x3fffu) << 4,
               static_cast<uint32_t>((desc >> 32) & 0x3fffu) << 4};
  if (d.start & 0x380u)
    fail(name + ": start offset " + std::to_string(d.start) +
         " is not in the first row of a 1024-byte atom (bits 7-9 set)");
  if (d.sbo % 1024 != 0)
    fail(name + ": SBO " + std::to_string(d.sbo) + " is not a multiple of 1024 (atoms)");
  if (mn_major && d.lbo % 1024 != 0)
    fail(name + ": LBO " + std::to_string(d.lbo) + " is not a multiple of 1024 (atoms)");
  return d;
}

/// The window offset of a (pre-swizzle) byte address, swizzled and checked against the window.
inline uint32_t swizzled(uint64_t addr, const char* what, int r, int k) {
  const uint64_t a = addr ^ (((addr >> 7) & 7u) << 4);
  if (a + 2 > window().bytes)
    fail(std::string(what) + " element (" + std::to_string(r) + ", " + std::to_string(k) +
         ") at shared offset " + std::to_string(a) + " is outside the window of " +
         std::to_string(window().bytes) + " bytes");
  return static_cast<uint32_t>(a);
}
inline uint16_t load(uint32_t off) {
  uint16_t v;
  std::memcpy(&v, window().base + off, sizeof v);
  return v;
}

/// What each thread brings to a wgmma (the warpgroup exchange's deposit).
struct Deposit {
  uint64_t seq;             // this thread's wgmma count: equal in all 128 (the m-th meeting)
  uint64_t a_desc, b_desc;  // a_desc 0 for wgmma_rs
  uint32_t a[4];            // wgmma_rs
  int32_t ss, n, type, acc;
  int32_t mn_b;  // wgmma_rs: B MN-major (imm-trans-b = 1), else K-major
};

/// One warpgroup's wgmma: the operands as read at issue.
struct Issue {
  uint64_t seq = 0;
  bool ss = false;
  bool mn_b = false;  // B read MN-major (wgmma_rs with imm-trans-b = 1)
  int n = 0;
  double a[64][16];   // A[row][k]
  double b[128][16];  // B[col][k]: Bᵀ for wgmma_ss, B for wgmma_rs
  // The shared-memory elements read: offsets and bits, A's 64×16 first (wgmma_ss), then B's
  // n×16, both in [row or col][k] order.
  std::vector<uint32_t> off;
  std::vector<uint16_t> bits;
  bool checked[4] = {};  // per warp: operands compared again at its first completion
};

/// A thread's wgmma whose result is held back.
struct Pending {
  float* d = nullptr;
  int count = 0;
  float result[64];
  float expect[64];  // what d must hold when the result is written
  std::shared_ptr<Issue> issue;
};

struct ThreadState {
  bool fenced = false;
  uint64_t seq = 0;                         // wgmmas issued
  std::vector<Pending> open;                // issued since the last commit
  std::deque<std::vector<Pending>> groups;  // committed, oldest first
};

/// Per-block state (Block::extension).
struct State : Block::Extension {
  explicit State(Block& b)
      : threads(static_cast<size_t>(b.size())),
        current(static_cast<size_t>((b.size() + 127) / 128)) {}
  std::vector<ThreadState> threads;
  std::vector<std::shared_ptr<Issue>> current;  // per warpgroup, its latest wgmma
  void thread_exit(int tid) override {
    const ThreadState& ts = threads[static_cast<size_t>(tid)];
    size_t n = ts.open.size();
    for (const auto& g : ts.groups) n += g.size();
    if (n > 0)
      fail("thread " + std::to_string(tid) + " finished with " + std::to_string(n) +
           " wgmma not completed (" + std::to_string(ts.open.size()) +
           " not committed; the rest committed but not waited for)");
  }
};

inline Block& block(const char* what) {
  Block* b = Block::current_block();
  if (b == nullptr) fail(std::string(what) + " called outside run_block");
  return *b;
}
inline ThreadState& thread_state(Block& b) {
  return b.extension<State>().threads[static_cast<size_t>(b.tid())];
}

/// The newest pending wgmma of this thread into d (count floats), or null; a pending one into
/// an array that overlaps d without being d is an error.
inline const Pending* pending_into(const ThreadState& ts, const float* d, int count) {
  const Pending* found = nullptr;
  const auto visit = [&](const Pending& p) {
    const bool overlap = p.d < d + count && d < p.d + p.count;
    if (!overlap) return;
    if (p.d != d || p.count != count)
      fail("a wgmma accumulator array overlaps a pending wgmma's without being the same array");
    found = &p;  // visited oldest first: the last match is the newest
  };
  for (const auto& g : ts.groups)
    for (const auto& p : g) visit(p);
  for (const auto& p : ts.open) visit(p);
  return found;
}

/// The warpgroup's wgmma from the 128 deposits: checks that they agree and reads the operands.
template <typename T, typename Bytes>
std::shared_ptr<Issue> read_operands(Bytes&& thread_bytes, int group) {
  const auto deposit = [&](int t) {
    Deposit dep;
    std::memcpy(&dep, thread_bytes(t), sizeof dep);
    return dep;
  };
  const Deposit d0 = deposit(0);
  const char* name = d0.ss ? "wgmma_ss" : "wgmma_rs";
  for (int t = 1; t < 128; ++t) {
    const Deposit dt = deposit(t);
    const std::string who = "threads " + std::to_string(128 * group) + " and " +
                            std::to_string(128 * group + t) + " of a warpgroup";
    if (dt.ss != d0.ss || dt.n != d0.n || dt.type != d0.type || dt.mn_b != d0.mn_b)
      fail(who + " issue different wgmma instructions (ss/rs, N, type or B's major order)");
    if (dt.a_desc != d0.a_desc || dt.b_desc != d0.b_desc)
      fail(who + " give " + name + " different descriptors: A " + hex(d0.a_desc) + " vs " +
           hex(dt.a_desc) + ", B " + hex(d0.b_desc) + " vs " + hex(dt.b_desc));
    if (dt.acc != d0.acc) fail(who + " give " + name + " different acc flags");
  }
  if (window().base == nullptr) fail(std::string(name) + ": no shared window (set_shared_window)");
  auto is = std::make_shared<Issue>();
  is->seq = d0.seq;
  is->ss = d0.ss != 0;
  is->n = d0.n;
  const auto keep = [&](uint32_t off) {
    const uint16_t v = load(off);
    is->off.push_back(off);
    is->bits.push_back(v);
    return static_cast<double>(Type<T>::value(v));
  };
  is->mn_b = !is->ss && d0.mn_b != 0;
  // A K-major B (N×16): element (n, k) as wgmma_ss reads it.
  const auto read_b_k_major = [&](const char* what) {
    const Desc b = decode(d0.b_desc, what, false);
    for (int n = 0; n < d0.n; ++n)
      for (int k = 0; k < 16; ++k)
        is->b[n][k] = keep(
            swizzled(uint64_t(b.start) + uint64_t(n / 8) * b.sbo + uint64_t(n % 8) * 128 + 2u * k,
                     what, n, k));
  };
  if (is->ss) {
    const Desc a = decode(d0.a_desc, "wgmma_ss A", false);
    for (int r = 0; r < 64; ++r)
      for (int k = 0; k < 16; ++k)
        is->a[r][k] = keep(
            swizzled(uint64_t(a.start) + uint64_t(r / 8) * a.sbo + uint64_t(r % 8) * 128 + 2u * k,
                     "wgmma_ss A", r, k));
    read_b_k_major("wgmma_ss B");
  } else {
    // A[row][k]: warp row / 16, lane 4·(row % 8) + (k % 8) / 2, register (row % 16) / 8 +
    // 2·(k / 8), half k % 2.
    for (int r = 0; r < 64; ++r)
      for (int k = 0; k < 16; ++k) {
        const Deposit dep = deposit(32 * (r / 16) + 4 * (r % 8) + (k % 8) / 2);
        const uint32_t reg = dep.a[(r % 16) / 8 + 2 * (k / 8)];
        is->a[r][k] = Type<T>::value(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xffffu));
      }
    if (!is->mn_b) {
      read_b_k_major("wgmma_rs B (K-major)");
      return is;
    }
    const Desc b = decode(d0.b_desc, "wgmma_rs B", true);
    for (int n = 0; n < d0.n; ++n)
      for (int k = 0; k < 16; ++k)
        is->b[n][k] = keep(swizzled(uint64_t(b.start) + uint64_t(n / 64) * b.lbo + 2u * (n % 64) +
                                        uint64_t(k / 8) * b.sbo + uint64_t(k % 8) * 128,
                                    "wgmma_rs B", k, n));
  }
  return is;
}

/// Issues this thread's part of a wgmma (ss: a_desc, else a_regs; mn_b: wgmma_rs's B MN-major).
template <typename T, int N>
void issue(float* d, bool ss, uint64_t a_desc, const uint32_t* a_regs, uint64_t b_desc, bool acc,
           bool mn_b = true) {
  static_assert(N == 64 || N == 128, "wgmma: N is 64 or 128");
  const char* name = ss ? "wgmma_ss" : "wgmma_rs";
  Block& blk = block(name);
  const int tid = blk.tid();
  State& st = blk.extension<State>();
  ThreadState& ts = st.threads[static_cast<size_t>(tid)];
  if (!ts.fenced)
    fail("thread " + std::to_string(tid) + " issued " + name +
         " with no wgmma_fence since its last wgmma_wait (or since it started)");
  Deposit mine{};
  mine.seq = ++ts.seq;
  mine.a_desc = ss ? a_desc : 0;
  mine.b_desc = b_desc;
  if (!ss)
    for (int i = 0; i < 4; ++i) mine.a[i] = a_regs[i];
  mine.ss = ss;
  mine.n = N;
  mine.type = Type<T>::kId;
  mine.acc = acc;
  mine.mn_b = !ss && mn_b;

  Pending p;
  p.d = d;
  p.count = N / 2;
  if (const Pending* prev = pending_into(ts, d, N / 2))
    std::memcpy(p.expect, prev->result, sizeof(float) * (N / 2));
  else
    std::memcpy(p.expect, d, sizeof(float) * (N / 2));
  const int group = tid / 128, w = (tid % 128) / 32, g = (tid % 32) / 4, c = tid % 4;
  blk.warpgroup_exchange(&mine, sizeof mine, [&](auto thread_bytes) {
    auto& cur = st.current[static_cast<size_t>(group)];
    if (!cur || cur->seq != mine.seq) cur = read_operands<T>(thread_bytes, group);
    const Issue& is = *cur;
    for (int i = 0; i < N / 8; ++i)
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * w + g + 8 * (e / 2), col = 8 * i + 2 * c + e % 2;
        double sum = 0;
        for (int k = 0; k < 16; ++k) sum += is.a[row][k] * is.b[col][k];
        p.result[4 * i + e] =
            static_cast<float>(acc ? static_cast<double>(p.expect[4 * i + e]) + sum : sum);
      }
    p.issue = cur;
  });
  ts.open.push_back(std::move(p));
}

/// Writes a pending result after the misuse checks (warp w of the warpgroup completes it).
inline void complete(Pending& p, int tid) {
  for (int i = 0; i < p.count; ++i)
    if (std::memcmp(&p.d[i], &p.expect[i], sizeof(float)) != 0)
      fail("thread " + std::to_string(tid) + " wrote d[" + std::to_string(i) +
           "] of a wgmma accumulator while the wgmma was pending (wait first)");
  Issue& is = *p.issue;
  const int w = (tid % 128) / 32;
  if (!is.checked[w]) {
    is.checked[w] = true;
    const auto check = [&](size_t j, const char* what, int r, int k) {
      if (load(is.off[j]) != is.bits[j])
        fail(std::string(what) + " element (" + std::to_string(r) + ", " + std::to_string(k) +
             ") at shared offset " + std::to_string(is.off[j]) +
             " changed while the wgmma that read it was pending (wgmma_wait before "
             "overwriting an operand tile)");
    };
    size_t b0 = 0;
    if (is.ss) {
      for (int r = 16 * w; r < 16 * w + 16; ++r)
        for (int k = 0; k < 16; ++k) check(static_cast<size_t>(r * 16 + k), "wgmma_ss A", r, k);
      b0 = 64 * 16;
    }
    for (int n = 0; n < is.n; ++n)  // B's elements are (n, k) K-major, (k, n) MN-major
      for (int k = 0; k < 16; ++k)
        check(b0 + static_cast<size_t>(n * 16 + k), is.ss ? "wgmma_ss B" : "wgmma_rs B",
              is.mn_b ? k : n, is.mn_b ? n : k);
  }
  std::memcpy(p.d, p.result, sizeof(float) * static_cast<size_t>(p.count));
}

}  // namespace detail

/// Registers the emulated CTA's dynamic shared memory (base 1024-byte aligned).
inline void set_shared_window(void* base, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(base) % 1024 != 0)
    throw std::invalid_argument("cuda_emu: wgmma shared window base " +
                                detail::hex(reinterpret_cast<uintptr_t>(base)) +
                                " is not 1024-byte aligned");
  detail::window() = {static_cast<unsigned char*>(base), bytes};
}

/// p's offset in the shared window (the shared-space address descriptors hold).
inline uint32_t smem_offset(const void* p) {
  const auto& win = detail::window();
  if (win.base == nullptr) detail::fail("smem_offset: no shared window (set_shared_window)");
  const auto* q = static_cast<const unsigned char*>(p);
  if (q < win.base || q >= win.base + win.bytes)
    detail::fail("smem_offset: pointer outside the shared window of " + std::to_string(win.bytes) +
                 " bytes");
  return static_cast<uint32_t>(q - win.base);
}

/// wgmma.fence: this thread may issue wgmmas again.
inline void wgmma_fence() { detail::thread_state(detail::block("wgmma_fence")).fenced = true; }

/// wgmma.commit_group: the wgmmas issued since the last commit become a group (maybe empty).
inline void wgmma_commit() {
  auto& ts = detail::thread_state(detail::block("wgmma_commit"));
  ts.groups.push_back(std::move(ts.open));
  ts.open.clear();
}

/// wgmma.wait_group N: completes all but the N newest committed groups, oldest first.
template <int N>
inline void wgmma_wait() {
  static_assert(N >= 0, "wgmma_wait: N >= 0");
  Block& b = detail::block("wgmma_wait");
  auto& ts = detail::thread_state(b);
  while (ts.groups.size() > static_cast<size_t>(N)) {
    for (auto& p : ts.groups.front()) detail::complete(p, b.tid());
    ts.groups.pop_front();
  }
  ts.fenced = false;
}

/// fence.proxy.async.shared::cta: shared-memory writes are visible to the emulated wgmma at once.
inline void fence_proxy_async() {}

namespace detail {
/// Per-block mbarriers and named barriers.
struct SyncState : Block::Extension {
  explicit SyncState(Block&) {}
  struct Mbar {
    unsigned count = 0, pending = 0;
    uint64_t completed = 0;  ///< phases completed
  };
  std::map<const void*, Mbar> mbars;
  struct Named {
    int count = 0, arrived = 0;
    uint64_t gen = 0;
    std::set<int> threads;  ///< the threads arrived in the current generation
  };
  std::map<int, Named> named;
};

inline SyncState::Mbar& mbar(const void* bar, const char* what) {
  (void)smem_offset(bar);  // must lie in the shared window
  auto& st = block(what).extension<SyncState>();
  auto it = st.mbars.find(bar);
  if (it == st.mbars.end())
    fail(std::string(what) + ": mbarrier at shared offset " + std::to_string(smem_offset(bar)) +
         " was never initialised");
  return it->second;
}

inline void named_arrive(int id, int count, bool sync, const char* what) {
  Block& b = block(what);
  if (id < 1 || id > 15 || count < 32 || count % 32 != 0 || count > b.size())
    fail(std::string(what) + ": barrier id " + std::to_string(id) + " with " +
         std::to_string(count) + " threads (expected id 1..15, a multiple of 32 up to the block)");
  // A thread may reach a barrier late (its warp not scheduled): syncing threads sit out 1 to
  // 64 rounds first, so an arriving thread can get round to its next arrival meanwhile.
  if (sync) b.yield(64);
  auto& nb = b.extension<SyncState>().named[id];
  if (!nb.threads.insert(b.tid()).second)
    fail(std::string(what) + ": thread " + std::to_string(b.tid()) + " arrives twice at barrier " +
         std::to_string(id) + " before it completes (" + std::to_string(nb.arrived) + " of " +
         std::to_string(nb.count) +
         " arrivals): its other participants have not all reached "
         "the previous use");
  if (nb.arrived == 0) {
    nb.count = count;
  } else if (nb.count != count) {
    fail(std::string(what) + ": barrier " + std::to_string(id) + " used with " +
         std::to_string(count) + " threads while in use with " + std::to_string(nb.count));
  }
  const uint64_t gen = nb.gen;
  if (++nb.arrived == count) {
    nb.arrived = 0;
    nb.threads.clear();
    ++nb.gen;
  } else if (sync) {
    auto* n = &nb;  // std::map nodes do not move
    b.wait_until([n, gen] { return n->gen != gen; });
  }
}
}  // namespace detail

/// mbarrier.init: `count` arrivals complete a phase (called by one thread).
inline void mbar_init(uint64_t* bar, unsigned count) {
  (void)smem_offset(bar);
  if (count < 1) detail::fail("mbar_init: an arrival count of 0");
  detail::block("mbar_init").extension<detail::SyncState>().mbars[bar] = {count, count, 0};
}
namespace detail {
/// One arrival on an mbarrier; the last of a phase completes it.
inline void mbar_arrive_once(uint64_t* bar, const char* what) {
  auto& m = mbar(bar, what);
  if (--m.pending == 0) {
    m.pending = m.count;
    ++m.completed;
  }
}
}  // namespace detail
/// mbarrier.arrive: one arrival; the last of a phase completes it. The arriving thread then
/// sits out 1 to 64 scheduling rounds, so waiters may run well ahead of it (on the GPU they can):
/// a waiter that relies on something the arriving thread does only after the arrival sees it
/// undone.
inline void mbar_arrive(uint64_t* bar) {
  detail::mbar_arrive_once(bar, "mbar_arrive");
  detail::block("mbar_arrive").yield(64);
}
/// mbarrier.try_wait.parity loop: until the phase with this parity has completed.
inline void mbar_wait(uint64_t* bar, unsigned parity) {
  auto* m = &detail::mbar(bar, "mbar_wait");
  detail::block("mbar_wait").wait_until([m, parity] {
    return (m->completed & 1u) != (parity & 1u);
  });
}
/// bar.sync id, count.
inline void named_bar_sync(int id, int count) { detail::named_arrive(id, count, true, "bar.sync"); }
/// bar.arrive id, count.
inline void named_bar_arrive(int id, int count) {
  detail::named_arrive(id, count, false, "bar.arrive");
}
/// setmaxnreg: registers are not modelled.
template <int N>
inline void setmaxnreg_dec() {}
template <int N>
inline void setmaxnreg_inc() {}
/// cp.async.wait_group N (cuda_emu_mma.h's emulated cp.async).
using ::attnpilot::cuda_emu::mma::cp_async_wait_group;
/// cp.async.mbarrier.arrive.noinc: the arrival waits for this thread's earlier copies. Emulated
/// late: the thread first sits out 1 to 64 scheduling rounds (waiters that do not wait for the
/// barrier run ahead and see the old bytes), then its copies land, then it arrives.
inline void cp_async_mbar_arrive(uint64_t* bar) {
  (void)detail::mbar(bar, "cp_async_mbar_arrive");
  detail::block("cp_async_mbar_arrive").yield(64);
  ::attnpilot::cuda_emu::mma::cp_async_commit();
  ::attnpilot::cuda_emu::mma::cp_async_wait_group_n(0);
  detail::mbar_arrive_once(bar, "cp_async_mbar_arrive");
}

/// wgmma.mma_async m64nNk16, A and B K-major in shared memory: d = A·Bᵀ (+ d when acc), the
/// result held back until the covering wgmma_wait (the top).
template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], uint64_t a_desc, uint64_t b_desc, bool acc) {
  detail::issue<T, N>(d, true, a_desc, nullptr, b_desc, acc);
}

/// wgmma.mma_async m64nNk16, A from registers, B in shared memory MN-major (kMnB, imm-trans-b =
/// 1) or K-major (stored N×16 as wgmma_ss's B): d = A·B (+ d).
template <typename T, int N, bool kMnB = true>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b_desc, bool acc) {
  detail::issue<T, N>(d, false, 0, a, b_desc, acc, kMnB);
}

}  // namespace attnpilot::cuda_emu::wgmma
