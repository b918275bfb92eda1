// Pretraining: schedule, config keys, a short run lowers validation loss, resume is
// bit-identical to an uninterrupted run, chunked NLL and the unigram baseline against
// direct computations.
#include "model/lm_train.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"
#include "model/checkpoint.h"

namespace attnpilot::model {
namespace {
namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("attnpilot_lm_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  static inline int counter_ = 0;
  fs::path path_;
};

bool have_fortunes() { return fs::exists(fs::path(kFortunesDir) / "fortunes"); }

/// A tiny Llama-style model on a few small fortune files.
PretrainConfig tiny_config() {
  const std::string yaml = R"(
model:
  model_type: llama
  hidden_size: 64
  num_layers: 2
  num_heads: 2
  num_kv_heads: 1
  head_dim: 32
  intermediate_size: 128
  max_position_embeddings: 64
tokenizer:
  vocab_size: 400
data:
  validation_fraction: 0.1
train:
  steps: 150
  batch_size: 8
  context: 64
  lr: 0.005
  min_lr: 0.0005
  warmup_steps: 10
  eval_every: 50
  eval_windows: 16
  checkpoint_every: 100
  seed: 3
)";
  PretrainConfig c = PretrainConfig::from_config(Config::parse(yaml, "tiny"));
  c.corpus = {fs::path(kFortunesDir) / "fortunes", fs::path(kFortunesDir) / "goedel",
              fs::path(kFortunesDir) / "magic", fs::path(kFortunesDir) / "medicine"};
  return c;
}

TEST(LearningRate, WarmsUpThenFollowsTheCosine) {
  PretrainConfig c;
  c.steps = 110;
  c.warmup_steps = 10;
  c.lr = 1.0;
  c.min_lr = 0.1;
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 0), 0.1);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 4), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 9), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate_at(c, 10), 1.0);
  EXPECT_NEAR(learning_rate_at(c, 60), 0.55, 1e-12);  // half way: (lr + min_lr) / 2
  EXPECT_NEAR(learning_rate_at(c, 110), 0.1, 1e-12);
  for (int64_t s = 11; s < 110; ++s) EXPECT_LT(learning_rate_at(c, s), learning_rate_at(c, s - 1));
}

TEST(PretrainConfig, UnknownKeyIsAnErrorNamingIt) {
  try {
    PretrainConfig::from_config(Config::parse("train:\n  stpes: 10\n", "cfg"));
    FAIL() << "no exception";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("train.stpes"), std::string::npos) << e.what();
  }
  EXPECT_THROW(PretrainConfig::from_config(Config::parse("train:\n  steps: 0\n", "cfg")),
               InvalidArgument);
  EXPECT_THROW(PretrainConfig::from_config(Config::parse("train:\n  lr: fast\n", "cfg")),
               InvalidArgument);
  EXPECT_THROW(PretrainConfig::from_config(Config::parse(
                   "model:\n  max_position_embeddings: 32\ntrain:\n  context: 64\n", "cfg")),
               InvalidArgument);
}

TEST(TrainingState, RoundTripsAndRejectsMalformedText) {
  TrainingState s;
  s.step = 5;
  s.steps = 10;
  s.run_fingerprint = "abc";
  s.sampler_rng = "1 2 3";
  s.corpus = {"/x", "/y"};
  s.context = 64;
  s.val_loss = 2.5;
  TrainingState b = TrainingState::from_json(s.to_json(), "t");
  EXPECT_EQ(b.step, 5);
  EXPECT_EQ(b.corpus, s.corpus);
  EXPECT_EQ(b.val_loss, 2.5);
  EXPECT_THROW(TrainingState::from_json("{", "t"), FormatError);
  EXPECT_THROW(TrainingState::from_json("{\"step\": 1}", "t"), FormatError);
  s.step = 11;
  EXPECT_THROW(TrainingState::from_json(s.to_json(), "t"), FormatError);
}

TEST(UnigramModel, MatchesAddOneCounts) {
  // Vocabulary of 5, eos = 2; documents {0, 0, 3} and {3}: counts 0:2, 2:2 (eos), 3:2.
  UnigramModel u({{0, 0, 3}, {3}}, 5, 2);
  const double total = 6 + 5;
  EXPECT_NEAR(u.nll(0), -std::log(3 / total), 1e-12);
  EXPECT_NEAR(u.nll(1), -std::log(1 / total), 1e-12);
  EXPECT_NEAR(u.nll(2), -std::log(3 / total), 1e-12);
  auto d = u.document_nll({4, 0});
  ASSERT_EQ(d.size(), 3u);
  EXPECT_NEAR(d[0], -std::log(1 / total), 1e-12);
  EXPECT_NEAR(d[2], u.nll(2), 1e-12);
  EXPECT_THROW(u.nll(5), InvalidArgument);
}

TEST(DocumentNll, ChunksMatchDirectLogSoftmax) {
  ModelConfig mc = tiny_config().model;
  mc.vocab_size = 50;
  torch::manual_seed(11);
  Transformer m(mc);
  m->eval();
  std::vector<int32_t> doc;
  for (int i = 0; i < 40; ++i) doc.push_back(3 + (i * 7) % 47);
  const int bos = 1, eos = 2;
  // Reference: one forward over <s> doc, log-softmax, pick each next token.
  std::vector<int64_t> t = {bos};
  t.insert(t.end(), doc.begin(), doc.end());
  t.push_back(eos);
  auto x = torch::tensor(std::vector<int64_t>(t.begin(), t.end() - 1)).unsqueeze(0);
  torch::NoGradGuard ng;
  auto logp = torch::log_softmax(m->forward(x).logits[0].to(torch::kFloat64), -1);
  auto full = document_nll(m, doc, bos, eos, 64, torch::kCPU);
  ASSERT_EQ(full.size(), doc.size() + 1);
  for (size_t i = 0; i < full.size(); ++i)
    EXPECT_NEAR(full[i], -logp[i][t[i + 1]].item<double>(), 1e-5) << i;
  // In chunks of 16 the first chunk sees the same prefix; later ones see less context
  // but still score exactly the same targets.
  auto chunked = document_nll(m, doc, bos, eos, 16, torch::kCPU);
  ASSERT_EQ(chunked.size(), full.size());
  for (size_t i = 0; i < 16; ++i) EXPECT_NEAR(chunked[i], full[i], 1e-5) << i;
  // The second chunk equals a forward over its own window.
  auto x2 = torch::tensor(std::vector<int64_t>(t.begin() + 16, t.begin() + 32)).unsqueeze(0);
  auto logp2 = torch::log_softmax(m->forward(x2).logits[0].to(torch::kFloat64), -1);
  for (size_t i = 0; i < 16; ++i)
    EXPECT_NEAR(chunked[16 + i], -logp2[i][t[17 + i]].item<double>(), 1e-5) << i;
}

TEST(Pretrain, ShortRunLowersValidationLossAndBeatsUnigram) {
  if (!have_fortunes()) GTEST_SKIP() << "fortunes package missing: run scripts/install-deps.sh";
  TempDir dir;
  PretrainConfig c = tiny_config();
  PretrainRun run;
  run.out = dir.path();
  PretrainResult r = pretrain(c, run);
  EXPECT_TRUE(r.finished);
  EXPECT_EQ(r.step, 150);
  // From about log(400) = 6.0 at initialisation to well below it.
  EXPECT_GT(r.first_val_loss, 5.0);
  EXPECT_LT(r.val_loss, r.first_val_loss - 1.0);
  ASSERT_TRUE(fs::exists(dir.path() / "model" / "config.json"));
  ASSERT_TRUE(fs::exists(dir.path() / "model" / "tokenizer.model"));
  ASSERT_TRUE(fs::exists(dir.path() / "metrics.jsonl"));

  // A second call reuses the finished run.
  run.resume = true;
  PretrainResult again = pretrain(c, run);
  EXPECT_TRUE(again.reused);
  EXPECT_EQ(again.val_loss, r.val_loss);
  // Without --resume or --force an existing checkpoint is refused.
  run.resume = false;
  EXPECT_THROW(pretrain(c, run), InvalidArgument);
  // Another config with --resume only is refused too (it belongs to another run).
  PretrainConfig other = c;
  other.seed = 4;
  run.resume = true;
  EXPECT_THROW(pretrain(other, run), InvalidArgument);

  // eval-lm's numbers: both rows score the same tokens; the trained model beats the
  // add-one unigram on held-out documents.
  LmEvaluation e = evaluate_lm(dir.path() / "model", {}, torch::kCPU);
  EXPECT_EQ(e.model.tokens, e.unigram.tokens);
  EXPECT_EQ(e.model.documents, e.unigram.documents);
  EXPECT_GT(e.model.documents, 10);
  EXPECT_LE(e.model.doc_nll.low, e.model.doc_nll.mean);
  EXPECT_GE(e.model.doc_nll.high, e.model.doc_nll.mean);
  EXPECT_LT(e.model.token_ppl, e.unigram.token_ppl);
  EXPECT_FALSE(format_evaluation(e).empty());

  // A damaged checkpoint is not reused: its weights no longer validate.
  const fs::path weights = dir.path() / "model" / "model.safetensors";
  const std::string bytes = read_file(weights);
  write_file_atomic(weights, bytes.substr(0, bytes.size() / 2));
  run.resume = true;
  run.force = false;
  EXPECT_THROW(pretrain(c, run), InvalidArgument);
}

TEST(Pretrain, ResumeIsBitIdenticalToAnUninterruptedRun) {
  if (!have_fortunes()) GTEST_SKIP() << "fortunes package missing: run scripts/install-deps.sh";
  TempDir a, b;
  PretrainConfig c = tiny_config();
  c.steps = 24;
  c.checkpoint_every = 5;  // checkpoints at 5, 10 also exercise the periodic path
  c.eval_every = 7;
  PretrainRun ra;
  ra.out = a.path();
  pretrain(c, ra);
  // Same tokenizer for both runs (the run fingerprint includes it).
  fs::copy_file(a.path() / "tokenizer.model", b.path() / "tokenizer.model");
  fs::copy_file(a.path() / "tokenizer.key", b.path() / "tokenizer.key");
  PretrainRun rb;
  rb.out = b.path();
  rb.stop_at_step = 12;
  PretrainResult half = pretrain(c, rb);
  EXPECT_EQ(half.step, 12);
  EXPECT_FALSE(half.finished);
  rb.stop_at_step = -1;
  EXPECT_THROW(pretrain(c, rb), InvalidArgument);  // exists; neither --resume nor --force
  rb.resume = true;
  PretrainResult rest = pretrain(c, rb);
  EXPECT_EQ(rest.step, 24);
  EXPECT_TRUE(rest.finished);

  Transformer ma = load_model(a.path() / "model", torch::kCPU);
  Transformer mb = load_model(b.path() / "model", torch::kCPU);
  auto pa = ma->named_parameters();
  auto pb = mb->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (const auto& kv : pa) {
    const auto* other = pb.find(kv.key());
    ASSERT_NE(other, nullptr) << kv.key();
    EXPECT_TRUE(torch::equal(kv.value(), *other)) << kv.key();
  }
  EXPECT_EQ(read_file(a.path() / "model" / "model.safetensors"),
            read_file(b.path() / "model" / "model.safetensors"));
  // And the parameters moved: not just two copies of the initialisation.
  torch::manual_seed(c.seed);
  ModelConfig mc = c.model;
  mc.vocab_size = ma->config().vocab_size;
  Transformer init(mc);
  bool moved = false;
  for (const auto& kv : init->named_parameters())
    moved |= !torch::equal(kv.value(), *pa.find(kv.key()));
  EXPECT_TRUE(moved);
}

}  // namespace
}  // namespace attnpilot::model
