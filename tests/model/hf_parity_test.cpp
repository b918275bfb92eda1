// Parity with Hugging Face transformers: tests/model/make_hf_fixtures.py (run through
// $ATTNPILOT_PYTHON) builds tiny random GPT-2, Llama (GQA; tied and untied) and Qwen2
// checkpoints with save_pretrained and records transformers' logits; our loader must
// reproduce them within 1e-4 (float32). Then our save_model output is loaded back by
// transformers, which must give our logits. One test, so that ctest (one process per
// test) runs the fixture script once.
#include <gtest/gtest.h>

#include <cstdlib>

#include "common/atomic_file.h"
#include "model/checkpoint.h"
#include "model_test_util.h"

namespace attnpilot::model {
namespace {

using testing::TempDir;

const char* kFixtures[] = {"gpt2", "llama_gqa", "llama_tied", "qwen2"};

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

/// $ATTNPILOT_PYTHON, else the project's venv as scripts/install-deps.sh makes it.
std::string find_python() {
  const char* py = std::getenv("ATTNPILOT_PYTHON");
  if (py && *py) return std::filesystem::exists(py) ? py : "";
  const char* venv = std::getenv("ATTNPILOT_VENV");
  const char* home = std::getenv("HOME");
  std::filesystem::path p = venv && *venv ? std::filesystem::path(venv)
                            : home ? std::filesystem::path(home) / ".local/share/attnpilot/venv"
                                   : std::filesystem::path();
  p /= "bin/python";
  return std::filesystem::exists(p) ? p.string() : "";
}

class HfParityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string py = find_python();
    const char* src = std::getenv("ATTNPILOT_SOURCE_DIR");
    if (py.empty()) {
      skip_ =
          "no python: ATTNPILOT_PYTHON is unset and the project's venv "
          "(~/.local/share/attnpilot/venv or $ATTNPILOT_VENV) does not exist";
      return;
    }
    python_ = py;
    script_ = std::filesystem::path(src && *src ? src : ".") / "tests/model/make_hf_fixtures.py";
    dir_ = std::make_unique<TempDir>();
    const int rc = run({dir_->path().string()});
    if (rc == 3)
      skip_ = "the python environment lacks torch/transformers/safetensors: " + log();
    else if (rc != 0)
      failure_ = "make_hf_fixtures.py failed (status " + std::to_string(rc) + "): " + log();
  }
  static void TearDownTestSuite() { dir_.reset(); }

  /// Runs the fixture script with `args`; returns its exit status (output in a log).
  static int run(const std::vector<std::string>& args) {
    std::string cmd = shell_quote(python_) + " " + shell_quote(script_.string());
    for (const auto& a : args) cmd += " " + shell_quote(a);
    cmd += " > " + shell_quote((dir_->path() / "python.log").string()) + " 2>&1";
    const int status = std::system(cmd.c_str());
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }
  static std::string log() {
    const auto p = dir_->path() / "python.log";
    if (!std::filesystem::exists(p)) return "";
    const auto s = read_file(p);
    return s.size() > 2000 ? s.substr(s.size() - 2000) : s;
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    ASSERT_TRUE(failure_.empty()) << failure_;
  }

  static inline std::string skip_, failure_, python_;
  static inline std::filesystem::path script_;
  static inline std::unique_ptr<TempDir> dir_;
};

TEST_F(HfParityTest, LogitsMatchTransformersBothWays) {
  for (const char* name : kFixtures) {
    const auto dir = dir_->path() / name;
    const auto ref = read_safetensors(dir / "reference.safetensors");
    const auto tokens = ref.tensors.at("tokens").to(torch::kInt64);
    const auto& want = ref.tensors.at("logits");
    Transformer m = load_model(dir, torch::kCPU);
    torch::NoGradGuard g;
    const auto got = m->forward(tokens).logits;
    ASSERT_EQ(got.sizes(), want.sizes()) << name;
    const double err = (got - want).abs().max().item<double>();
    EXPECT_LT(err, 1e-4) << name << ": max |ours - transformers| = " << err;
    EXPECT_GT(want.abs().max().item<double>(), 1.0) << name << ": logits should not vanish";
    if (std::string(name) == "llama_gqa") {
      EXPECT_LT(m->config().num_kv_heads, m->config().num_heads);
      EXPECT_FALSE(m->config().tie_word_embeddings);
    }
    if (std::string(name) == "llama_tied") {
      EXPECT_TRUE(m->config().tie_word_embeddings);
    }
    std::cout << name << ": max |ours - transformers| = " << err << "\n";
  }

  // And transformers loads what we save (one python run for all fixtures).
  std::vector<std::string> args{"--check"};
  std::map<std::string, torch::Tensor> ours;
  for (const char* name : kFixtures) {
    Transformer m = load_model(dir_->path() / name, torch::kCPU);
    const auto out = dir_->path() / (std::string("ours_") + name);
    save_model(out, m);
    const auto tokens =
        read_safetensors(dir_->path() / name / "reference.safetensors").tensors.at("tokens");
    write_safetensors(out / "tokens.safetensors", {{"tokens", tokens}});
    torch::NoGradGuard g;
    ours[name] = m->forward(tokens.to(torch::kInt64)).logits;
    args.push_back(out.string());
  }
  ASSERT_EQ(run(args), 0) << log();
  for (const char* name : kFixtures) {
    const auto hf =
        read_safetensors(dir_->path() / (std::string("ours_") + name) / "hf_logits.safetensors")
            .tensors.at("logits");
    const double err = (hf - ours[name]).abs().max().item<double>();
    EXPECT_LT(err, 1e-4) << name << ": transformers on our saved folder";
  }
}

}  // namespace
}  // namespace attnpilot::model
