#pragma once
/// Exception types thrown at module boundaries. Every message names the offending value
/// and what was expected; library code never exits the process.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace attnpilot {

/// Base of every attnpilot error.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A caller passed a value outside what the function accepts.
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

/// A file or message does not follow its format (safetensors, config, codec, ...).
class FormatError : public Error {
 public:
  using Error::Error;
};

/// The operating system refused a file or socket operation.
class IoError : public Error {
 public:
  using Error::Error;
};

/// A feature that is compiled out or needs hardware that is not present.
class Unavailable : public Error {
 public:
  using Error::Error;
};

/// Throws IoError with `what` and strerror(errno).
[[noreturn]] void throw_errno(const std::string& what);

}  // namespace attnpilot

/// Throws attnpilot::InvalidArgument with a fmt-formatted message when `cond` is false.
#define ATTNPILOT_CHECK_ARG(cond, ...)                                         \
  do {                                                                         \
    if (!(cond)) throw ::attnpilot::InvalidArgument(fmt::format(__VA_ARGS__)); \
  } while (0)
