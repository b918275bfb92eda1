#pragma once
/// Block-level building blocks of the one-sided Jacobi SVD on a column-major matrix resident in
/// shared memory, shared by the batched kernel (jacobi_svd.cu) and the fused top-r iteration
/// (topr_svd.cu). Internal to perturbation/cuda; the algorithm, its ordering and its operation
/// count are described at the top of jacobi_svd.cu. Every function here is called by every
/// thread of the block (they contain barriers). Tests also run them on the CPU through
/// tests/cuda_emu/cuda_emu.h, which defines ATTNPILOT_CUDA_EMU and the CUDA names used here.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cassert>
#include <cstdint>

#include "perturbation/cuda/jacobi_kernels.h"

namespace attnpilot::perturbation::cuda::jacobi {

/// Shared ints `sweeps` needs (its `rotated` argument): per sweep parity, a rotated flag and the
/// bits of the sweep's largest max(|cos|, |sin|) (non-negative floats order like their bits).
inline constexpr int kSweepSharedInts = 4;

__host__ __device__ inline int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Leading dimension (elements) of a column of `rows` rows for a kernel with `lanes` lanes per
// column pair. Columns start on 16-byte boundaries. 8 lanes: whole 32-row tiles plus 16 bytes,
// so consecutive columns fall in different banks (a quarter warp reads 128 contiguous bytes
// of one column). 4 lanes (float only): whole 16-row tiles padded to 16 mod 32 elements, so
// the two groups of a quarter warp, which read 64 bytes each of columns an odd distance
// apart (consecutive in this ordering), use disjoint halves of the 32 banks.
__host__ __device__ inline int leading_dim(int rows, int elem_bytes, int lanes) {
  if (lanes == 4) {
    const int r = 16 * ((rows + 15) / 16);
    return (r / 16) % 2 == 0 ? r + 16 : r;
  }
  return 32 * ((rows + 31) / 32) + 16 / elem_bytes;
}

__device__ __forceinline__ void load4(const float* p, float* r) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  r[0] = v.x;
  r[1] = v.y;
  r[2] = v.z;
  r[3] = v.w;
}
__device__ __forceinline__ void store4(float* p, const float* r) {
  *reinterpret_cast<float4*>(p) = make_float4(r[0], r[1], r[2], r[3]);
}
__device__ __forceinline__ void load4(const double* p, double* r) {
  const double2 v0 = *reinterpret_cast<const double2*>(p);
  const double2 v1 = *reinterpret_cast<const double2*>(p + 2);
  r[0] = v0.x;
  r[1] = v0.y;
  r[2] = v1.x;
  r[3] = v1.y;
}
__device__ __forceinline__ void store4(double* p, const double* r) {
  *reinterpret_cast<double2*>(p) = make_double2(r[0], r[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(r[2], r[3]);
}

// Lane l of a group of LANES holds rows TH·t + 4l .. TH·t + 4l + 3 of a column (TH = 4·LANES
// rows per tile), t < tiles <= TM.
template <int LANES, int TM, typename T>
__device__ __forceinline__ void load_col(const T* col, int tiles, int l, T* r) {
#pragma unroll
  for (int t = 0; t < TM; ++t)
    if (t < tiles) load4(col + 4 * LANES * t + 4 * l, r + 4 * t);
}
template <int LANES, int TM, typename T>
__device__ __forceinline__ void store_col(T* col, int tiles, int l, const T* r) {
#pragma unroll
  for (int t = 0; t < TM; ++t)
    if (t < tiles) store4(col + 4 * LANES * t + 4 * l, r + 4 * t);
}

// Beyond this |ζ| the rotation's tan θ is 1/(2ζ) to working precision (and ζ² would overflow).
template <typename T>
__device__ __forceinline__ T zeta_big();
template <>
__device__ __forceinline__ float zeta_big<float>() {
  return 1e18f;
}
template <>
__device__ __forceinline__ double zeta_big<double>() {
  return 1e100;
}

// f(i) for each of the lane's register rows i = 4t .. 4t + 3 of the tiles t < tiles (<= TM).
template <int TM, class F>
__device__ __forceinline__ void for_rows(int tiles, F&& f) {
#pragma unroll
  for (int t = 0; t < TM; ++t) {
    if (t < tiles) {
#pragma unroll
      for (int e = 0; e < 4; ++e) f(4 * t + e);
    }
  }
}

// x' = c11 x + c12 y, y' = c21 x + c22 y on the lane's rows.
template <int TM, typename T>
__device__ __forceinline__ void rotate(T* x, T* y, int tiles, T c11, T c12, T c21, T c22) {
  for_rows<TM>(tiles, [&](int i) {
    const T xi = x[i], yi = y[i];
    x[i] = fma(c11, xi, c12 * yi);
    y[i] = fma(c21, xi, c22 * yi);
  });
}
// x' = x − mu·y, y' = y + nu·x (both from the old x and y) on the lane's rows.
template <int TM, typename T>
__device__ __forceinline__ void scaled_rotate(T* x, T* y, int tiles, T mu, T nu) {
  for_rows<TM>(tiles, [&](int i) {
    const T xi = x[i], yi = y[i];
    x[i] = fma(-mu, yi, xi);
    y[i] = fma(nu, xi, yi);
  });
}
template <int TM, typename T>
__device__ __forceinline__ void scale_col(T* x, int tiles, T f) {
  for_rows<TM>(tiles, [&](int i) { x[i] *= f; });
}
// Scaled rotations: a column's scale (a product of cosines, in (0, 1]) is folded into its stored
// values once it falls below this, so the ratio r = d_m/d_f stays within 2^±21 and the stored
// values within 2^21 of the true ones (no overflow in the Gram entries however many rotations).
inline constexpr double kScaleFloor = 0x1p-20;

/// Scales the first `count` elements of A by 2^-e so that max |a| (whose per-thread part is
/// local_max, finite) lies in [0.5, 1), and returns e (0 for an all-zero A). *max_bits is a
/// shared word that is 0 and visible to every thread on entry; it is left holding the max.
template <typename T>
__device__ int scale_pow2(T* A, int count, double local_max, unsigned long long* max_bits) {
  // Non-negative doubles order like their bit patterns as unsigned integers.
  if (local_max > 0)
    atomicMax(max_bits, static_cast<unsigned long long>(__double_as_longlong(local_max)));
  __syncthreads();
  const double amax = __longlong_as_double(static_cast<long long>(*max_bits));
  int expo = 0;
  if (amax > 0) frexp(amax, &expo);  // amax = f·2^expo, f in [0.5, 1)
  if (expo != 0) {
    for (int idx = threadIdx.x; idx < count; idx += blockDim.x) A[idx] = ldexp(A[idx], -expo);
  }
  __syncthreads();
  return expo;
}

// Σ x_i·y_i over a group's column slices: per-lane partial sums in T, then an xor butterfly
// over the group's LANES lanes (all of them get bitwise-equal sums). `mask` names the lanes
// that execute the call (the whole warp, or just this group inside a group-uniform branch).
template <int LANES, int TM, typename T>
__device__ __forceinline__ T group_dot(const T* x, const T* y, int tiles, unsigned mask) {
  T acc = 0;
#pragma unroll
  for (int t = 0; t < TM; ++t) {
    if (t < tiles) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc = fma(x[4 * t + e], y[4 * t + e], acc);
    }
  }
#pragma unroll
  for (int off = 1; off < LANES; off <<= 1) acc += __shfl_xor_sync(mask, acc, off);
  return acc;
}

// The rotation of one pair from its Gram entries app = ‖x‖², aqq = ‖y‖², apq = xᵀy (apq != 0):
// returns whether |apq| > tol·‖x‖‖y‖ (the pair is not yet orthogonal), and then tan θ in *t and
// the pair's |cos| = |apq|/(‖x‖‖y‖) in *rel. Only the decision needs care: the rotation's c and
// s are computed from *t in double by the caller, so c² + s² = 1 to rounding whatever the error
// of *t, and an angle a few ulps off leaves a residual cosine that the next sweep removes.
// float: hardware approximations (MUFU rsqrt and reciprocal, about 2^-22 relative error) where
// app, aqq and apq are normal numbers, instead of three IEEE square roots and three divisions
// with their slow-path tests; the exact forms otherwise.
template <typename T>
__device__ __forceinline__ bool pair_angle_exact(T app, T aqq, T apq, T tol, T* t, T* rel) {
  *rel = fabs(apq) / (sqrt(app) * sqrt(aqq));
  if (!(fabs(apq) > tol * sqrt(app) * sqrt(aqq))) return false;
  const T zeta = (aqq - app) / (T(2) * apq);
  *t = fabs(zeta) > zeta_big<T>() ? T(0.5) / zeta
                                  : copysign(T(1), zeta) / (fabs(zeta) + sqrt(T(1) + zeta * zeta));
  return true;
}
template <typename T>
__device__ __forceinline__ bool pair_angle(T app, T aqq, T apq, T tol, T* t, T* rel) {
  return pair_angle_exact(app, aqq, apq, tol, t, rel);
}
// rsqrt.approx.ftz and rcp.approx.ftz: the MUFU instructions alone (rsqrtf and __fdividef add
// a rescaling of subnormal arguments, which pair_angle rules out). The emulation's rsqrtf and
// __fdividef model their error.
__device__ __forceinline__ float rsqrt_approx(float x) {
#ifdef ATTNPILOT_CUDA_EMU
  return rsqrtf(x);
#else
  float r;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
#endif
}
__device__ __forceinline__ float div_approx(float a, float b) {
#ifdef ATTNPILOT_CUDA_EMU
  return __fdividef(a, b);
#else
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(b));
  return a * r;
#endif
}
template <>
__device__ __forceinline__ bool pair_angle<float>(float app, float aqq, float apq, float tol,
                                                  float* t, float* rel) {
  constexpr float kNormalMin = 1.17549435e-38f;  // FLT_MIN
  // Subnormal or zero entries (the approximations flush them): the exact forms. Otherwise every
  // argument below is a normal number.
  if (!(app >= kNormalMin && aqq >= kNormalMin && fabsf(apq) >= kNormalMin))
    return pair_angle_exact(app, aqq, apq, tol, t, rel);
  *rel = fabsf(apq) * rsqrt_approx(app) * rsqrt_approx(aqq);
  if (!(*rel > tol)) return false;
  const float zeta = div_approx(aqq - app, 2.f * apq);
  const float az = fabsf(zeta);
  if (az > zeta_big<float>()) {
    *t = 0.5f / zeta;  // rare; exact (ζ may be infinite)
  } else {
    const float u = fmaf(zeta, zeta, 1.f);  // <= 1 + 1e36
    *t = copysignf(div_approx(1.f, az + u * rsqrt_approx(u)), zeta);
  }
  return true;
}

/// Sweeps of one-sided Jacobi on X = A[:, 0..npad) (m rows, leading dimension lda; columns past
/// n are zero) accumulating the rotations into V (n rows, ldv; the caller initialises it),
/// until converged (returns true) or after max_sweeps (false). Groups of LANES lanes own a
/// column pair; TM tiles of 4·LANES rows cover m, TMV cover n. `rotated` is a shared
/// int[kSweepSharedInts], `nrm` shared scratch of npad T. Threads past LANES·npad/2 take part in
/// the barriers and shuffles only.
///
/// Converged: a sweep rotated nothing (every pair |cos| <= tol), or, with lapack_stop, LAPACK
/// sgesvj's test on the sweep just done, in a slightly stricter form that needs one register:
/// with w the largest max(|cos| before, |sin|) of its rotations, w < sqrt(n)·tol and n·w² < tol
/// (sgesvj: max|cos| < sqrt(n)·tol and n·max|cos|·max|sin| < tol), i.e. its rotations were too
/// small to matter, so the confirming sweep that would rotate nothing is skipped. A numpy model
/// of this ordering (fp32, 128×128, 2026-12-05) with this form: 8.1 sweeps against 8.6 for 8
/// Gaussian matrices, 20 against 21-22 at condition number 1e6, 5 against 6 for repeated
/// singular values, no change for clustered ones; U and V orthogonal to 1.3e-6-3.8e-6 either
/// way. On the H100 (2026-12-05) it took 128×128 from 9.97 to 9.83 ms, about 1.5% (the sweep
/// counts suggested 5%).
///
/// TRACK: column norms are tracked, as LAPACK's sgesvj does: computed exactly at the start of
/// every sweep, then updated by each rotation (‖a_p'‖² = ‖a_p‖² − t·a_pᵀa_q,
/// ‖a_q'‖² = ‖a_q‖² + t·a_pᵀa_q), so a step computes one dot product instead of three; a norm
/// that drops below 1e-2 of the larger old one is recomputed (cancellation). A sweep's tests use
/// the exact norms of its start updated by its own rotations, which in the last sweeps are
/// tiny (or none), so the stopping decisions see norms within rounding of the exact ones. Emulated
/// in numpy (fp32, this ordering, 128×128): the same sweeps and accuracy as with three dot products
/// (V orthogonal to 1e-6–4e-6, σ to 1.4e-6·σ₁), 4–24% of rotations recomputing. Measured on the
/// H100 (2026-12-05): the top-r path's 128×12 and 128×20 solves ran faster with it (1.46
/// against 2.54 ms for the whole r = 8 update), while 64×64 ran 1.24x slower (more registers, one
/// block fewer per SM) and 128×128 no faster; the callers choose it for tall-skinny shapes only.
///
/// SCALED (scaled rotations, as LAPACK's sgesvj applies them through SROTM): column j
/// is stored as a_j/d_j and V's as v_j/d_j, with d_j (and 1/d_j) in double in dsc[j]
/// (dsc[npad + j]), shared scratch of 2·npad doubles. A rotation c·(x − t·y, t·x + y) then
/// multiplies the two scales by c and the stored columns take two FMAs per row (x − t·r·y and
/// y + t/r·x, r = d_y/d_x) instead of two products and two FMAs; c² + s² = 1 holds exactly in
/// the scales. A scale below scale_floor is folded into its column (rare), and all are folded at
/// the end, so A and V leave holding the true columns. In the emulation at 128×128 (fp32) V
/// came out orthogonal to 5e-7 against 2e-6 with plain rotations, σ to 1.7e-7·σ₁ against 5e-7.
/// But it measured slower on the H100 (2026-12-06: 1.10x at 32×32, 1.29x at 64×64, 1.12x at
/// 128×128; the scales' shared loads and stores, the double products and the swap's copies
/// cost more than the two FMAs per row saved), so it is opt-in (JacobiOptions).
template <typename T, int LANES, int TM, int TMV = TM, bool TRACK = false, bool FULL = false,
          bool SCALED = false>
__device__ bool sweeps(T* A, int lda, T* V, int ldv, int m, int n, int npad, T tol, int max_sweeps,
                       int* rotated, T* nrm, bool lapack_stop = true, double* dsc = nullptr,
                       double scale_floor = kScaleFloor) {
  static_assert(!(TRACK && SCALED), "tracked norms and scaled rotations do not combine");
  constexpr int TH = 4 * LANES;  // rows per tile
  const int tid = threadIdx.x, nt = blockDim.x;
  // FULL: the caller guarantees ceil(m/TH) == TM and ceil(n/TH) == TMV, and the tile loops lose
  // their bounds tests (predicates, branches and register moves in every step).
  const int ta = FULL ? TM : (m + TH - 1) / TH, tv = FULL ? TMV : (n + TH - 1) / TH;
  assert(!FULL || ((m + TH - 1) / TH == TM && (n + TH - 1) / TH == TMV));
  if (tid == 0) {
    for (int i = 0; i < kSweepSharedInts; ++i) rotated[i] = 0;
  }
  const int P = npad / 2;
  const int g = tid / LANES, l = tid % LANES;
  const bool active = g < P;
  // This group's lanes within the warp (for shuffles inside group-uniform branches).
  [[maybe_unused]] const unsigned gmask = ((1u << LANES) - 1u) << (LANES * ((tid % 32) / LANES));
  T fa[4 * TM], ma[4 * TM], fv[4 * TMV], mv[4 * TMV];
#pragma unroll
  for (int i = 0; i < 4 * TM; ++i) fa[i] = ma[i] = T(0);
#pragma unroll
  for (int i = 0; i < 4 * TMV; ++i) fv[i] = mv[i] = T(0);
  if constexpr (SCALED) {
    for (int j = tid; j < 2 * npad; j += nt) dsc[j] = 1.0;  // published by the first barrier
  }
  bool converged = false;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    const int slot = sweep & 1;
    float wmax = 0.f;  // this thread's largest max(|cos|, |sin|) of a rotation this sweep
    // Exact squared norms (the previous sweep's last barrier ordered every write of A).
    if constexpr (TRACK) {
      for (int j = tid; j < npad; j += nt) {
        const T* col = A + j * lda;
        T acc = 0;
        for (int i = 0; i < m; ++i) acc = fma(col[i], col[i], acc);
        nrm[j] = acc;
      }
    }
    __syncthreads();
    for (int h = P; h >= 1; h >>= 1) {
      const int base = active ? 2 * h * (g / h) : 0;
      const int kk = g & (h - 1);
      const int fcol = base + kk;
      bool dirty = false;
      T fn = 0;                                 // the fixed column's squared norm
      [[maybe_unused]] double df = 1, idf = 1;  // SCALED: the fixed column's scale, its inverse
      if (active) {
        load_col<LANES, TM>(A + fcol * lda, ta, l, fa);
        load_col<LANES, TMV>(V + fcol * ldv, tv, l, fv);
        if constexpr (TRACK) fn = nrm[fcol];
        if constexpr (SCALED) {
          df = dsc[fcol];
          idf = dsc[npad + fcol];
        }
      }
      for (int s = 0; s < h; ++s) {
        const int mcol = base + h + ((kk + s) & (h - 1));
        T aqq = 0;
        [[maybe_unused]] double dm = 1, idm = 1;  // SCALED: the moving column's scale, inverse
        bool folded = false;                      // SCALED: the moving column was folded on loading
        if (active) {
          load_col<LANES, TM>(A + mcol * lda, ta, l, ma);
          if constexpr (TRACK) aqq = nrm[mcol];
          if constexpr (SCALED) {
            dm = dsc[mcol];
            idm = dsc[npad + mcol];
            if (dm < scale_floor) {  // group-uniform; rare
              load_col<LANES, TMV>(V + mcol * ldv, tv, l, mv);
              scale_col<TM>(ma, ta, static_cast<T>(dm));
              scale_col<TMV>(mv, tv, static_cast<T>(dm));
              dm = idm = 1;
              folded = true;
            }
          }
        }
        // Every thread of the block takes part (idle groups never load and add zeros), so the
        // full mask holds.
        const T apq = group_dot<LANES, TM>(fa, ma, ta, 0xffffffffu);
        if constexpr (!TRACK) {
          fn = group_dot<LANES, TM>(fa, fa, ta, 0xffffffffu);
          aqq = group_dot<LANES, TM>(ma, ma, ta, 0xffffffffu);
        }
        // SCALED: the stored columns are the true ones over their scales d, so the Gram entries
        // below are the true ones over d_f·d_m, a common factor that leaves the angle, the test
        // and the output order unchanged. r = d_m/d_f.
        T app = fn;
        [[maybe_unused]] T r = 1, rinv = 1;
        if constexpr (SCALED) {
          r = static_cast<T>(dm * idf);
          rinv = static_cast<T>(df * idm);
          app = fn * rinv;
          aqq = aqq * r;
        }
        bool rot = false;
        T t, rel;
        if (active && apq != T(0) && pair_angle(app, aqq, apq, tol, &t, &rel)) {
          // c and s from t in double: rounded once to T they satisfy c² + s² = 1 to half an
          // ulp. Computed in float (2-3 ulp off) they cost V an order of magnitude of
          // orthogonality over the thousands of rotations of a 128×128 solve (2e-5 against
          // 2e-6, measured on the H100 and in an emulation of this ordering), so only tan θ
          // is computed in T: one double rsqrt per rotation instead of a chain of five.
          const double td = static_cast<double>(t);
          const double cd = rsqrt(1.0 + td * td);
          const T c = static_cast<T>(cd);
          const T sn = static_cast<T>(cd * td);
          // (c x − s y, s x + c y) has squared norms app − t·apq and aqq + t·apq. Keep the
          // larger column at the lower index (fixed < moving always) by swapping the two
          // outputs when needed: columns stay roughly sorted by norm, which cuts the sweeps
          // for clustered spectra (de Rijk's idea, inside the rotation). The swap selects the
          // coefficients, so a warp whose groups decide differently runs one rotation body.
          wmax = fmaxf(wmax, fmaxf(static_cast<float>(rel), fabsf(static_cast<float>(sn))));
          const T np = app - t * apq, nq = aqq + t * apq;
          const bool keep = np >= nq;
          // V's moving column is read only for a pair that rotates (in the last sweeps most
          // pairs do not), which also keeps it out of registers during the dot products.
          if (!folded) load_col<LANES, TMV>(V + mcol * ldv, tv, l, mv);
          if constexpr (SCALED) {
            // c·(x − t·y, t·x + y) with c moved into the scales: two FMAs per row instead of
            // two products and two FMAs. P = f − t·r·m and Q = m + t/r·f are the two outputs
            // over their scales c·d_f and c·d_m; the larger goes to the fixed column.
            const T mu = static_cast<T>(td * static_cast<double>(r));
            const T nu = static_cast<T>(td * static_cast<double>(rinv));
            scaled_rotate<TM>(fa, ma, ta, mu, nu);
            scaled_rotate<TMV>(fv, mv, tv, mu, nu);
            const double ic = (1.0 + td * td) * cd;  // 1/c
            const double pf = cd * df, ipf = ic * idf, qm = cd * dm, iqm = ic * idm;
            if (keep) {
              store_col<LANES, TM>(A + mcol * lda, ta, l, ma);
              store_col<LANES, TMV>(V + mcol * ldv, tv, l, mv);
              df = pf;
              idf = ipf;
              if (l == 0) {
                dsc[mcol] = qm;
                dsc[npad + mcol] = iqm;
              }
            } else {
              store_col<LANES, TM>(A + mcol * lda, ta, l, fa);
              store_col<LANES, TMV>(V + mcol * ldv, tv, l, fv);
#pragma unroll
              for (int i = 0; i < 4 * TM; ++i) fa[i] = ma[i];
#pragma unroll
              for (int i = 0; i < 4 * TMV; ++i) fv[i] = mv[i];
              df = qm;
              idf = iqm;
              if (l == 0) {
                dsc[mcol] = pf;
                dsc[npad + mcol] = ipf;
              }
            }
            if (df < scale_floor) {  // fold the fixed column's scale (rare)
              scale_col<TM>(fa, ta, static_cast<T>(df));
              scale_col<TMV>(fv, tv, static_cast<T>(df));
              df = idf = 1;
            }
          } else {
            const T c11 = keep ? c : sn, c12 = keep ? -sn : c, c21 = keep ? sn : c,
                    c22 = keep ? c : -sn;
            rotate<TM>(fa, ma, ta, c11, c12, c21, c22);
            rotate<TMV>(fv, mv, tv, c11, c12, c21, c22);
            fn = keep ? np : nq;
            T mn = keep ? nq : np;
            if constexpr (TRACK) {
              const T floor = T(1e-2) * (app > aqq ? app : aqq);
              if (fn < floor) fn = group_dot<LANES, TM>(fa, fa, ta, gmask);  // group-uniform
              if (mn < floor) mn = group_dot<LANES, TM>(ma, ma, ta, gmask);
              if (l == 0) nrm[mcol] = mn;
            } else {
              (void)mn;
            }
            store_col<LANES, TM>(A + mcol * lda, ta, l, ma);
            store_col<LANES, TMV>(V + mcol * ldv, tv, l, mv);
          }
          rot = true;
          dirty = true;
        } else if (SCALED && folded) {  // not rotated: the folded column goes back as it is
          store_col<LANES, TM>(A + mcol * lda, ta, l, ma);
          store_col<LANES, TMV>(V + mcol * ldv, tv, l, mv);
          if (l == 0) {
            dsc[mcol] = 1;
            dsc[npad + mcol] = 1;
          }
        }
        if (rot) rotated[slot] = 1;
        __syncthreads();
      }
      if (active && dirty) {
        store_col<LANES, TM>(A + fcol * lda, ta, l, fa);
        store_col<LANES, TMV>(V + fcol * ldv, tv, l, fv);
        if (TRACK && l == 0) nrm[fcol] = fn;
        if (SCALED && l == 0) {
          dsc[fcol] = df;
          dsc[npad + fcol] = idf;
        }
      }
      __syncthreads();
    }
    // The sweep's largest max(|cos|, |sin|): a warp max, then one shared atomic per warp.
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1)
      wmax = fmaxf(wmax, __shfl_xor_sync(0xffffffffu, wmax, off));
    if (tid % 32 == 0) atomicMax(rotated + 2 + slot, __float_as_int(wmax));
    __syncthreads();
    const int any = rotated[slot];
    const double w = __int_as_float(rotated[2 + slot]);
    if (tid == 0) {  // the other parity's words are read only after the barrier below
      rotated[slot ^ 1] = 0;
      rotated[2 + (slot ^ 1)] = 0;
    }
    __syncthreads();
    const double tl = static_cast<double>(tol), nd = static_cast<double>(n);
    if (!any || (lapack_stop && w < sqrt(nd) * tl && nd * w * w < tl)) {
      converged = true;
      break;
    }
  }
  if constexpr (SCALED) {  // the true columns: every stored column times its scale
    for (int idx = tid; idx < npad * lda; idx += nt) A[idx] *= static_cast<T>(dsc[idx / lda]);
    for (int idx = tid; idx < npad * ldv; idx += nt) V[idx] *= static_cast<T>(dsc[idx / ldv]);
    __syncthreads();
  }
  return converged;
}

/// σ_j = ‖a_j‖ (in double) of A's npad columns (m rows) into sig[npad], and order[r] = the
/// column of the r-th largest (ties by index, so zero padded columns come last).
template <typename T>
__device__ void column_order(const T* A, int lda, int m, int npad, double* sig, int* order) {
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int j = tid; j < npad; j += nt) {
    const T* col = A + j * lda;
    double acc = 0;
    for (int i = 0; i < m; ++i) {
      const double x = col[i];
      acc = fma(x, x, acc);
    }
    sig[j] = sqrt(acc);
  }
  __syncthreads();
  for (int j = tid; j < npad; j += nt) {
    const double sj = sig[j];
    int r = 0;
    for (int i = 0; i < npad; ++i) {
      const double si = sig[i];
      r += (si > sj || (si == sj && i < j)) ? 1 : 0;
    }
    order[r] = j;
  }
  __syncthreads();
}

/// Threads of one batched-kernel block for X with n columns: `lanes` per pair of the padded
/// columns, at least a warp.
__host__ __device__ inline int svd_block_threads(int n, int lanes) {
  const int t = lanes * (next_pow2(n < 2 ? 2 : n) / 2);
  return t < 32 ? 32 : t;
}

/// Dynamic shared memory of svd_block for X of m×n (m >= n), elem_bytes 4 or 8: X and V
/// (padded to npad columns), σ (double), the order (int), the column norms (T), the scaled
/// rotations' column scales and their inverses (double).
__host__ __device__ inline int64_t svd_block_shared_bytes(int m, int n, int elem_bytes, int lanes) {
  const int64_t npad = next_pow2(n < 2 ? 2 : n);
  return npad * (leading_dim(m, elem_bytes, lanes) + leading_dim(n, elem_bytes, lanes)) *
             elem_bytes +
         npad * 8 + npad * 4 + npad * elem_bytes + 2 * npad * 8;
}

/// The batched Jacobi SVD of matrix b of p (jacobi_svd_kernel's whole body; see jacobi_svd.cu):
/// load (transposed when p.transpose) with the NaN/Inf check, scaling, sweeps, σ order, then
/// U_X, V_X, σ and the status written to global memory. smem: svd_block_shared_bytes, 16-byte
/// aligned; rotated, max_bits: shared scratch. Called by every thread of a block of
/// svd_block_threads(n, LANES) threads.
template <typename T, int LANES, int TM, bool TRACK, bool FULL = false, bool SCALED = false>
__device__ void svd_block(const JacobiLaunch& p, int64_t b, unsigned char* smem, int* rotated,
                          unsigned long long* max_bits) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int m = p.transpose ? p.cols_in : p.rows_in;
  const int n = p.transpose ? p.rows_in : p.cols_in;
  const int k = p.k;
  const int npad = next_pow2(n < 2 ? 2 : n);
  const int lda = leading_dim(m, sizeof(T), LANES), ldv = leading_dim(n, sizeof(T), LANES);
  T* A = reinterpret_cast<T*>(smem);  // column j at A + j*lda
  T* V = A + static_cast<int64_t>(npad) * lda;
  double* sig = reinterpret_cast<double*>(V + static_cast<int64_t>(npad) * ldv);
  int* order = reinterpret_cast<int*>(sig + npad);
  T* nrm = reinterpret_cast<T*>(order + npad);  // the sweeps' column norms (npad >= 2: aligned)
  double* dsc = reinterpret_cast<double*>(nrm + npad);  // scales, inverses (npad even: aligned)

  // 1. X (zero-padded) and V = I into shared memory; non-finite check; power-of-two scaling.
  for (int idx = tid; idx < npad * lda; idx += nt) A[idx] = T(0);
  for (int idx = tid; idx < npad * ldv; idx += nt) {
    const int j = idx / ldv, i = idx - j * ldv;
    V[idx] = (i == j && j < n) ? T(1) : T(0);
  }
  if (tid == 0) *max_bits = 0ull;
  __syncthreads();
  const T* a = static_cast<const T*>(p.a) + b * p.rows_in * p.cols_in;
  const int total = p.rows_in * p.cols_in;
  double local_max = 0;
  int bad = 0;
  for (int idx = tid; idx < total; idx += nt) {  // coalesced over the input's storage order
    const T x = a[idx];
    const int r = idx / p.cols_in, c = idx - r * p.cols_in;
    const int i = p.transpose ? c : r, j = p.transpose ? r : c;
    if (!isfinite(x)) {
      bad = 1;
    } else {
      local_max = fmax(local_max, fabs(static_cast<double>(x)));
    }
    A[j * lda + i] = x;
  }
  if (__syncthreads_or(bad)) {
    if (tid == 0) p.status[b] = kJacobiNonFinite;
    return;  // the whole block leaves together
  }
  const int expo = scale_pow2(A, npad * lda, local_max, max_bits);

  // 2. Sweeps; 3. σ_j and their descending order.
  const bool converged = sweeps<T, LANES, TM, TM, TRACK, FULL, SCALED>(
      A, lda, V, ldv, m, n, npad, static_cast<T>(p.tol), p.max_sweeps, rotated, nrm, true, dsc);
  column_order(A, lda, m, npad, sig, order);
  // Columns with σ_j <= thr have no direction (exact zeros, or below 1e-30 of σ₁): their U
  // columns are written as 0 and the host completes them to an orthonormal set.
  const double thr = sig[order[0]] * 1e-30;

  // 4. Outputs, coalesced: U_X [m, k], V_X [n, k], σ [k].
  T* ux = static_cast<T*>(p.ux) + b * m * k;
  T* vx = static_cast<T*>(p.vx) + b * n * k;
  T* so = static_cast<T*>(p.s) + b * k;
  for (int idx = tid; idx < m * k; idx += nt) {
    const int i = idx / k, r = idx - i * k;
    const int j = order[r];
    const double sj = sig[j];
    ux[idx] = sj > thr ? static_cast<T>(static_cast<double>(A[j * lda + i]) / sj) : T(0);
  }
  for (int idx = tid; idx < n * k; idx += nt) {
    const int i = idx / k, r = idx - i * k;
    vx[idx] = V[order[r] * ldv + i];
  }
  for (int r = tid; r < k; r += nt) so[r] = static_cast<T>(ldexp(sig[order[r]], expo));
  if (tid == 0) {
    int st = converged ? 0 : kJacobiNotConverged;
    for (int r = 0; r < k; ++r)
      if (!(sig[order[r]] > thr)) st |= kJacobiZeroColumns;
    p.status[b] = st;
  }
}

}  // namespace attnpilot::perturbation::cuda::jacobi
