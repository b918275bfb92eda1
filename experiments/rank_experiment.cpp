#include "experiments/rank_experiment.h"

#include <yaml-cpp/yaml.h>

#include <chrono>
#include <cmath>
#include <ctime>

#include "agent/trainer.h"
#include "attention/cost_model.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "common/log.h"
#include "common/progress.h"
#include "env/wrappers.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "policies/actor_critic.h"

namespace attnpilot::experiments {

namespace fs = std::filesystem;

namespace {

constexpr const char* kEnvName = "RankSelection-v0";

int64_t rank_count(const env::RankEnv& e) { return static_cast<int64_t>(e.ranks().size()); }

/// Smallest allowed grid index >= k for group g (the full rank is always allowed).
int64_t smallest_allowed_from(const torch::Tensor& mask2d, int64_t g, int64_t k) {
  const int64_t K = mask2d.size(1);
  for (int64_t j = k; j < K; ++j)
    if (mask2d[g][j].item<bool>()) return j;
  return K - 1;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", std::gmtime(&t));
  return buf;
}

}  // namespace

RankController static_controller(int64_t k) {
  return [k](env::RankEnv& e, const torch::Tensor&, const torch::Tensor&) {
    return e.uniform_action(k);
  };
}

RankController energy_controller(double tau) {
  ATTNPILOT_CHECK_ARG(tau > 0 && tau <= 1, "energy baseline: tau {} must be in (0, 1]", tau);
  return [tau](env::RankEnv& e, const torch::Tensor&, const torch::Tensor& mask) {
    const int64_t K = rank_count(e), G = e.num_groups(), gs = e.config().group_size;
    const int64_t gpl = e.groups_per_layer();
    auto action = e.uniform_action(e.full_rank_index());
    if (!e.spectrum_known()) return action;
    const auto energy = e.head_energy();  // [L, H, K]
    const auto m = mask.view({G, K});
    for (int64_t g = 0; g < G; ++g) {
      const int64_t l = g / gpl, h0 = (g % gpl) * gs;
      const auto worst = std::get<0>(energy[l].narrow(0, h0, gs).min(0));  // [K]
      for (int64_t k = 0; k < K; ++k) {
        if (worst[k].item<double>() >= tau && m[g][k].item<bool>()) {
          action[g] = k;
          break;
        }
      }
    }
    return action;
  };
}

RankController random_controller(std::shared_ptr<torch::Generator> gen) {
  return [gen](env::RankEnv& e, const torch::Tensor&, const torch::Tensor& mask) {
    const int64_t K = rank_count(e), G = e.num_groups();
    const auto m = mask.view({G, K});
    auto action = torch::empty({G}, torch::kInt64);
    for (int64_t g = 0; g < G; ++g) {
      const auto allowed = m[g].nonzero().squeeze(1);
      const int64_t pick = torch::randint(allowed.size(0), {1}, *gen).item<int64_t>();
      action[g] = allowed[pick].item<int64_t>();
    }
    return action;
  };
}

RankController oracle_controller(std::shared_ptr<env::RankEnv> probe) {
  return [probe](env::RankEnv& e, const torch::Tensor&, const torch::Tensor& mask) {
    const int64_t K = rank_count(e), G = e.num_groups(), gpl = e.groups_per_layer();
    const auto state = e.save_state();
    const auto m = mask.view({G, K});
    auto reward_of = [&](const torch::Tensor& a) {
      probe->load_state(state);
      probe->step(a);
      return probe->last().reward;
    };
    auto best = e.uniform_action(e.full_rank_index());
    double best_r = reward_of(best);
    for (int64_t l = 0; l < e.num_layers(); ++l) {
      auto layer_best = best.clone();
      for (int64_t k = 0; k < K; ++k) {
        auto cand = best.clone();
        for (int64_t g = l * gpl; g < (l + 1) * gpl; ++g) cand[g] = smallest_allowed_from(m, g, k);
        if (torch::equal(cand, best)) continue;
        const double r = reward_of(cand);
        if (r > best_r) {
          best_r = r;
          layer_best = cand;
        }
      }
      best = layer_best;
    }
    return best;
  };
}

RankController policy_controller(std::shared_ptr<policies::ActorCritic> policy,
                                 const nlohmann::json& obs_statistics) {
  torch::Tensor mean, stdev;
  if (!obs_statistics.is_null()) {
    env::RunningMeanStd rms;
    rms.from_json(obs_statistics);
    mean = torch::tensor(rms.mean(), torch::kFloat64).to(torch::kFloat32);
    stdev = torch::tensor(rms.var(), torch::kFloat64).add(1e-8).sqrt().to(torch::kFloat32);
  }
  return
      [policy, mean, stdev](env::RankEnv& e, const torch::Tensor& obs, const torch::Tensor& mask) {
        torch::NoGradGuard no_grad;
        auto x = obs;
        // As env::NormalizeObservation (frozen statistics, clipped at 10).
        if (mean.defined()) x = ((obs.reshape(-1) - mean) / stdev).clamp(-10, 10).view(obs.sizes());
        const auto out = policy->forward(x.unsqueeze(0));
        return policy->distribution(out, mask.unsqueeze(0)).mode().squeeze(0);
      };
}

MethodResult evaluate_method(env::RankEnv& e, const std::string& name,
                             const RankController& controller, int64_t sequences,
                             std::ostream* progress) {
  ATTNPILOT_CHECK_ARG(
      sequences >= 2 && sequences <= e.num_windows(),
      "evaluate {}: {} sequences requested; the {} split has {} windows (need >= 2)", name,
      sequences, e.config().split, e.num_windows());
  MethodResult m;
  m.method = name;
  const int64_t S = e.num_segments(), L = e.num_layers();
  m.mean_rank.assign(L, std::vector<double>(S, 0.0));
  double fidelity = 0;
  std::unique_ptr<Progress> bar;
  if (progress) bar = std::make_unique<Progress>("eval " + name, sequences, "seqs", *progress);
  for (int64_t w = 0; w < sequences; ++w) {
    auto obs = e.reset_to_window(w);
    double nll = 0;
    int64_t tokens = 0;
    for (int64_t t = 0; t < S; ++t) {
      const auto mask = e.action_mask();
      const auto a = controller(e, obs, mask);
      const auto r = e.step(a);
      const auto& rec = e.last();
      m.attn_flops += rec.score_flops;
      m.attn_time_us += rec.attn_time_us;
      m.control_flops += rec.control_flops;
      m.guardrail_violations += rec.violations;
      m.decisions += rec.decisions;
      fidelity += rec.fidelity;
      nll += rec.nll_sum;
      tokens += rec.tokens;
      const auto per_layer = rec.ranks.to(torch::kFloat64).mean(1);
      for (int64_t l = 0; l < L; ++l) m.mean_rank[l][t] += per_layer[l].item<double>() / sequences;
      obs = r.observation;
    }
    m.seq_nll.push_back(nll / std::max<int64_t>(1, tokens));
    if (bar) bar->update(w + 1);
  }
  if (bar) bar->finish();
  m.fidelity = fidelity / (sequences * S);
  return m;
}

ExperimentConfig ExperimentConfig::from_config(const Config& cfg) {
  ExperimentConfig c;
  c.seed = cfg.get<uint64_t>("seed", c.seed);
  c.train_steps = cfg.get<int64_t>("train_steps", c.train_steps);
  c.eval_sequences = cfg.get<int64_t>("eval_sequences", c.eval_sequences);
  c.energy_taus = cfg.get<std::vector<double>>("energy_taus", c.energy_taus);
  c.random = cfg.get<bool>("random", c.random);
  c.oracle = cfg.get<bool>("oracle", c.oracle);
  c.calibrate = cfg.get<bool>("calibrate", c.calibrate);
  c.threads = cfg.get<int>("threads", c.threads);
  ATTNPILOT_CHECK_ARG(c.train_steps > 0, "experiment.train_steps {} must be > 0", c.train_steps);
  ATTNPILOT_CHECK_ARG(c.eval_sequences >= 2, "experiment.eval_sequences {} must be >= 2",
                      c.eval_sequences);
  ATTNPILOT_CHECK_ARG(c.threads >= 1, "experiment.threads {} must be >= 1", c.threads);
  for (double t : c.energy_taus)
    ATTNPILOT_CHECK_ARG(t > 0 && t <= 1, "experiment.energy_taus holds {}; each must be in (0, 1]",
                        t);
  return c;
}

std::vector<ResultRow> run_rank_experiment(const RunRequest& req, std::ostream* progress) {
  const Config root = Config::load(req.config);
  const ExperimentConfig ec = ExperimentConfig::from_config(root.section("experiment"));
  const Config env_section = root.section("env");
  env::RankEnvConfig base = env::RankEnvConfig::from_config(env_section);
  ATTNPILOT_CHECK_ARG(base.split == "train",
                      "env.split is '{}': the runner trains on the train split and evaluates on "
                      "the validation split; leave env.split out or set it to train",
                      base.split);
  agent::TrainerConfig tc =
      agent::TrainerConfig::from_config(kEnvName, root, ec.train_steps, ec.seed);
  root.check_all_read();
  torch::set_num_threads(ec.threads);

  const fs::path out = req.out;
  fs::create_directories(out);
  const std::string config_text = read_file(req.config);
  write_file_atomic(out / "config.yaml", config_text);

  // 1. The cost model (always calibrated for the report's machine line; used by the reward
  //    when env.reward.cost is time and no file was given).
  const fs::path cost_file = out / "cost_model.json";
  nlohmann::json machine = attention::CostModel::describe_machine(attention::CalibrationOptions());
  if (req.calibrate && ec.calibrate) {
    const auto mc = model::ModelConfig::load(fs::path(base.model) / "config.json");
    attention::CalibrationOptions co = attention::CalibrationOptions::quick();
    co.head_dims = {mc.head_dim};
    co.heads = mc.num_heads;
    co.kv_heads = mc.num_kv_heads;
    co.query_lengths = {base.segment};
    co.key_lengths.clear();
    for (int64_t m = base.segment; m <= base.sequence_length; m += base.segment)
      co.key_lengths.push_back(m);
    co.ranks.clear();
    for (int64_t r : base.ranks)
      if (r < mc.head_dim) co.ranks.push_back(r);
    if (co.ranks.empty()) co.ranks.push_back(std::max<int64_t>(1, mc.head_dim / 2));
    co.threads = ec.threads;
    if (progress) *progress << "== calibrating the attention cost model\n";
    const auto cm = attention::CostModel::calibrate(co, progress);
    cm.save(cost_file);
    machine = cm.machine();
  }
  if (base.cost == "time" && base.cost_model.empty()) {
    ATTNPILOT_CHECK_ARG(fs::exists(cost_file),
                        "env.reward.cost is time but no cost model: set env.reward.cost_model or "
                        "keep experiment.calibrate on");
    base.cost_model = cost_file.string();
    YAML::Node n = YAML::Load(tc.env_yaml);
    n["reward"]["cost_model"] = base.cost_model;
    YAML::Emitter em;
    em << n;
    tc.env_yaml = em.c_str();
  }

  // 2. Training (resumed when DIR/train holds a checkpoint: nothing trained is lost).
  const fs::path train_dir = out / "train";
  const fs::path ckpt = req.policy.empty() ? train_dir / "checkpoint" : req.policy;
  if (req.train) {
    std::unique_ptr<agent::Trainer> trainer;
    if (fs::exists(train_dir / "checkpoint" / "manifest.json")) {
      trainer = agent::Trainer::resume(train_dir / "checkpoint", train_dir);
      auto saved = trainer->config().to_json(), now = tc.to_json();
      saved.erase("total_steps");
      now.erase("total_steps");
      if (saved != now) {
        // Another configuration trained there: keep that work, start afresh beside it.
        const fs::path aside = out / fmt::format("train.previous-{}", std::time(nullptr));
        trainer.reset();
        fs::rename(train_dir, aside);
        log::warn(
            fmt::format("run: {} was trained with another config; moved to {}, training "
                        "afresh",
                        train_dir.string(), aside.string()));
      }
    }
    if (trainer) {
      trainer->set_total_steps(ec.train_steps);
      log::info(fmt::format("run: resuming training at step {}", trainer->global_step()));
    } else {
      trainer = std::make_unique<agent::Trainer>(tc, train_dir);
    }
    if (progress)
      *progress << "== training the rank policy (PPO, " << ec.train_steps << " steps)\n";
    trainer->run(-1, progress);
  }
  if (!req.eval) return {};

  // 3. Evaluation on held-out windows, the same ones for every method.
  ATTNPILOT_CHECK_ARG(fs::exists(ckpt / "manifest.json"),
                      "no trained policy at {}: run training first (attnpilot run, or attnpilot "
                      "train --task rank)",
                      ckpt.string());
  env::RankEnvConfig ev = base;
  ev.split = "validation";
  ev.max_sequences = ec.eval_sequences;
  env::RankEnvConfig ev_free = ev;
  ev_free.guardrail = false;
  env::RankEnv guarded(ev), free_env(ev_free);
  const int64_t n = std::min(ec.eval_sequences, guarded.num_windows());
  if (n < ec.eval_sequences)
    log::warn(fmt::format("run: the validation split holds {} windows of {} tokens; evaluating {}",
                          guarded.num_windows(), ev.sequence_length, n));
  std::vector<MethodResult> results;
  if (progress) *progress << "== evaluating on " << n << " held-out sequences\n";
  results.push_back(evaluate_method(free_env, "dense",
                                    static_controller(free_env.full_rank_index()), n, progress));
  for (int64_t k = 0; k < free_env.full_rank_index(); ++k)
    results.push_back(evaluate_method(free_env, fmt::format("static-r{}", free_env.ranks()[k]),
                                      static_controller(k), n, progress));
  for (double tau : ec.energy_taus)
    results.push_back(evaluate_method(free_env, fmt::format("energy-{}", tau),
                                      energy_controller(tau), n, progress));
  if (ec.random) {
    auto gen = std::make_shared<torch::Generator>(at::detail::createCPUGenerator(ec.seed + 7));
    results.push_back(evaluate_method(guarded, "random", random_controller(gen), n, progress));
  }
  if (ec.oracle) {
    auto probe = std::make_shared<env::RankEnv>(ev);
    results.push_back(evaluate_method(guarded, "oracle", oracle_controller(probe), n, progress));
  }
  {
    std::shared_ptr<agent::Trainer> trainer = agent::Trainer::resume(ckpt);
    std::shared_ptr<policies::ActorCritic> policy(trainer, &trainer->policy());
    results.push_back(evaluate_method(guarded, "policy",
                                      policy_controller(policy, trainer->observation_statistics()),
                                      n, progress));
  }

  ExperimentSummary s;
  s.config_text = config_text;
  s.model_dir = base.model;
  s.model_fingerprint = model::model_fingerprint(base.model);
  s.machine = machine.dump(2);
  s.seed = ec.seed;
  s.eval_sequences = n;
  s.sequence_length = base.sequence_length;
  s.segment = base.segment;
  s.ranks = guarded.ranks();
  s.guardrail_epsilon = base.guardrail ? base.epsilon : 0.0;
  s.cost_source =
      base.cost == "time" ? fmt::format("time (calibrated: {})", base.cost_model) : "flops";
  s.date = utc_now();
  write_report(out, results, s, train_dir / "metrics.jsonl");
  return result_rows(results);
}

}  // namespace attnpilot::experiments
