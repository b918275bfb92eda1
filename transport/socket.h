#pragma once
/// RAII ZeroMQ sockets that speak the codec, with every option set deliberately and every
/// libzmq error turned into attnpilot::IoError naming the role, the call and the endpoint.
///
///   actor (DEALER) ──frame──► learner (ROUTER) receives [routing id, frame]
///   client (REQ/DEALER) ────► env-server (ROUTER) receives [routing id, (empty,) frame]
///
/// A received frame that fails to decode is counted in `counters()`, logged, and dropped;
/// the caller keeps running.
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>
#include <zmq.hpp>

#include "transport/codec.h"

namespace attnpilot::transport {

/// Socket options applied before bind/connect.
struct SocketOptions {
  /// ZMQ_MAXMSGSIZE: libzmq drops the connection of a peer that sends a bigger frame,
  /// before our decoder sees a byte. Same bound as the decoder's Limits.
  int64_t max_message_bytes = static_cast<int64_t>(Limits{}.max_message_bytes);
  /// High-water marks (frames queued per peer). Trajectory chunks are ~10-100 kB and
  /// weights up to 40 MB; 64 frames bound a slow learner's memory at a few GB worst case
  /// while letting several actors run ahead by a few chunks. When the mark is reached a
  /// DEALER blocks (actors slow down: back-pressure) and a ROUTER drops (the learner
  /// never blocks on one slow actor; that actor re-requests weights on reconnect).
  int send_hwm = 64;
  int recv_hwm = 64;
  /// ZMTP heartbeats: PING every `heartbeat_ivl_ms`; a peer that has not answered within
  /// `heartbeat_timeout_ms` is disconnected. With timeout = 2 x interval a silent peer
  /// is noticed at most interval + timeout = 3 intervals after it went silent.
  int heartbeat_ivl_ms = 500;
  int heartbeat_timeout_ms = 1000;
  /// TTL advertised to the peer (it drops us if it hears nothing for this long).
  int heartbeat_ttl_ms = 1500;
  /// Pending frames are discarded at close: a dead peer must not block shutdown.
  int linger_ms = 0;
  int reconnect_ivl_ms = 100;
  int reconnect_ivl_max_ms = 1000;
  /// ZMQ_ROUTING_ID for DEALER/REQ sockets (empty: libzmq picks one).
  std::string routing_id;
  /// Limits given to the decoder.
  Limits limits;
};

/// CURVE settings of one socket. Keys are 40-character Z85 text.
struct CurveServer {
  std::string public_key, secret_key;
};
struct CurveClient {
  std::string public_key, secret_key, server_public_key;
};

/// One received, decoded message and the routing envelope it came with (ROUTER sockets:
/// the peer's routing id and any delimiter frames; empty for other socket types).
struct Received {
  std::vector<std::string> envelope;
  Message msg;
  size_t wire_bytes = 0;
};

class Socket {
 public:
  /// `role` names the socket in errors and logs ("learner", "actor 3", ...).
  Socket(zmq::context_t& ctx, zmq::socket_type type, SocketOptions opts, std::string role);
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;

  /// Makes this a CURVE server; must precede bind. Needs a ZapHandler on the same context
  /// to restrict clients (without one libzmq admits every client that knows our key).
  void set_curve_server(const CurveServer& keys);
  /// Makes this a CURVE client; must precede connect.
  void set_curve_client(const CurveClient& keys);

  void bind(const std::string& endpoint);
  void connect(const std::string& endpoint);
  void disconnect(const std::string& endpoint);
  /// The endpoint actually bound (resolves tcp://127.0.0.1:* to the port chosen).
  std::string last_endpoint();

  /// Sends one frame (DEALER/REQ/REP/PUB). Returns false if it would block past
  /// `timeout_ms` (HWM reached); -1 waits indefinitely.
  bool send(const Message& m, int timeout_ms = -1);
  /// Sends `envelope` frames then the message (ROUTER). Returns false when the peer is
  /// gone or its queue is full (the frame is dropped, as ROUTER does).
  bool send_to(const std::vector<std::string>& envelope, const Message& m);
  /// Sends raw bytes as one frame (tests use this to inject malformed frames).
  bool send_raw(const std::string& bytes, int timeout_ms = -1);

  /// Waits up to `timeout_ms` for one frame. Returns nullopt on timeout or when the frame
  /// failed to decode (then counted and logged).
  std::optional<Received> recv(int timeout_ms);

  const DecodeCounters& counters() const { return counters_; }
  const std::string& role() const { return role_; }
  zmq::socket_t& raw() { return sock_; }
  zmq::socket_type type() const { return type_; }

 private:
  [[noreturn]] void fail(const char* op, const std::string& endpoint, const zmq::error_t& e) const;

  zmq::socket_t sock_;
  zmq::socket_type type_;
  SocketOptions opts_;
  std::string role_;
  std::string endpoint_;
  DecodeCounters counters_;
};

/// Connection events of one socket (ZMQ_EVENT_*), read without blocking.
class Monitor {
 public:
  struct Event {
    uint16_t id = 0;       ///< ZMQ_EVENT_CONNECTED, _DISCONNECTED, _ACCEPTED, ...
    int32_t value = 0;     ///< fd or errno, per libzmq docs
    std::string endpoint;  ///< local or remote address the event is about
    std::string name() const;
  };
  /// Starts monitoring connect/accept/disconnect/handshake events of `socket`.
  Monitor(zmq::context_t& ctx, Socket& socket);
  ~Monitor();
  Monitor(const Monitor&) = delete;
  Monitor& operator=(const Monitor&) = delete;
  /// Events that arrived so far (waits at most `timeout_ms` for the first).
  std::vector<Event> poll(int timeout_ms = 0);

 private:
  Socket& socket_;
  zmq::socket_t pair_;
  std::string address_;
};

/// Polls several sockets; returns which are readable (same order as given).
std::vector<bool> poll_readable(const std::vector<zmq::socket_t*>& sockets, int timeout_ms);

/// Milliseconds on the steady clock (for liveness bookkeeping).
int64_t now_ms();

}  // namespace attnpilot::transport
