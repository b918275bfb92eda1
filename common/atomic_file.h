#pragma once
/// Atomic file writes: data goes to a temporary file in the target's folder, is fsynced,
/// then renamed over the target and the folder fsynced. A crash leaves either the old
/// file or the new one, never a torn one.
#include <filesystem>
#include <string>
#include <string_view>

namespace attnpilot {

/// Writes `bytes` to `path` atomically. Throws IoError naming the path on failure.
void write_file_atomic(const std::filesystem::path& path, std::string_view bytes);

/// Reads a whole file. Throws IoError naming the path if it cannot be read.
std::string read_file(const std::filesystem::path& path);

/// Replaces directory `target` by `staged` (a complete, fsynced directory next to it) as
/// atomically as POSIX allows: the old directory is renamed aside, `staged` renamed in,
/// then the old one removed. Used for checkpoint folders.
void replace_directory(const std::filesystem::path& staged, const std::filesystem::path& target);

/// fsyncs a directory so renames inside it are durable.
void fsync_directory(const std::filesystem::path& dir);

/// Appends one line (a newline is added) to a file and flushes it to disk (metrics.jsonl).
void append_line_durable(const std::filesystem::path& path, std::string_view line);

}  // namespace attnpilot
