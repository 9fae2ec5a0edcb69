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
};

#if defined(__AVX512F__)
using Native = Avx512;
#elif defined(__AVX2__) && defined(__FMA__)
using Native = Avx2;
#else
using Native = Portable;
#endif

}  // namespace mla::simd
