#pragma once
/// Observation and action spaces (Gymnasium's Box, Discrete, MultiDiscrete).
///
///   Box            float32 tensor of `shape`, elementwise in [low, high] (bounds may be ±inf)
///   Discrete(n)    int64 scalar in [0, n)
///   MultiDiscrete  int64 tensor [k], element i in [0, nvec[i])
///
/// Action masks are bool tensors laid out as in Stable-Baselines3's MaskablePPO:
/// Discrete(n) -> [n]; MultiDiscrete(nvec) -> [sum(nvec)] (the per-dimension masks
/// concatenated). A batch of masks adds a leading dimension.
#include <torch/torch.h>

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace attnpilot::env {

enum class SpaceKind { kBox, kDiscrete, kMultiDiscrete };

/// One space. Construct through the static factories; fields are read-only by convention.
struct Space {
  SpaceKind kind = SpaceKind::kDiscrete;
  std::vector<int64_t> shape;  ///< element shape: Box its shape, Discrete {}, MultiDiscrete {k}
  torch::Tensor low, high;     ///< Box only: float32 tensors of `shape`
  int64_t n = 0;               ///< Discrete only: number of actions
  std::vector<int64_t> nvec;   ///< MultiDiscrete only: choices per dimension

  /// Box with the same bound everywhere (use ±INFINITY for unbounded).
  static Space box(std::vector<int64_t> shape, float low, float high);
  /// Box with elementwise bounds (float32 tensors of equal shape, low <= high).
  static Space box(torch::Tensor low, torch::Tensor high);
  static Space discrete(int64_t n);
  static Space multi_discrete(std::vector<int64_t> nvec);

  /// Tensor dtype of elements: float32 for Box, int64 otherwise.
  torch::ScalarType dtype() const;
  /// Number of scalars in one element (product of shape; 1 for Discrete).
  int64_t flat_size() const;
  /// Length of the action mask: n (Discrete), sum(nvec) (MultiDiscrete). Box throws.
  int64_t mask_size() const;
  /// True when `x` has this space's shape and dtype and lies within its bounds.
  bool contains(const torch::Tensor& x) const;
  /// Throws InvalidArgument naming `what`, the value and the space when !contains(x).
  void check(const torch::Tensor& x, const std::string& what) const;
  /// A uniformly random element (Box: uniform on finite bounds, normal where unbounded),
  /// restricted to allowed actions when `mask` (bool [mask_size]) is given.
  torch::Tensor sample(torch::Generator& gen, const torch::Tensor& mask = {}) const;

  /// {"type":"box","shape":[...],"low":[...],"high":[...],"dtype":"float32"} |
  /// {"type":"discrete","n":K} | {"type":"multi_discrete","nvec":[...]} (flattened bounds;
  /// infinities are written as the strings "inf" / "-inf").
  nlohmann::json to_json() const;
  /// Inverse of to_json; throws FormatError naming the offending field.
  static Space from_json(const nlohmann::json& j);
  /// "Box([4], [-4.8..4.8])", "Discrete(2)", "MultiDiscrete([4, 4])".
  std::string describe() const;
  bool operator==(const Space& other) const;
  bool operator!=(const Space& other) const { return !(*this == other); }
};

}  // namespace attnpilot::env
