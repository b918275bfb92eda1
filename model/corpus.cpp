#include "model/corpus.h"

#include <algorithm>
#include <cstring>
#include <unordered_set>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/hash.h"
#include "common/log.h"

namespace attnpilot::model {
namespace fs = std::filesystem;
namespace {

bool skipped_in_folder(const fs::path& p) {
  const std::string name = p.filename().string();
  return name.empty() || name[0] == '.' || p.extension() == ".dat";
}

/// Removes control characters other than \n and \t; a backspace also removes the
/// character before it (overstriking "_\bx" becomes "x").
std::string clean(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char c : text) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '\b') {
      if (!out.empty() && out.back() != '\n') out.pop_back();
      continue;
    }
    if (c == '\r') continue;
    if ((u < 0x20 && c != '\n' && c != '\t') || u == 0x7f) continue;
    out.push_back(c);
  }
  return out;
}

std::string rstrip(std::string_view s) {
  size_t n = s.size();
  while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t')) --n;
  return std::string(s.substr(0, n));
}

bool blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t'; });
}

/// Joins lines [begin, end) after dropping blank lines at both ends.
void emit(const std::vector<std::string>& lines, size_t begin, size_t end,
          std::vector<std::string>& out) {
  while (begin < end && blank(lines[begin])) ++begin;
  while (end > begin && blank(lines[end - 1])) --end;
  if (begin == end) return;
  std::string doc;
  for (size_t i = begin; i < end; ++i) {
    if (i > begin) doc += '\n';
    doc += lines[i];
  }
  out.push_back(std::move(doc));
}

uint64_t mix64(uint64_t x) {  // splitmix64 finaliser: spreads FNV's bits over all 64
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

constexpr char kCacheMagic[8] = {'A', 'P', 'T', 'O', 'K', '0', '1', '\n'};

void put_i64(std::string& s, int64_t v) { s.append(reinterpret_cast<const char*>(&v), 8); }

void put_docs(std::string& s, const std::vector<std::vector<int32_t>>& docs) {
  put_i64(s, static_cast<int64_t>(docs.size()));
  for (const auto& d : docs) {
    put_i64(s, static_cast<int64_t>(d.size()));
    s.append(reinterpret_cast<const char*>(d.data()), d.size() * sizeof(int32_t));
  }
}

/// Reads what put_docs wrote; returns false on any inconsistency.
bool get_docs(std::string_view s, size_t& pos, std::vector<std::vector<int32_t>>& docs, int vocab) {
  auto get = [&](int64_t& v) {
    if (pos + 8 > s.size()) return false;
    std::memcpy(&v, s.data() + pos, 8);
    pos += 8;
    return true;
  };
  int64_t n = 0;
  if (!get(n) || n < 0 || n > static_cast<int64_t>(s.size())) return false;
  docs.resize(n);
  for (auto& d : docs) {
    int64_t len = 0;
    if (!get(len) || len < 0 || len > static_cast<int64_t>((s.size() - pos) / 4)) return false;
    d.resize(len);
    std::memcpy(d.data(), s.data() + pos, len * 4);
    pos += len * 4;
    for (int32_t id : d)
      if (id < 0 || id >= vocab) return false;
  }
  return true;
}

std::vector<std::vector<int32_t>> encode_all(const std::vector<std::string>& docs,
                                             const Tokenizer& tok) {
  std::vector<std::vector<int32_t>> out;
  out.reserve(docs.size());
  for (const auto& d : docs) {
    auto ids = tok.encode(d);
    out.emplace_back(ids.begin(), ids.end());
  }
  return out;
}

}  // namespace

std::vector<fs::path> resolve_corpus_files(const std::vector<fs::path>& inputs) {
  ATTNPILOT_CHECK_ARG(!inputs.empty(), "no corpus files or folders given");
  std::vector<fs::path> files;
  for (const auto& in : inputs) {
    std::error_code ec;
    if (!fs::exists(in, ec))
      throw IoError(fmt::format("corpus path '{}' does not exist", in.string()));
    if (fs::is_directory(in, ec)) {
      for (const auto& entry : fs::directory_iterator(in)) {
        if (skipped_in_folder(entry.path())) continue;
        if (!fs::is_regular_file(entry.path(), ec)) continue;  // follows symlinks
        files.push_back(fs::canonical(entry.path()));
      }
    } else {
      files.push_back(fs::canonical(in));
    }
  }
  std::sort(files.begin(), files.end());
  files.erase(std::unique(files.begin(), files.end()), files.end());
  ATTNPILOT_CHECK_ARG(!files.empty(), "no text files found in the {} corpus path(s) given",
                      inputs.size());
  return files;
}

std::vector<std::string> split_documents(std::string_view raw) {
  const std::string text = clean(raw);
  std::vector<std::string> lines;
  size_t start = 0;
  while (start <= text.size()) {
    size_t nl = text.find('\n', start);
    if (nl == std::string::npos) nl = text.size();
    lines.push_back(rstrip(std::string_view(text).substr(start, nl - start)));
    start = nl + 1;
  }
  const bool fortune =
      std::any_of(lines.begin(), lines.end(), [](const std::string& l) { return l == "%"; });
  std::vector<std::string> docs;
  size_t begin = 0;
  for (size_t i = 0; i <= lines.size(); ++i) {
    const bool boundary = i == lines.size() || (fortune ? lines[i] == "%" : blank(lines[i]));
    if (!boundary) continue;
    emit(lines, begin, i, docs);
    begin = i + 1;
  }
  return docs;
}

bool is_validation_document(std::string_view document, double validation_fraction) {
  const uint64_t h = mix64(Fingerprint().add(document).value());
  const double u = static_cast<double>(h >> 11) * 0x1.0p-53;  // uniform in [0, 1)
  return u < validation_fraction;
}

Corpus load_corpus(const std::vector<fs::path>& inputs, double validation_fraction) {
  ATTNPILOT_CHECK_ARG(validation_fraction > 0 && validation_fraction < 1,
                      "validation fraction {} is outside (0, 1)", validation_fraction);
  Corpus c;
  c.files = resolve_corpus_files(inputs);
  Fingerprint fp;
  fp.add(std::string_view("corpus-v1")).add(static_cast<int64_t>(validation_fraction * 1e9));
  std::unordered_set<std::string> seen;
  for (const auto& f : c.files) {
    const std::string text = read_file(f);
    std::error_code ec;
    const auto mtime = fs::last_write_time(f, ec).time_since_epoch().count();
    fp.add(f.string()).add(static_cast<int64_t>(text.size())).add(static_cast<int64_t>(mtime));
    for (auto& doc : split_documents(text)) {
      if (!seen.insert(doc).second) continue;
      (is_validation_document(doc, validation_fraction) ? c.validation : c.train)
          .push_back(std::move(doc));
    }
  }
  ATTNPILOT_CHECK_ARG(!c.train.empty() && !c.validation.empty(),
                      "corpus of {} file(s) has {} training and {} validation documents; both "
                      "must be non-empty",
                      c.files.size(), c.train.size(), c.validation.size());
  c.fingerprint = fp.hex();
  return c;
}

int64_t TokenizedCorpus::train_tokens() const {
  int64_t n = 0;
  for (const auto& d : train) n += static_cast<int64_t>(d.size());
  return n;
}

int64_t TokenizedCorpus::validation_tokens() const {
  int64_t n = 0;
  for (const auto& d : validation) n += static_cast<int64_t>(d.size());
  return n;
}

TokenizedCorpus tokenize_corpus(const Corpus& corpus, const Tokenizer& tokenizer,
                                const fs::path& cache_dir) {
  const std::string key = Fingerprint()
                              .add(tokenizer.bytes())
                              .add(corpus.fingerprint)
                              .add(static_cast<int64_t>(corpus.train.size()))
                              .add(static_cast<int64_t>(corpus.validation.size()))
                              .hex();
  const fs::path cache = cache_dir.empty() ? fs::path() : cache_dir / ("tokens-" + key + ".bin");
  TokenizedCorpus out;
  std::error_code ec;
  if (!cache.empty() && fs::exists(cache, ec)) {
    const std::string s = read_file(cache);
    size_t pos = sizeof(kCacheMagic);
    const bool ok = s.size() >= pos && std::memcmp(s.data(), kCacheMagic, pos) == 0 &&
                    get_docs(s, pos, out.train, tokenizer.vocab_size()) &&
                    get_docs(s, pos, out.validation, tokenizer.vocab_size()) && pos == s.size() &&
                    out.train.size() == corpus.train.size() &&
                    out.validation.size() == corpus.validation.size();
    if (ok) {
      log::info(fmt::format("token cache {}: {} train + {} validation tokens", cache.string(),
                            out.train_tokens(), out.validation_tokens()));
      return out;
    }
    log::warn(fmt::format("token cache {} is inconsistent; rebuilding it", cache.string()));
    out = TokenizedCorpus{};
  }
  out.train = encode_all(corpus.train, tokenizer);
  out.validation = encode_all(corpus.validation, tokenizer);
  if (!cache.empty()) {
    fs::create_directories(cache_dir);
    std::string s(kCacheMagic, sizeof(kCacheMagic));
    put_docs(s, out.train);
    put_docs(s, out.validation);
    write_file_atomic(cache, s);
    log::info(fmt::format("tokenized {} + {} documents into {} + {} tokens; cached in {}",
                          corpus.train.size(), corpus.validation.size(), out.train_tokens(),
                          out.validation_tokens(), cache.string()));
  }
  return out;
}

}  // namespace attnpilot::model
