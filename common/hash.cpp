#include "common/hash.h"

#include <fmt/format.h>

namespace attnpilot {

Fingerprint& Fingerprint::add(std::string_view bytes) {
  for (unsigned char c : bytes) {
    h_ ^= c;
    h_ *= 1099511628211ULL;
  }
  h_ ^= 0xff;  // separator, so ("ab","c") != ("a","bc")
  h_ *= 1099511628211ULL;
  return *this;
}

Fingerprint& Fingerprint::add(int64_t v) { return add(std::to_string(v)); }

std::string Fingerprint::hex() const { return fmt::format("{:016x}", h_); }

}  // namespace attnpilot
