// Split-K decode attention: one query per sequence against a key/value cache whose sequences
// have different lengths; keys of dim e (rank-r projected keys, or full keys), values of dim dv.
// bf16/fp16 storage, fp32 arithmetic. Data flow: decode_kernels.h.
//
// Where the code lives: the CTA bodies are decode::split_block and decode::combine_block
// (decode_block.cuh, with the launch shape: threads per key row, heads per CTA, the split plan);
// this file holds the __global__ wrappers and the launcher. CI runs the bodies on the CPU
// through the CUDA emulation (tests/cuda_emu): tests/attention/attention_emu_test.cpp, against a
// float64 reference. Moving them there left the SASS of every instantiation unchanged
// (cuobjdump -sass, 2026-12-05).
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

#include "attention/cuda/decode_block.cuh"
#include "attention/cuda/decode_kernels.h"

namespace attnpilot::attention::cuda {
namespace {

using decode::head_block;
using decode::kThreads;
using decode::max_chunk;
using decode::phase1_shared_bytes;
using decode::threads_per_row;

// The bodies are decode::split_block and decode::combine_block (decode_block.cuh), which the CPU
// emulation tests also run.

// HG = 1 (no GQA, the common case) is held to 64 registers (ptxas: no spills) so 4 CTAs fit an
// SM instead of 3: a third more loads in flight.
template <typename T, int TPR, int DV, int HG>
__global__ void __launch_bounds__(kThreads, HG == 1 ? 4 : 1)
    decode_split_kernel(DecodeLaunch p, int64_t chunk, int64_t splits, float* ws) {
  extern __shared__ __align__(16) unsigned char smem[];
  decode::split_block<T, TPR, DV, HG>(p, chunk, splits, ws, smem, blockIdx.x, blockIdx.y,
                                      blockIdx.z);
}

// Phase 2: one CTA of DV threads per (b, h) = blockIdx.x; thread c owns output column c.
template <typename T, int DV>
__global__ void __launch_bounds__(DV)
    decode_combine_kernel(DecodeLaunch p, int64_t chunk, int64_t splits, const float* ws) {
  decode::combine_block<T, DV>(p, chunk, splits, ws, blockIdx.x);
}

// ---- launcher (host) ----

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
  return decode::make_plan(p, sm_count);
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
