#pragma once
/// Tensor descriptions for error messages.
#include <torch/torch.h>

#include <string>

namespace attnpilot {

/// "[2, 3, 4]", or "undefined" for an undefined tensor.
inline std::string shape_str(const torch::Tensor& t) {
  return t.defined() ? c10::str(t.sizes()) : std::string("undefined");
}

}  // namespace attnpilot
