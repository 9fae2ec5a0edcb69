#pragma once
/// \file
/// The block-scaled FP8 matmul behind Linear's FP8 storage: DeepSeek-V3's fp8_gemm emulated on
/// the CPU. Internal; users call mla::project.

#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>

#include "mla/fp8.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla::detail {

/// Scratch of the FP8 matmul, one per thread: it grows to the largest call seen and is then
/// reused, so repeated calls of the same shape do not allocate.
template <class T>
struct Fp8GemmScratch {
  std::vector<T> weights;      // a decoded panel [rows, block_cols], unscaled
  std::vector<T> partial;      // x_k-block W_panel^T [M, rows]
  std::vector<T> activations;  // W8A8: decoded e4m3(x / s) [M, K], unscaled
  std::vector<float> act_scales;
  std::vector<float8_e4m3fn> act_codes;
  std::vector<float> row;  // one row as float (for T = double)

  static Fp8GemmScratch& local() {
    thread_local Fp8GemmScratch s;
    return s;
  }
  template <class V>
  static auto* grow(std::vector<V>& v, Index n) {
    if (static_cast<Index>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
    return v.data();
  }
};

/// Up to this many tokens the matmul streams the weights row by row (GEMV-like); above, it
/// multiplies panels with GEMMs.
inline constexpr Index kFp8GemvTokens = 8;

/// Decodes n codes (unscaled) into T.
template <class T>
void decode_codes(const float8_e4m3fn* q, Index n, T* out, float* row) {
  if constexpr (std::is_same_v<T, float>) {
    (void)row;
    from_fp8(q, static_cast<std::size_t>(n), out);
  } else {
    from_fp8(q, static_cast<std::size_t>(n), row);
    for (Index i = 0; i < n; ++i) out[i] = static_cast<T>(row[i]);
  }
}

#if defined(__GNUC__) || defined(__clang__)
#define MLA_DETAIL_HAVE_VECTOR_EXTENSIONS 1

/// 16 lanes (one AVX-512 register of floats; split into narrower registers on other targets).
using F32x16 = float __attribute__((vector_size(64)));
using U32x16 = std::uint32_t __attribute__((vector_size(64)));

/// Zero-extends 16 bytes to 16 32-bit lanes. (GCC 12 lowers __builtin_convertvector for this
/// byte by byte, so the x86 widening instructions are named where the target has them.)
inline void widen16(const std::uint8_t* q, U32x16& out) {
#if defined(__AVX512F__)
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  std::memcpy(&out, &v, sizeof out);
#elif defined(__AVX2__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m256i lo = _mm256_cvtepu8_epi32(b);
  const __m256i hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
  std::memcpy(&out, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<unsigned char*>(&out) + sizeof lo, &hi, sizeof hi);
#else
  std::uint32_t lanes[16];
  for (int j = 0; j < 16; ++j) lanes[j] = q[j];
  std::memcpy(&out, lanes, sizeof out);
#endif
}

/// Decodes 16 E4M3FN codes to floats in registers: the same branch-free arithmetic as
/// decode_fp8, on 16 lanes (a subnormal code reads as exponent 1 minus 2^-6; 0x7F is NaN).
inline void decode16_e4m3(const std::uint8_t* q, F32x16& out) {
  U32x16 c;
  widen16(q, c);
  const U32x16 sign = (c & 0x80u) << 24;
  const U32x16 em = c & 0x7Fu;
  const auto subnormal = reinterpret_cast<U32x16>(em < 8u);  // all ones where exponent is 0
  const U32x16 fields = em | (subnormal & 8u);
  const auto minuend = reinterpret_cast<F32x16>((fields << 20) + (120u << 23));
  const auto subtrahend = reinterpret_cast<F32x16>(subnormal & (121u << 23));  // 2^-6
  U32x16 magnitude = reinterpret_cast<U32x16>(minuend - subtrahend);
  const auto nan = reinterpret_cast<U32x16>(em == 0x7Fu);
  magnitude = (nan & 0x7FF00000u) | (~nan & magnitude);
  out = reinterpret_cast<F32x16>(magnitude | sign);
}

/// The decode path for a few float tokens: each weight code is decoded once, in registers, and
/// multiplied into kTokens accumulators; the weights stream through memory once, in order.
/// Per K block every lane's partial sum is scaled (s_w, times s_x for W8A8) and added to the
/// lane's total, so the scales still apply after each block's products (FP32 promotion per
/// block, split over 16 lanes); the lanes are summed at the end of the row in a fixed order.
template <int kTokens>
void fp8_rows_float(const BlockFp8Matrix& w, const float* x, Index x_stride, const float* x_scales,
                    float* y, Index y_stride) {
  constexpr int L = 16;
  constexpr int kRows = 2;  // weight rows per pass: two independent decode-and-FMA streams
  const Index N = w.rows(), K = w.cols(), bn = w.block_rows(), bk = w.block_cols();
  const Index kblocks = w.col_blocks();
  const auto* codes = reinterpret_cast<const std::uint8_t*>(w.codes());
  for (Index n0 = 0; n0 < N; n0 += kRows) {
    const int rows = static_cast<int>(std::min<Index>(kRows, N - n0));
    // A lone last row reads row n0 twice and discards the copy.
    const std::uint8_t* q[kRows] = {codes + n0 * K, codes + (n0 + rows - 1) * K};
    F32x16 total[kRows][kTokens] = {};
    for (Index kb = 0; kb < kblocks; ++kb) {
      const Index k0 = kb * bk, k1 = std::min(K, k0 + bk);
      F32x16 part[kRows][kTokens] = {};
      Index k = k0;
      for (; k + L <= k1; k += L) {
        F32x16 wv[kRows];
        for (int r = 0; r < kRows; ++r) decode16_e4m3(q[r] + k, wv[r]);
        for (int m = 0; m < kTokens; ++m) {
          F32x16 xv;
          std::memcpy(&xv, x + m * x_stride + k, sizeof xv);
          for (int r = 0; r < kRows; ++r) part[r][m] += xv * wv[r];
        }
      }
      for (; k < k1; ++k) {  // ragged end of the block
        for (int r = 0; r < kRows; ++r) {
          const float wv = decode_fp8<E4M3FNFormat>(q[r][k]);
          for (int m = 0; m < kTokens; ++m) part[r][m][k % L] += x[m * x_stride + k] * wv;
        }
      }
      for (int r = 0; r < kRows; ++r) {
        const float sw = w.scale((n0 + r) / bn, kb);
        for (int m = 0; m < kTokens; ++m) {
          const float s = x_scales ? sw * x_scales[m * kblocks + kb] : sw;
          total[r][m] += s * part[r][m];
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      for (int m = 0; m < kTokens; ++m) {
        // Pairwise sum of the lanes, always in the same order.
        float lanes[L];
        std::memcpy(lanes, &total[r][m], sizeof lanes);
        for (int width = L / 2; width >= 1; width /= 2) {
          for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
        }
        y[m * y_stride + n0 + r] = lanes[0];
      }
    }
  }
}

/// Calls fp8_rows_float<tokens> for a runtime tokens in [1, kFp8GemvTokens].
template <int kTokens = 1>
void fp8_rows_float_dispatch(Index tokens, const BlockFp8Matrix& w, const float* x, Index x_stride,
                             const float* x_scales, float* y, Index y_stride) {
  if constexpr (kTokens < kFp8GemvTokens) {
    if (tokens != kTokens) {
      fp8_rows_float_dispatch<kTokens + 1>(tokens, w, x, x_stride, x_scales, y, y_stride);
      return;
    }
  }
  fp8_rows_float<kTokens>(w, x, x_stride, x_scales, y, y_stride);
}
#endif

/// y = x W^T with W [N, K] in block FP8, x [M, K], y [M, N], as DeepSeek's fp8_gemm computes
/// it: for every 128-wide K block the products of the block are summed in the compute type
/// and only then scaled and added, acc += p * s_w (W8A32) or acc += p * s_x * s_w (W8A8, with
/// x quantised per token per block_cols channels). Products of two e4m3 values are exact in
/// FP32, so W8A8's inner sums see no rounding but the accumulation's. Weight tiles are decoded
/// as they are used; the full matrix is never dequantised.
template <class T>
void fp8_block_gemm(ConstMatrixRef<T> x, const BlockFp8Matrix& w, bool quantize_x,
                    ScaleFormat x_scales, MatrixRef<T> y) {
  using RowMap = Eigen::Map<RowMatrix<T>>;
  using ConstRowMap = Eigen::Map<const RowMatrix<T>>;
  const Index M = x.rows(), K = x.cols(), N = w.rows();
  const Index bn = w.block_rows(), bk = w.block_cols(), kblocks = w.col_blocks();
  Fp8GemmScratch<T>& s = Fp8GemmScratch<T>::local();
  float* row = Fp8GemmScratch<T>::grow(s.row, std::max(K, bk));
  y.setZero();
  if (M == 0 || N == 0) return;

  // W8A8: the activations become e4m3 codes with one scale per token per K block; the matmul
  // multiplies the decoded codes (exact small dyadic numbers) and applies the scales after
  // each block's sum.
  const T* x_src = nullptr;
  Index x_stride = 0;
  float* x_scales_ptr = nullptr;
  if (quantize_x) {
    T* xd = Fp8GemmScratch<T>::grow(s.activations, M * K);
    float8_e4m3fn* codes = Fp8GemmScratch<T>::grow(s.act_codes, K);
    x_scales_ptr = Fp8GemmScratch<T>::grow(s.act_scales, M * kblocks);
    for (Index m = 0; m < M; ++m) {
      const float* xr = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        xr = x.row(m).data();
      } else {
        for (Index k = 0; k < K; ++k) row[k] = static_cast<float>(x(m, k));
        xr = row;
      }
      quantize_e4m3_tiles(xr, K, bk, kActivationAmaxFloor, x_scales, codes,
                          x_scales_ptr + m * kblocks);
      decode_codes(codes, K, xd + m * K, row);
    }
    x_src = xd;
    x_stride = K;
  }

  const auto x_block = [&](Index m, Index k0, Index kl) {
    return Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(
        quantize_x ? x_src + m * x_stride + k0 : x.row(m).data() + k0, kl);
  };

  // A few tokens (decode): the weights dominate, so read them once, row by row and in memory
  // order. Each row is decoded into a per-thread buffer; every K block's dot product is then
  // scaled and added, as below.
  if (M <= kFp8GemvTokens) {
#ifdef MLA_DETAIL_HAVE_VECTOR_EXTENSIONS
    if constexpr (std::is_same_v<T, float>) {
      fp8_rows_float_dispatch(M, w, quantize_x ? x_src : x.data(),
                              quantize_x ? x_stride : x.outerStride(), x_scales_ptr, y.data(),
                              y.outerStride());
      return;
    }
#endif
    T* wrow = Fp8GemmScratch<T>::grow(s.weights, K);
    for (Index n = 0; n < N; ++n) {
      decode_codes(w.codes() + n * K, K, wrow, row);
      for (Index kb = 0; kb < kblocks; ++kb) {
        const Index k0 = kb * bk, kl = std::min(bk, K - k0);
        const T sw = static_cast<T>(w.scale(n / bn, kb));
        const Eigen::Map<const Eigen::Matrix<T, Eigen::Dynamic, 1>> wk(wrow + k0, kl);
        for (Index m = 0; m < M; ++m) {
          const T p = x_block(m, k0, kl).dot(wk);  // the block's products, summed in T
          const T sx = quantize_x ? static_cast<T>(x_scales_ptr[m * kblocks + kb]) : T(1);
          y(m, n) += (sx * sw) * p;
        }
      }
    }
    return;
  }

  // More tokens (prefill): panels of about 1024 weight rows, one GEMM per K block.
  const Index panel = std::max<Index>(1, 1024 / bn) * bn;
  T* wbuf = Fp8GemmScratch<T>::grow(s.weights, std::min(panel, N) * bk);
  T* pbuf = Fp8GemmScratch<T>::grow(s.partial, M * std::min(panel, N));
  for (Index n0 = 0; n0 < N; n0 += panel) {
    const Index np = std::min(panel, N - n0);
    for (Index kb = 0; kb < kblocks; ++kb) {
      const Index k0 = kb * bk, kl = std::min(bk, K - k0);
      // Decode this K block of the panel's weight rows, unscaled.
      for (Index r = 0; r < np; ++r)
        decode_codes(w.codes() + (n0 + r) * K + k0, kl, wbuf + r * kl, row);
      const ConstRowMap wt(wbuf, np, kl);
      RowMap p(pbuf, M, np);
      // The block's products, summed in T: p = x[:, k block] W_panel[:, k block]^T.
      if (quantize_x) {
        const Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>> xs(
            x_src + k0, M, kl, Eigen::OuterStride<>(x_stride));
        p.noalias() = xs * wt.transpose();
      } else {
        p.noalias() = x.middleCols(k0, kl) * wt.transpose();
      }
      // FP32 promotion: scale the block sums and add them to the accumulators.
      for (Index c0 = 0; c0 < np; c0 += bn) {
        const Index cl = std::min(bn, np - c0);
        const T sw = static_cast<T>(w.scale((n0 + c0) / bn, kb));
        auto acc = y.middleCols(n0 + c0, cl);
        if (quantize_x) {
          for (Index m = 0; m < M; ++m) {
            const T sx = static_cast<T>(x_scales_ptr[m * kblocks + kb]);
            acc.row(m) += (sx * sw) * p.row(m).segment(c0, cl);
          }
        } else {
          acc += sw * p.middleCols(c0, cl);
        }
      }
    }
  }
}

}  // namespace mla::detail
