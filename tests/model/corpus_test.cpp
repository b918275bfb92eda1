// Corpus: `%` entry parsing, paragraphs, deterministic hash split, file resolution, cache.
#include "model/corpus.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"

namespace attnpilot::model {
namespace {
namespace fs = std::filesystem;

class TempDir {
 public:
  TempDir() {
    path_ = fs::temp_directory_path() /
            ("attnpilot_corpus_" + std::to_string(::getpid()) + "_" + std::to_string(counter_++));
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

TEST(SplitDocuments, ParsesFortuneEntries) {
  const std::string text =
      "First entry.\n%\nSecond entry,\n  two lines.  \n%\n\n%\n\nThird\n\n-- Author\n\n%\n";
  auto docs = split_documents(text);
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0], "First entry.");
  EXPECT_EQ(docs[1], "Second entry,\n  two lines.");
  EXPECT_EQ(docs[2], "Third\n\n-- Author");
}

TEST(SplitDocuments, PercentInsideALineIsText) {
  auto docs = split_documents("50% off\n%\n%% not a separator\n");
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], "50% off");
  EXPECT_EQ(docs[1], "%% not a separator");
}

TEST(SplitDocuments, PlainTextSplitsIntoParagraphs) {
  auto docs = split_documents("One para\nstill one.\n\n\nTwo.\r\n \nThree\n");
  ASSERT_EQ(docs.size(), 3u);
  EXPECT_EQ(docs[0], "One para\nstill one.");
  EXPECT_EQ(docs[1], "Two.");
  EXPECT_EQ(docs[2], "Three");
}

TEST(SplitDocuments, RemovesOverstrikingAndControlCharacters) {
  auto docs = split_documents("_\bb_\bo_\bl_\bd\x01 text\x7f\n");
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_EQ(docs[0], "bold text");
}

TEST(Split, IsDeterministicAndNearTheFraction) {
  int held = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const std::string d = "document number " + std::to_string(i);
    const bool v = is_validation_document(d, 0.1);
    EXPECT_EQ(v, is_validation_document(d, 0.1));
    // Monotone in the fraction: held out at 0.1 implies held out at 0.2.
    if (v) {
      EXPECT_TRUE(is_validation_document(d, 0.2));
    }
    held += v;
  }
  // Binomial(20000, 0.1): sd = 42; 6 sd either side.
  EXPECT_NEAR(held, n / 10, 260);
}

TEST(LoadCorpus, AddingAFileDoesNotMoveExistingDocuments) {
  TempDir dir;
  std::string a, b;
  for (int i = 0; i < 300; ++i) a += "entry a" + std::to_string(i) + "\n%\n";
  for (int i = 0; i < 300; ++i) b += "entry b" + std::to_string(i) + "\n%\n";
  write_file_atomic(dir.path() / "a", a);
  Corpus one = load_corpus({dir.path() / "a"}, 0.2);
  write_file_atomic(dir.path() / "b", b);
  fs::create_symlink(dir.path() / "a", dir.path() / "a.u8");  // duplicate through a link
  write_file_atomic(dir.path() / "a.dat", std::string("\x01\x02\x03", 3));
  Corpus two = load_corpus({dir.path()}, 0.2);
  ASSERT_EQ(two.files.size(), 2u);  // a and b; a.u8 resolves to a; a.dat skipped
  EXPECT_EQ(one.train.size() + one.validation.size(), 300u);
  EXPECT_EQ(two.train.size() + two.validation.size(), 600u);
  auto contains = [](const std::vector<std::string>& v, const std::string& s) {
    return std::find(v.begin(), v.end(), s) != v.end();
  };
  for (const auto& d : one.validation) EXPECT_TRUE(contains(two.validation, d)) << d;
  for (const auto& d : one.train) EXPECT_TRUE(contains(two.train, d)) << d;
  EXPECT_NE(one.fingerprint, two.fingerprint);
  EXPECT_EQ(two.fingerprint, load_corpus({dir.path()}, 0.2).fingerprint);
  EXPECT_NE(two.fingerprint, load_corpus({dir.path()}, 0.3).fingerprint);
}

TEST(LoadCorpus, DropsDuplicateDocuments) {
  TempDir dir;
  write_file_atomic(dir.path() / "x", "same\n%\nsame\n%\nother\n%\nthird\n%\nfourth\n");
  write_file_atomic(dir.path() / "y", "same\n%\nfifth\n");
  // A fraction of 0.5 puts some of five distinct documents on each side with
  // overwhelming probability; the assertion only needs both sides non-empty.
  Corpus c = load_corpus({dir.path() / "x", dir.path() / "y"}, 0.5);
  EXPECT_EQ(c.train.size() + c.validation.size(), 5u);
}

TEST(LoadCorpus, RejectsBadInput) {
  TempDir dir;
  EXPECT_THROW(load_corpus({dir.path() / "missing"}), IoError);
  EXPECT_THROW(load_corpus({}), InvalidArgument);
  EXPECT_THROW(load_corpus({dir.path()}), InvalidArgument);  // empty folder
  write_file_atomic(dir.path() / "t", "a\n%\nb\n");
  EXPECT_THROW(load_corpus({dir.path()}, 0.0), InvalidArgument);
  EXPECT_THROW(load_corpus({dir.path()}, 1.0), InvalidArgument);
}

TEST(LoadCorpus, ReadsTheFortunesPackage) {
  if (!fs::exists(fs::path(kFortunesDir) / "fortunes"))
    GTEST_SKIP() << "fortunes package missing: run scripts/install-deps.sh";
  Corpus c = load_corpus({kFortunesDir}, 0.05);
  for (const auto& f : c.files) {
    EXPECT_NE(f.extension(), ".dat");
    EXPECT_NE(f.extension(), ".u8");
  }
  const size_t n = c.train.size() + c.validation.size();
  EXPECT_GT(n, 5000u);
  EXPECT_NEAR(static_cast<double>(c.validation.size()) / n, 0.05, 0.01);
}

TEST(TokenizeCorpus, CacheGivesTheSameTokensAndIsKeyedByTokenizer) {
  TempDir dir;
  std::string text;
  for (int i = 0; i < 400; ++i) text += "fortune " + std::to_string(i * 37 % 101) + " says hi\n%\n";
  write_file_atomic(dir.path() / "c", text);
  Corpus c = load_corpus({dir.path() / "c"}, 0.2);
  TokenizerTrainOptions opt;
  opt.vocab_size = 300;
  Tokenizer tok = Tokenizer::train(c.train, opt);
  const fs::path cache = dir.path() / "cache";
  TokenizedCorpus fresh = tokenize_corpus(c, tok, cache);
  ASSERT_EQ(std::distance(fs::directory_iterator(cache), fs::directory_iterator()), 1);
  TokenizedCorpus cached = tokenize_corpus(c, tok, cache);
  EXPECT_EQ(fresh.train, cached.train);
  EXPECT_EQ(fresh.validation, cached.validation);
  TokenizedCorpus uncached = tokenize_corpus(c, tok, {});
  EXPECT_EQ(fresh.train, uncached.train);
  for (size_t i = 0; i < c.train.size(); ++i) {
    std::vector<int> ids(fresh.train[i].begin(), fresh.train[i].end());
    EXPECT_EQ(tok.decode(ids), c.train[i]);
  }
  // A corrupted cache file is detected and rebuilt.
  for (const auto& e : fs::directory_iterator(cache)) write_file_atomic(e.path(), "garbage");
  TokenizedCorpus rebuilt = tokenize_corpus(c, tok, cache);
  EXPECT_EQ(fresh.train, rebuilt.train);
  // Another tokenizer gets another cache file.
  opt.model_type = "bpe";
  Tokenizer tok2 = Tokenizer::train(c.train, opt);
  ASSERT_NE(tok2.fingerprint(), tok.fingerprint());
  tokenize_corpus(c, tok2, cache);
  EXPECT_EQ(std::distance(fs::directory_iterator(cache), fs::directory_iterator()), 2);
}

}  // namespace
}  // namespace attnpilot::model
