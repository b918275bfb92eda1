#pragma once
/// Raw launcher of the batched one-sided Jacobi SVD kernel (jacobi_svd.cu). No LibTorch types
/// here, so nvcc never compiles the LibTorch headers; jacobi_svd.h is the tensor-level API.
#ifndef ATTNPILOT_CUDA_EMU  // tests/cuda_emu/cuda_emu.h declares the two CUDA types used here
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace attnpilot::perturbation::cuda {

/// Per-matrix status written by the kernel (an int32 per matrix).
inline constexpr int kJacobiNonFinite = -1;    ///< the input matrix holds NaN or Inf
inline constexpr int kJacobiNotConverged = 1;  ///< bit: still rotating after max_sweeps
inline constexpr int kJacobiZeroColumns = 2;   ///< bit: some σ_j = 0, their U columns are 0

/// One launch: X = A (or Aᵀ when transpose) with m ≥ n rows/columns; X = U_X Σ V_Xᵀ.
struct JacobiLaunch {
  const void* a = nullptr;  ///< [batch, rows_in, cols_in], contiguous, float or double
  int64_t batch = 0;
  int rows_in = 0, cols_in = 0;
  bool transpose = false;  ///< X = Aᵀ (m = cols_in, n = rows_in); else X = A
  int k = 0;               ///< output columns, 1 <= k <= n (top-k after sorting)
  void* ux = nullptr;      ///< U_X [batch, m, k], contiguous
  void* s = nullptr;       ///< [batch, k], descending
  void* vx = nullptr;      ///< V_X [batch, n, k], contiguous
  int* status = nullptr;   ///< [batch], always written
  double tol = 0;          ///< rotate when |a_pᵀa_q| > tol·‖a_p‖‖a_q‖ (> 0)
  int max_sweeps = 0;      ///< >= 1
  int lanes = 0;  ///< lanes per column pair, 4 or 8 (float with m > 64 only); 0 = jacobi_lanes
  bool scaled = false;  ///< scaled rotations (float, 8 lanes, untracked norms; else ignored)
};

/// Whether the kernel handles X of m×n (m >= n >= 1) in this precision: float m <= 128;
/// double m <= 64, or m <= 128 with n <= 32 (register and shared-memory limits).
bool jacobi_kernel_supports(int m, int n, bool is_double);

/// Lanes per column pair the kernel uses for X with m rows: 8, or for float with m > 64 the
/// requested 4 (anything else: 8, measured faster).
int jacobi_lanes(int m, bool is_double, int requested);

/// Dynamic shared memory of one block for X of m×n (m >= n) with `lanes` lanes per pair, bytes.
int64_t jacobi_shared_bytes(int m, int n, bool is_double, int lanes);

/// Launches on `stream` (one block per matrix). Returns cudaSuccess, or the error of the
/// first failing CUDA call with that call's name in *failed_call.
cudaError_t launch_jacobi_svd(const JacobiLaunch& p, bool is_double, cudaStream_t stream,
                              const char** failed_call);

/// Status bit of the fused top-r kernel: a Jacobi step inside it hit max_sweeps or met a column
/// with no direction (C V or Cᵀ U rank-deficient); the caller redoes that matrix on the
/// unfused path, which handles both.
inline constexpr int kToprFallback = 4;

/// One launch of the fused top-r subspace iteration (topr_svd.cu): one block per matrix runs
/// every step of topr_subspace_iteration for it with C streamed from global memory and the d×p
/// blocks in shared memory.
struct ToprLaunch {
  const void* c = nullptr;   ///< [batch, d, d], contiguous, float or double
  const void* v0 = nullptr;  ///< [batch, d, p], contiguous, the warm start
  int64_t batch = 0;
  int d = 0, p = 0, r = 0;        ///< 1 <= r <= p <= min(d, 32), d <= 128
  double tol = 0;                 ///< stop when the top-r triplet residual <= tol·σ₁
  int max_iters = 0;              ///< >= 1
  double jacobi_tol = 0;          ///< the Jacobi steps' orthogonality tolerance (> 0)
  int max_sweeps = 0;             ///< per Jacobi step, >= 1
  void* u = nullptr;              ///< [batch, d, p]
  void* s = nullptr;              ///< [batch, p], descending
  void* v = nullptr;              ///< [batch, d, p]
  int64_t* iterations = nullptr;  ///< [batch], steps taken
  bool* converged = nullptr;      ///< [batch]
  int* status = nullptr;          ///< [batch]: 0, kJacobiNonFinite, or kToprFallback
};

/// Whether the fused kernel handles d, p in this precision (d <= 128, p <= 32, p <= d).
bool topr_kernel_supports(int d, int p, bool is_double);

/// Dynamic shared memory of one block of the fused top-r kernel, in bytes.
int64_t topr_shared_bytes(int d, int p, bool is_double);

/// Launches the fused top-r kernel on `stream`; errors as launch_jacobi_svd.
cudaError_t launch_topr(const ToprLaunch& p, bool is_double, cudaStream_t stream,
                        const char** failed_call);

/// One pass of the tall path over X [batch, rows, n] (tall_qr.cu): the Gram matrix
/// G = XᵀX (gram = non-null) or the product Y = X W (y = non-null), float64 sums either way.
struct TallPassLaunch {
  const void* x = nullptr;  ///< X, float or double (x_double), last dim contiguous
  bool x_double = false;
  int64_t batch = 0, rows = 0;
  int n = 0;                             ///< columns of X, 1 <= n <= 128
  int64_t x_batch_stride = 0, x_ld = 0;  ///< element strides over (batch, row)
  double* gram = nullptr;     ///< [batch, n, n], zeroed by the caller (atomic float64 adds)
  const double* w = nullptr;  ///< [batch, n, k] contiguous (product)
  int k = 0;                  ///< columns of W and Y, 1 <= k <= n (product)
  void* y = nullptr;          ///< Y [batch, rows, k] contiguous, float or double (y_double)
  bool y_double = false;
  int sm_count = 0;  ///< the device's multiprocessors (sizes the grid; >= 1)
};

/// Launches one tall pass on `stream`; errors as launch_jacobi_svd.
cudaError_t launch_tall_pass(const TallPassLaunch& p, cudaStream_t stream,
                             const char** failed_call);

}  // namespace attnpilot::perturbation::cuda
