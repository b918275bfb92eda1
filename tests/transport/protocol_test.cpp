// The exactly-once ledger: duplicates refused, stale chunks consume their sequence number,
// and the ledger survives a JSON round trip (as in a learner checkpoint).
#include "transport/protocol.h"

#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "transport/tensor_codec.h"

namespace attnpilot::transport {
namespace {

TEST(Ledger, DuplicatesAreRefusedAndStaleChunksAreConsumed) {
  SequenceLedger l;
  const uint64_t inc = 77;
  EXPECT_EQ(l.expected("a"), 0u);
  EXPECT_EQ(l.judge("a", 0, inc, inc, 5, 5, 1), Verdict::kAccepted);
  EXPECT_EQ(l.judge("a", 0, inc, inc, 5, 5, 1), Verdict::kDuplicate);
  EXPECT_EQ(l.judge("a", 1, inc, inc, 4, 5, 1), Verdict::kAccepted);   // lag 1 allowed
  EXPECT_EQ(l.judge("a", 2, inc, inc, 3, 5, 1), Verdict::kStale);      // lag 2
  EXPECT_EQ(l.judge("a", 2, inc, inc, 5, 5, 1), Verdict::kDuplicate);  // consumed
  EXPECT_EQ(l.judge("a", 5, inc + 1, inc, 5, 5, 1), Verdict::kStale);  // other incarnation
  EXPECT_EQ(l.judge("a", 6, inc, inc, 9, 5, 1), Verdict::kStale);      // future version
  EXPECT_EQ(l.expected("a"), 7u);
  EXPECT_EQ(l.judge("b", 3, inc, inc, 5, 5, 0), Verdict::kAccepted);  // gaps are fine
  EXPECT_THROW(l.judge("b", 4, inc, inc, 5, 5, -1), InvalidArgument);
}

TEST(Ledger, RandomReplaysCountEachChunkOnce) {
  // Reference: a set of (actor, seq) already counted. Chunks arrive in order per actor,
  // with random resends of earlier chunks (as after reconnects).
  std::mt19937_64 rng(11);
  SequenceLedger l;
  std::map<std::string, uint64_t> next;
  std::set<std::pair<std::string, uint64_t>> counted;
  int accepted = 0;
  for (int i = 0; i < 5000; ++i) {
    const std::string actor = fmt::format("actor-{}", rng() % 4);
    uint64_t seq;
    if (next[actor] > 0 && rng() % 3 == 0) {
      seq = rng() % next[actor];  // a resend
    } else {
      seq = next[actor]++;
    }
    const Verdict v = l.judge(actor, seq, 1, 1, 0, 0, 0);
    const bool fresh = counted.insert({actor, seq}).second;
    EXPECT_EQ(v == Verdict::kAccepted, fresh) << actor << " " << seq;
    accepted += v == Verdict::kAccepted;
  }
  EXPECT_EQ(static_cast<size_t>(accepted), counted.size());
}

TEST(Ledger, JsonRoundTripAndBadInput) {
  SequenceLedger l;
  l.judge("x", 41, 1, 1, 0, 0, 0);
  l.judge("y", 7, 1, 1, 0, 0, 0);
  const SequenceLedger back = SequenceLedger::from_json(nlohmann::json::parse(l.to_json().dump()));
  EXPECT_EQ(back.expected("x"), 42u);
  EXPECT_EQ(back.expected("y"), 8u);
  EXPECT_EQ(back.to_json(), l.to_json());
  EXPECT_THROW(SequenceLedger::from_json(nlohmann::json::array()), FormatError);
  EXPECT_THROW(SequenceLedger::from_json(nlohmann::json{{"x", "seven"}}), FormatError);
  EXPECT_THROW(SequenceLedger::from_json(nlohmann::json{{"x", -1}}), FormatError);
}

TEST(Protocol, BuildersCarryTheirFields) {
  const Message h = make_hello("actor-3", 12, "cartpole");
  const Message back = decode(encode(h).data(), encode(h).size());
  const auto j = parse_meta(back);
  EXPECT_EQ(meta_get<std::string>(j, "actor", back), "actor-3");
  EXPECT_EQ(meta_get<uint64_t>(j, "next_seq", back), 12u);
  const Message a = make_ack(9, Verdict::kStale, 4);
  EXPECT_EQ(meta_get<std::string>(parse_meta(a), "status", a), "stale");
}

}  // namespace
}  // namespace attnpilot::transport
