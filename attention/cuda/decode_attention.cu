// Split-K decode attention: one query per sequence against a key/value cache whose sequences
// have different lengths; keys of dim e (rank-r projected keys, or full keys), values of dim dv.
// bf16/fp16 storage, fp32 arithmetic. Data flow: decode_kernels.h.
//
// Phase 1, one CTA of 256 threads per (split s, block of HG query heads sharing a value head,
// batch entry b), over keys j in [s·chunk, min((s+1)·chunk, len_b)):
//
//   A  scores   TPR = e/8 (rounded up to a power of 2) threads per key row, each one 16-byte
//               chunk of the row; 8 rows (or 8/HG rows × HG heads' rows) loaded per thread before
//               the first use; dot with the thread's slice of q (registers, pre-scaled by
//               scale·log2 e), shuffle-sum over the TPR lanes ──► s[HG][chunk] (smem)
//   B  softmax  warp i: m_i = max_j s, p = 2^(s - m_i) in place, l_i = Σ p
//   C  values   dv/8 threads per value row, 8 rows in flight per thread; acc[HG][8] += p·v
//               ──► shuffle-sum over the rows of a warp, smem sum over the 8 warps
//   one split: out = acc / l (bf16/fp16); else (m, l, acc) ──► fp32 workspace
// Phase 2, one CTA per (b, h): M = max_s m_s, out = Σ_s 2^(m_s - M) acc_s / Σ_s 2^(m_s - M) l_s
// over the splits that hold a key (ceil(len_b / chunk) of them); len_b = 0 gives zeros.
//
// Bytes and floor (the issue's case: batch 16, 32 heads, 32k cache, d = dv = 128, bf16, no GQA).
// Full keys: K + V = 2 · 16 · 32 · 32768 · 128 · 2 B = 8.59 GB, 2.0 ms at the 4.3 TB/s the H200
// here copies (cuDNN SDPA decode measured 1.95 ms: ~4.4 TB/s of reads). Rank r = 32 keys:
// 16 · 32 · 32768 · 32 · 2 = 1.07 GB + 4.29 GB of values = 5.37 GB, 62.5% of the full read:
// 1.22 ms at 4.4 TB/s, i.e. 1.6x cuDNN at the floor; the 1.4x target (1.39 ms) needs 3.9 TB/s,
// 88% of cuDNN's read rate. Arithmetic is ~1 FLOP per byte (one multiply-add per 2-byte element),
// far under the H200's ~14 FLOP/B fp32 balance point: bandwidth bound. Workspace traffic: 32
// splits × 512 (b, h) × 130 floats = 8.5 MB written and read once, 0.16% of the 5.37 GB.
// What keeps the memory system busy: every global load of k and v is 16 bytes and coalesced
// (consecutive lanes read consecutive 16-byte pieces of a row, rows consecutive in memory), each
// thread has 8 such loads (128 B) in flight per phase, 32 KB per CTA, and the grid has >= 16 CTAs
// per SM (chunk chosen from the longest sequence, the number of (b, head block) pairs and the SM
// count; 8·dv keys at most so the score buffer fits the 8·HG·dv-float reduction buffer).
// In flight per SM in the issue's case (HG = 1, 64 registers, 4 CTAs of 256 threads): 128 KB,
// against the ~33 KB that 4.4 TB/s / 132 SMs needs at ~1 µs of loaded memory latency.
// Resources (ptxas, sm_90): HG = 1: 61-64 registers, 4.1 KB shared memory; HG = 2: 72-76;
// HG = 4: 102-110; HG = 8: 128-140 (8-16 B of spills in some key dims), 32.8 KB shared memory.
// SASS: every k and v load is LDG.E.128.CONSTANT, 8 issued back to back per phase.
//
// GQA: HG = the largest of 8, 4, 2, 1 dividing Hq/Hkv, so one CTA reads each value row once for
// HG query heads; when the HG heads also share the key head (Hk = Hkv, full keys) each key row is
// loaded once and dotted with the HG queries. With per-query-head projected keys (Hk = Hq) the CTA
// loads the HG heads' key rows side by side.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attention/cuda/decode_kernels.h"

namespace attnpilot::attention::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kLoadsInFlight = 8;  // 16-byte loads per thread issued before their first use
constexpr float kLog2e = 1.4426950408889634f;

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

// The 8 elements of a 16-byte load as floats.
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

// Floats of the score / reduction buffer and the whole dynamic shared memory of a phase-1 CTA.
__host__ __device__ constexpr int64_t buffer_floats(int hg, int dv) {
  return int64_t(kWarps) * hg * dv;
}
__host__ __device__ constexpr int64_t phase1_shared_bytes(int hg, int dv) {
  return (buffer_floats(hg, dv) + 2 * hg) * 4;
}
// The longest chunk: its HG x chunk scores fit the reduction buffer.
__host__ __device__ constexpr int64_t max_chunk(int dv) { return int64_t(kWarps) * dv; }

// Step A for KH key rows per key position (KH = 1: the HG heads share one key head; KH = HG:
// each head its own). Writes s[i * chunk + j] = log2(e)·scale·q_i·k_j for j < n.
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

// HG = 1 (no GQA, the common case) is held to 64 registers (ptxas: no spills) so 4 CTAs fit an
// SM instead of 3: a third more loads in flight.
template <typename T, int TPR, int DV, int HG>
__global__ void __launch_bounds__(kThreads, HG == 1 ? 4 : 1)
    decode_split_kernel(DecodeLaunch p, int64_t chunk, int64_t splits, float* ws) {
  extern __shared__ __align__(16) unsigned char smem[];
  float* sc = reinterpret_cast<float*>(smem);  // [HG][chunk] scores, then [kWarps][HG][DV]
  float* stats = sc + buffer_floats(HG, DV);   // m[HG], l[HG]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int64_t s = blockIdx.x;
  const int h0 = blockIdx.y * HG, b = blockIdx.z;
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

// Phase 2: one CTA of DV threads per (b, h) = blockIdx.x; thread c owns output column c.
template <typename T, int DV>
__global__ void __launch_bounds__(DV)
    decode_combine_kernel(DecodeLaunch p, int64_t chunk, int64_t splits, const float* ws) {
  const int64_t bh = blockIdx.x;
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

// ---- launcher (host) ----

int threads_per_row(int e) {
  int t = 1;
  while (8 * t < e) t *= 2;
  return t;
}

int head_block(int group) {
  for (int hg : {8, 4, 2}) {
    if (group % hg == 0) return hg;
  }
  return 1;
}

template <typename T, int TPR, int DV, int HG>
cudaError_t launch_typed(const DecodeLaunch& p, const DecodePlan& plan, float* ws,
                         cudaStream_t stream, const char** failed_call) {
  const dim3 grid(static_cast<unsigned>(plan.splits), static_cast<unsigned>(p.heads / HG),
                  static_cast<unsigned>(p.batch));
  decode_split_kernel<T, TPR, DV, HG>
      <<<grid, kThreads, static_cast<size_t>(phase1_shared_bytes(HG, DV)), stream>>>(
          p, plan.chunk, plan.splits, ws);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "decode_split_kernel<<<(splits, head blocks, batch), 256, shared bytes>>>";
    return e;
  }
  if (plan.splits == 1) return cudaSuccess;
  decode_combine_kernel<T, DV>
      <<<static_cast<unsigned>(int64_t(p.batch) * p.heads), DV, 0, stream>>>(p, plan.chunk,
                                                                             plan.splits, ws);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    *failed_call = "decode_combine_kernel<<<batch x heads, dv>>>";
    return e;
  }
  return cudaSuccess;
}

template <typename T, int TPR, int DV>
cudaError_t by_head_block(const DecodeLaunch& p, const DecodePlan& plan, float* ws,
                          cudaStream_t stream, const char** failed_call) {
  switch (plan.head_block) {
    case 8:
      return launch_typed<T, TPR, DV, 8>(p, plan, ws, stream, failed_call);
    case 4:
      return launch_typed<T, TPR, DV, 4>(p, plan, ws, stream, failed_call);
    case 2:
      return launch_typed<T, TPR, DV, 2>(p, plan, ws, stream, failed_call);
    default:
      return launch_typed<T, TPR, DV, 1>(p, plan, ws, stream, failed_call);
  }
}

template <typename T, int TPR>
cudaError_t by_value_dim(const DecodeLaunch& p, const DecodePlan& plan, float* ws,
                         cudaStream_t stream, const char** failed_call) {
  return p.dv == 64 ? by_head_block<T, TPR, 64>(p, plan, ws, stream, failed_call)
                    : by_head_block<T, TPR, 128>(p, plan, ws, stream, failed_call);
}

template <typename T>
cudaError_t by_key_dim(const DecodeLaunch& p, const DecodePlan& plan, float* ws,
                       cudaStream_t stream, const char** failed_call) {
  switch (threads_per_row(p.e)) {
    case 1:
      return by_value_dim<T, 1>(p, plan, ws, stream, failed_call);
    case 2:
      return by_value_dim<T, 2>(p, plan, ws, stream, failed_call);
    case 4:
      return by_value_dim<T, 4>(p, plan, ws, stream, failed_call);
    case 8:
      return by_value_dim<T, 8>(p, plan, ws, stream, failed_call);
    case 16:
      return by_value_dim<T, 16>(p, plan, ws, stream, failed_call);
    default:
      return by_value_dim<T, 32>(p, plan, ws, stream, failed_call);
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

bool strides_ok(const int64_t* s) { return s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0; }

}  // namespace

bool decode_kernel_supports(int e, int dv) {
  return e >= 8 && e <= 256 && e % 8 == 0 && (dv == 64 || dv == 128);
}

DecodePlan plan_decode(const DecodeLaunch& p, int sm_count) {
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

cudaError_t launch_decode_attention(const DecodeLaunch& p, const DecodePlan& plan, void* workspace,
                                    DecodeType type, cudaStream_t stream,
                                    const char** failed_call) {
  const bool shape_ok = p.batch >= 1 && p.batch <= 65535 && p.heads >= 1 && p.k_heads >= 1 &&
                        p.v_heads >= 1 && p.heads % p.k_heads == 0 && p.heads % p.v_heads == 0 &&
                        p.capacity >= 0 && p.max_length >= 0 && p.max_length <= p.capacity;
  const DecodePlan expected = plan_decode(p, 1);  // head block and workspace follow from shapes
  const bool plan_ok =
      plan.head_block >= 1 && plan.head_block == expected.head_block &&
      p.heads / plan.head_block <= 65535 && plan.chunk >= 1 && plan.chunk <= max_chunk(p.dv) &&
      plan.splits >= 1 && plan.splits <= 0x7fffffff && plan.chunk * plan.splits >= p.max_length &&
      int64_t(p.batch) * p.heads <= 0x7fffffff &&
      (plan.splits == 1 || (workspace != nullptr && aligned16(workspace))) &&
      plan.workspace_bytes ==
          (plan.splits > 1 ? int64_t(p.batch) * p.heads * plan.splits * (p.dv + 2) * 4 : 0);
  if (!decode_kernel_supports(p.e, p.dv) || !shape_ok || !plan_ok || p.q == nullptr ||
      p.k == nullptr || p.v == nullptr || p.out == nullptr || p.lengths == nullptr ||
      !aligned16(p.k) || !aligned16(p.v) || !strides_ok(p.k_stride) || !strides_ok(p.v_stride) ||
      !std::isfinite(p.scale)) {
    *failed_call = "launch_decode_attention (arguments outside the kernel's range)";
    return cudaErrorInvalidValue;
  }
  float* ws = static_cast<float*>(workspace);
  return type == DecodeType::kBFloat16 ? by_key_dim<__nv_bfloat16>(p, plan, ws, stream, failed_call)
                                       : by_key_dim<__half>(p, plan, ws, stream, failed_call);
}

}  // namespace attnpilot::attention::cuda
