#pragma once
/// \file
/// The portable target: 4-float vectors as GCC/Clang vector extensions (SSE, NEON or scalar
/// code, whatever the compiler targets), or plain arrays on other compilers. Runs anywhere;
/// the fallback when the CPU offers nothing better. Internal.

#include <cstdint>
#include <cstring>

#include "mla/detail/bfloat16.hpp"
#include "mla/detail/fp8_codec.hpp"
#include "mla/detail/isa/kernels.hpp"
#include "mla/detail/isa/kernels_prelude.hpp"

namespace mla::detail::isa::portable {

struct Ops {
  static constexpr int kWidth = 4;
  static constexpr Isa kIsa = Isa::kPortable;
#if defined(__GNUC__) || defined(__clang__)
  typedef float V __attribute__((vector_size(16)));
#else
  struct V {
    float lane[4];
    float& operator[](int i) { return lane[i]; }
    float operator[](int i) const { return lane[i]; }
  };
#endif

  static V set1(float x) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = x;
    return r;
  }
  static V zero() { return set1(0.0f); }
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
#if defined(__GNUC__) || defined(__clang__)
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fmadd(V a, V b, V c) { return a * b + c; }
#else
  static V add(V a, V b) {
    for (int i = 0; i < kWidth; ++i) a[i] += b[i];
    return a;
  }
  static V sub(V a, V b) {
    for (int i = 0; i < kWidth; ++i) a[i] -= b[i];
    return a;
  }
  static V mul(V a, V b) {
    for (int i = 0; i < kWidth; ++i) a[i] *= b[i];
    return a;
  }
  static V fmadd(V a, V b, V c) {
    for (int i = 0; i < kWidth; ++i) c[i] += a[i] * b[i];
    return c;
  }
#endif
  /// a > b ? a : b per lane: b when either is NaN (as x86's max).
  static V max(V a, V b) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = a[i] > b[i] ? a[i] : b[i];
    return r;
  }
  /// a < b ? x : y per lane.
  static V select_less(V a, V b, V x, V y) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = a[i] < b[i] ? x[i] : y[i];
    return r;
  }
  /// 2^n for integer-valued n in [-126, 127]; a NaN lane gives 1 (exp's NaN comes from its
  /// other factor): converting NaN to an integer would be undefined in C++, unlike the SIMD
  /// targets' conversion instructions.
  static V exp2_int(V n) {
    V r;
    for (int i = 0; i < kWidth; ++i) {
      const float k = n[i] == n[i] ? n[i] : 0.0f;
      const auto e = static_cast<std::uint32_t>(static_cast<std::int32_t>(k) + 127);
      r[i] = bit_cast<float>(e << 23);
    }
    return r;
  }
  /// Lane i of the result is the sum of the lanes of a[i], for kWidth vectors.
  static V transpose_sum(const V* a) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = (a[i][0] + a[i][2]) + (a[i][1] + a[i][3]);
    return r;
  }
  /// kWidth BF16 values at p (unaligned), exactly.
  static V widen_bf16(const unsigned char* p) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = bfloat16_bits_to_float(p + 2 * i);
    return r;
  }
  /// kWidth E4M3FN codes at p as their exact values (unscaled).
  static V widen_e4m3(const unsigned char* p) {
    V r;
    for (int i = 0; i < kWidth; ++i) r[i] = decode_fp8<E4M3FNFormat>(p[i]);
    return r;
  }
  /// 2 kWidth codes: widen_e4m3 twice (no cheaper route on this target), values times
  /// 1 / kWidenPairScale.
  static constexpr bool kWidenPair = false;
  static constexpr float kWidenPairScale = 1.0f;
  static void widen_e4m3_pair(const unsigned char* p, V& lo, V& hi) {
    lo = widen_e4m3(p);
    hi = widen_e4m3(p + kWidth);
  }

  // BF16 pairs: a vector whose 32-bit lanes each hold two BF16 values, the low half first (the
  // operand layout of VDPBF16PS and of AMX's B tiles).

  /// acc + a.lo * b.lo + a.hi * b.hi per lane. Products of BF16 values are exact in float, so
  /// each addition rounds once, as an FMA would.
  static V dp_bf16(V acc, V a, V b) {
    for (int i = 0; i < kWidth; ++i) {
      const auto ai = bit_cast<std::uint32_t>(a[i]), bi = bit_cast<std::uint32_t>(b[i]);
      acc[i] += bit_cast<float>(ai & 0xFFFF0000u) * bit_cast<float>(bi & 0xFFFF0000u);
      acc[i] += bit_cast<float>(ai << 16) * bit_cast<float>(bi << 16);
    }
    return acc;
  }
  /// The 32-bit word at p (two BF16 values) in every lane.
  static V bcast32(const void* p) {
    std::uint32_t w;
    std::memcpy(&w, p, sizeof(w));
    return set1(bit_cast<float>(w));
  }
  /// Lane i = (lo[i], hi[i]): kWidth BF16 values of two rows, interleaved into pairs.
  static V interleave_bf16(const std::uint16_t* lo, const std::uint16_t* hi) {
    V r;
    for (int i = 0; i < kWidth; ++i) {
      r[i] = bit_cast<float>(std::uint32_t{lo[i]} | (std::uint32_t{hi[i]} << 16));
    }
    return r;
  }
  /// Lane i = (bf16(lo[i]), bf16(hi[i])), each rounded to nearest even.
  static V pack_bf16(V lo, V hi) {
    V r;
    for (int i = 0; i < kWidth; ++i) {
      const std::uint32_t l = bit_cast<std::uint16_t>(to_bfloat16(lo[i]));
      const std::uint32_t h = bit_cast<std::uint16_t>(to_bfloat16(hi[i]));
      r[i] = bit_cast<float>(l | (h << 16));
    }
    return r;
  }
  /// The lanes of v, which BF16 holds exactly, stored as kWidth BF16 values (their high halves).
  static void store_bf16_exact(std::uint16_t* dst, V v) {
    for (int i = 0; i < kWidth; ++i)
      dst[i] = static_cast<std::uint16_t>(bit_cast<std::uint32_t>(v[i]) >> 16);
  }
  /// The lanes of v rounded to BF16 (nearest even; NaN stays NaN), stored as kWidth values.
  static void store_bf16(std::uint16_t* dst, V v) {
    for (int i = 0; i < kWidth; ++i) dst[i] = bit_cast<std::uint16_t>(to_bfloat16(v[i]));
  }
  static void prefetch(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
    __builtin_prefetch(p);
#else
    (void)p;
#endif
  }
};

#include "mla/detail/isa/kernels.inl"

}  // namespace mla::detail::isa::portable
