// Tokenizer: training, exact round trip (byte fallback: nothing unknown), save/load.
#include "model/tokenizer.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <random>

#include "common/atomic_file.h"
#include "common/error.h"
#include "model/corpus.h"

namespace attnpilot::model {
namespace {

std::vector<std::string> small_corpus() {
  // A few fortune files: enough text for a 600-piece vocabulary, quick to train.
  std::vector<std::string> docs;
  for (const char* name : {"fortunes", "goedel", "magic", "medicine"}) {
    auto d = split_documents(read_file(std::filesystem::path(kFortunesDir) / name));
    docs.insert(docs.end(), d.begin(), d.end());
  }
  return docs;
}

class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(std::filesystem::path(kFortunesDir) / "fortunes")) return;
    docs_ = new std::vector<std::string>(small_corpus());
    TokenizerTrainOptions opt;
    opt.vocab_size = 600;
    tok_ = new Tokenizer(Tokenizer::train(*docs_, opt));
  }
  static void TearDownTestSuite() {
    delete tok_;
    delete docs_;
    tok_ = nullptr;
    docs_ = nullptr;
  }
  void SetUp() override {
    if (!tok_) GTEST_SKIP() << "fortunes package missing: run scripts/install-deps.sh";
  }
  static Tokenizer* tok_;
  static std::vector<std::string>* docs_;
};
Tokenizer* TokenizerTest::tok_ = nullptr;
std::vector<std::string>* TokenizerTest::docs_ = nullptr;

TEST_F(TokenizerTest, RoundTripsEveryTrainingDocument) {
  ASSERT_GT(docs_->size(), 100u);
  int64_t tokens = 0, bytes = 0;
  for (const auto& d : *docs_) {
    auto ids = tok_->encode(d);
    tokens += static_cast<int64_t>(ids.size());
    bytes += static_cast<int64_t>(d.size());
    ASSERT_EQ(tok_->decode(ids), d);
  }
  // A trained subword vocabulary compresses: fewer tokens than bytes.
  EXPECT_LT(tokens, bytes * 6 / 10);
  EXPECT_LE(tok_->vocab_size(), 600);
  EXPECT_GT(tok_->vocab_size(), 300);
}

TEST_F(TokenizerTest, RoundTripsRandomBytesWithoutUnknownTokens) {
  std::mt19937 rng(7);
  const std::vector<std::string> alphabet = {"a",  "b",    "Z", " ", "  ", "\n",   "\t", "é",
                                             "漢", "🙂", "%", "0", "9",  "\x01", "ß",  "->"};
  for (int trial = 0; trial < 200; ++trial) {
    std::string s;
    const int len = std::uniform_int_distribution<int>(0, 40)(rng);
    for (int i = 0; i < len; ++i)
      s += alphabet[std::uniform_int_distribution<size_t>(0, alphabet.size() - 1)(rng)];
    auto ids = tok_->encode(s);
    for (int id : ids) ASSERT_NE(id, tok_->unk_id()) << "unknown token in '" << s << "'";
    ASSERT_EQ(tok_->decode(ids), s) << "trial " << trial;
  }
}

TEST_F(TokenizerTest, SaveLoadGivesTheSameEncoding) {
  const auto path = std::filesystem::temp_directory_path() /
                    ("attnpilot_tok_" + std::to_string(::getpid()) + ".model");
  tok_->save(path);
  Tokenizer back = Tokenizer::load(path);
  std::filesystem::remove(path);
  EXPECT_EQ(back.bytes(), tok_->bytes());
  EXPECT_EQ(back.fingerprint(), tok_->fingerprint());
  const std::string s = "The quick brown fox\n\tjumps over 12 lazy dogs.";
  EXPECT_EQ(back.encode(s), tok_->encode(s));
  EXPECT_EQ(back.encode_pieces(s), tok_->encode_pieces(s));
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
}

TEST_F(TokenizerTest, RejectsBadInput) {
  EXPECT_THROW(tok_->decode({tok_->vocab_size()}), InvalidArgument);
  EXPECT_THROW(tok_->decode({-1}), InvalidArgument);
  EXPECT_THROW(Tokenizer::from_bytes("not a model"), FormatError);
  TokenizerTrainOptions opt;
  opt.model_type = "wordpiece";
  EXPECT_THROW(Tokenizer::train({"abc"}, opt), InvalidArgument);
  opt = {};
  opt.vocab_size = 10;
  EXPECT_THROW(Tokenizer::train({"abc"}, opt), InvalidArgument);
  EXPECT_THROW(Tokenizer::train({"", ""}, TokenizerTrainOptions{}), InvalidArgument);
}

TEST(TokenizerBpe, TrainsAndRoundTrips) {
  std::vector<std::string> docs;
  for (int i = 0; i < 200; ++i)
    docs.push_back(fmt::format("line {} of the tiny corpus, with words repeated {}", i, i % 7));
  TokenizerTrainOptions opt;
  opt.vocab_size = 320;
  opt.model_type = "bpe";
  Tokenizer tok = Tokenizer::train(docs, opt);
  for (const auto& d : docs) EXPECT_EQ(tok.decode(tok.encode(d)), d);
}

}  // namespace
}  // namespace attnpilot::model
