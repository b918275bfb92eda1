#pragma once
/// CPU emulation of the 16-bit float types and the warp-level tensor-core primitives the attention
/// kernels use through inline PTX (attention/cuda/mma_ptx.cuh), on top of cuda_emu.h's fibers:
///
///   __nv_bfloat16, __half (+ the x2 pairs)   storage types with round-to-nearest-even
///                                            conversions from float (NaN stays NaN, overflow
///                                            gives Inf, fp16 subnormals exact) and exact ones back
///   mma::ldmatrix_x4(r, row)                 ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16
///   mma::mma_16816<T>(d, a, b0, b1)          mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32
///   mma::cp_async_16 / _commit / _wait_all   cp.async.cg 16 bytes (or zero fill), read at issue,
///                                            written when a wait covers it (commit groups,
///                                            wait_group N, wait_all)
///   mma::exp2_approx(x)                      ex2.approx.ftz.f32 as exp2f, subnormals flushed
///   mma::to_tf32(x)                          cvt.rna.tf32.f32: to 10 mantissa bits, nearest,
///                                            ties away from zero (a 32-bit pattern, low 13 bits 0)
///   mma::mma_tf32(c, a, b0, b1)              mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
///
/// The warp collectives (ldmatrix, mma) follow the PTX ISA's fragment layouts (g = lane / 4,
/// c = lane % 4; a 32-bit register holds two b16 elements, the lower-indexed in its low half):
///   ldmatrix  lanes 8i..8i+7 give the 8 row addresses (16 bytes each, 16-byte aligned) of matrix
///             i; r[i] of lane l is row g, elements 2c, 2c+1 of matrix i (.trans: elements g of
///             rows 2c, 2c+1)
///   A 16×16   a[0]: row g, cols 2c, 2c+1; a[1]: row g+8, same cols; a[2], a[3]: cols + 8
///   B 16×8    b0: rows (k) 2c, 2c+1, col (n) g; b1: rows 2c+8, 2c+9
///   C/D 16×8  d[0], d[1]: row g, cols 2c, 2c+1; d[2], d[3]: row g+8
/// Each is one Block::warp_exchange: every lane deposits its operands, the 32 lanes meet, each
/// computes its own outputs from the others' deposits. A lane that is missing (divergence) is a
/// deadlock error, a misaligned address a std::logic_error. The mma sums the 16 exact products in
/// double and rounds once with the accumulator (the hardware's fp32 summation order and rounding
/// are unspecified; the difference is far below the kernels' bf16/fp16 tolerances).
///
/// Not modelled: shared vs global address spaces, and timing; cp.async copies land at the
/// covering wait, not earlier (so a read before the wait always sees the old bytes).
/// ldmatrix_conflicted_phases() counts 8-row ldmatrix phases whose rows fall into the same
/// 16-byte bank group (offsets modulo 128 bytes), the shared-memory bank
/// conflicts of the real instruction when the shared buffer is 128-byte aligned.
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "tests/cuda_emu/cuda_emu.h"

/// bfloat16 storage (CUDA's __nv_bfloat16 layout: the high 16 bits of a float).
struct __nv_bfloat16 {
  uint16_t bits;
};
/// IEEE binary16 storage.
struct __half {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half2 {
  __half x, y;
};

namespace attnpilot::cuda_emu {

/// float -> bfloat16 bits, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t x = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

/// float -> binary16 bits, round to nearest even (subnormal results too); |f| >= 65520 gives Inf.
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));
  if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // Inf or rounds to it
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
    if (ax <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2^-25 (a tie rounds to 0)
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - e;  // m · 2^(e - 150) in units of 2^-24; 14 <= shift <= 24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);  // r = 0x400 is the smallest normal
  }
  uint32_t r = (ax - 0x38000000u) >> 13;  // exponent rebiased by 127 - 15
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // a carry moves the exponent
  return static_cast<uint16_t>(sign | r);
}
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t x;
  if (e == 31) {
    x = sign | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    const float v = std::ldexp(static_cast<float>(m), -24);  // exact
    return sign ? -v : v;
  } else {
    x = sign | ((e + 112) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}

}  // namespace attnpilot::cuda_emu

inline __nv_bfloat16 __float2bfloat16(float f) {
  return {::attnpilot::cuda_emu::float_to_bf16_bits(f)};
}
inline float __bfloat162float(__nv_bfloat16 h) {
  return ::attnpilot::cuda_emu::bf16_bits_to_float(h.bits);
}
inline __half __float2half(float f) { return {::attnpilot::cuda_emu::float_to_half_bits(f)}; }
inline float __half2float(__half h) { return ::attnpilot::cuda_emu::half_bits_to_float(h.bits); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16(lo), __float2bfloat16(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half(lo), __float2half(hi)};
}
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

namespace attnpilot::cuda_emu::mma {

namespace detail {

/// Element `hi` (0: low half, 1: high half) of a register of two T as a float.
template <typename T>
inline float elem(uint32_t reg, int hi);
template <>
inline float elem<__nv_bfloat16>(uint32_t reg, int hi) {
  return bf16_bits_to_float(static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu));
}
template <>
inline float elem<__half>(uint32_t reg, int hi) {
  return half_bits_to_float(static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu));
}

inline int lane() { return Block::current_block()->tid() % 32; }

inline void check_aligned16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw std::logic_error(std::string("cuda_emu: ") + what + " address not 16-byte aligned");
}

inline uint64_t& conflicted_phases() {
  static uint64_t n = 0;
  return n;
}

inline uint16_t load_b16(const unsigned char* row, int element) {
  uint16_t v;
  std::memcpy(&v, row + 2 * element, sizeof v);
  return v;
}

template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  check_aligned16(row, "ldmatrix row");
  const unsigned char* mine = static_cast<const unsigned char*>(row);
  const int l = lane(), g = l / 4, c = l % 4;
  Block::current_block()->warp_exchange(0xffffffffu, &mine, sizeof mine, [&](auto lane_bytes) {
    const auto addr = [&](int from) {
      const unsigned char* p;
      std::memcpy(&p, lane_bytes(from), sizeof p);
      return p;
    };
    for (int i = 0; i < 4; ++i) {
      uint32_t lo, hi;
      if (kTrans) {  // column g of rows 2c, 2c+1
        lo = load_b16(addr(8 * i + 2 * c), g);
        hi = load_b16(addr(8 * i + 2 * c + 1), g);
      } else {  // row g, columns 2c, 2c+1
        lo = load_b16(addr(8 * i + g), 2 * c);
        hi = load_b16(addr(8 * i + g), 2 * c + 1);
      }
      r[i] = lo | (hi << 16);
    }
    if (l == 0) {
      for (int i = 0; i < 4; ++i) {
        unsigned groups = 0;
        for (int j = 0; j < 8; ++j)
          groups |= 1u << ((reinterpret_cast<uintptr_t>(addr(8 * i + j)) % 128) / 16);
        if (groups != 0xffu) ++conflicted_phases();
      }
    }
  });
}

}  // namespace detail

/// 8-row ldmatrix phases so far whose 8 rows did not cover the 8 bank groups (see the top).
inline uint64_t ldmatrix_conflicted_phases() { return detail::conflicted_phases(); }

namespace detail {
/// Per-block state of the emulated cp.async: per thread, the copies issued since its last
/// commit and its committed groups not yet waited for, each copy's 16 bytes read at issue.
struct CpAsyncState : Block::Extension {
  explicit CpAsyncState(Block& b) : threads(static_cast<size_t>(b.size())) {}
  struct Copy {
    unsigned char* dst;
    unsigned char bytes[16];
  };
  struct Thread {
    std::vector<Copy> open;
    std::vector<std::vector<Copy>> groups;  // oldest first
  };
  std::vector<Thread> threads;
};
inline CpAsyncState::Thread& cp_async_thread() {
  Block* b = Block::current_block();
  if (b == nullptr) throw std::logic_error("cuda_emu: cp.async outside an emulated block");
  return b->extension<CpAsyncState>().threads[static_cast<size_t>(b->tid())];
}
inline void land(std::vector<CpAsyncState::Copy>& copies) {
  for (auto& c : copies) std::memcpy(c.dst, c.bytes, 16);
  copies.clear();
}
}  // namespace detail

/// cp.async.cg.shared.global 16 bytes (!valid: 16 zero bytes). The source is read at issue, the
/// destination written only when a wait covers the copy (cp_async_wait_all, or
/// cp_async_wait_group N once N newer groups are committed), as on the GPU where it lands at
/// some point before that wait: a kernel that reads the destination before its wait sees the
/// old bytes.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  detail::check_aligned16(dst, "cp.async destination");
  detail::CpAsyncState::Copy c;
  c.dst = static_cast<unsigned char*>(dst);
  if (valid) {
    detail::check_aligned16(src, "cp.async source");
    std::memcpy(c.bytes, src, 16);
  } else {
    std::memset(c.bytes, 0, 16);
  }
  detail::cp_async_thread().open.push_back(c);
}
/// cp.async.commit_group: this thread's copies since the last commit become a group.
inline void cp_async_commit() {
  auto& t = detail::cp_async_thread();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}
/// cp.async.wait_group N: all but this thread's N newest committed groups land.
inline void cp_async_wait_group_n(int n) {
  auto& t = detail::cp_async_thread();
  const size_t keep = static_cast<size_t>(n);
  size_t done = 0;
  while (t.groups.size() - done > keep) detail::land(t.groups[done++]);
  t.groups.erase(t.groups.begin(), t.groups.begin() + static_cast<std::ptrdiff_t>(done));
}
/// cp.async.wait_group N as the kernels' wrapper spells it (mma_ptx.cuh).
template <int N>
inline void cp_async_wait_group() {
  cp_async_wait_group_n(N);
}
/// cp.async.wait_all (= commit_group, then wait_group 0): every copy of this thread lands.
inline void cp_async_wait_all() {
  cp_async_commit();
  cp_async_wait_group_n(0);
}

/// ldmatrix.sync.aligned.m8n8.x4.shared.b16 (warp collective; layouts at the top).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { detail::ldmatrix_x4<false>(r, row); }
/// ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16.
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  detail::ldmatrix_x4<true>(r, row);
}

/// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, d = a·b + d (warp collective; layouts at
/// the top). T is __nv_bfloat16 or __half.
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  const Operands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const int l = detail::lane(), g = l / 4, c = l % 4;
  Block::current_block()->warp_exchange(0xffffffffu, &mine, sizeof mine, [&](auto lane_bytes) {
    const auto operands = [&](int from) {
      Operands o;
      std::memcpy(&o, lane_bytes(from), sizeof o);
      return o;
    };
    // A[row][k] sits in lane 4·(row % 8) + (k % 8) / 2, register row / 8 + 2·(k / 8), half k % 2;
    // B[k][col] in lane 4·col + (k % 8) / 2, register k / 8, half k % 2.
    const auto a_at = [&](int row, int k) {
      return detail::elem<T>(operands(4 * (row % 8) + (k % 8) / 2).a[row / 8 + 2 * (k / 8)], k % 2);
    };
    const auto b_at = [&](int k, int col) {
      return detail::elem<T>(operands(4 * col + (k % 8) / 2).b[k / 8], k % 2);
    };
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * c + i % 2;
      double sum = 0;
      for (int k = 0; k < 16; ++k)
        sum += static_cast<double>(a_at(row, k)) * static_cast<double>(b_at(k, col));
      d[i] = static_cast<float>(static_cast<double>(d[i]) + sum);
    }
  });
}

/// ex2.approx.ftz.f32: 2^x with subnormal inputs and results flushed to zero.
inline float exp2_approx(float x) {
  if (std::fabs(x) < FLT_MIN) x = 0.f;
  const float y = std::exp2(x);
  return y < FLT_MIN ? 0.f : y;
}

/// cvt.rna.tf32.f32: x rounded to 10 mantissa bits, to nearest with ties away from zero, as a
/// 32-bit pattern (the low 13 bits zero); Inf stays Inf, a finite value past the largest tf32
/// rounds to Inf, NaN gives the quiet NaN 0x7fffe000.
inline uint32_t to_tf32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffe000u;
  if ((u & 0x7fffffffu) == 0x7f800000u) return u;
  return (u + 0x1000u) & 0xffffe000u;  // the magnitude rounds half up; a carry moves the exponent
}

/// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32, c = a·b + c (warp collective). Fragment
/// layout (PTX ISA; g = lane / 4, t = lane % 4): A 16×8 a[0] (row g, k t), a[1] (g+8, t),
/// a[2] (g, t+4), a[3] (g+8, t+4); B 8×8 b0 (k t, col g), b1 (k t+4, col g); C as m16n8k16's.
/// Operands must be tf32 patterns (low 13 bits zero, as to_tf32 writes them; a std::logic_error
/// otherwise). The 8 exact products are summed in double and rounded once with the accumulator.
inline void mma_tf32(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  const Operands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  for (const uint32_t r : {a[0], a[1], a[2], a[3], b0, b1})
    if ((r & 0x1fffu) != 0u)
      throw std::logic_error("cuda_emu: mma tf32 operand is not a tf32 pattern (low 13 bits set)");
  const int l = detail::lane(), g = l / 4, t = l % 4;
  Block::current_block()->warp_exchange(0xffffffffu, &mine, sizeof mine, [&](auto lane_bytes) {
    const auto operands = [&](int from) {
      Operands o;
      std::memcpy(&o, lane_bytes(from), sizeof o);
      return o;
    };
    const auto value = [](uint32_t bits) {
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return static_cast<double>(f);
    };
    // A[row][k] sits in lane 4·(row % 8) + k % 4, register row / 8 + 2·(k / 4); B[k][col] in
    // lane 4·col + k % 4, register k / 4.
    const auto a_at = [&](int row, int k) {
      return value(operands(4 * (row % 8) + k % 4).a[row / 8 + 2 * (k / 4)]);
    };
    const auto b_at = [&](int k, int col) { return value(operands(4 * col + k % 4).b[k / 4]); };
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
      double sum = 0;
      for (int k = 0; k < 8; ++k) sum += a_at(row, k) * b_at(k, col);
      c[i] = static_cast<float>(static_cast<double>(c[i]) + sum);
    }
  });
}

}  // namespace attnpilot::cuda_emu::mma
