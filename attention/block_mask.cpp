#include "attention/block_mask.h"

#include <algorithm>

#include "common/error.h"

namespace attnpilot::attention {

BlockMask BlockMask::from_rows(int64_t batch, int64_t heads, int64_t q_blocks, int64_t k_blocks,
                               int64_t block_size, const std::vector<std::vector<int64_t>>& rows) {
  ATTNPILOT_CHECK_ARG(static_cast<int64_t>(rows.size()) == batch * heads * q_blocks,
                      "block mask: {} rows given; expected batch {} x heads {} x q_blocks {}",
                      rows.size(), batch, heads, q_blocks);
  BlockMask m;
  m.batch = batch;
  m.heads = heads;
  m.q_blocks = q_blocks;
  m.k_blocks = k_blocks;
  m.block_size = block_size;
  std::vector<int64_t> ptr(rows.size() + 1, 0), col;
  for (size_t r = 0; r < rows.size(); ++r) {
    ptr[r + 1] = ptr[r] + static_cast<int64_t>(rows[r].size());
    col.insert(col.end(), rows[r].begin(), rows[r].end());
  }
  m.row_ptr = torch::tensor(ptr, torch::kLong);
  m.col_idx = torch::tensor(col, torch::kLong);
  if (col.empty()) m.col_idx = torch::empty({0}, torch::kLong);
  return m;
}

BlockMask BlockMask::all_visible(int64_t batch, int64_t heads, int64_t n, int64_t m,
                                 int64_t block_size, bool causal, int64_t q_offset) {
  const int64_t qb_n = ceil_div(n, block_size), kb_n = ceil_div(m, block_size);
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(batch * heads * qb_n);
  for (int64_t bh = 0; bh < batch * heads; ++bh)
    for (int64_t qb = 0; qb < qb_n; ++qb) {
      const int64_t last_q = q_offset + std::min(n, (qb + 1) * block_size) - 1;
      const int64_t hi = causal ? std::min(kb_n, last_q / block_size + 1) : kb_n;
      std::vector<int64_t> r(hi);
      for (int64_t kb = 0; kb < hi; ++kb) r[kb] = kb;
      rows.push_back(std::move(r));
    }
  return from_rows(batch, heads, qb_n, kb_n, block_size, rows);
}

void BlockMask::validate(int64_t n, int64_t m, bool causal, int64_t q_offset) const {
  ATTNPILOT_CHECK_ARG(block_size >= 1, "block mask: block_size {} must be >= 1", block_size);
  ATTNPILOT_CHECK_ARG(q_blocks == ceil_div(n, block_size) && k_blocks == ceil_div(m, block_size),
                      "block mask: {} x {} blocks of {} do not fit {} queries x {} keys "
                      "(expected {} x {})",
                      q_blocks, k_blocks, block_size, n, m, ceil_div(n, block_size),
                      ceil_div(m, block_size));
  ATTNPILOT_CHECK_ARG(
      row_ptr.defined() && col_idx.defined() && row_ptr.scalar_type() == torch::kLong &&
          col_idx.scalar_type() == torch::kLong && row_ptr.dim() == 1 && col_idx.dim() == 1,
      "block mask: row_ptr and col_idx must be 1-D int64 tensors");
  ATTNPILOT_CHECK_ARG(row_ptr.numel() == rows() + 1,
                      "block mask: row_ptr has {} entries; expected rows+1 = {}", row_ptr.numel(),
                      rows() + 1);
  if (!row_ptr.device().is_cpu()) return on_host().validate(n, m, causal, q_offset);
  const auto ptr = row_ptr.contiguous().cpu();
  const auto col = col_idx.contiguous().cpu();
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  ATTNPILOT_CHECK_ARG(p[0] == 0 && p[rows()] == col.numel(),
                      "block mask: row_ptr must start at 0 and end at nnz {} (got {} .. {})",
                      col.numel(), p[0], p[rows()]);
  for (int64_t r = 0; r < rows(); ++r) {
    ATTNPILOT_CHECK_ARG(p[r + 1] >= p[r], "block mask: row_ptr decreases at row {} ({} -> {})", r,
                        p[r], p[r + 1]);
    const int64_t qb = r % q_blocks;
    const int64_t first_q = q_offset + qb * block_size;
    bool covers = false;
    for (int64_t e = p[r]; e < p[r + 1]; ++e) {
      ATTNPILOT_CHECK_ARG(c[e] >= 0 && c[e] < k_blocks,
                          "block mask: row {} lists key block {}; expected [0, {})", r, c[e],
                          k_blocks);
      ATTNPILOT_CHECK_ARG(e == p[r] || c[e] > c[e - 1],
                          "block mask: row {} key blocks not ascending/unique ({} after {})", r,
                          c[e], c[e - 1]);
      if (!causal || c[e] * block_size <= first_q) covers = true;
    }
    ATTNPILOT_CHECK_ARG(covers,
                        "block mask: row {} (query block {}) lists no key block its first query "
                        "(position {}) can see; every query needs at least one key",
                        r, qb, first_q);
  }
}

BlockMask BlockMask::select(const std::vector<int64_t>& batch_idx,
                            const std::vector<int64_t>& head_idx) const {
  if (!row_ptr.device().is_cpu()) return on_host().select(batch_idx, head_idx);
  std::vector<std::vector<int64_t>> rows;
  for (int64_t b : batch_idx)
    for (int64_t h : head_idx) {
      ATTNPILOT_CHECK_ARG(b >= 0 && b < batch && h >= 0 && h < heads,
                          "block mask: (batch {}, head {}) outside {} x {}", b, h, batch, heads);
      for (int64_t qb = 0; qb < q_blocks; ++qb) rows.push_back(row(b, h, qb));
    }
  return from_rows(static_cast<int64_t>(batch_idx.size()), static_cast<int64_t>(head_idx.size()),
                   q_blocks, k_blocks, block_size, rows);
}

std::vector<int64_t> BlockMask::row(int64_t b, int64_t h, int64_t qb) const {
  if (!row_ptr.device().is_cpu()) return on_host().row(b, h, qb);
  const int64_t r = (b * heads + h) * q_blocks + qb;
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t* c = col_idx.data_ptr<int64_t>();
  return std::vector<int64_t>(c + p[r], c + p[r + 1]);
}

BlockMask BlockMask::on_host() const {
  if (row_ptr.device().is_cpu() && col_idx.device().is_cpu()) return *this;
  BlockMask h = *this;
  h.row_ptr = row_ptr.to(torch::kCPU).contiguous();
  const int64_t nnz = h.row_ptr[rows()].item<int64_t>();
  ATTNPILOT_CHECK_ARG(nnz >= 0 && nnz <= col_idx.numel(),
                      "block mask: row_ptr ends at {}, outside col_idx's {} entries", nnz,
                      col_idx.numel());
  h.col_idx = col_idx.narrow(0, 0, nnz).to(torch::kCPU).contiguous();
  return h;
}

namespace {
/// Keys each listed entry covers (clipped to m; 0 for the unused entries of device lists) and,
/// when n > 0, times the rows of its query block: the device form of listed_pairs/listed_keys.
double device_listed_sum(const BlockMask& mk, int64_t n, int64_t m) {
  const auto dev = mk.col_idx.device();
  const auto lopt = torch::TensorOptions().dtype(torch::kLong).device(dev);
  const int64_t bs = mk.block_size;
  const auto ptr = mk.row_ptr.to(dev, torch::kLong).contiguous();
  const auto col = mk.col_idx.to(torch::kLong);
  const auto e = torch::arange(col.numel(), lopt);
  const auto used = (e < ptr.narrow(0, mk.rows(), 1)) & (col >= 0);
  auto keys = (torch::clamp_max((col + 1) * bs, m) - col * bs).clamp_min(0) * used;
  if (n > 0) {
    const auto row = torch::searchsorted(ptr, e, /*out_int32=*/false, /*right=*/true) - 1;
    const auto qb = row.remainder(mk.q_blocks);
    keys = keys * (torch::clamp_max((qb + 1) * bs, n) - qb * bs).clamp_min(0);
  }
  return keys.sum().to(torch::kDouble).item<double>();
}
}  // namespace

double BlockMask::listed_keys(int64_t m) const {
  if (!col_idx.device().is_cpu()) return device_listed_sum(*this, 0, m);
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t* c = col_idx.data_ptr<int64_t>();
  double keys = 0;
  for (int64_t e = 0; e < p[rows()]; ++e)
    keys += std::min(m, (c[e] + 1) * block_size) - c[e] * block_size;
  return keys;
}

double BlockMask::listed_pairs(int64_t n, int64_t m) const {
  if (!col_idx.device().is_cpu()) return device_listed_sum(*this, n, m);
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t* c = col_idx.data_ptr<int64_t>();
  double pairs = 0;
  for (int64_t r = 0; r < rows(); ++r) {
    const int64_t qb = r % q_blocks;
    const int64_t q_rows = std::min(n, (qb + 1) * block_size) - qb * block_size;
    for (int64_t e = p[r]; e < p[r + 1]; ++e)
      pairs +=
          static_cast<double>(q_rows) * (std::min(m, (c[e] + 1) * block_size) - c[e] * block_size);
  }
  return pairs;
}

double BlockMask::density(int64_t n, int64_t m, bool causal, int64_t q_offset) const {
  const auto all = all_visible(batch, heads, n, m, block_size, causal, q_offset);
  return all.nnz() == 0 ? 1.0 : static_cast<double>(nnz()) / all.nnz();
}

BlockMask streaming_block_mask(int64_t batch, int64_t heads, int64_t n, int64_t m,
                               int64_t block_size, int64_t q_offset, int64_t sinks,
                               int64_t window) {
  ATTNPILOT_CHECK_ARG(window >= 1 && sinks >= 0, "streaming mask: window {} >= 1, sinks {} >= 0",
                      window, sinks);
  const int64_t qb_n = ceil_div(n, block_size), kb_n = ceil_div(m, block_size);
  std::vector<std::vector<int64_t>> one(qb_n);
  for (int64_t qb = 0; qb < qb_n; ++qb) {
    const int64_t first_q = q_offset + qb * block_size;
    const int64_t last_q = q_offset + std::min(n, (qb + 1) * block_size) - 1;
    const int64_t last_kb = std::min(kb_n - 1, last_q / block_size);
    const int64_t sink_hi = std::min(ceil_div(std::min(sinks, m), block_size), last_kb + 1);
    const int64_t win_lo = std::max<int64_t>(0, first_q - window + 1) / block_size;
    auto& r = one[qb];
    for (int64_t kb = 0; kb < sink_hi; ++kb) r.push_back(kb);
    for (int64_t kb = std::max(win_lo, sink_hi); kb <= last_kb; ++kb) r.push_back(kb);
  }
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(batch * heads * qb_n);
  for (int64_t bh = 0; bh < batch * heads; ++bh) rows.insert(rows.end(), one.begin(), one.end());
  return BlockMask::from_rows(batch, heads, qb_n, kb_n, block_size, rows);
}

}  // namespace attnpilot::attention
