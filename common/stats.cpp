#include "common/stats.h"

#include <boost/math/distributions/students_t.hpp>
#include <cmath>

#include "common/error.h"

namespace attnpilot {

MeanCI mean_ci(const std::vector<double>& x, double level) {
  ATTNPILOT_CHECK_ARG(!x.empty(), "mean_ci: empty sample");
  ATTNPILOT_CHECK_ARG(level > 0 && level < 1, "mean_ci: level {} must be in (0, 1)", level);
  MeanCI r;
  r.n = static_cast<int>(x.size());
  double s = 0;
  for (double v : x) s += v;
  r.mean = s / r.n;
  if (r.n < 2) {
    r.low = r.high = r.mean;
    return r;
  }
  double ss = 0;
  for (double v : x) ss += (v - r.mean) * (v - r.mean);
  r.stddev = std::sqrt(ss / (r.n - 1));
  boost::math::students_t dist(r.n - 1);
  const double t = boost::math::quantile(boost::math::complement(dist, (1 - level) / 2));
  const double half = t * r.stddev / std::sqrt(static_cast<double>(r.n));
  r.low = r.mean - half;
  r.high = r.mean + half;
  return r;
}

PairedTest paired_t_test(const std::vector<double>& a, const std::vector<double>& b, double level) {
  ATTNPILOT_CHECK_ARG(a.size() == b.size(), "paired_t_test: sizes {} and {} differ", a.size(),
                      b.size());
  ATTNPILOT_CHECK_ARG(a.size() >= 2, "paired_t_test: need at least 2 pairs, got {}", a.size());
  std::vector<double> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  PairedTest r;
  r.diff = mean_ci(d, level);
  const double se = r.diff.stddev / std::sqrt(static_cast<double>(d.size()));
  if (se == 0) {
    r.t = r.diff.mean == 0 ? 0 : INFINITY;
    r.p = r.diff.mean == 0 ? 1 : 0;
    return r;
  }
  r.t = r.diff.mean / se;
  boost::math::students_t dist(static_cast<double>(d.size() - 1));
  r.p = 2 * boost::math::cdf(boost::math::complement(dist, std::fabs(r.t)));
  return r;
}

}  // namespace attnpilot
