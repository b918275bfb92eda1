#include "common/config.h"

#include "common/atomic_file.h"

namespace attnpilot {

Config::Config() : Config(YAML::Node(YAML::NodeType::Map), "", std::make_shared<Shared>()) {
  shared_->origin = "<config>";
}

Config::Config(YAML::Node node, std::string path, std::shared_ptr<Shared> shared)
    : node_(std::move(node)), path_(std::move(path)), shared_(std::move(shared)) {}

Config Config::parse(const std::string& text, const std::string& origin) {
  YAML::Node n;
  try {
    n = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    throw FormatError(fmt::format("{}: invalid YAML: {}", origin, e.what()));
  }
  if (n.IsNull()) n = YAML::Node(YAML::NodeType::Map);
  if (!n.IsMap()) throw FormatError(fmt::format("{}: the top level must be a mapping", origin));
  auto shared = std::make_shared<Shared>();
  shared->origin = origin;
  return Config(n, "", shared);
}

Config Config::load(const std::filesystem::path& path) {
  return parse(read_file(path), path.string());
}

std::string Config::full(const std::string& key) const {
  return path_.empty() ? key : path_ + "." + key;
}

bool Config::has(const std::string& key) const { return node_.IsMap() && node_[key]; }

Config Config::section(const std::string& key) const {
  shared_->read.insert(full(key));
  if (!has(key)) return Config(YAML::Node(YAML::NodeType::Map), full(key), shared_);
  YAML::Node sub = node_[key];
  if (!sub.IsMap())
    throw InvalidArgument(
        fmt::format("{}: key '{}' must be a mapping", shared_->origin, full(key)));
  return Config(sub, full(key), shared_);
}

void Config::collect_unread(const YAML::Node& n, const std::string& prefix,
                            std::vector<std::string>& out) const {
  if (!n.IsMap()) return;
  for (const auto& kv : n) {
    const std::string k = kv.first.as<std::string>();
    const std::string p = prefix.empty() ? k : prefix + "." + k;
    if (!shared_->read.count(p)) {
      out.push_back(p);
    } else if (kv.second.IsMap()) {
      collect_unread(kv.second, p, out);
    }
  }
}

void Config::check_all_read() const {
  std::vector<std::string> unread;
  collect_unread(node_, path_, unread);
  if (unread.empty()) return;
  std::string list;
  for (const auto& k : unread) list += (list.empty() ? "" : ", ") + k;
  throw InvalidArgument(fmt::format("{}: unknown configuration key(s): {}", shared_->origin, list));
}

std::string Config::dump() const { return YAML::Dump(node_); }

}  // namespace attnpilot
