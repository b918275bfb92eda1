#include "transport/tensor_codec.h"

#include <cstring>
#include <unordered_map>

namespace attnpilot::transport {
namespace {

DType to_wire(torch::ScalarType s) {
  switch (s) {
    case torch::kFloat32:
      return DType::kFloat32;
    case torch::kFloat64:
      return DType::kFloat64;
    case torch::kInt32:
      return DType::kInt32;
    case torch::kInt64:
      return DType::kInt64;
    case torch::kUInt8:
      return DType::kUInt8;
    case torch::kBool:
      return DType::kBool;
    case torch::kFloat16:
      return DType::kFloat16;
    case torch::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  throw InvalidArgument(
      fmt::format("dtype {} has no wire encoding (expected float32/64, "
                  "int32/64, uint8, bool, float16, bfloat16)",
                  c10::toString(s)));
}

torch::ScalarType from_wire(DType d) {
  switch (d) {
    case DType::kFloat32:
      return torch::kFloat32;
    case DType::kFloat64:
      return torch::kFloat64;
    case DType::kInt32:
      return torch::kInt32;
    case DType::kInt64:
      return torch::kInt64;
    case DType::kUInt8:
      return torch::kUInt8;
    case DType::kBool:
      return torch::kBool;
    case DType::kFloat16:
      return torch::kFloat16;
    case DType::kBFloat16:
      return torch::kBFloat16;
  }
  throw DecodeError(DecodeErrorKind::kUnknownDType,
                    fmt::format("unknown dtype code {}", static_cast<unsigned>(d)));
}

}  // namespace

TensorBlob to_blob(const std::string& name, const torch::Tensor& t) {
  ATTNPILOT_CHECK_ARG(t.defined(), "tensor '{}' is undefined", name);
  TensorBlob b;
  b.name = name;
  b.dtype = to_wire(t.scalar_type());
  torch::Tensor c = t.detach().to(torch::kCPU).contiguous();
  b.shape.assign(c.sizes().begin(), c.sizes().end());
  const size_t n = static_cast<size_t>(c.numel()) * c.element_size();
  b.data.assign(static_cast<const char*>(c.data_ptr()), n);
  return b;
}

torch::Tensor to_torch(const TensorBlob& b) {
  const auto st = from_wire(b.dtype);
  torch::Tensor t = torch::empty(b.shape, torch::TensorOptions().dtype(st));
  const size_t n = static_cast<size_t>(t.numel()) * t.element_size();
  if (n != b.data.size()) {
    throw DecodeError(
        DecodeErrorKind::kShapeBytesMismatch,
        fmt::format("tensor '{}' shape needs {} bytes, blob holds {}", b.name, n, b.data.size()));
  }
  if (n) std::memcpy(t.data_ptr(), b.data.data(), n);
  return t;
}

nlohmann::json parse_meta(const Message& m) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(m.meta.empty() ? std::string("{}") : m.meta);
  } catch (const nlohmann::json::exception& e) {
    throw DecodeError(DecodeErrorKind::kBadMeta,
                      fmt::format("{} message meta is not JSON: {}", type_name(m.type), e.what()));
  }
  if (!j.is_object()) {
    throw DecodeError(DecodeErrorKind::kBadMeta,
                      fmt::format("{} message meta is not a JSON object", type_name(m.type)));
  }
  return j;
}

std::vector<TensorBlob> params_to_blobs(
    const std::vector<std::pair<std::string, torch::Tensor>>& params) {
  std::vector<TensorBlob> out;
  out.reserve(params.size());
  for (const auto& [name, t] : params) out.push_back(to_blob(name, t));
  return out;
}

void load_blobs_into(const std::vector<TensorBlob>& blobs,
                     const std::vector<std::pair<std::string, torch::Tensor>>& params) {
  std::unordered_map<std::string, const TensorBlob*> by_name;
  for (const auto& b : blobs) by_name[b.name] = &b;
  if (by_name.size() != params.size()) {
    throw DecodeError(DecodeErrorKind::kBadMeta,
                      fmt::format("weights carry {} tensors, the policy has {} parameters",
                                  by_name.size(), params.size()));
  }
  torch::NoGradGuard ng;
  for (const auto& [name, p] : params) {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      throw DecodeError(DecodeErrorKind::kBadMeta,
                        fmt::format("weights lack parameter '{}'", name));
    }
    torch::Tensor src = to_torch(*it->second);
    if (src.sizes() != p.sizes()) {
      throw DecodeError(DecodeErrorKind::kBadShape,
                        fmt::format("parameter '{}' has shape {}, weights carry {}", name,
                                    c10::str(p.sizes()), c10::str(src.sizes())));
    }
    p.copy_(src.to(p.device(), p.scalar_type()));
  }
}

}  // namespace attnpilot::transport
