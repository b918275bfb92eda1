#pragma once
/// Inline-PTX wrappers of the attention kernels' warp-level primitives (block_sparse_block.cuh):
/// cp.async (16 bytes, zero fill; commit, wait_group N, wait_all), ldmatrix x4 (plain and
/// .trans), mma.sync m16n8k16 row.col with fp32 accumulators (bf16 and fp16 inputs) and
/// ex2.approx; for the estimator's sampled-row scores (block_scores_block.cuh) cvt.rna.tf32.f32
/// and mma.sync m16n8k8 row.col tf32. Each wrapper is one PTX instruction, so the kernels' SASS
/// does not depend on where they are defined.
///
/// Under ATTNPILOT_CUDA_EMU (tests/cuda_emu/cuda_emu.h, the CPU emulation the tests run the
/// kernel bodies in) the same names come from tests/cuda_emu/cuda_emu_mma.h instead: the warp
/// collectives exchange fragments among the 32 emulated lanes with the PTX ISA's layouts, cp.async
/// is a plain copy, ex2.approx is exp2f with flush to zero.
#ifdef ATTNPILOT_CUDA_EMU
#include "tests/cuda_emu/cuda_emu_mma.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>

namespace attnpilot::attention::cuda::ptx {

#ifdef ATTNPILOT_CUDA_EMU

using ::attnpilot::cuda_emu::mma::cp_async_16;
using ::attnpilot::cuda_emu::mma::cp_async_commit;
using ::attnpilot::cuda_emu::mma::cp_async_wait_all;
using ::attnpilot::cuda_emu::mma::cp_async_wait_group;
using ::attnpilot::cuda_emu::mma::exp2_approx;
using ::attnpilot::cuda_emu::mma::ldmatrix_x4;
using ::attnpilot::cuda_emu::mma::ldmatrix_x4_trans;
using ::attnpilot::cuda_emu::mma::mma_16816;
using ::attnpilot::cuda_emu::mma::mma_tf32;
using ::attnpilot::cuda_emu::mma::to_tf32;

#else

/// The shared-memory address (state space .shared) of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

/// 16 bytes global -> shared, asynchronous; !valid writes 16 zero bytes (src-size 0 reads
/// nothing, src must still be a valid address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
               "r"(src_size)
               : "memory");
}
/// Closes this thread's group of cp.async operations issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
/// cp.async.wait_group N: all but this thread's N most recent cp.async groups have landed.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
/// Waits until every cp.async group this thread committed has landed.
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

/// Four 8×8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, r[i] is matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
/// ldmatrix_x4 with each 8×8 matrix transposed.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

/// d = a·b + d, m16n8k16, fp32 accumulators; T (__nv_bfloat16 or __half) is the input type.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// 2^x (MUFU.EX2; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// x rounded to tf32 (10 mantissa bits, to nearest, ties away from zero), as a 32-bit pattern.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}
/// c += a·b for one m16n8k8 tf32 tile (PTX fragment layout: groupID g = lane/4, tig = lane%4;
/// a0 (g, tig), a1 (g+8, tig), a2 (g, tig+4), a3 (g+8, tig+4); b0 (k tig, n g), b1 (k tig+4, n g);
/// c0 (g, 2tig), c1 (g, 2tig+1), c2 (g+8, 2tig), c3 (g+8, 2tig+1)).
__device__ __forceinline__ void mma_tf32(float c[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#endif  // ATTNPILOT_CUDA_EMU

}  // namespace attnpilot::attention::cuda::ptx
