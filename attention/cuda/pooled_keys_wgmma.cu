// The pooled-query block scores by warpgroup MMA (sm_90a): the __global__ wrapper of
// pooled_keys_wgmma::pooled_keys_wgmma_block (pooled_keys_wgmma.cuh, where the method and its
// expected cost are described) and its launcher. Compiled for compute_90a/sm_90a only
// (attention/CMakeLists.txt), like block_sparse_wgmma.cu; launch_pooled_key_scores
// (block_estimator.cu) checks the arguments and the device, sets the chunk, calls this when
// PooledKeysLaunch::wgmma, then normalises.
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "pooled_keys_wgmma.cu needs the sm_90a target (-gencode=arch=compute_90a,code=sm_90a)"
#endif
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/pooled_keys_mma.cuh"
#include "attention/cuda/pooled_keys_wgmma.cuh"

namespace attnpilot::attention::cuda {
namespace {

namespace pkw = pooled_keys_wgmma;

// Grid as the mma.sync kernel's: x = group + groups·chunk, y = head, z = batch entry.
template <typename T, int D, int S>
__global__ void __launch_bounds__(pkw::kThreads)
    pooled_keys_wgmma_kernel(PooledKeysLaunch p, int64_t groups) {
  extern __shared__ __align__(1024) unsigned char pooled_keys_wgmma_smem[];
  const int64_t group = blockIdx.x % groups, chunk = blockIdx.x / groups;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  pkw::pooled_keys_wgmma_block<T, D, S>(p, chunk, group, bh, pooled_keys_wgmma_smem);
}

}  // namespace

cudaError_t launch_pooled_keys_wgmma(const PooledKeysLaunch& p, cudaStream_t stream,
                                     const char** failed_call) {
  const int stages = p.stages > 0 ? p.stages : pooled_keys::kDefaultStages;
  const auto bytes = static_cast<int>(pkw::shared_bytes(p.d, stages));
  cudaError_t e = cudaSuccess;
  pooled_keys::dispatch_config(p, stages, [&](auto type, auto dim, auto st) {
    e = pooled_keys::launch_keys_kernel(
        pooled_keys_wgmma_kernel<typename decltype(type)::type, decltype(dim)::value,
                                 decltype(st)::value>,
        p, bytes, stream,
        "pooled_keys_wgmma_kernel<<<(query groups × key chunks, heads, batch), 128>>>",
        failed_call);
  });
  return e;
}

}  // namespace attnpilot::attention::cuda
