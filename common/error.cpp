#include "common/error.h"

#include <cerrno>
#include <cstring>

namespace attnpilot {

void throw_errno(const std::string& what) {
  const int err = errno;
  throw IoError(fmt::format("{}: {}", what, std::strerror(err)));
}

}  // namespace attnpilot
