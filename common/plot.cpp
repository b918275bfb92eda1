#include "common/plot.h"

#include <sys/wait.h>

#include <cstdlib>

#include "common/atomic_file.h"
#include "common/error.h"

namespace attnpilot {

bool gnuplot_available() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

void run_gnuplot(const std::filesystem::path& script_path, const std::string& script) {
  write_file_atomic(script_path, script);
  if (!gnuplot_available())
    throw Unavailable(
        fmt::format("gnuplot is not installed; the script was saved as {}", script_path.string()));
  const std::string cmd = fmt::format("gnuplot '{}' 2>&1", script_path.string());
  const int rc = std::system(cmd.c_str());
  if (rc != 0)
    throw Error(fmt::format("gnuplot failed on {} (status {})", script_path.string(),
                            WIFEXITED(rc) ? WEXITSTATUS(rc) : rc));
}

}  // namespace attnpilot
