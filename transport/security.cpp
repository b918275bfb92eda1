#include "transport/security.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>
#include <zmq_addon.hpp>

#include "common/atomic_file.h"
#include "common/log.h"

namespace attnpilot::transport {
namespace {

bool is_z85_key(const std::string& s) {
  if (s.size() != 40) return false;
  uint8_t raw[32];
  return zmq_z85_decode(raw, s.c_str()) != nullptr;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  const auto e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

// The first whitespace-separated token of a line ("" if none). Z85 has no whitespace, so
// text after a key is a comment.
std::string first_token(const std::string& s) {
  const std::string t = trim(s);
  return t.substr(0, t.find_first_of(" \t"));
}

// Atomic write with an explicit mode: the temporary file is created with `mode`, so the
// secret is never readable by others, not even for a moment.
void write_private_atomic(const std::filesystem::path& path, const std::string& text, mode_t mode) {
  const auto tmp = path.string() + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
  if (fd < 0) throw_errno(fmt::format("creating {}", tmp));
  if (::fchmod(fd, mode) != 0) {
    ::close(fd);
    throw_errno(fmt::format("chmod {}", tmp));
  }
  size_t off = 0;
  while (off < text.size()) {
    const ssize_t w = ::write(fd, text.data() + off, text.size() - off);
    if (w < 0) {
      if (errno == EINTR) continue;
      ::close(fd);
      throw_errno(fmt::format("writing {}", tmp));
    }
    off += static_cast<size_t>(w);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) throw_errno(fmt::format("syncing {}", tmp));
  if (::rename(tmp.c_str(), path.c_str()) != 0) throw_errno(fmt::format("renaming {}", tmp));
  fsync_directory(path.has_parent_path() ? path.parent_path() : std::filesystem::path("."));
}

}  // namespace

bool curve_available() { return zmq_has("curve") != 0; }

void require_curve() {
  if (!curve_available()) {
    throw Unavailable(
        "this libzmq was built without CURVE (zmq_has(\"curve\") is false): install a libzmq "
        "built with libsodium, or bind to loopback without --curve-key");
  }
}

KeyPair generate_keypair() {
  require_curve();
  char pub[41], sec[41];
  if (zmq_curve_keypair(pub, sec) != 0) {
    throw IoError(fmt::format("zmq_curve_keypair failed: {}", zmq_strerror(zmq_errno())));
  }
  return {std::string(pub, 40), std::string(sec, 40)};
}

std::string public_from_secret(const std::string& secret_z85) {
  require_curve();
  ATTNPILOT_CHECK_ARG(is_z85_key(secret_z85), "secret key is not 40 Z85 characters");
  char pub[41];
  if (zmq_curve_public(pub, secret_z85.c_str()) != 0) {
    throw IoError(fmt::format("zmq_curve_public failed: {}", zmq_strerror(zmq_errno())));
  }
  return std::string(pub, 40);
}

void write_keypair(const std::filesystem::path& prefix, const KeyPair& keys) {
  ATTNPILOT_CHECK_ARG(is_z85_key(keys.public_key) && is_z85_key(keys.secret_key),
                      "key pair for {} is not Z85 text", prefix.string());
  const std::filesystem::path pub = prefix.string() + ".pub";
  const std::filesystem::path sec = prefix.string() + ".key";
  for (const auto& p : {pub, sec}) {
    ATTNPILOT_CHECK_ARG(!std::filesystem::exists(p), "{} exists; refusing to overwrite a key",
                        p.string());
  }
  write_private_atomic(
      sec, "# attnpilot CURVE secret key (Z85). Keep private.\n" + keys.secret_key + "\n", 0600);
  write_private_atomic(pub, "# attnpilot CURVE public key (Z85)\n" + keys.public_key + "\n", 0644);
}

std::string read_key_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw IoError(fmt::format("cannot read key file {}", path.string()));
  std::string line;
  while (std::getline(in, line)) {
    line = first_token(line);
    // Z85 keys may contain '#': a line is a key when its first token is one.
    if (line.empty() || (line[0] == '#' && !is_z85_key(line))) continue;
    if (!is_z85_key(line)) {
      throw FormatError(fmt::format("{}: expected a 40-character Z85 key, found {} characters",
                                    path.string(), line.size()));
    }
    return line;
  }
  throw FormatError(fmt::format("{}: no key found", path.string()));
}

KeyPair read_keypair(const std::filesystem::path& prefix) {
  const std::filesystem::path sec = prefix.string() + ".key";
  struct stat st {};
  if (::stat(sec.c_str(), &st) != 0)
    throw_errno(fmt::format("reading secret key {}", sec.string()));
  if ((st.st_mode & 077) != 0) {
    throw InvalidArgument(fmt::format("secret key {} has mode {:o}; expected 600 (chmod 600 it)",
                                      sec.string(), st.st_mode & 0777));
  }
  KeyPair k;
  k.secret_key = read_key_file(sec);
  k.public_key = public_from_secret(k.secret_key);
  return k;
}

std::set<std::string> read_authorized_keys(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw IoError(fmt::format("cannot read authorized keys file {}", path.string()));
  std::set<std::string> keys;
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    line = first_token(line);
    if (line.empty() || (line[0] == '#' && !is_z85_key(line))) continue;
    if (!is_z85_key(line)) {
      throw FormatError(
          fmt::format("{}:{}: expected a 40-character Z85 public key", path.string(), lineno));
    }
    keys.insert(line);
  }
  return keys;
}

bool is_loopback_endpoint(const std::string& ep) {
  if (ep.rfind("inproc://", 0) == 0 || ep.rfind("ipc://", 0) == 0) return true;
  if (ep.rfind("tcp://", 0) != 0) return false;
  std::string host = ep.substr(6);
  // Strip ";source" forms and the port.
  if (host.find(';') != std::string::npos) return false;
  if (!host.empty() && host[0] == '[') {
    const auto close = host.find(']');
    return close != std::string::npos && host.substr(1, close - 1) == "::1";
  }
  const auto colon = host.rfind(':');
  if (colon == std::string::npos) return false;
  host = host.substr(0, colon);
  if (host == "localhost") return true;
  if (host.rfind("127.", 0) == 0) {
    // Dotted quad of digits only (no interface names that merely start with "127.").
    int dots = 0;
    for (char c : host) {
      if (c == '.')
        ++dots;
      else if (c < '0' || c > '9')
        return false;
    }
    return dots == 3;
  }
  return false;
}

void check_bind_policy(const std::string& endpoint, bool curve, bool insecure) {
  if (curve || insecure || is_loopback_endpoint(endpoint)) return;
  throw InvalidArgument(
      fmt::format("refusing to bind {} without CURVE: it is reachable from other hosts. Give "
                  "--curve-key PREFIX and --authorized-keys FILE (see `attnpilot keygen`), bind to "
                  "127.0.0.1/ipc://, or pass --insecure",
                  endpoint));
}

ZapHandler::ZapHandler(zmq::context_t& ctx, std::set<std::string> allowed)
    : allowed_(std::move(allowed)) {
  try {
    sock_ = zmq::socket_t(ctx, zmq::socket_type::rep);
    sock_.set(zmq::sockopt::linger, 0);
    sock_.bind("inproc://zeromq.zap.01");
  } catch (const zmq::error_t& e) {
    throw IoError(
        fmt::format("ZAP handler: binding inproc://zeromq.zap.01 failed: {} (only one "
                    "handler per context)",
                    e.what()));
  }
  thread_ = std::thread([this] { run(); });
}

ZapHandler::~ZapHandler() {
  stop_ = true;
  if (thread_.joinable()) thread_.join();
}

void ZapHandler::run() {
  while (!stop_) {
    std::vector<zmq::message_t> req;
    try {
      zmq::pollitem_t item{sock_.handle(), 0, ZMQ_POLLIN, 0};
      if (zmq::poll(&item, 1, std::chrono::milliseconds(50)) == 0) continue;
      if (!zmq::recv_multipart(sock_, std::back_inserter(req), zmq::recv_flags::dontwait)) continue;
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      log::error(fmt::format("ZAP handler: receive failed: {}", e.what()));
      continue;
    }
    // RFC 27: version, request id, domain, address, identity, mechanism, credentials...
    std::string status = "400", text = "malformed ZAP request", user;
    std::string version = req.size() > 0 ? req[0].to_string() : "";
    std::string request_id = req.size() > 1 ? req[1].to_string() : "";
    if (req.size() >= 6 && version == "1.0") {
      const std::string address = req[3].to_string();
      const std::string mechanism = req[5].to_string();
      if (mechanism == "CURVE" && req.size() >= 7 && req[6].size() == 32) {
        char z85[41];
        zmq_z85_encode(z85, static_cast<const uint8_t*>(req[6].data()), 32);
        const std::string key(z85, 40);
        if (allowed_.count(key)) {
          status = "200";
          text = "OK";
          user = key;
          admitted_.fetch_add(1);
          log::info(fmt::format("ZAP: admitted CURVE client {} from {}", key, address));
        } else {
          text = "client key not authorized";
          refused_.fetch_add(1);
          log::warn(
              fmt::format("ZAP: refused CURVE client {} from {}: key not in the "
                          "authorized keys",
                          key, address));
        }
      } else {
        text = "only CURVE clients are admitted";
        refused_.fetch_add(1);
        log::warn(fmt::format("ZAP: refused {} client from {}: only CURVE is admitted", mechanism,
                              address));
      }
    } else {
      refused_.fetch_add(1);
      log::warn("ZAP: refused a malformed request");
    }
    try {
      std::array<zmq::const_buffer, 6> reply = {zmq::str_buffer("1.0"), zmq::buffer(request_id),
                                                zmq::buffer(status),    zmq::buffer(text),
                                                zmq::buffer(user),      zmq::str_buffer("")};
      zmq::send_multipart(sock_, reply);
    } catch (const zmq::error_t& e) {
      if (e.num() == ETERM) return;
      log::error(fmt::format("ZAP handler: reply failed: {}", e.what()));
    }
  }
}

SecureServer bind_server(zmq::context_t& ctx, zmq::socket_type type, SocketOptions opts,
                         const std::string& role, const std::string& endpoint,
                         const SecurityConfig& sec) {
  check_bind_policy(endpoint, sec.curve(), sec.insecure);
  SecureServer s;
  if (sec.curve()) {
    require_curve();
    ATTNPILOT_CHECK_ARG(!sec.authorized_keys.empty(),
                        "{}: --curve-key needs --authorized-keys FILE listing client keys", role);
    const KeyPair keys = read_keypair(sec.key_prefix);
    s.zap = std::make_unique<ZapHandler>(ctx, read_authorized_keys(sec.authorized_keys));
    s.socket = std::make_unique<Socket>(ctx, type, std::move(opts), role);
    s.socket->set_curve_server({keys.public_key, keys.secret_key});
    log::info(fmt::format("{}: CURVE on, server key {}, clients from {}", role, keys.public_key,
                          sec.authorized_keys.string()));
  } else {
    s.socket = std::make_unique<Socket>(ctx, type, std::move(opts), role);
    if (!is_loopback_endpoint(endpoint)) {
      log::warn(fmt::format("{}: binding {} WITHOUT encryption (--insecure)", role, endpoint));
    }
  }
  s.socket->bind(endpoint);
  return s;
}

std::unique_ptr<Socket> connect_client(zmq::context_t& ctx, zmq::socket_type type,
                                       SocketOptions opts, const std::string& role,
                                       const std::string& endpoint, const SecurityConfig& sec) {
  auto s = std::make_unique<Socket>(ctx, type, std::move(opts), role);
  if (sec.curve()) {
    require_curve();
    ATTNPILOT_CHECK_ARG(!sec.server_key.empty(), "{}: --curve-key needs --server-key FILE", role);
    const KeyPair keys = read_keypair(sec.key_prefix);
    s->set_curve_client({keys.public_key, keys.secret_key, read_key_file(sec.server_key)});
  }
  s->connect(endpoint);
  return s;
}

}  // namespace attnpilot::transport
