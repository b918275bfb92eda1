#include "experiments/cli.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstring>

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

}  // namespace attnpilot::cli
