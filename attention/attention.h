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
///
/// Execution: heads are grouped by equal HeadPlan (per sequence when plans differ by
/// sequence); each group runs one backend kernel on the device's Backend (backend.h):
///
///   dense         SDPA when use_sdpa and the mask is plain, else chunked matmul-softmax
///   lowrank r     Q' = Q A_Q, K' = K A_K (or k_proj) ──► softmax(Q'K'ᵀ/√d) V at full dv
///   block_sparse  BlockMask (given, or from the plan's estimator) ──► listed blocks only
///   streaming     sinks + local window, as a block mask plus a token-level window
#include <torch/torch.h>

#include <vector>

#include "attention/block_mask.h"
#include "attention/plan.h"

namespace attnpilot::attention {

struct AttentionInputs {
  /// k may be left undefined when k_proj is given and every head is kLowRank.
  torch::Tensor q, k, v;
  bool causal = true;
  /// Position of the first query among the keys; -1 means M - N.
  int64_t q_offset = -1;
  /// Optional precomputed score projections [B or 1, Hq, d, R] (e.g. from the agent's
  /// incremental tracker or a low-rank key cache); a kLowRank head of rank r <= R uses the
  /// first r columns. Undefined: computed on the fly (lowrank_projections), cost counted.
  torch::Tensor a_q, a_k;
  /// Optional projected keys K A_K [B, Hq, M, R] (a low-rank key cache); requires a_q.
  torch::Tensor k_proj;
  /// Optional block mask over [B, Hq] for kBlockSparse heads; otherwise each head's
  /// estimator builds one (its cost counted in other_flops).
  const BlockMask* block_mask = nullptr;
  /// Dense heads use LibTorch SDPA where it applies; false forces the chunked matmul-softmax
  /// kernel (the like-for-like reference for the low-rank kernel).
  bool use_sdpa = true;
  /// Layer index for error messages (-1: unknown).
  int64_t layer = -1;
};

struct AttentionResult {
  torch::Tensor out;
  ExecStats stats;
};

/// Runs attention with the given plans. Throws InvalidArgument on shape or plan errors,
/// Unavailable for devices without a backend.
AttentionResult run_attention(const AttentionInputs& in, const std::vector<LayerPlan>& plans);

/// Reference dense attention (matmul + masked softmax), the oracle every backend is
/// tested against.
torch::Tensor dense_reference(const AttentionInputs& in);

}  // namespace attnpilot::attention
