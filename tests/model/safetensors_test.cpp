// Safetensors reader/writer: round trips in every dtype, and a corpus of malformed files
// (built here) each refused with the right rule, naming file and tensor, without a crash.
#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "common/atomic_file.h"
#include "model_test_util.h"

namespace attnpilot::model {
namespace {

using R = SafetensorsRule;
using testing::TempDir;

/// A file made of an explicit header text (length prefix computed unless given) and data.
std::string raw_file(const std::string& header, const std::string& data, int64_t length = -1) {
  const uint64_t n = length >= 0 ? static_cast<uint64_t>(length) : header.size();
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((n >> (8 * i)) & 0xFF));
  return out + header + data;
}

/// Plain (not fsynced) write: the corpus writes hundreds of small files.
void write_plain(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

/// Writes `bytes` to DIR/name and reads it back; returns the rule it was refused with,
/// failing the test if it was accepted or refused with another exception type.
struct Refusal {
  SafetensorsRule rule;
  std::string tensor, message;
};

Refusal refuse(const TempDir& dir, const std::string& bytes, const std::string& name = "bad.st") {
  const auto path = dir.path() / name;
  write_plain(path, bytes);
  try {
    read_safetensors(path);
  } catch (const SafetensorsError& e) {
    EXPECT_EQ(e.file(), path.string());
    EXPECT_NE(std::string(e.what()).find(path.string()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(rule_name(e.rule())), std::string::npos) << e.what();
    if (!e.tensor().empty()) {
      EXPECT_NE(std::string(e.what()).find("'" + e.tensor() + "'"), std::string::npos) << e.what();
    }
    return {e.rule(), e.tensor(), e.what()};
  }
  ADD_FAILURE() << "accepted a malformed file: " << bytes.substr(8, 200);
  return {R::kTruncated, "", ""};
}

std::string entry(const std::string& dtype, const std::string& shape, uint64_t b, uint64_t e) {
  return fmt::format(R"("dtype":"{}","shape":{},"data_offsets":[{},{}])", dtype, shape, b, e);
}

TEST(SafetensorsTest, RoundTripEveryDtype) {
  TempDir dir;
  torch::manual_seed(1);
  std::vector<std::pair<std::string, torch::Tensor>> in{
      {"f32", torch::randn({3, 5})},
      {"f16", torch::randn({7}).to(torch::kFloat16)},
      {"bf16", torch::randn({2, 3, 4}).to(torch::kBFloat16)},
      {"scalar", torch::tensor(3.5f)},
      {"empty", torch::zeros({0, 4})},
      {"strided", torch::randn({4, 6}).t()},  // non-contiguous input
  };
  const auto path = dir.path() / "x.safetensors";
  write_safetensors(path, in, {{"format", "pt"}, {"note", "héllo"}});
  const auto bytes = read_file(path);
  const uint64_t n = static_cast<unsigned char>(bytes[0]) |
                     (static_cast<uint64_t>(static_cast<unsigned char>(bytes[1])) << 8);
  EXPECT_EQ(n % 8, 0u) << "header padded to 8 bytes";

  const auto f = read_safetensors(path);
  EXPECT_EQ(f.header.metadata.at("format"), "pt");
  EXPECT_EQ(f.header.metadata.at("note"), "héllo");
  ASSERT_EQ(f.tensors.size(), in.size());
  for (const auto& [name, t] : in) {
    const auto& got = f.tensors.at(name);
    EXPECT_EQ(got.scalar_type(), t.scalar_type()) << name;
    EXPECT_EQ(got.sizes(), t.sizes()) << name;
    EXPECT_TRUE(torch::equal(got, t)) << name;
  }
  EXPECT_EQ(f.header.find("bf16")->dtype, Dtype::kBF16);
  EXPECT_EQ(f.header.find("f16")->dtype, Dtype::kF16);
  EXPECT_EQ(f.header.find("nothing"), nullptr);
  // The header alone, without data.
  const auto h = read_header(path);
  EXPECT_EQ(h.tensors.size(), in.size());
  EXPECT_EQ(h.data_start + h.data_size, bytes.size());
}

TEST(SafetensorsTest, WriterRefusesBadInput) {
  EXPECT_THROW(serialize_safetensors({{"x", torch::zeros({2}, torch::kInt64)}}), InvalidArgument);
  EXPECT_THROW(serialize_safetensors({{"x", torch::zeros({2})}, {"x", torch::zeros({2})}}),
               InvalidArgument);
  EXPECT_THROW(serialize_safetensors({{"__metadata__", torch::zeros({2})}}), InvalidArgument);
  EXPECT_THROW(serialize_safetensors({{"", torch::zeros({2})}}), InvalidArgument);
}

TEST(SafetensorsTest, EmptyHeaderIsValid) {
  TempDir dir;
  write_file_atomic(dir.path() / "e.st", raw_file("{}", ""));
  EXPECT_TRUE(read_safetensors(dir.path() / "e.st").tensors.empty());
  // Reference implementations pad headers with trailing spaces.
  write_file_atomic(dir.path() / "p.st", raw_file("{}      ", ""));
  EXPECT_TRUE(read_safetensors(dir.path() / "p.st").tensors.empty());
}

TEST(SafetensorsTest, EveryTruncationIsRefused) {
  TempDir dir;
  const auto bytes = serialize_safetensors(
      {{"a", torch::randn({2, 3})}, {"b", torch::randn({5}).to(torch::kBFloat16)}});
  const uint64_t header_end =
      8 + (static_cast<unsigned char>(bytes[0]) |
           static_cast<uint64_t>(static_cast<unsigned char>(bytes[1])) << 8);
  for (size_t len = 0; len < bytes.size(); ++len) {
    const Refusal r = refuse(dir, bytes.substr(0, len));
    SafetensorsRule expected = len < 8            ? R::kTruncated
                               : len < header_end ? R::kHeaderPastEnd
                                                  : R::kOffsetsPastEnd;
    EXPECT_EQ(r.rule, expected) << "length " << len << ": " << r.message;
  }
  // Extra bytes after the last tensor are a gap too.
  EXPECT_EQ(refuse(dir, bytes + "x").rule, R::kGap);
}

TEST(SafetensorsTest, MalformedCorpus) {
  TempDir dir;
  const std::string d8(8, '\0'), d12(12, '\0'), d16(16, '\0'), d20(20, '\0');
  struct Case {
    const char* what;
    std::string bytes;
    SafetensorsRule rule;
    std::string tensor;
  };
  const std::vector<Case> cases{
      {"overlap",
       raw_file(
           "{\"a\":{" + entry("F32", "[2]", 0, 8) + "},\"b\":{" + entry("F32", "[2]", 4, 12) + "}}",
           d12),
       R::kOverlap, "b"},
      {"offsets past the end",
       raw_file(
           "{\"a\":{" + entry("F32", "[2]", 0, 8) + "},\"b\":{" + entry("F32", "[2]", 8, 16) + "}}",
           d12),
       R::kOffsetsPastEnd, "b"},
      {"header too large", raw_file("{}", d8, 100'000'001), R::kHeaderTooLarge, ""},
      {"header length past EOF", raw_file("{}", d8, 1000), R::kHeaderPastEnd, ""},
      {"header length near 2^64", raw_file("{}", d8, INT64_MAX), R::kHeaderTooLarge, ""},
      {"non-UTF-8 header", raw_file("{\"a\xff\":{" + entry("F32", "[2]", 0, 8) + "}}", d8),
       R::kHeaderNotUtf8, ""},
      {"overlong UTF-8", raw_file("{\"\xc0\xaf\":{}}", ""), R::kHeaderNotUtf8, ""},
      {"UTF-16 surrogate", raw_file("{\"\xed\xa0\x80\":{}}", ""), R::kHeaderNotUtf8, ""},
      {"not JSON", raw_file("{\"a\": {", ""), R::kHeaderNotJson, ""},
      {"empty header", raw_file("", ""), R::kHeaderNotJson, ""},
      {"trailing garbage", raw_file("{} x", ""), R::kHeaderNotJson, ""},
      {"array header", raw_file("[1, 2]", ""), R::kHeaderNotObject, ""},
      {"entry not an object", raw_file("{\"a\": 3}", ""), R::kHeaderNotObject, "a"},
      {"duplicate names",
       raw_file(
           "{\"a\":{" + entry("F32", "[2]", 0, 8) + "},\"a\":{" + entry("F32", "[2]", 8, 16) + "}}",
           d16),
       R::kDuplicateName, "a"},
      {"duplicate field",
       raw_file("{\"a\":{\"dtype\":\"F32\"," + entry("F32", "[2]", 0, 8) + "}}", d8), R::kBadEntry,
       "a"},
      {"dtype I64", raw_file("{\"a\":{" + entry("I64", "[1]", 0, 8) + "}}", d8),
       R::kUnsupportedDtype, "a"},
      {"dtype F64", raw_file("{\"a\":{" + entry("F64", "[1]", 0, 8) + "}}", d8),
       R::kUnsupportedDtype, "a"},
      {"dtype not a string",
       raw_file("{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", std::string(4, '\0')),
       R::kBadEntry, "a"},
      {"negative dim", raw_file("{\"a\":{" + entry("F32", "[-1,2]", 0, 8) + "}}", d8),
       R::kNegativeDim, "a"},
      {"fractional dim", raw_file("{\"a\":{" + entry("F32", "[2.5]", 0, 8) + "}}", d8),
       R::kBadEntry, "a"},
      {"numel overflow",
       raw_file("{\"a\":{" + entry("F32", "[4294967296,4294967296]", 0, 8) + "}}", d8),
       R::kSizeOverflow, "a"},
      {"bytes overflow",
       raw_file("{\"a\":{" + entry("F32", "[4611686018427387904]", 0, 8) + "}}", d8),
       R::kSizeOverflow, "a"},
      {"dim above int64",
       raw_file("{\"a\":{" + entry("F16", "[18446744073709551615]", 0, 8) + "}}", d8),
       R::kSizeOverflow, "a"},
      {"span mismatch", raw_file("{\"a\":{" + entry("F32", "[3]", 0, 8) + "}}", d8),
       R::kSpanMismatch, "a"},
      {"end before begin", raw_file("{\"a\":{" + entry("F32", "[0]", 8, 0) + "}}", d8),
       R::kSpanMismatch, "a"},
      {"negative offset",
       raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", d8),
       R::kBadEntry, "a"},
      {"three offsets",
       raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,9]}}", d8),
       R::kBadEntry, "a"},
      {"missing field", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", d8), R::kBadEntry,
       "a"},
      {"unknown field", raw_file("{\"a\":{\"x\":1," + entry("F32", "[2]", 0, 8) + "}}", d8),
       R::kBadEntry, "a"},
      {"gap between tensors",
       raw_file("{\"a\":{" + entry("F32", "[2]", 0, 8) + "},\"b\":{" + entry("F32", "[2]", 12, 20) +
                    "}}",
                d20),
       R::kGap, "b"},
      {"gap at start", raw_file("{\"a\":{" + entry("F32", "[2]", 4, 12) + "}}", d12), R::kGap, "a"},
      {"trailing bytes", raw_file("{\"a\":{" + entry("F32", "[2]", 0, 8) + "}}", d16), R::kGap, ""},
      {"metadata not strings", raw_file("{\"__metadata__\":{\"k\":1}}", ""), R::kBadMetadata, ""},
      {"metadata not an object", raw_file("{\"__metadata__\":[]}", ""), R::kBadMetadata, ""},
      {"empty name", raw_file("{\"\":{" + entry("F32", "[2]", 0, 8) + "}}", d8), R::kBadEntry, ""},
  };
  for (const auto& c : cases) {
    const Refusal r = refuse(dir, c.bytes);
    EXPECT_EQ(rule_name(r.rule), std::string(rule_name(c.rule))) << c.what << ": " << r.message;
    EXPECT_EQ(r.tensor, c.tensor) << c.what << ": " << r.message;
  }
  // The unsupported dtype is named in the message.
  EXPECT_NE(refuse(dir, cases[15].bytes).message.find("I64"), std::string::npos);
}

TEST(SafetensorsTest, RandomCorruptionNeverCrashes) {
  // Seeded byte flips of a valid file: each read either succeeds (data bytes) or is
  // refused with a SafetensorsError; anything else fails the test.
  TempDir dir;
  const auto good = serialize_safetensors(
      {{"w", torch::randn({3, 4})}, {"b", torch::randn({4}).to(torch::kFloat16)}}, {{"k", "v"}});
  std::mt19937 rng(7);
  int refused = 0, accepted = 0;
  for (int i = 0; i < 300; ++i) {
    std::string bytes = good;
    const int flips = 1 + static_cast<int>(rng() % 3);
    for (int f = 0; f < flips; ++f) bytes[rng() % bytes.size()] = static_cast<char>(rng() & 0xFF);
    const auto path = dir.path() / "fuzz.st";
    write_plain(path, bytes);
    try {
      read_safetensors(path);
      ++accepted;
    } catch (const SafetensorsError&) {
      ++refused;
    }
  }
  EXPECT_GT(refused, 0);
  EXPECT_GT(accepted, 0);
}

TEST(SafetensorsTest, Utf8Validator) {
  EXPECT_TRUE(is_valid_utf8("plain ascii"));
  EXPECT_TRUE(is_valid_utf8("h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80"));
  EXPECT_FALSE(is_valid_utf8("\x80"));
  EXPECT_FALSE(is_valid_utf8("\xc3"));              // truncated sequence
  EXPECT_FALSE(is_valid_utf8("\xe0\x80\xaf"));      // overlong
  EXPECT_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // above U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xed\xbf\xbf"));      // surrogate
}

TEST(SafetensorsTest, MissingFileIsIoError) {
  TempDir dir;
  EXPECT_THROW(read_safetensors(dir.path() / "absent.safetensors"), IoError);
}

}  // namespace
}  // namespace attnpilot::model
