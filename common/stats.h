#pragma once
/// Small statistics with Boost.Math: means with Student-t confidence intervals and paired
/// t-tests, used by eval-lm and the experiment reports.
#include <vector>

namespace attnpilot {

struct MeanCI {
  double mean = 0, low = 0, high = 0;  ///< mean and the two ends of the interval
  double stddev = 0;                   ///< sample standard deviation
  int n = 0;
};

/// Mean of `x` with a two-sided `level` (e.g. 0.95) Student-t confidence interval.
/// With n < 2 the interval is [mean, mean]. Throws InvalidArgument on empty input.
MeanCI mean_ci(const std::vector<double>& x, double level = 0.95);

struct PairedTest {
  MeanCI diff;   ///< mean of a - b with its interval
  double t = 0;  ///< t statistic
  double p = 1;  ///< two-sided p-value
};

/// Paired t-test of a against b (same length, at least 2).
PairedTest paired_t_test(const std::vector<double>& a, const std::vector<double>& b,
                         double level = 0.95);

}  // namespace attnpilot
