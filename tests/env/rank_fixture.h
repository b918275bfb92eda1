#pragma once
// A tiny rank-selection setup for tests: a generated text corpus, a tokenizer trained on
// it, a randomly initialised 2-layer Llama-style model (4 query heads, 2 key/value heads,
// head dim 8) saved as a checkpoint folder whose training_state.json names the corpus, so
// RankSelection-v0 finds both splits. Built once per process in a temp folder.
#include <unistd.h>

#include <filesystem>
#include <random>
#include <string>

#include "common/atomic_file.h"
#include "common/config.h"
#include "model/checkpoint.h"
#include "model/corpus.h"
#include "model/lm_train.h"
#include "model/tokenizer.h"
#include "model/transformer.h"

namespace attnpilot::testing {

/// Removes the fixture's folder when the test process exits.
struct TinyRankFixtureFolder {
  std::filesystem::path root, model;
  ~TinyRankFixtureFolder() {
    std::error_code ec;
    std::filesystem::remove_all(root, ec);
  }
};

inline const std::filesystem::path& tiny_rank_model() {
  static const TinyRankFixtureFolder folder = [] {
    namespace fs = std::filesystem;
    const fs::path root =
        fs::temp_directory_path() / ("attnpilot-rank-fixture-" + std::to_string(getpid()));
    fs::remove_all(root);
    fs::create_directories(root / "model");
    std::mt19937_64 rng(5);
    const char* words[] = {"the", "cat",  "sat", "on",   "a",     "mat",   "dog",  "ran",
                           "far", "away", "and", "then", "slept", "under", "tree", "sun"};
    std::string text;
    for (int doc = 0; doc < 400; ++doc) {
      const int n = 6 + static_cast<int>(rng() % 20);
      for (int i = 0; i < n; ++i) text += std::string(words[rng() % 16]) + (i + 1 < n ? " " : "");
      text += "\n%\n";
    }
    write_file_atomic(root / "corpus.txt", text);
    const auto corpus = model::load_corpus({root / "corpus.txt"}, 0.3);
    model::TokenizerTrainOptions opt;
    opt.vocab_size = 300;
    const auto tok = model::Tokenizer::train(corpus.train, opt);
    model::ModelConfig mc = model::ModelConfig::defaults("llama");
    mc.vocab_size = tok.vocab_size();
    mc.hidden_size = 32;
    mc.num_layers = 2;
    mc.num_heads = 4;
    mc.num_kv_heads = 2;
    mc.head_dim = 8;
    mc.intermediate_size = 64;
    mc.max_position_embeddings = 64;
    torch::manual_seed(3);
    model::Transformer m(mc);
    model::save_model(root / "model", m, {{"tokenizer.model", tok.bytes()}});
    model::TrainingState st;
    st.corpus = {(root / "corpus.txt").string()};
    st.validation_fraction = 0.3;
    st.context = 64;
    st.steps = 1;
    st.step = 1;
    st.finished = true;
    write_file_atomic(root / "model" / "training_state.json", st.to_json());
    return TinyRankFixtureFolder{root, root / "model"};
  }();
  return folder.model;
}

/// The env section for the tiny model: windows of 32 tokens in 4 segments of 8, ranks
/// {2, 4} plus the head dim 8. `extra` is appended (YAML lines at the section's level).
inline std::string tiny_rank_env_yaml(const std::string& extra = "") {
  return "model: " + tiny_rank_model().string() +
         "\nsequence_length: 32\nsegment: 8\nranks: [2, 4]\n" + extra;
}

}  // namespace attnpilot::testing
