#pragma once
/// Raw launcher of the block-sparse flash-attention forward kernel (block_sparse_attention.cu).
/// No LibTorch types here, so nvcc never compiles the LibTorch headers; cuda_backend.cpp is the
/// tensor-level code (checks, layouts, streams, the Backend interface).
///
///   q [B, Hq, N, D] ─┐  one CTA per (128- or 64-query tile, query head, batch entry)
///   k [B, Hkv, M, D] ├─► for each key block listed in the CSR row of (b, h, query block):
///   v [B, Hkv, M, D] ┘     64-key tiles: S = scale·QKᵀ, online softmax (fp32), O += P V
///                      ──► out [B, Hq, N, D] (contiguous), rows that see no key are zero
#ifndef ATTNPILOT_CUDA_EMU  // tests/cuda_emu/cuda_emu.h declares the two CUDA types used here
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace attnpilot::attention::cuda {

/// Element type of q, k, v and out (fp32 accumulation in every case).
enum class ElemType { kBFloat16, kFloat16 };

/// Which kernel runs a launch. kAuto: on compute capability 9.0 devices when
/// block_sparse_wgmma_supports(), the warp-specialised wgmma kernel with overlap and
/// asynchronous arrivals (kWgmmaWsAsync, block_sparse_wgmma.cu, sm_90a: the fastest or within
/// a few percent of it on every row of the H100 table, bench/RESULTS.md), else the mma.sync
/// kernel (any sm_90-compatible device, blocks of 64 too). The others force one (the benchmarks and
/// tests compare them; bench/RESULTS.md has their H100 times); forcing a wgmma kernel where it
/// cannot run is cudaErrorInvalidValue:
///   kWgmma              every thread loads, the CTA meets at a barrier per tile
///   kWgmmaWs            warp-specialised: a producer warpgroup, mbarrier stages, two consumer
///                       warpgroups taking turns
///   kWgmmaWsOverlap     that, with each consumer's softmax of a tile beside its P V of the last
///   kWgmmaWsAsync       that, with the producer signalling stages by cp.async.mbarrier.arrive
///                       (no waits or fences in the producer; the consumers fence after waits)
///   kWgmmaWsPersistent  that, with one CTA per SM over all (query tile, head, batch) items,
///                       the next item's loads overlapping the current item's last tiles and
///                       output
enum class BlockSparseKernel {
  kAuto,
  kMmaSync,
  kWgmma,
  kWgmmaWs,
  kWgmmaWsOverlap,
  kWgmmaWsAsync,
  kWgmmaWsPersistent
};

/// One launch. Tensors are given by pointer and element strides (the last dimension is
/// contiguous); pointers 16-byte aligned and the strides multiples of 8 elements.
struct BlockSparseLaunch {
  const void* q = nullptr;          ///< [batch, heads, n, d]
  const void* k = nullptr;          ///< [batch, kv_heads, m, d]
  const void* v = nullptr;          ///< [batch, kv_heads, m, d]
  void* out = nullptr;              ///< [batch, heads, n, d], contiguous; every element written
  int64_t q_stride[3] = {0, 0, 0};  ///< element strides of q over (batch, head, row)
  int64_t k_stride[3] = {0, 0, 0};
  int64_t v_stride[3] = {0, 0, 0};
  int batch = 0, heads = 0, kv_heads = 0;  ///< heads a multiple of kv_heads (GQA)
  int64_t n = 0, m = 0;                    ///< queries, keys (>= 1)
  int d = 0;                               ///< head dim of q, k and v: 64 or 128
  int64_t q_offset = 0;                    ///< query i sits at key position q_offset + i (>= 0)
  /// CSR block lists on the device (block_mask.h's layout over batch x heads x q_blocks
  /// rows); both null: every key block is listed (dense, with the causal cut-off).
  const int64_t* row_ptr = nullptr;
  const int64_t* col_idx = nullptr;
  int64_t q_blocks = 0, k_blocks = 0;
  int block_size = 64;  ///< a multiple of 64 (the kernel's tile)
  float scale = 0;      ///< softmax(scale · q kᵀ)
  bool causal = false;  ///< key j visible to query i only when j <= q_offset + i
  /// Streaming window (window > 0): key j is also hidden from query position p when
  /// j >= sinks and j <= p - window (the CPU backend's rule).
  int64_t sinks = 0, window = 0;
  BlockSparseKernel kernel = BlockSparseKernel::kAuto;
};

/// Keys per step of the kernel's key loop, and the granularity of block sizes. A CTA takes 128
/// queries when the block size is a multiple of 128 (or there are no block lists), else 64.
inline constexpr int kBlockSparseTile = 64;

/// Whether the kernel handles head dim d (q, k and v alike) with blocks of block_size.
bool block_sparse_kernel_supports(int d, int block_size);

/// Whether the wgmma kernel takes this launch's shape (d 64 or 128; block_size a multiple of
/// 128, or no CSR lists); the device must also be compute capability 9.0.
inline bool block_sparse_wgmma_supports(const BlockSparseLaunch& p) {
  return (p.d == 64 || p.d == 128) && (p.row_ptr == nullptr || p.block_size % 128 == 0);
}

/// The wgmma kernels' launcher (block_sparse_wgmma.cu; p.kernel picks one, kAuto
/// kWgmmaWsAsync); launch_block_sparse_attention checks the arguments and the device before
/// calling it.
cudaError_t launch_block_sparse_wgmma(const BlockSparseLaunch& p, ElemType type,
                                      cudaStream_t stream, const char** failed_call);

/// Whether the current device runs sm_90a code (compute capability 9.0 exactly): *yes, or the
/// failing CUDA call's error with its name in *failed_call.
cudaError_t device_is_sm90(bool* yes, const char** failed_call);

/// Dynamic shared memory of one CTA for head dim d, in bytes (the larger, 128-query CTA).
int64_t block_sparse_shared_bytes(int d);

/// Launches on `stream`. Returns cudaSuccess, or the error of the first failing CUDA call with
/// that call's name in *failed_call (cudaErrorInvalidValue for arguments outside the kernel's
/// range, named likewise).
cudaError_t launch_block_sparse_attention(const BlockSparseLaunch& p, ElemType type,
                                          cudaStream_t stream, const char** failed_call);

}  // namespace attnpilot::attention::cuda
