// Batched one-sided Jacobi SVD (Hestenes), one thread block per matrix, the matrix and V
// resident in shared memory.
//
// Algorithm. X is m×n with m >= n (a wide A is taken as X = Aᵀ). Columns a_p, a_q of X are
// rotated until every pair is orthogonal in the relative sense |a_pᵀa_q| <= tol·‖a_p‖‖a_q‖
// (tol = sqrt(m)·ε by default, LAPACK sgesvj's choice); the same rotations applied to V = I
// give X V = U Σ with σ_j = ‖a_j‖ and u_j = a_j/σ_j, then everything is sorted descending.
// The relative criterion makes the normalised columns orthogonal to tol however small σ_j is,
// and one-sided Jacobi never forms XᵀX, so small singular values keep their accuracy
// (Demmel–Veselić), unlike gesvda. The input is first scaled by an exact power of two so its
// largest entry is in [0.5, 1) (no overflow or underflow in the norms); σ is scaled back.
//
// Parallel ordering. n is padded with zero columns to npad = 2^j (zero columns never rotate).
// A sweep has log2(npad) levels with h = npad/2, npad/4, ..., 1: at level h, the columns fall
// into chunks of 2h, and in each chunk column `base + k` (k < h, the fixed column) meets the
// columns `base + h + (k + s) mod h` for s = 0..h-1, one per step. Every pair meets exactly
// once per sweep, in npad - 1 steps of npad/2 disjoint pairs. A group of LANES lanes owns a pair;
// its fixed column (of X and of V) stays in registers for the whole level and only the moving
// column goes through shared memory each step, which halves the shared-memory traffic of the
// classic round-robin ordering (where both columns move every step).
//
// Each lane holds 4 consecutive rows per tile of 4·LANES rows (16-byte vector loads; with 8
// lanes a quarter warp reads 128 contiguous bytes of one column, with 4 lanes 64 bytes of each
// of two columns placed in disjoint bank halves by the leading dimension). LANES is 8 by
// default; 4 (float, more than 64 rows) halves the threads and the redundant per-lane angle
// work but lengthens each lane's dependency chains, and measured 1.2x slower at 128x128 on the
// H100 (2026-12-05), so it stays a tuning knob (JacobiOptions::lanes). The three dot products
// are summed in the working precision per lane and reduced over the lanes by shuffles (an xor
// butterfly, so all lanes get bitwise-equal sums and take the same decision); the rotation test
// and tan θ are computed in the working precision (float: the MUFU rsqrt and reciprocal, see
// pair_angle), c and s from tan θ in double (see the comment there: float c, s cost V an order
// of magnitude of orthogonality; an earlier version computed the whole angle in double, a long
// FP64 latency chain in every step), and each rotation leaves the larger column at the lower
// index, selecting the coefficients so that one rotation body serves both orders. V's moving
// column is read only for a pair that rotates, and where X and V fill all the tiles (97 to 128
// rows, 128×128 among them) a kernel without bounds tests in the tile loops runs. Those four
// changes together took 1024 × 128×128 from 9.9 to 7.2 ms on the H100 (2026-12-06: 1.94x
// gesvda), 64×64 from 1.30 to 1.20 ms. Sweeps measured by emulating this exact
// algorithm in numpy (fp32 data): 7–9 for random or well-conditioned matrices of 32–128 columns, 5
// for clustered spectra, 14–21 for spectra log-spaced over 6 decades (graded matrices converge
// slowly without QR preconditioning).
//
// Operation count and floor (square n, S sweeps): a pair costs 6m flops of dot products plus
// 6m + 6n of rotations, so a sweep is about 9n³ flops; for 1024 matrices of 128×128 and S = 8,
// 1.5e11 flops, 2.3 ms at the H200's 67 TFLOP/s fp32. The tighter limit is shared memory: per
// pair one column of X and one of V go in and out (8(m+n) bytes), 1024 × 8128 pairs × 8 sweeps
// × 2 KiB = 136 GB, 4.1 ms at 132 SMs × 128 B/clk × 1.98 GHz = 33 TB/s. Expected 4–6 ms at
// 128×128 (gesvda: 13.4 ms; measured 7.2 ms), about 0.5 ms at 64×64 (14.8 GB of shared-memory
// traffic; measured 1.2 ms), and at
// 32×32 the launch and the status read-back (about 0.05 ms) dominate. Device-memory traffic
// (read A once, write U, Σ, V) is 0.2 GB at 128×128, 0.05 ms at 4.8 TB/s: not the limit.
// Occupancy: 128×128 fp32 uses 136 KiB of shared memory and 512 threads, one block per SM (ncu
// of the scaled-rotation form, 2026-12-06: 54% of the issue slots busy, 7 cycles between a
// warp's instructions).
#include <cfloat>
#include <cstdint>

#include "perturbation/cuda/jacobi_kernels.h"
#include "perturbation/cuda/jacobi_sweeps.cuh"
#include "perturbation/cuda/launch_checked.cuh"

namespace attnpilot::perturbation::cuda {
namespace {

// The body is jacobi::svd_block (jacobi_sweeps.cuh), which the CPU emulation tests also run.
template <typename T, int LANES, int TM, int MAXT, bool TRACK, bool FULL, bool SCALED>
__global__ void __launch_bounds__(MAXT) jacobi_svd_kernel(JacobiLaunch p) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int rotated[jacobi::kSweepSharedInts];
  __shared__ unsigned long long max_bits;
  jacobi::svd_block<T, LANES, TM, TRACK, FULL, SCALED>(p, blockIdx.x, smem, rotated, &max_bits);
}

// FULL_TILES: instantiate the kernel whose tile loops have no bounds tests too, and launch it
// when X and V both fill all TM tiles (ceil(m/TH) == ceil(n/TH) == TM, e.g. 128×128).
// SCALED: also instantiate the scaled-rotation kernels and launch them when p.scaled.
template <typename T, int LANES, int TM, int MAXT, bool TRACK = false, bool FULL_TILES = false,
          bool SCALED = false>
cudaError_t launch_typed(const JacobiLaunch& p, cudaStream_t stream, const char** failed_call) {
  const int m = p.transpose ? p.cols_in : p.rows_in, n = p.transpose ? p.rows_in : p.cols_in;
  const int threads = jacobi::svd_block_threads(n, LANES);
  constexpr int TH = 4 * LANES;
  if (threads > MAXT || (m + TH - 1) / TH > TM) {
    *failed_call = "jacobi_svd_kernel (shape outside the instantiated kernel)";
    return cudaErrorInvalidValue;
  }
  const int64_t bytes = jacobi_shared_bytes(m, n, sizeof(T) == 8, LANES);
  const char* attr = "cudaFuncSetAttribute(jacobi_svd_kernel, MaxDynamicSharedMemorySize)";
  const char* launch = "jacobi_svd_kernel<<<batch, threads, shared bytes, stream>>>";
  const unsigned grid = static_cast<unsigned>(p.batch);
  const bool full = FULL_TILES && (m + TH - 1) / TH == TM && (n + TH - 1) / TH == TM;
  if constexpr (SCALED) {
    if (p.scaled) {
      return full ? launch_checked(jacobi_svd_kernel<T, LANES, TM, MAXT, TRACK, FULL_TILES, true>,
                                   grid, threads, bytes, stream, p, attr, launch, failed_call)
                  : launch_checked(jacobi_svd_kernel<T, LANES, TM, MAXT, TRACK, false, true>, grid,
                                   threads, bytes, stream, p, attr, launch, failed_call);
    }
  }
  return full ? launch_checked(jacobi_svd_kernel<T, LANES, TM, MAXT, TRACK, FULL_TILES, false>,
                               grid, threads, bytes, stream, p, attr, launch, failed_call)
              : launch_checked(jacobi_svd_kernel<T, LANES, TM, MAXT, TRACK, false, false>, grid,
                               threads, bytes, stream, p, attr, launch, failed_call);
}

}  // namespace

bool jacobi_kernel_supports(int m, int n, bool is_double) {
  if (n < 1 || m < n) return false;
  if (!is_double) return m <= 128;
  return m <= 64 || (m <= 128 && n <= 32);
}

int jacobi_lanes(int m, bool is_double, int requested) {
  if (is_double || m <= 64) return 8;
  return requested == 4 ? 4 : 8;
}

int64_t jacobi_shared_bytes(int m, int n, bool is_double, int lanes) {
  return jacobi::svd_block_shared_bytes(m, n, is_double ? 8 : 4, lanes);
}

cudaError_t launch_jacobi_svd(const JacobiLaunch& p, bool is_double, cudaStream_t stream,
                              const char** failed_call) {
  const int m = p.transpose ? p.cols_in : p.rows_in, n = p.transpose ? p.rows_in : p.cols_in;
  if (!jacobi_kernel_supports(m, n, is_double) || p.batch < 1 || p.batch > 0x7fffffff || p.k < 1 ||
      p.k > n || p.max_sweeps < 1 || !(p.tol > 0) ||
      (p.lanes != 0 && p.lanes != 4 && p.lanes != 8)) {
    *failed_call = "launch_jacobi_svd (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  const int tiles = (m + 31) / 32;
  // Tall-skinny X (the top-r path's d×p blocks) tracks its column norms (jacobi_sweeps.cuh).
  const bool skinny = n <= 32 && m >= 4 * n;
  if (!is_double) {
    if (tiles <= 1)
      return launch_typed<float, 8, 1, 512, false, false, true>(p, stream, failed_call);
    if (tiles <= 2)
      return launch_typed<float, 8, 2, 512, false, false, true>(p, stream, failed_call);
    if (jacobi_lanes(m, false, p.lanes) == 8)
      return skinny ? launch_typed<float, 8, 4, 512, true>(p, stream, failed_call)
                    : launch_typed<float, 8, 4, 512, false, true, true>(p, stream, failed_call);
    return launch_typed<float, 4, 8, 256>(p, stream, failed_call);
  }
  if (tiles <= 1) return launch_typed<double, 8, 1, 256>(p, stream, failed_call);
  if (tiles <= 2) return launch_typed<double, 8, 2, 256>(p, stream, failed_call);
  return skinny ? launch_typed<double, 8, 4, 128, true>(p, stream, failed_call)
                : launch_typed<double, 8, 4, 128>(p, stream, failed_call);
}

}  // namespace attnpilot::perturbation::cuda
