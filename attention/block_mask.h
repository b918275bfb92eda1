#pragma once
/// Which key blocks each query block attends to, in CSR form.
///
///   row r = (b * heads + h) * q_blocks + qb          (one row per batch, head, query block)
///   key blocks of row r: col_idx[row_ptr[r] .. row_ptr[r+1])   (ascending, unique)
///
///   query block qb holds query rows [qb*bs, min(N, (qb+1)*bs)); key block kb holds key
///   positions [kb*bs, min(M, (kb+1)*bs)). Query row i sits at key position q_offset + i.
#include <torch/torch.h>

#include <cstdint>
#include <vector>

namespace attnpilot::attention {

///   The lists are CPU tensors, except in masks made on the GPU by the CUDA estimator
///   (cuda/cuda_estimator.h): there both are CUDA tensors, and col_idx may hold unused
///   entries (-1) past row_ptr[rows]. listed_pairs and listed_keys take either; the other
///   methods read the lists on the host (device lists are copied there).
/// Blocks of `b` positions that cover `a` positions: ceil(a / b), for a >= 0, b >= 1.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct BlockMask {
  int64_t batch = 0, heads = 0, q_blocks = 0, k_blocks = 0;
  int64_t block_size = 0;
  torch::Tensor row_ptr;  ///< int64 [batch*heads*q_blocks + 1], CPU (or CUDA, see above)
  torch::Tensor col_idx;  ///< int64 [>= nnz], CPU (or CUDA, see above)

  /// Builds from per-row lists (rows ordered as above); sorts and checks nothing else.
  static BlockMask from_rows(int64_t batch, int64_t heads, int64_t q_blocks, int64_t k_blocks,
                             int64_t block_size, const std::vector<std::vector<int64_t>>& rows);
  /// Every key block a query block may see (causal: up to the block of its last query).
  static BlockMask all_visible(int64_t batch, int64_t heads, int64_t n, int64_t m,
                               int64_t block_size, bool causal, int64_t q_offset);
  /// Checks the layout against a call with n queries, m keys: sizes, row_ptr monotone,
  /// col_idx ascending, unique and < k_blocks, and that every query sees at least one key
  /// (each row lists a block starting at or before its first query's position when causal,
  /// and is non-empty otherwise). Throws InvalidArgument naming the row and value.
  void validate(int64_t n, int64_t m, bool causal, int64_t q_offset) const;
  /// The rows of the given batch entries and heads, as a mask of size
  /// [batch_idx.size(), head_idx.size()].
  BlockMask select(const std::vector<int64_t>& batch_idx,
                   const std::vector<int64_t>& head_idx) const;
  int64_t rows() const { return batch * heads * q_blocks; }
  int64_t nnz() const { return col_idx.numel(); }
  /// Key blocks in row (b, h, qb).
  std::vector<int64_t> row(int64_t b, int64_t h, int64_t qb) const;
  /// Listed (query, key) pairs, clipped to the n x m sequence (the work a kernel does). For
  /// device lists it is summed on the device and one scalar is read back.
  double listed_pairs(int64_t n, int64_t m) const;
  /// Listed keys summed over rows, clipped to m keys (the key/value rows a kernel reads).
  double listed_keys(int64_t m) const;
  /// This mask with its lists on the host (itself when they are already there).
  BlockMask on_host() const;
  /// Listed blocks over the causally visible blocks (1 = every visible block).
  double density(int64_t n, int64_t m, bool causal, int64_t q_offset) const;
};

/// Blocks a streaming head needs: the blocks holding the `sinks` first keys and every
/// block intersecting some query's window (q - window, q]. Causal only.
BlockMask streaming_block_mask(int64_t batch, int64_t heads, int64_t n, int64_t m,
                               int64_t block_size, int64_t q_offset, int64_t sinks, int64_t window);

}  // namespace attnpilot::attention
