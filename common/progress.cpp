#include "common/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <iostream>

namespace attnpilot {

Progress::Progress(std::string label, int64_t total, std::string unit, std::ostream& out,
                   double min_interval_s)
    : label_(std::move(label)),
      unit_(std::move(unit)),
      total_(total),
      out_(out),
      min_interval_s_(min_interval_s),
      tty_((&out == &std::cout && ::isatty(1)) || (&out == &std::cerr && ::isatty(2))),
      start_(std::chrono::steady_clock::now()),
      last_print_(start_) {}

std::string Progress::format_duration(double s) {
  if (!std::isfinite(s) || s < 0) return "?";
  if (s < 60) return fmt::format("{:.1f}s", s);
  const long t = static_cast<long>(std::lround(s));
  if (t < 3600) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}h{:02d}m{:02d}s", t / 3600, (t / 60) % 60, t % 60);
}

void Progress::update(int64_t done, const std::string& extra) {
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_print_).count();
  const double interval = tty_ ? 0.2 : min_interval_s_;
  if (printed_ && since < interval) return;
  last_print_ = now;
  print(done, extra, false);
}

void Progress::finish(const std::string& extra) { print(total_, extra, true); }

void Progress::print(int64_t done, const std::string& extra, bool final_line) {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = elapsed > 0 ? static_cast<double>(done) / elapsed : 0.0;
  const double frac = total_ > 0 ? static_cast<double>(done) / static_cast<double>(total_) : 1.0;
  std::string bar;
  if (tty_) {
    const int width = 24;
    const int fill = static_cast<int>(std::lround(frac * width));
    bar = "[" + std::string(std::max(0, std::min(width, fill)), '#') +
          std::string(std::max(0, width - fill), '.') + "] ";
  }
  std::string line;
  if (final_line) {
    line = fmt::format("{} {}{}/{} {} in {} ({:.1f} {}/s)", label_, bar, done, total_, unit_,
                       format_duration(elapsed), rate, unit_);
  } else {
    const double eta = rate > 0 ? static_cast<double>(total_ - done) / rate : NAN;
    line = fmt::format("{} {}{:5.1f}% {}/{} {}, {:.1f} {}/s, ETA {}", label_, bar, 100.0 * frac,
                       done, total_, unit_, rate, unit_, format_duration(eta));
  }
  if (!extra.empty()) line += " | " + extra;
  if (tty_) {
    out_ << "\r\033[K" << line;
    if (final_line) out_ << "\n";
  } else {
    out_ << line << "\n";
  }
  out_.flush();
  printed_ = true;
}

}  // namespace attnpilot
