// attnpilot: the experiment runner CLI. See README.md for every verb with an example.
#include <malloc.h>

#include <iostream>

#include "common/error.h"
#include "common/log.h"
#include "experiments/cli.h"

int main(int argc, char** argv) {
  // glibc's default heap trimming returns the large attention temporaries to the kernel
  // after every call, so some shapes page-fault on every call and run 2-5x slower
  // depending on call order (measured by `calibrate`, attention/cost_model.h). Keep them:
  // both thresholds are needed.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  CLI::App app{
      "attnpilot: a reinforcement-learning control plane for adaptive attention.\n"
      "Agents choose per layer and head the rank, sparsity or routing of attention,\n"
      "measured against the dense model.",
      "attnpilot"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "attnpilot 0.1.0");
  app.fallthrough(false);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "debug, info, warn, error or off")
      ->check(CLI::IsMember({"debug", "info", "warn", "error", "off"}));
  app.parse_complete_callback([&] {
    attnpilot::log::Level lv;
    if (attnpilot::log::parse_level(log_level, &lv)) attnpilot::log::set_level(lv);
  });

  for (const auto& verb : attnpilot::cli::registered_verbs()) verb.add(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);  // prints the message naming the flag or value
    return 2;
  } catch (const attnpilot::cli::UsageError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const attnpilot::InvalidArgument& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const attnpilot::FormatError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
