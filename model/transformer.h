#pragma once
/// Decoder-only transformer, Llama style or GPT-2 style, with every layer's attention
/// going through attention::run_attention with that layer's plan.
///
///   tokens [B,N] ─► embed_tokens (+ embed_positions, gpt2) ─► x
///   for each layer l:
///     h = attn_norm(x)                      RMSNorm (llama) | LayerNorm (gpt2)
///     q,k,v = q_proj(h), k_proj(h), v_proj(h)   [B,H,N,d], k/v with num_kv_heads
///     q,k = RoPE(q,k)                       llama only (HF rotate_half convention)
///     a = attention::run_attention({q,k,v}, plans[l])   ◄── the only attention call
///     x = x + o_proj(a)
///     x = x + mlp(mlp_norm(x))              SwiGLU (llama) | GELU-tanh MLP (gpt2)
///   logits = lm_head(final_norm(x))         (lm_head = embed_tokens when tied)
///
/// Parameter names (our own, uniform across architectures; model/checkpoint.h maps
/// Hugging Face names onto them in one place):
///   embed_tokens.weight, embed_positions.weight (gpt2), final_norm.{weight,bias},
///   lm_head.weight (untied), layers.L.{attn_norm,mlp_norm}.{weight,bias},
///   layers.L.{q,k,v,o}_proj.{weight,bias}, layers.L.{gate,up,down}_proj.weight (llama),
///   layers.L.{fc_in,fc_out}.{weight,bias} (gpt2). Linear weights are [out, in].
#include <torch/torch.h>

#include <functional>
#include <utility>
#include <vector>

#include "attention/attention.h"
#include "attention/kv_cache.h"
#include "model/config.h"

namespace attnpilot::model {

/// How one forward pass runs.
struct ForwardOptions {
  /// [layer][1 or batch] plans; nullptr = dense everywhere.
  const std::vector<std::vector<attention::LayerPlan>>* plans = nullptr;
  /// Fill ForwardOutput::layers.
  bool capture = false;
  /// Incremental decoding: the tokens continue the cached sequence (positions start at
  /// cache->length(0)); every layer appends its keys/values to the cache and attends over
  /// all cached positions. num_layers slots, all of equal length. nullptr = no cache.
  attention::KVCache* cache = nullptr;
  /// Called for every layer once its queries and keys are ready, just before attention
  /// runs: q [B,Hq,T,d] and k [B,Hkv,T,d] are this call's new rows (after RoPE), `in` the
  /// attention inputs (with a cache: every cached key). The callee may set fields of `in`,
  /// e.g. precomputed score projections a_q/a_k (the rank agent's incremental tracker).
  std::function<void(int64_t layer, const torch::Tensor& q, const torch::Tensor& k,
                     attention::AttentionInputs& in)>
      before_attention;
};

/// One layer's tensors, for observations (not detached: they share the autograd graph
/// when gradients are on).
struct LayerCapture {
  torch::Tensor q, k, v;     ///< exactly as passed to attention: [B,H,N,d] after RoPE,
                             ///< k/v with num_kv_heads
  torch::Tensor q_pre_rope;  ///< [B,Hq,N,d] (gpt2: equal to q)
  torch::Tensor attn_out;    ///< [B,Hq,N,d] before the output projection
  torch::Tensor hidden_out;  ///< [B,N,hidden] residual stream after the layer
};

struct ForwardOutput {
  torch::Tensor logits;                           ///< [B,N,vocab]
  std::vector<LayerCapture> layers;               ///< one per layer when capture is on
  attention::ExecStats stats;                     ///< summed over layers
  std::vector<attention::ExecStats> layer_stats;  ///< one per layer
};

/// RMSNorm (weight) or LayerNorm (weight, bias). RMSNorm computes in float32 and casts
/// back, as transformers' LlamaRMSNorm.
class NormImpl : public torch::nn::Module {
 public:
  NormImpl(int64_t dim, double eps, bool layer_norm);
  torch::Tensor forward(const torch::Tensor& x);
  torch::Tensor weight, bias;  ///< bias undefined for RMSNorm

 private:
  double eps_;
  bool layer_norm_;
};
TORCH_MODULE(Norm);

/// RoPE tables for absolute `positions` ([N] int64): cos and sin of shape [N, head_dim],
/// float32, each frequency repeated in both halves (HF: emb = cat(freqs, freqs)) with
/// inv_freq_i = theta^(-2i/head_dim).
std::pair<torch::Tensor, torch::Tensor> rope_cos_sin(const torch::Tensor& positions,
                                                     int64_t head_dim, double theta);
/// [-x2, x1] for x = [x1, x2] split in halves along the last dimension.
torch::Tensor rotate_half(const torch::Tensor& x);
/// x·cos + rotate_half(x)·sin for x [B,H,N,d] and cos/sin [N,d] (computed in float32,
/// returned in x's dtype).
torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos,
                         const torch::Tensor& sin);

/// One decoder block.
class DecoderLayerImpl : public torch::nn::Module {
 public:
  explicit DecoderLayerImpl(const ModelConfig& c);
  Norm attn_norm{nullptr}, mlp_norm{nullptr};
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};  ///< llama
  torch::nn::Linear fc_in{nullptr}, fc_out{nullptr};                           ///< gpt2
  /// The MLP applied to the normed residual stream.
  torch::Tensor mlp(const torch::Tensor& h);
};
TORCH_MODULE(DecoderLayer);

class TransformerImpl : public torch::nn::Module {
 public:
  /// Validates `cfg` (InvalidArgument naming the field) and initialises parameters:
  /// weights ~ N(0, 0.02) (output projections N(0, 0.02/√(2·layers))), biases 0, norms 1.
  explicit TransformerImpl(const ModelConfig& cfg);

  /// tokens [B,N] int64 with ids in [0, vocab_size). Throws InvalidArgument for bad
  /// tokens or plans (the wrong number of layers or batch entries), Unavailable when a
  /// plan needs an attention backend that is not built.
  ForwardOutput forward(const torch::Tensor& tokens, const ForwardOptions& opts = {});

  const ModelConfig& config() const { return cfg_; }
  /// Total number of parameter elements (tied weights counted once).
  int64_t num_parameters() const;

  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::Embedding embed_positions{nullptr};  ///< gpt2
  torch::nn::ModuleList layers{nullptr};
  Norm final_norm{nullptr};
  torch::nn::Linear lm_head{nullptr};  ///< absent when tie_word_embeddings

 private:
  ModelConfig cfg_;
};
TORCH_MODULE(Transformer);

}  // namespace attnpilot::model
