#pragma once
/// gnuplot output: writes the data and script next to the PNG and runs gnuplot.
#include <filesystem>
#include <string>

namespace attnpilot {

/// True when a gnuplot executable is on PATH.
bool gnuplot_available();

/// Runs `script` (gnuplot commands; it should `set output` itself) with gnuplot, after
/// saving it as `script_path`. Throws Unavailable when gnuplot is missing and Error when
/// gnuplot fails, with its exit status.
void run_gnuplot(const std::filesystem::path& script_path, const std::string& script);

}  // namespace attnpilot
