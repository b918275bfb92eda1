// Block-sparse flash-attention forward (FlashAttention-2 style), bf16/fp16 in, fp32
// accumulation, one CTA of 4 warps per (64-query tile, query head, batch entry).
//
// Data flow of one CTA (tile = 64 rows; warp w owns query rows 16w .. 16w+15):
//
//   Q tile ──smem──► wmma A fragments (registers, loaded once)
//   for each key block kb in CSR row (b, h, query block), for each 64-key tile of kb:
//     K, V tile ──smem (all 128 threads, 16-byte loads, rows past M zero)
//     warp: S = Q Kᵀ (wmma, fp32) ──► warp's smem scratch
//     lane pair per row: scale, mask (only tiles that need it), row max, p = 2^(s - m),
//                        l = l·α + Σp ──► P (bf16/fp16) to the warp's smem
//     warp: if a row's reference max m moved: O ──smem──► O·α ──► O (accumulator fragments)
//           O += P V (wmma, fp32 accumulators held across the whole key loop)
//   out = O / l (0 when l = 0: a row whose listed blocks hold no visible key)
//
// Lazy rescaling. A row's reference max m moves only when a tile's row max exceeds it by more
// than 8 (log2 units), so P <= 2^8 (no overflow in fp32, bf16 or fp16; the relative rounding of P
// does not depend on its magnitude) and softmax, invariant to the reference, is unchanged. Most
// tiles then need no O·α pass, which is the one step that must leave the opaque accumulators.
//
// Masking. A tile is skipped when no query of the CTA can see any of its keys (past M, wholly in
// the causal future, or wholly left of every query's streaming window): skipping equals adding
// zero to the online softmax. Tiles wholly inside the causal region (and, with a window, wholly
// inside every query's window or among the sinks) skip the per-element mask work; the rest test
// each (query, key) pair with the CPU backend's rule.
//
// Rows without keys. A CSR row with no listed block (or a query whose listed keys are all
// masked) gives exact zeros. The CPU backend gives zeros when every head of that (batch, query
// block) lists nothing and NaN otherwise; run_attention never passes such masks
// (BlockMask::validate requires a visible key for every query).
//
// Operation count and floor (L = 32k, 32 heads, d = 128, causal, all blocks): QKᵀ and PV are
// 4·d FLOPs per visible (query, key) pair, 4·128·32·(32k²/2) = 8.8 TFLOP, 8.9 ms at the H200's
// ~990 TFLOP/s dense bf16 (cuDNN measured 14 ms, ~600 TFLOP/s). Bytes (Q, K, V read once, O
// written once) are 4·32·32k·128·2 = 1.1 GB, 0.22 ms at 4.8 TB/s: compute-bound. At density δ
// both scale with δ (plus the per-query-tile Q and O traffic, 0.5 GB at any δ).
// K and V tiles are re-read from L2 by each query tile of a head (a head's K and V are 16 MB at
// 32k; the query tiles of one head are consecutive in the grid, so they run side by side).
// This first version goes through shared memory for S and P (wmma cannot expose the accumulator
// layout for the online softmax): per 64×64 tile and d = 128 a CTA moves about 200 KB through
// shared memory (K and V fragments read by each of 4 warps, S stored and re-read, P, the K/V
// tile stores) for 2.1 MFLOP of mma. At 128 B/clk·SM that is ~0.8 µs per tile against 0.28 µs
// of tensor-core time, so expected ~30-40% of the tensor peak: about 25 ms for the L = 32k
// causal case (~0.55x cuDNN) and, at 10% density, ~2.5-3 ms. Register-resident S/P (mma.sync
// with its documented fragment layout) and cp.async double buffering are the next steps.
//
// Resources (ptxas, sm_90): d = 128: 94 KB shared memory (Q, K, V tiles 17 KB each, fp32 scratch
// 34 KB, P 9 KB) and 206-254 registers, 2 CTAs per SM; d = 64: 54 KB, ~166 registers, 3 per SM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>

#include "attention/cuda/block_sparse_kernels.h"

namespace attnpilot::attention::cuda {
namespace {

constexpr int kTile = kBlockSparseTile;  // query rows per CTA, keys per step
constexpr int kWarps = kTile / 16;       // each warp owns 16 query rows
constexpr int kThreads = 32 * kWarps;
constexpr int kLdS = kTile + 8;  // row stride (elements) of the S and P scratch tiles

// Row stride (elements) of the Q, K, V tiles and of the fp32 PV scratch: 8 elements of padding
// keep 16-byte rows aligned and spread consecutive rows over different banks.
__host__ __device__ constexpr int tile_ld(int d) { return d + 8; }

// Shared-memory layout, in bytes from the start: Q, K, V tiles (T), per-warp fp32 scratch
// (16 × ld floats; S uses stride kLdS, PV stride tile_ld(d)), per-warp P tiles (T).
__host__ __device__ constexpr int64_t q_tile_bytes(int d) {
  return int64_t(kTile) * tile_ld(d) * 2;
}
__host__ __device__ constexpr int64_t scratch_bytes(int d) {
  return int64_t(kWarps) * 16 * tile_ld(d) * 4;
}
__host__ __device__ constexpr int64_t p_bytes() { return int64_t(kWarps) * 16 * kLdS * 2; }
__host__ __device__ constexpr int64_t shared_bytes(int d) {
  return 3 * q_tile_bytes(d) + scratch_bytes(d) + p_bytes();
}

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}

// Rows r0 .. r0+kTile-1 of a [rows, D] matrix (row stride `stride` elements) into a kTile × ld
// shared tile; rows at or past `limit` are zero (never garbage: 0 · NaN would poison P V).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t stride, int64_t r0,
                                          int64_t limit, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kLd = tile_ld(D);
  for (int c = tid; c < kTile * kChunks; c += kThreads) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (r0 + row < limit) x = *reinterpret_cast<const uint4*>(src + (r0 + row) * stride + col);
    *reinterpret_cast<uint4*>(dst + row * kLd + col) = x;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) block_sparse_fwd_kernel(BlockSparseLaunch p) {
  namespace wmma = nvcuda::wmma;
  constexpr int kLd = tile_ld(D);
  constexpr int kDf = D / 16;  // 16-wide fragments along d
  constexpr int kTf = kTile / 16;
  constexpr float kSlack = 8.f;  // log2 headroom of the lazily moved reference max
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  T* ks = qs + kTile * kLd;
  T* vs = ks + kTile * kLd;
  float* scratch = reinterpret_cast<float*>(vs + kTile * kLd);
  T* ps_all = reinterpret_cast<T*>(scratch + kWarps * 16 * kLd);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int h = blockIdx.y, b = blockIdx.z;
  const int kvh = h / (p.heads / p.kv_heads);
  const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + kvh * p.k_stride[1];
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] + kvh * p.v_stride[1];
  float* sw = scratch + warp * 16 * kLd;  // this warp's fp32 scratch
  T* pw = ps_all + warp * 16 * kLdS;      // this warp's P tile

  // Q fragments of this warp's 16 rows, kept in registers for the whole key loop.
  load_tile<T, D>(qs, qg, p.q_stride[2], q0, p.n, tid);
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> qf[kDf];
#pragma unroll
  for (int kk = 0; kk < kDf; ++kk)
    wmma::load_matrix_sync(qf[kk], qs + warp * 16 * kLd + kk * 16, kLd);

  // Lane pair (2r, 2r+1) owns row r of the warp's 16; lane half hh owns columns 8j + 4hh + e
  // (e < 4) of every row-major scratch tile, read and written as 16-byte vectors.
  const int r = lane / 2, hh = lane % 2;
  const int64_t qpos = p.q_offset + q0 + warp * 16 + r;  // key position of this row's query
  const int64_t cta_first = p.q_offset + q0;
  const int64_t cta_last = p.q_offset + (q0 + kTile < p.n ? q0 + kTile : p.n) - 1;
  const float scale_log2 = p.scale * 1.4426950408889634f;  // exp(x) = 2^(x·log2 e)
  const float kNegInf = -__int_as_float(0x7f800000);
  // O (unnormalised) in accumulators for the whole key loop; m_i is the row's reference max (log2
  // units) and l_i the sum of P under it.
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> of[kDf];
#pragma unroll
  for (int nn = 0; nn < kDf; ++nn) wmma::fill_fragment(of[nn], 0.f);
  float m_i = kNegInf, l_i = 0.f;

  // The key tiles to visit: listed blocks split into 64-key tiles, or every tile up to the
  // causal cut-off when no CSR lists are given.
  const int tiles_per_block = p.block_size / kTile;
  int64_t e0 = 0, tiles = 0;
  if (p.row_ptr != nullptr) {
    const int64_t qb = q0 / p.block_size;
    const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * p.q_blocks + qb;
    e0 = p.row_ptr[row];
    const int64_t e1 = p.row_ptr[row + 1];
    tiles = e1 > e0 ? (e1 - e0) * tiles_per_block : 0;
  } else {
    const int64_t kend = p.causal ? (cta_last + 1 < p.m ? cta_last + 1 : p.m) : p.m;
    tiles = (kend + kTile - 1) / kTile;
  }

  for (int64_t t = 0; t < tiles; ++t) {
    int64_t k0;
    if (p.row_ptr != nullptr) {
      const int64_t kb = p.col_idx[e0 + t / tiles_per_block];
      k0 = kb < 0 ? -1 : kb * p.block_size + (t % tiles_per_block) * kTile;
    } else {
      k0 = t * kTile;
    }
    const int64_t k_last = k0 + kTile - 1;
    // Whole-tile decisions (the same for every thread of the CTA, so barriers stay uniform).
    if (k0 < 0 || k0 >= p.m) continue;                      // outside the keys (bad index or tail)
    if (p.causal && k0 > cta_last) continue;                // in every query's future
    const int64_t first_old = k0 > p.sinks ? k0 : p.sinks;  // first non-sink key of the tile
    if (p.window > 0 && first_old == k0 && k_last <= cta_first - p.window) continue;  // all old
    const bool need_mask =
        k_last >= p.m || (p.causal && k_last > cta_first) ||
        (p.window > 0 && first_old <= k_last && first_old <= cta_last - p.window);

    __syncthreads();  // every warp is done with the previous K and V tiles
    load_tile<T, D>(ks, kg, p.k_stride[2], k0, p.m, tid);
    load_tile<T, D>(vs, vg, p.v_stride[2], k0, p.m, tid);
    __syncthreads();

    // S = Q Kᵀ for this warp's 16 rows: K stored [key][d] is Kᵀ in column-major order.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> sf[kTf];
#pragma unroll
      for (int nn = 0; nn < kTf; ++nn) wmma::fill_fragment(sf[nn], 0.f);
#pragma unroll
      for (int kk = 0; kk < kDf; ++kk) {
#pragma unroll
        for (int nn = 0; nn < kTf; ++nn) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> kf;
          wmma::load_matrix_sync(kf, ks + nn * 16 * kLd + kk * 16, kLd);
          wmma::mma_sync(sf[nn], qf[kk], kf, sf[nn]);
        }
      }
#pragma unroll
      for (int nn = 0; nn < kTf; ++nn)
        wmma::store_matrix_sync(sw + nn * 16, sf[nn], kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on row r, columns 8j + 4hh + e.
    float s[kTile / 2];
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
      const float4 x = *reinterpret_cast<const float4*>(sw + r * kLdS + 8 * j + 4 * hh);
      s[4 * j + 0] = x.x * scale_log2;
      s[4 * j + 1] = x.y * scale_log2;
      s[4 * j + 2] = x.z * scale_log2;
      s[4 * j + 3] = x.w * scale_log2;
    }
    if (need_mask) {
#pragma unroll
      for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t kpos = k0 + 8 * j + 4 * hh + e;
          const bool hidden = kpos >= p.m || (p.causal && kpos > qpos) ||
                              (p.window > 0 && kpos >= p.sinks && kpos <= qpos - p.window);
          if (hidden) s[4 * j + e] = kNegInf;
        }
      }
    }
    float mx = kNegInf;
#pragma unroll
    for (int i = 0; i < kTile / 2; ++i) mx = fmaxf(mx, s[i]);
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    // The reference max moves only when the row max passes it by more than kSlack (P stays
    // <= 2^kSlack: no overflow in fp32, bf16 or fp16, and the same relative rounding), so most
    // tiles need no rescaling of O. m_new = -inf: nothing visible yet; P, O and l stay zero.
    const float m_new = mx > m_i + kSlack ? mx : m_i;
    const float alpha = m_new == m_i ? 1.f : exp2f(m_i - m_new);  // m_i = -inf: 0 (O is 0)
    // O is nonzero only once m_i is finite; only then does a moving max rescale it.
    const bool rescale = m_new != m_i && m_i != kNegInf;
    float rs = 0.f;
#pragma unroll
    for (int j = 0; j < kTile / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = m_new == kNegInf ? 0.f : exp2f(s[4 * j + e] - m_new);
        const T pt = from_float<T>(pe);
        rs += to_float(pt);  // l sums the rounded P that the PV product uses
        pw[r * kLdS + 8 * j + 4 * hh + e] = pt;
      }
    }
    rs += __shfl_xor_sync(0xffffffffu, rs, 1);
    l_i = l_i * alpha + rs;
    m_i = m_new;
    __syncwarp();

    // O = O·α when some row of the warp moved its reference max: through the scratch (the
    // accumulator layout is opaque), rows scaled by their lane pair.
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int nn = 0; nn < kDf; ++nn)
        wmma::store_matrix_sync(sw + nn * 16, of[nn], kLd, wmma::mem_row_major);
      __syncwarp();
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        float4* x = reinterpret_cast<float4*>(sw + r * kLd + 8 * j + 4 * hh);
        const float4 y = *x;
        *x = make_float4(y.x * alpha, y.y * alpha, y.z * alpha, y.w * alpha);
      }
      __syncwarp();
#pragma unroll
      for (int nn = 0; nn < kDf; ++nn)
        wmma::load_matrix_sync(of[nn], sw + nn * 16, kLd, wmma::mem_row_major);
      __syncwarp();  // reloaded before the next tile's S overwrites the scratch
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kTf; ++kk) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> pf;
      wmma::load_matrix_sync(pf, pw + kk * 16, kLdS);
#pragma unroll
      for (int nn = 0; nn < kDf; ++nn) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> vf;
        wmma::load_matrix_sync(vf, vs + kk * 16 * kLd + nn * 16, kLd);
        wmma::mma_sync(of[nn], pf, vf, of[nn]);
      }
    }
  }

  // out = O / l; rows with l = 0 (no visible key) are zero.
  __syncwarp();  // every lane is done reading this warp's S scratch of the last tile
#pragma unroll
  for (int nn = 0; nn < kDf; ++nn)
    wmma::store_matrix_sync(sw + nn * 16, of[nn], kLd, wmma::mem_row_major);
  __syncwarp();
  const int64_t qi = q0 + warp * 16 + r;
  if (qi < p.n) {
    const float inv = l_i > 0.f ? 1.f / l_i : 0.f;
    T* dst = static_cast<T*>(p.out) + ((static_cast<int64_t>(b) * p.heads + h) * p.n + qi) * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dst[8 * j + 4 * hh + e] = from_float<T>(sw[r * kLd + 8 * j + 4 * hh + e] * inv);
  }
}

// ---- launcher (host) ----

template <typename T, int D>
cudaError_t launch_typed(const BlockSparseLaunch& p, cudaStream_t stream,
                         const char** failed_call) {
  auto kernel = block_sparse_fwd_kernel<T, D>;
  const int64_t bytes = shared_bytes(D);
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  if (e != cudaSuccess) {
    *failed_call = "cudaFuncSetAttribute(block_sparse_fwd_kernel, MaxDynamicSharedMemorySize)";
    return e;
  }
  const dim3 grid(static_cast<unsigned>((p.n + kTile - 1) / kTile), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, kThreads, static_cast<size_t>(bytes), stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "block_sparse_fwd_kernel<<<(query tiles, heads, batch), 128, shared bytes>>>";
    return e;
  }
  return cudaSuccess;
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool strides_ok(const int64_t* s) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

}  // namespace

bool block_sparse_kernel_supports(int d, int block_size) {
  return (d == 64 || d == 128) && block_size >= kTile && block_size % kTile == 0;
}

int64_t block_sparse_shared_bytes(int d) { return shared_bytes(d); }

cudaError_t launch_block_sparse_attention(const BlockSparseLaunch& p, ElemType type,
                                          cudaStream_t stream, const char** failed_call) {
  const bool csr = p.row_ptr != nullptr;
  const bool shape_ok = p.batch >= 1 && p.batch <= 65535 && p.heads >= 1 && p.heads <= 65535 &&
                        p.kv_heads >= 1 && p.heads % p.kv_heads == 0 && p.n >= 1 && p.m >= 1 &&
                        (p.n + kTile - 1) / kTile <= 0x7fffffff && p.q_offset >= 0 &&
                        p.sinks >= 0 && p.window >= 0;
  // Without CSR lists every tile is visited; with them the block grid must fit n x m. col_idx
  // may be null only when nothing is listed (row_ptr all zero; the kernel never reads it).
  const bool mask_ok = !csr || (p.q_blocks == (p.n + p.block_size - 1) / p.block_size &&
                                p.k_blocks == (p.m + p.block_size - 1) / p.block_size);
  if (!block_sparse_kernel_supports(p.d, p.block_size) || !shape_ok || !mask_ok || p.q == nullptr ||
      p.k == nullptr || p.v == nullptr || p.out == nullptr || !aligned16(p.q) || !aligned16(p.k) ||
      !aligned16(p.v) || !aligned16(p.out) || !strides_ok(p.q_stride) || !strides_ok(p.k_stride) ||
      !strides_ok(p.v_stride) || !std::isfinite(p.scale)) {
    *failed_call = "launch_block_sparse_attention (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  if (type == ElemType::kBFloat16) {
    return p.d == 64 ? launch_typed<__nv_bfloat16, 64>(p, stream, failed_call)
                     : launch_typed<__nv_bfloat16, 128>(p, stream, failed_call);
  }
  return p.d == 64 ? launch_typed<__half, 64>(p, stream, failed_call)
                   : launch_typed<__half, 128>(p, stream, failed_call);
}

}  // namespace attnpilot::attention::cuda
