#include "model/transformer.h"

#include <fmt/format.h>

#include <cmath>

#include "common/error.h"

namespace attnpilot::model {

NormImpl::NormImpl(int64_t dim, double eps, bool layer_norm) : eps_(eps), layer_norm_(layer_norm) {
  weight = register_parameter("weight", torch::ones({dim}));
  if (layer_norm_) bias = register_parameter("bias", torch::zeros({dim}));
}

torch::Tensor NormImpl::forward(const torch::Tensor& x) {
  if (layer_norm_) return torch::layer_norm(x, {weight.size(0)}, weight, bias, eps_);
  const auto xf = x.to(torch::kFloat32);
  const auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return weight * normed.to(x.scalar_type());
}

std::pair<torch::Tensor, torch::Tensor> rope_cos_sin(const torch::Tensor& positions,
                                                     int64_t head_dim, double theta) {
  ATTNPILOT_CHECK_ARG(head_dim >= 2 && head_dim % 2 == 0, "rope: head_dim {} must be even",
                      head_dim);
  const auto opts = torch::TensorOptions().dtype(torch::kFloat32).device(positions.device());
  // As transformers: inv_freq = 1 / theta^(arange(0, d, 2) / d) in float32.
  const auto exponent =
      torch::arange(0, head_dim, 2, opts.dtype(torch::kInt64)).to(torch::kFloat32) /
      static_cast<double>(head_dim);
  const auto inv_freq = 1.0 / torch::pow(theta, exponent);
  const auto freqs = torch::outer(positions.to(torch::kFloat32), inv_freq);  // [N, d/2]
  const auto emb = torch::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t h = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, h, h), x.narrow(-1, 0, h)}, -1);
}

torch::Tensor apply_rope(const torch::Tensor& x, const torch::Tensor& cos,
                         const torch::Tensor& sin) {
  const auto xf = x.to(torch::kFloat32);
  return (xf * cos + rotate_half(xf) * sin).to(x.scalar_type());
}

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c) {
  const bool ln = c.is_gpt2();
  const int64_t H = c.hidden_size, q_dim = c.num_heads * c.head_dim,
                kv_dim = c.num_kv_heads * c.head_dim, I = c.intermediate_size;
  auto linear = [](int64_t in, int64_t out, bool bias) {
    return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(bias));
  };
  attn_norm = register_module("attn_norm", Norm(H, c.rms_norm_eps, ln));
  q_proj = register_module("q_proj", linear(H, q_dim, c.qkv_bias()));
  k_proj = register_module("k_proj", linear(H, kv_dim, c.qkv_bias()));
  v_proj = register_module("v_proj", linear(H, kv_dim, c.qkv_bias()));
  o_proj = register_module("o_proj", linear(q_dim, H, c.out_bias()));
  mlp_norm = register_module("mlp_norm", Norm(H, c.rms_norm_eps, ln));
  if (c.is_gpt2()) {
    fc_in = register_module("fc_in", linear(H, I, c.ffn_bias()));
    fc_out = register_module("fc_out", linear(I, H, c.ffn_bias()));
  } else {
    gate_proj = register_module("gate_proj", linear(H, I, c.ffn_bias()));
    up_proj = register_module("up_proj", linear(H, I, c.ffn_bias()));
    down_proj = register_module("down_proj", linear(I, H, c.ffn_bias()));
  }
}

torch::Tensor DecoderLayerImpl::mlp(const torch::Tensor& h) {
  if (fc_in) return fc_out(torch::gelu(fc_in(h), "tanh"));
  return down_proj(torch::silu(gate_proj(h)) * up_proj(h));
}

TransformerImpl::TransformerImpl(const ModelConfig& cfg) : cfg_(cfg) {
  cfg_.validate();
  embed_tokens =
      register_module("embed_tokens", torch::nn::Embedding(cfg_.vocab_size, cfg_.hidden_size));
  if (cfg_.is_gpt2())
    embed_positions = register_module(
        "embed_positions", torch::nn::Embedding(cfg_.max_position_embeddings, cfg_.hidden_size));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t l = 0; l < cfg_.num_layers; ++l) layers->push_back(DecoderLayer(cfg_));
  final_norm =
      register_module("final_norm", Norm(cfg_.hidden_size, cfg_.rms_norm_eps, cfg_.is_gpt2()));
  if (!cfg_.tie_word_embeddings)
    lm_head = register_module(
        "lm_head",
        torch::nn::Linear(torch::nn::LinearOptions(cfg_.hidden_size, cfg_.vocab_size).bias(false)));

  // Initialisation (GPT-2 / Llama practice).
  torch::NoGradGuard no_grad;
  const double std = 0.02, out_std = 0.02 / std::sqrt(2.0 * cfg_.num_layers);
  for (auto& p : named_parameters()) {
    const std::string& name = p.key();
    auto& t = p.value();
    const bool is_norm = name.find("norm") != std::string::npos;
    if (is_norm) {
      t.fill_(name.size() >= 6 && name.compare(name.size() - 6, 6, "weight") == 0 ? 1.0 : 0.0);
    } else if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0) {
      t.zero_();
    } else {
      const bool out_proj = name.find("o_proj") != std::string::npos ||
                            name.find("down_proj") != std::string::npos ||
                            name.find("fc_out") != std::string::npos;
      t.normal_(0.0, out_proj ? out_std : std);
    }
  }
}

int64_t TransformerImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

ForwardOutput TransformerImpl::forward(const torch::Tensor& tokens, const ForwardOptions& opts) {
  ATTNPILOT_CHECK_ARG(tokens.defined() && tokens.dim() == 2,
                      "forward: tokens must be a 2-D [batch, length] tensor; got {}-D",
                      tokens.defined() ? tokens.dim() : 0);
  ATTNPILOT_CHECK_ARG(
      tokens.scalar_type() == torch::kInt64 || tokens.scalar_type() == torch::kInt32,
      "forward: tokens must be int64 (or int32); got {}", c10::toString(tokens.scalar_type()));
  const int64_t B = tokens.size(0), N = tokens.size(1);
  ATTNPILOT_CHECK_ARG(B >= 1 && N >= 1, "forward: empty token batch [{}, {}]", B, N);
  {
    const auto mn = tokens.min().item<int64_t>(), mx = tokens.max().item<int64_t>();
    ATTNPILOT_CHECK_ARG(mn >= 0 && mx < cfg_.vocab_size,
                        "forward: token ids must lie in [0, {}); got range [{}, {}]",
                        cfg_.vocab_size, mn, mx);
  }
  const int64_t L = cfg_.num_layers;
  if (opts.plans) {
    ATTNPILOT_CHECK_ARG(static_cast<int64_t>(opts.plans->size()) == L,
                        "forward: plans for {} layers; the model has {}", opts.plans->size(), L);
    for (int64_t l = 0; l < L; ++l) {
      const auto n = static_cast<int64_t>((*opts.plans)[l].size());
      ATTNPILOT_CHECK_ARG(n == 1 || n == B,
                          "forward: layer {} has {} plans; expected 1 or the batch size {}", l, n,
                          B);
    }
  }
  static const std::vector<attention::LayerPlan> kDense{attention::LayerPlan::dense()};

  // Absolute positions of the tokens: a cache starts them at its length.
  int64_t start = 0;
  if (opts.cache) {
    ATTNPILOT_CHECK_ARG(opts.cache->num_layers() == L,
                        "forward: KV cache has {} layers; the model has {}",
                        opts.cache->num_layers(), L);
    start = opts.cache->length(0);
    for (int64_t l = 1; l < L; ++l)
      ATTNPILOT_CHECK_ARG(opts.cache->length(l) == start,
                          "forward: KV cache layer {} holds {} positions but layer 0 holds {}", l,
                          opts.cache->length(l), start);
  }
  const auto positions = torch::arange(
      start, start + N, torch::TensorOptions().dtype(torch::kInt64).device(tokens.device()));
  const auto ids = tokens.to(torch::kInt64);
  torch::Tensor x = embed_tokens(ids);
  torch::Tensor cos, sin;
  if (cfg_.is_gpt2()) {
    ATTNPILOT_CHECK_ARG(start + N <= cfg_.max_position_embeddings,
                        "forward: {} tokens exceed gpt2's {} learned positions", start + N,
                        cfg_.max_position_embeddings);
    x = x + embed_positions(positions).unsqueeze(0);
  } else {
    std::tie(cos, sin) = rope_cos_sin(positions, cfg_.head_dim, cfg_.rope_theta);
  }

  ForwardOutput out;
  out.layer_stats.reserve(L);
  if (opts.capture) out.layers.reserve(L);
  const int64_t Hq = cfg_.num_heads, Hkv = cfg_.num_kv_heads, d = cfg_.head_dim;
  for (int64_t l = 0; l < L; ++l) {
    auto& layer = *layers[l]->as<DecoderLayerImpl>();
    const auto h = layer.attn_norm(x);
    auto q = layer.q_proj(h).view({B, N, Hq, d}).transpose(1, 2);
    auto k = layer.k_proj(h).view({B, N, Hkv, d}).transpose(1, 2);
    auto v = layer.v_proj(h).view({B, N, Hkv, d}).transpose(1, 2);
    const auto q_pre = q;
    if (!cfg_.is_gpt2()) {
      q = apply_rope(q, cos, sin);
      k = apply_rope(k, cos, sin);
    }
    attention::AttentionInputs in;
    if (opts.cache) {
      opts.cache->append(l, k, v);
      in = opts.cache->inputs(l, q);
    } else {
      in.q = q;
      in.k = k;
      in.v = v;
      in.causal = true;
    }
    in.layer = l;
    if (opts.before_attention) opts.before_attention(l, q, k, in);
    auto res = attention::run_attention(in, opts.plans ? (*opts.plans)[l] : kDense);
    const auto a = res.out.transpose(1, 2).reshape({B, N, Hq * d});
    x = x + layer.o_proj(a);
    x = x + layer.mlp(layer.mlp_norm(x));
    out.stats += res.stats;
    out.layer_stats.push_back(res.stats);
    if (opts.capture) out.layers.push_back(LayerCapture{q, k, v, q_pre, res.out, x});
  }
  x = final_norm(x);
  out.logits = lm_head ? lm_head(x) : torch::linear(x, embed_tokens->weight);
  return out;
}

}  // namespace attnpilot::model
