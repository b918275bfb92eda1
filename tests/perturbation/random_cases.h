#pragma once
// Random test matrices with prescribed spectra, batched, float64, for the perturbation tests.
#include <torch/torch.h>

#include <string>
#include <vector>

namespace attnpilot::perturbation::testing {

/// The tests run on 2 shared cores beside other builds; LibTorch's OpenMP pool spins badly
/// under that load (60 s instead of 1 s for the batched small SVDs), so tests use one thread.
inline const bool kSingleThreaded = (torch::set_num_threads(1), true);

/// Spectrum families the property tests sweep.
enum class Family {
  kWellConditioned,  // σ uniform in [1, 2]
  kClustered,        // σ in two tight clusters
  kRepeated,         // σ with exactly repeated values
  kRankDeficient,    // half the σ are exactly zero
  kIllConditioned,   // σ log-spaced over 12 decades
  kTiny,             // well-conditioned × 1e-6
  kHuge,             // well-conditioned × 1e6
};

inline std::vector<Family> all_families() {
  return {Family::kWellConditioned, Family::kClustered, Family::kRepeated, Family::kRankDeficient,
          Family::kIllConditioned,  Family::kTiny,      Family::kHuge};
}

inline std::string family_name(Family f) {
  switch (f) {
    case Family::kWellConditioned:
      return "well-conditioned";
    case Family::kClustered:
      return "clustered";
    case Family::kRepeated:
      return "repeated";
    case Family::kRankDeficient:
      return "rank-deficient";
    case Family::kIllConditioned:
      return "ill-conditioned";
    case Family::kTiny:
      return "scaled 1e-6";
    case Family::kHuge:
      return "scaled 1e6";
  }
  return "?";
}

/// Descending singular values [batch, k] of the family.
inline torch::Tensor family_spectrum(Family f, int64_t batch, int64_t k, torch::Generator& gen) {
  auto opt = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor s;
  switch (f) {
    case Family::kWellConditioned:
    case Family::kTiny:
    case Family::kHuge:
      s = 1.0 + torch::rand({batch, k}, gen, opt);
      if (f == Family::kTiny) s = s * 1e-6;
      if (f == Family::kHuge) s = s * 1e6;
      break;
    case Family::kClustered: {
      auto base = torch::ones({batch, k}, opt);
      base.narrow(1, k / 2, k - k / 2).fill_(0.3);
      s = base + 1e-6 * torch::rand({batch, k}, gen, opt);
      break;
    }
    case Family::kRepeated: {
      auto vals = 1.0 + torch::rand({batch, 3}, gen, opt);
      auto idx = torch::randint(0, 3, {batch, k}, gen, torch::TensorOptions().dtype(torch::kLong));
      s = vals.gather(1, idx);
      break;
    }
    case Family::kRankDeficient:
      s = 1.0 + torch::rand({batch, k}, gen, opt);
      s.narrow(1, k / 2, k - k / 2).zero_();
      break;
    case Family::kIllConditioned: {
      auto e = torch::linspace(0, -12, k, opt).unsqueeze(0).expand({batch, k});
      s = torch::pow(10.0, e) * (1.0 + 0.1 * torch::rand({batch, k}, gen, opt));
      break;
    }
  }
  return std::get<0>(s.sort(-1, /*descending=*/true));
}

/// Random matrices [batch, m, n] with singular values from the family.
inline torch::Tensor random_matrix(Family f, int64_t batch, int64_t m, int64_t n,
                                   torch::Generator& gen) {
  auto opt = torch::TensorOptions().dtype(torch::kFloat64);
  const int64_t k = std::min(m, n);
  auto u = std::get<0>(torch::linalg_qr(torch::randn({batch, m, k}, gen, opt)));
  auto v = std::get<0>(torch::linalg_qr(torch::randn({batch, n, k}, gen, opt)));
  auto s = family_spectrum(f, batch, k, gen);
  return torch::matmul(u * s.unsqueeze(-2), v.transpose(-1, -2));
}

/// Median of a float tensor (NaN-free), as double; 0 for empty.
inline double median(const torch::Tensor& x) {
  if (x.numel() == 0) return 0;
  return std::get<0>(x.flatten().to(torch::kFloat64).sort()).index({x.numel() / 2}).item<double>();
}

}  // namespace attnpilot::perturbation::testing
