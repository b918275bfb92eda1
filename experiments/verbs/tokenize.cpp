// `attnpilot tokenize`: train a sentencepiece tokenizer on a corpus, or encode text with one.
#include <iostream>

#include "common/error.h"
#include "common/log.h"
#include "experiments/cli.h"
#include "model/corpus.h"
#include "model/tokenizer.h"

namespace attnpilot::cli {
namespace {

struct TokenizeArgs {
  bool train = false;
  std::vector<std::string> corpus;
  int vocab_size = 2000;
  std::string model_type = "unigram";
  double validation_fraction = 0.05;
  std::string out;
  std::string model;
  std::string text;
};

void run_tokenize(const TokenizeArgs& a) {
  if (a.train) {
    if (a.out.empty()) throw UsageError("tokenize --train needs --out FILE");
    std::vector<std::filesystem::path> inputs(a.corpus.begin(), a.corpus.end());
    if (inputs.empty()) inputs.push_back(model::kFortunesDir);
    model::Corpus corpus = model::load_corpus(inputs, a.validation_fraction);
    model::TokenizerTrainOptions opt;
    opt.vocab_size = a.vocab_size;
    opt.model_type = a.model_type;
    log::info(fmt::format("training a {} tokenizer (vocab {}) on {} documents from {} files",
                          a.model_type, a.vocab_size, corpus.train.size(), corpus.files.size()));
    model::Tokenizer tok = model::Tokenizer::train(corpus.train, opt);
    tok.save(a.out);
    int64_t tokens = 0, bytes = 0;
    for (const auto& d : corpus.validation) {
      tokens += static_cast<int64_t>(tok.encode(d).size());
      bytes += static_cast<int64_t>(d.size());
    }
    std::cout << fmt::format(
        "wrote {} (vocab {}, fingerprint {}); validation split: {} bytes -> {} tokens ({:.2f} "
        "bytes/token)\n",
        a.out, tok.vocab_size(), tok.fingerprint(), bytes, tokens,
        tokens ? static_cast<double>(bytes) / tokens : 0.0);
    return;
  }
  if (a.model.empty()) throw UsageError("tokenize needs --train or --model FILE");
  std::filesystem::path path = a.model;
  // A checkpoint folder carries its tokenizer as tokenizer.model.
  if (std::filesystem::is_directory(path)) path /= "tokenizer.model";
  model::Tokenizer tok = model::Tokenizer::load(path);
  const auto ids = tok.encode(a.text);
  const auto pieces = tok.encode_pieces(a.text);
  std::cout << "ids:";
  for (int id : ids) std::cout << ' ' << id;
  std::cout << "\npieces:";
  for (const auto& p : pieces) {
    std::string shown;
    for (char c : p)
      shown += c == '\n' ? std::string("\\n") : c == '\t' ? std::string("\\t") : std::string(1, c);
    std::cout << " [" << shown << "]";
  }
  std::cout << fmt::format("\n{} tokens for {} bytes; decodes back exactly: {}\n", ids.size(),
                           a.text.size(), tok.decode(ids) == a.text ? "yes" : "no");
}

void add_tokenize_verb(CLI::App& root) {
  auto args = std::make_shared<TokenizeArgs>();
  auto* cmd = root.add_subcommand(
      "tokenize",
      "Train a sentencepiece tokenizer (--train --out FILE) or encode text (--model FILE --text)");
  cmd->add_flag("--train", args->train, "Train a tokenizer on the corpus's training split");
  cmd->add_option("--corpus", args->corpus, "Text files or folders (default: the fortunes package)")
      ->check(CLI::ExistingPath);
  cmd->add_option("--vocab-size", args->vocab_size, "Vocabulary size (at least 300)")
      ->check(CLI::Range(300, 1000000));
  cmd->add_option("--type", args->model_type, "unigram or bpe")
      ->check(CLI::IsMember({"unigram", "bpe"}));
  cmd->add_option("--validation-fraction", args->validation_fraction,
                  "Share of documents held out (by hash)")
      ->check(CLI::Range(0.001, 0.999));
  cmd->add_option("--out", args->out, "Where --train writes the model");
  cmd->add_option("--model", args->model, "A tokenizer.model file or a checkpoint folder")
      ->check(CLI::ExistingPath);
  cmd->add_option("--text", args->text, "Text to encode");
  cmd->callback([args] { run_tokenize(*args); });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(tokenize, 12, add_tokenize_verb);

}  // namespace attnpilot::cli
