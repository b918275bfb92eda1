#pragma once
/// The architecture of a decoder-only transformer, read from and written to a Hugging
/// Face `config.json`.
///
///   config.json ──from_hf_json──► ModelConfig ──validate──► Transformer(cfg)
///        ▲                            │
///        └──────── to_json ───────────┘   (same keys transformers writes)
///
/// Supported `model_type`s: "llama" (RMSNorm, RoPE, SwiGLU, grouped-query attention),
/// "qwen2" (llama with q/k/v biases) and "gpt2" (LayerNorm, learned positions, GELU tanh,
/// fused c_attn). Keys that change the computation in ways this model does not
/// implement (rope scaling, sliding windows, scaled-by-layer attention) are refused by
/// name; keys that do not change the forward pass (dropout, token ids, dtype, ...) are
/// ignored.
#include <cstdint>
#include <filesystem>
#include <string>

#include "common/error.h"

namespace attnpilot::model {

/// A config.json that cannot be used: names the file and the offending key.
class ConfigError : public FormatError {
 public:
  ConfigError(const std::string& origin, const std::string& key, const std::string& what);
  const std::string& origin() const { return origin_; }
  const std::string& key() const { return key_; }

 private:
  std::string origin_, key_;
};

/// Field names follow Llama's config.json where they exist; gpt2's own names
/// (n_embd, n_layer, ...) are mapped onto them when reading and writing.
struct ModelConfig {
  std::string model_type = "llama";  ///< "llama" | "qwen2" | "gpt2"
  int64_t vocab_size = 2000;
  int64_t hidden_size = 128;
  int64_t num_layers = 4;           ///< num_hidden_layers / n_layer
  int64_t num_heads = 4;            ///< num_attention_heads / n_head
  int64_t num_kv_heads = 4;         ///< num_key_value_heads (gpt2: = num_heads)
  int64_t head_dim = 32;            ///< llama: may differ from hidden/heads; gpt2: = hidden/heads
  int64_t intermediate_size = 384;  ///< MLP width (gpt2: n_inner, null = 4·hidden)
  int64_t max_position_embeddings = 256;  ///< gpt2: n_positions (the learned table's rows)
  double rms_norm_eps = 1e-5;             ///< epsilon of every norm (gpt2: layer_norm_epsilon)
  double rope_theta = 10000.0;            ///< RoPE base (llama, qwen2)
  bool tie_word_embeddings = false;       ///< lm_head shares embed_tokens' weight
  /// Llama family only (gpt2 has biases everywhere; use the accessors below):
  bool attention_bias = false;      ///< biases on q, k, v projections
  bool attention_out_bias = false;  ///< bias on the output projection
  bool mlp_bias = false;            ///< biases on the MLP projections

  /// The defaults of a model type ("llama", "qwen2", "gpt2"): bias flags and tying as
  /// transformers sets them; sizes as above. Throws InvalidArgument for another type.
  static ModelConfig defaults(const std::string& model_type);

  bool is_gpt2() const { return model_type == "gpt2"; }
  bool qkv_bias() const { return is_gpt2() || attention_bias; }
  bool out_bias() const { return is_gpt2() || attention_out_bias; }
  bool ffn_bias() const { return is_gpt2() || mlp_bias; }
  /// RMSNorm + RoPE + SwiGLU (llama, qwen2); otherwise LayerNorm + positions + GELU.
  bool is_llama_family() const { return model_type == "llama" || model_type == "qwen2"; }

  /// Checks every field and their consistency; throws InvalidArgument naming the field.
  void validate() const;

  /// Parses config.json text. Throws ConfigError naming `origin` and the key for a
  /// missing or mistyped key, an unsupported model_type or an unsupported feature.
  static ModelConfig from_hf_json(const std::string& text, const std::string& origin);
  /// Reads and parses a config.json file (IoError if unreadable, ConfigError if bad).
  static ModelConfig load(const std::filesystem::path& path);

  /// config.json text with transformers' key names (architectures, model_type, sizes,
  /// "dtype": "float32"), such that from_hf_json(to_json()) == *this and transformers'
  /// AutoModelForCausalLM loads the folder.
  std::string to_json() const;

  bool operator==(const ModelConfig& o) const;
  bool operator!=(const ModelConfig& o) const { return !(*this == o); }
};

}  // namespace attnpilot::model
