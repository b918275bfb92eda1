#pragma once
/// YAML configuration with strict keys: every key a component reads is recorded, and
/// `check_all_read()` throws naming any key that nobody read (a typo must not pass
/// silently). Typed getters throw InvalidArgument naming the key, value and expected type.
#include <yaml-cpp/yaml.h>

#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace attnpilot {

class Config {
 public:
  /// An empty mapping.
  Config();
  /// Parses YAML text; `origin` names it in messages (a file name).
  static Config parse(const std::string& text, const std::string& origin = "<config>");
  static Config load(const std::filesystem::path& path);

  bool has(const std::string& key) const;
  /// The sub-mapping at `key` (an empty one if absent). Keys read through it are
  /// tracked under "key.subkey".
  Config section(const std::string& key) const;

  template <typename T>
  T get(const std::string& key, const T& fallback) const;
  template <typename T>
  T require(const std::string& key) const;

  /// Throws InvalidArgument listing every key (dotted path) that was never read.
  void check_all_read() const;
  /// Dotted path of this section ("" for the root).
  const std::string& path() const { return path_; }
  const YAML::Node& node() const { return node_; }
  /// Emits YAML text of the whole configuration.
  std::string dump() const;

 private:
  struct Shared {
    std::string origin;
    std::set<std::string> read;
  };
  Config(YAML::Node node, std::string path, std::shared_ptr<Shared> shared);
  std::string full(const std::string& key) const;
  void collect_unread(const YAML::Node& n, const std::string& prefix,
                      std::vector<std::string>& out) const;

  YAML::Node node_;
  std::string path_;
  std::shared_ptr<Shared> shared_;
};

}  // namespace attnpilot

#include "common/config_impl.h"
