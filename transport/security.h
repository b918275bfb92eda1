#pragma once
/// CURVE keys, the ZAP handler that admits only listed client keys, and the bind policy.
///
///   keygen --out P   ->  P.pub (public key, Z85, 40 chars)   P.key (secret key, mode 0600)
///   server: --curve-key SERVER  --authorized-keys FILE (one client public key a line)
///   client: --curve-key CLIENT  --server-key SERVER.pub
#include <atomic>
#include <filesystem>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <zmq.hpp>

#include "transport/socket.h"

namespace attnpilot::transport {

/// Throws Unavailable unless this libzmq was built with CURVE (zmq_has("curve")).
void require_curve();
bool curve_available();

/// A CURVE key pair in Z85 text (40 characters each).
struct KeyPair {
  std::string public_key;
  std::string secret_key;
};

/// A fresh key pair from libsodium through zmq_curve_keypair.
KeyPair generate_keypair();
/// The public key of a secret key (zmq_curve_public).
std::string public_from_secret(const std::string& secret_z85);
/// Writes PREFIX.pub (0644) and PREFIX.key (0600) atomically. Refuses to overwrite.
void write_keypair(const std::filesystem::path& prefix, const KeyPair& keys);
/// Reads one Z85 key (first line whose first token is a key; '#' lines are comments). Throws
/// FormatError naming the file.
std::string read_key_file(const std::filesystem::path& path);
/// Reads PREFIX.key (refusing group/world-readable files) and derives the public key.
KeyPair read_keypair(const std::filesystem::path& prefix);
/// One Z85 public key per line (the line's first token; text after it is a comment).
/// Lines whose first token is not a key and starts with '#' are comments.
std::set<std::string> read_authorized_keys(const std::filesystem::path& path);

/// True for endpoints only this host can reach: inproc://, ipc://, tcp://127.x.x.x:*,
/// tcp://localhost:*, tcp://[::1]:*.
bool is_loopback_endpoint(const std::string& endpoint);
/// Throws InvalidArgument when `endpoint` is not loopback, CURVE is off and `insecure`
/// is false (the message says to use --curve-key/--authorized-keys or --insecure).
void check_bind_policy(const std::string& endpoint, bool curve, bool insecure);

/// ZAP (RFC 27) handler on inproc://zeromq.zap.01 of `ctx`: admits CURVE clients whose
/// public key is in `allowed`, refuses every other request, logs each decision. One per
/// context; it must exist before the server socket binds. Stops in the destructor.
class ZapHandler {
 public:
  ZapHandler(zmq::context_t& ctx, std::set<std::string> allowed_z85);
  ~ZapHandler();
  ZapHandler(const ZapHandler&) = delete;
  ZapHandler& operator=(const ZapHandler&) = delete;
  uint64_t admitted() const { return admitted_.load(); }
  uint64_t refused() const { return refused_.load(); }

 private:
  void run();
  zmq::socket_t sock_;
  std::set<std::string> allowed_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> admitted_{0}, refused_{0};
  std::thread thread_;
};

/// Security settings of one endpoint, as given on the command line.
struct SecurityConfig {
  std::filesystem::path key_prefix;       ///< our key pair (PREFIX.key); empty: no CURVE
  std::filesystem::path authorized_keys;  ///< server: client keys admitted
  std::filesystem::path server_key;       ///< client: the server's PREFIX.pub
  bool insecure = false;                  ///< allow a non-loopback bind without CURVE
  bool curve() const { return !key_prefix.empty(); }
};

/// A server socket bound with the bind policy and, when configured, CURVE + ZAP. Keeps
/// the ZAP handler alive as long as the socket.
struct SecureServer {
  std::unique_ptr<ZapHandler> zap;
  std::unique_ptr<Socket> socket;
};
SecureServer bind_server(zmq::context_t& ctx, zmq::socket_type type, SocketOptions opts,
                         const std::string& role, const std::string& endpoint,
                         const SecurityConfig& sec);
/// A client socket with CURVE when configured, connected to `endpoint`.
std::unique_ptr<Socket> connect_client(zmq::context_t& ctx, zmq::socket_type type,
                                       SocketOptions opts, const std::string& role,
                                       const std::string& endpoint, const SecurityConfig& sec);

}  // namespace attnpilot::transport
