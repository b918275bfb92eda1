// `attnpilot info`: what this build and machine provide (LibTorch, CUDA, gnuplot).
#include <iostream>

#include "common/plot.h"
#include "experiments/cli.h"

namespace attnpilot::cli {
namespace {

void add_info_verb(CLI::App& root) {
  auto* cmd = root.add_subcommand("info", "Print the build configuration and available devices");
  cmd->callback([] {
    std::cout << "attnpilot 0.1.0\n";
    std::cout << "LibTorch " << TORCH_VERSION << "\n";
#ifdef ATTNPILOT_WITH_CUDA
    std::cout << "CUDA kernels: built\n";
#else
    std::cout << "CUDA kernels: not built (ATTNPILOT_CUDA=OFF)\n";
#endif
    std::cout << "CUDA devices: " << (torch::cuda::is_available() ? torch::cuda::device_count() : 0)
              << "\n";
    std::cout << "CPU threads: " << torch::get_num_threads() << "\n";
    std::cout << "gnuplot: " << (gnuplot_available() ? "yes" : "no (plots are skipped)") << "\n";
  });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(info, 0, add_info_verb);

}  // namespace attnpilot::cli
