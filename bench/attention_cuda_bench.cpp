// attention_cuda_bench: our CUDA block-sparse flash-attention kernel against LibTorch's dense
// at::scaled_dot_product_attention (cuDNN on the H200) and FlexAttention (torch.compile'd, run by
// bench/flex_attention_ref.py through python3 on the same block lists), side by side in one run.
//   B = 1, 32 heads, d = 128, bf16, causal, block 128; L in {8k, 32k, 128k (when memory allows)};
//   block lists of density 100%, 10%, 5% of the causally visible blocks (each query block keeps
//   its diagonal block and the first block, the rest drawn at random).
// Columns: median times over repeats (CUDA events, after warm-up) of SDPA dense, our kernel with
// device-resident lists, and the whole CudaBackend::block_sparse call (lists copied from the
// host, pair count); the speed-up over SDPA dense; our kernel's rate in TFLOP/s over the listed
// (query, key) pairs (4·d FLOPs each) and its floor at 990 TFLOP/s (the datasheet's dense bf16
// rate, a lead); at density 100% the relative error against SDPA.
// 2. The low-rank block estimator (cuda/cuda_estimator.h; key projection, rank-r scores of 8
//    sampled rows per query block, selection, CSR lists on the device) at L = 32k, r = 16 and 32,
//    density 10% and 5%, 3xTF32 and one-pass TF32 scores, and with pooled queries (one mean
//    query per block; mode pq-mma: scored against the stored keys on the tensor cores, the
//    default; pq-wg / pq-wg3: the same as warpgroup MMAs on an H100/H200; wg-1p: pq-wg with w
//    in one 16-bit part; pool-q: against the projected keys, fp32 CUDA cores), against the
//    attention it plans
//    and against the CPU twin's LibTorch code (estimators.cpp) run on the same GPU tensors. First
//    the key projection alone (r = 8..64) by the projection kernel's two variants, 1 and 4 output
//    rows per thread (CudaEstimatorOptions::projection_rows), side by side with their ratio and
//    byte floor.
// 3. Decoding, batch 16, 32 heads, 32k cache, d = 128: SDPA over the full cache, our split-K
//    decode kernel over full keys and over rank-32 and rank-16 key caches, with byte floors.
// On a machine without a CUDA device it says so and exits 0.
// 4. (--only estimator-profile, not part of a full run) one default estimator call between
//    cudaProfilerStart/Stop, for ncu --profile-from-start off (scripts/gpu-focus.sh NCU_ESTIMATOR).
// Usage: attention_cuda_bench [--quick] [--no-flex] [--min-len N] [--max-len N]
//                             [--densities F,F,...]
//                             [--only sparse|estimator|decode|estimator-profile]
// (python: $ATTNPILOT_BENCH_PYTHON or python3)
#include <fmt/format.h>
#include <torch/torch.h>

#include <cstring>
#include <string>

#ifdef ATTNPILOT_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iterator>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention/backend.h"
#include "attention/block_mask.h"
#include "attention/cuda/block_sparse_kernels.h"
#include "attention/cuda/cuda_decode.h"
#include "attention/cuda/cuda_estimator.h"
#include "attention/estimators.h"
#include "attention/plan.h"

using namespace attnpilot::attention;

namespace {

void cuda_check(cudaError_t e, const char* call) {
  if (e != cudaSuccess)
    throw std::runtime_error(fmt::format("{} failed: {}", call, cudaGetErrorString(e)));
}

/// A pair of CUDA events (RAII).
class EventPair {
 public:
  EventPair() {
    cuda_check(cudaEventCreate(&start_), "cudaEventCreate");
    cuda_check(cudaEventCreate(&stop_), "cudaEventCreate");
  }
  ~EventPair() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  EventPair(const EventPair&) = delete;
  EventPair& operator=(const EventPair&) = delete;
  /// Median milliseconds of fn over `repeats` runs after `warmup` runs, on the current stream.
  double median_ms(const std::function<void()>& fn, int warmup, int repeats) {
    const auto stream = at::cuda::getCurrentCUDAStream().stream();
    for (int i = 0; i < warmup; ++i) fn();
    std::vector<double> ms;
    for (int i = 0; i < repeats; ++i) {
      cuda_check(cudaEventRecord(start_, stream), "cudaEventRecord");
      fn();
      cuda_check(cudaEventRecord(stop_, stream), "cudaEventRecord");
      cuda_check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
      float t = 0;
      cuda_check(cudaEventElapsedTime(&t, start_, stop_), "cudaEventElapsedTime");
      ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }
  /// Median milliseconds of fn's GPU work alone: fn captured once into a CUDA graph (on a side
  /// stream, after one plain run there), then the graph's replays timed as median_ms does. Where
  /// fn launches many small kernels, the difference to median_ms is the host's time between
  /// them (argument checks, allocations, launches), which a caller ahead of the GPU hides. NaN,
  /// with the reason printed, where fn cannot be captured.
  double graph_median_ms(const std::function<void()>& fn, int warmup, int repeats) {
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    at::cuda::CUDAGraph graph;
    try {
      const at::cuda::CUDAStreamGuard guard(at::cuda::getStreamFromPool());
      fn();
      graph.capture_begin();
      fn();
      graph.capture_end();
    } catch (const std::exception& e) {
      fmt::print("    (graph capture failed: {})\n", e.what());
      (void)cudaGetLastError();
      return std::nan("");
    }
    cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    return median_ms([&] { graph.replay(); }, warmup, repeats);
  }
  /// Median milliseconds of each of fns, timed in rounds (one run of each per round, after
  /// `warmup` runs of each), each round in a new random order (fixed seed): a clock or
  /// temperature drift over the measurement touches every column alike, where timing one
  /// function after another put it all on the later ones, and no column always follows the
  /// same one (H100, 2026-12-06: the same kernel 11% apart in two columns timed one after the
  /// other, and 7-9% apart in a fixed round order, after different kernels).
  std::vector<double> interleaved_median_ms(const std::vector<std::function<void()>>& fns,
                                            int warmup, int repeats) {
    const auto stream = at::cuda::getCurrentCUDAStream().stream();
    for (const auto& fn : fns)
      for (int i = 0; i < warmup; ++i) fn();
    std::vector<std::vector<double>> ms(fns.size());
    std::vector<size_t> order(fns.size());
    std::iota(order.begin(), order.end(), size_t(0));
    std::mt19937 rng(20261206);
    for (int i = 0; i < repeats; ++i) {
      std::shuffle(order.begin(), order.end(), rng);
      for (size_t f : order) {
        cuda_check(cudaEventRecord(start_, stream), "cudaEventRecord");
        fns[f]();
        cuda_check(cudaEventRecord(stop_, stream), "cudaEventRecord");
        cuda_check(cudaEventSynchronize(stop_), "cudaEventSynchronize");
        float t = 0;
        cuda_check(cudaEventElapsedTime(&t, start_, stop_), "cudaEventElapsedTime");
        ms[f].push_back(t);
      }
    }
    std::vector<double> med;
    for (auto& m : ms) {
      std::sort(m.begin(), m.end());
      med.push_back(m[m.size() / 2]);
    }
    return med;
  }

 private:
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

/// Causal block lists keeping `density` of each row's visible blocks (at least the first and
/// the diagonal block).
BlockMask causal_mask(int64_t heads, int64_t len, int64_t bs, double density, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const int64_t qbn = (len + bs - 1) / bs;
  std::vector<std::vector<int64_t>> rows;
  rows.reserve(heads * qbn);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t qb = 0; qb < qbn; ++qb) {
      const int64_t visible = qb + 1;
      const int64_t keep = std::min(visible, std::max<int64_t>(std::min<int64_t>(2, visible),
                                                               std::llround(density * visible)));
      std::vector<int64_t> middle;
      for (int64_t kb = 1; kb < qb; ++kb) middle.push_back(kb);
      std::shuffle(middle.begin(), middle.end(), rng);
      std::vector<int64_t> row{0};
      if (qb > 0) row.push_back(qb);
      for (int64_t i = 0; static_cast<int64_t>(row.size()) < keep; ++i) row.push_back(middle[i]);
      std::sort(row.begin(), row.end());
      rows.push_back(std::move(row));
    }
  return BlockMask::from_rows(1, heads, qbn, qbn, bs, rows);
}

/// FlexAttention (torch.compile'd, bench/flex_attention_ref.py) on the same block lists, timed
/// by the GPU machine's python3 (or $ATTNPILOT_BENCH_PYTHON) in this run. Returns the median ms
/// and, at density 1, its error against SDPA; NaN with the reason printed when it cannot run.
double flex_ms(const BlockMask& mask, int64_t len, int64_t heads, int64_t d, int64_t bs, int reps,
               std::string* err) {
  char path[] = "/tmp/attnpilot-flex-XXXXXX";
  const int fd = mkstemp(path);
  if (fd < 0) throw std::runtime_error("mkstemp failed for the FlexAttention block lists");
  close(fd);
  {
    std::ofstream f(path, std::ios::binary);
    const int64_t header[4] = {mask.heads, mask.q_blocks, mask.k_blocks, mask.nnz()};
    f.write(reinterpret_cast<const char*>(header), sizeof(header));
    const auto rp = mask.row_ptr.contiguous(), ci = mask.col_idx.contiguous();
    f.write(reinterpret_cast<const char*>(rp.data_ptr<int64_t>()), rp.numel() * 8);
    f.write(reinterpret_cast<const char*>(ci.data_ptr<int64_t>()), ci.numel() * 8);
    if (!f) throw std::runtime_error(fmt::format("cannot write {}", path));
  }
  const char* py = std::getenv("ATTNPILOT_BENCH_PYTHON");
  const std::string cmd = fmt::format(
      "{} {}/bench/flex_attention_ref.py --csr {} --len {} --heads {} --dim {} "
      "--block {} --reps {} 2>&1",
      py != nullptr ? py : "python3", ATTNPILOT_SOURCE_DIR, path, len, heads, d, bs, reps);
  std::string text;
  if (FILE* pipe = popen(cmd.c_str(), "r")) {
    char buf[512];
    while (fgets(buf, sizeof(buf), pipe) != nullptr) text += buf;
    pclose(pipe);
  }
  std::remove(path);
  const auto at = text.rfind("flex_ms=");
  if (at == std::string::npos) {
    fmt::print("   (FlexAttention did not run: {})\n",
               text.size() > 400 ? text.substr(text.size() - 400) : text);
    return std::nan("");
  }
  const auto e = text.find("rel_err_vs_sdpa=", at);
  *err = e == std::string::npos ? "-"
                                : text.substr(e + 16, text.find_first_of(" \n", e + 16) - e - 16);
  return std::atof(text.c_str() + at + 8);
}

void run(bool quick, bool with_flex, int64_t min_len, int64_t max_len,
         const std::vector<double>& densities) {
  const int64_t heads = 32, d = 128, bs = 128;
  const auto dev = torch::Device(torch::kCUDA, 0);
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(dev);
  size_t free_b = 0, total_b = 0;
  cuda_check(cudaMemGetInfo(&free_b, &total_b), "cudaMemGetInfo");
  std::vector<int64_t> lens =
      quick ? std::vector<int64_t>{8192} : std::vector<int64_t>{8192, 32768};
  // 128k: q, k, v, two outputs (1 GiB each in bf16) plus SDPA's workspace.
  if (!quick && free_b > (12ull << 30)) lens.push_back(131072);
  lens.erase(std::remove_if(lens.begin(), lens.end(),
                            [&](int64_t l) { return l < min_len || l > max_len; }),
             lens.end());
  fmt::print("== block-sparse attention on {}: B=1, H={}, d={}, bf16, causal, block {} ==\n",
             at::cuda::getCurrentDeviceProperties()->name, heads, d, bs);
  fmt::print(
      "{:>7} {:>8} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} "
      "{:>9} {:>9} {:>8} {:>9} {:>9} {:>31} {:>9}\n",
      "L", "density", "blocks", "sdpa ms", "flex ms", "mma.sync", "wgmma", "wgmma-ws", "ws-overlap",
      "ws-async", "ws-persist", "ours ms", "call ms", "x sdpa", "x flex", "TFLOP/s", "floor ms",
      "rel err", "wgmma/ws/ovl/async/persist err", "flex err");
  EventPair ev;
  for (int64_t len : lens) {
    torch::manual_seed(1000 + len);
    const auto q = torch::randn({1, heads, len, d}, opts);
    const auto k = torch::randn({1, heads, len, d}, opts);
    const auto v = torch::randn({1, heads, len, d}, opts);
    torch::Tensor dense;
    const double t_sdpa =
        ev.median_ms([&] { dense = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true); }, 2,
                     len >= 131072 ? 3 : 10);
    const double scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (double density : densities) {
      // A 128k dense pass takes ~0.25 s per kernel: 3 repeats there, 10 elsewhere.
      const int reps = len >= 131072 && density > 0.5 ? 3 : 10;
      const auto mask = causal_mask(heads, len, bs, density, 7 + len);
      const auto row_ptr = mask.row_ptr.to(dev), col_idx = mask.col_idx.to(dev);
      auto out = torch::empty_like(q);
      cuda::BlockSparseLaunch p;
      p.q = q.data_ptr();
      p.k = k.data_ptr();
      p.v = v.data_ptr();
      p.out = out.data_ptr();
      for (int i = 0; i < 3; ++i) p.q_stride[i] = p.k_stride[i] = p.v_stride[i] = q.stride(i);
      p.batch = 1;
      p.heads = p.kv_heads = static_cast<int>(heads);
      p.n = p.m = len;
      p.d = static_cast<int>(d);
      p.row_ptr = row_ptr.data_ptr<int64_t>();
      p.col_idx = col_idx.data_ptr<int64_t>();
      p.q_blocks = p.k_blocks = mask.q_blocks;
      p.block_size = static_cast<int>(bs);
      p.scale = static_cast<float>(scale);
      p.causal = true;
      const auto stream = at::cuda::getCurrentCUDAStream().stream();
      // ours: the launcher's choice (kAuto, block_sparse_kernels.h); the others forced, on the
      // same lists: mma.sync (the portable kernel), wgmma (every thread loads, a barrier per
      // tile), wgmma-ws (warp-specialised), ws-overlap, ws-async, ws-persist (one CTA per SM
      // over all items); then the whole backend call. All timed in interleaved rounds.
      const auto launch = [&](cuda::BlockSparseKernel kernel) {
        p.kernel = kernel;
        const char* failed = "";
        cuda_check(
            cuda::launch_block_sparse_attention(p, cuda::ElemType::kBFloat16, stream, &failed),
            failed);
      };
      const auto& backend = backend_for(dev);
      const std::vector<cuda::BlockSparseKernel> kernels = {
          cuda::BlockSparseKernel::kMmaSync,      cuda::BlockSparseKernel::kWgmma,
          cuda::BlockSparseKernel::kWgmmaWs,      cuda::BlockSparseKernel::kWgmmaWsOverlap,
          cuda::BlockSparseKernel::kWgmmaWsAsync, cuda::BlockSparseKernel::kWgmmaWsPersistent,
          cuda::BlockSparseKernel::kAuto};
      std::vector<std::function<void()>> fns;
      for (auto kernel : kernels) fns.push_back([&, kernel] { launch(kernel); });
      fns.push_back([&] { backend.block_sparse(q, k, v, mask, scale, true, 0, 0, 0); });
      const auto t = ev.interleaved_median_ms(fns, 2, reps);
      const double t_mma = t[0], t_wg = t[1], t_ws = t[2], t_wso = t[3], t_wsa = t[4], t_wsp = t[5],
                   t_ours = t[6], t_call = t[7];
      // At density 1, each wgmma kernel's output once more, for the errors against SDPA.
      std::vector<torch::Tensor> outs;
      for (size_t i = 1; density == 1.0 && i + 1 < kernels.size(); ++i) {
        launch(kernels[i]);
        outs.push_back(out.clone());
      }
      launch(cuda::BlockSparseKernel::kAuto);
      const double flops = 4.0 * d * mask.listed_pairs(len, len);
      std::string err = "-";
      const auto rel_to_dense = [&](const torch::Tensor& o) {
        return ((o.to(torch::kFloat) - dense.to(torch::kFloat)).norm() /
                dense.to(torch::kFloat).norm())
            .item<double>();
      };
      if (density == 1.0) err = fmt::format("{:.2e}", rel_to_dense(out));
      std::string ws_err = "-";
      if (density == 1.0) {
        ws_err.clear();
        for (const auto& o : outs)
          ws_err += fmt::format("{}{:.1e}", ws_err.empty() ? "" : "/", rel_to_dense(o));
      }
      std::string flex_err = "-";
      const double t_flex =
          with_flex ? flex_ms(mask, len, heads, d, bs, reps, &flex_err) : std::nan("");
      fmt::print(
          "{:>7} {:>7.0f}% {:>9} {:>10.3f} {:>10.3f} {:>10.3f} {:>10.3f} {:>10.3f} {:>10.3f} "
          "{:>10.3f} {:>10.3f} {:>10.3f} {:>10.3f} {:>9.2f} {:>9.2f} {:>8.0f} {:>9.3f} {:>9} "
          "{:>31} {:>9}\n",
          len, 100 * density, mask.nnz(), t_sdpa, t_flex, t_mma, t_wg, t_ws, t_wso, t_wsa, t_wsp,
          t_ours, t_call, t_sdpa / t_ours, t_flex / t_ours, flops / (t_ours * 1e-3) / 1e12,
          flops / 990e12 * 1e3, err, ws_err, flex_err);
      std::fflush(stdout);
    }
  }
}

/// Orthonormal d x r columns per (batch, head): random projections for the estimator and the
/// rank-r key cache (timing does not depend on which subspace).
torch::Tensor random_basis(int64_t b, int64_t h, int64_t d, int64_t r, const torch::Device& dev) {
  return std::get<0>(torch::linalg_qr(torch::randn({b, h, d, r}, torch::dtype(torch::kFloat))))
      .to(dev);
}

/// The fraction of a's listed blocks that b lists too (rows compared as sets; host masks).
double mask_agreement(const BlockMask& a, const BlockMask& b) {
  const auto ra = a.row_ptr.accessor<int64_t, 1>(), rb = b.row_ptr.accessor<int64_t, 1>();
  const auto ca = a.col_idx.accessor<int64_t, 1>(), cb = b.col_idx.accessor<int64_t, 1>();
  int64_t both = 0, total = 0;
  for (int64_t row = 0; row + 1 < a.row_ptr.size(0); ++row) {
    std::vector<int64_t> x(&ca[ra[row]], &ca[ra[row]] + (ra[row + 1] - ra[row]));
    std::vector<int64_t> y(&cb[rb[row]], &cb[rb[row]] + (rb[row + 1] - rb[row]));
    std::sort(x.begin(), x.end());
    std::sort(y.begin(), y.end());
    std::vector<int64_t> common;
    std::set_intersection(x.begin(), x.end(), y.begin(), y.end(), std::back_inserter(common));
    both += static_cast<int64_t>(common.size());
    total += static_cast<int64_t>(x.size());
  }
  return total > 0 ? static_cast<double>(both) / static_cast<double>(total) : 1.0;
}
/// 2. The low-rank block estimator (rank r, 8 sampled rows or one pooled query per query block,
/// key projection included) against the block-sparse attention it plans, L = 32k, 32 heads,
/// d = 128, bf16.
void run_estimator(bool quick) {
  const int64_t heads = 32, d = 128, bs = 128, len = quick ? 8192 : 32768;
  const auto dev = torch::Device(torch::kCUDA, 0);
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(dev);
  torch::manual_seed(5);
  const auto q = torch::randn({1, heads, len, d}, opts);
  const auto k = torch::randn({1, heads, len, d}, opts);
  const auto v = torch::randn({1, heads, len, d}, opts);
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  EventPair ev;
  const auto& backend = backend_for(dev);
  fmt::print(
      "\n== low-rank block estimator (CSR lists written on the GPU) vs the sparse attention "
      "it plans: L={}, H={}, d={}, bf16, causal, block {} ==\n",
      len, heads, d, bs);
  // The key projection alone (kp = k·a_k, every key: the estimator's memory-bound step), by
  // the projection kernel's variants: one output row per thread (the default) and 4
  // (CudaEstimatorOptions::projection_rows). Floor: k read once, kp written once, at 3.35 TB/s
  // (the H100 SXM's datasheet rate; 4.8 on the H200).
  fmt::print("{:>4} {:>16} {:>16} {:>8} {:>10}\n", "r", "kproj 1 row ms", "kproj 4 rows ms",
             "4 / 1", "floor ms");
  for (int64_t r : {8, 16, 32, 64}) {
    const auto a_k = random_basis(1, heads, d, r, dev);
    CudaEstimatorOptions one, four;
    four.projection_rows = 4;
    const double t1 = ev.median_ms([&] { (void)lowrank_project_keys_cuda(k, a_k, one); }, 3, 20);
    const double t4 = ev.median_ms([&] { (void)lowrank_project_keys_cuda(k, a_k, four); }, 3, 20);
    const int64_t rp = r <= 8 ? 8 : r <= 16 ? 16 : r <= 32 ? 32 : 64;
    const double bytes = static_cast<double>(heads) * len * (d * 2 + rp * 4);
    fmt::print("{:>4} {:>16.3f} {:>16.3f} {:>8.3f} {:>10.3f}\n", r, t1, t4, t4 / t1,
               bytes / 3.35e12 * 1e3);
    std::fflush(stdout);
  }
  fmt::print("{:>4} {:>8} {:>6} {:>13} {:>13} {:>11} {:>10} {:>14} {:>10}\n", "r", "budget", "mode",
             "estimator ms", "attention ms", "est/attn", "density", "libtorch ms", "x libtorch");
  for (int64_t r : {16, 32}) {
    const auto a_q = random_basis(1, heads, d, r, dev), a_k = random_basis(1, heads, d, r, dev);
    for (double density : {0.10, 0.05}) {
      HeadPlan plan = HeadPlan::block_sparse(density, bs);
      plan.estimator = BlockEstimator::kLowRank;
      plan.rank = r;
      // The reference: the CPU twin's LibTorch code (estimators.cpp) on the same GPU tensors,
      // its selection on the host.
      const double t_ref = ev.median_ms(
          [&] {
            double f = 0;
            const auto sc = lowrank_block_scores(q, k, a_q.to(q.scalar_type()),
                                                 a_k.to(q.scalar_type()), bs, true, 0, &f);
            (void)select_blocks(sc, plan, len, len, true, 0);
          },
          1, 3);
      for (bool tf32 : {false, true}) {
        CudaEstimatorOptions eo;
        eo.tf32 = tf32;
        double flops = 0;
        BlockMask mask;
        const double t_est = ev.median_ms(
            [&] { mask = estimate_block_mask_cuda(q, k, a_q, a_k, plan, true, 0, &flops, eo); }, 2,
            10);
        const double t_att = ev.median_ms(
            [&] { (void)backend.block_sparse(q, k, v, mask, scale, true, 0, 0, 0); }, 2, 10);
        fmt::print(
            "{:>4} {:>7.0f}% {:>6} {:>13.3f} {:>13.3f} {:>11.3f} {:>10.3f} {:>14.3f} {:>10.1f}\n",
            r, 100 * density, tf32 ? "tf32" : "3xtf32", t_est, t_att, t_est / t_att,
            mask.on_host().density(len, len, true, 0), t_ref, t_ref / t_est);
        std::fflush(stdout);
      }
      // Pooled queries (plan.pool_queries: one mean query per block, fp32 CUDA cores), against
      // the CPU twin's pooled LibTorch code on the same GPU tensors.
      HeadPlan pooled = plan;
      pooled.pool_queries = true;
      const double t_ref_pooled = ev.median_ms(
          [&] {
            double f = 0;
            const auto sc =
                lowrank_block_scores(q, k, a_q.to(q.scalar_type()), a_k.to(q.scalar_type()), bs,
                                     true, 0, &f, /*pool_queries=*/true);
            (void)select_blocks(sc, pooled, len, len, true, 0);
          },
          1, 3);
      // pq-mma: the tensor-core kernel on the stored keys by mma.sync (the default off
      // compute capability 9.0); pool-q: the keys projected, then the CUDA-core kernel; pq-wg:
      // the stored-key scores as warpgroup MMAs, the default on compute capability 9.0 (w from q
      // by one kernel, the lazy fold); wg-lt: pq-wg with w from LibTorch's block means and the
      // products kernel (pooled_w_kernel = false); wg-cub: with LibTorch's means and two cuBLAS
      // products (pooled_w_cublas, the default before 2026-12-06's tenth session); wg-ex: with
      // the exact fold (pooled_key_lazy_max = false); wg-1p, 1p-lt, 1p-ex: the same three with w
      // in one 16-bit part (pooled_key_split = false: half the MMAs). (Measured slower and left
      // out: w formed in 4 parts on a side stream while the score kernels of earlier parts run
      // (0.49 -> 0.66 ms per call, H100, 2026-12-06, tenth session); 3 and 4 tiles in flight,
      // key chunks of 2048 and 4096 keys, three CTAs per SM, the pipelined body: RESULTS.md,
      // 2026-12-06.)
      bool sm90 = false;
      const char* failed_call = "";
      cuda_check(cuda::device_is_sm90(&sm90, &failed_call), failed_call);
      BlockMask split_mask;  // pq-wg's, for the one-part rows' agreement
      struct Variant {
        const char* mode;
        bool key_mma = true, wgmma = true, split = true, w_kernel = true, cublas = false,
             lazy = true;
      };
      const auto variant_of = [](const char* mode, auto&& edit) {
        Variant v{mode};
        edit(v);
        return v;
      };
      const std::vector<Variant> variants = {
          variant_of("pq-mma", [](Variant& v) { v.wgmma = false; }),
          variant_of("pool-q", [](Variant& v) { v.key_mma = v.wgmma = false; }),
          variant_of("pq-wg", [](Variant&) {}),
          variant_of("wg-lt", [](Variant& v) { v.w_kernel = false; }),
          variant_of("wg-cub", [](Variant& v) { v.cublas = true; }),
          variant_of("wg-ex", [](Variant& v) { v.lazy = false; }),
          variant_of("wg-1p", [](Variant& v) { v.split = false; }),
          variant_of("1p-lt", [](Variant& v) { v.split = v.w_kernel = false; }),
          variant_of("1p-ex", [](Variant& v) { v.split = v.lazy = false; }),
      };
      for (size_t variant = 0; variant < variants.size(); ++variant) {
        const Variant& vr = variants[variant];
        if (vr.wgmma && !sm90) continue;
        CudaEstimatorOptions eo;
        eo.pooled_key_mma = vr.key_mma;
        eo.pooled_key_body = vr.wgmma ? CudaEstimatorOptions::PooledKeyBody::kWgmma
                                      : CudaEstimatorOptions::PooledKeyBody::kMmaSync;
        eo.pooled_w_cublas = vr.cublas;
        eo.pooled_w_kernel = vr.w_kernel;
        eo.pooled_key_split = vr.split;
        eo.pooled_key_lazy_max = vr.lazy;
        const char* mode = vr.mode;
        double flops = 0;
        BlockMask mask;
        const auto estimate = [&] {
          mask = estimate_block_mask_cuda(q, k, a_q, a_k, pooled, true, 0, &flops, eo);
        };
        const double t_est = ev.median_ms(estimate, 2, 10);
        const double t_att = ev.median_ms(
            [&] { (void)backend.block_sparse(q, k, v, mask, scale, true, 0, 0, 0); }, 2, 10);
        fmt::print(
            "{:>4} {:>7.0f}% {:>6} {:>13.3f} {:>13.3f} {:>11.3f} {:>10.3f} {:>14.3f} {:>10.1f}\n",
            r, 100 * density, mode, t_est, t_att, t_est / t_att,
            mask.on_host().density(len, len, true, 0), t_ref_pooled, t_ref_pooled / t_est);
        // The same call's GPU work alone (graph replays: no host time between its kernels).
        const double t_graph = ev.graph_median_ms(estimate, 2, 10);
        fmt::print("{:>22} {:>13.3f} {:>13} {:>11.3f}   (GPU work alone: CUDA graph replay)\n",
                   "graph", t_graph, "", t_graph / t_att);
        if (variant == 2) split_mask = mask.on_host();
        if (!vr.split && split_mask.row_ptr.defined())
          fmt::print("{:>22} {:>13.4f}   (blocks also chosen by pq-wg, of those chosen)\n",
                     "agreement", mask_agreement(mask.on_host(), split_mask));
        std::fflush(stdout);
      }
      if (r != 16 || density != 0.10) continue;
      // Where pq-mma's time goes, each part alone on the same inputs: the block means of q
      // (LibTorch's reduction, the part that reads q), the scores (block means, the means'
      // projection, w = pq·A_kᵀ, the tensor-core kernel and the normalisation), the selection.
      CudaEstimatorOptions so;
      so.pool_queries = true;
      so.pooled_key_body = CudaEstimatorOptions::PooledKeyBody::kMmaSync;
      double f = 0;
      const auto pooled_scores = lowrank_block_scores_cuda(
          q, k, a_q.narrow(3, 0, r), a_k.narrow(3, 0, r), bs, true, 0, &f, so);
      // Each part, timed as a call and as GPU work alone (CUDA graph replays).
      const auto means = [&] {
        (void)q.view({1, heads, len / bs, bs, d}).mean(3, false, torch::kFloat);
      };
      const auto scores_by = [&](const CudaEstimatorOptions& o) {
        return [&, o] {
          (void)lowrank_block_scores_cuda(q, k, a_q.narrow(3, 0, r), a_k.narrow(3, 0, r), bs, true,
                                          0, &f, o);
        };
      };
      const auto select = [&] {
        (void)select_blocks_cuda(pooled_scores, pooled, len, len, true, 0);
      };
      // The wgmma body's scores too (compute capability 9.0).
      CudaEstimatorOptions sw = so;
      sw.pooled_key_body = CudaEstimatorOptions::PooledKeyBody::kWgmma;
      const double t_means = ev.median_ms(means, 2, 10);
      const double t_scores = ev.median_ms(scores_by(so), 2, 10);
      const double t_select = ev.median_ms(select, 2, 10);
      const double t_scores_wg = sm90 ? ev.median_ms(scores_by(sw), 2, 10) : std::nan("");
      fmt::print(
          "     pq-mma by parts (r {}, {:.0f}%): block means of q {:.3f} ms (floor, q read once "
          "at 3.35 TB/s: {:.3f}), scores {:.3f} ms (wgmma body: {:.3f}), selection {:.3f} ms\n",
          r, 100 * density, t_means, heads * len * d * 2 / 3.35e12 * 1e3, t_scores, t_scores_wg,
          t_select);
      const double g_means = ev.graph_median_ms(means, 2, 10);
      const double g_scores = ev.graph_median_ms(scores_by(sm90 ? sw : so), 2, 10);
      const double g_select = ev.graph_median_ms(select, 2, 10);
      fmt::print(
          "     GPU work alone by parts (graph replays; scores by the {} body): block means {:.3f} "
          "ms, scores {:.3f} ms (means included), selection {:.3f} ms\n",
          sm90 ? "wgmma" : "mma.sync", g_means, g_scores, g_select);
      std::fflush(stdout);
    }
  }
  // The pooled estimator (softmax over mean-pooled query and key blocks: LibTorch on the GPU)
  // with the GPU selection (select_blocks_cuda), against the attention it plans.
  for (double density : {0.10, 0.05}) {
    HeadPlan plan = HeadPlan::block_sparse(density, bs);
    plan.estimator = BlockEstimator::kPooled;
    double flops = 0;
    BlockMask mask;
    const double t_est =
        ev.median_ms([&] { mask = estimate_block_mask(q, k, plan, true, 0, &flops); }, 2, 10);
    const double t_att = ev.median_ms(
        [&] { (void)backend.block_sparse(q, k, v, mask, scale, true, 0, 0, 0); }, 2, 10);
    fmt::print("{:>4} {:>7.0f}% {:>6} {:>13.3f} {:>13.3f} {:>11.3f} {:>10.3f} {:>14} {:>10}\n", "-",
               100 * density, "pooled", t_est, t_att, t_est / t_att,
               mask.on_host().density(len, len, true, 0), "-", "-");
    std::fflush(stdout);
  }
}

/// 3. Decoding: one query per sequence, batch 16, 32 heads, 32k cache, d = dv = 128, bf16:
/// SDPA over the full cache, our decode kernel over the full keys, and over a rank-r key cache
/// (r = d/4 and d/8) with full values. Floors: the bytes each must read at 4.8 TB/s.
void run_decode(bool quick) {
  const int64_t b = 16, heads = 32, d = 128, len = quick ? 8192 : 32768;
  const auto dev = torch::Device(torch::kCUDA, 0);
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(dev);
  torch::manual_seed(6);
  const auto q = torch::randn({b, heads, 1, d}, opts);
  const auto k = torch::randn({b, heads, len, d}, opts);
  const auto v = torch::randn({b, heads, len, d}, opts);
  const auto lengths = torch::full({b}, len, torch::dtype(torch::kLong));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  EventPair ev;
  fmt::print("\n== decode: B={}, H={}, cache {}, d={}, bf16 (floors at 4.8 TB/s) ==\n", b, heads,
             len, d);
  fmt::print("{:<28} {:>9} {:>10} {:>9} {:>10} {:>9}\n", "method", "ms", "floor ms", "x sdpa",
             "GB/s", "rel err");
  torch::Tensor ref;
  const double t_sdpa =
      ev.median_ms([&] { ref = at::scaled_dot_product_attention(q, k, v, {}, 0.0, false); }, 3, 20);
  const double full_bytes = 2.0 * b * heads * len * d * 2;
  const auto row = [&](const std::string& name, double t, double bytes, const std::string& err) {
    fmt::print("{:<28} {:>9.3f} {:>10.3f} {:>9.2f} {:>10.0f} {:>9}\n", name, t,
               bytes / 4.8e12 * 1e3, t_sdpa / t, bytes / (t * 1e-3) / 1e9, err);
    std::fflush(stdout);
  };
  row("sdpa, full cache", t_sdpa, full_bytes, "-");
  const auto rel = [&](const torch::Tensor& out, const torch::Tensor& want) {
    return fmt::format("{:.2e}", ((out.to(torch::kFloat) - want.to(torch::kFloat)).norm() /
                                  want.to(torch::kFloat).norm())
                                     .item<double>());
  };
  torch::Tensor out;
  const auto q3 = q.select(2, 0).contiguous();
  const double t_full =
      ev.median_ms([&] { out = decode_attention_cuda(q3, k, v, lengths, scale); }, 3, 20);
  row("ours, full keys", t_full, full_bytes, rel(out.unsqueeze(2), ref));
  for (int64_t r : {d / 4, d / 8}) {
    const auto a = random_basis(b, heads, d, r, dev).to(torch::kBFloat16);
    const auto kp = torch::matmul(k, a).contiguous();  // the rank-r key cache K A
    const auto qp = torch::matmul(q, a).select(2, 0).contiguous();
    // Reference on the same projected keys: SDPA with e = r queries and keys.
    const auto want =
        at::scaled_dot_product_attention(torch::matmul(q, a), kp, v, {}, 0.0, false, scale);
    const double t =
        ev.median_ms([&] { out = decode_attention_cuda(qp, kp, v, lengths, scale); }, 3, 20);
    row(fmt::format("ours, rank-{} keys", r), t, 1.0 * b * heads * len * (r + d) * 2,
        rel(out.unsqueeze(2), want));
  }
}

/// One call of the default pooled estimator (r 16, density 10%, L = 32k), one with w in one
/// 16-bit part (pooled_key_split = false), one with w from LibTorch's block means
/// (pooled_w_kernel = false), between cudaProfilerStart
/// and cudaProfilerStop, after two warm-up calls of each: for a profiler started with profiling off
/// (ncu
/// --profile-from-start off), which then sees just those calls' kernels.
void run_estimator_profile() {
  const int64_t heads = 32, d = 128, bs = 128, len = 32768, r = 16;
  const auto dev = torch::Device(torch::kCUDA, 0);
  const auto opts = torch::TensorOptions().dtype(torch::kBFloat16).device(dev);
  torch::manual_seed(5);
  const auto q = torch::randn({1, heads, len, d}, opts);
  const auto k = torch::randn({1, heads, len, d}, opts);
  const auto a_q = random_basis(1, heads, d, r, dev), a_k = random_basis(1, heads, d, r, dev);
  HeadPlan plan = HeadPlan::block_sparse(0.10, bs);
  plan.estimator = BlockEstimator::kLowRank;
  plan.rank = r;
  plan.pool_queries = true;
  double flops = 0;
  CudaEstimatorOptions one_part, libtorch_means;
  one_part.pooled_key_split = false;
  libtorch_means.pooled_w_kernel = false;
  const auto calls = [&] {
    (void)estimate_block_mask_cuda(q, k, a_q, a_k, plan, true, 0, &flops);
    (void)estimate_block_mask_cuda(q, k, a_q, a_k, plan, true, 0, &flops, one_part);
    (void)estimate_block_mask_cuda(q, k, a_q, a_k, plan, true, 0, &flops, libtorch_means);
  };
  for (int i = 0; i < 2; ++i) calls();
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cuda_check(cudaProfilerStart(), "cudaProfilerStart");
  calls();
  cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cuda_check(cudaProfilerStop(), "cudaProfilerStop");
  fmt::print(
      "estimator-profile: three pooled estimator calls (L {}, r {}, 10%; the default, w in one "
      "part, w from LibTorch's means) profiled\n",
      len, r);
}

}  // namespace
#endif  // ATTNPILOT_WITH_CUDA

int main(int argc, char** argv) {
  bool quick = false, with_flex = true;
  int64_t max_len = int64_t(1) << 40;  // --max-len: skip longer sequences in the sparse table
  int64_t min_len = 0;                 // --min-len: skip shorter ones
  std::string only;                    // empty: every section
  std::vector<double> densities = {1.0, 0.10, 0.05};  // --densities: the sparse table's rows
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else if (std::strcmp(argv[i], "--no-flex") == 0) {
      with_flex = false;
    } else if (std::strcmp(argv[i], "--max-len") == 0 && i + 1 < argc &&
               std::atoll(argv[i + 1]) > 0) {
      max_len = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--min-len") == 0 && i + 1 < argc &&
               std::atoll(argv[i + 1]) > 0) {
      min_len = std::atoll(argv[++i]);
    } else if (std::strcmp(argv[i], "--densities") == 0 && i + 1 < argc) {
      densities.clear();
      std::string list = argv[++i];
      for (size_t at = 0; at <= list.size();) {
        const size_t end = std::min(list.find(',', at), list.size());
        char* stop = nullptr;
        const std::string item = list.substr(at, end - at);
        const double v = std::strtod(item.c_str(), &stop);
        if (item.empty() || *stop != '\0' || !(v > 0.0 && v <= 1.0)) {
          fmt::print(stderr,
                     "attention_cuda_bench: --densities takes fractions in (0, 1] "
                     "separated by commas (got '{}' in '{}')\n",
                     item, list);
          return 2;
        }
        densities.push_back(v);
        at = end + 1;
      }
    } else if (std::strcmp(argv[i], "--only") == 0 && i + 1 < argc &&
               (std::strcmp(argv[i + 1], "sparse") == 0 ||
                std::strcmp(argv[i + 1], "estimator") == 0 ||
                std::strcmp(argv[i + 1], "estimator-profile") == 0 ||
                std::strcmp(argv[i + 1], "decode") == 0)) {
      only = argv[++i];
    } else {
      fmt::print(
          stderr,
          "usage: attention_cuda_bench [--quick] [--no-flex] [--min-len N] [--max-len N] "
          "[--densities F,F,...] [--only sparse|estimator|decode|estimator-profile]\n(got '{}')\n",
          argv[i]);
      return 2;
    }
  }
#ifndef ATTNPILOT_WITH_CUDA
  (void)quick;
  (void)with_flex;
  (void)max_len;
  (void)min_len;
  (void)densities;
  fmt::print("attention_cuda_bench: built without CUDA (ATTNPILOT_CUDA=OFF); nothing measured\n");
  return 0;
#else
  if (!torch::cuda::is_available()) {
    fmt::print("attention_cuda_bench: needs a CUDA GPU (none here); nothing measured\n");
    return 0;
  }
  try {
    if (only.empty() || only == "sparse") run(quick, with_flex, min_len, max_len, densities);
    if (only.empty() || only == "estimator") run_estimator(quick);
    if (only.empty() || only == "decode") run_decode(quick);
    if (only == "estimator-profile") run_estimator_profile();
  } catch (const std::exception& e) {
    fmt::print(stderr, "attention_cuda_bench: {}\n", e.what());
    return 1;
  }
  return 0;
#endif
}
