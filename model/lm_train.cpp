#include "model/lm_train.h"

#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/hash.h"
#include "common/log.h"
#include "common/progress.h"
#include "model/checkpoint.h"

namespace attnpilot::model {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kStateFile = "training_state.json";
constexpr const char* kOptimizerFile = "optimizer.pt";
constexpr const char* kTokenizerFile = "tokenizer.model";

/// One stream of the documents: <s> d0 </s> <s> d1 </s> ...
std::vector<int64_t> make_stream(const std::vector<std::vector<int32_t>>& docs, int bos, int eos) {
  std::vector<int64_t> s;
  for (const auto& d : docs) {
    s.push_back(bos);
    s.insert(s.end(), d.begin(), d.end());
    s.push_back(eos);
  }
  return s;
}

/// Fixed validation windows [W, context+1], consecutive with stride `context`.
torch::Tensor validation_windows(const std::vector<int64_t>& stream, int64_t context,
                                 int64_t max_windows) {
  const int64_t n =
      std::min<int64_t>(max_windows, (static_cast<int64_t>(stream.size()) - 1) / context);
  ATTNPILOT_CHECK_ARG(n >= 1, "the validation split has {} tokens, fewer than context {} + 1",
                      stream.size(), context);
  auto t = torch::empty({n, context + 1}, torch::kInt64);
  auto* p = t.data_ptr<int64_t>();
  for (int64_t w = 0; w < n; ++w)
    std::copy_n(stream.begin() + w * context, context + 1, p + w * (context + 1));
  return t;
}

torch::Tensor lm_loss(Transformer& model, const torch::Tensor& batch) {
  using torch::indexing::Slice;
  auto x = batch.index({Slice(), Slice(0, -1)});
  auto y = batch.index({Slice(), Slice(1, torch::indexing::None)});
  auto logits = model->forward(x).logits;
  return torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                              y.reshape({-1}));
}

double validation_loss(Transformer& model, const torch::Tensor& windows, int64_t batch_size,
                       const torch::Device& device) {
  torch::NoGradGuard no_grad;
  const bool was_training = model->is_training();
  model->eval();
  double total = 0;
  const int64_t n = windows.size(0);
  for (int64_t i = 0; i < n; i += batch_size) {
    auto b = windows.narrow(0, i, std::min(batch_size, n - i)).to(device);
    total += lm_loss(model, b).item<double>() * b.size(0);
  }
  if (was_training) model->train();
  return total / n;
}

std::string serialize_optimizer(torch::optim::Optimizer& opt) {
  torch::serialize::OutputArchive ar;
  opt.save(ar);
  std::ostringstream os;
  ar.save_to(os);
  return os.str();
}

void load_optimizer(torch::optim::Optimizer& opt, const std::string& bytes,
                    const torch::Device& device, const fs::path& origin) {
  try {
    torch::serialize::InputArchive ar;
    std::istringstream is(bytes);
    ar.load_from(is, device);
    opt.load(ar);
  } catch (const c10::Error& e) {
    throw FormatError(fmt::format("{}: optimizer state does not load: {}", origin.string(),
                                  e.what_without_backtrace()));
  }
}

std::string rng_to_string(const std::mt19937_64& rng) {
  std::ostringstream os;
  os << rng;
  return os.str();
}

std::mt19937_64 rng_from_string(const std::string& s, const fs::path& origin) {
  std::mt19937_64 rng;
  std::istringstream is(s);
  is >> rng;
  if (is.fail())
    throw FormatError(
        fmt::format("{}: sampler_rng is not a std::mt19937_64 state", origin.string()));
  return rng;
}

template <typename T>
T json_get(const json& j, const char* key, const std::string& origin) {
  if (!j.contains(key)) throw FormatError(fmt::format("{}: field '{}' is missing", origin, key));
  try {
    return j.at(key).get<T>();
  } catch (const json::exception& e) {
    throw FormatError(fmt::format("{}: field '{}' has the wrong type: {}", origin, key, e.what()));
  }
}

/// The `model` section: Hugging Face config.json field names for the architecture;
/// vocab_size comes from the tokenizer. Every key is read (so typos are reported).
ModelConfig model_config_from_yaml(const Config& m) {
  ModelConfig c = ModelConfig::defaults(m.get<std::string>("model_type", "llama"));
  c.hidden_size = m.get<int64_t>("hidden_size", c.hidden_size);
  c.num_layers = m.get<int64_t>("num_layers", c.num_layers);
  c.num_heads = m.get<int64_t>("num_heads", c.num_heads);
  c.num_kv_heads = m.get<int64_t>("num_kv_heads", c.num_kv_heads);
  c.head_dim = m.get<int64_t>("head_dim", c.head_dim);
  c.intermediate_size = m.get<int64_t>("intermediate_size", c.intermediate_size);
  c.max_position_embeddings = m.get<int64_t>("max_position_embeddings", c.max_position_embeddings);
  c.rms_norm_eps = m.get<double>("rms_norm_eps", c.rms_norm_eps);
  c.rope_theta = m.get<double>("rope_theta", c.rope_theta);
  c.tie_word_embeddings = m.get<bool>("tie_word_embeddings", c.tie_word_embeddings);
  c.attention_bias = m.get<bool>("attention_bias", c.attention_bias);
  c.attention_out_bias = m.get<bool>("attention_out_bias", c.attention_out_bias);
  c.mlp_bias = m.get<bool>("mlp_bias", c.mlp_bias);
  return c;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Configuration

PretrainConfig PretrainConfig::from_config(const Config& cfg) {
  PretrainConfig c;
  c.model = model_config_from_yaml(cfg.section("model"));

  const Config t = cfg.section("tokenizer");
  c.tokenizer.vocab_size = t.get<int>("vocab_size", c.tokenizer.vocab_size);
  c.tokenizer.model_type = t.get<std::string>("type", c.tokenizer.model_type);
  c.tokenizer.character_coverage =
      t.get<double>("character_coverage", c.tokenizer.character_coverage);

  const Config d = cfg.section("data");
  if (d.has("corpus")) {
    c.corpus.clear();
    for (const auto& p : d.get<std::vector<std::string>>("corpus", {})) c.corpus.emplace_back(p);
  }
  c.validation_fraction = d.get<double>("validation_fraction", c.validation_fraction);

  const Config r = cfg.section("train");
  c.steps = r.get<int64_t>("steps", c.steps);
  c.batch_size = r.get<int64_t>("batch_size", c.batch_size);
  c.context = r.get<int64_t>("context", c.context);
  c.lr = r.get<double>("lr", c.lr);
  c.min_lr = r.get<double>("min_lr", c.min_lr);
  c.warmup_steps = r.get<int64_t>("warmup_steps", c.warmup_steps);
  c.weight_decay = r.get<double>("weight_decay", c.weight_decay);
  c.beta1 = r.get<double>("beta1", c.beta1);
  c.beta2 = r.get<double>("beta2", c.beta2);
  c.eps = r.get<double>("eps", c.eps);
  c.grad_clip = r.get<double>("grad_clip", c.grad_clip);
  c.eval_every = r.get<int64_t>("eval_every", c.eval_every);
  c.eval_windows = r.get<int64_t>("eval_windows", c.eval_windows);
  c.checkpoint_every = r.get<int64_t>("checkpoint_every", c.checkpoint_every);
  c.seed = r.get<uint64_t>("seed", c.seed);
  cfg.check_all_read();
  c.validate();
  return c;
}

void PretrainConfig::validate() const {
  model.validate();
  ATTNPILOT_CHECK_ARG(steps >= 1, "train.steps {} must be at least 1", steps);
  ATTNPILOT_CHECK_ARG(batch_size >= 1, "train.batch_size {} must be at least 1", batch_size);
  ATTNPILOT_CHECK_ARG(context >= 2, "train.context {} must be at least 2", context);
  ATTNPILOT_CHECK_ARG(context <= model.max_position_embeddings,
                      "train.context {} exceeds model.max_position_embeddings {}", context,
                      model.max_position_embeddings);
  ATTNPILOT_CHECK_ARG(lr > 0 && std::isfinite(lr), "train.lr {} must be positive", lr);
  ATTNPILOT_CHECK_ARG(min_lr >= 0 && min_lr <= lr, "train.min_lr {} must be in [0, lr = {}]",
                      min_lr, lr);
  ATTNPILOT_CHECK_ARG(warmup_steps >= 0 && warmup_steps < steps,
                      "train.warmup_steps {} must be in [0, steps = {})", warmup_steps, steps);
  ATTNPILOT_CHECK_ARG(weight_decay >= 0, "train.weight_decay {} must be non-negative",
                      weight_decay);
  ATTNPILOT_CHECK_ARG(beta1 >= 0 && beta1 < 1, "train.beta1 {} must be in [0, 1)", beta1);
  ATTNPILOT_CHECK_ARG(beta2 >= 0 && beta2 < 1, "train.beta2 {} must be in [0, 1)", beta2);
  ATTNPILOT_CHECK_ARG(eps > 0, "train.eps {} must be positive", eps);
  ATTNPILOT_CHECK_ARG(grad_clip >= 0, "train.grad_clip {} must be non-negative (0: off)",
                      grad_clip);
  ATTNPILOT_CHECK_ARG(eval_every >= 1, "train.eval_every {} must be at least 1", eval_every);
  ATTNPILOT_CHECK_ARG(eval_windows >= 1, "train.eval_windows {} must be at least 1", eval_windows);
  ATTNPILOT_CHECK_ARG(checkpoint_every >= 1, "train.checkpoint_every {} must be at least 1",
                      checkpoint_every);
  ATTNPILOT_CHECK_ARG(validation_fraction > 0 && validation_fraction < 1,
                      "data.validation_fraction {} must be in (0, 1)", validation_fraction);
  ATTNPILOT_CHECK_ARG(!corpus.empty(), "data.corpus is empty");
}

std::string PretrainConfig::canonical() const {
  json j;
  j["model"] = json::parse(model.to_json());
  j["tokenizer"] = {{"vocab_size", tokenizer.vocab_size},
                    {"type", tokenizer.model_type},
                    {"character_coverage", tokenizer.character_coverage}};
  std::vector<std::string> paths;
  for (const auto& p : corpus) paths.push_back(p.string());
  j["data"] = {{"corpus", paths}, {"validation_fraction", validation_fraction}};
  j["train"] = {{"steps", steps},
                {"batch_size", batch_size},
                {"context", context},
                {"lr", lr},
                {"min_lr", min_lr},
                {"warmup_steps", warmup_steps},
                {"weight_decay", weight_decay},
                {"beta1", beta1},
                {"beta2", beta2},
                {"eps", eps},
                {"grad_clip", grad_clip},
                {"eval_every", eval_every},
                {"eval_windows", eval_windows},
                {"checkpoint_every", checkpoint_every},
                {"seed", seed}};
  return j.dump();
}

double learning_rate_at(const PretrainConfig& cfg, int64_t step) {
  if (step < cfg.warmup_steps)
    return cfg.lr * static_cast<double>(step + 1) / static_cast<double>(cfg.warmup_steps);
  const double span = static_cast<double>(std::max<int64_t>(1, cfg.steps - cfg.warmup_steps));
  const double progress = std::min(1.0, static_cast<double>(step - cfg.warmup_steps) / span);
  return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + std::cos(M_PI * progress));
}

// ---------------------------------------------------------------------------------------
// Training state

std::string TrainingState::to_json() const {
  json j{{"format", "attnpilot-training-state-1"},
         {"step", step},
         {"steps", steps},
         {"finished", finished},
         {"run_fingerprint", run_fingerprint},
         {"model_fingerprint", model_fingerprint},
         {"sampler_rng", sampler_rng},
         {"corpus", corpus},
         {"validation_fraction", validation_fraction},
         {"context", context},
         {"val_loss", val_loss},
         {"first_val_loss", first_val_loss},
         {"seconds", seconds},
         {"tokens", tokens}};
  return j.dump(2);
}

TrainingState TrainingState::from_json(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw FormatError(fmt::format("{}: not JSON: {}", origin, e.what()));
  }
  if (!j.is_object()) throw FormatError(fmt::format("{}: not a JSON object", origin));
  TrainingState s;
  s.step = json_get<int64_t>(j, "step", origin);
  s.steps = json_get<int64_t>(j, "steps", origin);
  s.finished = json_get<bool>(j, "finished", origin);
  s.run_fingerprint = json_get<std::string>(j, "run_fingerprint", origin);
  s.model_fingerprint = json_get<std::string>(j, "model_fingerprint", origin);
  s.sampler_rng = json_get<std::string>(j, "sampler_rng", origin);
  s.corpus = json_get<std::vector<std::string>>(j, "corpus", origin);
  s.validation_fraction = json_get<double>(j, "validation_fraction", origin);
  s.context = json_get<int64_t>(j, "context", origin);
  s.val_loss = json_get<double>(j, "val_loss", origin);
  s.first_val_loss = json_get<double>(j, "first_val_loss", origin);
  s.seconds = json_get<double>(j, "seconds", origin);
  s.tokens = json_get<int64_t>(j, "tokens", origin);
  if (s.step < 0 || s.steps < 1 || s.step > s.steps || s.context < 1)
    throw FormatError(fmt::format("{}: step {} / steps {} / context {} are inconsistent", origin,
                                  s.step, s.steps, s.context));
  return s;
}

bool TrainingState::read(const fs::path& dir, TrainingState* out) {
  const fs::path p = dir / kStateFile;
  std::error_code ec;
  if (!fs::exists(p, ec)) return false;
  *out = from_json(read_file(p), p.string());
  return true;
}

// ---------------------------------------------------------------------------------------
// Pretraining

PretrainResult pretrain(const PretrainConfig& cfg_in, const PretrainRun& run) {
  PretrainConfig cfg = cfg_in;
  cfg.validate();
  ATTNPILOT_CHECK_ARG(!run.out.empty(), "pretrain needs an output folder");
  fs::create_directories(run.out);
  const fs::path model_dir = run.out / "model";

  // Corpus and tokenizer (the tokenizer is reused while corpus and options are unchanged).
  Corpus corpus = load_corpus(cfg.corpus, cfg.validation_fraction);
  log::info(fmt::format("corpus: {} files, {} training and {} validation documents",
                        corpus.files.size(), corpus.train.size(), corpus.validation.size()));
  const std::string tok_key = Fingerprint()
                                  .add(corpus.fingerprint)
                                  .add(static_cast<int64_t>(cfg.tokenizer.vocab_size))
                                  .add(cfg.tokenizer.model_type)
                                  .add(fmt::format("{}", cfg.tokenizer.character_coverage))
                                  .hex();
  const fs::path tok_path = run.out / kTokenizerFile;
  const fs::path tok_key_path = run.out / "tokenizer.key";
  std::error_code ec;
  std::optional<Tokenizer> tok;
  if (fs::exists(tok_path, ec) && fs::exists(tok_key_path, ec) &&
      read_file(tok_key_path) == tok_key) {
    tok = Tokenizer::load(tok_path);
    log::info(
        fmt::format("tokenizer: reusing {} (vocab {})", tok_path.string(), tok->vocab_size()));
  } else {
    log::info(fmt::format("tokenizer: training {} vocab {} on {} documents",
                          cfg.tokenizer.model_type, cfg.tokenizer.vocab_size, corpus.train.size()));
    tok = Tokenizer::train(corpus.train, cfg.tokenizer);
    tok->save(tok_path);
    write_file_atomic(tok_key_path, tok_key);
  }
  cfg.model.vocab_size = tok->vocab_size();
  TokenizedCorpus tc = tokenize_corpus(corpus, *tok, run.out / "cache");

  const std::string run_fp =
      Fingerprint().add(cfg.canonical()).add(corpus.fingerprint).add(tok->fingerprint()).hex();
  PretrainResult result;
  result.model_dir = model_dir;

  // An existing checkpoint: reuse, resume, or refuse.
  TrainingState state;
  bool resuming = false;
  if (fs::exists(model_dir, ec)) {
    TrainingState old;
    std::string problem;
    bool has_state = false;
    try {
      has_state = TrainingState::read(model_dir, &old);
      if (!has_state) problem = "it has no training_state.json";
    } catch (const Error& e) {
      problem = e.what();
    }
    bool same = has_state && problem.empty() && old.run_fingerprint == run_fp;
    if (has_state && problem.empty() && !same)
      problem = "it belongs to another run (different config, corpus or tokenizer)";
    if (same) {
      // The folder must still hold the model its state describes.
      try {
        if (model_fingerprint(model_dir) != old.model_fingerprint)
          problem = "its model fingerprint differs from training_state.json";
      } catch (const Error& e) {
        problem = fmt::format("it does not validate: {}", e.what());
      }
      same = problem.empty();
    }
    if (same && old.finished && run.resume) {
      log::info(
          fmt::format("{} already holds this run (fingerprint {}), finished at step {}; "
                      "reusing it",
                      model_dir.string(), run_fp, old.step));
      result.step = old.step;
      result.finished = true;
      result.reused = true;
      result.val_loss = old.val_loss;
      result.first_val_loss = old.first_val_loss;
      return result;
    }
    if (same && run.resume) {
      state = old;
      resuming = true;
    } else if (!run.force) {
      throw InvalidArgument(
          same ? fmt::format("{} already holds this run at step {} of {}; pass --resume to "
                             "continue it or --force to start over",
                             model_dir.string(), old.step, old.steps)
               : fmt::format("{} cannot be resumed: {}; pass --force to replace it",
                             model_dir.string(), problem));
    } else {
      log::warn(fmt::format("--force: replacing {}{}", model_dir.string(),
                            problem.empty() ? "" : " (" + problem + ")"));
      fs::remove_all(model_dir);
    }
  }

  // Model and optimizer.
  torch::manual_seed(cfg.seed);
  Transformer model = resuming ? load_model(model_dir, run.device) : Transformer(cfg.model);
  model->to(run.device);
  model->train();
  // Matrices decay, vectors (norms, biases) do not; a tied weight appears once.
  std::vector<torch::Tensor> decay, no_decay;
  std::set<const void*> seen;
  for (auto& p : model->parameters())
    if (seen.insert(p.unsafeGetTensorImpl()).second) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto opt_options = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(cfg.lr)
                                                            .betas({cfg.beta1, cfg.beta2})
                                                            .eps(cfg.eps)
                                                            .weight_decay(wd));
  };
  torch::optim::AdamW opt({torch::optim::OptimizerParamGroup(decay, opt_options(cfg.weight_decay)),
                           torch::optim::OptimizerParamGroup(no_decay, opt_options(0.0))},
                          torch::optim::AdamWOptions(cfg.lr));
  std::mt19937_64 rng(cfg.seed);
  if (resuming) {
    load_optimizer(opt, read_file(model_dir / kOptimizerFile), run.device, model_dir);
    rng = rng_from_string(state.sampler_rng, model_dir / kStateFile);
    log::info(
        fmt::format("resuming {} at step {} of {}", model_dir.string(), state.step, state.steps));
  } else {
    state = TrainingState{};
    state.steps = cfg.steps;
    state.run_fingerprint = run_fp;
    for (const auto& p : cfg.corpus) state.corpus.push_back(p.string());
    state.validation_fraction = cfg.validation_fraction;
    state.context = cfg.context;
  }
  int64_t params = 0;
  for (const auto& p : model->parameters()) params += p.numel();

  // Data.
  const std::vector<int64_t> train_stream = make_stream(tc.train, tok->bos_id(), tok->eos_id());
  const int64_t span = static_cast<int64_t>(train_stream.size()) - cfg.context - 1;
  ATTNPILOT_CHECK_ARG(span > 0, "the training split has {} tokens, fewer than context {} + 1",
                      train_stream.size(), cfg.context);
  const torch::Tensor val_windows = validation_windows(
      make_stream(tc.validation, tok->bos_id(), tok->eos_id()), cfg.context, cfg.eval_windows);
  log::info(fmt::format(
      "model: {} parameters; data: {} training tokens, {} validation windows of {}; device {}",
      params, train_stream.size(), val_windows.size(0), cfg.context, run.device.str()));

  auto save_checkpoint = [&]() {
    state.sampler_rng = rng_to_string(rng);
    state.model_fingerprint = model_fingerprint(*model);
    save_model(model_dir, model,
               {{kTokenizerFile, tok->bytes()},
                {kOptimizerFile, serialize_optimizer(opt)},
                {kStateFile, state.to_json()}});
  };

  const int64_t stop = run.stop_at_step >= 0 ? std::min(run.stop_at_step, cfg.steps) : cfg.steps;
  const int64_t start = state.step;
  const double base_seconds = state.seconds;
  result.first_val_loss = validation_loss(model, val_windows, cfg.batch_size, run.device);
  if (!resuming) state.first_val_loss = result.first_val_loss;
  result.val_loss = result.first_val_loss;
  log::info(fmt::format("step {}: validation loss {:.4f} (perplexity {:.1f})", start,
                        result.first_val_loss, std::exp(result.first_val_loss)));

  std::unique_ptr<Progress> progress;
  if (run.progress)
    progress = std::make_unique<Progress>("pretrain", stop - start, "steps", *run.progress);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  const int64_t tokens_per_step = cfg.batch_size * cfg.context;
  std::uniform_int_distribution<int64_t> offset(0, span);
  double loss_sum = 0;
  int64_t loss_n = 0;
  auto batch_cpu = torch::empty({cfg.batch_size, cfg.context + 1}, torch::kInt64);
  for (int64_t step = start; step < stop; ++step) {
    const double lr = learning_rate_at(cfg, step);
    for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
    auto* bp = batch_cpu.data_ptr<int64_t>();
    for (int64_t b = 0; b < cfg.batch_size; ++b)
      std::copy_n(train_stream.begin() + offset(rng), cfg.context + 1, bp + b * (cfg.context + 1));
    opt.zero_grad();
    auto loss = lm_loss(model, batch_cpu.to(run.device));
    loss.backward();
    if (cfg.grad_clip > 0) torch::nn::utils::clip_grad_norm_(model->parameters(), cfg.grad_clip);
    opt.step();
    const double l = loss.item<double>();
    if (!std::isfinite(l))
      throw Error(fmt::format("training loss became {} at step {} (lr {:.3g}); lower train.lr", l,
                              step, lr));
    loss_sum += l;
    ++loss_n;
    state.step = step + 1;
    result.tokens += tokens_per_step;
    state.tokens += tokens_per_step;
    const double secs = elapsed();
    const bool out_of_time = run.max_seconds > 0 && secs >= run.max_seconds;
    const bool last = state.step == stop || out_of_time;
    if (state.step % cfg.eval_every == 0 || last) {
      result.val_loss = validation_loss(model, val_windows, cfg.batch_size, run.device);
      result.train_loss = loss_sum / loss_n;
      json m{{"step", state.step},          {"train_loss", result.train_loss},
             {"val_loss", result.val_loss}, {"lr", lr},
             {"tokens", state.tokens},      {"seconds", base_seconds + secs}};
      append_line_durable(run.out / "metrics.jsonl", m.dump());
      log::info(
          fmt::format("step {}: train loss {:.4f}, validation loss {:.4f} (perplexity "
                      "{:.1f})",
                      state.step, result.train_loss, result.val_loss, std::exp(result.val_loss)));
      loss_sum = 0;
      loss_n = 0;
    }
    if (progress)
      progress->update(state.step - start,
                       fmt::format("loss {:.3f} val {:.3f} lr {:.2e} {:.0f} tok/s", l,
                                   result.val_loss, lr, result.tokens / std::max(secs, 1e-9)));
    if (state.step % cfg.checkpoint_every == 0 || last) {
      state.val_loss = result.val_loss;
      state.finished = state.step == cfg.steps;
      state.seconds = base_seconds + secs;
      save_checkpoint();
    }
    if (out_of_time) {
      log::info(
          fmt::format("--max-seconds {} reached at step {}; checkpoint saved, continue "
                      "with --resume",
                      run.max_seconds, state.step));
      break;
    }
  }
  result.seconds = elapsed();
  if (progress) progress->finish(fmt::format("val loss {:.3f}", result.val_loss));
  result.step = state.step;
  result.finished = state.step == cfg.steps;
  return result;
}

// ---------------------------------------------------------------------------------------
// Evaluation

std::vector<double> document_nll(Transformer& model, const std::vector<int32_t>& doc, int bos,
                                 int eos, int64_t context, const torch::Device& device) {
  ATTNPILOT_CHECK_ARG(context >= 1, "evaluation context {} must be at least 1", context);
  std::vector<int64_t> t;
  t.reserve(doc.size() + 2);
  t.push_back(bos);
  t.insert(t.end(), doc.begin(), doc.end());
  t.push_back(eos);
  const int64_t n = static_cast<int64_t>(t.size()) - 1;  // predictions
  std::vector<double> out;
  out.reserve(n);
  torch::NoGradGuard no_grad;
  for (int64_t s = 0; s < n; s += context) {
    const int64_t len = std::min(context, n - s);
    auto x = torch::from_blob(t.data() + s, {1, len}, torch::kInt64).clone().to(device);
    auto y = torch::from_blob(t.data() + s + 1, {len}, torch::kInt64).clone().to(device);
    auto logp = torch::log_softmax(model->forward(x).logits[0].to(torch::kFloat64), -1);
    auto nll = -logp.gather(1, y.unsqueeze(1)).squeeze(1).cpu();
    const double* p = nll.data_ptr<double>();
    out.insert(out.end(), p, p + len);
  }
  return out;
}

UnigramModel::UnigramModel(const std::vector<std::vector<int32_t>>& train_docs, int vocab_size,
                           int eos)
    : nll_(vocab_size), eos_(eos) {
  ATTNPILOT_CHECK_ARG(vocab_size >= 1 && eos >= 0 && eos < vocab_size,
                      "unigram model: eos {} outside vocabulary of {}", eos, vocab_size);
  std::vector<double> count(vocab_size, 1.0);  // add-one smoothing
  double total = vocab_size;
  for (const auto& d : train_docs) {
    for (int32_t id : d) {
      ATTNPILOT_CHECK_ARG(id >= 0 && id < vocab_size, "token id {} outside [0, {})", id,
                          vocab_size);
      count[id] += 1;
    }
    count[eos] += 1;
    total += static_cast<double>(d.size()) + 1;
  }
  for (int i = 0; i < vocab_size; ++i) nll_[i] = -std::log(count[i] / total);
}

double UnigramModel::nll(int id) const {
  ATTNPILOT_CHECK_ARG(id >= 0 && id < static_cast<int>(nll_.size()), "token id {} outside [0, {})",
                      id, nll_.size());
  return nll_[id];
}

std::vector<double> UnigramModel::document_nll(const std::vector<int32_t>& doc) const {
  std::vector<double> out;
  out.reserve(doc.size() + 1);
  for (int32_t id : doc) out.push_back(nll(id));
  out.push_back(nll(eos_));
  return out;
}

}  // namespace attnpilot::model

namespace attnpilot::model {
namespace {

PerplexityRow make_row(std::string name, const std::vector<std::vector<double>>& per_doc) {
  PerplexityRow r;
  r.name = std::move(name);
  r.documents = static_cast<int64_t>(per_doc.size());
  double total = 0;
  std::vector<double> means;
  for (const auto& d : per_doc) {
    double s = 0;
    for (double x : d) s += x;
    total += s;
    r.tokens += static_cast<int64_t>(d.size());
    means.push_back(s / static_cast<double>(d.size()));
  }
  r.token_ppl = std::exp(total / static_cast<double>(r.tokens));
  r.doc_nll = mean_ci(means, 0.95);
  return r;
}

std::vector<double> doc_means(const std::vector<std::vector<double>>& per_doc) {
  std::vector<double> m;
  for (const auto& d : per_doc) {
    double s = 0;
    for (double x : d) s += x;
    m.push_back(s / static_cast<double>(d.size()));
  }
  return m;
}

}  // namespace

LmEvaluation evaluate_lm(const fs::path& model_dir, const std::vector<fs::path>& texts,
                         const torch::Device& device, std::ostream* progress) {
  const fs::path tok_path = model_dir / kTokenizerFile;
  std::error_code ec;
  ATTNPILOT_CHECK_ARG(fs::exists(tok_path, ec),
                      "{} has no {}: eval-lm needs the tokenizer inside the checkpoint folder",
                      model_dir.string(), kTokenizerFile);
  const Tokenizer tok = Tokenizer::load(tok_path);
  Transformer model = load_model(model_dir, device);
  model->eval();

  TrainingState st;
  std::vector<fs::path> run_corpus = {kFortunesDir};
  double fraction = 0.05;
  int64_t context = model->config().max_position_embeddings;
  if (TrainingState::read(model_dir, &st)) {
    run_corpus.assign(st.corpus.begin(), st.corpus.end());
    fraction = st.validation_fraction;
    context = st.context;
  }
  ATTNPILOT_CHECK_ARG(tok.vocab_size() <= model->config().vocab_size,
                      "{}: tokenizer has {} pieces but the model's vocab_size is {}",
                      model_dir.string(), tok.vocab_size(), model->config().vocab_size);

  const Corpus corpus = load_corpus(run_corpus, fraction);
  LmEvaluation e;
  std::vector<std::string> docs;
  if (texts.empty()) {
    docs = corpus.validation;
    e.data = fmt::format("held-out split ({:.0f}%) of {} file(s) of the training corpus",
                         fraction * 100, corpus.files.size());
  } else {
    for (const auto& f : resolve_corpus_files(texts)) {
      auto d = split_documents(read_file(f));
      docs.insert(docs.end(), d.begin(), d.end());
    }
    e.data = fmt::format("{} text file(s)", texts.size());
  }
  ATTNPILOT_CHECK_ARG(docs.size() >= 2, "eval-lm needs at least 2 documents, found {}",
                      docs.size());
  TokenizedCorpus train_tokens;
  for (const auto& d : corpus.train) {
    auto ids = tok.encode(d);
    train_tokens.train.emplace_back(ids.begin(), ids.end());
  }
  const UnigramModel unigram(train_tokens.train, model->config().vocab_size, tok.eos_id());

  std::vector<std::vector<double>> lm_nll, uni_nll;
  std::unique_ptr<Progress> bar;
  if (progress) bar = std::make_unique<Progress>("eval-lm", docs.size(), "docs", *progress);
  for (size_t i = 0; i < docs.size(); ++i) {
    auto ids = tok.encode(docs[i]);
    std::vector<int32_t> d(ids.begin(), ids.end());
    lm_nll.push_back(document_nll(model, d, tok.bos_id(), tok.eos_id(), context, device));
    uni_nll.push_back(unigram.document_nll(d));
    if (bar) bar->update(static_cast<int64_t>(i + 1));
  }
  if (bar) bar->finish();
  e.model = make_row("transformer", lm_nll);
  e.unigram = make_row("unigram (add-one)", uni_nll);
  e.difference = paired_t_test(doc_means(lm_nll), doc_means(uni_nll), 0.95);
  return e;
}

std::string format_evaluation(const LmEvaluation& e) {
  std::string s =
      fmt::format("{}: {} documents, {} tokens\n", e.data, e.model.documents, e.model.tokens);
  s += fmt::format("{:<20} {:>12} {:>14} {:>22}\n", "model", "perplexity", "doc perplexity",
                   "95% CI over documents");
  for (const auto* r : {&e.model, &e.unigram})
    s += fmt::format(
        "{:<20} {:>12.2f} {:>14.2f} {:>22}\n", r->name, r->token_ppl, std::exp(r->doc_nll.mean),
        fmt::format("[{:.2f}, {:.2f}]", std::exp(r->doc_nll.low), std::exp(r->doc_nll.high)));
  s += fmt::format(
      "per-document mean NLL, transformer minus unigram: {:.3f} nats [{:.3f}, {:.3f}], "
      "paired t = {:.1f}, p = {:.2g}\n",
      e.difference.diff.mean, e.difference.diff.low, e.difference.diff.high, e.difference.t,
      e.difference.p);
  s += "perplexity = exp(total NLL / tokens); doc perplexity = exp(mean over documents of "
       "each document's mean NLL)\n";
  return s;
}

}  // namespace attnpilot::model
