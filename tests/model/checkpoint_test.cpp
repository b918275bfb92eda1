// Configs and checkpoint folders: config.json parsing and refusals, save/load round trips,
// fingerprints, and checkpoints whose tensors do not fit their config.
#include "model/checkpoint.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/atomic_file.h"
#include "model_test_util.h"

namespace attnpilot::model {
namespace {

using json = nlohmann::json;
using testing::TempDir;

ModelConfig tiny(const std::string& type) {
  ModelConfig c = ModelConfig::defaults(type);
  c.vocab_size = 29;
  c.hidden_size = 16;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = type == "gpt2" ? 4 : 2;
  c.head_dim = 4;
  c.intermediate_size = 24;
  c.max_position_embeddings = 12;
  return c;
}

const char* kLlamaJson = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50,
  "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
  "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "hidden_act": "silu",
  "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
  "tie_word_embeddings": true, "attention_bias": false, "mlp_bias": false,
  "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32", "use_cache": true
})";

const char* kGpt2Json = R"({
  "activation_function": "gelu_new", "model_type": "gpt2", "n_embd": 32, "n_head": 4,
  "n_inner": null, "n_layer": 2, "n_positions": 64, "vocab_size": 50,
  "layer_norm_epsilon": 1e-05, "scale_attn_weights": true, "attn_pdrop": 0.1
})";

/// The key a ConfigError names for `text`, or "" when it is accepted.
std::string refused_key(const std::string& text) {
  try {
    ModelConfig::from_hf_json(text, "cfg.json");
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.origin(), "cfg.json");
    EXPECT_NE(std::string(e.what()).find("cfg.json"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find(e.key()), std::string::npos);
    return e.key();
  }
  return "";
}

std::string with(const char* base, const json& patch) {
  json j = json::parse(base);
  for (auto it = patch.begin(); it != patch.end(); ++it) {
    if (it.value().is_null() && it.key().rfind("-", 0) == 0)
      j.erase(it.key().substr(1));
    else
      j[it.key()] = it.value();
  }
  return j.dump();
}

TEST(ConfigTest, ParsesTransformersConfigs) {
  const auto l = ModelConfig::from_hf_json(kLlamaJson, "llama");
  EXPECT_EQ(l.model_type, "llama");
  EXPECT_EQ(l.num_layers, 3);
  EXPECT_EQ(l.num_kv_heads, 2);
  EXPECT_EQ(l.head_dim, 8);
  EXPECT_DOUBLE_EQ(l.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(l.rms_norm_eps, 1e-6);
  EXPECT_TRUE(l.tie_word_embeddings);
  EXPECT_FALSE(l.qkv_bias());
  // transformers 4 style: top-level rope_theta, no head_dim, no kv heads.
  const auto l4 = ModelConfig::from_hf_json(with(kLlamaJson, {{"-rope_parameters", nullptr},
                                                              {"rope_theta", 1234.0},
                                                              {"-head_dim", nullptr},
                                                              {"-num_key_value_heads", nullptr}}),
                                            "llama4");
  EXPECT_DOUBLE_EQ(l4.rope_theta, 1234.0);
  EXPECT_EQ(l4.head_dim, 8);
  EXPECT_EQ(l4.num_kv_heads, 4);

  const auto g = ModelConfig::from_hf_json(kGpt2Json, "gpt2");
  EXPECT_EQ(g.model_type, "gpt2");
  EXPECT_EQ(g.intermediate_size, 128);  // n_inner null = 4 n_embd
  EXPECT_EQ(g.head_dim, 8);
  EXPECT_EQ(g.max_position_embeddings, 64);
  EXPECT_TRUE(g.tie_word_embeddings);
  EXPECT_TRUE(g.qkv_bias() && g.out_bias() && g.ffn_bias());

  const auto q = ModelConfig::from_hf_json(
      with(kLlamaJson, {{"model_type", "qwen2"},
                        {"-attention_bias", nullptr},
                        {"-mlp_bias", nullptr},
                        {"use_sliding_window", false},
                        {"layer_types", {"full_attention", "full_attention", "full_attention"}}}),
      "qwen2");
  EXPECT_TRUE(q.qkv_bias());
  EXPECT_FALSE(q.out_bias());
  EXPECT_FALSE(q.ffn_bias());
}

TEST(ConfigTest, JsonRoundTrip) {
  for (const char* type : {"llama", "qwen2", "gpt2"}) {
    ModelConfig c = tiny(type);
    c.rope_theta = 31415.0;
    c.tie_word_embeddings = !c.tie_word_embeddings;
    const auto back = ModelConfig::from_hf_json(c.to_json(), "roundtrip");
    EXPECT_EQ(back, c) << type << "\n" << c.to_json();
  }
  ModelConfig biased = tiny("llama");
  biased.attention_bias = biased.attention_out_bias = biased.mlp_bias = true;
  EXPECT_EQ(ModelConfig::from_hf_json(biased.to_json(), "b"), biased);
}

TEST(ConfigTest, MalformedConfigsNameTheKey) {
  EXPECT_EQ(refused_key("{not json"), "<document>");
  EXPECT_EQ(refused_key("[1, 2]"), "<document>");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"-model_type", nullptr}})), "model_type");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"model_type", "mistral"}})), "model_type");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"model_type", 7}})), "model_type");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"-hidden_size", nullptr}})), "hidden_size");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"hidden_size", "big"}})), "hidden_size");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"hidden_size", 32.5}})), "hidden_size");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"rms_norm_eps", "small"}})), "rms_norm_eps");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"tie_word_embeddings", 1}})), "tie_word_embeddings");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"hidden_act", "gelu"}})), "hidden_act");
  EXPECT_EQ(refused_key(
                with(kLlamaJson, {{"rope_parameters", {{"rope_type", "yarn"}, {"factor", 4.0}}}})),
            "rope_parameters.rope_type");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"rope_scaling", {{"type", "linear"}}}})),
            "rope_scaling.rope_type");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"num_key_value_heads", 3}})), "<architecture>");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"num_attention_heads", 0}})), "num_attention_heads");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"vocab_size", -5}})), "<architecture>");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"head_dim", 7}})), "<architecture>");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"num_hidden_layers", 1e12}})), "<architecture>");
  EXPECT_EQ(refused_key(with(kLlamaJson, {{"model_type", "qwen2"}, {"use_sliding_window", true}})),
            "use_sliding_window");
  EXPECT_EQ(refused_key(with(kLlamaJson,
                             {{"model_type", "qwen2"}, {"layer_types", {"sliding_attention"}}})),
            "layer_types");
  EXPECT_EQ(refused_key(with(kGpt2Json, {{"n_head", 5}})), "n_head");
  EXPECT_EQ(refused_key(with(kGpt2Json, {{"activation_function", "relu"}})), "activation_function");
  EXPECT_EQ(refused_key(with(kGpt2Json, {{"scale_attn_by_inverse_layer_idx", true}})),
            "scale_attn_by_inverse_layer_idx");
  EXPECT_EQ(refused_key(with(kGpt2Json, {{"-n_positions", nullptr}})), "n_positions");
  EXPECT_EQ(refused_key(kGpt2Json), "");
}

/// Saves a randomised tiny model of `type` into DIR/name.
Transformer saved_model(const TempDir& dir, const std::string& name, const ModelConfig& cfg,
                        const std::map<std::string, std::string>& extra = {}) {
  torch::manual_seed(5);
  Transformer m(cfg);
  {
    torch::NoGradGuard g;
    for (auto& p : m->parameters()) p.add_(torch::randn_like(p) * 0.1);
  }
  save_model(dir.path() / name, m, extra);
  return m;
}

TEST(CheckpointTest, SaveLoadRoundTrip) {
  TempDir dir;
  for (const char* type : {"llama", "qwen2", "gpt2"}) {
    for (bool tied : {false, true}) {
      ModelConfig cfg = tiny(type);
      cfg.tie_word_embeddings = tied;
      const std::string name = std::string(type) + (tied ? "_tied" : "");
      Transformer m = saved_model(dir, name, cfg, {{"tokenizer.model", "sentencepiece bytes"}});
      Transformer back = load_model(dir.path() / name, torch::kCPU);
      EXPECT_EQ(back->config(), cfg);
      const auto a = m->named_parameters(), b = back->named_parameters();
      ASSERT_EQ(a.size(), b.size());
      for (const auto& p : a) EXPECT_TRUE(torch::equal(p.value(), b[p.key()])) << name << p.key();
      torch::NoGradGuard g;
      const auto tokens = torch::randint(0, cfg.vocab_size, {2, 6}, torch::kInt64);
      EXPECT_TRUE(torch::equal(m->forward(tokens).logits, back->forward(tokens).logits)) << name;
      EXPECT_EQ(read_file(dir.path() / name / "tokenizer.model"), "sentencepiece bytes");
      EXPECT_EQ(model_fingerprint(dir.path() / name), model_fingerprint(*m)) << name;
      const auto report = inspect_model(dir.path() / name);
      EXPECT_EQ(report.num_parameters, m->num_parameters()) << name;
      EXPECT_TRUE(report.ignored.empty());
      const auto text = format_inspect(report);
      EXPECT_NE(text.find(report.fingerprint), std::string::npos);
      EXPECT_NE(text.find(std::to_string(m->num_parameters())), std::string::npos);
      EXPECT_NE(text.find(hf_tensor_specs(cfg).back().name), std::string::npos);
    }
  }
  // Fingerprints differ between architectures and sizes.
  EXPECT_NE(model_fingerprint(dir.path() / "llama"), model_fingerprint(dir.path() / "qwen2"));
  EXPECT_NE(model_fingerprint(dir.path() / "llama"), model_fingerprint(dir.path() / "llama_tied"));
}

TEST(CheckpointTest, SaveReplacesTheFolderAtomically) {
  TempDir dir;
  ModelConfig cfg = tiny("llama");
  saved_model(dir, "m", cfg, {{"old.txt", "old"}});
  cfg.num_layers = 1;
  saved_model(dir, "m", cfg, {{"new.txt", "new"}});
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "m" / "old.txt"));
  EXPECT_EQ(read_file(dir.path() / "m" / "new.txt"), "new");
  EXPECT_EQ(load_model(dir.path() / "m", torch::kCPU)->config().num_layers, 1);
  // Nothing but the folder is left beside it (no staging or old copies).
  int entries = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir.path())) {
    (void)e;
    ++entries;
  }
  EXPECT_EQ(entries, 1);
  Transformer m(cfg);
  EXPECT_THROW(save_model(dir.path() / "x", m, {{"../escape", "x"}}), InvalidArgument);
  EXPECT_THROW(save_model(dir.path() / "x", m, {{"config.json", "x"}}), InvalidArgument);
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "x"));
}

TEST(CheckpointTest, HalfPrecisionFilesLoad) {
  TempDir dir;
  ModelConfig cfg = tiny("llama");
  Transformer m = saved_model(dir, "m", cfg);
  auto tensors = to_hf_tensors(*m);
  for (auto& [name, t] : tensors) t = t.to(torch::kBFloat16);
  write_safetensors(dir.path() / "m" / kWeightsFile, tensors);
  Transformer back = load_model(dir.path() / "m", torch::kCPU);
  const auto p = back->named_parameters();
  for (const auto& q : m->named_parameters())
    EXPECT_TRUE(torch::equal(p[q.key()], q.value().to(torch::kBFloat16).to(torch::kFloat32)))
        << q.key();
  EXPECT_NE(model_fingerprint(dir.path() / "m"), model_fingerprint(*m)) << "dtype is hashed";
}

/// The rule and tensor load_model and inspect_model refuse DIR with.
std::pair<SafetensorsRule, std::string> refusal(const std::filesystem::path& dir) {
  std::pair<SafetensorsRule, std::string> r{SafetensorsRule::kTruncated, ""};
  try {
    load_model(dir, torch::kCPU);
    ADD_FAILURE() << "load_model accepted " << dir;
  } catch (const SafetensorsError& e) {
    r = {e.rule(), e.tensor()};
  }
  try {
    inspect_model(dir);
    ADD_FAILURE() << "inspect_model accepted " << dir;
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.rule(), r.first);
    EXPECT_EQ(e.tensor(), r.second);
  }
  return r;
}

TEST(CheckpointTest, TensorsMustFitTheConfig) {
  TempDir dir;
  ModelConfig cfg = tiny("llama");
  Transformer m = saved_model(dir, "m", cfg);
  const auto path = dir.path() / "m";
  const auto good = to_hf_tensors(*m);

  auto rewrite = [&](std::vector<std::pair<std::string, torch::Tensor>> t) {
    write_safetensors(path / kWeightsFile, t);
  };
  // Missing tensor.
  auto t = good;
  t.erase(t.begin() + 3);
  rewrite(t);
  EXPECT_EQ(refusal(path), std::make_pair(SafetensorsRule::kMissingTensor, good[3].first));
  // Wrong shape.
  t = good;
  t[2].second = torch::zeros({t[2].second.size(0) + 1, t[2].second.size(1)});
  rewrite(t);
  EXPECT_EQ(refusal(path), std::make_pair(SafetensorsRule::kWrongShape, good[2].first));
  // Unexpected tensor.
  t = good;
  t.emplace_back("model.layers.9.extra.weight", torch::zeros({2}));
  rewrite(t);
  EXPECT_EQ(refusal(path), std::make_pair(SafetensorsRule::kUnexpectedTensor,
                                          std::string("model.layers.9.extra.weight")));
  // A config that disagrees with the weights: more vocabulary than the embedding has.
  rewrite(good);
  EXPECT_NO_THROW(load_model(path, torch::kCPU));
  ModelConfig wider = cfg;
  wider.vocab_size += 1;
  write_file_atomic(path / kConfigFile, wider.to_json());
  EXPECT_EQ(refusal(path),
            std::make_pair(SafetensorsRule::kWrongShape, std::string("model.embed_tokens.weight")));
  // A malformed config.json.
  write_file_atomic(path / kConfigFile, "{\"model_type\": \"llama\", \"hidden_size\": }");
  EXPECT_THROW(load_model(path, torch::kCPU), ConfigError);
  EXPECT_THROW(inspect_model(path), ConfigError);
  // A malformed weights file is refused by the reader's rules.
  write_file_atomic(path / kConfigFile, cfg.to_json());
  const auto bytes = read_file(path / kWeightsFile);
  write_file_atomic(path / kWeightsFile, bytes.substr(0, bytes.size() - 1));
  EXPECT_EQ(refusal(path).first, SafetensorsRule::kOffsetsPastEnd);
  // Missing files and folders.
  std::filesystem::remove(path / kWeightsFile);
  EXPECT_THROW(load_model(path, torch::kCPU), IoError);
  write_file_atomic(path / "model.safetensors.index.json", "{}");
  EXPECT_THROW(load_model(path, torch::kCPU), Unavailable);
  EXPECT_THROW(load_model(dir.path() / "absent", torch::kCPU), IoError);
}

TEST(CheckpointTest, AcceptedAliasesAndIgnoredBuffers) {
  TempDir dir;
  // A gpt2 file in the original OpenAI layout (no "transformer." prefix, attention mask
  // buffers) loads; the buffers are reported as ignored.
  ModelConfig cfg = tiny("gpt2");
  Transformer m = saved_model(dir, "g", cfg);
  auto t = to_hf_tensors(*m);
  for (auto& [name, tensor] : t)
    if (name.rfind("transformer.", 0) == 0) name = name.substr(12);
  t.emplace_back("h.0.attn.bias", torch::ones({1, 1, 12, 12}));
  write_safetensors(dir.path() / "g" / kWeightsFile, t);
  Transformer back = load_model(dir.path() / "g", torch::kCPU);
  for (const auto& p : m->named_parameters())
    EXPECT_TRUE(torch::equal(p.value(), back->named_parameters()[p.key()])) << p.key();
  EXPECT_EQ(inspect_model(dir.path() / "g").ignored, std::vector<std::string>{"h.0.attn.bias"});
  // A tied llama whose file also carries lm_head.weight.
  ModelConfig tied = tiny("llama");
  tied.tie_word_embeddings = true;
  Transformer mt = saved_model(dir, "t", tied);
  auto tt = to_hf_tensors(*mt);
  tt.emplace_back("lm_head.weight", mt->embed_tokens->weight.detach().clone());
  write_safetensors(dir.path() / "t" / kWeightsFile, tt);
  EXPECT_NO_THROW(load_model(dir.path() / "t", torch::kCPU));
  EXPECT_EQ(inspect_model(dir.path() / "t").ignored, std::vector<std::string>{"lm_head.weight"});
}

}  // namespace
}  // namespace attnpilot::model
