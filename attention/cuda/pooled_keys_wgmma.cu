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

// Grid as the mma.sync kernel's: x = group + groups·chunk, y = head, z = batch entry. kMinCtas:
// CTAs per SM the registers are capped for (1: no cap; ~195 registers give two). kPipelined: the
// body's pipelined form. kSplit: w in two 16-bit parts (false: one).
template <typename T, int D, int S, int kMinCtas, bool kPipelined, bool kSplit = true>
__global__ void __launch_bounds__(pkw::kThreads, kMinCtas)
    pooled_keys_wgmma_kernel(PooledKeysLaunch p, int64_t groups) {
  extern __shared__ __align__(1024) unsigned char pooled_keys_wgmma_smem[];
  // 32-bit division (the grid's x is < 2^31; a 64-bit one calls a division routine).
  const unsigned g32 = static_cast<unsigned>(groups);
  const int64_t group = blockIdx.x % g32, chunk = blockIdx.x / g32;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  pkw::pooled_keys_wgmma_block<T, D, S, kPipelined, kSplit>(p, chunk, group, bh,
                                                            pooled_keys_wgmma_smem);
}

}  // namespace

cudaError_t launch_pooled_keys_wgmma(const PooledKeysLaunch& p, cudaStream_t stream,
                                     const char** failed_call) {
  // The pipelined body keeps three tiles (the folded one, the one whose products run, the one
  // loading): stages 0 means 3 there.
  const int stages = p.stages > 0 ? p.stages : (p.pipelined ? 3 : pooled_keys::kDefaultStages);
  if (p.ctas_per_sm != 0 && p.ctas_per_sm != 2 &&
      !(p.ctas_per_sm == 3 && stages == 2 && !p.pipelined)) {
    *failed_call =
        "launch_pooled_key_scores (wgmma body: ctas_per_sm 0, 2, or 3 with 2 stages and not "
        "pipelined)";
    return cudaErrorInvalidValue;
  }
  if (p.pipelined && stages != 3) {
    *failed_call = "launch_pooled_key_scores (wgmma body: pipelined takes stages 0 or 3)";
    return cudaErrorInvalidValue;
  }
  const auto bytes = static_cast<int>(pkw::shared_bytes(p.d, stages));
  cudaError_t e = cudaSuccess;
  pooled_keys::dispatch_config(p, stages, [&](auto type, auto dim, auto st) {
    using T = typename decltype(type)::type;
    constexpr int kD = decltype(dim)::value, kS = decltype(st)::value;
    const char* what =
        "pooled_keys_wgmma_kernel<<<(query groups × key chunks, heads, batch), 128>>>";
    const auto go = [&](auto kernel) {
      e = pooled_keys::launch_keys_kernel(kernel, p, bytes, stream, what, failed_call);
    };
    if constexpr (kS == 2) {
      if (p.ctas_per_sm == 3) {
        p.split ? go(pooled_keys_wgmma_kernel<T, kD, kS, 3, false, true>)
                : go(pooled_keys_wgmma_kernel<T, kD, kS, 3, false, false>);
        return;
      }
    }
    if constexpr (kS == 3) {
      if (p.pipelined) {
        p.split ? go(pooled_keys_wgmma_kernel<T, kD, kS, 1, true, true>)
                : go(pooled_keys_wgmma_kernel<T, kD, kS, 1, true, false>);
        return;
      }
    }
    p.split ? go(pooled_keys_wgmma_kernel<T, kD, kS, 1, false, true>)
            : go(pooled_keys_wgmma_kernel<T, kD, kS, 1, false, false>);
  });
  return e;
}

}  // namespace attnpilot::attention::cuda
