#pragma once
/// Block-importance estimators: score every (query block, key block) pair cheaply, then
/// keep blocks by the plan's budget. Each returns the FLOPs it spent.
///
///   q, k ──► *_block_scores [b, h, q_blocks, k_blocks] (rows ≈ distributions over visible
///            key blocks) ──► select_blocks(plan budget) ──► BlockMask
///
/// Budget (HeadPlan): gamma > 0: fewest blocks whose score mass reaches gamma (FlexPrefill);
/// else top_k > 0: top_k blocks; else ceil(density × visible blocks). The sink block 0 and
/// the diagonal blocks (those holding the query block's own positions) are always kept.
#include <torch/torch.h>

#include "attention/block_mask.h"
#include "attention/plan.h"

namespace attnpilot::attention {

/// Mean-pooled query and key blocks: softmax(pool(Q) pool(K)ᵀ/√d) over visible blocks.
torch::Tensor pooled_block_scores(const torch::Tensor& q, const torch::Tensor& k,
                                  int64_t block_size, bool causal, int64_t q_offset, double* flops);

/// Block sums of softmax((q a_q)(k a_k)ᵀ/√d) (rank-r scores), averaged over up to 8 evenly
/// spaced rows of each query block (its last row included). a_q, a_k: [b, h, d, r].
/// pool_queries: instead, one row per query block, the mean of its projected queries, scored
/// against every key up to the block's last query (the keys its rows see together).
torch::Tensor lowrank_block_scores(const torch::Tensor& q, const torch::Tensor& k,
                                   const torch::Tensor& a_q, const torch::Tensor& a_k,
                                   int64_t block_size, bool causal, int64_t q_offset, double* flops,
                                   bool pool_queries = false);

/// MInference vertical-slash: the last min(64, N) queries' attention gives column
/// (vertical) and diagonal (slash) weights; a block's score is the mean of its vertical
/// mass and its diagonals' mass. Causal only.
torch::Tensor vertical_slash_block_scores(const torch::Tensor& q, const torch::Tensor& k,
                                          int64_t block_size, int64_t q_offset, double* flops);

/// Keeps blocks of `scores` [b, h, q_blocks, k_blocks] by the plan's budget.
BlockMask select_blocks(const torch::Tensor& scores, const HeadPlan& plan, int64_t n, int64_t m,
                        bool causal, int64_t q_offset);

/// The estimator named by plan.estimator, then select_blocks. a_q/a_k (optional, [b, h, d,
/// >=rank]) are used by the low-rank estimator instead of computing projections. Adds the
/// estimator's FLOPs to *flops.
BlockMask estimate_block_mask(const torch::Tensor& q, const torch::Tensor& k, const HeadPlan& plan,
                              bool causal, int64_t q_offset, double* flops,
                              const torch::Tensor& a_q = {}, const torch::Tensor& a_k = {});

}  // namespace attnpilot::attention
