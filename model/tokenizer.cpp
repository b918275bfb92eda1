#include "model/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <unordered_map>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/hash.h"

namespace attnpilot::model {
namespace {

/// Feeds documents to the sentencepiece trainer without writing them to a file.
class VectorIterator : public sentencepiece::SentenceIterator {
 public:
  explicit VectorIterator(const std::vector<std::string>& docs) : docs_(docs) { skip(); }
  bool done() const override { return i_ >= docs_.size(); }
  void Next() override {
    ++i_;
    skip();
  }
  const std::string& value() const override { return docs_[i_]; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  void skip() {
    while (i_ < docs_.size() && docs_[i_].empty()) ++i_;
  }
  const std::vector<std::string>& docs_;
  size_t i_ = 0;
};

}  // namespace

Tokenizer::Tokenizer(std::string bytes, std::shared_ptr<sentencepiece::SentencePieceProcessor> sp)
    : bytes_(std::move(bytes)), sp_(std::move(sp)) {}

Tokenizer Tokenizer::train(const std::vector<std::string>& documents,
                           const TokenizerTrainOptions& options) {
  ATTNPILOT_CHECK_ARG(options.model_type == "unigram" || options.model_type == "bpe",
                      "tokenizer model_type '{}' is not one of unigram, bpe", options.model_type);
  // 3 special pieces + 256 byte pieces + the two user-defined symbols "\n" and "\t".
  ATTNPILOT_CHECK_ARG(options.vocab_size >= 300 && options.vocab_size <= 1000000,
                      "tokenizer vocab_size {} is outside [300, 1000000] (256 byte pieces are "
                      "always included)",
                      options.vocab_size);
  ATTNPILOT_CHECK_ARG(options.character_coverage > 0 && options.character_coverage <= 1,
                      "tokenizer character_coverage {} is outside (0, 1]",
                      options.character_coverage);
  ATTNPILOT_CHECK_ARG(options.num_threads >= 1, "tokenizer num_threads {} must be at least 1",
                      options.num_threads);
  size_t nonempty = 0;
  for (const auto& d : documents) nonempty += !d.empty();
  ATTNPILOT_CHECK_ARG(nonempty > 0, "cannot train a tokenizer on {} documents, none non-empty",
                      documents.size());

  // Identity normalisation and no whitespace folding, so decode(encode(x)) == x; newline
  // and tab are pieces of their own; byte fallback covers every other character.
  std::unordered_map<std::string, std::string> kw{
      {"vocab_size", std::to_string(options.vocab_size)},
      {"model_type", options.model_type},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"user_defined_symbols", "\n,\t"},
      {"character_coverage", fmt::format("{}", options.character_coverage)},
      {"max_sentence_length", std::to_string(options.max_sentence_chars)},
      {"num_threads", std::to_string(options.num_threads)},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"hard_vocab_limit", "false"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"minloglevel", "2"},
  };
  VectorIterator it(documents);
  std::string serialized;
  auto status = sentencepiece::SentencePieceTrainer::Train(kw, &it, &serialized);
  if (!status.ok())
    throw Error(fmt::format("sentencepiece training ({} documents, vocab_size {}) failed: {}",
                            documents.size(), options.vocab_size, status.ToString()));
  return from_bytes(std::move(serialized));
}

Tokenizer Tokenizer::from_bytes(std::string bytes) {
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  auto status = sp->LoadFromSerializedProto(bytes);
  if (!status.ok())
    throw FormatError(
        fmt::format("not a sentencepiece model ({} bytes): {}", bytes.size(), status.ToString()));
  return Tokenizer(std::move(bytes), std::move(sp));
}

Tokenizer Tokenizer::load(const std::filesystem::path& path) {
  std::string bytes = read_file(path);
  try {
    return from_bytes(std::move(bytes));
  } catch (const FormatError& e) {
    throw FormatError(fmt::format("{}: {}", path.string(), e.what()));
  }
}

void Tokenizer::save(const std::filesystem::path& path) const { write_file_atomic(path, bytes_); }

std::string Tokenizer::fingerprint() const { return Fingerprint().add(bytes_).hex(); }

std::vector<int> Tokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  auto status = sp_->Encode(text, &ids);
  if (!status.ok())
    throw Error(
        fmt::format("sentencepiece could not encode {} bytes: {}", text.size(), status.ToString()));
  return ids;
}

std::vector<std::string> Tokenizer::encode_pieces(std::string_view text) const {
  std::vector<std::string> pieces;
  auto status = sp_->Encode(text, &pieces);
  if (!status.ok())
    throw Error(
        fmt::format("sentencepiece could not encode {} bytes: {}", text.size(), status.ToString()));
  return pieces;
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  const int n = vocab_size();
  for (int id : ids)
    ATTNPILOT_CHECK_ARG(id >= 0 && id < n, "token id {} is outside [0, {})", id, n);
  std::string text;
  auto status = sp_->Decode(ids, &text);
  if (!status.ok())
    throw Error(
        fmt::format("sentencepiece could not decode {} ids: {}", ids.size(), status.ToString()));
  return text;
}

std::string Tokenizer::piece(int id) const {
  ATTNPILOT_CHECK_ARG(id >= 0 && id < vocab_size(), "token id {} is outside [0, {})", id,
                      vocab_size());
  return sp_->IdToPiece(id);
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
int Tokenizer::unk_id() const { return sp_->unk_id(); }

}  // namespace attnpilot::model
