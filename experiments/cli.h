#pragma once
/// The `attnpilot` command line: one CLI11 subcommand per verb. Each verb lives in
/// experiments/verbs/<verb>.cpp and registers itself by name (OpenSpiel-style registry):
///
///   ATTNPILOT_REGISTER_VERB(inspect, 20, add_inspect_verb);
///
/// where `void add_inspect_verb(CLI::App& root)` adds the subcommand and sets a callback
/// that does the work. `order` sorts verbs in --help. The verbs are an OBJECT library, so
/// every registrar is linked in.
///
/// Exit codes: 0 success; 2 bad command line, bad config or bad input file (a message
/// names the flag, key or value); 1 any other failure.
#include <CLI/CLI.hpp>

namespace attnpilot::cli {

/// Thrown by verbs for a bad user-supplied value that CLI11 could not catch itself
/// (e.g. a config key nobody reads); main maps it to exit code 2.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using AddVerbFn = void (*)(CLI::App& root);

struct VerbEntry {
  const char* name;
  int order;
  AddVerbFn add;
};

/// All registered verbs, sorted by (order, name).
std::vector<VerbEntry> registered_verbs();

/// Registers a verb at static-initialisation time; use ATTNPILOT_REGISTER_VERB.
struct VerbRegistrar {
  VerbRegistrar(const char* name, int order, AddVerbFn add);
};

#define ATTNPILOT_REGISTER_VERB(name, order, fn) \
  static ::attnpilot::cli::VerbRegistrar attnpilot_verb_registrar_##name(#name, order, fn)

}  // namespace attnpilot::cli

#include <torch/torch.h>

namespace attnpilot::cli {

/// Parses --device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available, else CPU).
/// Throws UsageError naming the value, or when CUDA is asked for and absent.
torch::Device parse_device(const std::string& s);

/// Parses a comma-separated list of positive integers ("4,8,16"), in the given order.
/// Throws UsageError naming `flag` and the bad item, or when the list is empty.
std::vector<int64_t> parse_positive_list(const std::string& flag, const std::string& s);

}  // namespace attnpilot::cli
