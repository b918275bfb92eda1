#pragma once
/// A CPU emulation of the CUDA execution model, enough to run our block-level device code
/// (perturbation/cuda/jacobi_sweeps.cuh) in tests on machines without a GPU, CI among them.
///
///   emu::run_block(threads, body)   one thread block: `threads` fibers, each runs
///                                   body(); the scheduler switches fibers only at barriers
///   __syncthreads / __syncthreads_or    block barrier (all fibers)
///   __shfl_xor_sync(mask, v, off)   the lanes of `mask` in the caller's warp exchange values
///   threadIdx.x, blockDim.x         the calling fiber's index, the block size
///   __shared__                      `static` (one block runs at a time, on one OS thread)
///   Block::warp_exchange            warp collectives (ldmatrix, mma.sync: cuda_emu_mma.h)
///   Block::warpgroup_exchange       the same among the 128 threads of the caller's warpgroup
///                                   (threads with equal tid / 128; wgmma: cuda_emu_wgmma.h)
///   Block::extension<E>()           per-block state of an emulation layered on this one (made on
///                                   first use, gone with the block; E::thread_exit(tid) runs as
///                                   each thread's body returns; what it throws fails the block)
///   Block::wait_until / yield(n)    block the caller until a condition holds / sit out 1..n
///                                   scheduling rounds (mbarriers, named barriers, a slow thread)
///
/// What it checks beyond the results: a barrier that not every fiber reaches (a divergent
/// __syncthreads, or a shuffle whose mask names lanes that never arrive, or a warpgroup
/// collective that a thread of the warpgroup skips) is reported as a deadlock by an exception,
/// not a hang. Between barriers the fibers run in a pseudo-random order, fresh at every round,
/// so a missing barrier between one thread's write and another's read shows up as a wrong
/// result in about half the cases instead of hiding behind a fixed order (ATTNPILOT_EMU_SEED=<n>
/// picks other orders). What it does not model: concurrent access
/// within a round (fibers run one at a time,
/// each to its next barrier), warp-synchronous execution without barriers, and performance.
///
/// Include this instead of <cuda_runtime.h> (define ATTNPILOT_CUDA_EMU before the device
/// headers, which then skip their CUDA includes).
#ifndef ATTNPILOT_CUDA_EMU
#define ATTNPILOT_CUDA_EMU 1
#endif

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __shared__ static

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };

struct float4 {
  float x, y, z, w;
};
struct double2 {
  double x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
// The float hardware approximations (MUFU rsqrt and reciprocal, about 2 ulp): the exact value
// moved by 2^-22 relative, a pessimistic model, so the tests see an error the device can make.
inline float rsqrtf(float x) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(x)) * (1.0 + 0x1p-22));
}
inline float __fdividef(float a, float b) {
  return static_cast<float>(static_cast<double>(a) / static_cast<double>(b) * (1.0 - 0x1p-22));
}
inline long long __double_as_longlong(double d) {
  long long r;
  std::memcpy(&r, &d, sizeof r);
  return r;
}
inline double __longlong_as_double(long long b) {
  double r;
  std::memcpy(&r, &b, sizeof r);
  return r;
}
using std::copysign;
using std::fabs;
using std::fma;
using std::fmax;
using std::frexp;
using std::isfinite;
using std::ldexp;
using std::sqrt;

// Fiber switches. x86-64 Linux: attnpilot_emu_switch saves the callee-saved registers, MXCSR
// and the x87 control word on the current stack, stores the stack pointer in *save_sp and
// resumes the stack at load_sp: no system call, where swapcontext saves and restores the signal
// mask with one each time (half the run time of the emulation tests went there). Elsewhere, and
// under AddressSanitizer (which follows stacks through swapcontext), ucontext.
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ATTNPILOT_EMU_ASAN 1
#endif
#endif
#if defined(__x86_64__) && defined(__linux__) && !defined(__SANITIZE_ADDRESS__) && \
    !defined(ATTNPILOT_EMU_ASAN) && !defined(ATTNPILOT_EMU_UCONTEXT)
#define ATTNPILOT_EMU_FAST_SWITCH 1
extern "C" void attnpilot_emu_switch(void** save_sp, void* load_sp);
// Weak: every translation unit that includes this header defines it; the linker keeps one.
asm(R"(
  .pushsection .text
  .weak attnpilot_emu_switch
  .hidden attnpilot_emu_switch
  .type attnpilot_emu_switch, @function
attnpilot_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw 12(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size attnpilot_emu_switch, .-attnpilot_emu_switch
  .popsection
)");
#endif

namespace attnpilot::cuda_emu {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

/// One emulated thread block. Fibers run one at a time and switch only in wait().
class Block {
 public:
  Block(int threads, std::function<void()> body) : body_(std::move(body)) {
    if (threads < 1 || threads > 1024)
      throw std::invalid_argument("cuda_emu: block of " + std::to_string(threads) +
                                  " threads, expected 1..1024");
    fibers_.resize(static_cast<size_t>(threads));
    for (int t = 0; t < threads; ++t) {
      auto& f = fibers_[static_cast<size_t>(t)];
      f.stack.reset(new char[kStack]);  // not zeroed: untouched stack pages are never mapped
#ifdef ATTNPILOT_EMU_FAST_SWITCH
      // The frame attnpilot_emu_switch resumes (from the top, 16-byte aligned): an unused
      // return address of the trampoline (which never returns), the address the switch's ret
      // jumps to, six zero registers, then this thread's MXCSR and x87 control word.
      auto top = reinterpret_cast<uintptr_t>(f.stack.get() + kStack) & ~uintptr_t(15);
      auto* words = reinterpret_cast<uint64_t*>(top);
      words[-1] = 0;
      words[-2] = reinterpret_cast<uint64_t>(&Block::trampoline);
      for (int i = 3; i <= 8; ++i) words[-i] = 0;
      char* sp = reinterpret_cast<char*>(top) - 80;
      uint32_t mxcsr = 0;
      uint16_t fpucw = 0;
      asm volatile("stmxcsr %0" : "=m"(mxcsr));
      asm volatile("fnstcw %0" : "=m"(fpucw));
      std::memcpy(sp + 8, &mxcsr, sizeof mxcsr);
      std::memcpy(sp + 12, &fpucw, sizeof fpucw);
      f.sp = sp;
#else
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &sched_;
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Block::entry), 0);
#endif
    }
    slots_.resize(static_cast<size_t>((threads + 31) / 32) * 32);
    exchanges_.resize(static_cast<size_t>((threads + 31) / 32));
    group_exchanges_.resize(static_cast<size_t>((threads + 127) / 128));
  }

  /// Runs every fiber to completion; rethrows the first exception a fiber threw. Each round
  /// visits the ready fibers in a fresh pseudo-random order (seeded per block, so runs repeat):
  /// between two barriers the GPU gives no order among threads, and a fixed order would hide a
  /// missing barrier whenever the writer happens to come first.
  void run() {
    Block* outer = current_block();
    current_block() = this;
    std::vector<size_t> order(fibers_.size());
    for (size_t t = 0; t < order.size(); ++t) order[t] = t;
    uint64_t& rng = rng_;
    rng = 0x9e3779b97f4a7c15ull * (++blocks_run() + 1) + schedule_seed();
    int done = 0;
    while (done < static_cast<int>(fibers_.size())) {
      bool progressed = false;
      ++round_;
      for (size_t i = order.size(); i > 1; --i) {  // Fisher-Yates with xorshift64
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::swap(order[i - 1], order[rng % i]);
      }
      for (size_t t : order) {
        auto& f = fibers_[t];
        if (f.finished || !ready(f)) continue;
        tid_ = static_cast<int>(t);
        switch_to(f);
        progressed = true;
        if (f.finished) ++done;
        if (error_) break;
      }
      if (error_) break;
      if (!progressed && yielding_ == 0) {
        error_ = std::make_exception_ptr(std::runtime_error(
            "cuda_emu: deadlock: every unfinished thread waits at a barrier or shuffle that "
            "not all of its participants reach"));
        break;
      }
    }
    current_block() = outer;
    if (error_) std::rethrow_exception(error_);
  }

  int tid() const { return tid_; }
  int size() const { return static_cast<int>(fibers_.size()); }

  /// __syncthreads_or: every thread arrives; returns whether any passed a nonzero predicate.
  int barrier(int pred) {
    const uint64_t gen = bar_gen_;
    bar_or_ |= pred != 0;
    if (++bar_count_ == size()) {
      bar_result_ = bar_or_;
      bar_or_ = false;
      bar_count_ = 0;
      ++bar_gen_;
    } else {
      wait([this, gen] { return bar_gen_ != gen; });
    }
    return bar_result_ ? 1 : 0;
  }

  /// __shfl_xor_sync for 64-bit payloads: the lanes of `mask` in this warp exchange.
  uint64_t shuffle_xor(unsigned mask, uint64_t v, int off) {
    const int lane = tid_ % 32, warp = tid_ / 32;
    if (!(mask & (1u << lane)))
      fail("cuda_emu: __shfl_xor_sync called by lane " + std::to_string(lane) +
           " outside its mask");
    const int partner = lane ^ off;
    if (partner >= 32 || !(mask & (1u << partner)) || warp * 32 + partner >= size())
      fail("cuda_emu: __shfl_xor_sync partner lane " + std::to_string(partner) +
           " is not in the mask or the block");
    slots_[static_cast<size_t>(tid_)] = v;
    warp_arrive(warp, mask);  // everyone's value is written
    const uint64_t got = slots_[static_cast<size_t>(warp * 32 + partner)];
    warp_arrive(warp, mask);  // everyone has read before the slots are reused
    return got;
  }

  static Block*& current_block() {
    static Block* b = nullptr;
    return b;
  }
  /// Blocks run so far in this process (seeds each block's schedule).
  static uint64_t& blocks_run() {
    static uint64_t n = 0;
    return n;
  }
  /// The environment's ATTNPILOT_EMU_SEED (0 when unset): other schedules for hunting races.
  static uint64_t schedule_seed() {
    static const uint64_t seed = [] {
      const char* e = std::getenv("ATTNPILOT_EMU_SEED");
      return e != nullptr ? std::strtoull(e, nullptr, 10) * 0xd1b54a32d192ed03ull : 0ull;
    }();
    return seed;
  }

 private:
  static constexpr size_t kStack = 256 * 1024;
  struct Fiber {
#ifdef ATTNPILOT_EMU_FAST_SWITCH
    void* sp = nullptr;  // the saved stack pointer while switched out
#else
    ucontext_t ctx{};
#endif
    std::unique_ptr<char[]> stack;
    bool finished = false;
    std::function<bool()> until;  // waiting while set and false
  };

  static void entry() {
    Block* b = current_block();
    try {
      b->body_();
      for (auto& [key, ext] : b->extensions_) ext->thread_exit(b->tid_);
    } catch (...) {
      if (!b->error_) b->error_ = std::current_exception();
    }
    b->fibers_[static_cast<size_t>(b->tid_)].finished = true;
    // ucontext: uc_link returns to the scheduler; the fast switch: trampoline does.
  }

#ifdef ATTNPILOT_EMU_FAST_SWITCH
  // A fiber's first frame: runs entry, then switches to the scheduler for good.
  [[noreturn]] static void trampoline() {
    entry();
    Block* b = current_block();
    attnpilot_emu_switch(&b->fibers_[static_cast<size_t>(b->tid_)].sp, b->sched_sp_);
    __builtin_unreachable();
  }
#endif

  // The scheduler runs fiber f until it waits or finishes.
  void switch_to(Fiber& f) {
#ifdef ATTNPILOT_EMU_FAST_SWITCH
    attnpilot_emu_switch(&sched_sp_, f.sp);
#else
    swapcontext(&sched_, &f.ctx);
#endif
  }
  // The running fiber f hands control back to the scheduler.
  void switch_out(Fiber& f) {
#ifdef ATTNPILOT_EMU_FAST_SWITCH
    attnpilot_emu_switch(&f.sp, sched_sp_);
#else
    swapcontext(&f.ctx, &sched_);
#endif
  }

  bool ready(Fiber& f) {
    if (!f.until) return true;
    if (f.until()) {
      f.until = nullptr;
      return true;
    }
    return false;
  }

  void wait(std::function<bool()> until) {
    auto& f = fibers_[static_cast<size_t>(tid_)];
    f.until = std::move(until);
    const int me = tid_;
    switch_out(f);
    tid_ = me;
    if (error_) throw std::runtime_error("cuda_emu: another thread failed");
  }

  // The lanes of `mask` meet: one exchange per (warp, mask), so disjoint groups of a warp
  // (different masks) shuffle independently, as on the GPU; overlapping masks in flight at once
  // are an error.
  void warp_arrive(int warp, unsigned mask) {
    auto& per_warp = exchanges_[static_cast<size_t>(warp)];
    for (const auto& [other, ex] : per_warp)
      if (other != mask && (other & mask) && ex.count > 0)
        fail("cuda_emu: lanes of one warp shuffle with overlapping masks at once");
    auto& ex = per_warp[mask];
    const uint64_t gen = ex.gen;
    if (++ex.count == __builtin_popcount(mask)) {
      ex.count = 0;
      ++ex.gen;
    } else {
      Exchange* e = &ex;  // std::map nodes do not move
      wait([e, gen] { return e->gen != gen; });
    }
  }

  [[noreturn]] void fail(const std::string& msg) { throw std::logic_error(msg); }

  std::function<void()> body_;
  std::vector<Fiber> fibers_;
#ifdef ATTNPILOT_EMU_FAST_SWITCH
  void* sched_sp_ = nullptr;  // the scheduler's stack pointer while a fiber runs
#else
  ucontext_t sched_{};
#endif
  int tid_ = 0;
  std::exception_ptr error_;
  uint64_t round_ = 0;  // scheduling rounds so far
  uint64_t rng_ = 0;    // the schedule's generator (xorshift64), seeded per block in run()
  int yielding_ = 0;    // threads in yield(): a round without progress is no deadlock then
  // Block barrier.
  int bar_count_ = 0;
  uint64_t bar_gen_ = 0;
  bool bar_or_ = false, bar_result_ = false;
  // Shuffles: a value slot per thread, and per warp one exchange per mask in use.
  struct Exchange {
    int count = 0;
    uint64_t gen = 0;
  };
  std::vector<uint64_t> slots_;
  std::vector<std::map<unsigned, Exchange>> exchanges_;

 public:
  /// __syncwarp(mask): the lanes of `mask` in the caller's warp meet.
  void warp_sync(unsigned mask) {
    check_in_mask(mask, "__syncwarp");
    warp_arrive(tid_ / 32, mask);
  }

  /// Warp-collective exchange (ldmatrix, mma.sync: cuda_emu_mma.h): each lane of `mask` in the
  /// caller's warp deposits `bytes` bytes at `mine`; once all have, use(lane_bytes) runs, where
  /// lane_bytes(l) points at lane l's deposit (l in `mask`); then all meet again before a
  /// deposit may be overwritten.
  template <typename F>
  void warp_exchange(unsigned mask, const void* mine, size_t bytes, F&& use) {
    check_in_mask(mask, "a warp collective");
    if (deposits_.size() != slots_.size()) deposits_.resize(slots_.size());
    auto& mine_slot = deposits_[static_cast<size_t>(tid_)];
    mine_slot.resize(bytes);
    std::memcpy(mine_slot.data(), mine, bytes);
    const int warp = tid_ / 32;
    warp_arrive(warp, mask);
    use([&](int l) -> const unsigned char* {
      if (l < 0 || l >= 32 || !(mask & (1u << l)) || warp * 32 + l >= size())
        fail("cuda_emu: a warp collective reads lane " + std::to_string(l) + " outside its mask");
      return deposits_[static_cast<size_t>(warp * 32 + l)].data();
    });
    warp_arrive(warp, mask);
  }

 private:
  void check_in_mask(unsigned mask, const char* what) {
    if (!(mask & (1u << (tid_ % 32))))
      fail(std::string("cuda_emu: ") + what + " called by lane " + std::to_string(tid_ % 32) +
           " outside its mask");
  }
  std::vector<std::vector<unsigned char>> deposits_;  // per thread, for the collectives

 public:
  /// Warpgroup-collective exchange (wgmma: cuda_emu_wgmma.h): like warp_exchange, among the 128
  /// threads tid / 128 == the caller's tid / 128 (a std::logic_error when the block does not hold
  /// all 128); lane_bytes(t) points at the deposit of thread t (0..127) of the warpgroup.
  template <typename F>
  void warpgroup_exchange(const void* mine, size_t bytes, F&& use) {
    const int group = tid_ / 128;
    if ((group + 1) * 128 > size())
      fail("cuda_emu: a warpgroup collective in a block of " + std::to_string(size()) +
           " threads: warpgroup " + std::to_string(group) + " is not 128 threads");
    if (deposits_.size() != slots_.size()) deposits_.resize(slots_.size());
    auto& mine_slot = deposits_[static_cast<size_t>(tid_)];
    mine_slot.resize(bytes);
    std::memcpy(mine_slot.data(), mine, bytes);
    group_arrive(group);
    use([&](int t) -> const unsigned char* {
      if (t < 0 || t >= 128)
        fail("cuda_emu: a warpgroup collective reads thread " + std::to_string(t) +
             " outside the warpgroup");
      return deposits_[static_cast<size_t>(group * 128 + t)].data();
    });
    group_arrive(group);
  }

  /// Lets the other threads run before this one goes on (it resumes in the next round): for
  /// operations after which the GPU gives other threads a chance to observe a state this
  /// thread is about to change (an mbarrier arrival, cuda_emu_wgmma.h).
  /// With max_rounds > 1 it sits out a pseudo-random 1..max_rounds rounds (the block's seeded
  /// generator): a slow thread, so others may get several steps ahead of it.
  void yield(int max_rounds = 1) {
    uint64_t rounds = 1;
    if (max_rounds > 1) {
      rng_ ^= rng_ << 13;
      rng_ ^= rng_ >> 7;
      rng_ ^= rng_ << 17;
      rounds += rng_ % static_cast<uint64_t>(max_rounds);
    }
    const uint64_t until = round_ + rounds;
    ++yielding_;
    wait([this, until] { return round_ >= until; });
    --yielding_;
  }

  /// Blocks the calling thread until until() holds, letting the others run (mbarriers and
  /// named barriers: cuda_emu_wgmma.h); when no thread can go on, a deadlock error.
  void wait_until(std::function<bool()> until) {
    if (!until()) wait(std::move(until));
  }

  /// Per-block state of an emulation layered on this one: one E (derived from Extension,
  /// constructible from Block&) per block, made on first use, destroyed with the block.
  struct Extension {
    virtual ~Extension() = default;
    /// Runs as thread `tid`'s body returns; a throw fails the block.
    virtual void thread_exit(int tid) { (void)tid; }
  };
  template <typename E>
  E& extension() {
    static const char key = 0;
    auto& slot = extensions_[&key];
    if (!slot) slot = std::make_unique<E>(*this);
    return static_cast<E&>(*slot);
  }

 private:
  void group_arrive(int group) {
    auto& ex = group_exchanges_[static_cast<size_t>(group)];
    const uint64_t gen = ex.gen;
    if (++ex.count == 128) {
      ex.count = 0;
      ++ex.gen;
    } else {
      Exchange* e = &ex;  // sized in the constructor: does not move
      wait([e, gen] { return e->gen != gen; });
    }
  }
  std::vector<Exchange> group_exchanges_;  // per warpgroup
  std::map<const void*, std::unique_ptr<Extension>> extensions_;
};

/// Runs body() as one thread block of `threads` threads.
inline void run_block(int threads, std::function<void()> body) {
  Block b(threads, std::move(body));
  b.run();
}

}  // namespace attnpilot::cuda_emu

#define threadIdx               \
  (::attnpilot::cuda_emu::Dim3{ \
      static_cast<unsigned>(::attnpilot::cuda_emu::Block::current_block()->tid()), 0, 0})
#define blockDim                \
  (::attnpilot::cuda_emu::Dim3{ \
      static_cast<unsigned>(::attnpilot::cuda_emu::Block::current_block()->size()), 1, 1})

inline void __syncthreads() { ::attnpilot::cuda_emu::Block::current_block()->barrier(0); }
inline int __syncthreads_or(int pred) {
  return ::attnpilot::cuda_emu::Block::current_block()->barrier(pred);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int off) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles carry at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = ::attnpilot::cuda_emu::Block::current_block()->shuffle_xor(mask, bits, off);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
/// Fibers run one at a time: plain read-modify-write is atomic.
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  const unsigned long long old = *p;
  if (v > old) *p = v;
  return old;
}
inline int atomicMax(int* p, int v) {
  const int old = *p;
  if (v > old) *p = v;
  return old;
}
inline int __float_as_int(float f) {
  int r;
  std::memcpy(&r, &f, sizeof r);
  return r;
}
inline float __int_as_float(int i) {
  float r;
  std::memcpy(&r, &i, sizeof r);
  return r;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}

// Attention kernels (attention/cuda/*_block.cuh): vector types, bit casts, read-only loads,
// __syncwarp.
struct uint4 {
  unsigned x, y, z, w;
};
struct float2 {
  float x, y;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __uint_as_float(unsigned u) {
  float r;
  std::memcpy(&r, &u, sizeof r);
  return r;
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::attnpilot::cuda_emu::Block::current_block()->warp_sync(mask);
}

// The estimator's selection and score kernels (attention/cuda/select_block.cuh,
// block_scores_block.cuh): more warp collectives, integer atomics and intrinsics.
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles carry at most 8 bytes");
  T r = v;
  ::attnpilot::cuda_emu::Block::current_block()->warp_exchange(
      mask, &v, sizeof v,
      [&](auto lane_bytes) { std::memcpy(&r, lane_bytes(src % 32), sizeof r); });
  return r;
}
/// Lane l gets lane l - delta's value (its own when l < delta); width 32.
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta) {
  static_assert(sizeof(T) <= 8, "cuda_emu: shuffles carry at most 8 bytes");
  const int lane = static_cast<int>(threadIdx.x % 32);
  T r = v;
  ::attnpilot::cuda_emu::Block::current_block()->warp_exchange(
      mask, &v, sizeof v, [&](auto lane_bytes) {
        if (lane >= static_cast<int>(delta))
          std::memcpy(&r, lane_bytes(lane - static_cast<int>(delta)), sizeof r);
      });
  return r;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  const int mine = pred != 0;
  unsigned r = 0;
  ::attnpilot::cuda_emu::Block::current_block()->warp_exchange(
      mask, &mine, sizeof mine, [&](auto lane_bytes) {
        for (int l = 0; l < 32; ++l) {
          if (!(mask & (1u << l))) continue;
          int p;
          std::memcpy(&p, lane_bytes(l), sizeof p);
          if (p) r |= 1u << l;
        }
      });
  return r;
}
/// The sum of v over the lanes of mask, to every one of them (REDUX.SUM).
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
  unsigned r = 0;
  ::attnpilot::cuda_emu::Block::current_block()->warp_exchange(
      mask, &v, sizeof v, [&](auto lane_bytes) {
        for (int l = 0; l < 32; ++l) {
          if (!(mask & (1u << l))) continue;
          unsigned x;
          std::memcpy(&x, lane_bytes(l), sizeof x);
          r += x;
        }
      });
  return r;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicOr(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old | v;
  return old;
}
inline unsigned __float_as_uint(float f) {
  unsigned r;
  std::memcpy(&r, &f, sizeof r);
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
/// IEEE double operations round to nearest even on the host as on the device.
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dsub_rn(double a, double b) { return a - b; }
