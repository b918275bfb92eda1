// transport_bench: ZeroMQ transport on loopback (tcp://127.0.0.1), medians of repeats.
//  1. Trajectory throughput: actor DEALER -> learner ROUTER, codec-encoded chunks (encode,
//     send, receive, decode) vs the reference: raw zmq frames of the same size.
//  2. Weight broadcast latency for 0.1-10 M parameter policies to 1 and 4 receivers:
//     encode + send + receive + decode + copy into the receivers' parameters, vs the
//     reference of raw frames of the same bytes.
//  3. Learner throughput with 1, 2, 4 actors (see learner_throughput below; needs agent/).
// Usage: transport_bench [--quick]
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <thread>
#include <vector>

#include "transport/remote_roles.h"
#include "transport/socket.h"
#include "transport/tensor_codec.h"

using namespace attnpilot::transport;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// A CartPole-sized rollout chunk: T steps x N envs.
Message trajectory_chunk(int T, int N, int obs_dim, uint64_t seq) {
  Message m;
  m.type = MsgType::kTrajectory;
  m.seq = seq;
  m.meta = R"({"actor":0,"seq":0,"version":3,"incarnation":1,"steps":0})";
  m.tensors.push_back(to_blob("obs", torch::randn({T, N, obs_dim})));
  m.tensors.push_back(to_blob("actions", torch::randint(0, 2, {T, N}, torch::kInt64)));
  m.tensors.push_back(to_blob("logp", torch::randn({T, N})));
  m.tensors.push_back(to_blob("rewards", torch::ones({T, N})));
  m.tensors.push_back(to_blob("terminated", torch::zeros({T, N}, torch::kBool)));
  m.tensors.push_back(to_blob("truncated", torch::zeros({T, N}, torch::kBool)));
  m.tensors.push_back(to_blob("last_obs", torch::randn({N, obs_dim})));
  return m;
}

struct Throughput {
  double msgs_per_s, mb_per_s;
};

// Sends `count` messages from a DEALER thread; the ROUTER decodes them (or just receives
// raw frames when `raw`). Returns msgs/s and MB/s measured at the receiver.
Throughput trajectory_throughput(const Message& m, int count, bool raw) {
  zmq::context_t ctx;
  SocketOptions o;
  o.send_hwm = 1000;
  o.recv_hwm = 1000;
  Socket srv(ctx, zmq::socket_type::router, o, "bench-learner");
  srv.bind("tcp://127.0.0.1:*");
  const std::string ep = srv.last_endpoint();
  const std::string bytes = encode(m);
  std::thread sender([&] {
    Socket c(ctx, zmq::socket_type::dealer, o, "bench-actor");
    c.connect(ep);
    for (int i = 0; i < count; ++i) {
      if (raw) {
        c.send_raw(bytes);
      } else {
        Message mm = m;  // the actor builds a new message each time
        mm.seq = i;
        c.send(mm);
      }
    }
    // Keep the socket open until the receiver is done (linger 0 would drop the tail).
    Message done;
    done.type = MsgType::kShutdown;
    c.send(done);
    c.recv(10000);
  });
  int got = 0;
  size_t total_bytes = 0;
  Clock::time_point t0;
  std::vector<std::string> env;
  while (got < count) {
    if (raw) {
      zmq::message_t id, body;
      (void)srv.raw().recv(id);
      (void)srv.raw().recv(body);
      if (got == 0) t0 = Clock::now();
      total_bytes += body.size();
      ++got;
    } else {
      auto r = srv.recv(5000);
      if (!r) break;
      if (got == 0) t0 = Clock::now();
      total_bytes += r->wire_bytes;
      ++got;
    }
  }
  const double dt = seconds_since(t0);
  // Release the sender.
  for (int i = 0; i < 50; ++i) {
    auto r = srv.recv(100);
    if (r && r->msg.type == MsgType::kShutdown) {
      srv.send_to(r->envelope, r->msg);
      break;
    }
  }
  sender.join();
  // The first message only starts the clock.
  return {(got - 1) / dt, (total_bytes - bytes.size()) / dt / 1e6};
}

// Policy parameters of about `n_params` elements: square-ish matrices.
std::vector<std::pair<std::string, torch::Tensor>> make_params(int64_t n_params) {
  std::vector<std::pair<std::string, torch::Tensor>> p;
  const int64_t layers = 4;
  const int64_t per = n_params / layers;
  const int64_t width = std::max<int64_t>(1, static_cast<int64_t>(std::sqrt(double(per))));
  for (int64_t i = 0; i < layers; ++i) {
    p.emplace_back(fmt::format("layer{}.weight", i), torch::randn({width, per / width}));
    p.emplace_back(fmt::format("layer{}.bias", i), torch::randn({width}));
  }
  return p;
}

// One broadcast to `receivers` DEALERs, median over `reps`: seconds from the start of
// encoding until the last receiver has its parameters loaded.
double broadcast_latency(int64_t n_params, int receivers, int reps, bool raw) {
  zmq::context_t ctx;
  SocketOptions o;
  Socket srv(ctx, zmq::socket_type::router, o, "bench-learner");
  srv.bind("tcp://127.0.0.1:*");
  const std::string ep = srv.last_endpoint();
  const auto params = make_params(n_params);
  std::atomic<int> loaded{0};
  std::atomic<bool> stop{false};
  std::vector<std::thread> threads;
  for (int r = 0; r < receivers; ++r) {
    threads.emplace_back([&, r] {
      SocketOptions co;
      co.routing_id = fmt::format("actor-{}", r);
      Socket c(ctx, zmq::socket_type::dealer, co, co.routing_id);
      c.connect(ep);
      auto mine = make_params(n_params);
      Message hello;
      hello.type = MsgType::kHello;
      c.send(hello);
      while (!stop) {
        if (raw) {
          zmq::pollitem_t it{c.raw().handle(), 0, ZMQ_POLLIN, 0};
          if (zmq::poll(&it, 1, std::chrono::milliseconds(50)) == 0) continue;
          zmq::message_t body;
          (void)c.raw().recv(body);
          // Reference: copy the raw bytes into the parameters without decoding.
          size_t off = 0;
          for (auto& [n, t] : mine) {
            const size_t nb = t.numel() * 4;
            if (off + nb <= body.size()) std::memcpy(t.data_ptr(), (char*)body.data() + off, nb);
            off += nb;
          }
          loaded.fetch_add(1);
        } else {
          auto m = c.recv(50);
          if (!m) continue;
          load_blobs_into(m->msg.tensors, mine);
          loaded.fetch_add(1);
        }
      }
    });
  }
  std::vector<std::vector<std::string>> peers;
  while (static_cast<int>(peers.size()) < receivers) {
    if (auto r = srv.recv(1000)) peers.push_back(r->envelope);
  }
  std::string raw_bytes;
  if (raw) {
    for (const auto& [n, t] : params) raw_bytes.append((const char*)t.data_ptr(), t.numel() * 4);
  }
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) {
    loaded = 0;
    const auto t0 = Clock::now();
    if (raw) {
      for (const auto& p : peers) {
        srv.raw().send(zmq::buffer(p[0]), zmq::send_flags::sndmore);
        srv.raw().send(zmq::buffer(raw_bytes));
      }
    } else {
      Message w;
      w.type = MsgType::kWeights;
      w.seq = rep;
      w.meta = fmt::format(R"({{"version":{}}})", rep);
      w.tensors = params_to_blobs(params);
      const std::string bytes = encode(w);  // encode once, send to every actor
      for (const auto& p : peers) {
        srv.raw().send(zmq::buffer(p[0]), zmq::send_flags::sndmore);
        srv.raw().send(zmq::buffer(bytes));
      }
    }
    while (loaded.load() < receivers) std::this_thread::yield();
    times.push_back(seconds_since(t0));
  }
  stop = true;
  for (auto& t : threads) t.join();
  return median(times);
}

// Section 3 backends: the learner sums the chunks (no model) and the actors emit
// CartPole-shaped chunks without running an environment, so the numbers are the
// transport's ceiling (protocol, codec, acks, weights) for 1, 2, 4 actors.
class SumLearner : public LearnerBackend {
 public:
  NamedParams parameters() override { return {{"w", w_}}; }
  nlohmann::json update(const std::vector<Chunk>& chunks) override {
    for (const auto& c : chunks) w_ += c.tensors.front().second.sum();
    return {};
  }
  void save(const std::filesystem::path& dir) override {}
  void load(const std::filesystem::path& dir) override {}

 private:
  torch::Tensor w_ = torch::zeros({64, 64});
};

class ChunkActor : public ActorBackend {
 public:
  NamedParams parameters() override { return {{"w", w_}}; }
  Chunk collect() override {
    Chunk c;
    const Message m = trajectory_chunk(128, 4, 4, 0);
    for (const auto& b : m.tensors) c.tensors.emplace_back(b.name, to_torch(b));
    c.steps = 128 * 4;
    return c;
  }

 private:
  torch::Tensor w_ = torch::zeros({64, 64});
};

double learner_throughput(int n_actors, int64_t total_steps) {
  zmq::context_t ctx;
  const auto dir = std::filesystem::temp_directory_path() /
                   fmt::format("attnpilot-bench-learner-{}-{}", getpid(), n_actors);
  std::filesystem::remove_all(dir);
  LearnerOptions lo;
  lo.endpoint = "tcp://127.0.0.1:47391";
  lo.env_name = "bench";
  lo.out_dir = dir;
  lo.total_steps = total_steps;
  lo.steps_per_update = 2048;
  lo.checkpoint_every = 1000000;
  SumLearner lb;
  const auto t0 = Clock::now();
  std::thread learner([&] { run_learner(ctx, lo, lb); });
  std::vector<std::thread> actors;
  std::vector<std::unique_ptr<ChunkActor>> backends;
  for (int i = 0; i < n_actors; ++i) {
    backends.push_back(std::make_unique<ChunkActor>());
    actors.emplace_back([&, i] {
      ActorOptions ao;
      ao.endpoint = lo.endpoint;
      ao.env_name = "bench";
      ao.actor_id = std::to_string(i);
      ao.max_idle_s = 30;
      run_actor(ctx, ao, *backends[i]);
    });
  }
  learner.join();
  const double dt = seconds_since(t0);
  for (auto& a : actors) a.join();
  std::filesystem::remove_all(dir);
  return total_steps / dt;
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  torch::manual_seed(0);
  torch::set_num_threads(1);
  std::cout << "transport_bench: loopback tcp://127.0.0.1, medians of repeats\n\n";

  std::cout << "1. Trajectory throughput (actor -> learner, one DEALER -> ROUTER)\n";
  std::cout << fmt::format("{:>16} {:>10} {:>12} {:>10} {:>12} {:>10} {:>8}\n", "chunk (TxN)",
                           "bytes", "codec msg/s", "codec MB/s", "raw msg/s", "raw MB/s", "ratio");
  for (auto [T, N] : std::vector<std::pair<int, int>>{{16, 1}, {128, 4}, {512, 16}}) {
    const Message m = trajectory_chunk(T, N, 4, 0);
    const int count = quick ? 200 : std::max(300, 4000000 / int(encoded_size(m)) + 300);
    std::vector<double> cm, cb, rm, rb;
    for (int rep = 0; rep < 3; ++rep) {
      auto c = trajectory_throughput(m, count, false);
      auto r = trajectory_throughput(m, count, true);
      cm.push_back(c.msgs_per_s);
      cb.push_back(c.mb_per_s);
      rm.push_back(r.msgs_per_s);
      rb.push_back(r.mb_per_s);
    }
    std::cout << fmt::format("{:>16} {:>10} {:>12.0f} {:>10.1f} {:>12.0f} {:>10.1f} {:>8.2f}\n",
                             fmt::format("{}x{}", T, N), encoded_size(m), median(cm), median(cb),
                             median(rm), median(rb), median(cm) / median(rm));
  }

  std::cout << "\n2. Weight broadcast latency (learner -> actors, encode once, decode + load "
               "per actor)\n";
  std::cout << fmt::format("{:>10} {:>9} {:>12} {:>12} {:>8}\n", "params", "actors", "codec ms",
                           "raw ms", "ratio");
  for (int64_t n : {100'000LL, 1'000'000LL, 10'000'000LL}) {
    for (int receivers : {1, 4}) {
      const int reps = quick ? 3 : (n >= 10'000'000 ? 5 : 15);
      const double c = broadcast_latency(n, receivers, reps, false);
      const double r = broadcast_latency(n, receivers, reps, true);
      std::cout << fmt::format("{:>10} {:>9} {:>12.2f} {:>12.2f} {:>8.2f}\n", n, receivers, c * 1e3,
                               r * 1e3, c / r);
    }
  }

  std::cout << "\n3. Learner throughput, transport ceiling (no model, no env: chunks of "
               "128x4 CartPole steps, update = sum)\n";
  std::cout << fmt::format("{:>8} {:>14} {:>8}\n", "actors", "env steps/s", "vs 1");
  double one = 0;
  for (int k : {1, 2, 4}) {
    std::vector<double> v;
    for (int rep = 0; rep < 3; ++rep) v.push_back(learner_throughput(k, quick ? 100000 : 400000));
    const double m = median(v);
    if (k == 1) one = m;
    std::cout << fmt::format("{:>8} {:>14.0f} {:>8.2f}\n", k, m, m / one);
  }
  return 0;
}
