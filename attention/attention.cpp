#include "attention/attention.h"

#include <chrono>

#include "common/error.h"

namespace attnpilot::attention {
namespace {

struct Shape {
  int64_t B, Hq, Hkv, N, M, d, dv, q_offset;
};

Shape check_inputs(const AttentionInputs& in) {
  ATTNPILOT_CHECK_ARG(in.q.defined() && in.k.defined() && in.v.defined(),
                      "attention: q, k and v must all be defined");
  ATTNPILOT_CHECK_ARG(in.q.dim() == 4 && in.k.dim() == 4 && in.v.dim() == 4,
                      "attention: q, k, v must be 4-D [B, H, L, d]; got {}-D, {}-D, {}-D",
                      in.q.dim(), in.k.dim(), in.v.dim());
  Shape s{in.q.size(0), in.q.size(1), in.k.size(1), in.q.size(2),
          in.k.size(2), in.q.size(3), in.v.size(3), 0};
  ATTNPILOT_CHECK_ARG(in.k.size(0) == s.B && in.v.size(0) == s.B,
                      "attention: batch sizes differ (q {}, k {}, v {})", s.B, in.k.size(0),
                      in.v.size(0));
  ATTNPILOT_CHECK_ARG(in.k.size(3) == s.d, "attention: key dim {} != query dim {}", in.k.size(3),
                      s.d);
  ATTNPILOT_CHECK_ARG(in.v.size(1) == s.Hkv && in.v.size(2) == s.M,
                      "attention: v shape [{}, {}] != k shape [{}, {}] in heads/length",
                      in.v.size(1), in.v.size(2), s.Hkv, s.M);
  ATTNPILOT_CHECK_ARG(s.Hkv > 0 && s.Hq % s.Hkv == 0,
                      "attention: query heads {} must be a multiple of key/value heads {}", s.Hq,
                      s.Hkv);
  s.q_offset = in.q_offset < 0 ? s.M - s.N : in.q_offset;
  ATTNPILOT_CHECK_ARG(!in.causal || s.q_offset + s.N <= s.M,
                      "attention: q_offset {} + N {} exceeds key length {}", s.q_offset, s.N, s.M);
  return s;
}

torch::Tensor expand_kv(const torch::Tensor& t, int64_t groups) {
  return groups == 1 ? t : t.repeat_interleave(groups, /*dim=*/1);
}

}  // namespace

torch::Tensor dense_reference(const AttentionInputs& in) {
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
  ATTNPILOT_CHECK_ARG(plans.size() == 1 || static_cast<int64_t>(plans.size()) == s.B,
                      "attention: {} plans for a batch of {}; expected 1 or {}", plans.size(), s.B,
                      s.B);
  for (const auto& p : plans) p.validate(s.Hq, s.d);
  for (const auto& p : plans)
    if (!p.all_dense())
      throw Unavailable(fmt::format(
          "attention: plan '{}' needs a backend that is not built yet (only dense exists)",
          p.heads[0].to_string()));
  const auto t0 = std::chrono::steady_clock::now();
  AttentionResult r;
  const bool standard_causal = in.causal && s.q_offset == s.M - s.N && s.N == s.M;
  if (!in.causal || standard_causal) {
    r.out = at::scaled_dot_product_attention(in.q, expand_kv(in.k, s.Hq / s.Hkv),
                                             expand_kv(in.v, s.Hq / s.Hkv), {}, 0.0, in.causal);
  } else {
    r.out = dense_reference(in);
  }
  r.stats.time_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  // Causal: query i sees q_offset + i + 1 keys.
  double pairs = in.causal ? static_cast<double>(s.N) * s.q_offset + s.N * (s.N + 1) / 2.0
                           : static_cast<double>(s.N) * s.M;
  r.stats.score_flops = 2.0 * s.B * s.Hq * pairs * s.d;
  r.stats.value_flops = 2.0 * s.B * s.Hq * pairs * s.dv;
  const double elt = static_cast<double>(in.q.element_size());
  r.stats.bytes = elt * s.B * (s.Hq * s.N * s.d + s.Hkv * s.M * (s.d + s.dv) + s.Hq * s.N * s.dv);
  r.stats.calls = 1;
  return r;
}

}  // namespace attnpilot::attention
