#pragma once
/// Checkpoint folders in Hugging Face layout, loaded and saved with full validation.
///
///   DIR/config.json        ModelConfig (model/config.h)
///   DIR/model.safetensors  tensors under transformers' names (model/safetensors.h)
///   DIR/<extra files>      e.g. tokenizer.model, training_state.json
///
///   HF names ──hf_tensor_specs(cfg)──► our parameter names (model/transformer.h)
///     llama/qwen2: model.layers.L.self_attn.q_proj.weight → layers.L.q_proj.weight, ...
///     gpt2: transformer.h.L.attn.c_attn.weight [H, 3H] (Conv1D, [in, out])
///           → split in three along out, transposed → layers.L.{q,k,v}_proj.weight
///
/// Loading refuses any folder that would not give exactly the model its config
/// describes: every required tensor present with the right shape, nothing unknown.
#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"
#include "model/safetensors.h"
#include "model/transformer.h"

namespace attnpilot::model {

inline constexpr const char* kConfigFile = "config.json";
inline constexpr const char* kWeightsFile = "model.safetensors";

/// One tensor of a Hugging Face checkpoint and the parameters it becomes.
struct HfTensorSpec {
  std::string name;                  ///< transformers' name
  std::vector<int64_t> shape;        ///< shape the config requires
  std::vector<std::string> targets;  ///< our parameter names (3 for gpt2's fused c_attn)
  bool conv1d = false;               ///< gpt2 Conv1D: stored [in, out], ours is [out, in]
};

/// The tensors a checkpoint of `cfg` holds, in transformers' names: the single place
/// where names are mapped.
std::vector<HfTensorSpec> hf_tensor_specs(const ModelConfig& cfg);

/// Checks a file's tensors against `cfg`: returns, for each spec (same order), the name
/// found in the file (transformers' name or an accepted alias: gpt2 names without the
/// "transformer." prefix; lm_head.weight for a tied embedding). `ignored` receives
/// buffers the model does not need (attn.bias / attn.masked_bias of old gpt2 files,
/// rotary_emb.inv_freq, a redundant tied lm_head). Throws SafetensorsError with
/// kMissingTensor, kWrongShape or kUnexpectedTensor naming `origin` and the tensor.
std::vector<std::string> match_tensors(const ModelConfig& cfg, const SafetensorsHeader& header,
                                       const std::string& origin,
                                       std::vector<std::string>* ignored = nullptr);

/// Loads DIR/config.json and DIR/model.safetensors (F32/F16/BF16, converted to float32),
/// fully validated, onto `device`. Throws IoError (unreadable), ConfigError,
/// SafetensorsError, Unavailable (a sharded checkpoint).
Transformer load_model(const std::filesystem::path& dir, torch::Device device);

/// The model's parameters under transformers' names (float32, CPU, contiguous), in
/// hf_tensor_specs order: exactly what save_model writes.
std::vector<std::pair<std::string, torch::Tensor>> to_hf_tensors(TransformerImpl& model);

/// Writes config.json, model.safetensors (F32) and `extra_files` (name → bytes; plain
/// file names) into a staged folder next to `dir`, then replaces `dir` atomically
/// (common/atomic_file.h). Throws InvalidArgument for a bad extra file name, IoError.
void save_model(const std::filesystem::path& dir, Transformer& model,
                const std::map<std::string, std::string>& extra_files = {});

/// Fingerprint of a checkpoint folder (16 hex digits): hash of the canonical config and
/// every tensor's name, dtype and shape. Validates like load_model without reading data.
std::string model_fingerprint(const std::filesystem::path& dir);
/// The fingerprint save_model's folder for this model would have.
std::string model_fingerprint(TransformerImpl& model);

/// What `attnpilot inspect` shows.
struct InspectReport {
  std::filesystem::path dir;
  ModelConfig config;
  int64_t num_parameters = 0;        ///< parameter elements of the model (tied counted once)
  uint64_t weights_bytes = 0;        ///< size of model.safetensors
  SafetensorsHeader header;          ///< tensors sorted by offset, metadata
  std::vector<std::string> ignored;  ///< tensors in the file the model does not use
  std::string fingerprint;
};

/// Validates DIR exactly as load_model does (header, config, tensor names and shapes)
/// without reading tensor data. Throws what load_model throws.
InspectReport inspect_model(const std::filesystem::path& dir);

/// A text report: architecture, parameter count, tensor table, fingerprint.
std::string format_inspect(const InspectReport& r);

}  // namespace attnpilot::model
