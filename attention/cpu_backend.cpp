#include <algorithm>
#include <limits>

#include "attention/backend.h"
#include "common/error.h"

namespace attnpilot::attention {
namespace {

constexpr int64_t kQueryChunk = 128;

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  KernelOut sdpa(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                 bool causal) const override {
    KernelOut r;
    r.out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal);
    const double n = q.size(2), m = k.size(2);
    r.pairs = static_cast<double>(q.size(0)) * q.size(1) * (causal ? n * (n + 1) / 2 : n * m);
    return r;
  }

  KernelOut attend(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                   double scale, bool causal, int64_t q_offset) const override {
    const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2);
    KernelOut r;
    r.out = torch::empty({b, h, n, v.size(3)}, v.options());
    const auto qs = q * scale;
    // [b, h, e, M]; made contiguous only when several chunks reuse it (a decode step's single
    // chunk reads the transposed view directly instead of copying every key).
    const auto kt = n > kQueryChunk ? k.transpose(-2, -1).contiguous() : k.transpose(-2, -1);
    // Additive causal mask for the chunk's own diagonal square: only the last `rows` keys of
    // a chunk can lie in a query's future (kend = q_offset + i0 + rows).
    const auto tri = torch::full({kQueryChunk, kQueryChunk},
                                 -std::numeric_limits<float>::infinity(), q.options())
                         .triu(1);
    for (int64_t i0 = 0; i0 < n; i0 += kQueryChunk) {
      const int64_t rows = std::min(kQueryChunk, n - i0);
      const int64_t kend = causal ? std::min(m, q_offset + i0 + rows) : m;
      auto s = torch::matmul(qs.narrow(2, i0, rows), kt.narrow(3, 0, kend));
      if (causal && rows > 1)
        s.narrow(3, kend - rows, rows).add_(tri.narrow(0, 0, rows).narrow(1, 0, rows));
      r.out.narrow(2, i0, rows).copy_(torch::matmul(torch::softmax(s, -1), v.narrow(2, 0, kend)));
      r.pairs += static_cast<double>(b) * h * rows * kend;
    }
    return r;
  }

  KernelOut block_sparse(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                         const BlockMask& mask, double scale, bool causal, int64_t q_offset,
                         int64_t sinks, int64_t window) const override {
    const int64_t b = q.size(0), h = q.size(1), n = q.size(2), m = k.size(2);
    const int64_t d = q.size(3), dv = v.size(3), bs = mask.block_size;
    TORCH_INTERNAL_ASSERT(mask.batch == b && mask.heads == h);
    KernelOut r;
    r.out = torch::empty({b, h, n, dv}, v.options());
    const int64_t* ptr = mask.row_ptr.data_ptr<int64_t>();
    const int64_t* col = mask.col_idx.data_ptr<int64_t>();
    const auto qs = q * scale;
    for (int64_t bi = 0; bi < b; ++bi) {
      for (int64_t qb = 0; qb < mask.q_blocks; ++qb) {
        const int64_t i0 = qb * bs, rows = std::min(bs, n - i0);
        // Gather every head's listed key positions, padded to the longest list.
        int64_t max_keys = 0;
        std::vector<int64_t> counts(h);
        for (int64_t hi = 0; hi < h; ++hi) {
          const int64_t row = (bi * h + hi) * mask.q_blocks + qb;
          int64_t c = 0;
          for (int64_t e = ptr[row]; e < ptr[row + 1]; ++e)
            c += std::min(m, (col[e] + 1) * bs) - col[e] * bs;
          counts[hi] = c;
          max_keys = std::max(max_keys, c);
        }
        // Listed key positions per head (padded with position 0) and an additive mask:
        // -inf for padding, future keys (causal) and keys left of the streaming window. Only
        // the columns that can be masked are visited: padding, keys after the block's first
        // query, and non-sink keys at or before its last query minus the window.
        auto pos = torch::zeros({h, max_keys}, torch::kLong);
        auto bias = torch::zeros({h, rows, max_keys}, torch::kFloat);
        auto pa = pos.accessor<int64_t, 2>();
        auto ba = bias.accessor<float, 3>();
        const float ninf = -std::numeric_limits<float>::infinity();
        const int64_t q_first = q_offset + i0, q_last = q_first + rows - 1;
        for (int64_t hi = 0; hi < h; ++hi) {
          const int64_t row = (bi * h + hi) * mask.q_blocks + qb;
          int64_t t = 0;
          for (int64_t e = ptr[row]; e < ptr[row + 1]; ++e)
            for (int64_t j = col[e] * bs; j < std::min(m, (col[e] + 1) * bs); ++j, ++t) {
              pa[hi][t] = j;
              const bool future = causal && j > q_first;
              const bool old = window > 0 && j >= sinks && j <= q_last - window;
              if (!future && !old) continue;
              for (int64_t i = 0; i < rows; ++i) {
                const int64_t qp = q_first + i;
                if ((causal && j > qp) || (window > 0 && j >= sinks && j <= qp - window))
                  ba[hi][i][t] = ninf;
              }
            }
          for (; t < max_keys; ++t)
            for (int64_t i = 0; i < rows; ++i) ba[hi][i][t] = ninf;
          r.pairs += static_cast<double>(rows) * counts[hi];
        }
        const auto pos_d = pos.to(q.device());
        const auto kg = k[bi].gather(1, pos_d.unsqueeze(-1).expand({h, max_keys, d}));
        const auto vg = v[bi].gather(1, pos_d.unsqueeze(-1).expand({h, max_keys, dv}));
        auto s = torch::matmul(qs[bi].narrow(1, i0, rows), kg.transpose(-2, -1));  // [h,rows,K]
        s.add_(bias.to(s.device(), s.scalar_type()));
        auto p = torch::softmax(s, -1);
        // A query that sees no listed key (every score -inf) gets zeros, as from the CUDA
        // kernel, not softmax's NaN; a NaN score (bad input) still propagates.
        if (max_keys > 0) p.masked_fill_(std::get<0>(s.max(-1, true)) == ninf, 0.0);
        r.out[bi].narrow(1, i0, rows).copy_(torch::matmul(p, vg));
      }
    }
    return r;
  }
};

}  // namespace

#ifdef ATTNPILOT_WITH_CUDA
/// The CUDA backend (attention/cuda/cuda_backend.cpp).
const Backend& cuda_backend();
#endif

const Backend& backend_for(const torch::Device& device) {
  static const CpuBackend cpu;
  if (device.is_cpu()) return cpu;
#ifdef ATTNPILOT_WITH_CUDA
  if (device.is_cuda()) return cuda_backend();
  throw Unavailable(
      fmt::format("attention: no backend for device {} (this build has the CPU and CUDA backends)",
                  device.str()));
#else
  throw Unavailable(fmt::format(
      "attention: no backend for device {} (only the CPU backend is built; CUDA attention "
      "kernels are a separate issue)",
      device.str()));
#endif
}

}  // namespace attnpilot::attention
