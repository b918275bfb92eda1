#include "perturbation/tracker.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "common/error.h"
#include "perturbation/bounds.h"
#ifdef ATTNPILOT_WITH_CUDA
#include "perturbation/cuda/jacobi_svd.h"
#endif

namespace attnpilot::perturbation {

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> subspace_iteration_step(
    const torch::Tensor& c, const torch::Tensor& v) {
#ifdef ATTNPILOT_WITH_CUDA
  // CUDA: the same step from batched GEMMs and our Jacobi kernel (no per-matrix QR/SVD loop).
  if (cuda::subspace_step_supported(c, v)) return cuda::subspace_iteration_step_cuda(c, v);
#endif
  auto u = std::get<0>(torch::linalg_qr(torch::matmul(c, v)));
  auto vn = std::get<0>(torch::linalg_qr(torch::matmul(c.transpose(-1, -2), u)));
  // Rayleigh–Ritz: SVD of the p×p compression Uᵀ C V.
  auto b = torch::matmul(u.transpose(-1, -2), torch::matmul(c, vn));
  auto [ub, sb, vbh] = torch::linalg_svd(b, false, c10::nullopt);
  return {torch::matmul(u, ub), sb, torch::matmul(vn, vbh.transpose(-1, -2))};
}

torch::Tensor triplet_residual(const torch::Tensor& c, const torch::Tensor& u,
                               const torch::Tensor& s, const torch::Tensor& v, int64_t r,
                               const torch::Tensor& cv, bool ritz) {
  auto ur = u.narrow(-1, 0, r), vr = v.narrow(-1, 0, r);
  auto sr = s.narrow(-1, 0, r).unsqueeze(-2);
  ATTNPILOT_CHECK_ARG(
      !cv.defined() || (cv.dim() == v.dim() && cv.size(-1) >= r && cv.size(-2) == c.size(-2)),
      "triplet_residual: cv must be C·V with at least r = {} columns, got {}", r,
      cv.defined() ? c10::str(cv.sizes()) : std::string("undefined"));
  auto cvr = cv.defined() ? cv.narrow(-1, 0, r) : torch::matmul(c, vr);
  auto r1 =
      torch::linalg_vector_norm(torch::addcmul(cvr, ur, sr, -1), 2, {-2}, false, c10::nullopt);
  if (!ritz) {
    auto r2 = torch::linalg_vector_norm(
        torch::addcmul(torch::matmul(c.transpose(-1, -2), ur), vr, sr, -1), 2, {-2}, false,
        c10::nullopt);
    r1 = torch::maximum(r1, r2);
  }
  auto worst = r1.amax(-1);
  auto s1 = s.select(-1, 0);
  return torch::where(s1 > 0, worst / s1.clamp_min(1e-300), torch::zeros_like(worst));
}

SubspaceTracker::SubspaceTracker(int64_t d, TrackerOptions opts)
    : d_(d),
      p_(0),
      opts_(opts),
      gen_(at::make_generator<at::CPUGeneratorImpl>(opts.seed)),
      svd_(opts.svd) {
  ATTNPILOT_CHECK_ARG(d >= 1, "head dim d = {}, expected >= 1", d);
  ATTNPILOT_CHECK_ARG(opts.rank >= 1 && opts.rank <= d, "tracker rank = {}, expected in [1, {}]",
                      opts.rank, d);
  ATTNPILOT_CHECK_ARG(opts.oversample >= -1, "oversample = {}, expected >= 0 (or -1: the default)",
                      opts.oversample);
  ATTNPILOT_CHECK_ARG(opts.tol > 0 && opts.tol < 1, "tol = {}, expected in (0, 1)", opts.tol);
  ATTNPILOT_CHECK_ARG(opts.max_iters >= 1, "max_iters = {}, expected >= 1", opts.max_iters);
  ATTNPILOT_CHECK_ARG(opts.max_sin_theta > 0 && opts.max_sin_theta <= 1,
                      "max_sin_theta = {}, expected in (0, 1]", opts.max_sin_theta);
  p_ = std::min(
      d, opts.rank + (opts.oversample < 0 ? default_oversample(opts.rank) : opts.oversample));
}

torch::Tensor SubspaceTracker::shape(const torch::Tensor& flat, std::vector<int64_t> tail) const {
  auto s = lead_;
  s.insert(s.end(), tail.begin(), tail.end());
  return flat.reshape(s);
}

void SubspaceTracker::recompute(const torch::Tensor& idx) {
  if (idx.numel() == 0) return;
  auto res = svd_(core_.index_select(0, idx));
  u_.index_copy_(0, idx, res.u.narrow(-1, 0, p_).to(torch::kFloat64));
  v_.index_copy_(0, idx, res.v.narrow(-1, 0, p_).to(torch::kFloat64));
  s_.index_copy_(0, idx, res.s.narrow(-1, 0, p_).to(torch::kFloat64));
  stats_.recomputations += idx.numel();
}

void SubspaceTracker::update(const torch::Tensor& q, const torch::Tensor& k) {
  ATTNPILOT_CHECK_ARG(q.defined() && k.defined() && q.dim() >= 2 && k.dim() >= 2,
                      "tracker update expects q [..., T, d] and k [..., T', d]");
  ATTNPILOT_CHECK_ARG(q.size(-1) == d_ && k.size(-1) == d_,
                      "tracker has d = {} but q has {} and k has {} columns", d_, q.size(-1),
                      k.size(-1));
  auto lead = q.sizes().slice(0, q.dim() - 2).vec();
  ATTNPILOT_CHECK_ARG(lead == k.sizes().slice(0, k.dim() - 2).vec(),
                      "q has shape {} and k has shape {}, expected equal leading dims",
                      c10::str(q.sizes()), c10::str(k.sizes()));
  const bool first = !gram_q_.defined();
  if (!first) {
    ATTNPILOT_CHECK_ARG(lead == lead_, "tracker batch shape is {}, this segment has {}",
                        c10::str(c10::IntArrayRef(lead_)), c10::str(c10::IntArrayRef(lead)));
  }
  auto q64 = q.to(torch::kFloat64).reshape({-1, q.size(-2), d_});
  auto k64 = k.to(torch::kFloat64).reshape({-1, k.size(-2), d_});
  auto dq = torch::matmul(q64.transpose(-1, -2), q64);
  auto dk = torch::matmul(k64.transpose(-1, -2), k64);
  if (first) {
    lead_ = lead;
    gram_q_ = dq;
    gram_k_ = dk;
  } else {
    gram_q_ = gram_q_ + dq;
    gram_k_ = gram_k_ + dk;
  }
  root_q_ = gram_root(gram_q_, opts_.projection);
  root_k_ = gram_root(gram_k_, opts_.projection);
  auto c_new = score_core(*root_q_, *root_k_);
  const int64_t b = c_new.size(0);
  stats_.updates += b;
  stats_.last_iterations = 0;
  auto all = torch::arange(b, torch::TensorOptions().dtype(torch::kLong).device(c_new.device()));

  if (first && opts_.warm_start) {
    core_ = c_new;
    u_ = torch::zeros({b, d_, p_}, c_new.options());
    v_ = torch::zeros({b, d_, p_}, c_new.options());
    s_ = torch::zeros({b, p_}, c_new.options());
    recompute(all);
    return;
  }

  // Which elements may warm-start: Wedin a priori with ‖E‖_F and the previous spectrum.
  torch::Tensor warm_mask;
  torch::Tensor v0;
  if (opts_.warm_start) {
    // Singular subspaces are invariant under positive scaling, and a growing sequence mostly
    // scales the core up, so compare β·C_new with C_old, β = ⟨C_new, C_old⟩/‖C_new‖² (the
    // least-squares scale; β ≤ 0 falls back to β = 1, and then E is large and we recompute).
    auto inner = (c_new * core_).sum({-2, -1});
    auto nn = c_new.square().sum({-2, -1});
    auto beta =
        torch::where((inner > 0) & (nn > 0), inner / nn.clamp_min(1e-300), torch::ones_like(inner));
    auto e = torch::linalg_matrix_norm(beta.view({-1, 1, 1}) * c_new - core_, "fro");
    const int64_t r = opts_.rank;
    torch::Tensor bound;
    if (r < p_) {
      bound = wedin_a_priori_bound(e, s_, r);
    } else {
      // r = p = d: no (r+1)-th value; the gap is σ_r itself.
      auto gap = s_.select(-1, r - 1) - e;
      bound =
          torch::where(gap > 0, (e / gap.clamp_min(1e-300)).clamp_max(1.0), torch::ones_like(e));
    }
    warm_mask = bound <= opts_.max_sin_theta;
    v0 = v_;
  } else {
    warm_mask = torch::ones({b}, torch::TensorOptions().dtype(torch::kBool));
    v0 = std::get<0>(torch::linalg_qr(
        torch::randn({b, d_, p_}, gen_, c_new.options().device(torch::kCPU)).to(c_new.device())));
    if (first) {
      u_ = torch::zeros({b, d_, p_}, c_new.options());
      v_ = torch::zeros({b, d_, p_}, c_new.options());
      s_ = torch::zeros({b, p_}, c_new.options());
    }
  }
  core_ = c_new;
  warm_mask = warm_mask.to(c_new.device());
  auto warm_idx = warm_mask.nonzero().flatten();
  auto cold_idx = (~warm_mask).nonzero().flatten();
  recompute(cold_idx);
  if (warm_idx.numel() == 0) return;

  // Subspace iteration on the warm elements; each stops when its residual is small.
  auto c = core_.index_select(0, warm_idx);
  auto v = v0.index_select(0, warm_idx);
  auto active = torch::ones({warm_idx.numel()}, torch::TensorOptions().dtype(torch::kBool));
  auto iters = torch::zeros({warm_idx.numel()}, torch::TensorOptions().dtype(torch::kLong));
  torch::Tensor uu = torch::zeros_like(v), ss = torch::zeros({v.size(0), p_}, v.options()),
                vv = v.clone();
  for (int it = 0; it < opts_.max_iters && active.any().item<bool>(); ++it) {
    auto act = active.nonzero().flatten();
    auto act_d = act.to(c.device());
    auto [u1, s1, v1] =
        subspace_iteration_step(c.index_select(0, act_d), vv.index_select(0, act_d));
    uu.index_copy_(0, act_d, u1);
    ss.index_copy_(0, act_d, s1);
    vv.index_copy_(0, act_d, v1);
    iters.index_add_(0, act, torch::ones({act.numel()}, iters.options()));
    auto res = triplet_residual(c.index_select(0, act_d), u1, s1, v1, opts_.rank).cpu();
    active.index_put_({act}, res > opts_.tol);
  }
  u_.index_copy_(0, warm_idx, uu);
  v_.index_copy_(0, warm_idx, vv);
  s_.index_copy_(0, warm_idx, ss);
  stats_.iterations += iters.sum().item<int64_t>();
  stats_.last_iterations = iters.max().item<int64_t>();
  auto failed = active.nonzero().flatten();
  stats_.warm += warm_idx.numel() - failed.numel();
  recompute(warm_idx.index_select(0, failed.to(warm_idx.device())));
}

ScoreProjections SubspaceTracker::projections() const {
  ATTNPILOT_CHECK_ARG(gram_q_.defined(), "tracker has no state yet: call update() first");
  auto [a_q, a_k] = projections_from_core_svd(*root_q_, *root_k_, u_, s_, v_, opts_.rank);
  ScoreProjections out;
  out.a_q = shape(a_q, {d_, opts_.rank});
  out.a_k = shape(a_k, {d_, opts_.rank});
  out.sigma = shape(s_, {p_});
  return out;
}

torch::Tensor SubspaceTracker::gram_q() const { return shape(gram_q_, {d_, d_}); }
torch::Tensor SubspaceTracker::gram_k() const { return shape(gram_k_, {d_, d_}); }
torch::Tensor SubspaceTracker::core() const { return shape(core_, {d_, d_}); }
torch::Tensor SubspaceTracker::u() const { return shape(u_, {d_, p_}); }
torch::Tensor SubspaceTracker::v() const { return shape(v_, {d_, p_}); }
torch::Tensor SubspaceTracker::sigma() const { return shape(s_, {p_}); }
torch::Tensor SubspaceTracker::relative_residual() const {
  return shape(triplet_residual(core_, u_, s_, v_, opts_.rank), {});
}

}  // namespace attnpilot::perturbation
