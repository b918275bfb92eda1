#pragma once
/// Perturbation bounds for singular values, singular subspaces, rank-r scores and the
/// attention output. Every function is batched over leading dims and works in float64
/// (inputs of other float dtypes are converted). A is the unperturbed matrix, Ã = A + E.
#include <torch/torch.h>

#include <cstdint>

namespace attnpilot::perturbation {

/// Weyl's inequality for singular values (Weyl 1912; Horn & Johnson, Thm 3.3.16):
///   max_i |σ_i(A + E) − σ_i(A)| ≤ ‖E‖₂.
/// Returns ‖E‖₂ per matrix, e [..., m, n] -> [...].
torch::Tensor weyl_bound(const torch::Tensor& e);

/// Mirsky's theorem (Mirsky 1960; Stewart & Sun, Thm IV.4.11, Frobenius case):
///   ‖σ(A + E) − σ(A)‖₂ ≤ ‖E‖_F   (σ vectors sorted the same way).
/// Returns ‖E‖_F per matrix, e [..., m, n] -> [...].
torch::Tensor mirsky_bound(const torch::Tensor& e);

/// Wedin's sin-theta theorem, residual form (Wedin 1972; Stewart & Sun, Thm V.4.4), for the
/// leading r singular subspaces. Let Ũ₁, Ṽ₁ (orthonormal, r columns) and Σ̃₁ be approximate
/// leading singular triplets of a matrix M with residuals R = M Ṽ₁ − Ũ₁ Σ̃₁ and
/// S = Mᵀ Ũ₁ − Ṽ₁ Σ̃₁, and let σ_{r+1}(M) be M's (r+1)-th singular value. If
///   δ = σ_min(Σ̃₁) − σ_{r+1}(M) > 0,
/// then for M's exact leading subspaces U₁, V₁:
///   max(‖sin Θ(U₁, Ũ₁)‖₂, ‖sin Θ(V₁, Ṽ₁)‖₂) ≤ max(‖R‖₂, ‖S‖₂) / δ.
/// With Ũ₁ Σ̃₁ Ṽ₁ᵀ the exact leading part of A and M = A + E, R = E Ṽ₁ and S = Eᵀ Ũ₁, so
/// residual ≤ ‖E‖₂. Returns min(1, residual/δ), and 1 (no information) where δ ≤ 0.
/// residual, sigma_tilde_r, sigma_next: [...] tensors.
torch::Tensor wedin_sin_theta_bound(const torch::Tensor& residual,
                                    const torch::Tensor& sigma_tilde_r,
                                    const torch::Tensor& sigma_next);

/// A-priori Wedin bound from A's spectrum only: by Weyl, σ_r(A + E) ≥ σ_r(A) − ‖E‖₂, so with
/// δ₀ = σ_r(A) − σ_{r+1}(A) − ‖E‖₂ > 0 the leading-r subspaces of A and A + E satisfy
///   max(‖sin Θ_U‖₂, ‖sin Θ_V‖₂) ≤ ‖E‖₂ / δ₀
/// (Wedin with σ̃ = spectrum of A + E, σ_{r+1} of A, roles of A and A + E swapped). Returns
/// min(1, ‖E‖₂/δ₀), 1 where δ₀ ≤ 0. sigma [..., k] of A (descending), rank r in [1, k).
torch::Tensor wedin_a_priori_bound(const torch::Tensor& e_norm2, const torch::Tensor& sigma,
                                   int64_t rank);

/// sin of the largest principal angle between the column spaces of two orthonormal bases
/// [..., d, r]: ‖(I − X Xᵀ) Y‖₂. Returns [...].
torch::Tensor sin_theta(const torch::Tensor& x, const torch::Tensor& y);

/// Tail energy (Eckart–Young–Mirsky 1936): for the best rank-r approximation S_r of S,
///   ‖S − S_r‖_F = sqrt(Σ_{i>r} σ_i²). Equality, not just a bound. sigma [..., k] -> [...].
torch::Tensor tail_frobenius(const torch::Tensor& sigma, int64_t rank);

/// Spectral tail (Eckart–Young–Mirsky, spectral norm): ‖S − S_r‖₂ = σ_{r+1} (0 if r >= k).
torch::Tensor tail_spectral(const torch::Tensor& sigma, int64_t rank);

/// Score change when the rank moves r -> r' (optimal truncations of one SVD): S_r − S_r' is
/// the sum of the triplets between them, so ‖S_r − S_r'‖_F = sqrt(Σ_{min<i≤max} σ_i²) and
/// ‖S_r − S_r'‖₂ = σ_{min(r,r')+1}. Returns the Frobenius value, [...].
torch::Tensor rank_change_frobenius(const torch::Tensor& sigma, int64_t rank_from, int64_t rank_to);

/// Attention-output change through softmax. For one query row with scores s, s̃ = s + h
/// (h = scale·Δs), probabilities p = softmax(s), p̃ = softmax(s̃) over the same (possibly
/// causally masked) keys, and output o = Σ_j p_j v_j:
///
///  (1) ‖p̃ − p‖₁ ≤ (max h − min h)/2 ≤ ‖h‖₂/√2.
///      Proof: g(t) = softmax(s + t h), g'(t) = (diag(p_t) − p_t p_tᵀ) h, whose j-th entry is
///      p_{t,j}(h_j − μ_t) with μ_t = Σ_j p_{t,j} h_j. So ‖g'(t)‖₁ = E_{p_t}|h − μ_t|, the mean
///      absolute deviation of h under p_t, which is ≤ sqrt(Var_{p_t} h) ≤ (max h − min h)/2
///      (Popoviciu's inequality). Integrate over t ∈ [0, 1]. Finally, for two entries,
///      (h_a − h_b)² ≤ 2(h_a² + h_b²) ≤ 2‖h‖₂², so max h − min h ≤ √2·‖h‖₂.
///  (2) ‖õ − o‖₂ = ‖Σ_j (p̃_j − p_j) v_j‖₂ ≤ ‖p̃ − p‖₁ · max_j ‖v_j‖₂.
///  Hence per row ‖Δo_i‖₂ ≤ scale·‖Δs_i‖₂·max_j‖v_j‖₂/√2, and summing squares over rows,
///    ‖ΔO‖_F ≤ scale·‖ΔS‖_F·max_j‖v_j‖₂/√2,   max_i ‖Δo_i‖₂ ≤ scale·‖ΔS‖₂·max_j‖v_j‖₂/√2
///  (‖Δs_i‖₂ ≤ ‖ΔS‖₂ for every row). For rank-r scores, ‖ΔS‖_F = tail_frobenius and
///  ‖ΔS‖₂ = tail_spectral; the usual scale is 1/√d.
/// score_error: ‖ΔS‖ (Frobenius for the total, spectral for the worst row) [...];
/// value_norm_max: max_j ‖v_j‖₂ [...]. Returns the output bound [...].
torch::Tensor attention_output_bound(const torch::Tensor& score_error,
                                     const torch::Tensor& value_norm_max, double scale);

/// max_j ‖v_j‖₂ over the rows of v [..., M, dv] -> [...].
torch::Tensor max_row_norm(const torch::Tensor& v);

}  // namespace attnpilot::perturbation
