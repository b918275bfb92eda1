#pragma once
/// Block-level device code of the low-rank estimator's projections, step (1) of
/// block_estimator_kernels.h (block_estimator.cu's projection_kernel and projection_rows_kernel
/// are thin wrappers around it):
///
///   out[b, h, j, :] = x[b, h / (heads / x_heads), row(j), :] · a[b or 0, h, :, :rank] · scale
///
/// zero past column rank; row(j) = j, or the sampled query row of slot j (ProjectionLaunch).
/// Plain fp32 FMAs, no inline PTX, so tests also run it on the CPU through
/// tests/cuda_emu/cuda_emu.h (which defines ATTNPILOT_CUDA_EMU and the CUDA names used here) and
/// tests/cuda_emu/cuda_emu_mma.h (the 16-bit storage types).
///
/// Two variants, chosen by ProjectionLaunch::rows_per_thread (ROWS below):
///
/// ROWS = 1 (projection_block_one; the default, measured): one output row per thread, CTAs of
/// kProjThreads rows. a·scale ([d][R] fp32, zero past rank) is loaded once into shared memory;
/// rows whose storage is 16-byte aligned are staged through shared memory in chunks of
/// kProjCols columns (consecutive threads on consecutive 16-byte pieces of a row chunk:
/// coalesced), then each thread accumulates its row's R outputs reading a as float4 broadcasts:
/// one LDS.128 per 4 FMAs. On the H100 (2026-12-05, k [1, 32, 32768, 128] bf16, R = 16) it ran
/// 251 µs against a ~0.1 ms memory floor, bound by those broadcasts (Nsight Compute). Its
/// shared memory, d·R·4 bytes plus 128 staged rows, exceeds 48 KB for large d·R (the launcher
/// opts in).
///
/// ROWS > 1 (projection_block_rows; rows_per_thread = 4, or 2 at rank_pad 64, whose 4·64
/// accumulators would not fit in the 255 registers of a thread): thread t of a CTA owns rows
/// j0 + t + 128·i, i < ROWS (CTAs of 128·ROWS rows), so each float4 of a read from shared
/// memory feeds 4·ROWS FMAs instead of 4. Consecutive threads keep consecutive rows: the staged
/// row reads stay conflict-free (rows 80 bytes apart) and each of a warp's ROWS output stores
/// covers 32 consecutive rows. To keep shared memory under 48 KB (no opt-in) with 4x the staged
/// rows, the chunk is 64 bytes of each row (16 fp32 or 32 bf16/fp16 columns) and a is staged
/// per chunk (its kCols·R rows of the chunk) instead of whole, plus a table of the rows' input
/// offsets: 48 KB at most over the launched instantiations (bf16/fp16 R = 32: 4 KB of a, 4 KB of
/// table, 40 KB of rows; 30 KB at R = 64 with 2 rows). Each thread issues its chunk's
/// global loads in batches of kProjLoadBatch 16-byte loads before storing any (more bytes in
/// flight than a load-store loop). Rows that are not 16-byte aligned take scalar loads from
/// global memory (ROWS of them per column). Expected effect: the shared-memory traffic per FMA
/// drops ~4x (R = 16 bf16: 4 a broadcasts + 0.5 row loads per 64 FMAs instead of 4 + 0.125 per
/// 16), which should bring the key projection toward its memory floor; costs: 64-byte instead
/// of 128-byte row chunks, 2x the barriers per row, and more registers (ptxas, sm_90: 113-130
/// at R <= 16, ~205 at R = 32, 210-230 at R = 64 with 2 rows, no spills: 2-3 CTAs of 4 warps per
/// SM). Measured (H100, 2026-12-06, the estimator bench's kproj rows, k [1, 32, 32768, 128]
/// bf16): 0.152 / 0.260 / 0.515 / 0.982 ms against one row's 0.166 / 0.242 / 0.407 / 1.006 at
/// rank 8 / 16 / 32 / 64: no better, so ROWS = 1 stays the default.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>

#include "attention/cuda/block_estimator_kernels.h"

namespace attnpilot::attention::cuda::proj {

/// Threads per CTA of both variants.
inline constexpr int kProjThreads = 128;
/// Input columns per staged chunk of the one-row variant.
inline constexpr int kProjCols = 64;
/// Bytes of each row per staged chunk of the multi-row variant.
inline constexpr int kProjChunkBytes = 64;
/// 16-byte global loads per thread in flight at once while staging a chunk (multi-row variant).
inline constexpr int kProjLoadBatch = 4;

/// Rows per thread of the kernel that runs rows_per_thread (1 or 4) at this padded rank: 4
/// becomes 2 at rank_pad 64 (4·64 fp32 accumulators exceed a thread's 255 registers).
__host__ __device__ constexpr int projection_rows_per_thread(int rows_per_thread, int rank_pad) {
  return rows_per_thread > 1 && rank_pad >= 64 ? 2 : rows_per_thread;
}

/// Output rows per CTA of the variant with `rows` rows per thread.
__host__ __device__ constexpr int64_t projection_cta_rows(int rows) {
  return int64_t(kProjThreads) * rows;
}

/// Staged row lengths (elements: the chunk plus 16 bytes, so the rows of a quarter warp's
/// 16-byte reads fall in distinct banks) and chunk widths (columns).
template <typename T>
__host__ __device__ constexpr int proj_row_ld() {
  return kProjCols + 16 / static_cast<int>(sizeof(T));
}
template <typename T>
__host__ __device__ constexpr int proj_chunk_cols() {
  return kProjChunkBytes / static_cast<int>(sizeof(T));
}
template <typename T>
__host__ __device__ constexpr int proj_chunk_ld() {
  return proj_chunk_cols<T>() + 16 / static_cast<int>(sizeof(T));
}

/// Dynamic shared memory of a CTA (bytes) of the variant with `rows` rows per thread.
template <typename T>
__host__ __device__ constexpr int64_t projection_smem_bytes(int rows, int d, int rank_pad) {
  return rows == 1 ? int64_t(d) * rank_pad * 4 +
                         int64_t(kProjThreads) * proj_row_ld<T>() * int64_t(sizeof(T))
                   : int64_t(proj_chunk_cols<T>()) * rank_pad * 4 + projection_cta_rows(rows) * 8 +
                         projection_cta_rows(rows) * proj_chunk_ld<T>() * int64_t(sizeof(T));
}

/// Whether the rows are staged with 16-byte loads (x, the head dim and the strides 16-byte
/// aligned for elements of `elem_bytes`), else read with scalar loads.
__host__ __device__ inline bool projection_vectorized(const ProjectionLaunch& p, int elem_bytes) {
  const int64_t vec = 16 / elem_bytes;
  return reinterpret_cast<uintptr_t>(p.x) % 16 == 0 && p.d % vec == 0 && p.x_stride[0] % vec == 0 &&
         p.x_stride[1] % vec == 0 && p.x_stride[2] % vec == 0;
}

__device__ __forceinline__ float load_elem(const float* p) { return *p; }
__device__ __forceinline__ float load_elem(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_elem(const __half* p) { return __half2float(*p); }

/// Element u (compile-time after unrolling) of a 16-byte piece of T, by bit operations (no
/// local copy of the piece).
__device__ __forceinline__ unsigned piece_word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}
template <typename T>
__device__ __forceinline__ float piece_elem(const uint4& v, int u);
template <>
__device__ __forceinline__ float piece_elem<float>(const uint4& v, int u) {
  return __uint_as_float(piece_word(v, u));
}
template <>
__device__ __forceinline__ float piece_elem<__nv_bfloat16>(const uint4& v, int u) {
  const unsigned w = piece_word(v, u / 2);
  return __uint_as_float(u % 2 == 0 ? w << 16 : w & 0xffff0000u);
}
template <>
__device__ __forceinline__ float piece_elem<__half>(const uint4& v, int u) {
  const unsigned w = piece_word(v, u / 2);
  const unsigned short bits = static_cast<unsigned short>(u % 2 == 0 ? w & 0xffffu : w >> 16);
#ifdef ATTNPILOT_CUDA_EMU
  return __half2float(__half{bits});  // tests/cuda_emu/cuda_emu_mma.h's storage type
#else
  return __half2float(__ushort_as_half(bits));
#endif
}

/// Input row of output row j (< p.rows_out): j itself, or slot (qb, t) of the sampled rows.
__device__ __forceinline__ int64_t projection_source_row(const ProjectionLaunch& p, int64_t j) {
  if (p.sample_block <= 0) return j;
  constexpr int kRows = kEstimatorSampleRows;
  const int64_t qb = j / kRows, t = j % kRows, bs = p.sample_block;
  const int64_t rows = p.n_in - qb * bs < bs ? p.n_in - qb * bs : bs;
  const int64_t ns = rows < kRows ? rows : kRows;
  const int64_t tt = t < ns - 1 ? t : ns - 1;
  return qb * bs + rows - 1 - (tt * rows) / ns;
}

/// One row per thread: output rows tile·kProjThreads + threadIdx.x of head h of batch b.
/// `smem`: projection_smem_bytes<T>(1, d, R) bytes, 16-byte aligned. Every thread of a CTA of
/// kProjThreads calls it (it holds barriers). R must equal p.rank_pad.
template <typename T, int R>
__device__ inline void projection_block_one(const ProjectionLaunch& p, int64_t tile, int h, int b,
                                            unsigned char* smem, bool vectorized) {
  float* as = reinterpret_cast<float*>(smem);             // [d][R], zero past column rank
  T* xs = reinterpret_cast<T*>(as + p.d * R);             // [kProjThreads][proj_row_ld] staged rows
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  constexpr int kLd = proj_row_ld<T>();
  const int tid = threadIdx.x, d = p.d;
  const float* ag = p.a + (p.a_batch == 1 ? 0 : b) * p.a_stride[0] + h * p.a_stride[1];
  for (int e = tid; e < d * R; e += kProjThreads) {
    const int i = e / R, c = e % R;
    as[e] = c < p.rank ? ag[i * p.a_stride[2] + c] * p.scale : 0.f;
  }
  const int64_t j0 = tile * kProjThreads;
  const int xh = h / (p.heads / p.x_heads);
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride[0] + xh * p.x_stride[1];
  const auto source = [&](int64_t j) -> const T* {
    return xb + projection_source_row(p, j) * p.x_stride[2];
  };
  const int64_t j = j0 + tid;
  const bool mine = j < p.rows_out;
  float acc[R];
#pragma unroll
  for (int c = 0; c < R; ++c) acc[c] = 0.f;
  const auto accumulate = [&](float x, int i) {
    const float4* a4 = reinterpret_cast<const float4*>(as + i * R);
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      const float4 w = a4[q];
      acc[4 * q + 0] = fmaf(x, w.x, acc[4 * q + 0]);
      acc[4 * q + 1] = fmaf(x, w.y, acc[4 * q + 1]);
      acc[4 * q + 2] = fmaf(x, w.z, acc[4 * q + 2]);
      acc[4 * q + 3] = fmaf(x, w.w, acc[4 * q + 3]);
    }
  };
  if (vectorized) {
    const int64_t nrows = p.rows_out - j0 < kProjThreads ? p.rows_out - j0 : kProjThreads;
    for (int c0 = 0; c0 < d; c0 += kProjCols) {
      const int pieces = (d - c0 < kProjCols ? d - c0 : kProjCols) / kVec;
      __syncthreads();  // a is in place; the previous chunk is consumed
      for (int e = tid; e < nrows * pieces; e += kProjThreads) {
        const int r = e / pieces, pc = e - r * pieces;
        *reinterpret_cast<uint4*>(xs + r * kLd + pc * kVec) =
            *reinterpret_cast<const uint4*>(source(j0 + r) + c0 + pc * kVec);
      }
      __syncthreads();
      if (mine) {
        for (int pc = 0; pc < pieces; ++pc) {
          const uint4 v = *reinterpret_cast<const uint4*>(xs + tid * kLd + pc * kVec);
          const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
          for (int u = 0; u < kVec; ++u) accumulate(load_elem(e + u), c0 + pc * kVec + u);
        }
      }
    }
  } else {
    __syncthreads();
    if (mine) {
      const T* row = source(j);
      for (int i = 0; i < d; ++i) accumulate(load_elem(row + i), i);
    }
  }
  if (!mine) return;
  float4* out = reinterpret_cast<float4*>(
      p.out + ((static_cast<int64_t>(b) * p.heads + h) * p.rows_out + j) * R);
#pragma unroll
  for (int q = 0; q < R / 4; ++q)
    out[q] = make_float4(acc[4 * q], acc[4 * q + 1], acc[4 * q + 2], acc[4 * q + 3]);
}

/// ROWS rows per thread: output rows tile·128·ROWS + threadIdx.x + 128·i (i < ROWS) of head h of
/// batch b. `smem`: projection_smem_bytes<T>(ROWS, d, R) bytes, 16-byte aligned. Every thread
/// of a CTA of kProjThreads calls it (it holds barriers). R must equal p.rank_pad.
template <typename T, int R, int ROWS>
__device__ inline void projection_block_rows(const ProjectionLaunch& p, int64_t tile, int h, int b,
                                             unsigned char* smem, bool vectorized) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));  // elements per 16-byte load
  constexpr int kCols = proj_chunk_cols<T>();             // columns per chunk
  constexpr int kLd = proj_chunk_ld<T>();
  constexpr int kPieces = kCols / kVec;  // 16-byte pieces of a full chunk row (4)
  constexpr int kCtaRows = kProjThreads * ROWS;
  constexpr int kPieceLoads = kCtaRows * kPieces / kProjThreads;  // per thread per chunk
  constexpr int kBatch = kPieceLoads < kProjLoadBatch ? kPieceLoads : kProjLoadBatch;
  constexpr int kALoads = kCols * R / kProjThreads;
  static_assert(kPieceLoads % kBatch == 0 && kCols * R % kProjThreads == 0, "whole loops");
  float* as = reinterpret_cast<float*>(smem);  // [kCols][R]: the chunk's rows of a·scale
  // [kCtaRows]: element offset of each output row's input row (0 past rows_out). A table, not
  // registers: the staging loads of a thread span 4·ROWS rows.
  int64_t* src = reinterpret_cast<int64_t*>(as + kCols * R);
  T* xs = reinterpret_cast<T*>(src + kCtaRows);     // [kCtaRows][kLd] staged row chunks
  constexpr int kRowStep = kProjThreads / kPieces;  // rows between a thread's staging loads
  // Compute from staged rows one column at a time (else by 16-byte pieces); see below.
  constexpr bool kPerColumn = R * ROWS >= 128;
  const int tid = threadIdx.x, d = p.d;
  const int r_mine = tid / kPieces, pc_mine = tid % kPieces;  // staging: first row, piece
  const float* ag = p.a + (p.a_batch == 1 ? 0 : b) * p.a_stride[0] + h * p.a_stride[1];
  const int64_t j0 = tile * kCtaRows;
  const int nrows = static_cast<int>(p.rows_out - j0 < kCtaRows ? p.rows_out - j0 : kCtaRows);
  const int xh = h / (p.heads / p.x_heads);
  const T* xb = static_cast<const T*>(p.x) + b * p.x_stride[0] + xh * p.x_stride[1];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int e = tid + kProjThreads * r;
    src[e] = e < nrows ? projection_source_row(p, j0 + e) * p.x_stride[2] : 0;
  }
  float acc[ROWS][R];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int c = 0; c < R; ++c) acc[r][c] = 0.f;
  // x[r] times row i of the staged a, into row r's accumulators: each float4 feeds 4·ROWS FMAs.
  const auto accumulate = [&](const float(&x)[ROWS], int i) {
    const float4* a4 = reinterpret_cast<const float4*>(as + i * R);
#pragma unroll
    for (int q = 0; q < R / 4; ++q) {
      const float4 w = a4[q];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        acc[r][4 * q + 0] = fmaf(x[r], w.x, acc[r][4 * q + 0]);
        acc[r][4 * q + 1] = fmaf(x[r], w.y, acc[r][4 * q + 1]);
        acc[r][4 * q + 2] = fmaf(x[r], w.z, acc[r][4 * q + 2]);
        acc[r][4 * q + 3] = fmaf(x[r], w.w, acc[r][4 * q + 3]);
      }
    }
  };
  for (int c0 = 0; c0 < d; c0 += kCols) {
    const int cols = d - c0 < kCols ? d - c0 : kCols;
    const int pieces = cols / kVec;  // vectorized: d is a multiple of kVec
    __syncthreads();  // the previous chunk is consumed (first chunk: src is in place)
    // The chunk's rows of a·scale (zero past rank): loads first, stored after the row loads.
    float areg[kALoads];
#pragma unroll
    for (int l = 0; l < kALoads; ++l) {
      const int e = tid + l * kProjThreads, i = e / R, c = e % R;
      areg[l] = i < cols && c < p.rank ? ag[int64_t(c0 + i) * p.a_stride[2] + c] * p.scale : 0.f;
    }
    if (vectorized && pc_mine < pieces) {
      // Piece pc_mine of rows r_mine + 32·l, l < 4·ROWS: a quarter warp reads two rows' 64
      // bytes; kBatch loads in flight per thread. Shared addresses are compile-time offsets.
      const T* gx = xb + c0 + pc_mine * kVec;
      T* sx = xs + r_mine * kLd + pc_mine * kVec;
#pragma unroll 1
      for (int l0 = 0; l0 < kPieceLoads; l0 += kBatch) {
        uint4 v[kBatch];
#pragma unroll
        for (int l = 0; l < kBatch; ++l) {
          const int r = r_mine + (l0 + l) * kRowStep;
          if (r < nrows) v[l] = *reinterpret_cast<const uint4*>(gx + src[r]);
        }
#pragma unroll
        for (int l = 0; l < kBatch; ++l)
          if (r_mine + (l0 + l) * kRowStep < nrows)
            *reinterpret_cast<uint4*>(sx + (l0 + l) * kRowStep * kLd) = v[l];
      }
    }
#pragma unroll
    for (int l = 0; l < kALoads; ++l) as[tid + l * kProjThreads] = areg[l];
    __syncthreads();
    if (vectorized && kPerColumn) {
      // One column at a time, each row's element a 2- or 4-byte shared load (R·ROWS >= 128:
      // those loads are few next to the R/4 float4s of a, and unrolling whole 16-byte pieces
      // of kVec columns made ptxas hold too many float4s of a at once).
      const T* xr = xs + tid * kLd;
#pragma unroll 1
      for (int i = 0; i < cols; ++i) {
        float x[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) x[r] = load_elem(xr + r * kProjThreads * kLd + i);
        accumulate(x, i);
      }
    } else if (vectorized) {
      // Rows past rows_out (the last tile) accumulate stale staged data, never stored.
#pragma unroll 1
      for (int pc = 0; pc < pieces; ++pc) {
        uint4 v[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
          v[r] = *reinterpret_cast<const uint4*>(xs + (tid + kProjThreads * r) * kLd + pc * kVec);
#pragma unroll
        for (int u = 0; u < kVec; ++u) {
          float x[ROWS];
#pragma unroll
          for (int r = 0; r < ROWS; ++r) x[r] = piece_elem<T>(v[r], u);
          accumulate(x, pc * kVec + u);
        }
      }
    } else {
      // Scalar loads of this thread's rows from global memory (rows past rows_out read row 0).
#pragma unroll 1
      for (int i = 0; i < cols; ++i) {
        float x[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) x[r] = load_elem(xb + src[tid + kProjThreads * r] + c0 + i);
        accumulate(x, i);
      }
    }
  }
  float* out = p.out + (static_cast<int64_t>(b) * p.heads + h) * p.rows_out * R;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const int64_t j = j0 + tid + int64_t(kProjThreads) * r;
    if (j >= p.rows_out) continue;
    float4* o = reinterpret_cast<float4*>(out + j * R);
#pragma unroll
    for (int q = 0; q < R / 4; ++q)
      o[q] = make_float4(acc[r][4 * q], acc[r][4 * q + 1], acc[r][4 * q + 2], acc[r][4 * q + 3]);
  }
}

/// The variant with ROWS rows per thread (1: projection_block_one, else projection_block_rows);
/// `tile` is the CTA's index along the rows (blockIdx.x in the kernel).
template <typename T, int R, int ROWS>
__device__ inline void projection_block(const ProjectionLaunch& p, int64_t tile, int h, int b,
                                        unsigned char* smem, bool vectorized) {
  if constexpr (ROWS == 1)
    projection_block_one<T, R>(p, tile, h, b, smem, vectorized);
  else
    projection_block_rows<T, R, ROWS>(p, tile, h, b, smem, vectorized);
}

}  // namespace attnpilot::attention::cuda::proj
