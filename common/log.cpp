#include "common/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

namespace attnpilot::log {
namespace {

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> l = [] {
    auto lg = spdlog::stderr_color_mt("attnpilot");
    lg->set_pattern("[%H:%M:%S.%e] [%^%l%$] %v");
    return lg;
  }();
  return *l;
}

}  // namespace

void debug(std::string_view msg) { logger().debug("{}", msg); }
void info(std::string_view msg) { logger().info("{}", msg); }
void warn(std::string_view msg) { logger().warn("{}", msg); }
void error(std::string_view msg) { logger().error("{}", msg); }

void set_level(Level level) {
  switch (level) {
    case Level::kDebug:
      logger().set_level(spdlog::level::debug);
      break;
    case Level::kInfo:
      logger().set_level(spdlog::level::info);
      break;
    case Level::kWarn:
      logger().set_level(spdlog::level::warn);
      break;
    case Level::kError:
      logger().set_level(spdlog::level::err);
      break;
    case Level::kOff:
      logger().set_level(spdlog::level::off);
      break;
  }
}

bool parse_level(std::string_view s, Level* out) {
  if (s == "debug")
    *out = Level::kDebug;
  else if (s == "info")
    *out = Level::kInfo;
  else if (s == "warn")
    *out = Level::kWarn;
  else if (s == "error")
    *out = Level::kError;
  else if (s == "off")
    *out = Level::kOff;
  else
    return false;
  return true;
}

}  // namespace attnpilot::log
