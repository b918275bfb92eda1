#pragma once
// Template definitions for common/config.h.
#include "common/error.h"

namespace attnpilot {

template <typename T>
T Config::get(const std::string& key, const T& fallback) const {
  shared_->read.insert(full(key));
  if (!node_.IsMap() || !node_[key]) return fallback;
  try {
    return node_[key].template as<T>();
  } catch (const YAML::Exception&) {
    throw InvalidArgument(fmt::format("{}: key '{}' has value '{}' of the wrong type",
                                      shared_->origin, full(key), YAML::Dump(node_[key])));
  }
}

template <typename T>
T Config::require(const std::string& key) const {
  if (!node_.IsMap() || !node_[key])
    throw InvalidArgument(
        fmt::format("{}: required key '{}' is missing", shared_->origin, full(key)));
  return get<T>(key, T{});
}

}  // namespace attnpilot
