#pragma once
/// The split-K decode attention kernels' CTA bodies (decode_attention.cu's decode_split_kernel
/// and decode_combine_kernel are thin wrappers around split_block and combine_block) and the
/// launch shape (threads per key row, heads per CTA, the split plan); the algorithm and resources
/// are described at the top of decode_attention.cu. Plain CUDA C++ without inline PTX: tests also
/// run it on the CPU through tests/cuda_emu/cuda_emu.h (which defines ATTNPILOT_CUDA_EMU and the
/// CUDA names used here; the 16-bit float types then come from tests/cuda_emu/cuda_emu_mma.h).
#ifdef ATTNPILOT_CUDA_EMU
#include "tests/cuda_emu/cuda_emu_mma.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention/cuda/decode_kernels.h"

namespace attnpilot::attention::cuda::decode {

/// Threads of a phase-1 CTA.
inline constexpr int kThreads = 256;
inline constexpr int kWarps = kThreads / 32;
/// 16-byte loads per thread issued before their first use.
inline constexpr int kLoadsInFlight = 8;
inline constexpr float kLog2e = 1.4426950408889634f;

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

/// The 8 elements of a 16-byte load as floats.
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], const __nv_bfloat16*) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    f[2 * k] = __uint_as_float(w[k] << 16);
    f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8], const __half*) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    __half2 h;
    memcpy(&h, &w[k], sizeof(h));
    const float2 x = __half22float2(h);
    f[2 * k] = x.x;
    f[2 * k + 1] = x.y;
  }
}

__device__ __forceinline__ uint4 load16(const void* ptr) {
  return __ldg(reinterpret_cast<const uint4*>(ptr));
}

/// Floats of the score / reduction buffer and the whole dynamic shared memory of a phase-1 CTA.
__host__ __device__ constexpr int64_t buffer_floats(int hg, int dv) {
  return int64_t(kWarps) * hg * dv;
}
__host__ __device__ constexpr int64_t phase1_shared_bytes(int hg, int dv) {
  return (buffer_floats(hg, dv) + 2 * hg) * 4;
}
/// The longest chunk: its HG x chunk scores fit the reduction buffer.
__host__ __device__ constexpr int64_t max_chunk(int dv) { return int64_t(kWarps) * dv; }

/// Step A for KH key rows per key position (KH = 1: the HG heads share one key head; KH = HG:
/// each head its own). Writes s[i * chunk + j] = log2(e)·scale·q_i·k_j for j < n.
template <typename T, int TPR, int HG, int KH>
__device__ __forceinline__ void score_rows(const T* const (&kbase)[KH], int64_t k_row_stride,
                                           const float (&qr)[HG][8], bool col_ok, int64_t n,
                                           int64_t chunk, float* sc, int tid) {
  constexpr int kRows = kThreads / TPR;                                    // rows per pass
  constexpr int kPasses = KH >= kLoadsInFlight ? 1 : kLoadsInFlight / KH;  // passes per batch
  const int row = tid / TPR, sub = tid % TPR;
  for (int64_t base = 0; base < n; base += int64_t(kRows) * kPasses) {
    uint4 kv[kPasses][KH];
#pragma unroll
    for (int u = 0; u < kPasses; ++u) {
      const int64_t j = base + int64_t(u) * kRows + row;
#pragma unroll
      for (int c = 0; c < KH; ++c) {
        kv[u][c] = make_uint4(0u, 0u, 0u, 0u);
        if (col_ok && j < n) kv[u][c] = load16(kbase[c] + j * k_row_stride);
      }
    }
#pragma unroll
    for (int u = 0; u < kPasses; ++u) {
      const int64_t j = base + int64_t(u) * kRows + row;
#pragma unroll
      for (int i = 0; i < HG; ++i) {
        float kf[8];
        unpack8(kv[u][KH == 1 ? 0 : i], kf, static_cast<const T*>(nullptr));
        float dot = 0.f;
#pragma unroll
        for (int x = 0; x < 8; ++x) dot = fmaf(qr[i][x], kf[x], dot);
#pragma unroll
        for (int off = TPR / 2; off >= 1; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (sub == 0 && j < n) sc[i * chunk + j] = dot;
      }
    }
  }
}

/// Phase 1, one CTA of kThreads threads: split `split` (keys [split·chunk, (split+1)·chunk) of
/// the sequence), query heads hblock·HG .. + HG - 1, batch entry `batch`; `smem` holds
/// phase1_shared_bytes(HG, DV) bytes, 16-byte aligned. Called by every thread of the CTA (it
/// contains barriers).
template <typename T, int TPR, int DV, int HG>
__device__ __forceinline__ void split_block(const DecodeLaunch& p, int64_t chunk, int64_t splits,
                                            float* ws, unsigned char* smem, unsigned split,
                                            unsigned hblock, unsigned batch) {
  float* sc = reinterpret_cast<float*>(smem);  // [HG][chunk] scores, then [kWarps][HG][DV]
  float* stats = sc + buffer_floats(HG, DV);   // m[HG], l[HG]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t s = split;
  const int h0 = hblock * HG, b = batch;
  const int64_t len = p.lengths[b];
  const int64_t j0 = s * chunk;
  T* out = static_cast<T*>(p.out);
  if (j0 >= len) {  // no key in this split: phase 2 skips it; with one split, out = 0
    if (splits == 1)
      for (int idx = tid; idx < HG * DV; idx += kThreads)
        out[(int64_t(b) * p.heads + h0 + idx / DV) * DV + idx % DV] = from_float<T>(0.f);
    return;
  }
  const int64_t n = len - j0 < chunk ? len - j0 : chunk;

  // q slice of this thread (columns 8·sub .. 8·sub+7), pre-scaled into log2 units.
  const int sub = tid % TPR, col = 8 * sub;
  const bool col_ok = col < p.e;
  const float qscale = p.scale * kLog2e;
  float qr[HG][8];
#pragma unroll
  for (int i = 0; i < HG; ++i) {
    const T* qg = static_cast<const T*>(p.q) + b * p.q_stride[0] + (h0 + i) * p.q_stride[1];
#pragma unroll
    for (int x = 0; x < 8; ++x) qr[i][x] = col + x < p.e ? to_float(qg[col + x]) * qscale : 0.f;
  }

  // A: scores.
  const int k_group = p.heads / p.k_heads;
  const T* kg = static_cast<const T*>(p.k) + b * p.k_stride[0] + j0 * p.k_stride[2] + col;
  if (k_group % HG == 0) {  // the HG heads share one key head
    const T* const kbase[1] = {kg + int64_t(h0 / k_group) * p.k_stride[1]};
    score_rows<T, TPR, HG, 1>(kbase, p.k_stride[2], qr, col_ok, n, chunk, sc, tid);
  } else {
    const T* kbase[HG];
#pragma unroll
    for (int i = 0; i < HG; ++i) kbase[i] = kg + int64_t((h0 + i) / k_group) * p.k_stride[1];
    score_rows<T, TPR, HG, HG>(kbase, p.k_stride[2], qr, col_ok, n, chunk, sc, tid);
  }
  __syncthreads();

  // B: chunk max and exponentials, warp i for head i.
  if (warp < HG) {
    float* si = sc + warp * chunk;
    float m = -INFINITY;
    for (int64_t j = lane; j < n; j += 32) m = fmaxf(m, si[j]);
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    float l = 0.f;
    for (int64_t j = lane; j < n; j += 32) {
      const float e = exp2f(si[j] - m);
      si[j] = e;
      l += e;
    }
#pragma unroll
    for (int off = 16; off >= 1; off /= 2) l += __shfl_xor_sync(0xffffffffu, l, off);
    if (lane == 0) {
      stats[warp] = m;
      stats[HG + warp] = l;
    }
  }
  __syncthreads();

  // C: acc[i][:] = Σ_j p_ij v_j over this thread's rows and 8 value columns.
  constexpr int kVT = DV / 8;             // threads per value row
  constexpr int kSlots = kThreads / kVT;  // value rows per pass
  const int slot = tid / kVT, vcol = 8 * (tid % kVT);
  const T* vg = static_cast<const T*>(p.v) + b * p.v_stride[0] +
                int64_t(h0 / (p.heads / p.v_heads)) * p.v_stride[1] + j0 * p.v_stride[2] + vcol;
  float acc[HG][8];
#pragma unroll
  for (int i = 0; i < HG; ++i)
#pragma unroll
    for (int x = 0; x < 8; ++x) acc[i][x] = 0.f;
  for (int64_t base = 0; base < n; base += int64_t(kSlots) * kLoadsInFlight) {
    uint4 vv[kLoadsInFlight];
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t j = base + int64_t(u) * kSlots + slot;
      vv[u] = make_uint4(0u, 0u, 0u, 0u);
      if (j < n) vv[u] = load16(vg + j * p.v_stride[2]);
    }
#pragma unroll
    for (int u = 0; u < kLoadsInFlight; ++u) {
      const int64_t j = base + int64_t(u) * kSlots + slot;
      if (j < n) {
        float vf[8];
        unpack8(vv[u], vf, static_cast<const T*>(nullptr));
#pragma unroll
        for (int i = 0; i < HG; ++i) {
          const float pij = sc[i * chunk + j];
#pragma unroll
          for (int x = 0; x < 8; ++x) acc[i][x] = fmaf(pij, vf[x], acc[i][x]);
        }
      }
    }
  }
  // Sum over the rows of a warp (lanes with the same columns), then over the warps.
#pragma unroll
  for (int off = kVT; off < 32; off *= 2)
#pragma unroll
    for (int i = 0; i < HG; ++i)
#pragma unroll
      for (int x = 0; x < 8; ++x) acc[i][x] += __shfl_xor_sync(0xffffffffu, acc[i][x], off);
  __syncthreads();  // every thread is done reading the scores the reduction buffer overwrites
  if (lane < kVT) {
#pragma unroll
    for (int i = 0; i < HG; ++i)
#pragma unroll
      for (int x = 0; x < 8; ++x) sc[(warp * HG + i) * DV + vcol + x] = acc[i][x];
  }
  __syncthreads();
  for (int idx = tid; idx < HG * DV; idx += kThreads) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += sc[w * HG * DV + idx];
    const int i = idx / DV, c = idx % DV;
    const int64_t bh = int64_t(b) * p.heads + h0 + i;
    if (splits == 1) {
      out[bh * DV + c] = from_float<T>(sum / stats[HG + i]);  // l >= 1: the max term is 2^0
    } else {
      ws[(bh * splits + s) * DV + c] = sum;
    }
  }
  if (splits > 1 && tid < HG) {
    float* ml = ws + int64_t(p.batch) * p.heads * splits * DV;
    const int64_t bh = int64_t(b) * p.heads + h0 + tid;
    ml[(bh * splits + s) * 2] = stats[tid];
    ml[(bh * splits + s) * 2 + 1] = stats[HG + tid];
  }
}

/// Phase 2, one CTA of DV threads for (b, h) = bh_index (b·heads + h); thread c owns output
/// column c. No barriers.
template <typename T, int DV>
__device__ __forceinline__ void combine_block(const DecodeLaunch& p, int64_t chunk, int64_t splits,
                                              const float* ws, unsigned bh_index) {
  const int64_t bh = bh_index;
  const int b = static_cast<int>(bh / p.heads), c = threadIdx.x;
  const int64_t len = p.lengths[b];
  int64_t used = (len + chunk - 1) / chunk;
  if (used > splits) used = splits;
  const float* ml = ws + int64_t(p.batch) * p.heads * splits * DV + bh * splits * 2;
  const float* o = ws + bh * splits * DV + c;
  float m = -INFINITY;
  for (int64_t s = 0; s < used; ++s) m = fmaxf(m, ml[2 * s]);
  float l = 0.f, acc = 0.f;
  for (int64_t s = 0; s < used; ++s) {
    const float w = exp2f(ml[2 * s] - m);
    l = fmaf(w, ml[2 * s + 1], l);
    acc = fmaf(w, o[s * DV], acc);
  }
  static_cast<T*>(p.out)[bh * DV + c] = from_float<T>(l > 0.f ? acc / l : 0.f);
}

/// Threads per key row of step A: e/8 rounded up to a power of 2.
inline int threads_per_row(int e) {
  int t = 1;
  while (8 * t < e) t *= 2;
  return t;
}

/// Query heads per CTA (HG) for `group` query heads per value head: the largest of 8, 4, 2, 1
/// dividing it.
inline int head_block(int group) {
  for (int hg : {8, 4, 2}) {
    if (group % hg == 0) return hg;
  }
  return 1;
}

/// plan_decode (decode_kernels.h).
inline DecodePlan make_plan(const DecodeLaunch& p, int sm_count) {
  DecodePlan plan;
  if (p.heads < 1 || p.v_heads < 1 || p.batch < 1 || (p.dv != 64 && p.dv != 128)) return plan;
  plan.head_block = head_block(p.heads / p.v_heads);
  const int64_t pairs = int64_t(p.batch) * (p.heads / plan.head_block);
  // Enough CTAs for >= 16 per SM (several waves of the ~4-8 resident ones), chunks of
  // 64 .. 8·dv keys (a multiple of 64).
  const int64_t target = 16 * int64_t(sm_count > 0 ? sm_count : 1);
  const int64_t want = (target + pairs - 1) / pairs;
  const int64_t longest = p.max_length > 0 ? p.max_length : 1;
  int64_t chunk = (longest + want - 1) / want;
  chunk = (chunk + 63) / 64 * 64;
  if (chunk > max_chunk(p.dv)) chunk = max_chunk(p.dv);
  plan.chunk = chunk;
  plan.splits = (longest + chunk - 1) / chunk;
  plan.workspace_bytes =
      plan.splits > 1 ? int64_t(p.batch) * p.heads * plan.splits * (p.dv + 2) * 4 : 0;
  return plan;
}

}  // namespace attnpilot::attention::cuda::decode
