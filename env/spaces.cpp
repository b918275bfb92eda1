#include "env/spaces.h"

#include <cmath>
#include <numeric>
#include <sstream>

#include "common/error.h"

namespace attnpilot::env {
namespace {

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

nlohmann::json float_to_json(float v) {
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  return v;
}

float float_from_json(const nlohmann::json& j) {
  if (j.is_string()) {
    const auto s = j.get<std::string>();
    if (s == "inf") return INFINITY;
    if (s == "-inf") return -INFINITY;
    throw FormatError(fmt::format("space bound '{}': expected a number, \"inf\" or \"-inf\"", s));
  }
  if (!j.is_number()) throw FormatError(fmt::format("space bound {}: expected a number", j.dump()));
  return j.get<float>();
}

}  // namespace

Space Space::box(std::vector<int64_t> shape, float low, float high) {
  ATTNPILOT_CHECK_ARG(low <= high, "Box bounds: low {} must be <= high {}", low, high);
  for (auto d : shape)
    ATTNPILOT_CHECK_ARG(d > 0, "Box shape {}: dims must be > 0", shape_str(shape));
  return box(torch::full(shape, low, torch::kFloat32), torch::full(shape, high, torch::kFloat32));
}

Space Space::box(torch::Tensor low, torch::Tensor high) {
  ATTNPILOT_CHECK_ARG(low.defined() && high.defined(), "Box bounds must be defined tensors");
  ATTNPILOT_CHECK_ARG(low.sizes() == high.sizes(), "Box bounds: low shape {} != high shape {}",
                      shape_str(low.sizes().vec()), shape_str(high.sizes().vec()));
  low = low.to(torch::kFloat32).contiguous();
  high = high.to(torch::kFloat32).contiguous();
  ATTNPILOT_CHECK_ARG(!(low > high).any().item<bool>(), "Box bounds: some low > high");
  Space s;
  s.kind = SpaceKind::kBox;
  s.shape = low.sizes().vec();
  s.low = low;
  s.high = high;
  return s;
}

Space Space::discrete(int64_t n) {
  ATTNPILOT_CHECK_ARG(n > 0, "Discrete({}): n must be > 0", n);
  Space s;
  s.kind = SpaceKind::kDiscrete;
  s.n = n;
  return s;
}

Space Space::multi_discrete(std::vector<int64_t> nvec) {
  ATTNPILOT_CHECK_ARG(!nvec.empty(), "MultiDiscrete: nvec must not be empty");
  for (auto v : nvec)
    ATTNPILOT_CHECK_ARG(v > 0, "MultiDiscrete({}): every entry must be > 0", shape_str(nvec));
  Space s;
  s.kind = SpaceKind::kMultiDiscrete;
  s.shape = {static_cast<int64_t>(nvec.size())};
  s.nvec = std::move(nvec);
  return s;
}

torch::ScalarType Space::dtype() const {
  return kind == SpaceKind::kBox ? torch::kFloat32 : torch::kInt64;
}

int64_t Space::flat_size() const {
  return std::accumulate(shape.begin(), shape.end(), int64_t{1}, std::multiplies<int64_t>());
}

int64_t Space::mask_size() const {
  switch (kind) {
    case SpaceKind::kDiscrete:
      return n;
    case SpaceKind::kMultiDiscrete:
      return std::accumulate(nvec.begin(), nvec.end(), int64_t{0});
    default:
      throw InvalidArgument(fmt::format("{} has no action mask", describe()));
  }
}

bool Space::contains(const torch::Tensor& x) const {
  if (!x.defined() || x.scalar_type() != dtype() || x.sizes().vec() != shape) return false;
  switch (kind) {
    case SpaceKind::kBox: {
      auto xc = x.to(torch::kCPU);
      return !(xc < low).any().item<bool>() && !(xc > high).any().item<bool>() &&
             !xc.isnan().any().item<bool>();
    }
    case SpaceKind::kDiscrete: {
      const int64_t v = x.item<int64_t>();
      return v >= 0 && v < n;
    }
    case SpaceKind::kMultiDiscrete: {
      auto xc = x.to(torch::kCPU).contiguous();
      const int64_t* p = xc.data_ptr<int64_t>();
      for (size_t i = 0; i < nvec.size(); ++i)
        if (p[i] < 0 || p[i] >= nvec[i]) return false;
      return true;
    }
  }
  return false;
}

void Space::check(const torch::Tensor& x, const std::string& what) const {
  if (contains(x)) return;
  std::ostringstream os;
  if (x.defined())
    os << x.scalar_type() << " " << shape_str(x.sizes().vec()) << " "
       << (x.numel() <= 16 ? x.to(torch::kCPU).to(torch::kFloat64).flatten()
                           : x.flatten().slice(0, 0, 16));
  else
    os << "undefined tensor";
  throw InvalidArgument(fmt::format("{} {} is not in {}", what, os.str(), describe()));
}

torch::Tensor Space::sample(torch::Generator& gen, const torch::Tensor& mask) const {
  auto categorical = [&](int64_t k, const torch::Tensor& m) -> int64_t {
    torch::Tensor w = m.defined() ? m.to(torch::kFloat64) : torch::ones({k}, torch::kFloat64);
    ATTNPILOT_CHECK_ARG(w.sum().item<double>() > 0, "sample: the mask allows no action in {}",
                        describe());
    return torch::multinomial(w, 1, false, gen).item<int64_t>();
  };
  if (mask.defined())
    ATTNPILOT_CHECK_ARG(
        mask.dim() == 1 && mask.size(0) == mask_size() && mask.scalar_type() == torch::kBool,
        "sample: mask must be bool [{}] for {}", mask_size(), describe());
  switch (kind) {
    case SpaceKind::kBox: {
      auto u = torch::rand(shape, gen, torch::kFloat32);
      auto z = torch::randn(shape, gen, torch::kFloat32);
      auto finite = low.isfinite() & high.isfinite();
      return torch::where(finite, low + u * (high - low), z).clamp(low, high);
    }
    case SpaceKind::kDiscrete:
      return torch::tensor(categorical(n, mask), torch::kInt64);
    case SpaceKind::kMultiDiscrete: {
      auto out = torch::empty({static_cast<int64_t>(nvec.size())}, torch::kInt64);
      int64_t off = 0;
      for (size_t i = 0; i < nvec.size(); ++i) {
        out[i] = categorical(nvec[i],
                             mask.defined() ? mask.slice(0, off, off + nvec[i]) : torch::Tensor());
        off += nvec[i];
      }
      return out;
    }
  }
  return {};
}

nlohmann::json Space::to_json() const {
  switch (kind) {
    case SpaceKind::kBox: {
      auto lo = low.flatten(), hi = high.flatten();
      nlohmann::json l = nlohmann::json::array(), h = nlohmann::json::array();
      for (int64_t i = 0; i < lo.numel(); ++i) {
        l.push_back(float_to_json(lo[i].item<float>()));
        h.push_back(float_to_json(hi[i].item<float>()));
      }
      return {{"type", "box"}, {"shape", shape}, {"low", l}, {"high", h}, {"dtype", "float32"}};
    }
    case SpaceKind::kDiscrete:
      return {{"type", "discrete"}, {"n", n}};
    case SpaceKind::kMultiDiscrete:
      return {{"type", "multi_discrete"}, {"nvec", nvec}};
  }
  return {};
}

Space Space::from_json(const nlohmann::json& j) {
  try {
    const auto type = j.at("type").get<std::string>();
    if (type == "discrete") return discrete(j.at("n").get<int64_t>());
    if (type == "multi_discrete") return multi_discrete(j.at("nvec").get<std::vector<int64_t>>());
    if (type == "box") {
      auto shape = j.at("shape").get<std::vector<int64_t>>();
      const auto& l = j.at("low");
      const auto& h = j.at("high");
      auto lo = torch::empty({static_cast<int64_t>(l.size())}, torch::kFloat32);
      auto hi = torch::empty({static_cast<int64_t>(h.size())}, torch::kFloat32);
      ATTNPILOT_CHECK_ARG(l.size() == h.size(), "box low/high lengths differ");
      for (size_t i = 0; i < l.size(); ++i) {
        lo[i] = float_from_json(l[i]);
        hi[i] = float_from_json(h[i]);
      }
      int64_t numel = 1;
      for (auto d : shape) numel *= d;
      if (numel != lo.numel())
        throw FormatError(fmt::format("box space: shape {} does not match {} bounds",
                                      shape_str(shape), lo.numel()));
      return box(lo.reshape(shape), hi.reshape(shape));
    }
    throw FormatError(
        fmt::format("space type '{}': expected box, discrete or multi_discrete", type));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("space JSON {}: {}", j.dump(), e.what()));
  } catch (const InvalidArgument& e) {
    throw FormatError(fmt::format("space JSON {}: {}", j.dump(), e.what()));
  }
}

std::string Space::describe() const {
  switch (kind) {
    case SpaceKind::kBox: {
      const float lo = low.numel() ? low.min().item<float>() : 0;
      const float hi = high.numel() ? high.max().item<float>() : 0;
      return fmt::format("Box({}, [{}..{}])", shape_str(shape), lo, hi);
    }
    case SpaceKind::kDiscrete:
      return fmt::format("Discrete({})", n);
    case SpaceKind::kMultiDiscrete:
      return fmt::format("MultiDiscrete({})", shape_str(nvec));
  }
  return "?";
}

bool Space::operator==(const Space& o) const {
  if (kind != o.kind || shape != o.shape) return false;
  switch (kind) {
    case SpaceKind::kBox:
      return torch::equal(low, o.low) && torch::equal(high, o.high);
    case SpaceKind::kDiscrete:
      return n == o.n;
    case SpaceKind::kMultiDiscrete:
      return nvec == o.nvec;
  }
  return false;
}

}  // namespace attnpilot::env
