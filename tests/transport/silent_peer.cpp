// Test helper: connects a DEALER to argv[1], sends one ping, then idles (answering ZMTP
// heartbeats from its I/O thread) for at most argv[2] seconds. The heartbeat test stops
// it with SIGSTOP so that it falls silent without closing its TCP connection.
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "transport/socket.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: silent_peer ENDPOINT SECONDS\n";
    return 2;
  }
  using namespace attnpilot::transport;
  zmq::context_t ctx;
  SocketOptions opts;
  opts.routing_id = "silent-peer";
  Socket s(ctx, zmq::socket_type::dealer, opts, "silent-peer");
  s.connect(argv[1]);
  Message m;
  m.type = MsgType::kPing;
  s.send(m, 2000);
  std::this_thread::sleep_for(std::chrono::seconds(std::atoi(argv[2])));
  return 0;
}
