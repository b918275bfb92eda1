// The tall path's passes over X (tall_blocks.cuh holds the block bodies): the float64 Gram
// matrix of float (or double) rows, and the product X·W with float64 sums, rounded to the
// output type. Grid: (row ranges, matrices), one block per range.
//
// Operation count and floor (256 matrices of 4096×64, float): each pass is 256·4096·64·64 =
// 4.3e9 FMAs in float64; the H100's 132 SMs × 64 FP64 FMA/clk × ~1.75 GHz give 15 TFMA/s, so
// 0.29 ms per pass at peak (a Gram pass computes only the thread tiles on and above the
// diagonal, 56% of that at n = 64). Memory per pass: X read once (268 MB, 0.08 ms
// at 3.35 TB/s), plus Y written for the product (268 MB). So every pass is FP64-bound, and the
// tall path's three passes (Gram of X, product X·R₁⁻¹, Gram of Q₁) and the final U = Q₁·M cost
// about 1.2 ms at the FP64 peak, against a float64 copy of X and cuBLAS float64 GEMMs on it
// (measured 2.7 ms in all on the H100, 2026-12-05, dominated by the float64 copies' traffic).
#include <cstdint>

#include "perturbation/cuda/jacobi_kernels.h"
#include "perturbation/cuda/launch_checked.cuh"
#include "perturbation/cuda/tall_blocks.cuh"

namespace attnpilot::perturbation::cuda {
namespace {

struct Range {
  int64_t r0, r1;
};
// Rows of block x of `splits` for a matrix of `rows`, in multiples of `chunk`.
__device__ __forceinline__ Range block_range(int64_t rows, int splits, int chunk) {
  const int64_t chunks = (rows + chunk - 1) / chunk;
  const int64_t per = (chunks + splits - 1) / splits * chunk;
  const int64_t r0 = blockIdx.x * per;
  return {r0 < rows ? r0 : rows, r0 + per < rows ? r0 + per : rows};
}

template <typename T, int NP>
__global__ void __launch_bounds__(tall::gram_threads(NP), 1) tall_gram_kernel(TallPassLaunch p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.y;
  const Range r = block_range(p.rows, gridDim.x, tall::gram_chunk_rows(NP));
  tall::gram_block<T, NP>(static_cast<const T*>(p.x) + b * p.x_batch_stride, p.x_ld, p.n, r.r0,
                          r.r1, p.gram + b * p.n * p.n, reinterpret_cast<double*>(smem));
}

template <typename T, typename TO, int NP>
__global__ void __launch_bounds__(tall::kProductThreads) tall_product_kernel(TallPassLaunch p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t b = blockIdx.y;
  const Range r = block_range(p.rows, gridDim.x, tall::product_chunk_rows(NP));
  tall::product_block<T, TO, NP>(
      static_cast<const T*>(p.x) + b * p.x_batch_stride, p.x_ld, p.n, p.w + b * p.n * p.k, p.k,
      r.r0, r.r1, static_cast<TO*>(p.y) + b * p.rows * p.k, p.k, reinterpret_cast<double*>(smem));
}

// Row ranges per matrix: enough blocks for a few per SM, each at least `min_rows` rows (the
// Gram's atomics and the product's W load are per block).
unsigned splits_for(const TallPassLaunch& p, int64_t min_rows) {
  int64_t s = (4 * static_cast<int64_t>(p.sm_count) + p.batch - 1) / p.batch;
  const int64_t most = (p.rows + min_rows - 1) / min_rows;
  if (s > most) s = most;
  if (s < 1) s = 1;
  return static_cast<unsigned>(s);
}

template <typename T, int NP>
cudaError_t launch_gram(const TallPassLaunch& p, cudaStream_t stream, const char** failed) {
  return launch_checked(tall_gram_kernel<T, NP>,
                        dim3(splits_for(p, 1024), static_cast<unsigned>(p.batch)),
                        tall::gram_threads(NP), tall::gram_shared_bytes(NP), stream, p,
                        "cudaFuncSetAttribute(tall_gram_kernel, MaxDynamicSharedMemorySize)",
                        "tall_gram_kernel<<<(splits, batch), threads, bytes, stream>>>", failed);
}

template <typename T, typename TO, int NP>
cudaError_t launch_product(const TallPassLaunch& p, cudaStream_t stream, const char** failed) {
  return launch_checked(tall_product_kernel<T, TO, NP>,
                        dim3(splits_for(p, 512), static_cast<unsigned>(p.batch)),
                        tall::kProductThreads, tall::product_shared_bytes(NP), stream, p,
                        "cudaFuncSetAttribute(tall_product_kernel, MaxDynamicSharedMemorySize)",
                        "tall_product_kernel<<<(splits, batch), 128, bytes, stream>>>", failed);
}

template <int NP>
cudaError_t launch_width(const TallPassLaunch& p, cudaStream_t stream, const char** failed) {
  if (p.gram != nullptr)
    return p.x_double ? launch_gram<double, NP>(p, stream, failed)
                      : launch_gram<float, NP>(p, stream, failed);
  if (p.x_double)
    return p.y_double ? launch_product<double, double, NP>(p, stream, failed)
                      : launch_product<double, float, NP>(p, stream, failed);
  return p.y_double ? launch_product<float, double, NP>(p, stream, failed)
                    : launch_product<float, float, NP>(p, stream, failed);
}

}  // namespace

cudaError_t launch_tall_pass(const TallPassLaunch& p, cudaStream_t stream,
                             const char** failed_call) {
  const bool gram = p.gram != nullptr, product = p.y != nullptr;
  if (p.x == nullptr || gram == product || p.n < 1 || p.n > 128 || p.batch < 1 || p.batch > 65535 ||
      p.rows < 1 || p.x_ld < p.n || p.sm_count < 1 ||
      (product && (p.w == nullptr || p.k < 1 || p.k > p.n))) {
    *failed_call = "launch_tall_pass (arguments outside the kernels' range)";
    return cudaErrorInvalidValue;
  }
  const int np = tall::padded_width(p.n);
  if (np == 32) return launch_width<32>(p, stream, failed_call);
  if (np == 64) return launch_width<64>(p, stream, failed_call);
  return launch_width<128>(p, stream, failed_call);
}

}  // namespace attnpilot::perturbation::cuda
