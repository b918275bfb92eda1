#include "attention/attention.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "attention/backend.h"
#include "attention/estimators.h"
#include "attention/lowrank.h"
#include "common/error.h"
#include "common/tensor_str.h"

namespace attnpilot::attention {
namespace {

struct Shape {
  int64_t B, Hq, Hkv, N, M, d, dv, q_offset;
};

Shape check_inputs(const AttentionInputs& in) {
  ATTNPILOT_CHECK_ARG(in.q.defined() && in.v.defined() && (in.k.defined() || in.k_proj.defined()),
                      "attention: q, v and k (or k_proj) must be defined");
  ATTNPILOT_CHECK_ARG(in.q.dim() == 4 && in.v.dim() == 4 && (!in.k.defined() || in.k.dim() == 4),
                      "attention: q, k, v must be 4-D [B, H, L, d]; got {}-D, {}-D, {}-D",
                      in.q.dim(), in.k.defined() ? in.k.dim() : 0, in.v.dim());
  Shape s{in.q.size(0), in.q.size(1), in.v.size(1), in.q.size(2),
          in.v.size(2), in.q.size(3), in.v.size(3), 0};
  ATTNPILOT_CHECK_ARG(in.v.size(0) == s.B, "attention: batch sizes differ (q {}, v {})", s.B,
                      in.v.size(0));
  if (in.k.defined()) {
    ATTNPILOT_CHECK_ARG(in.k.size(0) == s.B, "attention: batch sizes differ (q {}, k {})", s.B,
                        in.k.size(0));
    ATTNPILOT_CHECK_ARG(in.k.size(3) == s.d, "attention: key dim {} != query dim {}", in.k.size(3),
                        s.d);
    ATTNPILOT_CHECK_ARG(in.k.size(1) == s.Hkv && in.k.size(2) == s.M,
                        "attention: v shape [{}, {}] != k shape [{}, {}] in heads/length",
                        in.v.size(1), in.v.size(2), in.k.size(1), in.k.size(2));
  }
  ATTNPILOT_CHECK_ARG(s.Hkv > 0 && s.Hq % s.Hkv == 0,
                      "attention: query heads {} must be a multiple of key/value heads {}", s.Hq,
                      s.Hkv);
  ATTNPILOT_CHECK_ARG(s.N >= 1 && s.M >= 1, "attention: empty input (N={}, M={})", s.N, s.M);
  s.q_offset = in.q_offset < 0 ? s.M - s.N : in.q_offset;
  ATTNPILOT_CHECK_ARG(!in.causal || s.q_offset + s.N <= s.M,
                      "attention: q_offset {} + N {} exceeds key length {}", s.q_offset, s.N, s.M);
  if (in.a_q.defined() || in.a_k.defined()) {
    ATTNPILOT_CHECK_ARG(in.a_q.defined() && in.a_q.dim() == 4 &&
                            (in.a_q.size(0) == 1 || in.a_q.size(0) == s.B) &&
                            in.a_q.size(1) == s.Hq && in.a_q.size(2) == s.d,
                        "attention: a_q must be [1 or B={}, Hq={}, d={}, R]; got {}", s.B, s.Hq,
                        s.d, shape_str(in.a_q));
    ATTNPILOT_CHECK_ARG(
        in.k_proj.defined() || (in.a_k.defined() && in.a_k.sizes() == in.a_q.sizes()),
        "attention: a_k must have a_q's shape {} (or pass k_proj)", shape_str(in.a_q));
  }
  if (in.k_proj.defined()) {
    ATTNPILOT_CHECK_ARG(in.a_q.defined(), "attention: k_proj needs the query projection a_q");
    ATTNPILOT_CHECK_ARG(in.k_proj.dim() == 4 && in.k_proj.size(0) == s.B &&
                            in.k_proj.size(1) == s.Hq && in.k_proj.size(2) == s.M &&
                            in.k_proj.size(3) == in.a_q.size(3),
                        "attention: k_proj must be [B={}, Hq={}, M={}, R={}]; got {}", s.B, s.Hq,
                        s.M, in.a_q.size(3), shape_str(in.k_proj));
  }
  return s;
}

torch::Tensor expand_kv(const torch::Tensor& t, int64_t groups) {
  return groups == 1 ? t : t.repeat_interleave(groups, /*dim=*/1);
}

torch::Tensor index_tensor(const std::vector<int64_t>& v) { return torch::tensor(v, torch::kLong); }

/// t[bidx][:, hidx] ([nb, nh, ...]); whole tensor when both cover everything.
torch::Tensor take(const torch::Tensor& t, const std::vector<int64_t>& bidx,
                   const std::vector<int64_t>& hidx) {
  const bool all_b = static_cast<int64_t>(bidx.size()) == t.size(0);
  const bool all_h = static_cast<int64_t>(hidx.size()) == t.size(1);
  bool identity = all_b && all_h;
  for (size_t i = 0; identity && i < bidx.size(); ++i) identity = bidx[i] == int64_t(i);
  for (size_t i = 0; identity && i < hidx.size(); ++i) identity = hidx[i] == int64_t(i);
  if (identity) return t;
  const auto dev = t.device();
  return t.index_select(0, index_tensor(bidx).to(dev)).index_select(1, index_tensor(hidx).to(dev));
}

struct Group {
  std::vector<int64_t> batch;
  HeadPlan plan;
  std::vector<int64_t> heads;
};

std::vector<Group> make_groups(const std::vector<LayerPlan>& plans, const Shape& s) {
  std::vector<Group> groups;
  const int64_t sets = plans.size() == 1 ? 1 : s.B;
  for (int64_t si = 0; si < sets; ++si) {
    std::vector<int64_t> batch;
    if (plans.size() == 1)
      for (int64_t b = 0; b < s.B; ++b) batch.push_back(b);
    else
      batch.push_back(si);
    const size_t first = groups.size();
    for (int64_t h = 0; h < s.Hq; ++h) {
      const HeadPlan& hp = plans[si].head(h);
      size_t g = first;
      while (g < groups.size() && !(groups[g].plan == hp)) ++g;
      if (g == groups.size()) groups.push_back(Group{batch, hp, {}});
      groups[g].heads.push_back(h);
    }
  }
  return groups;
}

}  // namespace

torch::Tensor dense_reference(const AttentionInputs& in) {
  ATTNPILOT_CHECK_ARG(in.k.defined(), "dense_reference: needs full keys k");
  const Shape s = check_inputs(in);
  const auto k = expand_kv(in.k, s.Hq / s.Hkv);
  const auto v = expand_kv(in.v, s.Hq / s.Hkv);
  auto scores = torch::matmul(in.q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(s.d));
  if (in.causal) {
    auto qi = torch::arange(s.N, torch::kLong).unsqueeze(1) + s.q_offset;
    auto kj = torch::arange(s.M, torch::kLong).unsqueeze(0);
    scores =
        scores.masked_fill((kj > qi).to(scores.device()), -std::numeric_limits<float>::infinity());
  }
  return torch::matmul(torch::softmax(scores, -1), v);
}

AttentionResult run_attention(const AttentionInputs& in, const std::vector<LayerPlan>& plans) {
  const Shape s = check_inputs(in);
  const std::string where = in.layer >= 0 ? fmt::format("layer {}: ", in.layer) : std::string();
  ATTNPILOT_CHECK_ARG(plans.size() == 1 || static_cast<int64_t>(plans.size()) == s.B,
                      "attention: {}{} plans for a batch of {}; expected 1 or {}", where,
                      plans.size(), s.B, s.B);
  for (const auto& p : plans) p.validate(s.Hq, s.d, in.layer);
  if (in.block_mask) {
    ATTNPILOT_CHECK_ARG(in.block_mask->batch == s.B && in.block_mask->heads == s.Hq,
                        "attention: {}block mask covers {} x {} (batch x heads); expected {} x {}",
                        where, in.block_mask->batch, in.block_mask->heads, s.B, s.Hq);
    in.block_mask->validate(s.N, s.M, in.causal, s.q_offset);
  }
  const Backend& backend = backend_for(in.q.device());
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t kv_groups = s.Hq / s.Hkv;
  const double elt = static_cast<double>(in.q.element_size());
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.d));
  AttentionResult r;
  const auto groups = make_groups(plans, s);
  const bool single = groups.size() == 1;
  if (!single) r.out = torch::empty({s.B, s.Hq, s.N, s.dv}, in.v.options());
  for (const Group& g : groups) {
    const HeadPlan& hp = g.plan;
    const auto head_str = [&] {
      return fmt::format("{}heads [{}..] plan {}", where, g.heads.front(), hp.to_string());
    };
    ATTNPILOT_CHECK_ARG(in.k.defined() || hp.kind == Kind::kLowRank,
                        "attention: {} needs full keys, but only projected keys (k_proj) were "
                        "given",
                        head_str());
    ATTNPILOT_CHECK_ARG(hp.kind != Kind::kStreaming || in.causal,
                        "attention: {}: streaming needs causal attention", head_str());
    std::vector<int64_t> kv_heads;
    for (int64_t h : g.heads) kv_heads.push_back(h / kv_groups);
    std::vector<int64_t> unique_kv(kv_heads);
    unique_kv.erase(std::unique(unique_kv.begin(), unique_kv.end()), unique_kv.end());
    const double nb = static_cast<double>(g.batch.size());
    const double nh = static_cast<double>(g.heads.size());
    const double nkv = static_cast<double>(unique_kv.size());
    const auto q = take(in.q, g.batch, g.heads);
    const auto v = take(in.v, g.batch, kv_heads);
    const auto k = in.k.defined() ? take(in.k, g.batch, kv_heads) : torch::Tensor();
    double score_dim = static_cast<double>(s.d);
    double kv_bytes = 0;
    KernelOut ko;
    switch (hp.kind) {
      case Kind::kDense: {
        const bool all_visible = !in.causal || s.q_offset >= s.M - 1;
        const bool square = in.causal && s.q_offset == 0 && s.N == s.M;
        if (in.use_sdpa && (all_visible || square)) {
          ko = backend.sdpa(q, k, v, !all_visible);
        } else {
          ko = backend.attend(q, k, v, scale, in.causal, s.q_offset);
        }
        kv_bytes = nb * nkv * s.M * (s.d + s.dv);
        break;
      }
      case Kind::kLowRank: {
        const int64_t rank = hp.rank;
        torch::Tensor a_q, a_k;
        if (in.a_q.defined()) {
          ATTNPILOT_CHECK_ARG(in.a_q.size(3) >= rank,
                              "attention: {}: given projections have rank {} < {}", head_str(),
                              in.a_q.size(3), rank);
          std::vector<int64_t> pb(g.batch);
          if (in.a_q.size(0) == 1) std::fill(pb.begin(), pb.end(), 0);
          a_q = take(in.a_q, pb, g.heads).narrow(3, 0, rank);
          if (in.a_k.defined()) a_k = take(in.a_k, pb, g.heads).narrow(3, 0, rank);
        } else {
          ATTNPILOT_CHECK_ARG(k.defined(), "attention: {}: k_proj given without a_q", head_str());
          const auto p = lowrank_projections(q, k, rank);
          r.stats.other_flops += p.flops;
          a_q = p.a_q;
          a_k = p.a_k;
        }
        const auto qp = torch::matmul(q, a_q);
        r.stats.other_flops += 2.0 * nb * nh * s.N * s.d * rank;
        torch::Tensor kp;
        if (in.k_proj.defined()) {
          kp = take(in.k_proj, g.batch, g.heads).narrow(3, 0, rank);
          kv_bytes = nb * nh * s.M * rank + nb * nkv * s.M * s.dv;
        } else {
          kp = torch::matmul(k, a_k);
          r.stats.other_flops += 2.0 * nb * nh * s.M * s.d * rank;
          kv_bytes = nb * nkv * s.M * (s.d + s.dv) + 2.0 * nb * nh * s.M * rank;
        }
        ko = backend.attend(qp, kp, v, scale, in.causal, s.q_offset);
        score_dim = static_cast<double>(rank);
        break;
      }
      case Kind::kBlockSparse: {
        BlockMask mask;
        if (in.block_mask) {
          mask = in.block_mask->select(g.batch, g.heads);
        } else {
          torch::Tensor a_q, a_k;
          if (hp.estimator == BlockEstimator::kLowRank && in.a_q.defined() && in.a_k.defined() &&
              in.a_q.size(3) >= hp.rank) {
            std::vector<int64_t> pb(g.batch);
            if (in.a_q.size(0) == 1) std::fill(pb.begin(), pb.end(), 0);
            a_q = take(in.a_q, pb, g.heads);
            a_k = take(in.a_k, pb, g.heads);
          }
          mask =
              estimate_block_mask(q, k, hp, in.causal, s.q_offset, &r.stats.other_flops, a_q, a_k);
        }
        ko = backend.block_sparse(q, k, v, mask, scale, in.causal, s.q_offset, 0, 0);
        kv_bytes = mask.listed_keys(s.M) * (s.d + s.dv);
        break;
      }
      case Kind::kStreaming: {
        const auto mask = streaming_block_mask(static_cast<int64_t>(g.batch.size()),
                                               static_cast<int64_t>(g.heads.size()), s.N, s.M,
                                               hp.block_size, s.q_offset, hp.sinks, hp.window);
        ko = backend.block_sparse(q, k, v, mask, scale, in.causal, s.q_offset, hp.sinks, hp.window);
        kv_bytes = mask.listed_keys(s.M) * (s.d + s.dv);
        break;
      }
    }
    r.stats.score_flops += 2.0 * ko.pairs * score_dim;
    r.stats.value_flops += 2.0 * ko.pairs * s.dv;
    r.stats.bytes += elt * (nb * nh * s.N * (s.d + s.dv) + kv_bytes);
    if (single) {
      r.out = ko.out;
    } else {
      const auto dev = r.out.device();
      r.out.index_put_({index_tensor(g.batch).to(dev).view({-1, 1}),
                        index_tensor(g.heads).to(dev).view({1, -1})},
                       ko.out);
    }
  }
  r.stats.time_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  r.stats.calls = 1;
  return r;
}

}  // namespace attnpilot::attention
