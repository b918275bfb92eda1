#pragma once
/// The single attention entry point every model layer calls with its plan.
///
///   q [B, Hq, N, d]  k [B, Hkv, M, d]  v [B, Hkv, M, dv]   (Hq a multiple of Hkv: GQA)
///   plans: one LayerPlan per sequence (size B) or one for the whole batch (size 1)
///   ──► out [B, Hq, N, dv] and ExecStats
///
/// Query i sits at absolute position q_offset + i; key j at position j. With causal
/// masking query i sees keys j <= q_offset + i (q_offset = M - N for the usual case,
/// including decoding with a cache).
#include <torch/torch.h>

#include <vector>

#include "attention/plan.h"

namespace attnpilot::attention {

struct AttentionInputs {
  torch::Tensor q, k, v;
  bool causal = true;
  /// Position of the first query among the keys; -1 means M - N.
  int64_t q_offset = -1;
};

struct AttentionResult {
  torch::Tensor out;
  ExecStats stats;
};

/// Runs attention with the given plans. Throws InvalidArgument on shape or plan errors.
AttentionResult run_attention(const AttentionInputs& in, const std::vector<LayerPlan>& plans);

/// Reference dense attention (matmul + masked softmax), the oracle every backend is
/// tested against.
torch::Tensor dense_reference(const AttentionInputs& in);

}  // namespace attnpilot::attention
