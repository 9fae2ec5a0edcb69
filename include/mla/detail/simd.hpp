#pragma once
/// \file
/// The few SIMD operations the decode kernels need, for each instruction set the compile target
/// offers: AVX-512, AVX2 + FMA, and a portable vector of GCC/Clang's vector extensions that the
/// compiler maps onto whatever the target has. `simd::Native` is the widest one the target
/// supports; the narrower ones stay available (tests run all of them).

#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace mla::simd {

#if defined(__AVX512F__)
/// 16 floats in a zmm register.
struct Avx512 {
  static constexpr int kWidth = 16;
  static constexpr const char* kName = "avx512";
  using V = __m512;
  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
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
};
#endif

#if defined(__AVX2__) && defined(__FMA__)
/// 8 floats in a ymm register.
struct Avx2 {
  static constexpr int kWidth = 8;
  static constexpr const char* kName = "avx2";
  using V = __m256;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
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
};
#endif

/// 4 floats as a GCC/Clang vector: SSE, NEON or scalar code, whatever the target has.
struct Portable {
  static constexpr int kWidth = 4;
  static constexpr const char* kName = "portable";
  typedef float V __attribute__((vector_size(16)));
  static V zero() { return V{0.0f, 0.0f, 0.0f, 0.0f}; }
  static V set1(float x) { return V{x, x, x, x}; }
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(v)); }
  static V fmadd(V a, V b, V c) { return a * b + c; }
  static V mul(V a, V b) { return a * b; }
  /// Lane i of the result is the sum of the lanes of a[i], for 4 vectors a[0..3].
  static V transpose_sum(const V* a) {
    V r;
    for (int i = 0; i < 4; ++i) r[i] = (a[i][0] + a[i][2]) + (a[i][1] + a[i][3]);
    return r;
  }
};

#if defined(__AVX512F__)
using Native = Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using Native = Avx2;
#else
using Native = Portable;
#endif

}  // namespace mla::simd
