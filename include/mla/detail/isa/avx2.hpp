#pragma once
/// \file
/// The AVX2 target: 8-float vectors, FMA, F16C. Compiled in every build on GCC/Clang x86-64
/// (a function-target region, whatever -march the translation unit has); run only where the
/// CPU and the OS offer AVX2 (detail/isa/cpu.hpp). Internal.

#include "mla/detail/isa/cpu.hpp"
#include "mla/detail/isa/kernels_prelude.hpp"

#if MLA_ISA_X86

#include "mla/detail/isa/intrinsics.hpp"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), \
                             apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

namespace mla::detail::isa::avx2 {

struct Ops {
  static constexpr int kWidth = 8;
  static constexpr Isa kIsa = Isa::kAvx2;
  using V = __m256;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  /// a > b ? a : b per lane (b when either is NaN).
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  /// a < b ? x : y per lane.
  static V select_less(V a, V b, V x, V y) {
    return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_LT_OQ));
  }
  /// 2^n for integer-valued n in [-126, 127].
  static V exp2_int(V n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  /// Lane i of the result is the sum of the lanes of a[i], for 8 vectors a[0..7].
  static V transpose_sum(const V* a) {
    V t[4], u[2];
    for (int i = 0; i < 4; ++i) {
      t[i] = _mm256_add_ps(_mm256_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                           _mm256_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    }
    for (int i = 0; i < 2; ++i) {  // per 128-bit lane: partial sums of a[4i .. 4i+3]
      const __m256d x = _mm256_castps_pd(t[2 * i]), y = _mm256_castps_pd(t[2 * i + 1]);
      u[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)),
                           _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(u[0], u[1], 0x20),
                         _mm256_permute2f128_ps(u[0], u[1], 0x31));
  }
  /// 8 BF16 values at p (unaligned), exactly: the bits moved to the high half of each float.
  static V widen_bf16(const unsigned char* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  /// 8 E4M3FN codes at p as their exact values. A code's exponent and mantissa fields moved
  /// into FP16 position give its value / 2^8 exactly (normal and subnormal codes alike: FP16
  /// has the wider exponent); the hardware widens FP16 to float and a multiply by 2^8 is exact.
  /// NaN codes (fields all ones) become FP16 NaNs.
  static V widen_e4m3(const unsigned char* p) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i low7 = _mm_set1_epi16(0x7F);
    const __m128i em = _mm_and_si128(w, low7);
    const __m128i sign = _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8);
    const __m128i nan = _mm_cmpeq_epi16(em, low7);
    const __m128i h =
        _mm_or_si128(sign, _mm_blendv_epi8(_mm_slli_epi16(em, 7), _mm_set1_epi16(0x7F80), nan));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f));
  }
  /// 2 kWidth codes: widen_e4m3 twice (no cheaper route on this target), values times
  /// 1 / kWidenPairScale.
  static constexpr bool kWidenPair = false;
  static constexpr float kWidenPairScale = 1.0f;
  static void widen_e4m3_pair(const unsigned char* p, V& lo, V& hi) {
    lo = widen_e4m3(p);
    hi = widen_e4m3(p + kWidth);
  }

  // BF16 pairs: 32-bit lanes each holding two BF16 values, the low half first.

  /// acc + a.lo * b.lo + a.hi * b.hi per lane, on the FMA units (products of BF16 values are
  /// exact in float).
  static V dp_bf16(V acc, V a, V b) {
    const __m256i ai = _mm256_castps_si256(a), bi = _mm256_castps_si256(b);
    const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(ai, high)),
                          _mm256_castsi256_ps(_mm256_and_si256(bi, high)), acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(ai, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(bi, 16)), acc);
  }
  /// The 32-bit word at p in every lane.
  static V bcast32(const void* p) {
    std::int32_t w;
    std::memcpy(&w, p, sizeof(w));
    return _mm256_castsi256_ps(_mm256_set1_epi32(w));
  }
  /// Lane i = (lo[i], hi[i]).
  static V interleave_bf16(const std::uint16_t* lo, const std::uint16_t* hi) {
    const __m256i l = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo)));
    const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)));
    return _mm256_castsi256_ps(_mm256_or_si256(l, _mm256_slli_epi32(h, 16)));
  }
  /// The lanes' bits rounded to BF16 in their high halves (nearest even; NaN stays NaN).
  static __m256i round_bf16(V v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_or_si256(bits, _mm256_set1_epi32(0x00400000)), nan);
  }
  /// Lane i = (bf16(lo[i]), bf16(hi[i])), each rounded to nearest even.
  static V pack_bf16(V lo, V hi) {
    const __m256i l = _mm256_srli_epi32(round_bf16(lo), 16);
    const __m256i h =
        _mm256_and_si256(round_bf16(hi), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm256_castsi256_ps(_mm256_or_si256(l, h));
  }
  /// The lanes of v, which BF16 holds exactly, stored as 8 BF16 values (their high halves).
  static void store_bf16_exact(std::uint16_t* dst, V v) {
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
  }
  /// The lanes of v rounded to BF16 (nearest even; NaN stays NaN), stored as 8 values.
  static void store_bf16(std::uint16_t* dst, V v) {
    const __m256i h = _mm256_srli_epi32(round_bf16(v), 16);
    // Pack 8 x 32 -> 8 x 16: packus works per 128-bit lane, so gather the two halves after.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(packed));
  }
  // always_inline: a call to a function that only prefetches looks free of side effects, and
  // GCC deletes such calls before it would inline them.
  MLA_KERNEL_INLINE static void prefetch(const void* p) { __builtin_prefetch(p); }
};

#include "mla/detail/isa/kernels.inl"

}  // namespace mla::detail::isa::avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // MLA_ISA_X86
