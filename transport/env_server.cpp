#include "transport/env_server.h"

#include "common/log.h"
#include "transport/protocol.h"
#include "transport/tensor_codec.h"

namespace attnpilot::transport {

EnvServer::EnvServer(zmq::context_t& ctx, EnvServerOptions opts, std::string env_name,
                     ServedEnvFactory factory)
    : opts_(std::move(opts)), env_name_(std::move(env_name)), factory_(std::move(factory)) {
  ATTNPILOT_CHECK_ARG(opts_.max_sessions > 0, "max_sessions {} must be positive",
                      opts_.max_sessions);
  prototype_ = factory_();
  server_ = bind_server(ctx, zmq::socket_type::router, opts_.socket, "env-server", opts_.endpoint,
                        opts_.security);
  log::info(fmt::format("env-server: serving '{}' on {}", env_name_, endpoint()));
}

std::string EnvServer::endpoint() { return server_.socket->last_endpoint(); }

void EnvServer::serve(const std::atomic<bool>* stop_flag) {
  const int64_t start = now_ms();
  while (!stop_ && !(stop_flag && stop_flag->load())) {
    if (opts_.run_for_s > 0 && now_ms() - start > opts_.run_for_s * 1000) break;
    auto r = server_.socket->recv(100);
    const int64_t now = now_ms();
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      if (now - it->second.last_active_ms > opts_.session_idle_s * 1000) {
        log::info(
            fmt::format("env-server: closing idle session of {} env(s)", it->second.envs.size()));
        it = sessions_.erase(it);
      } else {
        ++it;
      }
    }
    if (!r) continue;
    ++requests_;
    Message reply;
    try {
      reply = handle(r->envelope.at(0), r->msg);
    } catch (const Error& e) {
      ++errors_;
      log::warn(
          fmt::format("env-server: {} request refused: {}", type_name(r->msg.type), e.what()));
      reply = make_error(r->msg.seq, e.what());
    } catch (const c10::Error& e) {
      ++errors_;
      log::warn(fmt::format("env-server: {} request failed in LibTorch: {}", type_name(r->msg.type),
                            e.what_without_backtrace()));
      reply = make_error(r->msg.seq, e.what_without_backtrace());
    }
    if (!server_.socket->send_to(r->envelope, reply)) {
      log::warn("env-server: reply dropped (client gone or its queue full)");
    }
  }
  log::info(fmt::format("env-server: stopped after {} requests, {} refused, decode errors: {}",
                        requests_, errors_, server_.socket->counters().summary()));
}

Message EnvServer::reply_with(MsgType type, uint64_t seq, const std::vector<ServedEnv::Out>& outs,
                              const std::vector<torch::Tensor>* final_obs) const {
  std::vector<torch::Tensor> obs, rew, term, trunc, mask;
  for (const auto& o : outs) {
    obs.push_back(o.obs);
    rew.push_back(torch::tensor(static_cast<float>(o.reward)));
    term.push_back(torch::tensor(o.terminated));
    trunc.push_back(torch::tensor(o.truncated));
    if (o.action_mask.defined()) mask.push_back(o.action_mask);
  }
  Message m;
  m.type = type;
  m.seq = seq;
  m.meta = nlohmann::json{{"env", env_name_}}.dump();
  m.tensors.push_back(to_blob("obs", torch::stack(obs)));
  if (type == MsgType::kStepReply) {
    m.tensors.push_back(to_blob("rewards", torch::stack(rew)));
    m.tensors.push_back(to_blob("terminated", torch::stack(term)));
    m.tensors.push_back(to_blob("truncated", torch::stack(trunc)));
  }
  if (final_obs) m.tensors.push_back(to_blob("final_obs", torch::stack(*final_obs)));
  if (!mask.empty()) {
    ATTNPILOT_CHECK_ARG(mask.size() == outs.size(), "action masks from only {} of {} envs",
                        mask.size(), outs.size());
    m.tensors.push_back(to_blob("action_mask", torch::stack(mask)));
  }
  return m;
}

Message EnvServer::handle(const std::string& peer, const Message& req) {
  switch (req.type) {
    case MsgType::kSpecRequest: {
      Message m;
      m.type = MsgType::kSpecReply;
      m.seq = req.seq;
      nlohmann::json j{{"env", env_name_},
                       {"observation_space", prototype_->observation_space()},
                       {"action_space", prototype_->action_space()},
                       {"has_action_mask", prototype_->has_action_mask()},
                       {"protocol_version", kProtocolVersion}};
      m.meta = j.dump();
      return m;
    }
    case MsgType::kResetRequest: {
      const auto meta = parse_meta(req);
      const uint64_t seed = meta_get<uint64_t>(meta, "seed", req);
      int64_t n = meta.contains("num_envs") ? meta_get<int64_t>(meta, "num_envs", req) : 1;
      ATTNPILOT_CHECK_ARG(n >= 1 && n <= opts_.max_envs_per_session, "num_envs {} outside [1, {}]",
                          n, opts_.max_envs_per_session);
      auto it = sessions_.find(peer);
      if (it == sessions_.end()) {
        ATTNPILOT_CHECK_ARG(static_cast<int>(sessions_.size()) < opts_.max_sessions,
                            "server full: {} sessions open (max_sessions)", sessions_.size());
        it = sessions_.emplace(peer, Session{}).first;
        log::info(fmt::format("env-server: new session ({} open)", sessions_.size()));
      }
      Session& s = it->second;
      s.last_active_ms = now_ms();
      s.envs.resize(static_cast<size_t>(n));
      std::vector<ServedEnv::Out> outs;
      for (int64_t i = 0; i < n; ++i) {
        if (!s.envs[i]) s.envs[i] = factory_();
        outs.push_back(s.envs[i]->reset(seed + static_cast<uint64_t>(i)));
      }
      return reply_with(MsgType::kResetReply, req.seq, outs);
    }
    case MsgType::kStepRequest: {
      auto it = sessions_.find(peer);
      ATTNPILOT_CHECK_ARG(it != sessions_.end(), "step before reset: this client has no session");
      Session& s = it->second;
      s.last_active_ms = now_ms();
      const torch::Tensor actions = to_torch(req.tensor("actions"));
      const int64_t n = static_cast<int64_t>(s.envs.size());
      ATTNPILOT_CHECK_ARG(actions.dim() >= 1 && actions.size(0) == n,
                          "actions of shape {} for a session of {} env(s); expected leading dim {}",
                          c10::str(actions.sizes()), n, n);
      std::vector<ServedEnv::Out> outs;
      for (int64_t i = 0; i < n; ++i) outs.push_back(s.envs[i]->step(actions[i]));
      if (n == 1) return reply_with(MsgType::kStepReply, req.seq, outs);
      std::vector<torch::Tensor> finals;
      for (int64_t i = 0; i < n; ++i) {
        const bool done = outs[i].terminated || outs[i].truncated;
        finals.push_back(done ? outs[i].obs : torch::zeros_like(outs[i].obs));
        if (done) {
          ServedEnv::Out fresh = s.envs[i]->reset_continue();
          outs[i].obs = fresh.obs;
          outs[i].action_mask = fresh.action_mask;
        }
      }
      return reply_with(MsgType::kStepReply, req.seq, outs, &finals);
    }
    case MsgType::kPing: {
      Message m = req;
      return m;
    }
    default:
      break;
  }
  throw InvalidArgument(
      fmt::format("env-server does not serve {} messages (expected "
                  "spec_request, reset_request, step_request or ping)",
                  type_name(req.type)));
}

}  // namespace attnpilot::transport
