#pragma once
/// Conversions between LibTorch tensors and wire `TensorBlob`s, and JSON meta helpers.
#include <torch/torch.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "transport/codec.h"

namespace attnpilot::transport {

/// Copies a tensor (any device, made contiguous on CPU) into a blob called `name`.
/// Throws InvalidArgument for dtypes the wire format lacks (complex, quantised, ...).
TensorBlob to_blob(const std::string& name, const torch::Tensor& t);
/// A CPU tensor owning a copy of the blob's bytes.
torch::Tensor to_torch(const TensorBlob& b);

/// Parses a message's meta as a JSON object; throws DecodeError(kBadMeta) naming the type.
nlohmann::json parse_meta(const Message& m);
/// meta["key"] as T; throws DecodeError(kBadMeta) naming the key when absent or mistyped.
template <typename T>
T meta_get(const nlohmann::json& meta, const char* key, const Message& m) {
  auto it = meta.find(key);
  if (it == meta.end()) {
    throw DecodeError(DecodeErrorKind::kBadMeta,
                      fmt::format("{} message lacks meta key '{}'", type_name(m.type), key));
  }
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception& e) {
    throw DecodeError(DecodeErrorKind::kBadMeta,
                      fmt::format("{} message meta key '{}' has the wrong type: {}",
                                  type_name(m.type), key, e.what()));
  }
}

/// Flattens named parameters into blobs (the weights payload) and back. `load_into`
/// copies each blob into the same-named tensor of `params`, checking names and shapes.
std::vector<TensorBlob> params_to_blobs(
    const std::vector<std::pair<std::string, torch::Tensor>>& params);
void load_blobs_into(const std::vector<TensorBlob>& blobs,
                     const std::vector<std::pair<std::string, torch::Tensor>>& params);

}  // namespace attnpilot::transport
