#include "transport/protocol.h"

namespace attnpilot::transport {

const char* verdict_name(Verdict v) {
  switch (v) {
    case Verdict::kAccepted:
      return "accepted";
    case Verdict::kDuplicate:
      return "duplicate";
    case Verdict::kStale:
      return "stale";
  }
  return "invalid";
}

Verdict SequenceLedger::judge(const std::string& actor, uint64_t seq, uint64_t incarnation,
                              uint64_t my_incarnation, int64_t version, int64_t current_version,
                              int64_t max_lag) {
  ATTNPILOT_CHECK_ARG(max_lag >= 0, "max_lag {} must be >= 0", max_lag);
  auto it = last_.find(actor);
  if (it != last_.end() && seq <= it->second) return Verdict::kDuplicate;
  last_[actor] = seq;
  if (incarnation != my_incarnation) return Verdict::kStale;
  if (version > current_version || current_version - version > max_lag) return Verdict::kStale;
  return Verdict::kAccepted;
}

uint64_t SequenceLedger::expected(const std::string& actor) const {
  auto it = last_.find(actor);
  return it == last_.end() ? 0 : it->second + 1;
}

nlohmann::json SequenceLedger::to_json() const {
  nlohmann::json j = nlohmann::json::object();
  for (const auto& [a, s] : last_) j[a] = s;
  return j;
}

SequenceLedger SequenceLedger::from_json(const nlohmann::json& j) {
  if (!j.is_object()) throw FormatError("sequence ledger: expected a JSON object");
  SequenceLedger l;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!it.value().is_number_unsigned()) {
      throw FormatError(
          fmt::format("sequence ledger: actor '{}' has a non-integer sequence "
                      "number {}",
                      it.key(), it.value().dump()));
    }
    l.last_[it.key()] = it.value().get<uint64_t>();
  }
  return l;
}

Message make_hello(const std::string& actor, uint64_t next_seq, const std::string& env) {
  Message m;
  m.type = MsgType::kHello;
  m.seq = next_seq;
  m.meta = nlohmann::json{{"actor", actor}, {"next_seq", next_seq}, {"env", env}}.dump();
  return m;
}

Message make_welcome(uint64_t incarnation, uint64_t expected_seq, int64_t version) {
  Message m;
  m.type = MsgType::kWelcome;
  m.meta =
      nlohmann::json{
          {"incarnation", incarnation}, {"expected_seq", expected_seq}, {"version", version}}
          .dump();
  return m;
}

Message make_ack(uint64_t seq, Verdict v, int64_t version) {
  Message m;
  m.type = MsgType::kAck;
  m.seq = seq;
  m.meta = nlohmann::json{{"status", verdict_name(v)}, {"version", version}}.dump();
  return m;
}

Message make_error(uint64_t seq, const std::string& message) {
  Message m;
  m.type = MsgType::kError;
  m.seq = seq;
  m.meta = nlohmann::json{{"message", message}}.dump();
  return m;
}

}  // namespace attnpilot::transport
