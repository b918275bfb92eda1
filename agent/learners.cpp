#include "agent/learners.h"

#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"

namespace attnpilot::agent {

PpoConfig PpoConfig::from_config(const Config& c) {
  PpoConfig p;
  p.algorithm = c.get<std::string>("algorithm", p.algorithm);
  p.learning_rate = c.get<double>("learning_rate", p.learning_rate);
  p.anneal_lr = c.get<bool>("anneal_lr", p.anneal_lr);
  p.num_envs = c.get<int64_t>("num_envs", p.num_envs);
  p.num_steps = c.get<int64_t>("num_steps", p.num_steps);
  p.gamma = c.get<double>("gamma", p.gamma);
  p.gae_lambda = c.get<double>("gae_lambda", p.gae_lambda);
  p.num_minibatches = c.get<int64_t>("num_minibatches", p.num_minibatches);
  p.update_epochs = c.get<int64_t>("update_epochs", p.update_epochs);
  p.norm_adv = c.get<bool>("norm_adv", p.norm_adv);
  p.clip_coef = c.get<double>("clip_coef", p.clip_coef);
  p.clip_vloss = c.get<bool>("clip_vloss", p.clip_vloss);
  p.ent_coef = c.get<double>("ent_coef", p.ent_coef);
  p.vf_coef = c.get<double>("vf_coef", p.vf_coef);
  p.max_grad_norm = c.get<double>("max_grad_norm", p.max_grad_norm);
  p.target_kl = c.get<double>("target_kl", p.target_kl);
  p.epsilon = c.get<double>("epsilon", p.epsilon);
  p.adam_eps = c.get<double>("adam_eps", p.adam_eps);
  ATTNPILOT_CHECK_ARG(p.algorithm == "ppo" || p.algorithm == "reinforce",
                      "ppo.algorithm '{}': expected ppo or reinforce", p.algorithm);
  ATTNPILOT_CHECK_ARG(p.learning_rate > 0, "ppo.learning_rate {} must be > 0", p.learning_rate);
  ATTNPILOT_CHECK_ARG(p.num_envs > 0 && p.num_steps > 0,
                      "ppo.num_envs {} and num_steps {} must be > 0", p.num_envs, p.num_steps);
  ATTNPILOT_CHECK_ARG(p.gamma >= 0 && p.gamma <= 1, "ppo.gamma {} not in [0, 1]", p.gamma);
  ATTNPILOT_CHECK_ARG(p.gae_lambda >= 0 && p.gae_lambda <= 1, "ppo.gae_lambda {} not in [0, 1]",
                      p.gae_lambda);
  ATTNPILOT_CHECK_ARG(p.num_minibatches > 0 && p.batch_size() % p.num_minibatches == 0,
                      "ppo.num_minibatches {} must divide the batch size {}", p.num_minibatches,
                      p.batch_size());
  ATTNPILOT_CHECK_ARG(p.update_epochs > 0, "ppo.update_epochs {} must be > 0", p.update_epochs);
  ATTNPILOT_CHECK_ARG(p.clip_coef > 0, "ppo.clip_coef {} must be > 0", p.clip_coef);
  ATTNPILOT_CHECK_ARG(p.max_grad_norm > 0, "ppo.max_grad_norm {} must be > 0", p.max_grad_norm);
  ATTNPILOT_CHECK_ARG(p.epsilon >= 0 && p.epsilon < 1, "ppo.epsilon {} not in [0, 1)", p.epsilon);
  return p;
}

nlohmann::json PpoConfig::to_json() const {
  return {{"algorithm", algorithm},
          {"learning_rate", learning_rate},
          {"anneal_lr", anneal_lr},
          {"num_envs", num_envs},
          {"num_steps", num_steps},
          {"gamma", gamma},
          {"gae_lambda", gae_lambda},
          {"num_minibatches", num_minibatches},
          {"update_epochs", update_epochs},
          {"norm_adv", norm_adv},
          {"clip_coef", clip_coef},
          {"clip_vloss", clip_vloss},
          {"ent_coef", ent_coef},
          {"vf_coef", vf_coef},
          {"max_grad_norm", max_grad_norm},
          {"target_kl", target_kl},
          {"epsilon", epsilon},
          {"adam_eps", adam_eps}};
}

PpoConfig PpoConfig::from_json(const nlohmann::json& j) {
  try {
    PpoConfig p;
    p.algorithm = j.at("algorithm").get<std::string>();
    p.learning_rate = j.at("learning_rate").get<double>();
    p.anneal_lr = j.at("anneal_lr").get<bool>();
    p.num_envs = j.at("num_envs").get<int64_t>();
    p.num_steps = j.at("num_steps").get<int64_t>();
    p.gamma = j.at("gamma").get<double>();
    p.gae_lambda = j.at("gae_lambda").get<double>();
    p.num_minibatches = j.at("num_minibatches").get<int64_t>();
    p.update_epochs = j.at("update_epochs").get<int64_t>();
    p.norm_adv = j.at("norm_adv").get<bool>();
    p.clip_coef = j.at("clip_coef").get<double>();
    p.clip_vloss = j.at("clip_vloss").get<bool>();
    p.ent_coef = j.at("ent_coef").get<double>();
    p.vf_coef = j.at("vf_coef").get<double>();
    p.max_grad_norm = j.at("max_grad_norm").get<double>();
    p.target_kl = j.at("target_kl").get<double>();
    p.epsilon = j.at("epsilon").get<double>();
    p.adam_eps = j.at("adam_eps").get<double>();
    return p;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("ppo config JSON: {}", e.what()));
  }
}

nlohmann::json UpdateMetrics::to_json() const {
  return {{"policy_loss", policy_loss},
          {"value_loss", value_loss},
          {"entropy", entropy},
          {"approx_kl", approx_kl},
          {"old_approx_kl", old_approx_kl},
          {"clipfrac", clipfrac},
          {"explained_variance", explained_variance},
          {"learning_rate", learning_rate},
          {"epochs", epochs},
          {"minibatches", minibatches}};
}

// ---------------------------------------------------------------------------------------

Learner::Learner(std::shared_ptr<policies::ActorCritic> policy, PpoConfig cfg)
    : policy_(std::move(policy)), cfg_(std::move(cfg)) {
  ATTNPILOT_CHECK_ARG(policy_ != nullptr, "Learner: policy must not be null");
  opt_ = std::make_unique<torch::optim::Adam>(
      policy_->parameters(), torch::optim::AdamOptions(cfg_.learning_rate).eps(cfg_.adam_eps));
}

void Learner::set_learning_rate(double lr) {
  for (auto& g : opt_->param_groups()) static_cast<torch::optim::AdamOptions&>(g.options()).lr(lr);
}

double Learner::learning_rate() const {
  return static_cast<const torch::optim::AdamOptions&>(opt_->param_groups()[0].options()).lr();
}

void Learner::save_optimizer(const std::filesystem::path& path) const {
  torch::serialize::OutputArchive ar;
  opt_->save(ar);
  std::ostringstream os;
  ar.save_to(os);
  write_file_atomic(path, os.str());
}

void Learner::load_optimizer(const std::filesystem::path& path) {
  const std::string bytes = read_file(path);
  torch::serialize::InputArchive ar;
  try {
    ar.load_from(bytes.data(), bytes.size());
    opt_->load(ar);
  } catch (const c10::Error& e) {
    throw FormatError(fmt::format("{}: {}", path.string(), e.what_without_backtrace()));
  }
}

namespace {

double explained_variance(const torch::Tensor& values, const torch::Tensor& returns) {
  const double var_y = returns.var(/*unbiased=*/false).item<double>();
  if (var_y == 0) return std::nan("");
  return 1.0 - (returns - values).var(false).item<double>() / var_y;
}

void check_batch(const Batch& b, const policies::ActorCritic& p) {
  ATTNPILOT_CHECK_ARG(b.obs.defined() && b.size() > 0, "update: empty batch");
  const int64_t m = b.size();
  ATTNPILOT_CHECK_ARG(b.actions.size(0) == m && b.logprobs.size(0) == m &&
                          b.advantages.size(0) == m && b.returns.size(0) == m &&
                          b.values.size(0) == m,
                      "update: batch tensors disagree on the batch size {}", m);
  if (b.masks.defined())
    ATTNPILOT_CHECK_ARG(b.masks.size(0) == m && b.masks.size(1) == p.action_space().mask_size(),
                        "update: masks must be [{}, {}], got {}", m, p.action_space().mask_size(),
                        c10::str(b.masks.sizes()));
}

torch::Tensor rows(const torch::Tensor& t, const torch::Tensor& idx) {
  return t.defined() ? t.index_select(0, idx) : t;
}

}  // namespace

PpoLearner::PpoLearner(std::shared_ptr<policies::ActorCritic> policy, PpoConfig cfg)
    : Learner(std::move(policy), std::move(cfg)) {}

UpdateMetrics PpoLearner::update(const Batch& b, torch::Generator& gen) {
  check_batch(b, *policy_);
  const int64_t m = b.size();
  const int64_t mb = std::max<int64_t>(1, m / cfg_.num_minibatches);
  UpdateMetrics out;
  out.learning_rate = learning_rate();
  double sum_pg = 0, sum_v = 0, sum_ent = 0, sum_kl = 0, sum_okl = 0, sum_cf = 0;
  const auto params = policy_->parameters();
  for (int64_t epoch = 0; epoch < cfg_.update_epochs; ++epoch) {
    auto perm = torch::randperm(m, gen, torch::TensorOptions(torch::kInt64));
    double epoch_kl = 0;
    for (int64_t start = 0; start + mb <= m; start += mb) {
      auto idx = perm.slice(0, start, start + mb);
      auto out_p = policy_->forward(rows(b.obs, idx));
      auto dist = policy_->distribution(out_p, rows(b.masks, idx), cfg_.epsilon);
      auto newlogp = dist.log_prob(rows(b.actions, idx));
      auto entropy = dist.entropy().mean();
      auto logratio = newlogp - rows(b.logprobs, idx);
      auto ratio = logratio.exp();
      double kl, okl, cf;
      {
        torch::NoGradGuard ng;
        okl = (-logratio).mean().item<double>();
        kl = ((ratio - 1) - logratio).mean().item<double>();
        cf = ((ratio - 1.0).abs() > cfg_.clip_coef).to(torch::kFloat32).mean().item<double>();
      }
      auto adv = rows(b.advantages, idx);
      if (cfg_.norm_adv && mb > 1) adv = (adv - adv.mean()) / (adv.std() + 1e-8);
      auto pg_loss = torch::max(-adv * ratio,
                                -adv * torch::clamp(ratio, 1 - cfg_.clip_coef, 1 + cfg_.clip_coef))
                         .mean();
      auto ret = rows(b.returns, idx);
      torch::Tensor v_loss;
      if (cfg_.clip_vloss) {
        auto old_v = rows(b.values, idx);
        auto unclipped = (out_p.value - ret).pow(2);
        auto clipped_v = old_v + torch::clamp(out_p.value - old_v, -cfg_.clip_coef, cfg_.clip_coef);
        v_loss = 0.5 * torch::max(unclipped, (clipped_v - ret).pow(2)).mean();
      } else {
        v_loss = 0.5 * (out_p.value - ret).pow(2).mean();
      }
      auto loss = pg_loss - cfg_.ent_coef * entropy + cfg_.vf_coef * v_loss;
      opt_->zero_grad();
      loss.backward();
      torch::nn::utils::clip_grad_norm_(params, cfg_.max_grad_norm);
      opt_->step();
      sum_pg += pg_loss.item<double>();
      sum_v += v_loss.item<double>();
      sum_ent += entropy.item<double>();
      sum_kl += kl;
      sum_okl += okl;
      sum_cf += cf;
      epoch_kl = kl;
      ++out.minibatches;
    }
    ++out.epochs;
    if (cfg_.target_kl > 0 && epoch_kl > cfg_.target_kl) break;
  }
  const double n = std::max<int64_t>(1, out.minibatches);
  out.policy_loss = sum_pg / n;
  out.value_loss = sum_v / n;
  out.entropy = sum_ent / n;
  out.approx_kl = sum_kl / n;
  out.old_approx_kl = sum_okl / n;
  out.clipfrac = sum_cf / n;
  out.explained_variance = explained_variance(b.values, b.returns);
  return out;
}

ReinforceLearner::ReinforceLearner(std::shared_ptr<policies::ActorCritic> policy, PpoConfig cfg)
    : Learner(std::move(policy), std::move(cfg)) {}

UpdateMetrics ReinforceLearner::update(const Batch& b, torch::Generator& gen) {
  check_batch(b, *policy_);
  auto out_p = policy_->forward(b.obs);
  auto dist = policy_->distribution(out_p, b.masks, cfg_.epsilon);
  auto logp = dist.log_prob(b.actions);
  auto entropy = dist.entropy().mean();
  auto adv = (b.returns - out_p.value).detach();
  if (cfg_.norm_adv && b.size() > 1) adv = (adv - adv.mean()) / (adv.std() + 1e-8);
  auto pg_loss = -(logp * adv).mean();
  auto v_loss = 0.5 * (out_p.value - b.returns).pow(2).mean();
  auto loss = pg_loss - cfg_.ent_coef * entropy + cfg_.vf_coef * v_loss;
  opt_->zero_grad();
  loss.backward();
  torch::nn::utils::clip_grad_norm_(policy_->parameters(), cfg_.max_grad_norm);
  opt_->step();
  UpdateMetrics m;
  m.learning_rate = learning_rate();
  m.policy_loss = pg_loss.item<double>();
  m.value_loss = v_loss.item<double>();
  m.entropy = entropy.item<double>();
  {
    torch::NoGradGuard ng;
    auto lr = logp - b.logprobs;
    m.approx_kl = ((lr.exp() - 1) - lr).mean().item<double>();
    m.old_approx_kl = (-lr).mean().item<double>();
  }
  m.explained_variance = explained_variance(b.values, b.returns);
  m.epochs = m.minibatches = 1;
  return m;
}

std::unique_ptr<Learner> make_learner(std::shared_ptr<policies::ActorCritic> policy,
                                      const PpoConfig& cfg) {
  if (cfg.algorithm == "ppo") return std::make_unique<PpoLearner>(std::move(policy), cfg);
  if (cfg.algorithm == "reinforce")
    return std::make_unique<ReinforceLearner>(std::move(policy), cfg);
  throw InvalidArgument(fmt::format("algorithm '{}': expected ppo or reinforce", cfg.algorithm));
}

}  // namespace attnpilot::agent
