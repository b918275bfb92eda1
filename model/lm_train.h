#pragma once
/// Language-model pretraining and evaluation on a text corpus.
///
///   corpus ──split──► train docs ──tokenizer──► <s> doc </s> <s> doc </s> ... (one stream)
///                                                 │ random windows of context+1 tokens
///                                                 ▼
///   Transformer ◄── AdamW (warm-up + cosine, clipped gradients) ── next-token loss
///        │
///        ├── every eval_every steps: loss on fixed validation windows (metrics.jsonl)
///        └── every checkpoint_every steps: OUT/model/ written atomically
///              config.json + model.safetensors + tokenizer.model
///              + optimizer.pt + training_state.json (step, sampler RNG, run fingerprint)
///
/// Resuming restores parameters, optimizer moments, step and the sampler's RNG, so N
/// steps straight and N/2 + resume + N/2 give bit-identical parameters (same device and
/// thread count).
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <iosfwd>
#include <string>
#include <vector>

#include "common/config.h"
#include "common/stats.h"
#include "model/config.h"
#include "model/corpus.h"
#include "model/tokenizer.h"
#include "model/transformer.h"

namespace attnpilot::model {

/// Everything a pretraining run is made of (the `pretrain` config file).
struct PretrainConfig {
  ModelConfig model;                ///< vocab_size is set from the tokenizer
  TokenizerTrainOptions tokenizer;  ///< how the tokenizer is trained
  std::vector<std::filesystem::path> corpus = {kFortunesDir};
  double validation_fraction = 0.05;  ///< share of documents held out, by hash

  int64_t steps = 1000;       ///< optimizer steps
  int64_t batch_size = 16;    ///< sequences per step
  int64_t context = 128;      ///< tokens per sequence
  double lr = 3e-3;           ///< peak learning rate
  double min_lr = 3e-4;       ///< floor of the cosine schedule
  int64_t warmup_steps = 50;  ///< linear warm-up from 0
  double weight_decay = 0.1;  ///< applied to matrices only, not norms or biases
  double beta1 = 0.9, beta2 = 0.95, eps = 1e-8;
  double grad_clip = 1.0;     ///< max global gradient norm (0: off)
  int64_t eval_every = 100;   ///< steps between validation losses
  int64_t eval_windows = 64;  ///< validation windows of `context` tokens
  int64_t checkpoint_every = 200;
  uint64_t seed = 0;

  /// Reads a config (sections `model`, `tokenizer`, `data`, `train`); every key must be
  /// known (Config::check_all_read). Throws InvalidArgument naming a bad key or value.
  static PretrainConfig from_config(const Config& cfg);
  /// Checks ranges; throws InvalidArgument naming the field.
  void validate() const;
  /// A canonical text of every field (what the run fingerprint hashes).
  std::string canonical() const;
};

/// The training-state file inside a checkpoint folder (training_state.json): where a run
/// stands and what it was trained on, so that eval-lm finds the same held-out split.
struct TrainingState {
  int64_t step = 0, steps = 0;
  bool finished = false;
  std::string run_fingerprint;      ///< hash of config, corpus and tokenizer
  std::string model_fingerprint;    ///< model_fingerprint() of the saved model
  std::string sampler_rng;          ///< std::mt19937_64 state, as text
  std::vector<std::string> corpus;  ///< corpus paths as given
  double validation_fraction = 0.05;
  int64_t context = 0;
  double val_loss = 0, first_val_loss = 0, seconds = 0;
  int64_t tokens = 0;

  std::string to_json() const;
  /// Throws FormatError naming `origin` and the field when the text is malformed.
  static TrainingState from_json(const std::string& text, const std::string& origin);
  /// Reads DIR/training_state.json; false when the file does not exist.
  static bool read(const std::filesystem::path& dir, TrainingState* out);
};

/// Learning rate at `step` (0-based): linear warm-up to `lr`, cosine decay to `min_lr`.
double learning_rate_at(const PretrainConfig& cfg, int64_t step);

/// How a run is executed (not part of its identity).
struct PretrainRun {
  std::filesystem::path out;  ///< run folder (see the diagram above)
  torch::Device device = torch::kCPU;
  bool resume = false;               ///< continue OUT/model if it belongs to the same run
  bool force = false;                ///< discard an OUT/model that belongs to another run
  double max_seconds = 0;            ///< stop (with a checkpoint) after this long; 0: no limit
  int64_t stop_at_step = -1;         ///< stop (with a checkpoint) at this step; -1: at `steps`
  std::ostream* progress = nullptr;  ///< progress line destination (nullptr: none)
};

/// What a pretraining call did.
struct PretrainResult {
  int64_t step = 0;                 ///< steps completed in total
  bool finished = false;            ///< step == steps
  bool reused = false;              ///< a finished checkpoint was found and nothing was run
  double first_val_loss = 0;        ///< validation loss before the first step of this run
  double val_loss = 0;              ///< validation loss at the end
  double train_loss = 0;            ///< mean training loss over the last eval interval
  double seconds = 0;               ///< wall time of the steps run by this call
  int64_t tokens = 0;               ///< training tokens processed by this call
  std::filesystem::path model_dir;  ///< OUT/model
};

/// Trains (or reuses) the tokenizer, tokenizes the corpus (cached in OUT/cache) and
/// pretrains. Throws InvalidArgument when OUT/model belongs to another run and `force` is
/// off, or exists and neither `resume` nor `force` is set.
PretrainResult pretrain(const PretrainConfig& cfg, const PretrainRun& run);

/// Next-token negative log-likelihoods (nats) of one document, <s> prepended and </s>
/// appended, in chunks of at most `context` predictions (each chunk sees only itself
/// and, from the second chunk on, the token before it). Returns one value per predicted
/// token (doc.size() + 1 of them).
std::vector<double> document_nll(Transformer& model, const std::vector<int32_t>& doc, int bos,
                                 int eos, int64_t context, const torch::Device& device);

/// Add-one smoothed unigram model over a vocabulary, fitted on documents (each followed
/// by </s>, the same targets the transformer predicts).
class UnigramModel {
 public:
  UnigramModel(const std::vector<std::vector<int32_t>>& train_docs, int vocab_size, int eos);
  /// -log p(id).
  double nll(int id) const;
  /// Per-token NLLs of a document and its </s>.
  std::vector<double> document_nll(const std::vector<int32_t>& doc) const;

 private:
  std::vector<double> nll_;
  int eos_;
};

/// Perplexity of one model on a set of documents.
struct PerplexityRow {
  std::string name;
  int64_t documents = 0, tokens = 0;
  double token_ppl = 0;  ///< exp(total NLL / tokens)
  MeanCI doc_nll;        ///< per-document mean NLL with its 95% interval (exp gives ppl)
};

/// eval-lm's result: the transformer beside the add-one unigram baseline, on the same
/// tokens, and the paired difference of their per-document mean NLLs.
struct LmEvaluation {
  std::string data;  ///< what was evaluated, in words
  PerplexityRow model, unigram;
  PairedTest difference;  ///< model minus unigram, per document
};

/// Evaluates a checkpoint folder (config.json, model.safetensors, tokenizer.model and,
/// when present, training_state.json, which names the corpus and split). `texts` empty:
/// the held-out split of the run's corpus (the fortunes package when unknown). The
/// unigram baseline is fitted on the training split of the run's corpus. Documents
/// longer than the training context are scored in chunks (see document_nll).
LmEvaluation evaluate_lm(const std::filesystem::path& model_dir,
                         const std::vector<std::filesystem::path>& texts,
                         const torch::Device& device, std::ostream* progress = nullptr);

/// The evaluation as a text table.
std::string format_evaluation(const LmEvaluation& e);

}  // namespace attnpilot::model
