#pragma once
/// Decode attention on the GPU: one query per sequence against a key/value cache of
/// per-sequence lengths, through the split-K kernel of decode_attention.cu.
///
///   q [B, Hq, e] ──┐
///   k [B, Hk, cap, e]   (e = r: projected keys K·A_K with Hk = Hq; e = d: full keys, Hk = Hkv)
///   v [B, Hkv, cap, dv] ├─► out[b, h] = softmax(scale · q[b,h] · k[b,h/(Hq/Hk),0:len_b]ᵀ)
///   lengths [B]    ──┘                 · v[b, h/(Hq/Hkv), 0:len_b]      (zeros when len_b = 0)
///
/// Only the first lengths[b] positions of sequence b are read, so k and v may be the cache's
/// capacity-sized buffers (KVCache keeps them with capacity >= length).
#include <torch/torch.h>

namespace attnpilot::attention {

/// Whether the kernel computes keys of dim e with values of dim dv (e a multiple of 8 in
/// [8, 256], dv 64 or 128); decode_attention_cuda rejects other dims.
bool decode_attention_cuda_supports(int64_t e, int64_t dv);

/// out [B, Hq, dv] in q's dtype. q, k, v: bf16 or fp16 alike, on one CUDA device; k and v with
/// a unit last stride, 16-byte aligned, other strides multiples of 8 elements (any view of a
/// contiguous cache buffer with e, dv multiples of 8); Hq a multiple of Hk and of Hkv. lengths:
/// int32 or int64, each in [0, cap]; on the CPU (checked there, copied to the GPU through pinned
/// memory without a synchronisation: the decode-loop choice) or on q's device (read back once to
/// check them, which synchronises the stream).
/// Runs on the current CUDA stream of q's device. Throws InvalidArgument naming the offending
/// value, Error when a CUDA call fails.
torch::Tensor decode_attention_cuda(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, const torch::Tensor& lengths,
                                    double scale);

}  // namespace attnpilot::attention
