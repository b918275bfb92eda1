// `attnpilot spectrum`: where the rank of the query–key scores lives in a model. Runs the
// model once over a text with capture on, and for every (layer, head) computes the singular
// values of S = Q Kᵀ (the full, unmasked score matrix of the sequence, through the d×d core of
// perturbation/projections.h), then reports the retained energy Σ_{i≤r}σ²/Σσ² at each
// candidate rank and the rank needed for 90/95/99% energy.
//
//   text ─► tokenizer ─► model.forward(capture) ─► per layer q,k [1,H,N,d] ─► σ(QKᵀ) [H,d]
//        ─► table (stdout), OUT/spectrum.csv, OUT/rank_needed.png (gnuplot heatmaps)
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/log.h"
#include "common/plot.h"
#include "experiments/cli.h"
#include "model/checkpoint.h"
#include "model/tokenizer.h"
#include "perturbation/projections.h"

namespace attnpilot::cli {
namespace {

struct SpectrumArgs {
  std::string model, text, out = "spectrum_out", device = "cpu", ranks = "1,2,4,8,16,32,64";
  int64_t max_tokens = 512;
};

void run_spectrum(const SpectrumArgs& a) {
  const auto device = parse_device(a.device);
  auto ranks = parse_positive_list("--ranks", a.ranks);
  if (a.max_tokens < 2) throw UsageError(fmt::format("--max-tokens {} < 2", a.max_tokens));
  std::ifstream in(a.text, std::ios::binary);
  if (!in) throw UsageError(fmt::format("--text {}: cannot read the file", a.text));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::filesystem::path dir(a.model);
  auto tok = model::Tokenizer::load(dir / "tokenizer.model");
  auto ids = tok.encode(text);
  if (ids.size() < 2)
    throw InvalidArgument(
        fmt::format("--text {} encodes to {} tokens, expected >= 2", a.text, ids.size()));
  auto net = model::load_model(dir, device);
  net->eval();
  const auto& cfg = net->config();
  // Truncate to --max-tokens and to the model's position table.
  const int64_t limit = std::min(a.max_tokens, cfg.max_position_embeddings);
  if (static_cast<int64_t>(ids.size()) > limit) ids.resize(limit);
  const int64_t d = cfg.head_dim, h = cfg.num_heads, hkv = cfg.num_kv_heads, n = ids.size();
  ranks.erase(std::remove_if(ranks.begin(), ranks.end(), [&](int64_t r) { return r > d; }),
              ranks.end());
  if (ranks.empty()) throw UsageError(fmt::format("every --ranks value exceeds head_dim {}", d));
  std::vector<int64_t> ids64(ids.begin(), ids.end());
  auto tokens = torch::tensor(ids64, torch::kLong).view({1, n}).to(device);
  torch::NoGradGuard no_grad;
  model::ForwardOptions fo;
  fo.capture = true;
  auto out = net->forward(tokens, fo);
  log::info(fmt::format("spectrum: {} tokens, {} layers x {} heads, head_dim {}", n,
                        out.layers.size(), h, d));

  const std::vector<double> levels = {0.90, 0.95, 0.99};
  std::string csv = "layer,head";
  for (int64_t r : ranks) csv += fmt::format(",energy_r{}", r);
  csv += ",rank90,rank95,rank99\n";
  std::cout << fmt::format("retained energy of Q K^T per layer/head ({} tokens)\n", n);
  std::cout << "layer head";
  for (int64_t r : ranks) std::cout << fmt::format(" {:>7}", fmt::format("r={}", r));
  std::cout << "   r90   r95   r99\n";
  // needed[level] as "layer head rank" rows for the heatmap.
  std::vector<std::string> heat(levels.size());
  for (size_t l = 0; l < out.layers.size(); ++l) {
    auto q = out.layers[l].q;  // [1,H,N,d]
    auto k = out.layers[l].k;  // [1,Hkv,N,d]
    if (hkv != h) k = k.repeat_interleave(h / hkv, 1);
    auto sigma = perturbation::optimal_score_projections(q, k, 1).sigma[0].cpu();  // [H,d]
    auto e = sigma.square();
    auto cum = e.cumsum(-1) / e.sum(-1, true).clamp_min(1e-300);
    for (int64_t hh = 0; hh < h; ++hh) {
      auto c = cum[hh];
      std::cout << fmt::format("{:>5} {:>4}", l, hh);
      csv += fmt::format("{},{}", l, hh);
      for (int64_t r : ranks) {
        const double v = c[r - 1].item<double>();
        std::cout << fmt::format(" {:>7.4f}", v);
        csv += fmt::format(",{:.6f}", v);
      }
      for (size_t li = 0; li < levels.size(); ++li) {
        // Smallest r with cumulative energy >= level (1-based); d when never reached.
        const int64_t need =
            std::min<int64_t>(d, (c < levels[li] - 1e-12).sum().item<int64_t>() + 1);
        std::cout << fmt::format(" {:>5}", need);
        csv += fmt::format(",{}", need);
        heat[li] += fmt::format("{} {} {}\n", l, hh, need);
      }
      std::cout << "\n";
      csv += "\n";
    }
    for (auto& s : heat) s += "\n";
  }
  const std::filesystem::path od(a.out);
  std::filesystem::create_directories(od);
  write_file_atomic(od / "spectrum.csv", csv);
  for (size_t li = 0; li < levels.size(); ++li)
    write_file_atomic(od / fmt::format("rank{}.dat", static_cast<int>(levels[li] * 100)), heat[li]);
  std::cout << "wrote " << (od / "spectrum.csv").string() << "\n";
  if (!gnuplot_available()) {
    log::warn("gnuplot not found: skipping rank_needed.png");
    return;
  }
  std::string script = fmt::format(
      "set terminal pngcairo size 1500,450\nset output '{}'\n"
      "set multiplot layout 1,3 title 'rank of Q K^T needed for 90/95/99% energy ({} tokens)'\n"
      "set xlabel 'layer'\nset ylabel 'head'\nset cblabel 'rank'\nset cbrange [1:{}]\n"
      "set view map\nset xtics 1\nset ytics 1\n",
      (od / "rank_needed.png").string(), n, d);
  for (size_t li = 0; li < levels.size(); ++li) {
    const int pct = static_cast<int>(levels[li] * 100);
    script += fmt::format("set title '{}% energy'\nplot '{}' using 1:2:3 with image notitle\n", pct,
                          (od / fmt::format("rank{}.dat", pct)).string());
  }
  script += "unset multiplot\n";
  run_gnuplot(od / "rank_needed.gp", script);
  std::cout << "wrote " << (od / "rank_needed.png").string() << "\n";
}

void add_spectrum_verb(CLI::App& root) {
  auto args = std::make_shared<SpectrumArgs>();
  auto* cmd =
      root.add_subcommand("spectrum",
                          "Per layer/head energy of the query-key scores at candidate ranks, and a "
                          "heatmap of the rank needed for 90/95/99% energy");
  cmd->add_option("--model", args->model,
                  "checkpoint folder (config.json, model.safetensors, "
                  "tokenizer.model)")
      ->required();
  cmd->add_option("--text", args->text, "UTF-8 text file to run the model on")->required();
  cmd->add_option("--ranks", args->ranks, "comma-separated candidate ranks")->capture_default_str();
  cmd->add_option("--out", args->out, "output folder (spectrum.csv, rank_needed.png)")
      ->capture_default_str();
  cmd->add_option("--device", args->device, "cpu or cuda[:i]")->capture_default_str();
  cmd->add_option("--max-tokens", args->max_tokens,
                  "truncate the text to this many tokens (and to the model's max positions)")
      ->capture_default_str();
  cmd->callback([args] { run_spectrum(*args); });
}

}  // namespace

ATTNPILOT_REGISTER_VERB(spectrum, 20, add_spectrum_verb);

}  // namespace attnpilot::cli
