#pragma once
/// The contract between the control plane and the data plane (see ../shared/DESIGN.md):
/// a LayerPlan per layer, a HeadPlan per query head, and ExecStats back for cost.
///
///   policies/ Controller ──LayerPlan──► attention::run_attention ──ExecStats──► env/ reward
///
/// Plans are plain values, validated on construction of the executor call (validate()).
#include <cstdint>
#include <string>
#include <vector>

namespace attnpilot::attention {

/// What one head computes.
enum class Kind {
  kDense,        ///< full softmax(QKᵀ/√d)V
  kLowRank,      ///< scores from rank-r projections Q A_Q (K A_K)ᵀ, softmax and V at full dim
  kBlockSparse,  ///< only the key blocks listed for each query block (density or top-k)
  kStreaming,    ///< `sinks` first tokens plus a local `window`
};

/// How a kBlockSparse head chooses its key blocks when the caller passes no BlockMask
/// (see attention/estimators.h). Every estimator keeps the sink block and the diagonal.
enum class BlockEstimator {
  kPooled,         ///< softmax(pool(Q) pool(K)ᵀ/√d) over mean-pooled blocks
  kLowRank,        ///< block sums of rank-`rank` attention (optimal score projections)
  kVerticalSlash,  ///< MInference: the last 64 queries estimate vertical columns and diagonals
};

/// "pooled" | "lowrank" | "vertical_slash".
const char* estimator_name(BlockEstimator e);
/// Parses estimator_name's strings; throws InvalidArgument naming the string otherwise.
BlockEstimator parse_estimator(const std::string& s);

/// "dense" | "lowrank" | "block_sparse" | "streaming".
const char* kind_name(Kind k);
/// Parses kind_name's strings; throws InvalidArgument naming the string otherwise.
Kind parse_kind(const std::string& s);

/// One head's decision. Fields that a kind does not use are ignored.
struct HeadPlan {
  Kind kind = Kind::kDense;
  int64_t rank = 0;  ///< kLowRank: 1..head_dim (head_dim = exact); kBlockSparse with the
                     ///< kLowRank estimator: the estimator's rank

  double density = 1.0;  ///< kBlockSparse: share of causal key blocks kept, in (0, 1]
  int64_t top_k = 0;  ///< kBlockSparse: if > 0, key blocks kept per query block (overrides density)
  int64_t block_size = 64;  ///< kBlockSparse, kStreaming: tokens per block (query and key)
  /// kBlockSparse: if > 0, keep per query block the fewest key blocks whose estimated
  /// attention mass reaches gamma (FlexPrefill); overrides top_k and density. In [0, 1].
  double gamma = 0.0;
  BlockEstimator estimator = BlockEstimator::kPooled;  ///< kBlockSparse without a BlockMask
  /// kBlockSparse with the kLowRank estimator: score one mean-pooled query per query block
  /// instead of up to 8 evenly spaced sampled rows (8x fewer scored (query, key) pairs).
  bool pool_queries = false;
  int64_t window = 0;  ///< kStreaming: local window in tokens (the query itself included), >= 1
  int64_t sinks = 0;   ///< kStreaming: leading sink tokens, >= 0

  static HeadPlan dense() { return {}; }
  static HeadPlan lowrank(int64_t r) {
    HeadPlan p;
    p.kind = Kind::kLowRank;
    p.rank = r;
    return p;
  }
  static HeadPlan streaming(int64_t window, int64_t sinks) {
    HeadPlan p;
    p.kind = Kind::kStreaming;
    p.window = window;
    p.sinks = sinks;
    return p;
  }
  static HeadPlan block_sparse(double density, int64_t block_size = 64) {
    HeadPlan p;
    p.kind = Kind::kBlockSparse;
    p.density = density;
    p.block_size = block_size;
    return p;
  }
  /// Throws InvalidArgument naming the field, its value and the allowed range.
  void validate(int64_t head_dim) const;
  /// Largest accepted block_size (tokens).
  static constexpr int64_t kMaxBlockSize = 1 << 16;
  std::string to_string() const;
  bool operator==(const HeadPlan& o) const;
};

/// One layer's decision: one HeadPlan per query head (or a single one for all heads).
struct LayerPlan {
  std::vector<HeadPlan> heads;  ///< size 1 (broadcast) or num_heads

  static LayerPlan dense() { return LayerPlan{{HeadPlan::dense()}}; }
  static LayerPlan uniform(const HeadPlan& h) { return LayerPlan{{h}}; }
  /// The plan of head h (broadcast when heads.size() == 1).
  const HeadPlan& head(int64_t h) const;
  bool all_dense() const;
  /// Checks sizes and every head; throws InvalidArgument naming layer (when >= 0), head
  /// and field.
  void validate(int64_t num_heads, int64_t head_dim, int64_t layer = -1) const;
};

/// What the data plane hands back: the only input to cost in rewards and reports.
struct ExecStats {
  double score_flops = 0;  ///< multiply-adds×2 spent on attention scores (QKᵀ or rank-r)
  double value_flops = 0;  ///< softmax(·)V multiply-adds×2
  /// Score projections (Gram matrices, factorizations, Q A_Q and K A_K) and block
  /// estimators. Softmax exponentials are not counted as FLOPs anywhere.
  double other_flops = 0;
  /// Bytes read + written by the attention kernels, by a model: q, the keys (or projected
  /// keys) and values each query head reads, and the output. Not measured traffic.
  double bytes = 0;
  double time_us = 0;  ///< measured wall time of the attention call(s)
  int64_t calls = 0;

  double flops() const { return score_flops + value_flops + other_flops; }
  ExecStats& operator+=(const ExecStats& o);
};

}  // namespace attnpilot::attention
