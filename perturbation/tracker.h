#pragma once
/// Incremental tracking of the optimal rank-r score subspaces across segments, for many
/// (layer, head, sequence) at once (leading batch dims).
///
///   segment t: q_t [..., T, d], k_t [..., T', d]
///        │
///        ▼   G_Q += q_tᵀ q_t,  G_K += k_tᵀ k_t        (rank-T updates, float64)
///   C_t = G_Q^½ G_K^½                                (projections.h; continuous in G)
///        │   E = β C_t − C_{t−1},  s = ‖E‖_F / (σ_r − σ_{r+1} − ‖E‖_F)  (Wedin a priori, Weyl;
///        │   β = ⟨C_t, C_{t−1}⟩/‖C_t‖², since scaling C leaves its singular subspaces unchanged)
///        ├── s ≤ max_sin_theta: block subspace iteration on C_t from the previous U, V
///        │      (C V → QR → Cᵀ U → QR → Rayleigh–Ritz), until every leading residual
///        │      max(‖C v_i − σ_i u_i‖, ‖Cᵀ u_i − σ_i v_i‖) ≤ tol·σ₁ or max_iters
///        └── otherwise, or not converged: recompute the SVD of C_t from scratch (BatchedSvd)
///
/// Each element of the batch takes its own branch. The Wedin test uses ‖E‖_F ≥ ‖E‖₂ (a valid,
/// cheaper bound) and the previous step's σ_r, σ_{r+1}.
#include <torch/torch.h>

#include <cstdint>
#include <optional>

#include "perturbation/batched_svd.h"
#include "perturbation/projections.h"

namespace attnpilot::perturbation {

/// The tracker's default oversampling: max(4, r / 2) columns beyond r (p = 12 at r = 8, 24 at
/// r = 16). Each subspace step shrinks the error by about σ_{p+1}/σ_r, so a wider block can save
/// a step for what it adds to each: of p = r + 4 .. 2r, r + 4 was the fastest top-r update of
/// 1024 128×128 cores at r = 8 and r + r/2 or r + 3r/4 at r = 16 (H100, bench/RESULTS.md,
/// 2026-12-06).
inline int64_t default_oversample(int64_t rank) { return rank / 2 > 4 ? rank / 2 : 4; }

struct TrackerOptions {
  int64_t rank = 8;  ///< r, rank of the projections
  /// Block size p = min(d, r + oversample); -1: default_oversample(rank).
  int64_t oversample = -1;
  double tol = 1e-9;   ///< relative residual for convergence (× σ₁)
  int max_iters = 30;  ///< subspace iterations before falling back to recomputation
  /// Gate on the Wedin a-priori bound s (1 where the gap is not positive): elements with
  /// s > max_sin_theta skip the warm start and recompute at once. The default 1 always tries
  /// the warm start, because the a-priori bound (with ‖E‖_F) is pessimistic for real streams;
  /// correctness then rests on the a-posteriori residual test (Wedin's residual form, see
  /// bounds.h), and warm starts that do not reach it within max_iters are recomputed.
  double max_sin_theta = 1.0;
  bool warm_start = true;  ///< false: every update iterates from a random block (for tests)
  uint64_t seed = 0;       ///< seed of the random starting block (cold starts)
  ProjectionOptions projection;
  SvdOptions svd;  ///< options for recomputations
};

/// Counters, summed over batch elements.
struct TrackerStats {
  int64_t updates = 0;          ///< element-updates absorbed
  int64_t warm = 0;             ///< element-updates finished by subspace iteration
  int64_t recomputations = 0;   ///< element-updates that ran a full SVD (incl. the first one)
  int64_t iterations = 0;       ///< subspace iterations summed over elements
  int64_t last_iterations = 0;  ///< max iterations over elements in the last update
};

class SubspaceTracker {
 public:
  /// d: head dim; the batch shape is fixed by the first update.
  SubspaceTracker(int64_t d, TrackerOptions opts);

  /// Absorbs a segment: q [..., T, d], k [..., T', d] (T, T' >= 0, same leading dims each call).
  void update(const torch::Tensor& q, const torch::Tensor& k);

  /// Rank-r projections of the current state (a_q/a_k float64 [..., d, r]; sigma [..., p]
  /// holds the leading p singular values, not all d).
  ScoreProjections projections() const;

  torch::Tensor gram_q() const;  ///< [..., d, d] float64, Σ over segments of qᵀq
  torch::Tensor gram_k() const;  ///< [..., d, d] float64
  torch::Tensor core() const;    ///< C [..., d, d]
  torch::Tensor u() const;       ///< [..., d, p] leading left singular vectors of C
  torch::Tensor v() const;       ///< [..., d, p]
  torch::Tensor sigma() const;   ///< [..., p] descending
  /// Per element max_{i≤r} residual of the current triplets, relative to σ₁ [...].
  torch::Tensor relative_residual() const;
  const TrackerStats& stats() const { return stats_; }
  int64_t block() const { return p_; }

 private:
  torch::Tensor shape(const torch::Tensor& flat, std::vector<int64_t> tail) const;
  void recompute(const torch::Tensor& idx);

  int64_t d_, p_;
  TrackerOptions opts_;
  std::vector<int64_t> lead_;
  torch::Tensor gram_q_, gram_k_;  // [B, d, d]
  torch::Tensor core_;             // [B, d, d]
  torch::Tensor u_, v_, s_;        // [B, d, p], [B, d, p], [B, p]
  std::optional<GramRoot> root_q_, root_k_;
  torch::Generator gen_;
  BatchedSvd svd_;
  TrackerStats stats_;
};

/// One block subspace iteration step with Rayleigh–Ritz on c [B, d, d] from v [B, d, p]:
/// returns (u, s, v) of the compressed problem, each element's triplets sorted descending.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> subspace_iteration_step(
    const torch::Tensor& c, const torch::Tensor& v);

/// max_{i<r} max(‖C v_i − σ_i u_i‖, ‖Cᵀ u_i − σ_i v_i‖) / σ₁ per element ([B]); 0 if σ₁ = 0.
/// cv, if given: C·V already computed (at least r columns; the top-r iteration carries it into
/// its next step). ritz = true: the triplets are a Rayleigh–Ritz step's (u = U_y Z_v, s = Z_s,
/// v = Z_u from the SVD Z_u Z_s Z_vᵀ of Cᵀ U_y, U_y orthonormal), for which Cᵀ U = Cᵀ U_y Z_v =
/// Z_u Z_s = V S up to that SVD's own residual, so only ‖C v_i − σ_i u_i‖ is computed (no
/// Cᵀ·U product).
torch::Tensor triplet_residual(const torch::Tensor& c, const torch::Tensor& u,
                               const torch::Tensor& s, const torch::Tensor& v, int64_t r,
                               const torch::Tensor& cv = {}, bool ritz = false);

}  // namespace attnpilot::perturbation
