#include "experiments/cli.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>
#include <sstream>

namespace attnpilot::cli {
namespace {
std::vector<VerbEntry>& registry() {
  static std::vector<VerbEntry> r;
  return r;
}
}  // namespace

VerbRegistrar::VerbRegistrar(const char* name, int order, AddVerbFn add) {
  registry().push_back({name, order, add});
}

std::vector<VerbEntry> registered_verbs() {
  auto v = registry();
  std::sort(v.begin(), v.end(), [](const VerbEntry& a, const VerbEntry& b) {
    return a.order != b.order ? a.order < b.order : std::strcmp(a.name, b.name) < 0;
  });
  return v;
}

torch::Device parse_device(const std::string& s) {
  if (s == "auto") return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::kCPU;
  if (s == "cpu") return torch::kCPU;
  if (s == "cuda" || s.rfind("cuda:", 0) == 0) {
    if (!torch::cuda::is_available())
      throw UsageError(fmt::format("--device {}: CUDA is not available on this machine", s));
    try {
      torch::Device d(s);
      if (d.has_index() && d.index() >= static_cast<int>(torch::cuda::device_count()))
        throw UsageError(
            fmt::format("--device {}: only {} CUDA device(s)", s, torch::cuda::device_count()));
      return d;
    } catch (const c10::Error&) {
      throw UsageError(fmt::format("--device {}: expected cpu, cuda, cuda:N or auto", s));
    }
  }
  throw UsageError(fmt::format("--device {}: expected cpu, cuda, cuda:N or auto", s));
}

std::vector<int64_t> parse_positive_list(const std::string& flag, const std::string& s) {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    try {
      size_t pos = 0;
      const long long v = std::stoll(item, &pos);
      if (pos != item.size() || v < 1) throw std::invalid_argument(item);
      out.push_back(v);
    } catch (const std::exception&) {
      throw UsageError(fmt::format("{}: '{}' is not a positive integer", flag, item));
    }
  }
  if (out.empty()) throw UsageError(fmt::format("{} is empty, expected e.g. 4,8,16", flag));
  return out;
}

}  // namespace attnpilot::cli
