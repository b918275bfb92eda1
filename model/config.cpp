#include "model/config.h"

#include <fmt/format.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "common/atomic_file.h"

namespace attnpilot::model {

using json = nlohmann::json;

ConfigError::ConfigError(const std::string& origin, const std::string& key, const std::string& what)
    : FormatError(fmt::format("{}: key '{}': {}", origin, key, what)), origin_(origin), key_(key) {}

namespace {

/// Typed access to a config.json object; every error names the file and the key.
class Reader {
 public:
  Reader(const json& j, std::string origin) : j_(j), origin_(std::move(origin)) {}

  bool present(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }

  int64_t integer(const std::string& key) const {
    if (!j_.contains(key)) fail(key, "missing (required)");
    return integer_value(key, j_[key]);
  }
  int64_t integer(const std::string& key, int64_t fallback) const {
    return present(key) ? integer_value(key, j_[key]) : fallback;
  }
  double number(const std::string& key, double fallback) const {
    if (!present(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_number()) fail(key, fmt::format("expected a number, got {}", v.dump()));
    return v.get<double>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    if (!present(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_boolean()) fail(key, fmt::format("expected true or false, got {}", v.dump()));
    return v.get<bool>();
  }
  std::string string(const std::string& key, const std::string& fallback) const {
    if (!present(key)) return fallback;
    const json& v = j_[key];
    if (!v.is_string()) fail(key, fmt::format("expected a string, got {}", v.dump()));
    return v.get<std::string>();
  }
  /// Refuses a key whose value differs from the one value this model implements.
  void require_value(const std::string& key, const json& allowed, const std::string& why) const {
    if (present(key) && j_[key] != allowed)
      fail(key, fmt::format("value {} is not supported ({}); expected {}", j_[key].dump(), why,
                            allowed.dump()));
  }
  const json& raw(const std::string& key) const { return j_[key]; }

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw ConfigError(origin_, key, what);
  }

 private:
  int64_t integer_value(const std::string& key, const json& v) const {
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      const double d = v.get<double>();
      if (std::floor(d) == d && std::abs(d) < 9e15) return static_cast<int64_t>(d);
    }
    fail(key, fmt::format("expected an integer, got {}", v.dump()));
  }

  const json& j_;
  std::string origin_;
};

/// rope_theta from `rope_theta` (transformers 4) or `rope_parameters` / `rope_scaling`
/// (transformers 5); anything but the default rope type is refused.
double read_rope(const Reader& r, const json& j) {
  double theta = r.number("rope_theta", 10000.0);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    if (!r.present(key)) continue;
    const json& p = r.raw(key);
    if (!p.is_object()) r.fail(key, fmt::format("expected an object, got {}", p.dump()));
    Reader sub(p, "");
    if (sub.present("rope_type") || sub.present("type")) {
      const std::string type = sub.present("rope_type") ? p["rope_type"].dump() : p["type"].dump();
      if (type != "\"default\"")
        r.fail(std::string(key) + ".rope_type",
               fmt::format("rope type {} is not supported (only \"default\")", type));
    }
    if (p.contains("rope_theta")) {
      if (!p["rope_theta"].is_number())
        r.fail(std::string(key) + ".rope_theta",
               fmt::format("expected a number, got {}", p["rope_theta"].dump()));
      theta = p["rope_theta"].get<double>();
    }
  }
  return theta;
}

ModelConfig parse_llama_family(const Reader& r, const json& j, const std::string& type) {
  ModelConfig c = ModelConfig::defaults(type);
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.num_layers = r.integer("num_hidden_layers");
  c.num_heads = r.integer("num_attention_heads");
  c.num_kv_heads = r.integer("num_key_value_heads", c.num_heads);
  if (c.num_heads <= 0) r.fail("num_attention_heads", fmt::format("{} must be >= 1", c.num_heads));
  c.head_dim = r.integer("head_dim", c.hidden_size / c.num_heads);
  c.max_position_embeddings = r.integer("max_position_embeddings", 2048);
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  c.rope_theta = read_rope(r, j);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  const std::string act = r.string("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", fmt::format("'{}' is not supported (only silu)", act));
  if (type == "llama") {
    c.attention_bias = r.boolean("attention_bias", false);
    c.attention_out_bias = c.attention_bias;
    c.mlp_bias = r.boolean("mlp_bias", false);
  } else {  // qwen2: q/k/v biases, none elsewhere
    r.require_value("use_sliding_window", false,
                    "sliding-window attention is not supported by attnpilot");
    if (r.present("layer_types")) {
      const json& lt = r.raw("layer_types");
      if (!lt.is_array()) r.fail("layer_types", "expected an array");
      for (const auto& t : lt)
        if (t != "full_attention")
          r.fail("layer_types", fmt::format("layer type {} is not supported (only "
                                            "\"full_attention\")",
                                            t.dump()));
    }
  }
  return c;
}

ModelConfig parse_gpt2(const Reader& r) {
  ModelConfig c = ModelConfig::defaults("gpt2");
  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("n_embd");
  c.num_layers = r.integer("n_layer");
  c.num_heads = r.integer("n_head");
  if (c.num_heads <= 0) r.fail("n_head", fmt::format("{} must be >= 1", c.num_heads));
  c.num_kv_heads = c.num_heads;
  c.head_dim = c.hidden_size / c.num_heads;
  if (c.head_dim * c.num_heads != c.hidden_size)
    r.fail("n_head",
           fmt::format("n_embd {} is not divisible by n_head {}", c.hidden_size, c.num_heads));
  c.intermediate_size = r.integer("n_inner", 4 * c.hidden_size);
  c.max_position_embeddings = r.integer("n_positions");
  c.rms_norm_eps = r.number("layer_norm_epsilon", 1e-5);
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", true);
  const std::string act = r.string("activation_function", "gelu_new");
  if (act != "gelu_new" && act != "gelu_pytorch_tanh")
    r.fail("activation_function",
           fmt::format("'{}' is not supported (only gelu_new / gelu_pytorch_tanh)", act));
  r.require_value("scale_attn_weights", true, "unscaled attention is not supported by attnpilot");
  r.require_value("scale_attn_by_inverse_layer_idx", false,
                  "per-layer attention scaling is not supported by attnpilot");
  r.require_value("add_cross_attention", false, "cross-attention is not supported by attnpilot");
  return c;
}

}  // namespace

ModelConfig ModelConfig::defaults(const std::string& model_type) {
  ModelConfig c;
  c.model_type = model_type;
  if (model_type == "llama") return c;
  if (model_type == "qwen2") {
    c.attention_bias = true;
    c.rms_norm_eps = 1e-6;
    return c;
  }
  if (model_type == "gpt2") {
    c.tie_word_embeddings = true;
    c.intermediate_size = 4 * c.hidden_size;
    return c;
  }
  throw InvalidArgument(
      fmt::format("model_type '{}' is not supported: expected llama, qwen2 or gpt2", model_type));
}

void ModelConfig::validate() const {
  ATTNPILOT_CHECK_ARG(model_type == "llama" || model_type == "qwen2" || model_type == "gpt2",
                      "model_type '{}' is not supported: expected llama, qwen2 or gpt2",
                      model_type);
  ATTNPILOT_CHECK_ARG(vocab_size >= 1, "vocab_size {} must be >= 1", vocab_size);
  ATTNPILOT_CHECK_ARG(hidden_size >= 1, "hidden_size {} must be >= 1", hidden_size);
  ATTNPILOT_CHECK_ARG(num_layers >= 1, "num_layers {} must be >= 1", num_layers);
  ATTNPILOT_CHECK_ARG(num_heads >= 1, "num_heads {} must be >= 1", num_heads);
  ATTNPILOT_CHECK_ARG(num_kv_heads >= 1 && num_heads % num_kv_heads == 0,
                      "num_kv_heads {} must be >= 1 and divide num_heads {}", num_kv_heads,
                      num_heads);
  ATTNPILOT_CHECK_ARG(head_dim >= 1, "head_dim {} must be >= 1", head_dim);
  ATTNPILOT_CHECK_ARG(intermediate_size >= 1, "intermediate_size {} must be >= 1",
                      intermediate_size);
  ATTNPILOT_CHECK_ARG(max_position_embeddings >= 1, "max_position_embeddings {} must be >= 1",
                      max_position_embeddings);
  ATTNPILOT_CHECK_ARG(rms_norm_eps > 0 && std::isfinite(rms_norm_eps),
                      "rms_norm_eps {} must be a positive finite number", rms_norm_eps);
  // Sizes large enough to overflow parameter counts are refused (1 << 24 per dimension).
  for (auto [name, v] : {std::pair<const char*, int64_t>{"vocab_size", vocab_size},
                         {"hidden_size", hidden_size},
                         {"num_layers", num_layers},
                         {"num_heads", num_heads},
                         {"head_dim", head_dim},
                         {"intermediate_size", intermediate_size},
                         {"max_position_embeddings", max_position_embeddings}})
    ATTNPILOT_CHECK_ARG(v <= (int64_t{1} << 24), "{} {} is larger than the supported 16777216",
                        name, v);
  if (is_llama_family()) {
    ATTNPILOT_CHECK_ARG(head_dim % 2 == 0, "head_dim {} must be even for RoPE", head_dim);
    ATTNPILOT_CHECK_ARG(rope_theta > 0 && std::isfinite(rope_theta),
                        "rope_theta {} must be a positive finite number", rope_theta);
  }
  if (model_type == "llama")
    ATTNPILOT_CHECK_ARG(attention_out_bias == attention_bias,
                        "llama: attention_out_bias {} must equal attention_bias {} (one "
                        "config.json key covers q, k, v and o)",
                        attention_out_bias, attention_bias);
  if (model_type == "qwen2")
    ATTNPILOT_CHECK_ARG(attention_bias && !attention_out_bias && !mlp_bias,
                        "qwen2 has q/k/v biases only: attention_bias must be true, "
                        "attention_out_bias and mlp_bias false (got {}, {}, {})",
                        attention_bias, attention_out_bias, mlp_bias);
  if (is_gpt2()) {
    ATTNPILOT_CHECK_ARG(num_kv_heads == num_heads, "gpt2: num_kv_heads {} must equal num_heads {}",
                        num_kv_heads, num_heads);
    ATTNPILOT_CHECK_ARG(head_dim * num_heads == hidden_size,
                        "gpt2: head_dim {} x num_heads {} must equal hidden_size {}", head_dim,
                        num_heads, hidden_size);
  }
}

ModelConfig ModelConfig::from_hf_json(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw ConfigError(origin, "<document>", fmt::format("not valid JSON: {}", e.what()));
  }
  if (!j.is_object()) throw ConfigError(origin, "<document>", "expected a JSON object");
  Reader r(j, origin);
  if (!r.present("model_type")) r.fail("model_type", "missing (required)");
  const std::string type = r.string("model_type", "");
  ModelConfig c;
  if (type == "llama" || type == "qwen2") {
    c = parse_llama_family(r, j, type);
  } else if (type == "gpt2") {
    c = parse_gpt2(r);
  } else {
    r.fail("model_type", fmt::format("'{}' is not supported: expected llama, qwen2 or gpt2", type));
  }
  try {
    c.validate();
  } catch (const InvalidArgument& e) {
    throw ConfigError(origin, "<architecture>", e.what());
  }
  return c;
}

ModelConfig ModelConfig::load(const std::filesystem::path& path) {
  return from_hf_json(read_file(path), path.string());
}

std::string ModelConfig::to_json() const {
  json j;
  if (is_gpt2()) {
    j["architectures"] = {"GPT2LMHeadModel"};
    j["model_type"] = "gpt2";
    j["vocab_size"] = vocab_size;
    j["n_embd"] = hidden_size;
    j["n_layer"] = num_layers;
    j["n_head"] = num_heads;
    j["n_inner"] = intermediate_size;
    j["n_positions"] = max_position_embeddings;
    j["layer_norm_epsilon"] = rms_norm_eps;
    j["activation_function"] = "gelu_new";
    j["tie_word_embeddings"] = tie_word_embeddings;
    j["scale_attn_weights"] = true;
    j["scale_attn_by_inverse_layer_idx"] = false;
  } else {
    j["architectures"] = {model_type == "qwen2" ? "Qwen2ForCausalLM" : "LlamaForCausalLM"};
    j["model_type"] = model_type;
    j["vocab_size"] = vocab_size;
    j["hidden_size"] = hidden_size;
    j["num_hidden_layers"] = num_layers;
    j["num_attention_heads"] = num_heads;
    j["num_key_value_heads"] = num_kv_heads;
    j["head_dim"] = head_dim;
    j["intermediate_size"] = intermediate_size;
    j["max_position_embeddings"] = max_position_embeddings;
    j["rms_norm_eps"] = rms_norm_eps;
    j["rope_theta"] = rope_theta;
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", rope_theta}};
    j["hidden_act"] = "silu";
    j["tie_word_embeddings"] = tie_word_embeddings;
    if (model_type == "llama") {
      j["attention_bias"] = attention_bias;
      j["mlp_bias"] = mlp_bias;
    } else {
      j["use_sliding_window"] = false;
    }
  }
  j["dtype"] = "float32";
  return j.dump(2) + "\n";
}

bool ModelConfig::operator==(const ModelConfig& o) const {
  return model_type == o.model_type && vocab_size == o.vocab_size && hidden_size == o.hidden_size &&
         num_layers == o.num_layers && num_heads == o.num_heads && num_kv_heads == o.num_kv_heads &&
         head_dim == o.head_dim && intermediate_size == o.intermediate_size &&
         max_position_embeddings == o.max_position_embeddings && rms_norm_eps == o.rms_norm_eps &&
         (is_gpt2() || rope_theta == o.rope_theta) &&
         tie_word_embeddings == o.tie_word_embeddings && qkv_bias() == o.qkv_bias() &&
         out_bias() == o.out_bias() && ffn_bias() == o.ffn_bias();
}

}  // namespace attnpilot::model
