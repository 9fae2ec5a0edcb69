#pragma once
/// \file
/// The block-scaled FP8 matmul of Linear's FP8 storage in compute types other than float
/// (double: the reference route, with Eigen): DeepSeek-V3's fp8_gemm emulated on the CPU. Float
/// projections run on the kernels of detail/isa/ (gemm.inl). Internal; users call mla::project.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mla/fp8.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla::detail {

/// Scratch of the FP8 matmul (the reference route): it grows to the largest call seen and is
/// then reused, so repeated calls of the same shape do not allocate. The caller owns it (a
/// projection workspace); the library keeps no hidden per-thread state.
template <class T>
struct Fp8GemmScratch {
  std::vector<T> weights;      // a decoded panel [rows, block_cols], unscaled
  std::vector<T> partial;      // x_k-block W_panel^T [M, rows]
  std::vector<T> activations;  // W8A8: decoded e4m3(x / s) [M, K], unscaled
  std::vector<float> act_scales;
  std::vector<float8_e4m3fn> act_codes;
  std::vector<float> row;  // one row as float (for T = double)

  template <class V>
  static auto* grow(std::vector<V>& v, Index n) {
    mla::detail::grow(v, n);
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

/// y = x W^T with W [N, K] in block FP8, x [M, K], y [M, N], as DeepSeek's fp8_gemm computes
/// it: for every 128-wide K block the products of the block are summed in the compute type
/// and only then scaled and added, acc += p * s_w (W8A32) or acc += p * s_x * s_w (W8A8, with
/// x quantised per token per block_cols channels). Products of two e4m3 values are exact in
/// FP32, so W8A8's inner sums see no rounding but the accumulation's. Weight tiles are decoded
/// as they are used; the full matrix is never dequantised.
template <class T>
void fp8_block_gemm(ConstMatrixRef<T> x, const BlockFp8Matrix& w, bool quantize_x,
                    ScaleFormat x_scales, MatrixRef<T> y, Fp8GemmScratch<T>& s) {
  using RowMap = Eigen::Map<RowMatrix<T>>;
  using ConstRowMap = Eigen::Map<const RowMatrix<T>>;
  const Index M = x.rows(), K = x.cols(), N = w.rows();
  const Index bn = w.block_rows(), bk = w.block_cols(), kblocks = w.col_blocks();
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
