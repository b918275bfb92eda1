// The Hopper block-sparse flash-attention forward kernel (wgmma, sm_90a): the __global__
// wrapper of block_sparse_wgmma::fwd_block (block_sparse_wgmma_block.cuh, where the algorithm,
// layouts and synchronisation are described) and its launcher. This file alone is compiled for
// compute_90a/sm_90a (attention/CMakeLists.txt); launch_block_sparse_attention
// (block_sparse_attention.cu) calls it on compute capability 9.0 devices for the shapes it
// supports and keeps the mma.sync kernel for the rest.
//
// Operation count and floor as for the mma.sync kernel (block_sparse_attention.cu): 4·d FLOPs
// per visible (query, key) pair, 8.8 TFLOP at L = 32k, 32 heads, d = 128, causal, all blocks,
// 8.9 ms at ~990 TFLOP/s dense bf16. wgmma issues at the full tensor-core rate where mma.sync
// reached ~230 TFLOP/s; this first wgmma kernel has no producer warpgroup and no ping-pong
// between its two warpgroups (each waits for its S before the softmax), so the tensor cores
// idle during softmax: FlashAttention-3's ablation puts such a kernel near 550-600 TFLOP/s of
// its ~660 at d = 128.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "block_sparse_wgmma.cu needs the sm_90a target (-gencode=arch=compute_90a,code=sm_90a)"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/block_sparse_wgmma_block.cuh"

namespace attnpilot::attention::cuda {
namespace {

namespace bsw = block_sparse_wgmma;

template <typename T, int D>
__global__ void __launch_bounds__(bsw::kThreads, 1) block_sparse_wgmma_kernel(BlockSparseLaunch p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  bsw::fwd_block<T, D>(p, smem, gridDim.x - 1 - blockIdx.x, blockIdx.y, blockIdx.z);
}

// 384 threads enter with at most 168 registers each (the cap setmaxnreg needs); the producer
// warpgroup then gives registers up and the consumers take them. One work item per CTA, in
// blockIdx order (work_item), or with kPersistent gridDim.x CTAs taking turns over all items.
template <typename T, int D, bool kOverlap, bool kAsyncArrive = false, bool kPersistent = false>
__global__ void __launch_bounds__(bsw::kWsThreads, 1)
    block_sparse_wgmma_ws_kernel(BlockSparseLaunch p) {
  extern __shared__ __align__(1024) unsigned char smem[];
  const int64_t total = bsw::work_items(p);
  const bsw::ItemSchedule sched =
      kPersistent ? bsw::ItemSchedule{total, gridDim.x, blockIdx.x}
                  : bsw::ItemSchedule{
                        total, total,
                        (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x +
                            blockIdx.x};
  bsw::fwd_block_ws<T, D, kOverlap, kAsyncArrive, kPersistent>(p, smem, sched);
}

template <typename T, int D>
cudaError_t launch_typed(const BlockSparseLaunch& p, cudaStream_t stream,
                         const char** failed_call) {
  // kAuto: the asynchronous-arrival overlap kernel (block_sparse_kernels.h).
  const bool persistent = p.kernel == BlockSparseKernel::kWgmmaWsPersistent;
  const bool async_arrive = p.kernel == BlockSparseKernel::kWgmmaWsAsync ||
                            p.kernel == BlockSparseKernel::kAuto || persistent;
  const bool overlap = p.kernel == BlockSparseKernel::kWgmmaWsOverlap || async_arrive;
  const bool ws = overlap || p.kernel == BlockSparseKernel::kWgmmaWs;
  auto kernel = persistent     ? block_sparse_wgmma_ws_kernel<T, D, true, true, true>
                : async_arrive ? block_sparse_wgmma_ws_kernel<T, D, true, true>
                : overlap      ? block_sparse_wgmma_ws_kernel<T, D, true>
                : ws           ? block_sparse_wgmma_ws_kernel<T, D, false>
                               : block_sparse_wgmma_kernel<T, D>;
  const int64_t bytes = ws ? bsw::ws_shared_bytes(D) : bsw::shared_bytes(D);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  if (e != cudaSuccess) {
    *failed_call = "cudaFuncSetAttribute(block_sparse_wgmma_kernel, MaxDynamicSharedMemorySize)";
    return e;
  }
  dim3 grid(static_cast<unsigned>((p.n + bsw::kBM - 1) / bsw::kBM), static_cast<unsigned>(p.heads),
            static_cast<unsigned>(p.batch));
  if (persistent) {
    // As many CTAs as fit on the device at once (one per SM: 384 threads of 168 registers fill
    // its register file), at most one per work item.
    int device = 0, sms = 0, per_sm = 0;
    if ((e = cudaGetDevice(&device)) != cudaSuccess) {
      *failed_call = "cudaGetDevice";
      return e;
    }
    if ((e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess) {
      *failed_call = "cudaDeviceGetAttribute(cudaDevAttrMultiProcessorCount)";
      return e;
    }
    if ((e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
             &per_sm, kernel, bsw::kWsThreads, static_cast<size_t>(bytes))) != cudaSuccess) {
      *failed_call = "cudaOccupancyMaxActiveBlocksPerMultiprocessor(block_sparse_wgmma_ws_kernel)";
      return e;
    }
    const int64_t fit = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
    const int64_t items = bsw::work_items(p);
    grid = dim3(static_cast<unsigned>(items < fit ? items : fit), 1, 1);
  }
  kernel<<<grid, ws ? bsw::kWsThreads : bsw::kThreads, static_cast<size_t>(bytes), stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = persistent ? "block_sparse_wgmma_ws_kernel<<<SMs, 384, shared bytes>>> "
                                "(persistent)"
                   : ws       ? "block_sparse_wgmma_ws_kernel<<<(query tiles, heads, batch), 384, "
                                "shared bytes>>>"
                        : "block_sparse_wgmma_kernel<<<(query tiles, heads, batch), 256, shared "
                          "bytes>>>";
    return e;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_block_sparse_wgmma(const BlockSparseLaunch& p, ElemType type,
                                      cudaStream_t stream, const char** failed_call) {
  if (type == ElemType::kBFloat16)
    return p.d == 64 ? launch_typed<__nv_bfloat16, 64>(p, stream, failed_call)
                     : launch_typed<__nv_bfloat16, 128>(p, stream, failed_call);
  return p.d == 64 ? launch_typed<__half, 64>(p, stream, failed_call)
                   : launch_typed<__half, 128>(p, stream, failed_call);
}

}  // namespace attnpilot::attention::cuda
