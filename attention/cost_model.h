#pragma once
/// The measured cost of attention calls on this machine: a calibration table of wall times
/// of run_attention (dense and low-rank heads) over (queries N, keys M, rank r, head dim d),
/// interpolated for the shapes the rank environment and the reports ask about.
///
///   CalibrationOptions ──calibrate()──► points: (kind, N, M, r, d) ─► median µs, min, max
///          │                                 │
///          └──── save()/load() JSON ◄────────┘  (machine, options, every point)
///
///   time_us(plan, n_q, n_k, d, heads):
///     per calibrated N row:   rank axis (lowrank) ─► M axis over the row's valid M >= N
///     then across N rows   ─► µs for the calibrated head count × heads / calibrated heads
///
/// Interpolation is piecewise-linear in each axis on LINEAR scales (not log): at a fixed
/// number of queries the work of a causal call (query-key pairs N·(M−N) + N(N+1)/2, rank-r
/// score and projection products ∝ r) is affine in M and in r, and small calls carry a fixed
/// overhead; an affine function with an offset is reproduced exactly by linear interpolation
/// and extrapolation, whereas log–log interpolation would bend it. Outside the grid the
/// nearest edge cell's line is extended, counted by extrapolations(), and the prediction is
/// floored at the smallest time measured for that head dim and kind (a linear extension
/// towards tiny shapes could otherwise reach zero or below).
///
/// Grid cells with M < N cannot be measured (causal queries at the end of the keys need
/// M >= N). Inside a row N_i the M axis uses only that row's valid M values; a key length
/// below the row's first valid M (possible for the upper row N_i of a cell holding n_q)
/// extends that row's first segment linearly (exact for the affine-in-M work above). That
/// is part of the grid's interpolation and is not counted as an extrapolation; leaving the
/// [min, max] range of N, M or r is.
///
/// Timing: wall time (steady clock) of run_attention with torch's intra-op threads set to
/// CalibrationOptions::threads for the calibration (restored afterwards). Wall time is what
/// a rollout or an evaluation pays (allocation, memory stalls included); thread CPU time
/// would hide waiting. One thread by default because on a small shared machine several
/// threads make wall time depend on what else runs; the threads used are recorded.
///
/// Memory allocation is part of a call's time. With glibc's default (dynamic) mmap and trim
/// thresholds, a call whose score buffer lands at the top of the heap after a trim pays
/// page faults for it, which made single shapes 2-5x slower in measurements on a 2-core
/// EPYC (e.g. N 128, M 1024, d 32: 1.7-2.3 ms, against 0.99-1.05 ms with
/// MALLOC_MMAP_THRESHOLD_=33554432 and MALLOC_TRIM_THRESHOLD_=268435456). Which shapes pay
/// depends on the order of calls, so calibrate and run the model under the same allocator
/// settings; machine() records them.
#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "attention/plan.h"

namespace attnpilot::attention {

/// The calibration grid and how each point is measured. Axes must be strictly increasing
/// and positive; every query length must be <= the largest key length.
struct CalibrationOptions {
  std::vector<int64_t> query_lengths{16, 32, 64, 128};        ///< N: queries per call
  std::vector<int64_t> key_lengths{64, 128, 256, 512, 1024};  ///< M: keys (cache + segment)
  std::vector<int64_t> ranks{2, 4, 8, 16, 32, 64};            ///< low-rank score ranks; > d skipped
  std::vector<int64_t> head_dims{32, 64};
  int64_t heads = 4;     ///< query heads in one call
  int64_t kv_heads = 0;  ///< key/value heads (GQA, a divisor of heads); 0 = heads
  int repeats = 5;       ///< timed repeats after one warm-up; the median is the point's time
  torch::Device device = torch::kCPU;
  int threads = 1;    ///< torch intra-op threads during calibration
  uint64_t seed = 1;  ///< seed of the random q, k, v

  /// A small grid (N {16, 64}, M {64, 128, 256, 512}, r {4, 8, 16, 32}, d {32}, 3 repeats)
  /// that calibrates in about a second; for tests and the demo.
  static CalibrationOptions quick();
  /// Throws InvalidArgument naming the field and value when the options are unusable.
  void validate() const;
};

/// One measured grid point. Dense points have rank 0.
struct CostPoint {
  Kind kind = Kind::kDense;
  int64_t n_q = 0, n_k = 0, rank = 0, head_dim = 0;
  double median_us = 0, min_us = 0, max_us = 0;
};

class CostModel {
 public:
  /// Measures every grid point: for each head dim and each (N, M) with M >= N, q, k, v
  /// [1, ·, ·, d] float32 from a generator seeded by options.seed and the shape,
  /// run_attention with causal = true, q_offset = -1 (M − N) and LayerPlan::uniform of
  /// dense (SDPA where run_attention picks it: N == M or N == 1) and of lowrank(r) for every
  /// r <= d, given the optimal projections a_q, a_k (lowrank_projections, not timed).
  ///
  /// Order: one untimed sweep over the whole grid, then `repeats` timed sweeps; within a
  /// sweep each shape gets one untimed dense call (its inputs back in cache, as they are
  /// when a layer has just produced them) and then every case once. A slow phase of a
  /// shared machine thus costs each point at most one of its samples (the median drops
  /// it), instead of all samples of the points measured during it. Every shape's inputs
  /// are held for the whole calibration (memory: the sum over shapes).
  ///
  /// Prints a progress line (rate, ETA) to `progress` when given. Throws InvalidArgument
  /// for bad options and Unavailable for a device without an attention backend.
  static CostModel calibrate(const CalibrationOptions& options, std::ostream* progress = nullptr);

  /// A model from a table (e.g. a synthetic one in tests). `points` must hold exactly one
  /// dense point per (d, N, M) with M >= N and one low-rank point per rank <= d there, with
  /// 0 < min_us <= median_us <= max_us, all finite. Throws InvalidArgument naming the field.
  static CostModel from_points(const CalibrationOptions& options, std::vector<CostPoint> points,
                               nlohmann::json machine = nlohmann::json::object());

  /// Reads a file written by save(). Throws IoError when unreadable and FormatError naming
  /// the field (e.g. "points[3].median_us") when malformed.
  static CostModel load(const std::filesystem::path& path);
  /// Writes {format, version, machine, options, points} atomically.
  void save(const std::filesystem::path& path) const;
  nlohmann::json to_json() const;

  /// Predicted wall time in µs of one run_attention call of `heads` query heads (batch 1),
  /// causal, n_queries at the end of n_keys keys (q_offset = n_keys − n_queries), for a
  /// kDense head plan, or kLowRank of plan.rank with precomputed projections (a_q, a_k
  /// given: the time counts Q·A_Q, K·A_K, the rank-r scores, softmax and V; not the
  /// projections' factorization). Scales linearly with heads relative to options().heads
  /// (keeping the calibrated ratio of query to key/value heads).
  /// Throws InvalidArgument naming the value and the calibrated ones for a head dim not
  /// calibrated, another plan kind, a rank outside [1, head_dim], n_queries < 1,
  /// n_keys < n_queries or heads < 1.
  double time_us(const HeadPlan& plan, int64_t n_queries, int64_t n_keys, int64_t head_dim,
                 int64_t heads) const;
  /// time_us(plan) / time_us(dense) for the same shape (the head count cancels).
  double relative_time(const HeadPlan& plan, int64_t n_queries, int64_t n_keys,
                       int64_t head_dim) const;

  /// Number of time_us evaluations so far that left the calibrated range of N, M or rank.
  int64_t extrapolations() const { return extrapolations_->load(); }

  const CalibrationOptions& options() const { return options_; }
  const std::vector<CostPoint>& points() const { return points_; }
  /// The calibrated ranks usable at head dim d (those <= d), ascending.
  std::vector<int64_t> ranks_for(int64_t head_dim) const;
  /// CPU model (/proc/cpuinfo), logical cores, threads, torch version, device, UTC date,
  /// allocator (glibc version, MALLOC_* / GLIBC_TUNABLES / LD_PRELOAD when set).
  nlohmann::json machine() const { return machine_; }
  /// The description of this machine now (what calibrate() stores).
  static nlohmann::json describe_machine(const CalibrationOptions& options);

 private:
  CostModel() = default;
  /// Builds the per-head-dim lookup tables; throws InvalidArgument naming the field.
  void index();
  /// Time of the calibrated head count at (n, m, rank); rank 0 = dense.
  double interpolate(int64_t head_dim, int64_t rank, double n, double m, bool* outside) const;

  CalibrationOptions options_;
  std::vector<CostPoint> points_;
  nlohmann::json machine_;
  /// tables_[di][ni][mi][ri]: median µs; ri = 0 dense, ri >= 1 ranks_for(d)[ri - 1]; NaN
  /// where M < N.
  std::vector<std::vector<std::vector<std::vector<double>>>> tables_;
  std::vector<double> floor_dense_, floor_lowrank_;  ///< per head dim: smallest median
  /// Shared by copies so that a copy handed to an environment still reports to its owner.
  std::shared_ptr<std::atomic<int64_t>> extrapolations_ = std::make_shared<std::atomic<int64_t>>(0);
};

}  // namespace attnpilot::attention
