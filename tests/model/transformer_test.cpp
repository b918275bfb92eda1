// The transformer against direct formulas: RoPE and grouped-query attention written as
// explicit loops, and a whole forward pass recomputed in float64 from the parameters.
#include "model/transformer.h"

#include <gtest/gtest.h>

#include <cmath>

namespace attnpilot::model {
namespace {

/// Tiny models run fastest on one thread; OpenMP workers only contend on a busy CI box.
class OneThread : public ::testing::Environment {
 public:
  void SetUp() override { torch::set_num_threads(1); }
};
const auto* const kOneThread = ::testing::AddGlobalTestEnvironment(new OneThread);

ModelConfig tiny(const std::string& type) {
  ModelConfig c = ModelConfig::defaults(type);
  c.vocab_size = 37;
  c.hidden_size = 32;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = type == "gpt2" ? 4 : 2;
  c.head_dim = 8;
  c.intermediate_size = 48;
  c.max_position_embeddings = 16;
  c.rope_theta = 10000.0;
  return c;
}

/// Moves every parameter away from its initial value (norm weights 1, biases 0).
void randomize(Transformer& m, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard g;
  for (auto& p : m->parameters()) p.add_(torch::randn_like(p) * 0.2);
}

torch::Tensor tokens_for(const ModelConfig& c, int64_t B, int64_t N, uint64_t seed) {
  torch::manual_seed(seed);
  return torch::randint(0, c.vocab_size, {B, N}, torch::kInt64);
}

/// RoPE of one vector at position `pos`, as an explicit loop over rotation pairs
/// (i, i + d/2) with angle pos · theta^(-2i/d).
std::vector<double> rope_loop(const std::vector<double>& x, int64_t pos, double theta) {
  const size_t d = x.size(), h = d / 2;
  std::vector<double> y(d);
  for (size_t i = 0; i < h; ++i) {
    const double a = pos * std::pow(theta, -2.0 * i / d);
    y[i] = x[i] * std::cos(a) - x[i + h] * std::sin(a);
    y[i + h] = x[i + h] * std::cos(a) + x[i] * std::sin(a);
  }
  return y;
}

TEST(TransformerTest, RopeMatchesExplicitRotation) {
  torch::manual_seed(3);
  for (double theta : {10000.0, 500000.0}) {
    const int64_t B = 2, H = 3, N = 5, d = 8, offset = 3;
    auto x = torch::randn({B, H, N, d});
    auto [cos, sin] = rope_cos_sin(torch::arange(offset, offset + N), d, theta);
    auto y = apply_rope(x, cos, sin).to(torch::kDouble);
    auto xd = x.to(torch::kDouble);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t n = 0; n < N; ++n) {
          std::vector<double> v(d);
          for (int64_t i = 0; i < d; ++i) v[i] = xd[b][h][n][i].item<double>();
          const auto want = rope_loop(v, offset + n, theta);
          for (int64_t i = 0; i < d; ++i)
            EXPECT_NEAR(y[b][h][n][i].item<double>(), want[i], 2e-5)
                << "theta " << theta << " b" << b << " h" << h << " n" << n << " i" << i;
        }
  }
  EXPECT_THROW(rope_cos_sin(torch::arange(4), 7, 10000.0), InvalidArgument);
}

/// Causal softmax attention of query head h over key/value head h / (Hq / Hkv), with
/// explicit loops, in float64. q [B,Hq,N,d], k/v [B,Hkv,N,d].
torch::Tensor gqa_loop(const torch::Tensor& q_, const torch::Tensor& k_, const torch::Tensor& v_) {
  const auto q = q_.to(torch::kDouble).contiguous(), k = k_.to(torch::kDouble).contiguous(),
             v = v_.to(torch::kDouble).contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), d = q.size(3), Hkv = k.size(1);
  auto out = torch::zeros({B, Hq, N, d}, torch::kDouble);
  auto Q = q.accessor<double, 4>(), K = k.accessor<double, 4>(), V = v.accessor<double, 4>();
  auto O = out.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t g = h / (Hq / Hkv);
      for (int64_t i = 0; i < N; ++i) {
        std::vector<double> s(i + 1);
        double mx = -1e300, z = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (int64_t t = 0; t < d; ++t) dot += Q[b][h][i][t] * K[b][g][j][t];
          s[j] = dot / std::sqrt(static_cast<double>(d));
          mx = std::max(mx, s[j]);
        }
        for (int64_t j = 0; j <= i; ++j) z += (s[j] = std::exp(s[j] - mx));
        for (int64_t j = 0; j <= i; ++j)
          for (int64_t t = 0; t < d; ++t) O[b][h][i][t] += s[j] / z * V[b][g][j][t];
      }
    }
  return out;
}

/// The whole forward pass recomputed in float64 from the model's parameters with direct
/// formulas (norms, activations, RoPE via rope_loop, attention via gqa_loop).
torch::Tensor reference_logits(Transformer& m, const torch::Tensor& tokens) {
  const ModelConfig& c = m->config();
  std::map<std::string, torch::Tensor> P;
  for (const auto& p : m->named_parameters()) P[p.key()] = p.value().detach().to(torch::kDouble);
  auto lin = [&](const torch::Tensor& x, const std::string& name) {
    auto y = torch::matmul(x, P.at(name + ".weight").t());
    return P.count(name + ".bias") ? y + P.at(name + ".bias") : y;
  };
  auto norm = [&](const torch::Tensor& x, const std::string& name) {
    if (c.is_gpt2()) {
      auto mu = x.mean(-1, true);
      auto var = (x - mu).pow(2).mean(-1, true);
      return (x - mu) / torch::sqrt(var + c.rms_norm_eps) * P.at(name + ".weight") +
             P.at(name + ".bias");
    }
    return x / torch::sqrt(x.pow(2).mean(-1, true) + c.rms_norm_eps) * P.at(name + ".weight");
  };
  auto rope = [&](const torch::Tensor& t) {  // [B,H,N,d]
    auto out = torch::empty_like(t);
    for (int64_t b = 0; b < t.size(0); ++b)
      for (int64_t h = 0; h < t.size(1); ++h)
        for (int64_t n = 0; n < t.size(2); ++n) {
          std::vector<double> v(t.size(3));
          for (int64_t i = 0; i < t.size(3); ++i) v[i] = t[b][h][n][i].item<double>();
          const auto r = rope_loop(v, n, c.rope_theta);
          for (int64_t i = 0; i < t.size(3); ++i) out[b][h][n][i] = r[i];
        }
    return out;
  };
  const int64_t B = tokens.size(0), N = tokens.size(1), d = c.head_dim;
  auto x = P.at("embed_tokens.weight").index_select(0, tokens.flatten()).view({B, N, -1});
  if (c.is_gpt2()) x = x + P.at("embed_positions.weight").narrow(0, 0, N);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    auto h = norm(x, pre + "attn_norm");
    auto q = lin(h, pre + "q_proj").view({B, N, c.num_heads, d}).transpose(1, 2);
    auto k = lin(h, pre + "k_proj").view({B, N, c.num_kv_heads, d}).transpose(1, 2);
    auto v = lin(h, pre + "v_proj").view({B, N, c.num_kv_heads, d}).transpose(1, 2);
    if (!c.is_gpt2()) {
      q = rope(q);
      k = rope(k);
    }
    auto a = gqa_loop(q, k, v).transpose(1, 2).reshape({B, N, -1});
    x = x + lin(a, pre + "o_proj");
    h = norm(x, pre + "mlp_norm");
    if (c.is_gpt2()) {
      auto z = lin(h, pre + "fc_in");
      auto g = 0.5 * z * (1 + torch::tanh(std::sqrt(2.0 / M_PI) * (z + 0.044715 * z.pow(3))));
      x = x + lin(g, pre + "fc_out");
    } else {
      auto gate = lin(h, pre + "gate_proj");
      x = x + lin(gate / (1 + torch::exp(-gate)) * lin(h, pre + "up_proj"), pre + "down_proj");
    }
  }
  x = norm(x, "final_norm");
  return torch::matmul(
      x, (c.tie_word_embeddings ? P.at("embed_tokens.weight") : P.at("lm_head.weight")).t());
}

struct Variant {
  const char* name;
  ModelConfig cfg;
};

std::vector<Variant> variants() {
  ModelConfig llama_gqa = tiny("llama");
  ModelConfig llama_tied_bias = tiny("llama");
  llama_tied_bias.num_kv_heads = 4;
  llama_tied_bias.tie_word_embeddings = true;
  llama_tied_bias.attention_bias = llama_tied_bias.attention_out_bias = true;
  llama_tied_bias.mlp_bias = true;
  llama_tied_bias.rope_theta = 500000.0;
  ModelConfig qwen = tiny("qwen2");
  qwen.num_kv_heads = 1;
  ModelConfig gpt2 = tiny("gpt2");
  ModelConfig gpt2_untied = tiny("gpt2");
  gpt2_untied.tie_word_embeddings = false;
  return {{"llama_gqa", llama_gqa},
          {"llama_tied_bias", llama_tied_bias},
          {"qwen2_mqa", qwen},
          {"gpt2", gpt2},
          {"gpt2_untied", gpt2_untied}};
}

TEST(TransformerTest, ForwardMatchesFloat64Reference) {
  for (const auto& v : variants()) {
    Transformer m(v.cfg);
    randomize(m, 11);
    const auto tokens = tokens_for(v.cfg, 2, 7, 5);
    torch::NoGradGuard g;
    const auto out = m->forward(tokens);
    ASSERT_EQ(out.logits.sizes(), (std::vector<int64_t>{2, 7, v.cfg.vocab_size})) << v.name;
    const auto ref = reference_logits(m, tokens);
    const double err = (out.logits.to(torch::kDouble) - ref).abs().max().item<double>();
    EXPECT_LT(err, 1e-4) << v.name;
    EXPECT_GT(ref.abs().max().item<double>(), 0.1) << v.name << ": logits should not vanish";
  }
}

TEST(TransformerTest, CaptureHoldsAttentionTensorsAndGqaMatchesLoops) {
  ModelConfig c = tiny("llama");
  Transformer m(c);
  randomize(m, 2);
  const auto tokens = tokens_for(c, 2, 6, 9);
  torch::NoGradGuard g;
  ForwardOptions opts;
  opts.capture = true;
  const auto out = m->forward(tokens, opts);
  ASSERT_EQ(out.layers.size(), static_cast<size_t>(c.num_layers));
  auto [cos, sin] = rope_cos_sin(torch::arange(6), c.head_dim, c.rope_theta);
  for (const auto& L : out.layers) {
    EXPECT_EQ(L.q.sizes(), (std::vector<int64_t>{2, 4, 6, 8}));
    EXPECT_EQ(L.k.sizes(), (std::vector<int64_t>{2, 2, 6, 8}));
    EXPECT_EQ(L.v.sizes(), (std::vector<int64_t>{2, 2, 6, 8}));
    EXPECT_EQ(L.attn_out.sizes(), (std::vector<int64_t>{2, 4, 6, 8}));
    EXPECT_EQ(L.hidden_out.sizes(), (std::vector<int64_t>{2, 6, 32}));
    EXPECT_TRUE(torch::allclose(L.q, apply_rope(L.q_pre_rope, cos, sin), 1e-6, 1e-6));
    EXPECT_FALSE(torch::allclose(L.q, L.q_pre_rope, 1e-3, 1e-3));
    const double err =
        (L.attn_out.to(torch::kDouble) - gqa_loop(L.q, L.k, L.v)).abs().max().item<double>();
    EXPECT_LT(err, 1e-5);
  }
  // The last layer's residual stream gives the logits.
  auto& mm = *m;
  const auto logits =
      torch::linear(mm.final_norm(out.layers.back().hidden_out), mm.lm_head->weight);
  EXPECT_TRUE(torch::allclose(logits, out.logits, 1e-5, 1e-5));
  // Without capture nothing is kept.
  EXPECT_TRUE(m->forward(tokens).layers.empty());
}

TEST(TransformerTest, CausalAndBatchIndependent) {
  for (const auto& v : variants()) {
    Transformer m(v.cfg);
    randomize(m, 4);
    torch::NoGradGuard g;
    auto a = tokens_for(v.cfg, 2, 8, 1);
    auto b = a.clone();
    b[0][5] = (a[0][5].item<int64_t>() + 1) % v.cfg.vocab_size;
    const auto la = m->forward(a).logits, lb = m->forward(b).logits;
    EXPECT_TRUE(torch::allclose(la.narrow(1, 0, 5), lb.narrow(1, 0, 5), 1e-6, 1e-6)) << v.name;
    EXPECT_FALSE(torch::allclose(la[0].narrow(0, 5, 3), lb[0].narrow(0, 5, 3), 1e-4, 1e-4))
        << v.name;
    EXPECT_TRUE(torch::allclose(la[1], lb[1], 1e-6, 1e-6)) << v.name << ": other sequence";
    const auto single = m->forward(a.narrow(0, 1, 1)).logits;
    EXPECT_TRUE(torch::allclose(single[0], la[1], 1e-5, 1e-5)) << v.name;
  }
}

TEST(TransformerTest, PlansAndStats) {
  ModelConfig c = tiny("llama");
  Transformer m(c);
  torch::NoGradGuard g;
  const auto tokens = tokens_for(c, 2, 5, 3);
  const auto plain = m->forward(tokens);
  ASSERT_EQ(plain.layer_stats.size(), 2u);
  double flops = 0;
  for (const auto& s : plain.layer_stats) {
    EXPECT_GT(s.score_flops, 0);
    EXPECT_EQ(s.calls, 1);
    flops += s.flops();
  }
  EXPECT_DOUBLE_EQ(plain.stats.flops(), flops);
  EXPECT_EQ(plain.stats.calls, 2);
  // Causal scores: B·Hq·N(N+1)/2 pairs × 2d flops per layer.
  EXPECT_DOUBLE_EQ(plain.layer_stats[0].score_flops, 2.0 * 2 * 4 * 15 * 8);

  // Explicit dense plans, per layer and per sequence, give the same logits.
  std::vector<std::vector<attention::LayerPlan>> plans(
      2, std::vector<attention::LayerPlan>(2, attention::LayerPlan::dense()));
  ForwardOptions opts;
  opts.plans = &plans;
  EXPECT_TRUE(torch::equal(m->forward(tokens, opts).logits, plain.logits));
  plans.pop_back();
  EXPECT_THROW(m->forward(tokens, opts), InvalidArgument);  // one layer missing
  plans.assign(2, std::vector<attention::LayerPlan>(3, attention::LayerPlan::dense()));
  EXPECT_THROW(m->forward(tokens, opts), InvalidArgument);  // 3 plans for a batch of 2
}

TEST(TransformerTest, BadInputsAreRefused) {
  ModelConfig c = tiny("gpt2");
  Transformer m(c);
  torch::NoGradGuard g;
  EXPECT_THROW(m->forward(torch::zeros({4}, torch::kInt64)), InvalidArgument);
  EXPECT_THROW(m->forward(torch::zeros({1, 4}, torch::kFloat32)), InvalidArgument);
  EXPECT_THROW(m->forward(torch::full({1, 4}, c.vocab_size, torch::kInt64)), InvalidArgument);
  EXPECT_THROW(m->forward(torch::full({1, 4}, -1, torch::kInt64)), InvalidArgument);
  EXPECT_THROW(m->forward(torch::zeros({1, c.max_position_embeddings + 1}, torch::kInt64)),
               InvalidArgument);
  EXPECT_NO_THROW(m->forward(torch::zeros({1, c.max_position_embeddings}, torch::kInt64)));
  ModelConfig bad = tiny("llama");
  bad.num_kv_heads = 3;
  EXPECT_THROW(Transformer{bad}, InvalidArgument);
  bad = tiny("llama");
  bad.head_dim = 7;
  EXPECT_THROW(Transformer{bad}, InvalidArgument);
}

TEST(TransformerTest, GradientsReachEveryParameter) {
  for (const auto& v : variants()) {
    Transformer m(v.cfg);
    const auto tokens = tokens_for(v.cfg, 2, 6, 8);
    auto logits = m->forward(tokens).logits;
    auto loss = torch::nn::functional::cross_entropy(logits.reshape({-1, v.cfg.vocab_size}),
                                                     tokens.reshape({-1}));
    loss.backward();
    for (const auto& p : m->named_parameters())
      EXPECT_TRUE(p.value().grad().defined() && p.value().grad().abs().sum().item<double>() > 0)
          << v.name << " " << p.key();
    EXPECT_EQ(m->num_parameters(), [&] {
      int64_t n = 0;
      for (const auto& p : m->parameters()) n += p.numel();
      return n;
    }());
  }
}

}  // namespace
}  // namespace attnpilot::model
