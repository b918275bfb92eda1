#pragma once
/// Content fingerprints (64-bit FNV-1a, hex). Not cryptographic: they identify a model
/// or config in manifests and reports.
#include <cstdint>
#include <string>
#include <string_view>

namespace attnpilot {

class Fingerprint {
 public:
  Fingerprint& add(std::string_view bytes);
  Fingerprint& add(int64_t v);
  uint64_t value() const { return h_; }
  /// 16 lowercase hex digits.
  std::string hex() const;

 private:
  uint64_t h_ = 1469598103934665603ULL;
};

}  // namespace attnpilot
