#pragma once
/// The fused top-r subspace iteration's block-level device code (topr_svd.cu runs it as its
/// kernel body; tests/cuda_emu runs it on the CPU). Internal to perturbation/cuda; the
/// algorithm and its cost are described at the top of topr_svd.cu.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "perturbation/cuda/jacobi_kernels.h"
#include "perturbation/cuda/jacobi_sweeps.cuh"

namespace attnpilot::perturbation::cuda::topr {

using jacobi::leading_dim;
using jacobi::next_pow2;

constexpr int kMaxThreads = 128;
constexpr int kMaxP = 32;   // block columns (npad <= 32: at most 128 Jacobi threads)
constexpr int kChunk = 32;  // columns (C) or rows (Cᵀ) of C staged per pass

// Threads of a block: what the Jacobi sweeps on p columns use (8 lanes per column pair), at
// least 64. Fewer threads per matrix keep more matrices resident per SM; the Jacobi steps,
// a latency chain per matrix, dominate the time.
__host__ __device__ inline int topr_threads(int p, int lanes) {
  const int t = lanes * (next_pow2(p < 2 ? 2 : p) / 2);
  return t < 64 ? 64 : t;
}

// Shared memory, in elements of T: Y [npad cols × lda] (the Jacobi work matrix; rows past d and
// columns past p stay zero), W [npad × ldw] (the Jacobi rotations, p rows), B1, B2, B3 [p × lda]
// (U or Cᵀ u; v; u), the staging buffer of C; then double sig[npad], int order[npad], T
// nrm[npad] (the sweeps' column norms).
struct Layout {
  int npad = 0, lda = 0, ldw = 0;
  int64_t w = 0, b1 = 0, b2 = 0, b3 = 0, cs = 0, total = 0;
};

__host__ __device__ inline Layout make_layout(int d, int p, int elem_bytes, int lanes) {
  const int nt = topr_threads(p, lanes);
  Layout L;
  L.npad = next_pow2(p < 2 ? 2 : p);
  L.lda = leading_dim(d, elem_bytes, lanes);
  L.ldw = leading_dim(p, elem_bytes, lanes);
  L.w = static_cast<int64_t>(L.npad) * L.lda;
  L.b1 = L.w + static_cast<int64_t>(L.npad) * L.ldw;
  L.b2 = L.b1 + static_cast<int64_t>(p) * L.lda;
  L.b3 = L.b2 + static_cast<int64_t>(p) * L.lda;
  L.cs = L.b3 + static_cast<int64_t>(p) * L.lda;
  const int64_t staged =
      nt * (kChunk + 1) > kChunk * (nt + 1) ? nt * (kChunk + 1) : kChunk * (nt + 1);
  L.total = L.cs + staged;
  if (elem_bytes == 4 && (L.total & 1)) ++L.total;  // sig (double) after it
  return L;
}

__host__ __device__ inline int64_t layout_bytes(const Layout& L, int elem_bytes) {
  return L.total * elem_bytes + L.npad * 8 + L.npad * 4 + L.npad * elem_bytes;
}

// dst[:, j] = op(C) src[:, j] for j < p (d×p blocks, column-major, leading dims lds and ldd;
// dst must not alias src), op(C) = C or Cᵀ. Rows go in blocks of blockDim (thread i owns row
// i0 + i); for each, C is staged in chunks of kChunk columns (C) or rows (Cᵀ), read coalesced
// and laid out so that the threads' reads are conflict-free; src values are broadcasts. Returns
// (block-uniformly) whether a staged element was not finite, when `check`.
template <typename T>
__device__ bool product(const T* __restrict__ cg, int d, bool trans, const T* src, int lds, T* dst,
                        int ldd, int p, T* cs, bool check) {
  const int tid = threadIdx.x, nt = blockDim.x;
  int bad = 0;
  for (int i0 = 0; i0 < d; i0 += nt) {
    const int ni = d - i0 < nt ? d - i0 : nt;
    T acc[kMaxP];
#pragma unroll
    for (int j = 0; j < kMaxP; ++j) acc[j] = T(0);
    for (int k0 = 0; k0 < d; k0 += kChunk) {
      const int kc = d - k0 < kChunk ? d - k0 : kChunk;
      __syncthreads();  // the previous chunk is consumed
      if (!trans) {     // cs[i·(kChunk+1) + kk] = C[i0 + i, k0 + kk]
        for (int idx = tid; idx < ni * kc; idx += nt) {
          const int i = idx / kc, kk = idx - i * kc;
          const T x = cg[static_cast<int64_t>(i0 + i) * d + k0 + kk];
          bad |= !isfinite(x);
          cs[i * (kChunk + 1) + kk] = x;
        }
      } else {  // cs[kk·(nt+1) + i] = C[k0 + kk, i0 + i]
        for (int idx = tid; idx < kc * ni; idx += nt) {
          const int kk = idx / ni, i = idx - kk * ni;
          const T x = cg[static_cast<int64_t>(k0 + kk) * d + i0 + i];
          bad |= !isfinite(x);
          cs[kk * (nt + 1) + i] = x;
        }
      }
      __syncthreads();
      if (tid < ni) {
        for (int kk = 0; kk < kc; ++kk) {
          const T c = trans ? cs[kk * (nt + 1) + tid] : cs[tid * (kChunk + 1) + kk];
          const T* sk = src + k0 + kk;
#pragma unroll
          for (int j = 0; j < kMaxP; ++j)
            if (j < p) acc[j] = fma(c, sk[j * lds], acc[j]);
        }
      }
    }
    if (tid < ni) {
#pragma unroll
      for (int j = 0; j < kMaxP; ++j)
        if (j < p) dst[j * ldd + i0 + tid] = acc[j];
    }
  }
  return __syncthreads_or(check && bad) != 0;
}

// One Jacobi SVD of the d×p block in Y (columns past p zero): W = I, power-of-two scaling
// (returned in *expo), sweeps, σ (scaled) and their order. True when the sweeps converged and
// every one of the p columns has a direction (σ above 1e-30·σ₁), block-uniformly.
// TMV tiles of 4·LANES rows cover the p <= 32 rows of W.
template <typename T, int LANES, int TM, int TMV = (kMaxP + 4 * LANES - 1) / (4 * LANES)>
__device__ bool jacobi_step(T* Y, T* W, const Layout& L, int d, int p, T tol, int max_sweeps,
                            int* rotated, unsigned long long* max_bits, double* sig, int* order,
                            int* expo) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int idx = tid; idx < L.npad * L.ldw; idx += nt) {
    const int j = idx / L.ldw, i = idx - j * L.ldw;
    W[idx] = (i == j && j < p) ? T(1) : T(0);
  }
  double local_max = 0;
  for (int idx = tid; idx < L.npad * L.lda; idx += nt)
    local_max = fmax(local_max, fabs(static_cast<double>(Y[idx])));
  if (tid == 0) *max_bits = 0ull;
  __syncthreads();
  *expo = jacobi::scale_pow2(Y, L.npad * L.lda, local_max, max_bits);
  const bool converged =
      jacobi::sweeps<T, LANES, TM, TMV, true>(Y, L.lda, W, L.ldw, d, p, L.npad, tol, max_sweeps,
                                              rotated, reinterpret_cast<T*>(order + L.npad));
  jacobi::column_order(Y, L.lda, d, L.npad, sig, order);
  const double thr = sig[order[0]] * 1e-30;
  bool ok = converged;
  for (int r = 0; r < p; ++r) ok = ok && sig[order[r]] > thr;
  return ok;
}

// out[i] = max(out[i], ‖x[:, i] − σ_i y[:, i]‖) for i < r (d×r blocks, leading dim ld), in double,
// one warp per column. Ends with a barrier.
template <typename T>
__device__ void residual_norms(const T* x, const T* y, int ld, const T* sv, int d, int r,
                               double* out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int i = warp; i < r; i += warps) {
    double acc = 0;
    for (int row = lane; row < d; row += 32) {
      const double e = static_cast<double>(x[i * ld + row]) -
                       static_cast<double>(sv[i]) * static_cast<double>(y[i * ld + row]);
      acc = fma(e, e, acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) out[i] = fmax(out[i], sqrt(acc));
  }
  __syncthreads();
}

/// Every step of the top-r iteration for matrix b of p (topr_kernel's whole body): smem of
/// layout_bytes(make_layout(...)) bytes, 16-byte aligned; rotated, max_bits, sv [kMaxP] and res
/// [kMaxP] shared scratch. Called by every thread of a block of topr_threads(p.p, LANES).
template <typename T, int LANES, int TM>
__device__ void topr_block(const ToprLaunch& p, int64_t b, unsigned char* smem, int* rotated,
                           unsigned long long* max_bits, T* sv, double* res) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int d = p.d, np = p.p;
  const Layout L = make_layout(d, np, sizeof(T), LANES);
  const int lda = L.lda;
  T* Y = reinterpret_cast<T*>(smem);
  T* W = Y + L.w;
  T* B1 = Y + L.b1;
  T* B2 = Y + L.b2;
  T* B3 = Y + L.b3;
  T* cs = Y + L.cs;
  double* sig = reinterpret_cast<double*>(Y + L.total);
  int* order = reinterpret_cast<int*>(sig + L.npad);
  const T* cg = static_cast<const T*>(p.c) + b * d * d;
  const T jtol = static_cast<T>(p.jacobi_tol);

  // The warm start into B2 (v), Y = 0, then Y = C v; C and v0 checked for NaN/Inf.
  const T* v0 = static_cast<const T*>(p.v0) + b * d * np;
  int bad = 0;
  for (int idx = tid; idx < d * np; idx += nt) {
    const int i = idx / np, j = idx - i * np;
    const T x = v0[idx];
    bad |= !isfinite(x);
    B2[j * lda + i] = x;
  }
  for (int idx = tid; idx < L.npad * lda; idx += nt) Y[idx] = T(0);
  bool nonfinite = __syncthreads_or(bad) != 0;
  if (!nonfinite) nonfinite = product(cg, d, false, B2, lda, Y, lda, np, cs, true);
  if (nonfinite) {
    if (tid == 0) {
      p.status[b] = kJacobiNonFinite;
      p.iterations[b] = 0;
      p.converged[b] = false;
    }
    return;  // block-uniform
  }

  int status = 0, it = 0;
  bool converged = false;
  while (it < p.max_iters) {
    // U = the basis of C v: the sorted normalised columns after the Jacobi step on Y.
    int expo = 0;
    if (!jacobi_step<T, LANES, TM>(Y, W, L, d, np, jtol, p.max_sweeps, rotated, max_bits, sig,
                                   order, &expo)) {
      status = kToprFallback;
      break;
    }
    for (int idx = tid; idx < np * d; idx += nt) {
      const int r = idx / d, i = idx - r * d, j = order[r];
      B1[r * lda + i] = static_cast<T>(static_cast<double>(Y[j * lda + i]) / sig[j]);
    }
    // Z = Cᵀ U, then its Jacobi step: u = U Q, σ, v = P.
    product(cg, d, true, B1, lda, Y, lda, np, cs, false);
    if (!jacobi_step<T, LANES, TM>(Y, W, L, d, np, jtol, p.max_sweeps, rotated, max_bits, sig,
                                   order, &expo)) {
      status = kToprFallback;
      break;
    }
    for (int r = tid; r < np; r += nt) {
      sv[r] = static_cast<T>(ldexp(sig[order[r]], expo));
      res[r] = 0;
    }
    for (int idx = tid; idx < np * d; idx += nt) {
      const int r = idx / d, i = idx - r * d, j = order[r];
      T acc = T(0);
      for (int q = 0; q < np; ++q) acc = fma(B1[q * lda + i], W[j * L.ldw + q], acc);
      B3[r * lda + i] = acc;
      B2[r * lda + i] = static_cast<T>(static_cast<double>(Y[j * lda + i]) / sig[j]);
    }
    // Residuals: Y = C v (also the next step's product), B1 = Cᵀ u.
    product(cg, d, false, B2, lda, Y, lda, np, cs, false);
    product(cg, d, true, B3, lda, B1, lda, np, cs, false);
    residual_norms(Y, B3, lda, sv, d, p.r, res);
    residual_norms(B1, B2, lda, sv, d, p.r, res);
    ++it;
    double worst = 0;
    for (int i = 0; i < p.r; ++i) worst = fmax(worst, res[i]);
    const double s1 = static_cast<double>(sv[0]);
    if ((s1 > 0 ? worst / s1 : 0.0) <= p.tol) {
      converged = true;
      break;
    }
  }

  // Outputs (the last step's triplets; the caller redoes fallback matrices).
  T* uo = static_cast<T*>(p.u) + b * d * np;
  T* vo = static_cast<T*>(p.v) + b * d * np;
  for (int idx = tid; idx < d * np; idx += nt) {
    const int i = idx / np, r = idx - i * np;
    uo[idx] = B3[r * lda + i];
    vo[idx] = B2[r * lda + i];
  }
  T* so = static_cast<T*>(p.s) + b * np;
  for (int r = tid; r < np; r += nt) so[r] = sv[r];
  if (tid == 0) {
    p.status[b] = status;
    p.iterations[b] = it;
    p.converged[b] = converged;
  }
}

}  // namespace attnpilot::perturbation::cuda::topr
