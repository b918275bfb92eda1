// Block-sparse flash-attention forward (FlashAttention-2 style), bf16/fp16 in, fp32
// accumulation, tensor cores through inline-PTX mma.sync.m16n8k16, S and P kept in registers.
//
// Where the code lives: the CTA body is block_sparse::fwd_block (block_sparse_block.cuh), its
// inline PTX (cp.async, ldmatrix, mma.sync, ex2.approx) the wrappers of mma_ptx.cuh; this file
// holds the __global__ wrapper and the launcher. CI runs the body on the CPU through the CUDA
// emulation (tests/cuda_emu, whose cuda_emu_mma.h emulates the PTX with the same fragment
// layouts): tests/attention/attention_emu_test.cpp, against the CPU backend. Moving the body
// there left the SASS of every instantiation unchanged (cuobjdump -sass, 2026-12-05); the tile
// list and row mask it now shares with the wgmma kernels (tile_list.cuh) measured as before on
// an H100 once the row mask was made branch-free (2026-12-06: 39.1 ms at 32k all blocks). On
// H100/H200 the launcher sends blocks of multiples of 128 to the wgmma kernel
// (block_sparse_wgmma.cu); this one serves blocks of 64 and other GPUs.
//
// One CTA of 4 warps per (query tile, query head, batch entry). The query tile is kBM = 64·kM
// rows: kM = 2 (128 rows, each warp 32 rows as two 16-row m-tiles) when the whole CTA lies in
// one query block (block size a multiple of 128, or no CSR lists), kM = 1 (64 rows) for
// blocks of 64. Keys go in tiles of kBN = 64.
//
//   Q tile ──cp.async──► smem ──ldmatrix──► A fragments (kept in registers when kM·d <= 128)
//   K, V tile t+1 ──cp.async (16 B, zero-fill past M)──► the other smem stage, while tile t runs
//   for each visited 64-key tile (CSR blocks split in 64-key tiles, whole-tile skips), in
//   sub-tiles of 32 keys for kM = 2, d = 128 (registers), else the whole tile; a warp skips a
//   causal sub-tile wholly in its own queries' future:
//     S = Q Kᵀ     mma.sync; K by ldmatrix (non-transposed: K rows are Bᵀ columns)
//     softmax      S in registers: scale, mask (only tiles that need it), row max over the
//                  lane quad (__shfl_xor 1, 2), P = 2^(S - m), per-lane partial row sums l
//     O = O·α      only when a row's lazily moved reference max m changed
//     O += P V     P's C-fragments packed pairwise to bf16x2/f16x2 are exactly the A fragments
//                  of the next mma (the FA2 identity); V by ldmatrix.trans
//   out = O / l ──► smem (the warp's own Q rows) ──► 16-byte coalesced stores; l = 0 gives 0.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = lane % 4):
//   A 16×16 (a0..a3): rows g, g+8 × cols 2c, 2c+1 (a0, a1) and 2c+8, 2c+9 (a2, a3)
//   B 16×8  (b0, b1): rows 2c, 2c+1 (b0) and 2c+8, 2c+9 (b1) × col g
//   C 16×8  (c0..c3): row g (c0, c1) and g+8 (c2, c3) × cols 2c, 2c+1
// so the C fragments of S for keys 16j..16j+7 and 16j+8..16j+15 are the A fragment of P for
// the k-slice j, once packed.
//
// Lazy rescaling. A row's reference max m moves only when a tile's row max exceeds it by more
// than 8 (log2 units), so P <= 2^8 (no overflow in fp32, bf16 or fp16; rounding of P relative
// to its magnitude does not depend on it) and softmax, invariant to the reference, is
// unchanged. Most tiles then skip the O·α multiply.
//
// Masking. A tile is skipped when no query of the CTA can see any of its keys (past M, wholly in
// the causal future, or wholly left of every query's streaming window): skipping equals adding
// zero to the online softmax. Tiles wholly inside the causal region (and, with a window, wholly
// inside every query's window or among the sinks) skip the per-element mask work; the rest test
// each (query, key) pair with the CPU backend's rule. The next visited tile is found before the
// current one is computed, so its loads overlap the math.
//
// Rows without keys. A CSR row with no listed block (or a query whose listed keys are all
// masked) gives exact zeros (l = 0), the contract of Backend::block_sparse for every backend.
//
// Grid: x = query tiles in reverse order (the longest causal rows start first, the short ones
// fill the tail), y = heads, z = batch; one head's query tiles are adjacent, so its K and V
// (16 MB at L = 32k, d = 128) are read from HBM about once and then from the 50 MB L2.
//
// Operation count and floor (L = 32k, 32 heads, d = 128, causal, all blocks): QKᵀ and PV are
// 4·d FLOPs per visible (query, key) pair, 4·128·32·(32k²/2) = 8.8 TFLOP, 8.9 ms at the H200's
// ~990 TFLOP/s dense bf16 (wgmma; cuDNN measured 15.2 ms, ~580 TFLOP/s). Bytes (Q, K, V read
// once, O written once) are 4·32·32k·128·2 = 1.1 GB, 0.22 ms at 4.8 TB/s: compute-bound. At
// density δ both scale with δ (plus the per-query-tile Q and O traffic, 0.5 GB at any δ).
// Expected rate. mma.sync on Hopper issues at about 2/3 of the wgmma rate (FA2, the same
// scheme, runs 330-370 TFLOP/s forward at d = 128 on an H100), ~2700 FLOP/clk per SM. Per
// 64-key tile a warp of 32 rows (kM = 2, d = 128) reads by ldmatrix K 16 KB + V 16 KB + Q 2·8 KB
// (Q once per 32-key sub-tile) for 2·32·64·128·2 = 1.05 MFLOP, 22 FLOP/B: at 128 B/clk per SM
// shared memory allows ~2800 FLOP/clk, about the mma.sync rate (16-row warps would give 16
// FLOP/B, 2048 FLOP/clk: shared-memory-bound, hence 32 rows). exp2 (MUFU, 16/clk per SM):
// 128·64 per CTA tile, ~512 clk against ~1550 clk of mma, on another pipe. Expected 300-380
// TFLOP/s: all blocks at 32k 8.8 TFLOP / 340 TFLOP/s = ~26 ms, so the 80%-of-cuDNN target
// (cuDNN 15.2 ms) is out of reach of mma.sync; it needs wgmma (sm_90a) with producer/consumer
// warpgroups. 10% of blocks at 32k (~0.9 TFLOP listed): ~2.6 ms; 5% at 128k (~7.4 TFLOP):
// ~22 ms.
//
// Resources (ptxas 13.0, sm_90, no spills, 0-byte stack), shared memory (kBM + 4·kBN)·(d + 8)·2
// bytes with padded rows (d + 8 elements: consecutive rows start 16 bytes apart modulo 128, so
// each 8-row ldmatrix phase covers all 32 banks once; the CPU emulation counts 0 conflicted
// phases): d = 128, kM = 2: 255 registers, 102 KB, 2 CTAs per SM; d = 128, kM = 1: 220, 85 KB,
// 2 per SM; d = 64, kM = 2: 255, 54 KB, 2 per SM; d = 64, kM = 1: 135, 45 KB, 3 per SM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/block_sparse_block.cuh"
#include "attention/cuda/block_sparse_kernels.h"

namespace attnpilot::attention::cuda {
namespace {

using block_sparse::kBN;
using block_sparse::kThreads;
using block_sparse::kWarps;
using block_sparse::shared_bytes;

// The body is block_sparse::fwd_block (block_sparse_block.cuh), which the CPU emulation tests
// also run.
template <typename T, int D, int kM>
__global__ void __launch_bounds__(kThreads) block_sparse_fwd_kernel(BlockSparseLaunch p) {
  extern __shared__ __align__(128) unsigned char smem[];
  block_sparse::fwd_block<T, D, kM>(p, smem, gridDim.x - 1 - blockIdx.x, blockIdx.y, blockIdx.z);
}

// ---- launcher (host) ----

template <typename T, int D, int kM>
cudaError_t launch_typed(const BlockSparseLaunch& p, cudaStream_t stream,
                         const char** failed_call) {
  auto kernel = block_sparse_fwd_kernel<T, D, kM>;
  const int64_t bytes = shared_bytes(D, kM);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  if (e != cudaSuccess) {
    *failed_call = "cudaFuncSetAttribute(block_sparse_fwd_kernel, MaxDynamicSharedMemorySize)";
    return e;
  }
  constexpr int kBM = 16 * kM * kWarps;
  const dim3 grid(static_cast<unsigned>((p.n + kBM - 1) / kBM), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, static_cast<size_t>(bytes), stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "block_sparse_fwd_kernel<<<(query tiles, heads, batch), 128, shared bytes>>>";
    return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_for_type(const BlockSparseLaunch& p, cudaStream_t stream,
                            const char** failed_call) {
  // 128-row CTAs when a CTA stays inside one query block (or there are no blocks).
  const bool wide = block_sparse::m_tiles_for(p) == 2;
  if (p.d == 64)
    return wide ? launch_typed<T, 64, 2>(p, stream, failed_call)
                : launch_typed<T, 64, 1>(p, stream, failed_call);
  return wide ? launch_typed<T, 128, 2>(p, stream, failed_call)
              : launch_typed<T, 128, 1>(p, stream, failed_call);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool strides_ok(const int64_t* s) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

}  // namespace

cudaError_t device_is_sm90(bool* yes, const char** failed_call) {
  int dev = 0, major = 0, minor = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
  if (e != cudaSuccess) {
    *failed_call = "cudaGetDevice / cudaDeviceGetAttribute(compute capability)";
    return e;
  }
  *yes = major == 9 && minor == 0;
  return cudaSuccess;
}

bool block_sparse_kernel_supports(int d, int block_size) {
  return (d == 64 || d == 128) && block_size >= kBN && block_size % kBN == 0;
}

int64_t block_sparse_shared_bytes(int d) { return shared_bytes(d, 2); }

cudaError_t launch_block_sparse_attention(const BlockSparseLaunch& p, ElemType type,
                                          cudaStream_t stream, const char** failed_call) {
  const bool csr = p.row_ptr != nullptr;
  const bool shape_ok =
      p.batch >= 1 && p.batch <= 65535 && p.heads >= 1 && p.heads <= 65535 && p.kv_heads >= 1 &&
      p.heads % p.kv_heads == 0 && p.n >= 1 && p.m >= 1 && (p.n + kBN - 1) / kBN <= 0x7fffffff &&
      (p.m + kBN - 1) / kBN <= 0x7fffffff && p.q_offset >= 0 && p.sinks >= 0 && p.window >= 0;
  // Without CSR lists every tile is visited; with them the block grid must fit n x m. col_idx
  // may be null only when nothing is listed (row_ptr all zero; the kernel never reads it).
  const bool mask_ok = !csr || (p.q_blocks == (p.n + p.block_size - 1) / p.block_size &&
                                p.k_blocks == (p.m + p.block_size - 1) / p.block_size);
  if (!block_sparse_kernel_supports(p.d, p.block_size) || !shape_ok || !mask_ok || p.q == nullptr ||
      p.k == nullptr || p.v == nullptr || p.out == nullptr || !aligned16(p.q) || !aligned16(p.k) ||
      !aligned16(p.v) || !aligned16(p.out) || !strides_ok(p.q_stride) || !strides_ok(p.k_stride) ||
      !strides_ok(p.v_stride) || !std::isfinite(p.scale)) {
    *failed_call = "launch_block_sparse_attention (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  if (p.kernel != BlockSparseKernel::kMmaSync) {
    bool sm90 = false;
    const cudaError_t e = device_is_sm90(&sm90, failed_call);
    if (e != cudaSuccess) return e;
    const bool wgmma = sm90 && block_sparse_wgmma_supports(p);
    // kAuto takes the warp-specialised kernel with overlap and asynchronous arrivals
    // (block_sparse_kernels.h).
    if (wgmma) return launch_block_sparse_wgmma(p, type, stream, failed_call);
    if (p.kernel != BlockSparseKernel::kAuto) {
      *failed_call = sm90 ? "launch_block_sparse_attention (the wgmma kernel needs blocks of a "
                            "multiple of 128)"
                          : "launch_block_sparse_attention (the wgmma kernel needs a compute "
                            "capability 9.0 device)";
      return cudaErrorInvalidValue;
    }
  }
  if (type == ElemType::kBFloat16) return launch_for_type<__nv_bfloat16>(p, stream, failed_call);
  return launch_for_type<__half>(p, stream, failed_call);
}

}  // namespace attnpilot::attention::cuda
