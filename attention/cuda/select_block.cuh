#pragma once
/// The estimator's selection and scatter kernels as warp-level device functions
/// (block_estimator.cu's select_kernel and scatter_kernel are thin wrappers around select_row and
/// scatter_block): select_blocks' rule of estimators.cpp on the device, described at the top of
/// block_estimator.cu. Between them the launcher runs a CUB exclusive scan of the counts into
/// row_ptr. Tests also run them on the CPU through tests/cuda_emu/cuda_emu.h (which defines
/// ATTNPILOT_CUDA_EMU and the CUDA names used here), with the scan on the host. Moving the bodies
/// here left the kernels' SASS byte-identical.
#ifndef ATTNPILOT_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cassert>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention/cuda/block_estimator_kernels.h"
#include "attention/cuda/estimator_common.cuh"

namespace attnpilot::attention::cuda::selection {

using est::block_rows;
using est::ceil_div;

/// Sort entries of select_row: the smallest power of two >= k_blocks.
inline int select_cap(int64_t k_blocks) {
  int cap = 1;
  while (cap < k_blocks) cap *= 2;
  return cap;
}

/// Largest sort select_row keeps in registers (32 entries per lane); longer rows sort in shared
/// memory.
inline constexpr int kSelectMaxRegisterCap = 1024;

/// Entries per lane of select_row's register sort for `cap` sort entries: 1 to 32 (a power of
/// two, cap rounded up to 32), or 0 for the shared-memory sort (cap > kSelectMaxRegisterCap).
__host__ __device__ constexpr int select_entries(int cap) {
  return cap > kSelectMaxRegisterCap ? 0 : cap <= 32 ? 1 : cap / 32;
}

/// f(std::integral_constant<int, select_entries(cap)>{}): the launcher's and the tests' one
/// dispatch over the select_row instantiations.
template <class F>
void dispatch_select(int cap, F&& f) {
  switch (select_entries(cap)) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 2:
      f(std::integral_constant<int, 2>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 16:
      f(std::integral_constant<int, 16>{});
      break;
    case 32:
      f(std::integral_constant<int, 32>{});
      break;
    default:
      f(std::integral_constant<int, 0>{});
      break;
  }
}

/// Dynamic shared memory of select_row<E>: the bitmap [⌈k_blocks/32⌉] u32, after the sort keys
/// [cap] u64 when E = 0 (the shared-memory sort).
inline int64_t select_smem_bytes(int entries, int cap, int64_t k_blocks) {
  return (entries == 0 ? int64_t(cap) * 8 : 0) + ceil_div(k_blocks, 32) * 4;
}

// Ascending 64-bit sort key: descending score, then ascending block index. The score half is
// never 0xffffffff (the one float that would give it, the negative NaN of all ones, sorts with
// the next NaN), so ~0 (invalid entries) is above every key of a block.
__device__ __forceinline__ uint64_t order_key(float score, int64_t kb) {
  uint32_t u = __float_as_uint(score == 0.f ? 0.f : score);  // -0 sorts as +0
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);            // monotone in the float order
  u = u == 0u ? 1u : u;
  return (static_cast<uint64_t>(~u) << 32) | static_cast<uint64_t>(kb);
}
/// The score order_key encoded (-0 comes back as +0).
__device__ __forceinline__ float key_score(uint64_t key) {
  const uint32_t u = ~static_cast<uint32_t>(key >> 32);
  return __uint_as_float((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u);
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

/// Ascending bitonic sort of a warp's 32·E keys in registers, entry 32e + lane in x[e]: strides
/// below 32 exchange across lanes (shuffles), the others within a lane. No shared memory, no
/// index arithmetic at run time (every stage unrolls), the same order as any other sort of
/// distinct keys.
template <int E>
__device__ __forceinline__ void warp_bitonic_sort(uint64_t (&x)[E], int lane) {
  constexpr int kLogCap = E == 1 ? 5 : E == 2 ? 6 : E == 4 ? 7 : E == 8 ? 8 : E == 16 ? 9 : 10;
  static_assert((32 * E) == (1 << kLogCap), "E: a power of two from 1 to 32");
#pragma unroll
  for (int lk = 1; lk <= kLogCap; ++lk) {
    const int k = 1 << lk;  // size of the sequences being merged
#pragma unroll
    for (int lj = lk - 1; lj >= 0; --lj) {
      const int j = 1 << lj;  // compare-exchange stride
      if (j >= 32) {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int f = e | (j / 32);
          if (f == e) continue;  // e is the upper entry of its pair
          const bool up = ((32 * e) & k) == 0;
          const uint64_t a = x[e], b = x[f];
          const bool swap = up == (b < a);  // one 64-bit comparison
          x[e] = swap ? b : a;
          x[f] = swap ? a : b;
        }
      } else {
        const bool lower = (lane & j) == 0;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const bool up = ((k >= 32 ? 32 * e : lane) & k) == 0;
          const uint64_t o = __shfl_xor_sync(0xffffffffu, x[e], j);
          x[e] = (lower == up) == (o < x[e]) ? o : x[e];  // keep the min, or the max
        }
      }
    }
  }
}

/// The key blocks of query block qb: visible [0, vis) and the diagonal [d0, d1] (with block 0,
/// always taken).
struct RowBlocks {
  int64_t vis, d0, d1;

  __device__ RowBlocks(const SelectLaunch& p, int64_t qb) {
    const int64_t bs = p.block_size;
    const int64_t first_q = p.q_offset + qb * bs;
    const int64_t last_q = p.q_offset + qb * bs + block_rows(qb, p.n, bs) - 1;
    vis = p.k_blocks;
    if (p.causal && div_bs(last_q, bs) + 1 < vis) vis = div_bs(last_q, bs) + 1;
    d0 = div_bs(first_q < p.m - 1 ? first_q : p.m - 1, bs);
    d1 = div_bs(last_q < p.m - 1 ? last_q : p.m - 1, bs);
  }
  /// x / bs for x >= 0: in 32 bits where x fits (a 64-bit division is a long routine, and
  /// count_budget_offset runs this for every query block of a slice).
  __device__ static int64_t div_bs(int64_t x, int64_t bs) {
    return x < 0xffffffffll
               ? static_cast<int64_t>(static_cast<uint32_t>(x) / static_cast<uint32_t>(bs))
               : x / bs;
  }
  /// Block 0 and the diagonal blocks: always taken.
  __device__ bool forced(int64_t kb) const { return kb == 0 || (kb >= d0 && kb <= d1); }
  /// How many of them are visible: block 0 (always) and those of [max(d0, 1), min(d1, vis - 1)].
  __device__ int64_t forced_count() const {
    const int64_t lo = d0 > 1 ? d0 : 1, hi = d1 < vis - 1 ? d1 : vis - 1;
    return 1 + (hi >= lo ? hi - lo + 1 : 0);
  }
  /// A count budget's block count (gamma <= 0: top_k, else ceil(density·vis - 1e-9)).
  __device__ double budget(const SelectLaunch& p) const {
    return p.top_k > 0 ? static_cast<double>(p.top_k)
                       : ceil(__dsub_rn(__dmul_rn(p.density, static_cast<double>(vis)), 1e-9));
  }
  /// Blocks a count budget keeps: max(forced, min(budget, vis)), as select_blocks and the
  /// launcher's capacity (cuda_estimator.cpp) count them.
  __device__ int64_t keep(const SelectLaunch& p) const {
    const double b = budget(p);
    const int64_t take = b < static_cast<double>(vis) ? static_cast<int64_t>(b) : vis;
    const int64_t f = forced_count();
    return take > f ? take : f;
  }
};

/// A count budget's CSR position of row `row` (b·heads·q_blocks + h·q_blocks + qb): every row's
/// length is keep(), known from the geometry alone, so each warp sums the lengths before its row
/// (those of its (b, h) slice: qb of them, plus whole slices of sum_qb keep) instead of a scan
/// over the selection's counts. Every lane gets the same value.
__device__ __forceinline__ int64_t count_budget_offset(const SelectLaunch& p, int64_t row,
                                                       int lane) {
  const int64_t qb = row % p.q_blocks;
  long long before = 0, slice = 0;
  for (int64_t i = lane; i < p.q_blocks; i += 32) {
    const int64_t k = RowBlocks(p, i).keep(p);
    slice += k;
    if (i < qb) before += k;
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    before += __shfl_xor_sync(0xffffffffu, before, o);
    slice += __shfl_xor_sync(0xffffffffu, slice, o);
  }
  return (row / p.q_blocks) * slice + before;
}

/// select_row's rule for one row, shared by its two sorts.
struct SelectRow : RowBlocks {
  const float* sc;  // the row's scores
  bool by_mass;

  __device__ __forceinline__ SelectRow(const SelectLaunch& p, int64_t row)
      : RowBlocks(p, row % p.q_blocks) {
    sc = p.scores + row * p.k_blocks;
    by_mass = p.gamma > 0;
  }
  /// The sort key of entry i (~0, sorting last, for the forced and invisible entries).
  __device__ __forceinline__ uint64_t key(int64_t i, float score) const {
    return i < vis && !forced(i) ? order_key(score, i) : ~0ull;
  }
  /// The forced blocks in the CPU's order (block 0, then the diagonal ascending) into the mass
  /// (the row's scores through `score`), the count and the bitmap `bits`.
  template <class Score>
  __device__ __forceinline__ void take_forced(Score&& score, double& mass, int64_t& count,
                                              uint32_t* bits, int lane) const {
    for (int64_t kb = 0; kb < vis; kb = kb == 0 ? (d0 > 1 ? d0 : 1) : kb + 1) {
      if (!forced(kb)) break;
      mass += static_cast<double>(score(kb));
      ++count;
      if (lane == 0) bits[kb / 32] |= 1u << (kb % 32);
    }
  }
  /// The budget the sorted entries are taken against: gamma·total mass, or a count.
  __device__ __forceinline__ double limit(const SelectLaunch& p, double total) const {
    if (by_mass) return __dmul_rn(p.gamma, total);
    return budget(p);
  }
  /// Sorted entries c0 .. c0 + 31 (this lane's: `key`, entry c0 + lane) of the `others`
  /// unforced ones: an entry is taken when the mass (count) before it, `base` + the warp's
  /// exclusive scan, is below the limit; scores are >= 0, so the taken entries are a prefix.
  /// Returns whether the next chunk may still take some (every valid entry here was taken).
  __device__ __forceinline__ bool walk(uint64_t key, int64_t c0, int64_t others, double limit,
                                       double& base, int64_t& count, uint32_t* bits,
                                       int lane) const {
    const int64_t i = c0 + lane;
    const bool ok = i < others && key != ~0ull;  // (the second holds by construction)
    const int64_t kb = ok ? static_cast<int64_t>(key & 0xffffffffu) : 0;
    const double wgt = ok ? (by_mass ? static_cast<double>(key_score(key)) : 1.0) : 0.0;
    double incl = wgt;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const double y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0;
    const bool take = ok && base + excl < limit;
    if (take) atomicOr(&bits[kb / 32], 1u << (kb % 32));
    const unsigned taken = __ballot_sync(0xffffffffu, take);
    count += __popc(taken);
    base += __shfl_sync(0xffffffffu, incl, 31);
    return taken == __ballot_sync(0xffffffffu, ok);
  }
};

/// The sum of a lane value over the warp (one REDUX on compute capability 8.0 and later).
__device__ __forceinline__ unsigned warp_count(unsigned n) {
#if defined(ATTNPILOT_CUDA_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
  return __reduce_add_sync(0xffffffffu, n);
#else
#pragma unroll
  for (int o = 16; o > 0; o /= 2) n += __shfl_xor_sync(0xffffffffu, n, o);
  return n;
#endif
}

/// The c smallest of a warp's 32·E keys (entry 32e + lane in x[e]; ~0 for an entry that does
/// not count, above every other key: order_key) marked in `bits` (by block, the key's low 32
/// bits, < 2^key_bits), 1 <= c < the entries that count: the entries a sort followed by taking
/// its first c would mark, found by a radix select instead (the keys are distinct: their low
/// bits are the block). The c-th smallest key T is built bit by bit from the top, each step
/// counting the keys below a candidate (one warp reduction): its score half (32 steps), then,
/// only where other keys share T's score, its block bits. Every key <= T is taken.
template <int E>
__device__ __forceinline__ void take_smallest(const uint64_t (&x)[E], int64_t c, int key_bits,
                                              uint32_t* bits) {
  // T's score half: the largest h with fewer than c keys whose score half is below h (the
  // entries that do not count have the score half 0xffffffff: never below).
  uint32_t hi = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t cand = hi | (1u << bit);
    unsigned n = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) n += static_cast<uint32_t>(x[e] >> 32) < cand ? 1u : 0u;
    if (static_cast<int64_t>(warp_count(n)) < c) hi = cand;
  }
  uint64_t t = (static_cast<uint64_t>(hi) << 32) | 0xffffffffu;  // every key of score half hi
  unsigned le = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) le += x[e] <= t ? 1u : 0u;
  if (static_cast<int64_t>(warp_count(le)) > c) {
    // Ties at T's score: T's block bits, the same way.
    uint32_t lo = 0;
    for (int bit = key_bits - 1; bit >= 0; --bit) {
      const uint64_t cand = (static_cast<uint64_t>(hi) << 32) | lo | (1u << bit);
      unsigned n = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) n += x[e] < cand ? 1u : 0u;
      if (static_cast<int64_t>(warp_count(n)) < c) lo |= 1u << bit;
    }
    t = (static_cast<uint64_t>(hi) << 32) | lo;
  }
#pragma unroll
  for (int e = 0; e < E; ++e)
    if (x[e] <= t) {
      const uint32_t kb = static_cast<uint32_t>(x[e]);
      atomicOr(&bits[kb / 32], 1u << (kb % 32));
    }
}

/// The set bits of a row's bitmap `bits` (`words` words), ascending, at col_idx[base ..) (none
/// at or past col_capacity). Every lane of the warp calls it.
__device__ __forceinline__ void write_list(const SelectLaunch& p, const uint32_t* bits,
                                           int64_t words, int64_t base, int lane) {
  for (int64_t w0 = 0; w0 < words; w0 += 32) {
    const int64_t w = w0 + lane;
    uint32_t word = w < words ? bits[w] : 0u;
    const int c = __popc(word);
    int incl = c;
#pragma unroll
    for (int o = 1; o < 32; o *= 2) {
      const int y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += y;
    }
    int64_t pos = base + incl - c;
    while (word != 0u) {
      const int bit = __ffs(word) - 1;
      if (pos < p.col_capacity) p.col_idx[pos] = w * 32 + bit;
      ++pos;
      word &= word - 1u;
    }
    base += __shfl_sync(0xffffffffu, incl, 31);
  }
}

/// One warp per row: row `row` (b·heads·q_blocks + h·q_blocks + qb) by the 32 lanes of a warp
/// (select_block: one or four warps per CTA). E = select_entries(cap) (cap = select_cap(k_blocks)):
/// the unforced entries held in registers, E per lane, or with E = 0 in shared memory. `smem`:
/// select_smem_bytes(E, cap, p.k_blocks) bytes, 16-byte aligned.
///
/// With p.log2_sums the row holds per-block log2 sums L (the pooled estimator's unnormalised
/// scores) and is normalised first exactly as pooled_scores.cuh's pooled_normalise_row does (the
/// same lanes, order and operations: the same floats). A count budget (gamma <= 0) takes its
/// unforced entries by take_smallest (E > 0) or the shared-memory sort (E = 0); a mass budget
/// sorts them and walks the prefix sums (in registers for E > 0).
///
/// kDirect (count budgets only): the list goes straight to col_idx at the row's position
/// (count_budget_offset) and row_ptr[row] (and row_ptr[rows] by the last row) is written; no
/// bitmap, counts, scan or scatter. Else the chosen blocks go to a bitmap at
/// bitmap[row·words ..] and their count to counts[row], for the scan and scatter_block.
template <int E, bool kDirect = false>
__device__ __forceinline__ void select_row(const SelectLaunch& p, int64_t row, uint32_t* bitmap,
                                           int64_t* counts, int cap, unsigned char* smem) {
  uint64_t* keys = reinterpret_cast<uint64_t*>(smem);  // E = 0 only
  const int64_t words = ceil_div(p.k_blocks, 32);
  uint32_t* bits = reinterpret_cast<uint32_t*>(smem + (E == 0 ? int64_t(cap) * 8 : 0));
  const int lane = threadIdx.x % 32;
  const SelectRow r(p, row);
  assert(!kDirect || !r.by_mass);

  for (int64_t w = lane; w < words; w += 32) bits[w] = 0u;
  // The row's scores: as stored, or normalised from log2 sums (est::log2_row_scale, as
  // pooled_normalise_row does).
  float raw[E > 0 ? E : 1];
  if constexpr (E > 0) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int64_t i = 32 * e + lane;
      raw[e] = i < r.vis ? r.sc[i] : 0.f;
    }
  }
  est::Log2RowScale norm{0.f, 1.f};
  const bool log2 = p.log2_sums;
  if (log2) {
    if constexpr (E > 0)
      norm = est::log2_row_scale<E>([&](int e, int64_t) { return raw[e]; }, r.vis, lane);
    else
      norm = est::log2_row_scale([&](int, int64_t kb) { return r.sc[kb]; }, r.vis, lane);
  }
  const auto normalised = [&](float v) { return log2 ? norm(v) : v; };
  const auto score = [&](int64_t kb) { return normalised(r.sc[kb]); };  // kb < vis
  // Mass budgets: the visible scores' total (each lane in ascending order, as the CPU-checked
  // kernel always summed). The register entries' sort keys.
  double total = 0;
  uint64_t x[E > 0 ? E : 1];
  if constexpr (E > 0) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int64_t i = 32 * e + lane;
      const float s = i < r.vis ? normalised(raw[e]) : 0.f;
      if (i < r.vis) total += static_cast<double>(s);
      x[e] = r.key(i, s);
    }
  } else if (r.by_mass) {
    for (int64_t kb = lane; kb < r.vis; kb += 32) total += static_cast<double>(score(kb));
  }
  if (r.by_mass) total = warp_sum(total);
  __syncwarp();
  double mass = 0;
  int64_t count = 0;
  r.take_forced(score, mass, count, bits, lane);
  __syncwarp();
  const double limit = r.limit(p, total);
  const int64_t others = r.vis - count;
  if ((r.by_mass ? mass : static_cast<double>(count)) < limit && others > 0) {
    double base = r.by_mass ? mass : static_cast<double>(count);
    // A count budget's unforced entries to take (limit is a whole number there).
    const int64_t want = r.by_mass ? 0
                         : limit - base >= static_cast<double>(others)
                             ? others
                             : static_cast<int64_t>(limit - base);
    if (!r.by_mass && want == others) {  // all of them
      for (int64_t kb = lane; kb < r.vis; kb += 32)
        if (!r.forced(kb)) atomicOr(&bits[kb / 32], 1u << (kb % 32));
      count += others;
    } else if constexpr (E > 0) {
      if (!r.by_mass) {
        int key_bits = 1;
        while ((int64_t(1) << key_bits) < r.vis) ++key_bits;
        take_smallest<E>(x, want, key_bits, bits);
        count += want;
      } else {
        warp_bitonic_sort<E>(x, lane);
        bool more = true;
#pragma unroll
        for (int e = 0; e < E; ++e)
          if (more && 32 * e < others)  // warp-uniform
            more = r.walk(x[e], 32 * e, others, limit, base, count, bits, lane);
      }
    } else {
      for (int64_t i = lane; i < cap; i += 32) keys[i] = r.key(i, i < r.vis ? score(i) : 0.f);
      __syncwarp();
      // Bitonic sort, ascending (the forced and invisible entries, ~0, end up last); the
      // strides are powers of two, so the pair index is shifts and masks.
      for (int size = 2; size <= cap; size *= 2) {
        for (int stride = size / 2; stride > 0; stride /= 2) {
          for (int i = lane; i < cap / 2; i += 32) {
            const int lo = 2 * (i & ~(stride - 1)) + (i & (stride - 1)), hi = lo + stride;
            const bool up = (lo & size) == 0;
            const uint64_t a = keys[lo], b = keys[hi];
            if ((a > b) == up) {
              keys[lo] = b;
              keys[hi] = a;
            }
          }
          __syncwarp();
        }
      }
      for (int64_t c0 = 0; c0 < others; c0 += 32)
        if (!r.walk(keys[c0 + lane < cap ? c0 + lane : 0], c0, others, limit, base, count, bits,
                    lane))
          break;
    }
  }
  __syncwarp();
  if constexpr (kDirect) {
    const int64_t offset = count_budget_offset(p, row, lane);
    assert(count == r.keep(p));
    write_list(p, bits, words, offset, lane);
    if (lane == 0) {
      p.row_ptr[row] = offset;
      if (row == p.rows - 1) p.row_ptr[p.rows] = offset + count;
    }
  } else {
    for (int64_t w = lane; w < words; w += 32) bitmap[row * words + w] = bits[w];
    if (lane == 0) counts[row] = count;
  }
}

/// Rows (warps) per CTA of the selection kernel: 4 with the entries in registers, 1 with the
/// shared-memory sort (whose keys take cap·8 bytes per warp).
__host__ __device__ constexpr int select_rows_per_cta(int entries) { return entries > 0 ? 4 : 1; }

/// Bytes of one warp's shared memory in a CTA of the selection kernel (select_smem_bytes rounded
/// up to 16).
inline int64_t select_slice_bytes(int entries, int cap, int64_t k_blocks) {
  return (select_smem_bytes(entries, cap, k_blocks) + 15) / 16 * 16;
}

/// One CTA of 32·select_rows_per_cta(E) threads (`block` is blockIdx.x): warp w selects row
/// block·select_rows_per_cta(E) + w (select_row) with `slice` bytes of shared memory at
/// smem + w·slice; warps past the last row return at once (select_row has no block barriers).
template <int E, bool kDirect>
__device__ __forceinline__ void select_block(const SelectLaunch& p, unsigned int block,
                                             uint32_t* bitmap, int64_t* counts, int cap,
                                             unsigned char* smem, int64_t slice) {
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int64_t row = static_cast<int64_t>(block) * select_rows_per_cta(E) + warp;
  if (row >= p.rows) return;
  select_row<E, kDirect>(p, row, bitmap, counts, cap, smem + warp * slice);
}

/// One CTA of 128 threads (`block` is blockIdx.x), one warp per row (row block·4 + warp): the set
/// bits of the row's bitmap, ascending, at col_idx[row_ptr[row] ..); row_ptr holds the exclusive
/// scan of select_row's counts. Warps past the last row return at once (no block barriers).
__device__ __forceinline__ void scatter_block(const SelectLaunch& p, unsigned int block,
                                              const uint32_t* bitmap) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(block) * 4 + threadIdx.x / 32;
  if (row >= p.rows) return;  // whole warps; no block barriers below
  const int64_t words = ceil_div(p.k_blocks, 32);
  write_list(p, bitmap + row * words, words, p.row_ptr[row], lane);
}

}  // namespace attnpilot::attention::cuda::selection
