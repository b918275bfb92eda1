#pragma once
/// Raw launcher of the split-K decode attention kernel (decode_attention.cu): one query per
/// sequence against a key/value cache of per-sequence length. No LibTorch types here, so nvcc
/// never compiles the LibTorch headers; cuda_decode.cpp is the tensor-level code.
///
///   q  [B, Hq, e]          query h reads key head h / (Hq/Hk) and value head h / (Hq/Hkv)
///   k  [B, Hk, cap, e]     e = r (rank-r projected keys, Hk = Hq) or e = d (full keys, GQA)
///   v  [B, Hkv, cap, dv]   positions 0 .. lengths[b]-1 are valid (cap >= every length)
///
///   phase 1: CTA (split s, head block, b) ── keys [s·chunk, (s+1)·chunk) ∩ [0, len_b) ──►
///            scores s = scale·q·kᵀ (smem) ─► chunk max m, p = exp(s - m), l = Σp ─►
///            o = Σ p·v  ──► workspace (m, l, o) per (b, h, s)     [one split: out directly]
///   phase 2: CTA (b, h) ── log-sum-exp over the splits ──► out [B, Hq, dv] = Σ e^{m_s-M} o_s
///                                                                 / Σ e^{m_s-M} l_s
/// A CTA serves a block of query heads that share one value head (GQA), so a value row is read
/// once for all of them; when they also share the key head (full keys with GQA) each key row is
/// read once too.
#ifndef ATTNPILOT_CUDA_EMU  // tests/cuda_emu/cuda_emu.h declares the two CUDA types used here
#include <cuda_runtime.h>
#endif

#include <cstdint>

namespace attnpilot::attention::cuda {

/// Element type of q, k, v and out (fp32 arithmetic in every case).
enum class DecodeType { kBFloat16, kFloat16 };

/// One decode call. Tensors are given by pointer and element strides (the last dimension is
/// contiguous). k and v need 16-byte aligned starts and strides that are multiples of 8
/// elements; q may have any strides.
struct DecodeLaunch {
  const void* q = nullptr;           ///< [batch, heads, e]
  const void* k = nullptr;           ///< [batch, k_heads, capacity, e]
  const void* v = nullptr;           ///< [batch, v_heads, capacity, dv]
  void* out = nullptr;               ///< [batch, heads, dv], contiguous; every element written
  const int32_t* lengths = nullptr;  ///< [batch] on the device, each in [0, capacity]
  int64_t q_stride[2] = {0, 0};      ///< element strides of q over (batch, head)
  int64_t k_stride[3] = {0, 0, 0};   ///< over (batch, head, position)
  int64_t v_stride[3] = {0, 0, 0};
  int batch = 0, heads = 0;  ///< heads a multiple of k_heads and of v_heads
  int k_heads = 0, v_heads = 0;
  int64_t capacity = 0;    ///< positions allocated along the cache's dim 2
  int64_t max_length = 0;  ///< an upper bound of every length (sizes the splits)
  int e = 0;               ///< key dim: a multiple of 8 in [8, 256]
  int dv = 0;              ///< value dim: 64 or 128
  float scale = 0;         ///< softmax(scale · q kᵀ)
};

/// How a launch is cut: `splits` chunks of `chunk` keys per (batch entry, head block),
/// `head_block` query heads per CTA; `workspace_bytes` of fp32 partials (0 with one split).
struct DecodePlan {
  int64_t chunk = 0;
  int64_t splits = 0;
  int head_block = 0;
  int64_t workspace_bytes = 0;
};

/// Whether the kernel handles key dim e and value dim dv.
bool decode_kernel_supports(int e, int dv);

/// The split of `p` for a GPU with `sm_count` multiprocessors (p's shape fields must be set).
DecodePlan plan_decode(const DecodeLaunch& p, int sm_count);

/// Launches phase 1 (and phase 2 when plan.splits > 1) on `stream`; `workspace` holds
/// plan.workspace_bytes (16-byte aligned; may be null when that is 0). Returns cudaSuccess, or
/// the error of the first failing CUDA call with that call's name in *failed_call
/// (cudaErrorInvalidValue for arguments outside the kernel's range, named likewise).
cudaError_t launch_decode_attention(const DecodeLaunch& p, const DecodePlan& plan, void* workspace,
                                    DecodeType type, cudaStream_t stream, const char** failed_call);

}  // namespace attnpilot::attention::cuda
