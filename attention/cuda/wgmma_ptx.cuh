#pragma once
/// Inline-PTX wrappers of Hopper's warpgroup tensor-core instructions (sm_90a), for the
/// wgmma block-sparse attention kernel (block_sparse_wgmma_block.cuh):
///
///   smem_offset(p)                  the shared-state-space address of a pointer into shared memory
///   sw128_desc(p, lbo, sbo)         a wgmma shared-memory matrix descriptor, 128-byte swizzle
///   desc_advance(desc, bytes)       that descriptor's start address moved by `bytes`
///   wgmma_fence / _commit / _wait<N>   wgmma.fence / commit_group / wait_group N
///   fence_proxy_async()             fence.proxy.async.shared::cta (generic-proxy writes, such as
///                                   cp.async and st.shared, made visible to wgmma's reads)
///   wgmma_ss<T, N>(d, a, b, acc)    wgmma.mma_async m64nNk16 f32 += T·T, A and B from shared
///                                   memory, both K-major (imm-trans-a = imm-trans-b = 0)
///   wgmma_rs<T, N, kMnB>(d, a, b, acc)  the same with A from registers, B MN-major (kMnB, the
///                                   default: imm-trans-b = 1) or K-major (imm-trans-b = 0)
///   mbar_init / mbar_arrive / mbar_wait, named_bar_sync / _arrive, setmaxnreg_dec / _inc,
///   cp_async_mbar_arrive(bar) (cp.async.mbarrier.arrive.noinc), with mma_ptx.cuh's
///   cp_async_wait_group<N>: the warp-specialised body's synchronisation
///
/// Layouts (PTX ISA "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"; w = warp within
/// the warpgroup, g = lane / 4, c = lane % 4):
///   D 64×N f32, d[N/2]: d[4i + e] is row 16w + g + 8·(e / 2), column 8i + 2c + (e % 2)
///   A 64×16 in registers, a[4]: rows 16w + g (a[0], a[2]) and 16w + g + 8 (a[1], a[3]); columns
///     2c, 2c+1 (a[0], a[1]) and 2c+8, 2c+9 (a[2], a[3]); two T per register, the lower column in
///     the low half (the mma.sync m16n8k16 A fragment of each warp's 16 rows)
///   shared operands, 128-byte swizzle: rows of 128 bytes (64 elements) in 1024-byte atoms of 8
///     rows, the 16-byte chunk j of row r stored at chunk j ^ (r % 8) (address bits 4-6 XOR bits
///     7-9; atoms 1024-byte aligned). K-major (A: M×K, B: N×K, K contiguous): element (mn, k) of
///     a descriptor at byte s sits at s + (mn / 8)·SBO + (mn % 8)·128 + 2k, then swizzled (LBO
///     unused; k < 16, s advanced 32 bytes per 16-wide k step). MN-major (B: K×N, N contiguous):
///     element (k, n) at s + (n / 64)·LBO + 2·(n % 64) + (k / 8)·SBO + (k % 8)·128, swizzled.
///
/// Under ATTNPILOT_CUDA_EMU the same names come from tests/cuda_emu/cuda_emu_wgmma.h: a
/// warpgroup-collective emulation with the layouts above, offsets relative to a registered
/// shared-memory window, and results held back until the wgmma_wait that covers them.
#ifdef ATTNPILOT_CUDA_EMU
#include "tests/cuda_emu/cuda_emu_wgmma.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>

#include "attention/cuda/mma_ptx.cuh"

namespace attnpilot::attention::cuda::ptx {

#ifdef ATTNPILOT_CUDA_EMU

using ::attnpilot::cuda_emu::wgmma::cp_async_mbar_arrive;
using ::attnpilot::cuda_emu::wgmma::fence_proxy_async;
using ::attnpilot::cuda_emu::wgmma::mbar_arrive;
using ::attnpilot::cuda_emu::wgmma::mbar_init;
using ::attnpilot::cuda_emu::wgmma::mbar_wait;
using ::attnpilot::cuda_emu::wgmma::named_bar_arrive;
using ::attnpilot::cuda_emu::wgmma::named_bar_sync;
using ::attnpilot::cuda_emu::wgmma::setmaxnreg_dec;
using ::attnpilot::cuda_emu::wgmma::setmaxnreg_inc;
using ::attnpilot::cuda_emu::wgmma::smem_offset;
using ::attnpilot::cuda_emu::wgmma::wgmma_commit;
using ::attnpilot::cuda_emu::wgmma::wgmma_fence;
using ::attnpilot::cuda_emu::wgmma::wgmma_rs;
using ::attnpilot::cuda_emu::wgmma::wgmma_ss;
using ::attnpilot::cuda_emu::wgmma::wgmma_wait;

#else

/// The shared-state-space byte address of a generic pointer into this CTA's shared memory.
__device__ __forceinline__ uint32_t smem_offset(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/// wgmma.fence.sync.aligned: orders this warpgroup's register accesses before the next wgmma.
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
/// wgmma.commit_group.sync.aligned: closes the group of wgmma issued since the last commit.
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
/// wgmma.wait_group.sync.aligned N: waits until at most N committed groups are in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/// fence.proxy.async.shared::cta: this thread's earlier generic-proxy shared-memory writes
/// become visible to the async proxy (wgmma operand reads) after the next barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

/// mbarrier.init: `count` arrivals complete a phase.
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_offset(bar)), "r"(count)
               : "memory");
}
/// mbarrier.arrive (release at CTA scope).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_offset(bar)) : "memory");
}
/// Waits (acquire) until the phase with this parity has completed.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_offset(bar)),
      "r"(parity)
      : "memory");
}
/// bar.sync id, count: waits until `count` threads (this one included) arrived at barrier id.
__device__ __forceinline__ void named_bar_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
/// bar.arrive id, count: counts this thread at barrier id without waiting.
__device__ __forceinline__ void named_bar_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
/// setmaxnreg.dec / .inc: this warpgroup's registers per thread become N.
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
/// cp.async.mbarrier.arrive.noinc: one arrival on `bar`, made when every cp.async this thread
/// issued before it has landed; the thread goes on at once (the barrier's count includes it).
__device__ __forceinline__ void cp_async_mbar_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_offset(bar))
               : "memory");
}

// The accumulator operand lists: N/2 "+f" registers d[0..N/2-1].
#define ATTNPILOT_D8(i)                                                                       \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
#define ATTNPILOT_D32(i) \
  ATTNPILOT_D8(i), ATTNPILOT_D8(i + 8), ATTNPILOT_D8(i + 16), ATTNPILOT_D8(i + 24)
// PTX register lists {%0, ..., %31} and {%0, ..., %63}.
#define ATTNPILOT_LIST32                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define ATTNPILOT_LIST64                                                                        \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

template <typename T>
struct WgmmaType;
template <>
struct WgmmaType<__nv_bfloat16> {
  static constexpr bool kBf16 = true;
};
template <>
struct WgmmaType<__half> {
  static constexpr bool kBf16 = false;
};

/// d (+)= A·Bᵀ for m64nNk16: A (64×16) and B (N×16) K-major in shared memory; acc = false
/// overwrites d (scale-d = 0). N = 64 or 128.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t a, uint64_t b, bool acc) {
  static_assert(N == 64 || N == 128, "wgmma_ss: N is 64 or 128");
  const int scale_d = acc ? 1 : 0;
  if constexpr (N == 128) {
    if constexpr (WgmmaType<T>::kBf16)
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ATTNPILOT_LIST64
          ", %64, %65, p, 1, 1, 0, 0;\n}\n"
          : ATTNPILOT_D32(0), ATTNPILOT_D32(32)
          : "l"(a), "l"(b), "r"(scale_d));
    else
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ATTNPILOT_LIST64
          ", %64, %65, p, 1, 1, 0, 0;\n}\n"
          : ATTNPILOT_D32(0), ATTNPILOT_D32(32)
          : "l"(a), "l"(b), "r"(scale_d));
  } else {
    if constexpr (WgmmaType<T>::kBf16)
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " ATTNPILOT_LIST32
          ", %32, %33, p, 1, 1, 0, 0;\n}\n"
          : ATTNPILOT_D32(0)
          : "l"(a), "l"(b), "r"(scale_d));
    else
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " ATTNPILOT_LIST32
          ", %32, %33, p, 1, 1, 0, 0;\n}\n"
          : ATTNPILOT_D32(0)
          : "l"(a), "l"(b), "r"(scale_d));
  }
}

/// d (+)= A·B for m64nNk16: A (64×16) in registers, B (16×N) in shared memory, MN-major
/// (kMnB, imm-trans-b = 1) or K-major (B stored N×16 as wgmma_ss's, imm-trans-b = 0). N = 64
/// or 128.
template <typename T, int N, bool kMnB = true>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b,
                                         bool acc) {
  static_assert(N == 64 || N == 128, "wgmma_rs: N is 64 or 128");
  const int scale_d = acc ? 1 : 0;
  constexpr int kTransB = kMnB ? 1 : 0;
  if constexpr (N == 128) {
    if constexpr (WgmmaType<T>::kBf16)
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " ATTNPILOT_LIST64
          ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
          : ATTNPILOT_D32(0), ATTNPILOT_D32(32)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(kTransB));
    else
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 " ATTNPILOT_LIST64
          ", {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
          : ATTNPILOT_D32(0), ATTNPILOT_D32(32)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(kTransB));
  } else {
    if constexpr (WgmmaType<T>::kBf16)
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " ATTNPILOT_LIST32
          ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
          : ATTNPILOT_D32(0)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(kTransB));
    else
      asm volatile(
          "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " ATTNPILOT_LIST32
          ", {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
          : ATTNPILOT_D32(0)
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(scale_d), "n"(kTransB));
  }
}

#undef ATTNPILOT_D8
#undef ATTNPILOT_D32
#undef ATTNPILOT_LIST32
#undef ATTNPILOT_LIST64

#endif  // ATTNPILOT_CUDA_EMU

/// A shared-memory matrix descriptor for wgmma with the 128-byte swizzle (layout type 1 in bits
/// 62-63): start address, leading and stride byte offsets, each in 16-byte units (bits 0-13,
/// 16-29, 32-45); base offset 0 (atoms 1024-byte aligned).
__host__ __device__ __forceinline__ uint64_t sw128_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                                        uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_addr >> 4) & 0x3fffu) |
         static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16 |
         static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32 | uint64_t(1) << 62;
}

/// The descriptor `desc` moved `bytes` (a multiple of 16) further into shared memory: the start
/// address field is the low 14 bits and shared addresses stay below 2^18 bytes, so the field
/// never carries into the LBO bits; one 32-bit add on the low word (CUTLASS's descriptor
/// iterator does the same) instead of rebuilding the descriptor per k-step.
__host__ __device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) {
  const uint32_t lo = static_cast<uint32_t>(desc) + (bytes >> 4);
  return (desc & 0xffffffff00000000ull) | lo;
}

}  // namespace attnpilot::attention::cuda::ptx
