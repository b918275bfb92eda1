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
      ATTNPILOT_CHECK_ARG(block_size >= 1, "block_sparse plan: block_size {} must be >= 1",
                          block_size);
      break;
    case Kind::kStreaming:
      ATTNPILOT_CHECK_ARG(window >= 1, "streaming plan: window {} must be >= 1", window);
      ATTNPILOT_CHECK_ARG(sinks >= 0, "streaming plan: sinks {} must be >= 0", sinks);
      break;
  }
}

std::string HeadPlan::to_string() const {
  switch (kind) {
    case Kind::kDense:
      return "dense";
    case Kind::kLowRank:
      return fmt::format("lowrank(r={})", rank);
    case Kind::kBlockSparse:
      return top_k > 0 ? fmt::format("block_sparse(top_k={}, block={})", top_k, block_size)
                       : fmt::format("block_sparse(density={}, block={})", density, block_size);
    case Kind::kStreaming:
      return fmt::format("streaming(sinks={}, window={})", sinks, window);
  }
  return "?";
}

bool HeadPlan::operator==(const HeadPlan& o) const {
  return kind == o.kind && rank == o.rank && density == o.density && top_k == o.top_k &&
         block_size == o.block_size && window == o.window && sinks == o.sinks;
}

const HeadPlan& LayerPlan::head(int64_t h) const {
  return heads.size() == 1 ? heads[0] : heads.at(static_cast<size_t>(h));
}

bool LayerPlan::all_dense() const {
  for (const auto& h : heads)
    if (h.kind != Kind::kDense) return false;
  return true;
}

void LayerPlan::validate(int64_t num_heads, int64_t head_dim) const {
  ATTNPILOT_CHECK_ARG(heads.size() == 1 || static_cast<int64_t>(heads.size()) == num_heads,
                      "layer plan has {} head plans; expected 1 or num_heads={}", heads.size(),
                      num_heads);
  for (size_t i = 0; i < heads.size(); ++i) {
    try {
      heads[i].validate(head_dim);
    } catch (const InvalidArgument& e) {
      throw InvalidArgument(fmt::format("head {}: {}", i, e.what()));
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
