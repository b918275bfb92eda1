#include "transport/socket.h"

#include <atomic>
#include <zmq_addon.hpp>

#include "common/log.h"

namespace attnpilot::transport {
namespace {

template <typename F>
auto checked(const std::string& role, const char* op, const std::string& ep, F&& f)
    -> decltype(f()) {
  try {
    return f();
  } catch (const zmq::error_t& e) {
    throw IoError(fmt::format("{}: zmq {} failed{}{}: {} (errno {})", role, op,
                              ep.empty() ? "" : " on ", ep, e.what(), e.num()));
  }
}

bool router_like(zmq::socket_type t) { return t == zmq::socket_type::router; }

}  // namespace

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

Socket::Socket(zmq::context_t& ctx, zmq::socket_type type, SocketOptions opts, std::string role)
    : type_(type), opts_(std::move(opts)), role_(std::move(role)) {
  ATTNPILOT_CHECK_ARG(opts_.max_message_bytes > 0, "{}: max_message_bytes {} must be positive",
                      role_, opts_.max_message_bytes);
  ATTNPILOT_CHECK_ARG(
      static_cast<uint64_t>(opts_.max_message_bytes) <= opts_.limits.max_message_bytes,
      "{}: ZMQ_MAXMSGSIZE {} exceeds the decoder limit {}", role_, opts_.max_message_bytes,
      opts_.limits.max_message_bytes);
  ATTNPILOT_CHECK_ARG(opts_.heartbeat_ivl_ms > 0 && opts_.heartbeat_timeout_ms > 0,
                      "{}: heartbeat interval {} ms and timeout {} ms must be positive", role_,
                      opts_.heartbeat_ivl_ms, opts_.heartbeat_timeout_ms);
  checked(role_, "socket", "", [&] {
    sock_ = zmq::socket_t(ctx, type);
    sock_.set(zmq::sockopt::maxmsgsize, opts_.max_message_bytes);
    sock_.set(zmq::sockopt::sndhwm, opts_.send_hwm);
    sock_.set(zmq::sockopt::rcvhwm, opts_.recv_hwm);
    sock_.set(zmq::sockopt::heartbeat_ivl, opts_.heartbeat_ivl_ms);
    sock_.set(zmq::sockopt::heartbeat_timeout, opts_.heartbeat_timeout_ms);
    sock_.set(zmq::sockopt::heartbeat_ttl, opts_.heartbeat_ttl_ms);
    sock_.set(zmq::sockopt::linger, opts_.linger_ms);
    sock_.set(zmq::sockopt::reconnect_ivl, opts_.reconnect_ivl_ms);
    sock_.set(zmq::sockopt::reconnect_ivl_max, opts_.reconnect_ivl_max_ms);
    if (!opts_.routing_id.empty()) sock_.set(zmq::sockopt::routing_id, opts_.routing_id);
    if (router_like(type)) {
      // A reconnecting actor reuses its routing id: let the new connection take it over
      // instead of being refused while libzmq still holds the dead one.
      sock_.set(zmq::sockopt::router_handover, 1);
    }
    return 0;
  });
}

void Socket::fail(const char* op, const std::string& endpoint, const zmq::error_t& e) const {
  throw IoError(fmt::format("{}: zmq {} failed on {}: {} (errno {})", role_, op, endpoint, e.what(),
                            e.num()));
}

void Socket::set_curve_server(const CurveServer& keys) {
  ATTNPILOT_CHECK_ARG(keys.public_key.size() == 40 && keys.secret_key.size() == 40,
                      "{}: CURVE keys must be 40 Z85 characters (got {} and {})", role_,
                      keys.public_key.size(), keys.secret_key.size());
  checked(role_, "setsockopt(CURVE server)", "", [&] {
    sock_.set(zmq::sockopt::curve_server, 1);
    sock_.set(zmq::sockopt::curve_secretkey, keys.secret_key);
    sock_.set(zmq::sockopt::curve_publickey, keys.public_key);
    sock_.set(zmq::sockopt::zap_domain, std::string("attnpilot"));
    return 0;
  });
}

void Socket::set_curve_client(const CurveClient& keys) {
  ATTNPILOT_CHECK_ARG(keys.public_key.size() == 40 && keys.secret_key.size() == 40 &&
                          keys.server_public_key.size() == 40,
                      "{}: CURVE keys must be 40 Z85 characters", role_);
  checked(role_, "setsockopt(CURVE client)", "", [&] {
    sock_.set(zmq::sockopt::curve_serverkey, keys.server_public_key);
    sock_.set(zmq::sockopt::curve_publickey, keys.public_key);
    sock_.set(zmq::sockopt::curve_secretkey, keys.secret_key);
    return 0;
  });
}

void Socket::bind(const std::string& endpoint) {
  checked(role_, "bind", endpoint, [&] {
    sock_.bind(endpoint);
    return 0;
  });
  endpoint_ = endpoint;
}

void Socket::connect(const std::string& endpoint) {
  checked(role_, "connect", endpoint, [&] {
    sock_.connect(endpoint);
    return 0;
  });
  endpoint_ = endpoint;
}

void Socket::disconnect(const std::string& endpoint) {
  checked(role_, "disconnect", endpoint, [&] {
    sock_.disconnect(endpoint);
    return 0;
  });
}

std::string Socket::last_endpoint() {
  return checked(role_, "getsockopt(LAST_ENDPOINT)", endpoint_,
                 [&] { return sock_.get(zmq::sockopt::last_endpoint); });
}

bool Socket::send(const Message& m, int timeout_ms) {
  return checked(role_, "send", endpoint_, [&] {
    sock_.set(zmq::sockopt::sndtimeo, timeout_ms);
    zmq::message_t frame(encoded_size(m));
    encode_into(m, static_cast<char*>(frame.data()));
    return sock_.send(frame, zmq::send_flags::none).has_value();
  });
}

bool Socket::send_raw(const std::string& bytes, int timeout_ms) {
  return checked(role_, "send", endpoint_, [&] {
    sock_.set(zmq::sockopt::sndtimeo, timeout_ms);
    return sock_.send(zmq::buffer(bytes), zmq::send_flags::none).has_value();
  });
}

bool Socket::send_to(const std::vector<std::string>& envelope, const Message& m) {
  try {
    for (const auto& part : envelope) {
      if (!sock_.send(zmq::buffer(part), zmq::send_flags::sndmore | zmq::send_flags::dontwait))
        return false;
    }
    zmq::message_t frame(encoded_size(m));
    encode_into(m, static_cast<char*>(frame.data()));
    return sock_.send(frame, zmq::send_flags::dontwait).has_value();
  } catch (const zmq::error_t& e) {
    // ROUTER without ROUTER_MANDATORY drops frames for unknown peers silently; an error
    // here is EHOSTUNREACH/EAGAIN style: the peer is gone.
    if (e.num() == EHOSTUNREACH || e.num() == EAGAIN) return false;
    fail("send", endpoint_, e);
  }
}

std::optional<Received> Socket::recv(int timeout_ms) {
  std::vector<zmq::message_t> parts;
  try {
    zmq::pollitem_t item{sock_.handle(), 0, ZMQ_POLLIN, 0};
    const int rc = zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms));
    if (rc == 0 || !(item.revents & ZMQ_POLLIN)) return std::nullopt;
    auto n = zmq::recv_multipart(sock_, std::back_inserter(parts), zmq::recv_flags::dontwait);
    if (!n) return std::nullopt;
  } catch (const zmq::error_t& e) {
    if (e.num() == EINTR) return std::nullopt;
    fail("recv", endpoint_, e);
  }
  if (parts.empty()) return std::nullopt;
  Received r;
  const zmq::message_t& body = parts.back();
  r.wire_bytes = body.size();
  for (size_t i = 0; i + 1 < parts.size(); ++i) r.envelope.push_back(parts[i].to_string());
  try {
    if (router_like(type_) && parts.size() < 2) {
      throw DecodeError(DecodeErrorKind::kTruncated, "ROUTER frame without a routing id");
    }
    if (!router_like(type_) && parts.size() != 1) {
      throw DecodeError(DecodeErrorKind::kTrailingBytes,
                        fmt::format("multipart message of {} frames, expected 1", parts.size()));
    }
    r.msg = decode(body.data(), body.size(), opts_.limits);
  } catch (const DecodeError& e) {
    counters_.add(e.kind());
    log::warn(fmt::format("{}: refused a {}-byte frame ({}): {}; refused so far: {}", role_,
                          body.size(), decode_error_kind_name(e.kind()), e.what(),
                          counters_.summary()));
    return std::nullopt;
  }
  return r;
}

std::string Monitor::Event::name() const {
  switch (id) {
    case ZMQ_EVENT_CONNECTED:
      return "connected";
    case ZMQ_EVENT_CONNECT_DELAYED:
      return "connect_delayed";
    case ZMQ_EVENT_CONNECT_RETRIED:
      return "connect_retried";
    case ZMQ_EVENT_LISTENING:
      return "listening";
    case ZMQ_EVENT_BIND_FAILED:
      return "bind_failed";
    case ZMQ_EVENT_ACCEPTED:
      return "accepted";
    case ZMQ_EVENT_ACCEPT_FAILED:
      return "accept_failed";
    case ZMQ_EVENT_CLOSED:
      return "closed";
    case ZMQ_EVENT_CLOSE_FAILED:
      return "close_failed";
    case ZMQ_EVENT_DISCONNECTED:
      return "disconnected";
    case ZMQ_EVENT_MONITOR_STOPPED:
      return "monitor_stopped";
    case ZMQ_EVENT_HANDSHAKE_FAILED_NO_DETAIL:
      return "handshake_failed";
    case ZMQ_EVENT_HANDSHAKE_SUCCEEDED:
      return "handshake_succeeded";
    case ZMQ_EVENT_HANDSHAKE_FAILED_PROTOCOL:
      return "handshake_failed_protocol";
    case ZMQ_EVENT_HANDSHAKE_FAILED_AUTH:
      return "handshake_failed_auth";
  }
  return fmt::format("event_{}", id);
}

Monitor::Monitor(zmq::context_t& ctx, Socket& socket) : socket_(socket) {
  static std::atomic<uint64_t> counter{0};
  address_ = fmt::format("inproc://attnpilot-monitor-{}-{}", reinterpret_cast<uintptr_t>(&socket),
                         counter.fetch_add(1));
  const int rc = zmq_socket_monitor(socket.raw().handle(), address_.c_str(), ZMQ_EVENT_ALL);
  if (rc != 0) {
    throw IoError(
        fmt::format("{}: zmq_socket_monitor failed: {}", socket.role(), zmq_strerror(zmq_errno())));
  }
  checked(socket.role(), "monitor connect", address_, [&] {
    pair_ = zmq::socket_t(ctx, zmq::socket_type::pair);
    pair_.set(zmq::sockopt::linger, 0);
    pair_.connect(address_);
    return 0;
  });
}

Monitor::~Monitor() {
  zmq_socket_monitor(socket_.raw().handle(), nullptr, 0);  // stop; errors irrelevant here
}

std::vector<Monitor::Event> Monitor::poll(int timeout_ms) {
  std::vector<Event> out;
  try {
    zmq::pollitem_t item{pair_.handle(), 0, ZMQ_POLLIN, 0};
    if (zmq::poll(&item, 1, std::chrono::milliseconds(timeout_ms)) == 0) return out;
    while (true) {
      std::vector<zmq::message_t> parts;
      auto n = zmq::recv_multipart(pair_, std::back_inserter(parts), zmq::recv_flags::dontwait);
      if (!n) break;
      if (parts.size() != 2 || parts[0].size() != 6) continue;  // not a v1 event
      Event ev;
      const auto* p = static_cast<const uint8_t*>(parts[0].data());
      ev.id = static_cast<uint16_t>(p[0] | (p[1] << 8));
      uint32_t v = 0;
      for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[2 + i]) << (8 * i);
      ev.value = static_cast<int32_t>(v);
      ev.endpoint = parts[1].to_string();
      out.push_back(std::move(ev));
    }
  } catch (const zmq::error_t& e) {
    if (e.num() == EINTR) return out;
    throw IoError(fmt::format("{}: reading monitor events failed: {}", socket_.role(), e.what()));
  }
  return out;
}

std::vector<bool> poll_readable(const std::vector<zmq::socket_t*>& sockets, int timeout_ms) {
  std::vector<zmq::pollitem_t> items;
  for (auto* s : sockets) items.push_back({s->handle(), 0, ZMQ_POLLIN, 0});
  try {
    zmq::poll(items.data(), items.size(), std::chrono::milliseconds(timeout_ms));
  } catch (const zmq::error_t& e) {
    if (e.num() != EINTR) throw IoError(fmt::format("zmq poll failed: {}", e.what()));
  }
  std::vector<bool> out;
  for (const auto& it : items) out.push_back((it.revents & ZMQ_POLLIN) != 0);
  return out;
}

}  // namespace attnpilot::transport
