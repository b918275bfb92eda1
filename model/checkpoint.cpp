#include "model/checkpoint.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <unistd.h>

#include <set>
#include <sstream>

#include "common/atomic_file.h"
#include "common/hash.h"

namespace attnpilot::model {

namespace fs = std::filesystem;
using R = SafetensorsRule;

std::vector<HfTensorSpec> hf_tensor_specs(const ModelConfig& cfg) {
  cfg.validate();
  const int64_t V = cfg.vocab_size, H = cfg.hidden_size, I = cfg.intermediate_size,
                q_dim = cfg.num_heads * cfg.head_dim, kv_dim = cfg.num_kv_heads * cfg.head_dim;
  std::vector<HfTensorSpec> s;
  auto add = [&](std::string name, std::vector<int64_t> shape, std::vector<std::string> targets,
                 bool conv1d = false) {
    s.push_back(HfTensorSpec{std::move(name), std::move(shape), std::move(targets), conv1d});
  };
  if (cfg.is_gpt2()) {
    const std::string P = "transformer.";
    add(P + "wte.weight", {V, H}, {"embed_tokens.weight"});
    add(P + "wpe.weight", {cfg.max_position_embeddings, H}, {"embed_positions.weight"});
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      const std::string h = fmt::format("{}h.{}.", P, l), o = fmt::format("layers.{}.", l);
      add(h + "ln_1.weight", {H}, {o + "attn_norm.weight"});
      add(h + "ln_1.bias", {H}, {o + "attn_norm.bias"});
      add(h + "attn.c_attn.weight", {H, 3 * H},
          {o + "q_proj.weight", o + "k_proj.weight", o + "v_proj.weight"}, true);
      add(h + "attn.c_attn.bias", {3 * H},
          {o + "q_proj.bias", o + "k_proj.bias", o + "v_proj.bias"}, true);
      add(h + "attn.c_proj.weight", {H, H}, {o + "o_proj.weight"}, true);
      add(h + "attn.c_proj.bias", {H}, {o + "o_proj.bias"}, true);
      add(h + "ln_2.weight", {H}, {o + "mlp_norm.weight"});
      add(h + "ln_2.bias", {H}, {o + "mlp_norm.bias"});
      add(h + "mlp.c_fc.weight", {H, I}, {o + "fc_in.weight"}, true);
      add(h + "mlp.c_fc.bias", {I}, {o + "fc_in.bias"}, true);
      add(h + "mlp.c_proj.weight", {I, H}, {o + "fc_out.weight"}, true);
      add(h + "mlp.c_proj.bias", {H}, {o + "fc_out.bias"}, true);
    }
    add(P + "ln_f.weight", {H}, {"final_norm.weight"});
    add(P + "ln_f.bias", {H}, {"final_norm.bias"});
  } else {
    add("model.embed_tokens.weight", {V, H}, {"embed_tokens.weight"});
    for (int64_t l = 0; l < cfg.num_layers; ++l) {
      const std::string h = fmt::format("model.layers.{}.", l), o = fmt::format("layers.{}.", l);
      add(h + "input_layernorm.weight", {H}, {o + "attn_norm.weight"});
      for (auto [proj, out] : {std::pair<const char*, int64_t>{"q_proj", q_dim},
                               {"k_proj", kv_dim},
                               {"v_proj", kv_dim}}) {
        add(h + "self_attn." + proj + ".weight", {out, H}, {o + proj + ".weight"});
        if (cfg.qkv_bias()) add(h + "self_attn." + proj + ".bias", {out}, {o + proj + ".bias"});
      }
      add(h + "self_attn.o_proj.weight", {H, q_dim}, {o + "o_proj.weight"});
      if (cfg.out_bias()) add(h + "self_attn.o_proj.bias", {H}, {o + "o_proj.bias"});
      add(h + "post_attention_layernorm.weight", {H}, {o + "mlp_norm.weight"});
      for (auto [proj, out, in] : {std::tuple<const char*, int64_t, int64_t>{"gate_proj", I, H},
                                   {"up_proj", I, H},
                                   {"down_proj", H, I}}) {
        add(h + "mlp." + proj + ".weight", {out, in}, {o + proj + ".weight"});
        if (cfg.ffn_bias()) add(h + "mlp." + proj + ".bias", {out}, {o + proj + ".bias"});
      }
    }
    add("model.norm.weight", {H}, {"final_norm.weight"});
  }
  if (!cfg.tie_word_embeddings) add("lm_head.weight", {V, H}, {"lm_head.weight"});
  return s;
}

namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  return fmt::format("[{}]", fmt::join(s, ", "));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

/// Buffers that some checkpoints carry and the model recomputes.
bool is_ignorable_buffer(const ModelConfig& cfg, const std::string& name) {
  if (cfg.is_gpt2()) return ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias");
  return ends_with(name, ".rotary_emb.inv_freq");
}

}  // namespace

std::vector<std::string> match_tensors(const ModelConfig& cfg, const SafetensorsHeader& header,
                                       const std::string& origin,
                                       std::vector<std::string>* ignored) {
  const auto specs = hf_tensor_specs(cfg);
  std::vector<std::string> found;
  std::set<std::string> claimed;
  for (const auto& spec : specs) {
    std::vector<std::string> candidates{spec.name};
    if (cfg.is_gpt2() && spec.name.rfind("transformer.", 0) == 0)
      candidates.push_back(spec.name.substr(std::string("transformer.").size()));
    if (cfg.tie_word_embeddings && spec.targets[0] == "embed_tokens.weight")
      candidates.push_back("lm_head.weight");
    const TensorInfo* t = nullptr;
    for (const auto& c : candidates)
      if ((t = header.find(c))) break;
    if (!t)
      throw SafetensorsError(R::kMissingTensor, origin, spec.name,
                             fmt::format("required by the {} config (shape {}) but absent",
                                         cfg.model_type, shape_str(spec.shape)));
    if (t->shape != spec.shape)
      throw SafetensorsError(R::kWrongShape, origin, t->name,
                             fmt::format("shape {} but the config requires {}", shape_str(t->shape),
                                         shape_str(spec.shape)));
    found.push_back(t->name);
    claimed.insert(t->name);
  }
  for (const auto& t : header.tensors) {
    if (claimed.count(t.name)) continue;
    const bool redundant_head = cfg.tie_word_embeddings && t.name == "lm_head.weight" &&
                                t.shape == std::vector<int64_t>{cfg.vocab_size, cfg.hidden_size};
    if (redundant_head || is_ignorable_buffer(cfg, t.name)) {
      if (ignored) ignored->push_back(t.name);
      continue;
    }
    throw SafetensorsError(R::kUnexpectedTensor, origin, t.name,
                           fmt::format("shape {} is not part of a {} model with this config",
                                       shape_str(t.shape), cfg.model_type));
  }
  return found;
}

namespace {

struct Located {
  fs::path config, weights;
};

Located locate(const fs::path& dir) {
  if (!fs::is_directory(dir))
    throw IoError(fmt::format("{}: not a checkpoint folder (no such directory)", dir.string()));
  Located l{dir / kConfigFile, dir / kWeightsFile};
  if (!fs::exists(l.weights) && fs::exists(dir / "model.safetensors.index.json"))
    throw Unavailable(fmt::format(
        "{}: sharded checkpoints (model.safetensors.index.json) are not supported; merge the "
        "shards into one model.safetensors",
        dir.string()));
  for (const auto& p : {l.config, l.weights})
    if (!fs::exists(p)) throw IoError(fmt::format("{}: missing", p.string()));
  return l;
}

std::string fingerprint_of(const ModelConfig& cfg, std::vector<TensorInfo> tensors) {
  std::sort(tensors.begin(), tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) { return a.name < b.name; });
  Fingerprint f;
  f.add(std::string_view("attnpilot-model-v1"));
  f.add(std::string_view(cfg.to_json()));
  for (const auto& t : tensors) {
    f.add(std::string_view(t.name));
    f.add(std::string_view(dtype_name(t.dtype)));
    f.add(static_cast<int64_t>(t.shape.size()));
    for (int64_t s : t.shape) f.add(s);
  }
  return f.hex();
}

}  // namespace

Transformer load_model(const fs::path& dir, torch::Device device) {
  const Located l = locate(dir);
  const ModelConfig cfg = ModelConfig::load(l.config);
  SafetensorsFile file = read_safetensors(l.weights);
  const auto specs = hf_tensor_specs(cfg);
  const auto names = match_tensors(cfg, file.header, l.weights.string());

  Transformer model(cfg);
  auto params = model->named_parameters();
  std::set<std::string> assigned;
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < specs.size(); ++i) {
    const auto& spec = specs[i];
    const auto src = file.tensors.at(names[i]).to(torch::kFloat32);
    const auto parts = spec.targets.size() == 1
                           ? std::vector<torch::Tensor>{src}
                           : src.chunk(static_cast<int64_t>(spec.targets.size()), -1);
    for (size_t k = 0; k < spec.targets.size(); ++k) {
      auto* p = params.find(spec.targets[k]);
      TORCH_INTERNAL_ASSERT(p, "no parameter ", spec.targets[k]);
      const auto value = spec.conv1d && parts[k].dim() == 2 ? parts[k].t() : parts[k];
      TORCH_INTERNAL_ASSERT(p->sizes() == value.sizes(), "shape mismatch for ", spec.targets[k]);
      p->copy_(value);
      assigned.insert(spec.targets[k]);
    }
  }
  TORCH_INTERNAL_ASSERT(assigned.size() == params.size(), "loaded ", assigned.size(), " of ",
                        params.size(), " parameters");
  model->to(device);
  return model;
}

std::vector<std::pair<std::string, torch::Tensor>> to_hf_tensors(TransformerImpl& model) {
  const auto specs = hf_tensor_specs(model.config());
  auto params = model.named_parameters();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& spec : specs) {
    std::vector<torch::Tensor> parts;
    for (const auto& t : spec.targets) {
      auto* p = params.find(t);
      TORCH_INTERNAL_ASSERT(p, "no parameter ", t);
      auto v = p->detach().to(torch::kCPU, torch::kFloat32);
      parts.push_back(spec.conv1d && v.dim() == 2 ? v.t() : v);
    }
    out.emplace_back(spec.name,
                     (parts.size() == 1 ? parts[0] : torch::cat(parts, -1)).contiguous());
  }
  return out;
}

void save_model(const fs::path& dir, Transformer& model,
                const std::map<std::string, std::string>& extra_files) {
  for (const auto& [name, bytes] : extra_files) {
    const fs::path p(name);
    ATTNPILOT_CHECK_ARG(!name.empty() && p.filename() == p && name != "." && name != "..",
                        "save_model: extra file name '{}' must be a plain file name", name);
    ATTNPILOT_CHECK_ARG(name != kConfigFile && name != kWeightsFile,
                        "save_model: extra file '{}' would overwrite the model itself", name);
  }
  ATTNPILOT_CHECK_ARG(
      !dir.empty() && dir.filename() != "" && dir.filename() != "." && dir.filename() != "..",
      "save_model: '{}' must name a folder", dir.string());
  const fs::path parent = dir.has_parent_path() ? dir.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw IoError(fmt::format("creating {}: {}", parent.string(), ec.message()));
  const fs::path staged = parent / fmt::format(".{}.staging-{}", dir.filename().string(),
                                               static_cast<long>(::getpid()));
  fs::remove_all(staged, ec);
  fs::create_directory(staged, ec);
  if (ec) throw IoError(fmt::format("creating {}: {}", staged.string(), ec.message()));
  try {
    write_file_atomic(staged / kConfigFile, model->config().to_json());
    write_safetensors(staged / kWeightsFile, to_hf_tensors(*model), {{"format", "pt"}});
    for (const auto& [name, bytes] : extra_files) write_file_atomic(staged / name, bytes);
    fsync_directory(staged);
    replace_directory(staged, dir);
  } catch (...) {
    fs::remove_all(staged, ec);
    throw;
  }
}

std::string model_fingerprint(const fs::path& dir) { return inspect_model(dir).fingerprint; }

std::string model_fingerprint(TransformerImpl& model) {
  std::vector<TensorInfo> tensors;
  for (const auto& spec : hf_tensor_specs(model.config())) {
    TensorInfo t;
    t.name = spec.name;
    t.dtype = Dtype::kF32;
    t.shape = spec.shape;
    tensors.push_back(std::move(t));
  }
  return fingerprint_of(model.config(), std::move(tensors));
}

InspectReport inspect_model(const fs::path& dir) {
  const Located l = locate(dir);
  InspectReport r;
  r.dir = dir;
  r.config = ModelConfig::load(l.config);
  r.header = read_header(l.weights);
  r.weights_bytes = fs::file_size(l.weights);
  match_tensors(r.config, r.header, l.weights.string(), &r.ignored);
  for (const auto& spec : hf_tensor_specs(r.config)) {
    int64_t n = 1;
    for (int64_t s : spec.shape) n *= s;
    r.num_parameters += n;
  }
  r.fingerprint = fingerprint_of(r.config, r.header.tensors);
  return r;
}

std::string format_inspect(const InspectReport& r) {
  const auto& c = r.config;
  std::ostringstream o;
  o << "model folder: " << r.dir.string() << "\n";
  o << "architecture: " << c.model_type << " ("
    << (c.is_gpt2() ? "LayerNorm, learned positions, GELU-tanh MLP, fused c_attn"
                    : "RMSNorm, RoPE, SwiGLU, grouped-query attention")
    << ")\n";
  o << fmt::format("  layers {}, hidden {}, heads {} (kv {}), head_dim {}, mlp {}\n", c.num_layers,
                   c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size);
  o << fmt::format("  vocab {}, max positions {}, norm eps {:g}", c.vocab_size,
                   c.max_position_embeddings, c.rms_norm_eps);
  if (c.is_llama_family()) o << fmt::format(", rope theta {:g}", c.rope_theta);
  o << fmt::format(", tied embeddings {}, biases qkv/out/mlp {}/{}/{}\n",
                   c.tie_word_embeddings ? "yes" : "no", c.qkv_bias(), c.out_bias(), c.ffn_bias());
  o << fmt::format("parameters: {} ({:.2f} M)\n", r.num_parameters, r.num_parameters / 1e6);
  o << fmt::format("weights: {} bytes, {} tensors", r.weights_bytes, r.header.tensors.size());
  if (!r.header.metadata.empty()) {
    o << ", metadata";
    for (const auto& [k, v] : r.header.metadata) o << " " << k << "=" << v;
  }
  o << "\n";
  size_t w = 4;
  for (const auto& t : r.header.tensors) w = std::max(w, t.name.size());
  o << fmt::format("  {:<{}}  {:<5}  {:<16}  {:>12}\n", "name", w, "dtype", "shape", "bytes");
  for (const auto& t : r.header.tensors)
    o << fmt::format("  {:<{}}  {:<5}  {:<16}  {:>12}\n", t.name, w, dtype_name(t.dtype),
                     shape_str(t.shape), t.end - t.begin);
  for (const auto& n : r.ignored) o << "ignored (recomputed by the model): " << n << "\n";
  o << "fingerprint: " << r.fingerprint << "\n";
  return o.str();
}

}  // namespace attnpilot::model
