#pragma once
/// Logging through spdlog (see common/CMakeLists.txt for why it sits behind this header).
/// Format the message with fmt::format at the call site:
///   log::info(fmt::format("step {} loss {:.3f}", step, loss));
#include <string_view>

namespace attnpilot::log {

enum class Level { kDebug, kInfo, kWarn, kError, kOff };

void debug(std::string_view msg);
void info(std::string_view msg);
void warn(std::string_view msg);
void error(std::string_view msg);
/// Sets the level of the default (stderr) logger.
void set_level(Level level);
/// Parses "debug" | "info" | "warn" | "error" | "off"; returns false if unknown.
bool parse_level(std::string_view s, Level* out);

}  // namespace attnpilot::log
