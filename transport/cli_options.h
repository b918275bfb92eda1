#pragma once
/// Command-line options shared by the remote verbs (env-server, learner, actor); header
/// only, included by experiments/verbs/*.cpp (which link CLI11).
#include <signal.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <memory>
#include <string>

#include "transport/security.h"
#include "transport/socket.h"

namespace attnpilot::transport {

/// Options of one endpoint: security and heartbeat interval.
struct EndpointFlags {
  std::string key_prefix, authorized_keys, server_key;
  bool insecure = false;
  int heartbeat_ms = 500;

  SecurityConfig security() const {
    SecurityConfig s;
    s.key_prefix = key_prefix;
    s.authorized_keys = authorized_keys;
    s.server_key = server_key;
    s.insecure = insecure;
    return s;
  }
  /// Socket options with heartbeats every `heartbeat_ms`, timeout 2x, TTL 3x.
  SocketOptions socket() const {
    SocketOptions o;
    o.heartbeat_ivl_ms = heartbeat_ms;
    o.heartbeat_timeout_ms = 2 * heartbeat_ms;
    o.heartbeat_ttl_ms = 3 * heartbeat_ms;
    return o;
  }
};

/// Adds --curve-key, --authorized-keys (servers) or --server-key (clients), --insecure
/// (servers) and --heartbeat-ms.
inline void add_endpoint_flags(CLI::App* cmd, EndpointFlags& f, bool server) {
  cmd->add_option("--curve-key", f.key_prefix,
                  "CURVE key pair prefix (PREFIX.key from `attnpilot keygen`); enables encryption");
  if (server) {
    cmd->add_option("--authorized-keys", f.authorized_keys,
                    "File of client public keys admitted (one Z85 key a line)");
    cmd->add_flag("--insecure", f.insecure, "Allow binding a non-loopback address without CURVE");
  } else {
    cmd->add_option("--server-key", f.server_key, "The server's public key file (PREFIX.pub)");
  }
  cmd->add_option("--heartbeat-ms", f.heartbeat_ms,
                  "ZMTP heartbeat interval; a silent peer is dropped within 3 intervals")
      ->check(CLI::Range(20, 60000));
}

/// The flag SIGINT/SIGTERM set so a verb can stop cleanly (checkpoint first).
inline std::atomic<bool>& stop_requested() {
  static std::atomic<bool> flag{false};
  return flag;
}
inline void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = [](int) { stop_requested().store(true); };
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

}  // namespace attnpilot::transport
