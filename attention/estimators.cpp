#include "attention/estimators.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "attention/lowrank.h"
#include "common/error.h"
#ifdef ATTNPILOT_WITH_CUDA
#include "attention/cuda/cuda_estimator.h"
#endif

namespace attnpilot::attention {
namespace {

constexpr int64_t kVerticalSlashQueries = 64;
constexpr int64_t kLowRankSampleRows = 8;

/// Last visible key block of each query block [q_blocks] (int64 on `device`): causal, the block
/// holding the query block's last query (clamped to the keys); else k_blocks - 1.
torch::Tensor last_visible_block(int64_t n, int64_t m, int64_t bs, bool causal, int64_t q_offset,
                                 torch::Device device = torch::kCPU) {
  const int64_t qb_n = ceil_div(n, bs), kb_n = ceil_div(m, bs);
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(device);
  if (!causal) return torch::full({qb_n}, kb_n - 1, lopt);
  const auto last_q = (torch::arange(1, qb_n + 1, lopt) * bs).clamp_max(n) + (q_offset - 1);
  return torch::floor_divide(last_q, bs).clamp_max(kb_n - 1);
}

/// Sums x [..., L] over consecutive groups of bs along the last dim (zero-padded).
torch::Tensor block_sum(const torch::Tensor& x, int64_t bs, int64_t blocks) {
  const int64_t pad = blocks * bs - x.size(-1);
  auto y = pad > 0 ? torch::constant_pad_nd(x, {0, pad}) : x;
  auto sizes = y.sizes().vec();
  sizes.back() = blocks;
  sizes.push_back(bs);
  return y.reshape(sizes).sum(-1);
}

}  // namespace

torch::Tensor pooled_block_scores(const torch::Tensor& q, const torch::Tensor& k,
                                  int64_t block_size, bool causal, int64_t q_offset,
                                  double* flops) {
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2), d = q.size(3);
  const int64_t qb_n = ceil_div(n, block_size), kb_n = ceil_div(m, block_size);
  // Block means in fp32, one contiguous pass over x (blocks of rows reduced in place; the last
  // block may be short: zero rows pad it and its count is its length).
  auto pool = [&](const torch::Tensor& x, int64_t len, int64_t blocks) {
    const int64_t pad = blocks * block_size - len;
    const auto y = pad > 0 ? torch::constant_pad_nd(x, {0, 0, 0, pad}) : x;
    const auto sums = y.reshape({x.size(0), x.size(1), blocks, block_size, d})
                          .sum(3, /*keepdim=*/false, torch::kFloat);  // [b,h,blocks,d]
    auto counts =
        torch::full({blocks, 1}, static_cast<double>(block_size), x.options().dtype(torch::kFloat));
    if (pad > 0) counts[blocks - 1].fill_(static_cast<double>(block_size - pad));
    return sums / counts;
  };
  auto s = torch::matmul(pool(q, n, qb_n), pool(k, m, kb_n).transpose(-2, -1)) /
           std::sqrt(static_cast<double>(d));
  if (causal) {  // computed on s's device: a host-to-device copy would synchronise
    const auto last = last_visible_block(n, m, block_size, true, q_offset, s.device());
    const auto kb = torch::arange(kb_n, last.options());
    s.masked_fill_(kb.unsqueeze(0) > last.unsqueeze(1), -std::numeric_limits<float>::infinity());
  }
  *flops += static_cast<double>(b) * h * ((n + m) * d + 2.0 * qb_n * kb_n * d);
  return torch::softmax(s, -1);
}

torch::Tensor lowrank_block_scores(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& a_q, const torch::Tensor& a_k,
                                   int64_t block_size, bool causal, int64_t q_offset, double* flops,
                                   bool pool_queries) {
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2), d = q.size(3);
  const int64_t r = a_q.size(-1);
  const int64_t qb_n = ceil_div(n, block_size), kb_n = ceil_div(m, block_size);
  const auto qp = torch::matmul(q, a_q) / std::sqrt(static_cast<double>(d));
  const auto kp = torch::matmul(k, a_k);
  *flops += 2.0 * b * h * (n + m) * d * r;
  auto scores = torch::zeros({b, h, qb_n, kb_n}, q.options());
  for (int64_t qb = 0; qb < qb_n; ++qb) {
    const int64_t i0 = qb * block_size, rows = std::min(block_size, n - i0);
    const int64_t kend = causal ? std::min(m, q_offset + i0 + rows) : m;
    const int64_t vis = ceil_div(kend, block_size);
    if (pool_queries) {  // one row: the block's mean projected query, seeing keys < kend
      const auto pq = qp.narrow(2, i0, rows).mean(2, /*keepdim=*/true);           // [b,h,1,r]
      const auto s = torch::matmul(pq, kp.narrow(2, 0, kend).transpose(-2, -1));  // [b,h,1,kend]
      const auto mass = torch::softmax(s, -1).squeeze(2);                         // [b,h,kend]
      scores.narrow(3, 0, vis).narrow(2, qb, 1).copy_(
          block_sum(mass, block_size, vis).unsqueeze(2));
      *flops += static_cast<double>(b) * h * kend * (2.0 * r + 1.0);
      continue;
    }
    // Up to kLowRankSampleRows evenly spaced rows of the block, the last one included.
    const int64_t ns = std::min(kLowRankSampleRows, rows);
    std::vector<int64_t> sample(ns);
    for (int64_t t = 0; t < ns; ++t) sample[t] = rows - 1 - (t * rows) / ns;
    const auto sidx = torch::tensor(sample, torch::kLong);
    auto s = torch::matmul(qp.narrow(2, i0, rows).index_select(2, sidx.to(qp.device())),
                           kp.narrow(2, 0, kend).transpose(-2, -1));  // [b,h,ns,kend]
    if (causal) {
      const auto qi = sidx + (q_offset + i0);
      const auto kj = torch::arange(kend, torch::kLong);
      s.masked_fill_((kj.unsqueeze(0) > qi.unsqueeze(1)).to(s.device()),
                     -std::numeric_limits<float>::infinity());
    }
    const auto mass = torch::softmax(s, -1).sum(2) / static_cast<double>(ns);  // [b,h,kend]
    scores.narrow(3, 0, vis).narrow(2, qb, 1).copy_(block_sum(mass, block_size, vis).unsqueeze(2));
    *flops += static_cast<double>(b) * h * ns * kend * (2.0 * r + 1.0);
  }
  return scores;
}

torch::Tensor vertical_slash_block_scores(const torch::Tensor& q, const torch::Tensor& k,
                                          int64_t block_size, int64_t q_offset, double* flops) {
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2), d = q.size(3);
  const int64_t qb_n = ceil_div(n, block_size), kb_n = ceil_div(m, block_size);
  const int64_t nl = std::min(kVerticalSlashQueries, n);
  const int64_t p_len = q_offset + n;  // offsets o = p - j lie in [0, p_len)
  // Attention of the last nl queries.
  auto s = torch::matmul(q.narrow(2, n - nl, nl), k.transpose(-2, -1)) /
           std::sqrt(static_cast<double>(d));
  const auto qpos = torch::arange(q_offset + n - nl, q_offset + n, torch::kLong);
  const auto kj = torch::arange(m, torch::kLong);
  const auto future = kj.unsqueeze(0) > qpos.unsqueeze(1);  // [nl, m]
  s.masked_fill_(future.to(s.device()), -std::numeric_limits<float>::infinity());
  const auto a = torch::softmax(s, -1);                  // [b,h,nl,m]
  const auto vert = a.sum(2) / static_cast<double>(nl);  // [b,h,m]
  // Slash weights by diagonal offset o = p - j.
  const auto off = (qpos.unsqueeze(1) - kj.unsqueeze(0)).clamp_min(0).reshape({1, 1, nl * m});
  auto slash = torch::zeros({b, h, p_len}, a.options());
  slash.scatter_add_(-1, off.expand({b, h, nl * m}).to(a.device()),
                     a.masked_fill(future.to(a.device()), 0).reshape({b, h, nl * m}));
  slash /= static_cast<double>(nl);
  // T(x) = Σ_{y<=x} Σ_{o<=y} slash[o]; block (qb, kb) slash mass via four lookups.
  const auto t = slash.cumsum(-1).cumsum(-1);
  auto lookup = [&](const torch::Tensor& x) {  // x [qb_n, kb_n], T(x < 0) = 0
    const auto idx = x.clamp(0, p_len - 1).reshape({1, 1, -1}).expand({b, h, x.numel()});
    auto v = t.gather(-1, idx.to(t.device())).reshape({b, h, qb_n, kb_n});
    return v * (x >= 0).to(v.device()).to(v.scalar_type());
  };
  auto qb_i = torch::arange(qb_n, torch::kLong).unsqueeze(1);
  auto kb_i = torch::arange(kb_n, torch::kLong).unsqueeze(0);
  const auto p0 = (q_offset + qb_i * block_size).expand({qb_n, kb_n});
  const auto p1 = (q_offset + torch::clamp_max((qb_i + 1) * block_size, n)).expand({qb_n, kb_n});
  const auto k0 = (kb_i * block_size).expand({qb_n, kb_n});
  const auto k1 = torch::clamp_max((kb_i + 1) * block_size, m).expand({qb_n, kb_n});
  const auto slash_blk =
      lookup(p1 - 1 - k0) - lookup(p0 - 1 - k0) - lookup(p1 - 1 - k1) + lookup(p0 - 1 - k1);
  const auto rows = (p1 - p0).to(a.scalar_type()).to(a.device());
  const auto vert_blk = block_sum(vert, block_size, kb_n).unsqueeze(2);  // [b,h,1,kb_n]
  auto scores = (vert_blk + slash_blk / rows) / 2.0;
  const auto last = last_visible_block(n, m, block_size, true, q_offset);
  scores.masked_fill_((kb_i > last.unsqueeze(1)).to(scores.device()), 0.0);
  *flops += static_cast<double>(b) * h *
            (2.0 * nl * m * d + 2.0 * nl * m + 2.0 * p_len + 8.0 * qb_n * kb_n);
  return scores;
}

BlockMask select_blocks(const torch::Tensor& scores, const HeadPlan& plan, int64_t n, int64_t m,
                        bool causal, int64_t q_offset) {
  const int64_t bs = plan.block_size;
  const int64_t b = scores.size(0), h = scores.size(1), qb_n = scores.size(2),
                kb_n = scores.size(3);
  const auto sc = scores.to(torch::kCPU, torch::kDouble).contiguous();
  const auto acc = sc.accessor<double, 4>();
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(b * h * qb_n);
  std::vector<char> chosen(kb_n);
  std::vector<int64_t> order(kb_n);
  for (int64_t bi = 0; bi < b; ++bi)
    for (int64_t hi = 0; hi < h; ++hi)
      for (int64_t qb = 0; qb < qb_n; ++qb) {
        const int64_t first_q = q_offset + qb * bs;
        const int64_t last_q = q_offset + std::min(n, (qb + 1) * bs) - 1;
        const int64_t vis = causal ? std::min(kb_n, last_q / bs + 1) : kb_n;
        std::fill(chosen.begin(), chosen.end(), 0);
        int64_t count = 0;
        double mass = 0, total = 0;
        auto take = [&](int64_t kb) {
          if (kb < 0 || kb >= vis || chosen[kb]) return;
          chosen[kb] = 1;
          ++count;
          mass += acc[bi][hi][qb][kb];
        };
        for (int64_t kb = 0; kb < vis; ++kb) total += acc[bi][hi][qb][kb];
        take(0);
        for (int64_t kb = std::min(first_q, m - 1) / bs; kb <= std::min(last_q, m - 1) / bs; ++kb)
          take(kb);
        order.resize(vis);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
          return acc[bi][hi][qb][x] > acc[bi][hi][qb][y];
        });
        int64_t budget = vis;
        if (plan.gamma <= 0)
          budget = plan.top_k > 0 ? plan.top_k
                                  : static_cast<int64_t>(std::ceil(plan.density * vis - 1e-9));
        for (int64_t kb : order) {
          if (plan.gamma > 0 ? mass >= plan.gamma * total : count >= budget) break;
          take(kb);
        }
        std::vector<int64_t> r;
        for (int64_t kb = 0; kb < vis; ++kb)
          if (chosen[kb]) r.push_back(kb);
        rows.push_back(std::move(r));
      }
  return BlockMask::from_rows(b, h, qb_n, kb_n, bs, rows);
}

BlockMask estimate_block_mask(const torch::Tensor& q, const torch::Tensor& k, const HeadPlan& plan,
                              bool causal, int64_t q_offset, double* flops,
                              const torch::Tensor& a_q, const torch::Tensor& a_k) {
  const int64_t n = q.size(2), m = k.size(2), bs = plan.block_size;
  const bool everything = plan.gamma <= 0 && plan.top_k <= 0 && plan.density >= 1.0;
  if (everything) {  // density 1 keeps every visible block; no estimate needed
    BlockMask all = BlockMask::all_visible(q.size(0), q.size(1), n, m, bs, causal, q_offset);
    if (q.is_cuda()) {  // masks of CUDA inputs live on their device, as the estimators' do
      all.row_ptr = all.row_ptr.to(q.device());
      all.col_idx = all.col_idx.to(q.device());
    }
    return all;
  }
  torch::Tensor scores;
  switch (plan.estimator) {
    case BlockEstimator::kPooled:
      scores = pooled_block_scores(q, k, bs, causal, q_offset, flops);
      break;
    case BlockEstimator::kLowRank: {
      // Given projections (their first plan.rank columns), or optimal ones for this call.
      torch::Tensor pq = a_q, pk = a_k;
      if (pq.defined()) {
        ATTNPILOT_CHECK_ARG(pq.size(-1) >= plan.rank,
                            "lowrank estimator: projections have rank {} < plan rank {}",
                            pq.size(-1), plan.rank);
        pq = pq.narrow(-1, 0, plan.rank);
        pk = pk.narrow(-1, 0, plan.rank);
      } else {
        const auto p = lowrank_projections(q, k, plan.rank);
        *flops += p.flops;
        pq = p.a_q;
        pk = p.a_k;
      }
#ifdef ATTNPILOT_WITH_CUDA
      // CUDA tensors: the GPU twin (cuda/cuda_estimator.h) scores (sampled rows or pooled
      // queries, as the plan says), selects and writes the lists on the device; the returned
      // mask's row_ptr / col_idx are CUDA tensors.
      if (cuda_estimator_handles(q, k, plan.rank, bs))
        return estimate_block_mask_cuda(q, k, pq, pk, plan, causal, q_offset, flops);
#endif
      scores = lowrank_block_scores(q, k, pq, pk, bs, causal, q_offset, flops, plan.pool_queries);
      break;
    }
    case BlockEstimator::kVerticalSlash:
      ATTNPILOT_CHECK_ARG(causal, "vertical_slash estimator needs causal attention");
      scores = vertical_slash_block_scores(q, k, bs, q_offset, flops);
      break;
  }
#ifdef ATTNPILOT_WITH_CUDA
  // Scores computed on the GPU (the pooled and vertical-slash estimators' LibTorch code) are
  // selected there too: the lists stay on the device, no host round trip.
  if (cuda_select_handles(scores)) return select_blocks_cuda(scores, plan, n, m, causal, q_offset);
#endif
  return select_blocks(scores, plan, n, m, causal, q_offset);
}

}  // namespace attnpilot::attention
