// The actor role: see remote_roles.h and protocol.h.
#include <map>

#include "common/log.h"
#include "transport/remote_roles.h"
#include "transport/tensor_codec.h"

namespace attnpilot::transport {
namespace {
/// Silence from the learner after which an actor says hello again (see run_actor).
constexpr int64_t kHelloAfterSilenceMs = 3000;
}  // namespace

ActorResult run_actor(zmq::context_t& ctx, const ActorOptions& opts, ActorBackend& backend) {
  ATTNPILOT_CHECK_ARG(!opts.actor_id.empty() && opts.actor_id.size() <= 128,
                      "actor id '{}' must have 1-128 characters", opts.actor_id);
  ATTNPILOT_CHECK_ARG(opts.max_unacked > 0, "max_unacked {} must be positive", opts.max_unacked);
  SocketOptions so = opts.socket;
  so.routing_id = "actor-" + opts.actor_id;
  const std::string role = "actor " + opts.actor_id;
  auto sock = connect_client(ctx, zmq::socket_type::dealer, so, role, opts.endpoint, opts.security);
  Monitor mon(ctx, *sock);

  ActorResult res;
  NamedParams params = backend.parameters();
  bool have_weights = false;
  int64_t version = -1, learner_version = -1, max_lag = 0;
  uint64_t incarnation = 0, next_seq = 0;
  std::map<uint64_t, std::string> unacked;  // seq -> encoded frame
  int64_t last_heard = now_ms(), last_hello = 0;
  bool connected_once = false, lost = false;

  auto hello = [&] {
    if (!sock->send(make_hello(opts.actor_id, next_seq, opts.env_name), 100))
      log::debug(fmt::format("{}: hello not sent (no connection yet); asking again later", role));
    last_hello = now_ms();
  };
  hello();
  log::info(fmt::format("{}: connecting to {} for '{}'", role, opts.endpoint, opts.env_name));

  while (true) {
    if (opts.stop_flag && opts.stop_flag->load()) {
      log::info(fmt::format("{}: stop requested", role));
      return res;
    }
    for (const auto& ev : mon.poll(0)) {
      if (ev.id == ZMQ_EVENT_DISCONNECTED) {
        lost = true;
        log::warn(fmt::format("{}: connection to the learner lost ({}); reconnecting", role,
                              ev.endpoint));
      } else if (ev.id == ZMQ_EVENT_HANDSHAKE_SUCCEEDED) {
        if (connected_once) {
          ++res.reconnects;
          log::info(
              fmt::format("{}: reconnected to {}; asking for current weights", role, ev.endpoint));
          hello();
        }
        connected_once = true;
        lost = false;
      } else if (ev.id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH) {
        log::error(fmt::format("{}: the learner refused our key ({})", role, ev.endpoint));
      }
    }
    if (now_ms() - last_heard > opts.max_idle_s * 1000) {
      throw IoError(fmt::format("{}: nothing heard from the learner at {} for {} s; giving up",
                                role, opts.endpoint, opts.max_idle_s));
    }
    const bool behind = learner_version - version > max_lag;
    const bool can_send =
        have_weights && !lost && !behind && static_cast<int>(unacked.size()) < opts.max_unacked;
    // Waiting for weights (never had them, or too far behind) and hearing nothing: ask again.
    // And whatever we wait for, after kHelloAfterSilenceMs of silence: a learner that restarted
    // unseen (the monitor's reconnect event missed, or our hello dropped before the new
    // connection was up, with our window of unacknowledged chunks full of chunks the dead
    // learner never acked) answers nothing but a hello. A hello to the same learner is
    // harmless: its welcome makes us resend the unacknowledged chunks, which it refuses as
    // duplicates if it already has them.
    const int64_t silence = now_ms() - last_heard, since_hello = now_ms() - last_hello;
    if (((!have_weights || behind) && since_hello > 1000 && silence > 1000) ||
        (silence > kHelloAfterSilenceMs && since_hello > kHelloAfterSilenceMs))
      hello();

    // Read everything that arrived (wait a little only when there is nothing to do).
    for (int wait = can_send ? 0 : 50;; wait = 0) {
      auto r = sock->recv(wait);
      if (!r) break;
      last_heard = now_ms();
      const Message& m = r->msg;
      try {
        const auto meta = parse_meta(m);
        switch (m.type) {
          case MsgType::kWelcome: {
            const uint64_t inc = meta_get<uint64_t>(meta, "incarnation", m);
            const uint64_t expected = meta_get<uint64_t>(meta, "expected_seq", m);
            if (inc != incarnation) {
              if (incarnation != 0)
                log::warn(
                    fmt::format("{}: learner restarted (incarnation {:016x} -> {:016x}); "
                                "{} unacknowledged chunk(s) dropped",
                                role, incarnation, inc, unacked.size()));
              unacked.clear();
              incarnation = inc;
              have_weights = false;  // wait for this learner's weights
            } else {
              // Same learner after a reconnect: resend what it may not have judged.
              for (auto it = unacked.begin(); it != unacked.end();) {
                if (it->first < expected) {
                  it = unacked.erase(it);
                } else {
                  sock->send_raw(it->second, 100);
                  ++it;
                }
              }
            }
            next_seq = std::max(next_seq, expected);
            break;
          }
          case MsgType::kWeights: {
            const uint64_t inc = meta_get<uint64_t>(meta, "incarnation", m);
            const int64_t v = meta_get<int64_t>(meta, "version", m);
            if (incarnation != 0 && inc != incarnation) break;  // from a dead learner
            incarnation = inc;
            load_blobs_into(m.tensors, params);
            version = v;
            learner_version = std::max(learner_version, v);
            max_lag = meta_get<int64_t>(meta, "max_lag", m);
            if (!have_weights) log::info(fmt::format("{}: received weights version {}", role, v));
            have_weights = true;
            ++res.weights_received;
            break;
          }
          case MsgType::kAck: {
            unacked.erase(m.seq);
            learner_version = std::max(learner_version, meta_get<int64_t>(meta, "version", m));
            break;
          }
          case MsgType::kShutdown:
            log::info(fmt::format("{}: learner finished training; {} chunks sent", role,
                                  res.chunks_sent));
            res.shutdown_received = true;
            return res;
          case MsgType::kError:
            log::warn(fmt::format("{}: learner error: {}", role, m.meta));
            break;
          default:
            log::warn(fmt::format("{}: unexpected {} message ignored", role, type_name(m.type)));
        }
      } catch (const DecodeError& e) {
        log::warn(fmt::format("{}: bad {} message ignored: {}", role, type_name(m.type), e.what()));
      }
    }
    if (!(have_weights && !lost && learner_version - version <= max_lag &&
          static_cast<int>(unacked.size()) < opts.max_unacked))
      continue;

    Chunk c = backend.collect();
    Message t;
    t.type = MsgType::kTrajectory;
    t.seq = next_seq;
    nlohmann::json meta{{"actor", opts.actor_id}, {"incarnation", incarnation},
                        {"version", version},     {"steps", c.steps},
                        {"episodes", c.episodes}, {"episode_return_sum", c.episode_return_sum}};
    t.meta = meta.dump();
    for (const auto& [name, tensor] : c.tensors) t.tensors.push_back(to_blob(name, tensor));
    std::string bytes = encode(t);
    if (!sock->send_raw(bytes, 1000)) {
      log::warn(
          fmt::format("{}: learner not accepting (queue full); chunk {} dropped", role, next_seq));
      continue;
    }
    unacked.emplace(next_seq, std::move(bytes));
    ++next_seq;
    ++res.chunks_sent;
  }
}

}  // namespace attnpilot::transport
