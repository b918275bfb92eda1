#include "attention/plan.h"

#include "common/error.h"

namespace attnpilot::attention {

const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kDense:
      return "dense";
    case Kind::kLowRank:
      return "lowrank";
    case Kind::kBlockSparse:
      return "block_sparse";
    case Kind::kStreaming:
      return "streaming";
  }
  return "?";
}

const char* estimator_name(BlockEstimator e) {
  switch (e) {
    case BlockEstimator::kPooled:
      return "pooled";
    case BlockEstimator::kLowRank:
      return "lowrank";
    case BlockEstimator::kVerticalSlash:
      return "vertical_slash";
  }
  return "?";
}

BlockEstimator parse_estimator(const std::string& s) {
  if (s == "pooled") return BlockEstimator::kPooled;
  if (s == "lowrank") return BlockEstimator::kLowRank;
  if (s == "vertical_slash") return BlockEstimator::kVerticalSlash;
  throw InvalidArgument(
      fmt::format("unknown block estimator '{}': expected pooled, lowrank or vertical_slash", s));
}

Kind parse_kind(const std::string& s) {
  if (s == "dense") return Kind::kDense;
  if (s == "lowrank") return Kind::kLowRank;
  if (s == "block_sparse") return Kind::kBlockSparse;
  if (s == "streaming") return Kind::kStreaming;
  throw InvalidArgument(fmt::format(
      "unknown attention kind '{}': expected dense, lowrank, block_sparse or streaming", s));
}

void HeadPlan::validate(int64_t head_dim) const {
  switch (kind) {
    case Kind::kDense:
      break;
    case Kind::kLowRank:
      ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= head_dim,
                          "lowrank plan: rank {} must be in [1, head_dim={}]", rank, head_dim);
      break;
    case Kind::kBlockSparse:
      ATTNPILOT_CHECK_ARG(top_k > 0 || (density > 0.0 && density <= 1.0),
                          "block_sparse plan: density {} must be in (0, 1]", density);
      ATTNPILOT_CHECK_ARG(top_k >= 0, "block_sparse plan: top_k {} must be >= 0", top_k);
      ATTNPILOT_CHECK_ARG(block_size >= 1 && block_size <= kMaxBlockSize,
                          "block_sparse plan: block_size {} must be in [1, {}]", block_size,
                          kMaxBlockSize);
      ATTNPILOT_CHECK_ARG(gamma >= 0.0 && gamma <= 1.0,
                          "block_sparse plan: gamma {} must be in [0, 1] (0 = use top_k/density)",
                          gamma);
      if (estimator == BlockEstimator::kLowRank)
        ATTNPILOT_CHECK_ARG(rank >= 1 && rank <= head_dim,
                            "block_sparse plan with lowrank estimator: rank {} must be in [1, "
                            "head_dim={}]",
                            rank, head_dim);
      break;
    case Kind::kStreaming:
      ATTNPILOT_CHECK_ARG(window >= 1, "streaming plan: window {} must be >= 1", window);
      ATTNPILOT_CHECK_ARG(sinks >= 0, "streaming plan: sinks {} must be >= 0", sinks);
      ATTNPILOT_CHECK_ARG(block_size >= 1 && block_size <= kMaxBlockSize,
                          "streaming plan: block_size {} must be in [1, {}]", block_size,
                          kMaxBlockSize);
      break;
  }
}

std::string HeadPlan::to_string() const {
  switch (kind) {
    case Kind::kDense:
      return "dense";
    case Kind::kLowRank:
      return fmt::format("lowrank(r={})", rank);
    case Kind::kBlockSparse: {
      const std::string est =
          estimator == BlockEstimator::kLowRank
              ? fmt::format("lowrank(r={}{})", rank, pool_queries ? ", pooled queries" : "")
              : std::string(estimator_name(estimator));
      if (gamma > 0)
        return fmt::format("block_sparse(gamma={}, block={}, est={})", gamma, block_size, est);
      return top_k > 0
                 ? fmt::format("block_sparse(top_k={}, block={}, est={})", top_k, block_size, est)
                 : fmt::format("block_sparse(density={}, block={}, est={})", density, block_size,
                               est);
    }
    case Kind::kStreaming:
      return fmt::format("streaming(sinks={}, window={})", sinks, window);
  }
  return "?";
}

bool HeadPlan::operator==(const HeadPlan& o) const {
  return kind == o.kind && rank == o.rank && density == o.density && top_k == o.top_k &&
         block_size == o.block_size && gamma == o.gamma && estimator == o.estimator &&
         pool_queries == o.pool_queries && window == o.window && sinks == o.sinks;
}

const HeadPlan& LayerPlan::head(int64_t h) const {
  return heads.size() == 1 ? heads[0] : heads.at(static_cast<size_t>(h));
}

bool LayerPlan::all_dense() const {
  for (const auto& h : heads)
    if (h.kind != Kind::kDense) return false;
  return true;
}

void LayerPlan::validate(int64_t num_heads, int64_t head_dim, int64_t layer) const {
  const std::string where = layer >= 0 ? fmt::format("layer {}: ", layer) : std::string();
  ATTNPILOT_CHECK_ARG(heads.size() == 1 || static_cast<int64_t>(heads.size()) == num_heads,
                      "{}layer plan has {} head plans; expected 1 or num_heads={}", where,
                      heads.size(), num_heads);
  for (size_t i = 0; i < heads.size(); ++i) {
    try {
      heads[i].validate(head_dim);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(fmt::format("{}head {}: {}", where, i, e.what()));
    }
  }
}

ExecStats& ExecStats::operator+=(const ExecStats& o) {
  score_flops += o.score_flops;
  value_flops += o.value_flops;
  other_flops += o.other_flops;
  bytes += o.bytes;
  time_us += o.time_us;
  calls += o.calls;
  return *this;
}

}  // namespace attnpilot::attention
