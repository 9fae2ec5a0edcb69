#pragma once
/// \file
/// The AVX-512 target: 16-float vectors (F, BW, DQ, VL). Compiled in every build on GCC/Clang
/// x86-64 (a function-target region, whatever -march the translation unit has); run only where
/// the CPU and the OS offer AVX-512 (detail/isa/cpu.hpp). Internal.

#include "mla/detail/isa/cpu.hpp"
#include "mla/detail/isa/kernels_prelude.hpp"

#if MLA_ISA_X86

// GCC 12's intrinsics headers raise false -Wmaybe-uninitialized warnings for some intrinsics
// once they are inlined; the headers are read here, so the warnings are switched off for them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#if defined(__clang__)
#pragma clang attribute push(                                                               \
    __attribute__((                                                                         \
        target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

namespace mla::detail::isa::avx512 {

struct Ops {
  static constexpr int kWidth = 16;
  static constexpr Isa kIsa = Isa::kAvx512;
  using V = __m512;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  /// a > b ? a : b per lane (b when either is NaN).
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  /// a < b ? x : y per lane.
  static V select_less(V a, V b, V x, V y) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ), y, x);
  }
  /// 2^n for integer-valued n in [-126, 127].
  static V exp2_int(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  /// Lane i of the result is the sum of the lanes of a[i], for 16 vectors a[0..15]: a tree of
  /// 15 additions whose shuffles transpose as they go.
  static V transpose_sum(const V* a) {
    V t[8], u[4], v[2];
    for (int i = 0; i < 8; ++i) {  // per 128-bit lane: a[2i] at positions 0, 2; a[2i+1] at 1, 3
      t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                           _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    }
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: partial sums of a[4i .. 4i+3]
      const __m512d x = _mm512_castps_pd(t[2 * i]), y = _mm512_castps_pd(t[2 * i + 1]);
      u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                           _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i) {  // 128-bit lanes 0, 1: a[8i .. 8i+3]; 2, 3: a[8i+4 .. 8i+7]
      v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    }
    return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88),
                         _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
  }
  /// 16 BF16 values at p (unaligned), exactly: the bits moved to the high half of each float.
  static V widen_bf16(const unsigned char* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  /// 16 E4M3FN codes at p as their exact values. A code's exponent and mantissa fields moved
  /// into FP16 position give its value / 2^8 exactly (normal and subnormal codes alike: FP16
  /// has the wider exponent); the hardware widens FP16 to float and a multiply by 2^8 is exact.
  /// Shifted left by 7, a code has its exponent and mantissa in FP16 position and its sign at
  /// bit 14; adding bit 14 to itself carries the sign to bit 15 and clears bit 14. NaN codes
  /// (fields all ones) get FP16's all-ones exponent by adding bit 14 once more.
  static V widen_e4m3(const unsigned char* p) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i t = _mm256_slli_epi16(w, 7);
    const __m256i bit14 = _mm256_set1_epi16(0x4000), em = _mm256_set1_epi16(0x3F80);
    __m256i h = _mm256_add_epi16(t, _mm256_and_si256(t, bit14));
    const __mmask16 nan = _mm256_cmpeq_epi16_mask(_mm256_and_si256(t, em), em);
    h = _mm256_mask_add_epi16(h, nan, h, bit14);
    return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.0f));
  }
  // always_inline: a call to a function that only prefetches looks free of side effects, and
  // GCC deletes such calls before it would inline them.
  MLA_KERNEL_INLINE static void prefetch(const void* p) { __builtin_prefetch(p); }
};

#include "mla/detail/isa/kernels.inl"

}  // namespace mla::detail::isa::avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // MLA_ISA_X86
