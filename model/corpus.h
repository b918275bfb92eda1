#pragma once
/// Text corpora for language-model training and evaluation.
///
///   files / folders ──► documents ──hash split──► train | validation
///                                      │
///                     Tokenizer ──────►┴──► TokenizedCorpus (cached on disk)
///
/// A document is a fortune entry when the file has lines holding only `%` (the fortune
/// format), otherwise a paragraph (text between blank lines). Whether a document is held
/// out depends only on a hash of its text, so adding files never reshuffles the split.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "model/tokenizer.h"

namespace attnpilot::model {

/// Where Debian's `fortunes` package puts its files.
inline constexpr const char* kFortunesDir = "/usr/share/games/fortunes";

/// Expands files and folders into the list of text files to read, sorted and without
/// duplicates (symlinks such as fortunes' `*.u8` are resolved; `.dat` index files and
/// hidden files inside folders are skipped). Throws IoError naming a path that does not
/// exist, InvalidArgument when nothing is left.
std::vector<std::filesystem::path> resolve_corpus_files(
    const std::vector<std::filesystem::path>& inputs);

/// Splits file text into documents: fortune entries when some line is exactly `%`,
/// otherwise paragraphs. Control characters other than newline and tab are removed (the
/// fortune files use backspace overstriking), trailing spaces on lines dropped, and each
/// document trimmed of blank lines at both ends; empty documents are skipped.
std::vector<std::string> split_documents(std::string_view text);

/// True when `document` belongs to the validation split: a 64-bit hash of its text,
/// mapped to [0, 1), is below `validation_fraction`.
bool is_validation_document(std::string_view document, double validation_fraction);

/// Documents of a corpus, split into train and validation.
struct Corpus {
  std::vector<std::string> train;
  std::vector<std::string> validation;
  std::vector<std::filesystem::path> files;  ///< the files read
  /// 16 hex digits over the files' paths, sizes and modification times and the fraction.
  std::string fingerprint;
};

/// Reads the files (see resolve_corpus_files) and splits their documents. Documents that
/// occur more than once are kept once. Throws InvalidArgument when validation_fraction is
/// outside (0, 1) or no documents are found.
Corpus load_corpus(const std::vector<std::filesystem::path>& inputs,
                   double validation_fraction = 0.05);

/// Token ids of each document, for one tokenizer; no BOS/EOS added.
struct TokenizedCorpus {
  std::vector<std::vector<int32_t>> train;
  std::vector<std::vector<int32_t>> validation;
  int64_t train_tokens() const;
  int64_t validation_tokens() const;
};

/// Tokenizes a corpus, reusing `cache_dir/tokens-<key>.bin` when present, where the key
/// hashes the tokenizer bytes and the corpus fingerprint. A new cache file is written
/// atomically. An unreadable or inconsistent cache file is ignored and rewritten.
/// An empty `cache_dir` disables the cache.
TokenizedCorpus tokenize_corpus(const Corpus& corpus, const Tokenizer& tokenizer,
                                const std::filesystem::path& cache_dir);

}  // namespace attnpilot::model
