// The learner role: see remote_roles.h and protocol.h.
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>

#include "common/atomic_file.h"
#include "common/log.h"
#include "transport/remote_roles.h"
#include "transport/tensor_codec.h"

namespace attnpilot::transport {
namespace {

namespace fs = std::filesystem;

constexpr const char* kStateFile = "remote_state.json";

struct ActorInfo {
  std::vector<std::string> envelope;
  int64_t last_seen_ms = 0;
  bool silent = false;
  int64_t sent_version = -1;  // newest weights version sent to this actor
};

struct LearnerState {
  int64_t version = 0, steps_used = 0, updates = 0;
  SequenceLedger ledger;
  // (return sum, episodes) per chunk, the newest chunks covering >= 100 episodes.
  std::deque<std::pair<double, int64_t>> returns;
  int64_t episodes = 0;
  // (actor, seq, steps) of every chunk used in an update: the audit trail that lets a test
  // check that no trajectory was counted twice across learner restarts.
  std::vector<std::tuple<std::string, uint64_t, int64_t>> used;
};

double mean_of(const std::deque<std::pair<double, int64_t>>& v) {
  double s = 0;
  int64_t n = 0;
  for (const auto& [sum, count] : v) {
    s += sum;
    n += count;
  }
  return n ? s / n : 0.0;
}

void add_returns(std::deque<std::pair<double, int64_t>>& v, double sum, int64_t count) {
  if (count <= 0) return;
  v.emplace_back(sum, count);
  int64_t n = 0;
  for (const auto& p : v) n += p.second;
  while (!v.empty() && n - v.front().second >= 100) {
    n -= v.front().second;
    v.pop_front();
  }
}

nlohmann::json state_json(const LearnerState& s, uint64_t incarnation) {
  nlohmann::json used = nlohmann::json::array();
  for (const auto& [a, q, n] : s.used) used.push_back({a, q, n});
  return {{"format_version", 1},    {"version", s.version},         {"steps_used", s.steps_used},
          {"updates", s.updates},   {"ledger", s.ledger.to_json()}, {"returns", s.returns},
          {"episodes", s.episodes}, {"used_chunks", used},          {"incarnation", incarnation}};
}

LearnerState state_from_json(const nlohmann::json& j, const fs::path& file) {
  try {
    if (j.at("format_version").get<int>() != 1) {
      throw FormatError(fmt::format("{}: format_version {} not supported (expected 1)",
                                    file.string(), j.at("format_version").dump()));
    }
    LearnerState s;
    s.version = j.at("version").get<int64_t>();
    s.steps_used = j.at("steps_used").get<int64_t>();
    s.updates = j.at("updates").get<int64_t>();
    s.ledger = SequenceLedger::from_json(j.at("ledger"));
    for (const auto& r : j.at("returns"))
      s.returns.emplace_back(r.at(0).get<double>(), r.at(1).get<int64_t>());
    s.episodes = j.at("episodes").get<int64_t>();
    for (const auto& u : j.at("used_chunks"))
      s.used.emplace_back(u.at(0).get<std::string>(), u.at(1).get<uint64_t>(),
                          u.at(2).get<int64_t>());
    return s;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{}: bad learner state: {}", file.string(), e.what()));
  }
}

Chunk chunk_from_message(const Message& m, const nlohmann::json& meta) {
  Chunk c;
  for (const auto& b : m.tensors) c.tensors.emplace_back(b.name, to_torch(b));
  c.steps = meta_get<int64_t>(meta, "steps", m);
  ATTNPILOT_CHECK_ARG(c.steps > 0 && c.steps < (int64_t{1} << 40),
                      "trajectory seq {} claims {} steps", m.seq, c.steps);
  return c;
}

Message weights_message(NamedParams params, int64_t version, uint64_t incarnation,
                        int64_t max_lag) {
  Message w;
  w.type = MsgType::kWeights;
  w.seq = static_cast<uint64_t>(version);
  w.meta = nlohmann::json{{"version", version}, {"incarnation", incarnation}, {"max_lag", max_lag}}
               .dump();
  w.tensors = params_to_blobs(params);
  return w;
}

// Keeps the metrics lines of updates the checkpoint contains (a resumed run redoes the
// later ones).
void truncate_metrics(const fs::path& metrics, int64_t updates) {
  if (!fs::exists(metrics)) return;
  std::ifstream in(metrics);
  std::string line, kept;
  int64_t dropped = 0;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    try {
      const auto j = nlohmann::json::parse(line);
      if (j.value("update", int64_t{0}) <= updates) {
        kept += line + "\n";
        continue;
      }
    } catch (const nlohmann::json::exception&) {
      // A torn last line from the crash: dropped.
    }
    ++dropped;
  }
  write_file_atomic(metrics, kept);
  if (dropped)
    log::info(fmt::format("learner: dropped {} metrics line(s) after the checkpoint", dropped));
}

}  // namespace

LearnerResult run_learner(zmq::context_t& ctx, const LearnerOptions& opts,
                          LearnerBackend& backend) {
  ATTNPILOT_CHECK_ARG(opts.total_steps > 0, "--total-steps {} must be positive", opts.total_steps);
  ATTNPILOT_CHECK_ARG(opts.steps_per_update > 0, "steps_per_update {} must be positive",
                      opts.steps_per_update);
  ATTNPILOT_CHECK_ARG(opts.max_lag >= 0, "max_lag {} must be >= 0", opts.max_lag);
  ATTNPILOT_CHECK_ARG(opts.checkpoint_every > 0, "checkpoint_every {} must be positive",
                      opts.checkpoint_every);
  fs::create_directories(opts.out_dir);
  const fs::path ckpt = opts.out_dir / "checkpoint";
  const fs::path metrics = opts.out_dir / "metrics.jsonl";

  std::random_device rd;
  uint64_t incarnation =
      (static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid());
  if (incarnation == 0) incarnation = 1;

  LearnerState st;
  if (fs::exists(ckpt / kStateFile)) {
    if (!opts.resume) {
      throw InvalidArgument(
          fmt::format("{} holds a checkpoint; pass --resume to continue it or "
                      "choose another --out",
                      opts.out_dir.string()));
    }
    st = state_from_json(nlohmann::json::parse(read_file(ckpt / kStateFile)), ckpt / kStateFile);
    backend.load(ckpt);
    truncate_metrics(metrics, st.updates);
    log::info(
        fmt::format("learner: resumed from {} at update {}, version {}, {} steps used, {} "
                    "actors in the ledger",
                    ckpt.string(), st.updates, st.version, st.steps_used, st.ledger.actors()));
  } else if (opts.resume) {
    log::warn(fmt::format("learner: --resume given but {} has no checkpoint; starting fresh",
                          opts.out_dir.string()));
  }

  auto checkpoint = [&] {
    const fs::path staged = opts.out_dir / fmt::format("checkpoint.staging-{}", getpid());
    fs::remove_all(staged);
    fs::create_directories(staged);
    backend.save(staged);
    write_file_atomic(staged / kStateFile, state_json(st, incarnation).dump());
    fsync_directory(staged);
    replace_directory(staged, ckpt);
    log::info(fmt::format("learner: checkpoint at update {} (version {}, {} steps) in {}",
                          st.updates, st.version, st.steps_used, ckpt.string()));
  };

  SecureServer server = bind_server(ctx, zmq::socket_type::router, opts.socket, "learner",
                                    opts.endpoint, opts.security);
  Socket& sock = *server.socket;
  Monitor mon(ctx, sock);
  log::info(fmt::format("learner: {} on {}, incarnation {:016x}, {} of {} steps done",
                        opts.env_name, sock.last_endpoint(), incarnation, st.steps_used,
                        opts.total_steps));

  std::map<std::string, ActorInfo> actors;
  std::string weights_bytes;
  int64_t weights_version = -1;
  auto send_weights = [&](ActorInfo& a) {
    const auto& env = a.envelope;
    a.sent_version = st.version;
    if (weights_version != st.version) {
      weights_bytes =
          encode(weights_message(backend.parameters(), st.version, incarnation, opts.max_lag));
      weights_version = st.version;
    }
    try {
      for (const auto& part : env)
        sock.raw().send(zmq::buffer(part), zmq::send_flags::sndmore | zmq::send_flags::dontwait);
      (void)sock.raw().send(zmq::buffer(weights_bytes), zmq::send_flags::dontwait);
    } catch (const zmq::error_t& e) {
      log::warn(fmt::format("learner: weights to an actor dropped: {}", e.what()));
    }
  };

  std::vector<Chunk> pending;
  std::vector<std::tuple<std::string, uint64_t, int64_t>> pending_ids;
  int64_t pending_steps = 0;
  uint64_t accepted = 0, duplicates = 0, stale = 0;
  int64_t last_accept_ms = now_ms();
  const int64_t silent_ms = 3 * opts.socket.heartbeat_ivl_ms;
  auto t_start = std::chrono::steady_clock::now();
  const int64_t steps_at_start = st.steps_used;

  // The last 100 episodes (the window of st.returns) reached the target return. Checked
  // after each update, so the metrics line of that update shows the mean that stopped it.
  auto target_reached = [&] {
    if (std::isnan(opts.target_return)) return false;
    int64_t n = 0;
    for (const auto& p : st.returns) n += p.second;
    return n >= 100 && mean_of(st.returns) >= opts.target_return;
  };
  bool target_hit = false;
  while (st.steps_used < opts.total_steps && !target_hit) {
    if (opts.stop_flag && opts.stop_flag->load()) {
      log::warn("learner: stop requested; writing a checkpoint");
      break;
    }
    if (opts.idle_timeout_s > 0 && now_ms() - last_accept_ms > opts.idle_timeout_s * 1000) {
      checkpoint();
      throw IoError(fmt::format("learner: no trajectory accepted for {} s on {}; giving up",
                                opts.idle_timeout_s, opts.endpoint));
    }
    for (const auto& ev : mon.poll(0)) {
      if (ev.id == ZMQ_EVENT_DISCONNECTED) {
        log::warn(
            fmt::format("learner: peer connection {} lost (closed, or silent past the "
                        "heartbeat timeout)",
                        ev.endpoint));
      } else if (ev.id == ZMQ_EVENT_ACCEPTED) {
        log::info(fmt::format("learner: connection accepted on {}", ev.endpoint));
      } else if (ev.id == ZMQ_EVENT_HANDSHAKE_FAILED_AUTH ||
                 ev.id == ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL) {
        log::warn(fmt::format("learner: handshake failed ({}) on {}", ev.name(), ev.endpoint));
      }
    }
    const int64_t now = now_ms();
    for (auto& [id, a] : actors) {
      if (!a.silent && now - a.last_seen_ms > silent_ms) {
        a.silent = true;
        log::warn(
            fmt::format("learner: actor {} silent for {} ms (3 heartbeat intervals); "
                        "training continues without it until it speaks again",
                        id, now - a.last_seen_ms));
      }
    }

    auto r = sock.recv(50);
    if (r) {
      const Message& m = r->msg;
      try {
        const auto meta = parse_meta(m);
        if (m.type == MsgType::kHello || m.type == MsgType::kTrajectory) {
          const std::string actor = meta_get<std::string>(meta, "actor", m);
          ATTNPILOT_CHECK_ARG(!actor.empty() && actor.size() <= 128,
                              "actor id of {} characters (expected 1-128)", actor.size());
          auto [it, fresh] = actors.try_emplace(actor);
          ActorInfo& info = it->second;
          if (info.silent) log::info(fmt::format("learner: actor {} is back", actor));
          info.silent = false;
          info.last_seen_ms = now_ms();
          info.envelope = r->envelope;
          if (m.type == MsgType::kHello) {
            log::info(
                fmt::format("learner: actor {} joined (next seq {}, expected {}), sending "
                            "weights version {}",
                            actor, meta_get<uint64_t>(meta, "next_seq", m),
                            st.ledger.expected(actor), st.version));
            Message w = make_welcome(incarnation, st.ledger.expected(actor), st.version);
            sock.send_to(r->envelope, w);
            send_weights(info);
          } else {
            const uint64_t inc = meta_get<uint64_t>(meta, "incarnation", m);
            const int64_t ver = meta_get<int64_t>(meta, "version", m);
            const Verdict v =
                st.ledger.judge(actor, m.seq, inc, incarnation, ver, st.version, opts.max_lag);
            if (v != Verdict::kDuplicate) {
              const int64_t eps = meta_get<int64_t>(meta, "episodes", m);
              ATTNPILOT_CHECK_ARG(eps >= 0, "trajectory seq {} claims {} episodes", m.seq, eps);
              add_returns(st.returns, meta_get<double>(meta, "episode_return_sum", m), eps);
              st.episodes += eps;
            }
            if (v == Verdict::kAccepted) {
              Chunk c = chunk_from_message(m, meta);
              pending_steps += c.steps;
              pending_ids.emplace_back(actor, m.seq, c.steps);
              pending.push_back(std::move(c));
              ++accepted;
              last_accept_ms = now_ms();
            } else if (v == Verdict::kDuplicate) {
              ++duplicates;
              log::info(fmt::format("learner: duplicate trajectory {} from actor {} refused", m.seq,
                                    actor));
            } else {
              ++stale;
              log::debug(
                  fmt::format("learner: stale trajectory {} from actor {} (version {}, "
                              "current {}) dropped",
                              m.seq, actor, ver, st.version));
            }
            sock.send_to(r->envelope, make_ack(m.seq, v, st.version));
            if (inc != incarnation && v != Verdict::kDuplicate) {
              // The actor still follows an earlier learner: bring it up to date.
              log::info(fmt::format("learner: actor {} follows incarnation {:016x}; re-syncing",
                                    actor, inc));
              sock.send_to(r->envelope,
                           make_welcome(incarnation, st.ledger.expected(actor), st.version));
              send_weights(info);
            } else if (info.sent_version < st.version) {
              send_weights(info);  // e.g. an actor back from silence
            }
          }
        } else if (m.type == MsgType::kPing) {
          sock.send_to(r->envelope, m);
        } else {
          throw InvalidArgument(
              fmt::format("learner does not accept {} messages", type_name(m.type)));
        }
      } catch (const Error& e) {
        log::warn(fmt::format("learner: {} message refused: {}", type_name(m.type), e.what()));
        sock.send_to(r->envelope, make_error(m.seq, e.what()));
      }
    }

    if (pending_steps >= opts.steps_per_update) {
      const auto t0 = std::chrono::steady_clock::now();
      nlohmann::json um = backend.update(pending);
      const double update_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      // The learner was not listening during the update: nobody fell silent meanwhile.
      const int64_t deaf_ms = static_cast<int64_t>(update_s * 1000);
      for (auto& [id, a] : actors) a.last_seen_ms += deaf_ms;
      st.steps_used += pending_steps;
      ++st.updates;
      ++st.version;
      for (auto& id : pending_ids) st.used.push_back(id);
      pending.clear();
      pending_ids.clear();
      pending_steps = 0;
      // Every actor, silent ones included: ROUTER drops frames for peers that are gone.
      for (auto& [id, a] : actors) send_weights(a);
      const double elapsed =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      // The keys of `attnpilot train`'s metrics.jsonl (step, update, episodes,
      // episode_return_mean, fps, the update's metrics) plus the transport's own.
      const int64_t steps_this_run = st.steps_used - steps_at_start;
      nlohmann::json line{
          {"step", st.steps_used},
          {"update", st.updates},
          {"episodes", st.episodes},
          {"episode_return_mean",
           st.returns.empty() ? nlohmann::json() : nlohmann::json(mean_of(st.returns))},
          {"fps", elapsed > 0 ? steps_this_run / elapsed : 0.0},
          {"version", st.version},
          {"accepted_chunks", accepted},
          {"stale_chunks", stale},
          {"duplicate_chunks", duplicates},
          {"actors", actors.size()},
          {"update_s", update_s},
          {"elapsed_s", elapsed},
          {"decode_errors", sock.counters().total()}};
      for (auto it = um.begin(); it != um.end(); ++it) line[it.key()] = it.value();
      append_line_durable(metrics, line.dump());
      log::info(
          fmt::format("learner: update {} version {} steps {}/{} mean return {:.1f} "
                      "(accepted {}, stale {}, duplicate {})",
                      st.updates, st.version, st.steps_used, opts.total_steps, mean_of(st.returns),
                      accepted, stale, duplicates));
      if (st.updates % opts.checkpoint_every == 0) checkpoint();
      target_hit = target_reached();
    }
  }
  checkpoint();
  const bool finished = st.steps_used >= opts.total_steps || target_hit;
  if (finished) {
    if (st.steps_used < opts.total_steps)
      log::info(fmt::format("learner: target return {} reached at step {}", opts.target_return,
                            st.steps_used));
    Message bye;
    bye.type = MsgType::kShutdown;
    for (const auto& [id, a] : actors) sock.send_to(a.envelope, bye);
    // Let the shutdown frames leave before the socket closes (linger is 0).
    const int64_t until = now_ms() + 300;
    while (now_ms() < until) (void)sock.recv(20);
    log::info(fmt::format("learner: done, {} steps in {} updates, mean return {:.1f}",
                          st.steps_used, st.updates, mean_of(st.returns)));
  }
  LearnerResult res;
  res.steps_used = st.steps_used;
  res.updates = st.updates;
  res.version = st.version;
  res.accepted = accepted;
  res.duplicates = duplicates;
  res.stale = stale;
  res.mean_return = mean_of(st.returns);
  return res;
}

}  // namespace attnpilot::transport
