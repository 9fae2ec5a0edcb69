#pragma once
/// \file
/// The AVX-512 target: 16-float vectors (F, BW, DQ, VL). Compiled in every build on GCC/Clang
/// x86-64 (a function-target region, whatever -march the translation unit has); run only where
/// the CPU and the OS offer AVX-512 (detail/isa/cpu.hpp). Internal.

#include "mla/detail/isa/cpu.hpp"
#include "mla/detail/isa/kernels_prelude.hpp"

#if MLA_ISA_X86

#include "mla/detail/isa/intrinsics.hpp"

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
  // BF16 pairs: 32-bit lanes each holding two BF16 values, the low half first.

  /// acc + a.lo * b.lo + a.hi * b.hi per lane, on the FMA units (products of BF16 values are
  /// exact in float). The AVX512-BF16 namespace below replaces it by VDPBF16PS.
  static V dp_bf16(V acc, V a, V b) {
    const __m512i ai = _mm512_castps_si512(a), bi = _mm512_castps_si512(b);
    const __m512i high = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(ai, high)),
                          _mm512_castsi512_ps(_mm512_and_si512(bi, high)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(ai, 16)),
                           _mm512_castsi512_ps(_mm512_slli_epi32(bi, 16)), acc);
  }
  /// The 32-bit word at p in every lane.
  static V bcast32(const void* p) {
    std::int32_t w;
    std::memcpy(&w, p, sizeof(w));
    return _mm512_castsi512_ps(_mm512_set1_epi32(w));
  }
  /// Lane i = (lo[i], hi[i]).
  static V interleave_bf16(const std::uint16_t* lo, const std::uint16_t* hi) {
    const __m512i l =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
    const __m512i h =
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
    return _mm512_castsi512_ps(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
  }
  /// The lanes' bits rounded to BF16 in their high halves (nearest even; NaN stays NaN).
  static __m512i round_bf16(V v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x00400000)));
  }
  /// Lane i = (bf16(lo[i]), bf16(hi[i])), each rounded to nearest even.
  static V pack_bf16(V lo, V hi) {
    const __m512i l = _mm512_srli_epi32(round_bf16(lo), 16);
    const __m512i h =
        _mm512_and_si512(round_bf16(hi), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
    return _mm512_castsi512_ps(_mm512_or_si512(l, h));
  }
  /// The lanes of v, which BF16 holds exactly, stored as 16 BF16 values (their high halves).
  static void store_bf16_exact(std::uint16_t* dst, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
  }
  /// The lanes of v rounded to BF16 (nearest even; NaN stays NaN), stored as 16 values.
  static void store_bf16(std::uint16_t* dst, V v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_bf16(v), 16)));
  }
  /// 32 E4M3FN codes at p as their exact values divided by 2^8 (kWidenPairScale), codes 0..15
  /// in lo and 16..31 in hi: the route of widen_e4m3 on 32 lanes of 16 bits, half the integer
  /// work per code and without the multiply (the caller folds 2^8 into its scale).
  static constexpr bool kWidenPair = true;
  static constexpr float kWidenPairScale = 256.0f;
  static void widen_e4m3_pair(const unsigned char* p, V& lo, V& hi) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i t = _mm512_slli_epi16(w, 7);
    const __m512i bit14 = _mm512_set1_epi16(0x4000), em = _mm512_set1_epi16(0x3F80);
    __m512i h = _mm512_add_epi16(t, _mm512_and_si512(t, bit14));
    const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(t, em), em);
    h = _mm512_mask_add_epi16(h, nan, h, bit14);
    lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
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

// The avx512_bf16 target: the BF16 decode step and the projections' matmul once more, with
// VDPBF16PS (AVX512-BF16) for their BF16 dot products (Cooper Lake, Sapphire Rapids and later,
// Zen 4 and later).
#if defined(__clang__)
#pragma clang attribute push(                                                                \
    __attribute__((target("avx512bf16,avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi," \
                          "bmi2,lzcnt,popcnt"))),                                            \
    apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target( \
    "avx512bf16,avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

namespace mla::detail::isa::avx512_bf16 {

struct Ops : avx512::Ops {
  /// acc + a.lo * b.lo + a.hi * b.hi per lane in one instruction.
  static V dp_bf16(V acc, V a, V b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(a),
                            (__m512bh)_mm512_castps_si512(b));
  }
};
using V = Ops::V;
inline constexpr int kW = Ops::kWidth;
// The primitives and the FP32 decode policy of the AVX-512 kernels; the frame again, for the
// BF16 policy with VDPBF16PS.
using avx512::exp;
using avx512::online_softmax_step;
using avx512::widen_segment;
namespace decode_fma = avx512::decode_fma;

// In this order: each file uses the ones before it.
// clang-format off
#include "mla/detail/isa/decode_frame.inl"
#include "mla/detail/isa/decode_bf16.inl"
#include "mla/detail/isa/attention.inl"
#include "mla/detail/isa/gemm.inl"
// clang-format on

}  // namespace mla::detail::isa::avx512_bf16

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace mla::detail::isa::avx512_bf16 {

/// The avx512_bf16 target: the AVX-512 kernels with the BF16 decode step, the projections'
/// matmul and the expanded attention on VDPBF16PS.
inline const Kernels& table() {
  static const Kernels k = [] {
    Kernels t = avx512::table();
    t.isa = Isa::kAvx512Bf16;
    t.fast_dp_bf16 = true;
    t.decode_absorbed_bf16 = &decode_absorbed_bf16;
    t.gemm = &gemm;
    t.attention_tile = &attention_tile;
    return t;
  }();
  return k;
}

}  // namespace mla::detail::isa::avx512_bf16

#endif  // MLA_ISA_X86
