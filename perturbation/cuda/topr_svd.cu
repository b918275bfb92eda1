// Fused warm-started top-r subspace iteration: one thread block per d×d core C runs every step
// of topr_subspace_iteration (jacobi_svd.cpp) for its matrix, with no launch or host round trip
// between steps. Per step, with the d×p blocks resident in shared memory and C streamed from
// global memory (L2) in chunks of 32 columns or rows:
//
//   Y = C V            ──► Jacobi (Y = U_Y Σ_Y W_Yᵀ) ──► U = U_Y (orthonormal basis of C V)
//   Z = Cᵀ U           ──► Jacobi (Z = P Σ Qᵀ)      ──► u = U Q, σ = Σ, v = P (Ritz triplets)
//   Y = C v, B = Cᵀ u  ──► residual max_{i<r} max(‖C v_i − σ_i u_i‖, ‖Cᵀ u_i − σ_i v_i‖) / σ₁
//   stop when the residual <= tol, else the next step starts from Y = C v (already computed).
//
// The Jacobi steps are the batched kernel's own sweeps (jacobi_sweeps.cuh) on the d×p block, so
// the results are the unfused path's up to rounding in the products. A matrix whose Jacobi step
// hits max_sweeps or meets a column with no direction (C V or Cᵀ U rank-deficient: the unfused
// path completes such columns on the host) is flagged kToprFallback and redone by the caller on
// the unfused path.
//
// Cost per step and matrix (d = 128, p = 12): four products of 2·d²·p = 0.39 MFLOP each and two
// Jacobi solves of d×p, each a few sweeps of p²/2 pairs × ~10·d flops when warm (about 0.1 MFLOP
// a sweep); C is read four times (256 KB, mostly from L2). For 1024 matrices and 2–3 steps that
// is about 5 GFLOP and 1 GB of L2 traffic: latency (barriers, one block of 64-128 threads per
// matrix, four or more blocks per SM) rather than throughput bounds it. The unfused path pays
// per step two Jacobi launches, four batched GEMMs, a dozen small LibTorch kernels and three
// host synchronisations.
#include <cuda_runtime.h>

#include <cstdint>

#include "perturbation/cuda/jacobi_kernels.h"
#include "perturbation/cuda/launch_checked.cuh"
#include "perturbation/cuda/topr_block.cuh"

namespace attnpilot::perturbation::cuda {
namespace {

// The body is topr::topr_block (topr_block.cuh), which the CPU emulation tests also run.
template <typename T, int LANES, int TM>
__global__ void __launch_bounds__(topr::kMaxThreads) topr_kernel(ToprLaunch p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int rotated[jacobi::kSweepSharedInts];
  __shared__ unsigned long long max_bits;
  __shared__ T sv[topr::kMaxP];
  __shared__ double res[topr::kMaxP];
  topr::topr_block<T, LANES, TM>(p, blockIdx.x, smem, rotated, &max_bits, sv, res);
}

template <typename T, int LANES, int TM>
cudaError_t launch_typed(const ToprLaunch& p, cudaStream_t stream, const char** failed_call) {
  if ((p.d + 4 * LANES - 1) / (4 * LANES) > TM) {
    *failed_call = "topr_kernel (shape outside the instantiated kernel)";
    return cudaErrorInvalidValue;
  }
  const int64_t bytes =
      topr::layout_bytes(topr::make_layout(p.d, p.p, sizeof(T), LANES), sizeof(T));
  return launch_checked(topr_kernel<T, LANES, TM>, static_cast<unsigned>(p.batch),
                        topr::topr_threads(p.p, LANES), bytes, stream, p,
                        "cudaFuncSetAttribute(topr_kernel, MaxDynamicSharedMemorySize)",
                        "topr_kernel<<<batch, 64 or 128, shared bytes, stream>>>", failed_call);
}

}  // namespace

bool topr_kernel_supports(int d, int p, bool is_double) {
  (void)is_double;  // both precisions fit: p <= 32 keeps the double layout under 180 KB
  return d >= 1 && d <= 128 && p >= 1 && p <= topr::kMaxP && p <= d;
}

int64_t topr_shared_bytes(int d, int p, bool is_double) {
  const int eb = is_double ? 8 : 4;
  return topr::layout_bytes(topr::make_layout(d, p, eb, 8), eb);
}

cudaError_t launch_topr(const ToprLaunch& p, bool is_double, cudaStream_t stream,
                        const char** failed_call) {
  if (!topr_kernel_supports(p.d, p.p, is_double) || p.batch < 1 || p.batch > 0x7fffffff ||
      p.r < 1 || p.r > p.p || !(p.tol > 0) || p.max_iters < 1 || !(p.jacobi_tol > 0) ||
      p.max_sweeps < 1) {
    *failed_call = "launch_topr (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  // 8 lanes per column pair (jacobi_lanes' default for every shape).
  if (!is_double) {
    if (p.d <= 64) return launch_typed<float, 8, 2>(p, stream, failed_call);
    return launch_typed<float, 8, 4>(p, stream, failed_call);
  }
  return launch_typed<double, 8, 4>(p, stream, failed_call);
}

}  // namespace attnpilot::perturbation::cuda
