#pragma once
/// A progress line for long work: done/total, rate, ETA and caller-supplied fields.
/// On a terminal it redraws one line ("\r"); otherwise it prints a line at most every
/// `min_interval_s` seconds, so CI logs stay readable.
#include <chrono>
#include <cstdint>
#include <iosfwd>
#include <string>

namespace attnpilot {

class Progress {
 public:
  /// `total` units of work named `unit` (e.g. "tok", "steps"); `label` starts the line.
  Progress(std::string label, int64_t total, std::string unit, std::ostream& out,
           double min_interval_s = 2.0);
  /// Reports that `done` units are complete; `extra` is appended (e.g. "loss 3.21").
  void update(int64_t done, const std::string& extra = "");
  /// Prints the final line with the total time.
  void finish(const std::string& extra = "");

  /// Formats seconds as 1h02m03s / 2m03s / 3.2s.
  static std::string format_duration(double seconds);

 private:
  void print(int64_t done, const std::string& extra, bool final_line);

  std::string label_, unit_;
  int64_t total_;
  std::ostream& out_;
  double min_interval_s_;
  bool tty_;
  std::chrono::steady_clock::time_point start_, last_print_;
  bool printed_ = false;
};

}  // namespace attnpilot
