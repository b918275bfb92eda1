#pragma once
/// Block-level device code of the tall path's passes over X (tall_qr.cu). In a header, so the
/// CPU emulation (tests/cuda_emu) runs the same source as the GPU:
///
///   gram_block     G += Zᵀ Z over rows [r0, r1) of Z [rows, n]
///                  (Z float or double; float64 products and sums: a float product is exact
///                  in float64, so the Gram matrix of float data carries no rounding from the
///                  products, only from the float64 sums)
///   product_block  Y = X W over rows [r0, r1) of X [rows, n], W [n, k] float64; float64 sums,
///                  Y rounded to its type (float or double)
///
/// Both stage row chunks of the input in shared memory as float64 and give each thread an 8×8
/// tile of the output, strided (thread (ti, tj) of a T×T grid owns entries (ti + T·a, tj + T·b),
/// a, b < 8), so that a warp's shared-memory reads are consecutive float64s (conflict-free) and
/// each read feeds 8 FMAs. The Gram matrix is symmetric and thread (tj, ti)'s entries are the
/// transposes of thread (ti, tj)'s, so gram_block runs only the T(T+1)/2 threads with ti <= tj
/// (each writes its entries and their mirror images): 56% of the products at n = 64, 53% at 128.
/// Why not cuBLAS: its float64 GEMMs need a float64 copy of X (a cast pass that writes twice X's
/// bytes) and write float64 results; these read the float input once per pass and write float
/// outputs.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace attnpilot::perturbation::cuda::tall {

constexpr int kProductThreads = 128;
constexpr int kTile = 8;  ///< outputs per thread along each dimension

/// n padded to the kernels' widths: 32, 64 or 128 (0 when n > 128).
__host__ __device__ constexpr int padded_width(int n) {
  return n <= 32 ? 32 : n <= 64 ? 64 : n <= 128 ? 128 : 0;
}
/// Threads of a gram_block group: one per tile (ti, tj), ti <= tj, of the T×T grid (T = np/8).
__host__ __device__ constexpr int gram_pairs(int np) { return (np / 8) * (np / 8 + 1) / 2; }
/// Groups of gram_block (each takes every groups-th row of a chunk): about 256 threads in all.
__host__ __device__ constexpr int gram_groups(int np) {
  return (256 + gram_pairs(np) / 2) / gram_pairs(np);
}
/// Threads of a gram_block: 260 (np = 32), 252 (64) or 272 (128).
__host__ __device__ constexpr int gram_threads(int np) { return gram_pairs(np) * gram_groups(np); }
/// Rows per staged chunk of gram_block: about 32 KB of float64.
__host__ __device__ constexpr int gram_chunk_rows(int np) { return 4096 / np; }
/// Dynamic shared memory of gram_block, bytes: the chunk (np + 1 doubles per row), also used as
/// the cross-group reduction buffer (np·np doubles), whichever is larger.
__host__ __device__ constexpr int64_t gram_shared_bytes(int np) {
  return int64_t(8) *
         (gram_chunk_rows(np) * (np + 1) > np * np ? gram_chunk_rows(np) * (np + 1) : np * np);
}
/// Rows per staged chunk of product_block: kTile rows per thread row of the thread grid.
__host__ __device__ constexpr int product_chunk_rows(int np) {
  return kTile * (kProductThreads / (np / kTile));
}
/// Dynamic shared memory of product_block, bytes: W (np × np) and the chunk.
__host__ __device__ constexpr int64_t product_shared_bytes(int np) {
  return int64_t(8) * (int64_t(np) * np + int64_t(product_chunk_rows(np)) * (np + 1));
}

/// Stages rows [c0, c0 + rows) of z (row stride ld, n columns) as float64 into s (row stride
/// np + 1); columns n..np-1 are left as they are (zeroed once by the caller).
template <typename T, int NT>
__device__ __forceinline__ void stage_rows(const T* z, int64_t ld, int n, int64_t c0, int rows,
                                           double* s, int np) {
  const int total = rows * n;
  for (int e = threadIdx.x; e < total; e += NT) {
    const int r = e / n, c = e - r * n;
    s[r * (np + 1) + c] = static_cast<double>(z[(c0 + r) * ld + c]);
  }
}

/// G[i, j] += Σ_{r0 <= r < r1} Z[r, i] Z[r, j] for i, j < n (atomic float64 adds into g, row
/// stride n). Called by all gram_threads(NP) threads of a block; smem holds
/// gram_shared_bytes(NP).
template <typename T, int NP>
__device__ void gram_block(const T* z, int64_t ld, int n, int64_t r0, int64_t r1, double* g,
                           double* smem) {
  constexpr int kT = NP / kTile;                 // tile grid kT × kT; its upper triangle runs
  constexpr int kGroupThreads = gram_pairs(NP);  // 10, 36 or 136
  constexpr int kGroups = gram_groups(NP);       // rows are dealt out to groups
  constexpr int kThreads = gram_threads(NP);
  constexpr int kChunk = gram_chunk_rows(NP);
  constexpr int kLd = NP + 1;
  const int tid = threadIdx.x, grp = tid / kGroupThreads;
  int ti = 0, tj = tid % kGroupThreads;  // the (tid % pairs)-th pair ti <= tj, row by row
  while (tj >= kT - ti) {
    tj -= kT - ti;
    ++ti;
  }
  tj += ti;
  for (int e = tid; e < kChunk * kLd; e += kThreads) smem[e] = 0.0;
  double acc[kTile][kTile];
#pragma unroll
  for (int a = 0; a < kTile; ++a)
#pragma unroll
    for (int b = 0; b < kTile; ++b) acc[a][b] = 0.0;
  for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
    const int rows = r1 - c0 < kChunk ? static_cast<int>(r1 - c0) : kChunk;
    __syncthreads();  // the previous chunk is consumed (and the zero fill is done)
    stage_rows<T, kThreads>(z, ld, n, c0, rows, smem, NP);
    __syncthreads();
    for (int k = grp; k < rows; k += kGroups) {
      const double* row = smem + k * kLd;
      double x[kTile], y[kTile];
#pragma unroll
      for (int a = 0; a < kTile; ++a) {
        x[a] = row[ti + kT * a];
        y[a] = row[tj + kT * a];
      }
#pragma unroll
      for (int a = 0; a < kTile; ++a)
#pragma unroll
        for (int b = 0; b < kTile; ++b) acc[a][b] = fma(x[a], y[b], acc[a][b]);
    }
  }
  // Groups add their tiles and the tiles' mirror images in turn into the (now free) shared
  // buffer, which then holds all of G (the tiles ti <= tj and their mirrors cover each entry
  // once per group); then one atomic per entry.
  for (int gi = 0; gi < kGroups; ++gi) {
    __syncthreads();
    if (grp == gi) {
#pragma unroll
      for (int a = 0; a < kTile; ++a)
#pragma unroll
        for (int b = 0; b < kTile; ++b) {
          const int i = ti + kT * a, j = tj + kT * b;
          double& red = smem[i * NP + j];
          red = gi == 0 ? acc[a][b] : red + acc[a][b];
          if (ti != tj) {
            double& mirror = smem[j * NP + i];
            mirror = gi == 0 ? acc[a][b] : mirror + acc[a][b];
          }
        }
    }
  }
  __syncthreads();
  for (int e = tid; e < NP * NP; e += kThreads) {
    const int i = e / NP, j = e - i * NP;
    if (i < n && j < n) atomicAdd(g + i * n + j, smem[e]);
  }
}

/// Y[r, c] = Σ_i X[r, i] W[i, c] for r0 <= r < r1, c < k (X row stride ldx, n columns; W
/// [n, k] float64 row-major; Y row stride ldy). Called by all kProductThreads threads of a
/// block; smem holds product_shared_bytes(NP).
template <typename T, typename TO, int NP>
__device__ void product_block(const T* x, int64_t ldx, int n, const double* w, int k, int64_t r0,
                              int64_t r1, TO* y, int64_t ldy, double* smem) {
  constexpr int kTc = NP / kTile;                 // thread columns
  constexpr int kTr = kProductThreads / kTc;      // thread rows
  constexpr int kChunk = product_chunk_rows(NP);  // kTile · kTr
  constexpr int kLd = NP + 1;
  double* ws = smem;            // [NP][NP], zero past n rows and k columns
  double* xs = smem + NP * NP;  // [kChunk][kLd], zero past n columns
  const int tid = threadIdx.x, tr = tid / kTc, tc = tid % kTc;
  for (int e = tid; e < NP * NP; e += kProductThreads) {
    const int i = e / NP, c = e - i * NP;
    ws[e] = i < n && c < k ? w[i * k + c] : 0.0;
  }
  for (int e = tid; e < kChunk * kLd; e += kProductThreads) xs[e] = 0.0;
  for (int64_t c0 = r0; c0 < r1; c0 += kChunk) {
    const int rows = r1 - c0 < kChunk ? static_cast<int>(r1 - c0) : kChunk;
    __syncthreads();
    stage_rows<T, kProductThreads>(x, ldx, n, c0, rows, xs, NP);
    __syncthreads();
    double acc[kTile][kTile];
#pragma unroll
    for (int a = 0; a < kTile; ++a)
#pragma unroll
      for (int b = 0; b < kTile; ++b) acc[a][b] = 0.0;
    for (int i = 0; i < n; ++i) {
      double xv[kTile], wv[kTile];
#pragma unroll
      for (int a = 0; a < kTile; ++a) {
        xv[a] = xs[(tr + kTr * a) * kLd + i];
        wv[a] = ws[i * NP + tc + kTc * a];
      }
#pragma unroll
      for (int a = 0; a < kTile; ++a)
#pragma unroll
        for (int b = 0; b < kTile; ++b) acc[a][b] = fma(xv[a], wv[b], acc[a][b]);
    }
#pragma unroll
    for (int a = 0; a < kTile; ++a) {
      const int r = tr + kTr * a;
      if (r >= rows) continue;
#pragma unroll
      for (int b = 0; b < kTile; ++b) {
        const int c = tc + kTc * b;
        if (c < k) y[(c0 + r) * ldy + c] = static_cast<TO>(acc[a][b]);
      }
    }
  }
}

}  // namespace attnpilot::perturbation::cuda::tall
