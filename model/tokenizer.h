#pragma once
/// Subword tokenizer: a sentencepiece model (unigram or BPE) trained on documents, with
/// byte fallback so that every UTF-8 string encodes without an unknown token and decodes
/// back to the same bytes. The model travels as bytes (`tokenizer.model` inside a
/// checkpoint folder).
///
///   documents ──train──► Tokenizer ──encode──► ids ──decode──► text (identical)
///                            │
///                            └── bytes() / save() ──► tokenizer.model
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace attnpilot::model {

/// Options for training a tokenizer.
struct TokenizerTrainOptions {
  int vocab_size = 2000;               ///< total pieces, including <unk>, <s>, </s> and 256 bytes
  std::string model_type = "unigram";  ///< "unigram" or "bpe"
  double character_coverage = 0.9995;  ///< rarer characters fall back to bytes
  int num_threads = 2;
  int64_t max_sentence_chars = 1 << 16;  ///< longer documents are skipped in training
};

/// A loaded sentencepiece model. Cheap to copy (the processor is shared and immutable).
class Tokenizer {
 public:
  /// Trains on `documents` (each may hold newlines and tabs; they are kept as pieces).
  /// Throws InvalidArgument for bad options or an empty corpus, Error if training fails.
  static Tokenizer train(const std::vector<std::string>& documents,
                         const TokenizerTrainOptions& options);
  /// Loads from serialized model bytes. Throws FormatError when they are not a model.
  static Tokenizer from_bytes(std::string bytes);
  /// Loads a model file. Throws IoError / FormatError naming the path.
  static Tokenizer load(const std::filesystem::path& path);

  /// Writes the model bytes atomically.
  void save(const std::filesystem::path& path) const;
  /// The serialized model (what `save` writes).
  const std::string& bytes() const { return bytes_; }
  /// 16 hex digits identifying the model bytes.
  std::string fingerprint() const;

  /// Encodes text to ids (no BOS/EOS added).
  std::vector<int> encode(std::string_view text) const;
  /// Encodes text to pieces (for display).
  std::vector<std::string> encode_pieces(std::string_view text) const;
  /// Decodes ids; throws InvalidArgument naming an id outside [0, vocab_size).
  std::string decode(const std::vector<int>& ids) const;
  /// The piece string of one id.
  std::string piece(int id) const;

  int vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;

 private:
  Tokenizer(std::string bytes, std::shared_ptr<sentencepiece::SentencePieceProcessor> sp);
  std::string bytes_;
  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
};

}  // namespace attnpilot::model
