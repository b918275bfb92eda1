#pragma once
/// Key/value cache for incremental decoding, one slot per layer.
///
///   prefill:  append(l, K[0:P], V[0:P])  ──► run_attention(inputs(l, Q[0:P]), plan)
///   optional: compress_keys(l, A_Q, A_K)   K (Hkv×N×d) ──► K A_K (Hq×N×r), K dropped
///   decode:   append(l, k_t, v_t)        ──► run_attention(inputs(l, q_t), plan)
///
/// Storage grows by doubling capacity, so an append costs O(new tokens) amortised. In
/// low-rank mode every plan for that layer must be kLowRank with rank <= r (the keys are
/// only available projected); decode then reads r instead of d numbers per key and head.
#include <torch/torch.h>

#include <cstdint>
#include <vector>

#include "attention/attention.h"

namespace attnpilot::attention {

class KVCache {
 public:
  explicit KVCache(int64_t num_layers);

  /// Appends k_new [B, Hkv, T, d] and v_new [B, Hkv, T, dv] to `layer`. In low-rank mode
  /// the keys are stored as expand(k_new) A_K [B, Hq, T, r].
  void append(int64_t layer, const torch::Tensor& k_new, const torch::Tensor& v_new);
  /// Switches `layer` to a low-rank key cache with projections a_q, a_k [B, Hq, d, r]: the
  /// stored keys become K A_K and the full keys are released.
  void compress_keys(int64_t layer, const torch::Tensor& a_q, const torch::Tensor& a_k);
  /// Inputs for queries q [B, Hq, T, d] at the last T cached positions (call after append):
  /// causal, q_offset = length - T, with k or (a_q, k_proj) set.
  AttentionInputs inputs(int64_t layer, const torch::Tensor& q) const;

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t length(int64_t layer) const;
  bool lowrank(int64_t layer) const;
  /// Views of the cached tensors ([B, H, length, ·]); keys undefined in low-rank mode,
  /// key_proj undefined otherwise.
  torch::Tensor keys(int64_t layer) const;
  torch::Tensor values(int64_t layer) const;
  torch::Tensor key_proj(int64_t layer) const;
  /// Bytes of the cached keys (or projected keys) and values at the current length.
  double key_bytes(int64_t layer) const;
  double value_bytes(int64_t layer) const;
  /// Drops every layer's contents.
  void clear();

 private:
  struct Slot {
    torch::Tensor k, v, kp, a_q, a_k;  // buffers with capacity along dim 2
    int64_t len = 0;
  };
  const Slot& slot(int64_t layer) const;
  Slot& slot(int64_t layer);
  std::vector<Slot> layers_;
};

}  // namespace attnpilot::attention
