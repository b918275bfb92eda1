#include "policies/actor_critic.h"

#include <cmath>

#include "common/atomic_file.h"
#include "common/error.h"

namespace attnpilot::policies {

namespace {
std::vector<int64_t> nvec_of(const env::Space& a) {
  switch (a.kind) {
    case env::SpaceKind::kDiscrete:
      return {a.n};
    case env::SpaceKind::kMultiDiscrete:
      return a.nvec;
    default:
      throw Unavailable(fmt::format(
          "policies: action space {} is continuous; only Discrete and MultiDiscrete action "
          "spaces are supported",
          a.describe()));
  }
}
}  // namespace

PolicyConfig PolicyConfig::from_config(const Config& cfg) {
  PolicyConfig p;
  p.type = cfg.get<std::string>("type", p.type);
  p.hidden = cfg.get<std::vector<int64_t>>("hidden", p.hidden);
  p.d_model = cfg.get<int64_t>("d_model", p.d_model);
  p.heads = cfg.get<int64_t>("heads", p.heads);
  p.layers = cfg.get<int64_t>("layers", p.layers);
  p.ff = cfg.get<int64_t>("ff", p.ff);
  ATTNPILOT_CHECK_ARG(p.type == "mlp" || p.type == "transformer",
                      "policy.type '{}': expected mlp or transformer", p.type);
  for (auto h : p.hidden)
    ATTNPILOT_CHECK_ARG(h > 0, "policy.hidden: widths must be > 0, got {}", h);
  ATTNPILOT_CHECK_ARG(p.d_model > 0 && p.heads > 0 && p.d_model % p.heads == 0,
                      "policy: d_model {} must be a positive multiple of heads {}", p.d_model,
                      p.heads);
  ATTNPILOT_CHECK_ARG(p.layers >= 0 && p.ff > 0, "policy: layers {} >= 0 and ff {} > 0", p.layers,
                      p.ff);
  return p;
}

nlohmann::json PolicyConfig::to_json() const {
  return {{"type", type},   {"hidden", hidden}, {"d_model", d_model},
          {"heads", heads}, {"layers", layers}, {"ff", ff}};
}

PolicyConfig PolicyConfig::from_json(const nlohmann::json& j) {
  try {
    PolicyConfig p;
    p.type = j.at("type").get<std::string>();
    p.hidden = j.at("hidden").get<std::vector<int64_t>>();
    p.d_model = j.at("d_model").get<int64_t>();
    p.heads = j.at("heads").get<int64_t>();
    p.layers = j.at("layers").get<int64_t>();
    p.ff = j.at("ff").get<int64_t>();
    return p;
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("policy config JSON: {}", e.what()));
  }
}

ActorCritic::ActorCritic(env::Space observation_space, env::Space action_space)
    : obs_space_(std::move(observation_space)), act_space_(std::move(action_space)) {
  nvec_ = nvec_of(act_space_);
  ATTNPILOT_CHECK_ARG(obs_space_.kind == env::SpaceKind::kBox,
                      "policies: observation space {} must be a Box", obs_space_.describe());
}

MaskedCategorical ActorCritic::distribution(const PolicyOutput& out, const torch::Tensor& mask,
                                            double epsilon) const {
  return MaskedCategorical(out.logits, nvec_, mask, epsilon);
}

void init_linear(torch::nn::Linear& layer, double gain, torch::Generator& gen) {
  torch::NoGradGuard no_grad;
  auto& w = layer->weight;
  const int64_t rows = w.size(0), cols = w.size(1);
  const bool tall = rows >= cols;
  auto a = torch::randn(tall ? std::vector<int64_t>{rows, cols} : std::vector<int64_t>{cols, rows},
                        gen, torch::kFloat32);
  auto [q, r] = torch::linalg_qr(a);
  q = q * torch::sign(torch::diagonal(r)).unsqueeze(0);
  w.copy_((tall ? q : q.t()) * gain);
  if (layer->bias.defined()) layer->bias.zero_();
}

// ---------------------------------------------------------------------------------------

MlpActorCritic::MlpActorCritic(env::Space observation_space, env::Space action_space,
                               const std::vector<int64_t>& hidden, torch::Generator& gen)
    : ActorCritic(std::move(observation_space), std::move(action_space)) {
  const int64_t in = obs_space_.flat_size();
  const int64_t out = act_space_.mask_size();
  auto build = [&](int64_t final_out, double final_gain) {
    torch::nn::Sequential seq;
    int64_t width = in;
    for (auto h : hidden) {
      torch::nn::Linear l(width, h);
      init_linear(l, std::sqrt(2.0), gen);
      seq->push_back(l);
      seq->push_back(torch::nn::Tanh());
      width = h;
    }
    torch::nn::Linear l(width, final_out);
    init_linear(l, final_gain, gen);
    seq->push_back(l);
    return seq;
  };
  critic_ = register_module("critic", build(1, 1.0));
  actor_ = register_module("actor", build(out, 0.01));
}

PolicyOutput MlpActorCritic::forward(const torch::Tensor& obs) {
  auto x = obs.reshape({obs.size(0), -1});
  return {actor_->forward(x), critic_->forward(x).squeeze(1)};
}

torch::Tensor MlpActorCritic::value(const torch::Tensor& obs) {
  return critic_->forward(obs.reshape({obs.size(0), -1})).squeeze(1);
}

// ---------------------------------------------------------------------------------------

TransformerActorCritic::TransformerActorCritic(env::Space observation_space,
                                               env::Space action_space, const PolicyConfig& cfg,
                                               torch::Generator& gen)
    : ActorCritic(std::move(observation_space), std::move(action_space)),
      d_model_(cfg.d_model),
      heads_(cfg.heads) {
  const auto& shape = obs_space_.shape;
  ATTNPILOT_CHECK_ARG(shape.size() == 1 || shape.size() == 2,
                      "transformer policy: observation shape must be [T, F] or [D], got {}",
                      obs_space_.describe());
  tokens_ = shape[0];
  features_ = shape.size() == 2 ? shape[1] : 1;
  ATTNPILOT_CHECK_ARG(d_model_ % heads_ == 0, "transformer policy: d_model {} % heads {} != 0",
                      d_model_, heads_);
  per_token_ = act_space_.kind == env::SpaceKind::kMultiDiscrete &&
               static_cast<int64_t>(nvec_.size()) == tokens_ &&
               std::all_of(nvec_.begin(), nvec_.end(), [&](int64_t k) { return k == nvec_[0]; });
  embed_ = register_module("embed", torch::nn::Linear(features_, d_model_));
  init_linear(embed_, 1.0, gen);
  pos_ = register_parameter("pos", torch::randn({tokens_, d_model_}, gen, torch::kFloat32) * 0.02);
  for (int64_t i = 0; i < cfg.layers; ++i) {
    Block b;
    const std::string p = "block" + std::to_string(i) + "_";
    b.ln1 =
        register_module(p + "ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model_})));
    b.ln2 =
        register_module(p + "ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model_})));
    b.qkv = register_module(p + "qkv", torch::nn::Linear(d_model_, 3 * d_model_));
    b.proj = register_module(p + "proj", torch::nn::Linear(d_model_, d_model_));
    b.fc1 = register_module(p + "fc1", torch::nn::Linear(d_model_, cfg.ff));
    b.fc2 = register_module(p + "fc2", torch::nn::Linear(cfg.ff, d_model_));
    init_linear(b.qkv, 1.0, gen);
    init_linear(b.proj, 1.0 / std::sqrt(2.0 * cfg.layers), gen);
    init_linear(b.fc1, std::sqrt(2.0), gen);
    init_linear(b.fc2, 1.0 / std::sqrt(2.0 * cfg.layers), gen);
    blocks_.push_back(b);
  }
  ln_final_ =
      register_module("ln_final", torch::nn::LayerNorm(torch::nn::LayerNormOptions({d_model_})));
  const int64_t head_out = per_token_ ? nvec_[0] : act_space_.mask_size();
  policy_head_ = register_module("policy_head", torch::nn::Linear(d_model_, head_out));
  value_head_ = register_module("value_head", torch::nn::Linear(d_model_, 1));
  init_linear(policy_head_, 0.01, gen);
  init_linear(value_head_, 1.0, gen);
}

torch::Tensor TransformerActorCritic::encode(const torch::Tensor& obs) {
  const int64_t b = obs.size(0);
  auto x = embed_->forward(obs.reshape({b, tokens_, features_})) + pos_;
  const int64_t dh = d_model_ / heads_;
  for (auto& blk : blocks_) {
    auto qkv = blk.qkv->forward(blk.ln1->forward(x))
                   .reshape({b, tokens_, 3, heads_, dh})
                   .permute({2, 0, 3, 1, 4});  // [3, B, H, T, dh]
    auto att =
        torch::softmax(torch::matmul(qkv[0], qkv[1].transpose(-2, -1)) / std::sqrt(double(dh)), -1);
    auto y = torch::matmul(att, qkv[2]).transpose(1, 2).reshape({b, tokens_, d_model_});
    x = x + blk.proj->forward(y);
    x = x + blk.fc2->forward(torch::gelu(blk.fc1->forward(blk.ln2->forward(x))));
  }
  return ln_final_->forward(x);  // [B, T, d]
}

PolicyOutput TransformerActorCritic::forward(const torch::Tensor& obs) {
  ATTNPILOT_CHECK_ARG(obs.dim() >= 2 && obs.numel() == obs.size(0) * tokens_ * features_,
                      "transformer policy: obs must be [B, {}, {}], got {}", tokens_, features_,
                      c10::str(obs.sizes()));
  auto h = encode(obs);
  auto pooled = h.mean(1);
  torch::Tensor logits = per_token_ ? policy_head_->forward(h).reshape({obs.size(0), -1})
                                    : policy_head_->forward(pooled);
  return {logits, value_head_->forward(pooled).squeeze(1)};
}

// ---------------------------------------------------------------------------------------

std::shared_ptr<ActorCritic> make_policy(const PolicyConfig& cfg, const env::Space& obs_space,
                                         const env::Space& act_space, torch::Generator& gen) {
  if (cfg.type == "mlp")
    return std::make_shared<MlpActorCritic>(obs_space, act_space, cfg.hidden, gen);
  if (cfg.type == "transformer")
    return std::make_shared<TransformerActorCritic>(obs_space, act_space, cfg, gen);
  throw InvalidArgument(fmt::format("policy type '{}': expected mlp or transformer", cfg.type));
}

void save_policy(const ActorCritic& policy, const PolicyConfig& cfg,
                 const std::filesystem::path& dir, const nlohmann::json& extra) {
  torch::serialize::OutputArchive ar;
  policy.save(ar);
  std::ostringstream os;
  ar.save_to(os);
  write_file_atomic(dir / "policy.pt", os.str());
  nlohmann::json m = {{"format_version", kPolicyFormatVersion},
                      {"kind", policy.kind()},
                      {"observation_space", policy.observation_space().to_json()},
                      {"action_space", policy.action_space().to_json()},
                      {"config", cfg.to_json()}};
  for (auto it = extra.begin(); it != extra.end(); ++it) m[it.key()] = it.value();
  write_file_atomic(dir / "policy.json", m.dump(2));
}

std::shared_ptr<ActorCritic> load_policy(const std::filesystem::path& dir,
                                         nlohmann::json* manifest) {
  nlohmann::json m;
  try {
    m = nlohmann::json::parse(read_file(dir / "policy.json"));
  } catch (const nlohmann::json::exception& e) {
    throw FormatError(fmt::format("{}: {}", (dir / "policy.json").string(), e.what()));
  }
  if (!m.contains("format_version") || m["format_version"] != kPolicyFormatVersion)
    throw FormatError(
        fmt::format("{}: format_version {} (expected {})", (dir / "policy.json").string(),
                    m.value("format_version", nlohmann::json()).dump(), kPolicyFormatVersion));
  if (!m.contains("observation_space") || !m.contains("action_space") || !m.contains("config"))
    throw FormatError(fmt::format("{}: needs observation_space, action_space and config",
                                  (dir / "policy.json").string()));
  auto cfg = PolicyConfig::from_json(m["config"]);
  torch::Generator gen = at::detail::createCPUGenerator(0);
  auto policy = make_policy(cfg, env::Space::from_json(m["observation_space"]),
                            env::Space::from_json(m["action_space"]), gen);
  const std::string bytes = read_file(dir / "policy.pt");
  torch::serialize::InputArchive ar;
  try {
    ar.load_from(bytes.data(), bytes.size());
    policy->load(ar);
  } catch (const c10::Error& e) {
    throw FormatError(
        fmt::format("{}: {}", (dir / "policy.pt").string(), e.what_without_backtrace()));
  }
  if (manifest) *manifest = m;
  return policy;
}

}  // namespace attnpilot::policies
