/// Cached decoding through the model: prefill then one token at a time with a KVCache
/// equals the full forward pass over the whole sequence (dense and streaming plans, MHA
/// and GQA, llama and gpt2).
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include "attention/kv_cache.h"
#include "common/error.h"
#include "model/transformer.h"

namespace attnpilot::attention {
namespace {

model::Transformer tiny(const std::string& type, int64_t kv_heads) {
  auto cfg = model::ModelConfig::defaults(type);
  cfg.vocab_size = 97;
  cfg.hidden_size = 64;
  cfg.num_layers = 3;
  cfg.num_heads = 4;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = 16;
  cfg.intermediate_size = 128;
  cfg.max_position_embeddings = 64;
  model::Transformer m(cfg);
  m->eval();
  return m;
}

void check_decode(model::Transformer& m, const std::vector<std::vector<LayerPlan>>* plans) {
  torch::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const int64_t len = 24, prefill = 15;
  const auto tokens = torch::randint(0, 97, {2, len}, gen, torch::kLong);
  model::ForwardOptions full_opts;
  full_opts.plans = plans;
  const auto full = m->forward(tokens, full_opts);
  KVCache cache(m->config().num_layers);
  model::ForwardOptions opts;
  opts.plans = plans;
  opts.cache = &cache;
  const auto pre = m->forward(tokens.narrow(1, 0, prefill), opts);
  EXPECT_LT((pre.logits - full.logits.narrow(1, 0, prefill)).abs().max().item<double>(), 1e-4);
  for (int64_t t = prefill; t < len; ++t) {
    const auto step = m->forward(tokens.narrow(1, t, 1), opts);
    ASSERT_LT((step.logits - full.logits.narrow(1, t, 1)).abs().max().item<double>(), 1e-4)
        << "t=" << t;
    EXPECT_EQ(static_cast<int64_t>(step.layer_stats.size()), m->config().num_layers);
    EXPECT_GT(step.stats.score_flops, 0);
  }
  EXPECT_EQ(cache.length(0), len);
}

TEST(ModelDecode, CachedEqualsFullForwardDense) {
  auto llama = tiny("llama", 2);
  check_decode(llama, nullptr);
  auto gpt2 = tiny("gpt2", 4);
  check_decode(gpt2, nullptr);
}

TEST(ModelDecode, CachedEqualsFullForwardWithPlans) {
  auto llama = tiny("llama", 2);
  HeadPlan st = HeadPlan::streaming(6, 2);
  st.block_size = 4;
  // Layer 0 dense, layer 1 mixed heads, layer 2 streaming.
  const std::vector<std::vector<LayerPlan>> plans{
      {LayerPlan::dense()},
      {LayerPlan{{HeadPlan::dense(), st, st, HeadPlan::dense()}}},
      {LayerPlan::uniform(st)}};
  check_decode(llama, &plans);
}

TEST(ModelDecode, CacheMismatchRefused) {
  auto llama = tiny("llama", 2);
  torch::NoGradGuard no_grad;
  KVCache wrong(2);
  model::ForwardOptions opts;
  opts.cache = &wrong;
  EXPECT_THROW(llama->forward(torch::zeros({1, 4}, torch::kLong), opts), InvalidArgument);
}

}  // namespace
}  // namespace attnpilot::attention
