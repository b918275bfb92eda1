// Sockets and security: bind policy, key files, CURVE with the ZAP allow-list (a client
// with an unknown key is refused), and heartbeats noticing a silent (SIGSTOPped) peer.
#include "transport/security.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "child_process.h"
#include "transport/socket.h"

namespace attnpilot::transport {
namespace {

namespace fs = std::filesystem;

fs::path temp_dir(const std::string& name) {
  fs::path d = fs::temp_directory_path() / fmt::format("attnpilot-transport-{}-{}", name, getpid());
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

TEST(BindPolicy, LoopbackEndpointsAreRecognised) {
  for (const char* ep :
       {"tcp://127.0.0.1:5555", "tcp://127.0.0.1:*", "tcp://localhost:9", "tcp://[::1]:7000",
        "ipc:///tmp/x.sock", "inproc://a", "tcp://127.1.2.3:1"})
    EXPECT_TRUE(is_loopback_endpoint(ep)) << ep;
  for (const char* ep :
       {"tcp://*:5555", "tcp://0.0.0.0:5555", "tcp://10.0.0.1:5555", "tcp://eth0:5555",
        "tcp://127.0.0.1.evil.com:5", "tcp://[::]:5", "tcp://127.0.0.1;192.168.1.1:5555",
        "udp://127.0.0.1:5", "tcp://127.0.0.1"})
    EXPECT_FALSE(is_loopback_endpoint(ep)) << ep;
}

TEST(BindPolicy, NonLoopbackWithoutCurveIsRefusedUnlessInsecure) {
  EXPECT_THROW(check_bind_policy("tcp://*:5555", false, false), InvalidArgument);
  EXPECT_NO_THROW(check_bind_policy("tcp://*:5555", false, true));
  EXPECT_NO_THROW(check_bind_policy("tcp://*:5555", true, false));
  EXPECT_NO_THROW(check_bind_policy("tcp://127.0.0.1:5555", false, false));
  zmq::context_t ctx;
  SecurityConfig sec;  // no CURVE, not insecure
  EXPECT_THROW(bind_server(ctx, zmq::socket_type::router, {}, "t", "tcp://0.0.0.0:0", sec),
               InvalidArgument);
}

TEST(Keys, KeygenWritesPrivateSecretAndReadsBack) {
  ASSERT_TRUE(curve_available()) << "Debian's libzmq5 is built with libsodium";
  const fs::path d = temp_dir("keys");
  const KeyPair k = generate_keypair();
  write_keypair(d / "server", k);
  struct stat st {};
  ASSERT_EQ(::stat((d / "server.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  const KeyPair back = read_keypair(d / "server");
  EXPECT_EQ(back.secret_key, k.secret_key);
  EXPECT_EQ(back.public_key, k.public_key);
  EXPECT_EQ(read_key_file(d / "server.pub"), k.public_key);
  EXPECT_THROW(write_keypair(d / "server", k), InvalidArgument);  // no overwrite
  ::chmod((d / "server.key").c_str(), 0644);
  EXPECT_THROW(read_keypair(d / "server"), InvalidArgument);  // world-readable secret
  std::ofstream(d / "bad.pub") << "not-a-key\n";
  EXPECT_THROW(read_key_file(d / "bad.pub"), FormatError);
  std::ofstream(d / "auth") << "# comment\n" << k.public_key << "  # server\n\n";
  EXPECT_EQ(read_authorized_keys(d / "auth"), std::set<std::string>{k.public_key});
  fs::remove_all(d);
}

// Round trip of one ping through a CURVE server; returns whether the reply came back.
bool curve_ping(zmq::context_t& ctx, const std::string& ep, const KeyPair& server,
                const KeyPair& client, Socket& srv) {
  SocketOptions o;
  Socket c(ctx, zmq::socket_type::dealer, o, "curve-client");
  c.set_curve_client({client.public_key, client.secret_key, server.public_key});
  c.connect(ep);
  Message ping;
  ping.type = MsgType::kPing;
  ping.seq = 42;
  c.send(ping, 1000);
  for (int i = 0; i < 15; ++i) {
    if (auto r = srv.recv(100)) {
      EXPECT_EQ(r->msg.seq, 42u);
      srv.send_to(r->envelope, r->msg);
    }
    if (auto back = c.recv(0)) return back->msg.seq == 42u;
  }
  return false;
}

TEST(Curve, OnlyListedClientKeysAreAdmitted) {
  ASSERT_TRUE(curve_available());
  zmq::context_t ctx;
  const KeyPair server = generate_keypair(), good = generate_keypair(), bad = generate_keypair();
  ZapHandler zap(ctx, {good.public_key});
  Socket srv(ctx, zmq::socket_type::router, {}, "curve-server");
  srv.set_curve_server({server.public_key, server.secret_key});
  srv.bind("tcp://127.0.0.1:*");
  const std::string ep = srv.last_endpoint();

  EXPECT_TRUE(curve_ping(ctx, ep, server, good, srv));
  EXPECT_EQ(zap.admitted(), 1u);
  EXPECT_FALSE(curve_ping(ctx, ep, server, bad, srv));
  EXPECT_GE(zap.refused(), 1u);
  // A plain (NULL mechanism) client cannot talk to a CURVE server either.
  Socket plain(ctx, zmq::socket_type::dealer, {}, "plain-client");
  plain.connect(ep);
  Message ping;
  ping.type = MsgType::kPing;
  plain.send(ping, 200);
  EXPECT_FALSE(srv.recv(500).has_value());
}

TEST(Heartbeat, SilentPeerIsNoticedWithinThreeIntervals) {
  const char* peer_exe = ATTNPILOT_SILENT_PEER;
  zmq::context_t ctx;
  SocketOptions o;
  o.heartbeat_ivl_ms = 200;
  o.heartbeat_timeout_ms = 400;
  o.heartbeat_ttl_ms = 600;
  Socket srv(ctx, zmq::socket_type::router, o, "hb-server");
  Monitor mon(ctx, srv);
  srv.bind("tcp://127.0.0.1:*");
  const fs::path d = temp_dir("hb");
  testing::ChildProcess peer({peer_exe, srv.last_endpoint(), "30"}, (d / "peer.log").string());
  std::optional<Received> hello;
  for (int i = 0; i < 100 && !hello; ++i) hello = srv.recv(100);
  ASSERT_TRUE(hello.has_value()) << peer.log();
  EXPECT_EQ(hello->envelope.at(0), "silent-peer");
  // Let heartbeats run while the peer is alive: no disconnect may be reported.
  bool early_disconnect = false;
  for (int i = 0; i < 5; ++i)
    for (const auto& ev : mon.poll(100)) early_disconnect |= ev.id == ZMQ_EVENT_DISCONNECTED;
  EXPECT_FALSE(early_disconnect);

  peer.signal(SIGSTOP);
  const int64_t t0 = now_ms();
  int64_t noticed = -1;
  while (noticed < 0 && now_ms() - t0 < 5000) {
    for (const auto& ev : mon.poll(20))
      if (ev.id == ZMQ_EVENT_DISCONNECTED) noticed = now_ms() - t0;
  }
  peer.signal(SIGKILL);
  ASSERT_GE(noticed, 0) << "the silent peer was never noticed";
  // interval + timeout = 600 ms = 3 intervals; 150 ms slack for a loaded 2-core machine.
  EXPECT_LE(noticed, 3 * o.heartbeat_ivl_ms + 150);
  EXPECT_GE(noticed, o.heartbeat_timeout_ms - 50);  // really the heartbeat, not a closed socket
  fs::remove_all(d);
}

TEST(Socket, ZmqErrorsBecomeIoErrorsWithContext) {
  zmq::context_t ctx;
  Socket s(ctx, zmq::socket_type::router, {}, "role-x");
  try {
    s.bind("tcp://not-an-address:-1");
    FAIL() << "bind succeeded";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("role-x"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("not-an-address"), std::string::npos) << e.what();
  }
  SocketOptions bad;
  bad.heartbeat_ivl_ms = 0;
  EXPECT_THROW(Socket(ctx, zmq::socket_type::dealer, bad, "b"), InvalidArgument);
}

}  // namespace
}  // namespace attnpilot::transport
