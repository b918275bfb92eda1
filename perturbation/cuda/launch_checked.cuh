#pragma once
/// The launch step shared by the perturbation kernels' launchers (jacobi_svd.cu, topr_svd.cu,
/// tall_qr.cu).
#include <cuda_runtime.h>

#include <cstdint>

namespace attnpilot::perturbation::cuda {

/// Host side: raises `kernel`'s dynamic shared-memory limit to `bytes`, launches it as grid
/// blocks of `threads` on `stream` with `arg`, and checks both steps; on failure *failed_call
/// is `attr_call` or `launch_call` and the CUDA error is returned.
template <typename Arg>
cudaError_t launch_checked(void (*kernel)(Arg), dim3 grid, int threads, int64_t bytes,
                           cudaStream_t stream, const Arg& arg, const char* attr_call,
                           const char* launch_call, const char** failed_call) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  if (e != cudaSuccess) {
    *failed_call = attr_call;
    return e;
  }
  kernel<<<grid, threads, static_cast<size_t>(bytes), stream>>>(arg);
  e = cudaGetLastError();
  if (e != cudaSuccess) *failed_call = launch_call;
  return e;
}

}  // namespace attnpilot::perturbation::cuda
