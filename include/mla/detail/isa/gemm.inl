// The projections' matmul (GemmArgs): one thread's columns of y = x B for FP32, BF16 or
// block-FP8 weights, written once over a target's `Ops`. Included inside a target namespace
// (by kernels.inl, and by the AVX512-BF16 namespace for its dot products). No include guard on
// purpose.
//
// Few tokens (decode): the weights stream through once, row by row in memory order, each value
// widened in registers and multiplied into every token's accumulator (FMA; kBf16 and W8A8
// activations arrive already rounded to values BF16 holds, so the products are those of BF16
// dot products). More tokens: per panel of output columns and block of K, the weights are
// decoded once into a small panel (FP32, or BF16 pairs for dot products) and register tiles of
// tokens x columns run over it; the partial sums of each K block are scaled (FP8) and added.

namespace gemm_kernel {

using Layout = GemmArgs::Layout;
using Format = GemmArgs::Format;

inline constexpr int kNR = 2;                 // column vectors per register tile
inline constexpr Index kNP = kNR * kW;        // columns per panel
inline constexpr int kMR = kW == 16 ? 8 : 4;  // tokens per register tile
/// Most tokens for the streaming path.
inline constexpr Index kStreamTokens = 8;

/// Element i of a weight stored as F, unscaled, as float (exact).
template <Format F>
MLA_KERNEL_INLINE float weight_at(const void* w, std::size_t i) {
  if constexpr (F == Format::kF32) {
    return static_cast<const float*>(w)[i];
  } else if constexpr (F == Format::kBf16) {
    return bfloat16_bits_to_float(static_cast<const unsigned char*>(w) + 2 * i);
  } else {
    return decode_fp8<E4M3FNFormat>(static_cast<const std::uint8_t*>(w)[i]);
  }
}

/// kW consecutive elements of a weight stored as F from element i, unscaled (exact).
template <Format F>
MLA_KERNEL_INLINE V weight_vector_at(const void* w, std::size_t i) {
  if constexpr (F == Format::kF32) {
    return Ops::load(static_cast<const float*>(w) + i);
  } else if constexpr (F == Format::kBf16) {
    return Ops::widen_bf16(static_cast<const unsigned char*>(w) + 2 * i);
  } else {
    return Ops::widen_e4m3(static_cast<const unsigned char*>(w) + i);
  }
}

/// W's element (r, c), unscaled, as float (exact).
inline float weight(const GemmArgs& a, Index r, Index c) {
  const auto i = static_cast<std::size_t>(r * a.w_stride + c);
  switch (a.format) {
    case Format::kF32:
      return weight_at<Format::kF32>(a.w, i);
    case Format::kBf16:
      return weight_at<Format::kBf16>(a.w, i);
    case Format::kFp8:
      return weight_at<Format::kFp8>(a.w, i);
  }
  return 0.0f;
}

/// kW consecutive elements of W's row r from column c, unscaled (exact).
inline V weight_vector(const GemmArgs& a, Index r, Index c) {
  const auto i = static_cast<std::size_t>(r * a.w_stride + c);
  switch (a.format) {
    case Format::kF32:
      return weight_vector_at<Format::kF32>(a.w, i);
    case Format::kBf16:
      return weight_vector_at<Format::kBf16>(a.w, i);
    case Format::kFp8:
      return weight_vector_at<Format::kFp8>(a.w, i);
  }
  return Ops::zero();
}

/// B's element (k, n): W[row0 + n][k] (kTransposedRows) or W[row0 + k][n] (kRowSlice).
inline float b_value(const GemmArgs& a, Index k, Index n) {
  return a.layout == Layout::kTransposedRows ? weight(a, a.row0 + n, k) : weight(a, a.row0 + k, n);
}

/// The scale of B's element (k, n) (1 unless FP8).
inline float b_scale(const GemmArgs& a, Index k, Index n) {
  if (a.format != Format::kFp8) return 1.0f;
  const Index r = a.layout == Layout::kTransposedRows ? a.row0 + n : a.row0 + k;
  const Index c = a.layout == Layout::kTransposedRows ? k : n;
  return a.scales[(r / a.block_rows) * a.scale_stride + c / a.block_cols];
}

/// The K blocks: [k, next_k_block(a, k)) share one weight scale per column.
/// (Blocks longer than 256 are taken 256 at a time, each part scaled and added.)
inline Index next_k_block(const GemmArgs& a, Index k) {
  Index end = k + 256;
  if (a.format == Format::kFp8) {
    if (a.layout == Layout::kTransposedRows) {
      end = std::min(end, (k / a.block_cols + 1) * a.block_cols);
    } else {
      end = std::min(end, ((a.row0 + k) / a.block_rows + 1) * a.block_rows - a.row0);
    }
  }
  return std::min(end, a.K);
}

/// y[m][n] (+)= v for the columns [n, n + count) of one vector (count <= kW).
inline void store_y(const GemmArgs& a, Index m, Index n, Index count, V v, bool add) {
  float* y = a.y + m * a.y_stride + n;
  if (count == kW) {
    Ops::store(y, add ? Ops::add(Ops::load(y), v) : v);
    return;
  }
  float lanes[kW];
  Ops::store(lanes, v);
  for (Index i = 0; i < count; ++i) y[i] = add ? y[i] + lanes[i] : lanes[i];
}

// ------------------------------------------------------------------------------------------
// Few tokens: stream the weight rows

/// kTokens tokens against two weight rows at a time, vectorised along K; weights stored as F.
/// The K range goes block by block (FP8: the scale blocks; otherwise the whole row), each in
/// parts of at most 256 whose sums are scaled and added.
template <int kTokens, Format F>
void stream_rows(const GemmArgs& a) {
  constexpr int kRows = 2;
  constexpr bool kFp8 = F == Format::kFp8;
  const Index bk = kFp8 ? a.block_cols : a.K;
  for (Index n0 = a.n_begin; n0 < a.n_end; n0 += kRows) {
    const int rows = static_cast<int>(std::min<Index>(kRows, a.n_end - n0));
    // W's rows; a lone last row is read twice and kept once.
    const Index r[kRows] = {a.row0 + n0, a.row0 + n0 + rows - 1};
    const std::size_t row_at[kRows] = {static_cast<std::size_t>(r[0] * a.w_stride),
                                       static_cast<std::size_t>(r[1] * a.w_stride)};
    const float* scale_row[kRows] = {nullptr, nullptr};
    if constexpr (kFp8) {
      for (int i = 0; i < kRows; ++i)
        scale_row[i] = a.scales + (r[i] / a.block_rows) * a.scale_stride;
    }
    V total[kRows][kTokens];
    for (int i = 0; i < kRows; ++i)
      for (int m = 0; m < kTokens; ++m) total[i][m] = Ops::zero();
    for (Index kb = 0, kb0 = 0; kb0 < a.K; ++kb, kb0 += bk) {
      const Index kb1 = std::min(a.K, kb0 + bk);
      for (Index k0 = kb0; k0 < kb1; k0 += 256) {
        const Index k1 = std::min(kb1, k0 + 256);
        V part[kRows][kTokens], part_pair[kRows][kTokens];
        for (int i = 0; i < kRows; ++i) {
          for (int m = 0; m < kTokens; ++m) part[i][m] = part_pair[i][m] = Ops::zero();
        }
        Index k = k0;
        if constexpr (kFp8 && Ops::kWidenPair) {
          // Two vectors of codes per widening where the target does that with less work.
          for (; k + 2 * kW <= k1; k += 2 * kW) {
            V w[kRows][2];
            for (int i = 0; i < kRows; ++i) {
              Ops::widen_e4m3_pair(static_cast<const unsigned char*>(a.w) + row_at[i] + k, w[i][0],
                                   w[i][1]);
            }
            for (int m = 0; m < kTokens; ++m) {
              const V x0 = Ops::load(a.x + m * a.x_stride + k);
              const V x1 = Ops::load(a.x + m * a.x_stride + k + kW);
              for (int i = 0; i < kRows; ++i) {
                part_pair[i][m] = Ops::fmadd(x1, w[i][1], Ops::fmadd(x0, w[i][0], part_pair[i][m]));
              }
            }
          }
          // The pair route's values are the codes / kWidenPairScale (exact): scale back once.
          for (int i = 0; i < kRows; ++i) {
            for (int m = 0; m < kTokens; ++m) {
              part[i][m] = Ops::mul(part_pair[i][m], Ops::set1(Ops::kWidenPairScale));
            }
          }
        }
        for (; k + kW <= k1; k += kW) {
          V w[kRows];
          for (int i = 0; i < kRows; ++i) {
            w[i] = weight_vector_at<F>(a.w, row_at[i] + static_cast<std::size_t>(k));
          }
          for (int m = 0; m < kTokens; ++m) {
            const V xv = Ops::load(a.x + m * a.x_stride + k);
            for (int i = 0; i < kRows; ++i) part[i][m] = Ops::fmadd(xv, w[i], part[i][m]);
          }
        }
        if (k < k1) {  // ragged end, as a partial vector
          float wl[kRows][kW] = {}, xl[kTokens][kW] = {};
          for (Index j = k; j < k1; ++j) {
            for (int i = 0; i < kRows; ++i) {
              wl[i][j - k] = weight_at<F>(a.w, row_at[i] + static_cast<std::size_t>(j));
            }
            for (int m = 0; m < kTokens; ++m) xl[m][j - k] = a.x[m * a.x_stride + j];
          }
          for (int m = 0; m < kTokens; ++m) {
            for (int i = 0; i < kRows; ++i) {
              part[i][m] = Ops::fmadd(Ops::load(xl[m]), Ops::load(wl[i]), part[i][m]);
            }
          }
        }
        // FP32 promotion per block: scale the block's sums and add them.
        for (int i = 0; i < kRows; ++i) {
          const float sw = kFp8 ? scale_row[i][kb] : 1.0f;
          for (int m = 0; m < kTokens; ++m) {
            const float sx = a.x_scales ? a.x_scales[m * a.x_scale_stride + kb] : 1.0f;
            total[i][m] = Ops::fmadd(Ops::set1(sw * sx), part[i][m], total[i][m]);
          }
        }
      }
    }
    for (int i = 0; i < rows; ++i) {
      for (int m = 0; m < kTokens; ++m) {
        // Pairwise sum of the lanes, always in the same order.
        float lanes[kW];
        Ops::store(lanes, total[i][m]);
        for (int width = kW / 2; width >= 1; width /= 2) {
          for (int j = 0; j < width; ++j) lanes[j] += lanes[j + width];
        }
        float& y = a.y[m * a.y_stride + n0 + i];
        y = a.accumulate ? y + lanes[0] : lanes[0];
      }
    }
  }
}

template <int kTokens = 1>
void stream_dispatch(const GemmArgs& a) {
  if constexpr (kTokens < kStreamTokens) {
    if (a.M != kTokens) {
      stream_dispatch<kTokens + 1>(a);
      return;
    }
  }
  switch (a.format) {
    case Format::kF32:
      stream_rows<kTokens, Format::kF32>(a);
      break;
    case Format::kBf16:
      stream_rows<kTokens, Format::kBf16>(a);
      break;
    case Format::kFp8:
      stream_rows<kTokens, Format::kFp8>(a);
      break;
  }
}

// ------------------------------------------------------------------------------------------
// More tokens: decoded panels and register tiles

/// Panel [kl][kNP] of B (FP32) for columns [n0, n0 + np), zero beyond np.
inline void decode_panel(const GemmArgs& a, Index n0, Index np, Index k0, Index kl, float* p) {
  if (a.layout == Layout::kRowSlice && np == kNP) {
    for (Index kk = 0; kk < kl; ++kk) {
      for (int v = 0; v < kNR; ++v) {
        Ops::store(p + kk * kNP + v * kW, weight_vector(a, a.row0 + k0 + kk, n0 + v * kW));
      }
    }
    return;
  }
  for (Index kk = 0; kk < kl; ++kk) {
    for (Index j = 0; j < kNP; ++j) p[kk * kNP + j] = j < np ? b_value(a, k0 + kk, n0 + j) : 0.0f;
  }
}

/// Panel of BF16 pairs [ceil(kl / 2)][kNP] of B: word (kp, j) = (B[k0 + 2kp][j], B[k0 + 2kp +
/// 1][j]), exact for BF16 and FP8 weights, rounded for FP32; zero beyond np and past kl.
inline void decode_panel_pairs(const GemmArgs& a, Index n0, Index np, Index k0, Index kl,
                               std::uint32_t* p) {
  const auto bits = [&](Index k, Index n) -> std::uint16_t {
    if (k >= kl || n >= np) return 0;
    if (a.format == Format::kBf16) {
      const Index r = a.layout == Layout::kTransposedRows ? a.row0 + n0 + n : a.row0 + k0 + k;
      const Index c = a.layout == Layout::kTransposedRows ? k0 + k : n0 + n;
      std::uint16_t b;
      std::memcpy(&b, static_cast<const unsigned char*>(a.w) + 2 * (r * a.w_stride + c), 2);
      return b;
    }
    return bf16_bits(b_value(a, k0 + k, n0 + n));
  };
  const Index pairs = (kl + 1) / 2;
  for (Index kp = 0; kp < pairs; ++kp) {
    for (Index j = 0; j < kNP; ++j)
      p[kp * kNP + j] = bf16_pair(bits(2 * kp, j), bits(2 * kp + 1, j));
  }
}

/// acc[r][v] = sum over the block of x[m0 + r][k0 + kk] * panel[kk][v], FMA.
template <int MR, int NR>
MLA_KERNEL_INLINE void tile_fma(const GemmArgs& a, Index m0, Index k0, Index kl, const float* p,
                                V (&acc)[MR][NR]) {
  const float* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = a.x + (m0 + r) * a.x_stride + k0;
  for (Index kk = 0; kk < kl; ++kk) {
    V b[NR];
    for (int v = 0; v < NR; ++v) b[v] = Ops::load(p + kk * kNP + v * kW);
    for (int r = 0; r < MR; ++r) {
      const V xv = Ops::set1(x[r][kk]);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::fmadd(xv, b[v], acc[r][v]);
    }
  }
}

/// The same with BF16 dot products over pairs of K.
template <int MR, int NR>
MLA_KERNEL_INLINE void tile_dp(const GemmArgs& a, Index m0, Index k0, Index kl,
                               const std::uint32_t* p, V (&acc)[MR][NR]) {
  const std::uint16_t* x[MR];
  for (int r = 0; r < MR; ++r) x[r] = a.x16 + (m0 + r) * a.x16_stride + k0;
  const Index pairs = (kl + 1) / 2;
  for (Index kp = 0; kp < pairs; ++kp) {
    V b[NR];
    for (int v = 0; v < NR; ++v)
      b[v] = Ops::load(reinterpret_cast<const float*>(p + kp * kNP + v * kW));
    for (int r = 0; r < MR; ++r) {
      const V xv = Ops::bcast32(x[r] + 2 * kp);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::dp_bf16(acc[r][v], xv, b[v]);
    }
  }
}

/// One register tile of MR tokens x NR column vectors over one K block, scaled into y.
template <int MR, int NR>
MLA_KERNEL_INLINE void tile(const GemmArgs& a, Index m0, Index n0, Index np, Index k0, Index kl,
                            const float* panel, const V* col_scale, bool add) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) acc[r][v] = Ops::zero();
  if (a.dp) {
    tile_dp<MR, NR>(a, m0, k0, kl, reinterpret_cast<const std::uint32_t*>(panel), acc);
  } else {
    tile_fma<MR, NR>(a, m0, k0, kl, panel, acc);
  }
  for (int r = 0; r < MR; ++r) {
    const float sx =
        a.x_scales ? a.x_scales[(m0 + r) * a.x_scale_stride + k0 / a.block_cols] : 1.0f;
    for (int v = 0; v < NR; ++v) {
      const Index count = std::min<Index>(kW, np - v * kW);
      if (count <= 0) break;
      store_y(a, m0 + r, n0 + v * kW, count,
              Ops::mul(acc[r][v], Ops::mul(col_scale[v], Ops::set1(sx))), add);
    }
  }
}

template <int NR>
void tiles(const GemmArgs& a, Index n0, Index np, Index k0, Index kl, const float* panel,
           const V* col_scale, bool add) {
  Index m = 0;
  for (; m + kMR <= a.M; m += kMR) tile<kMR, NR>(a, m, n0, np, k0, kl, panel, col_scale, add);
  for (; m < a.M; ++m) tile<1, NR>(a, m, n0, np, k0, kl, panel, col_scale, add);
}

inline void panels(const GemmArgs& a) {
  float* panel = a.scratch;
  for (Index n0 = a.n_begin; n0 < a.n_end; n0 += kNP) {
    const Index np = std::min(kNP, a.n_end - n0);
    bool first = true;
    for (Index k0 = 0; k0 < a.K;) {
      const Index k1 = next_k_block(a, k0), kl = k1 - k0;
      if (a.dp) {
        decode_panel_pairs(a, n0, np, k0, kl, reinterpret_cast<std::uint32_t*>(panel));
      } else {
        decode_panel(a, n0, np, k0, kl, panel);
      }
      // Each column's weight scale for this block (per lane: blocks may be narrower than a
      // vector).
      V col_scale[kNR];
      for (int v = 0; v < kNR; ++v) {
        float s[kW];
        for (int i = 0; i < kW; ++i) {
          const Index n = n0 + v * kW + i;
          s[i] = n < a.n_end ? b_scale(a, k0, n) : 0.0f;
        }
        col_scale[v] = Ops::load(s);
      }
      const bool add = a.accumulate || !first;
      if (np > kW) {
        tiles<2>(a, n0, np, k0, kl, panel, col_scale, add);
      } else {
        tiles<1>(a, n0, np, k0, kl, panel, col_scale, add);
      }
      first = false;
      k0 = k1;
    }
  }
}

// ------------------------------------------------------------------------------------------
// More tokens, B = W^T: weight rows broadcast, tokens in the vector lanes

inline constexpr Index kRowsPanel = 64;     // weight rows per panel
inline constexpr Index kTokensBlock = 256;  // tokens per block of the panel's accumulators

/// Rows [n0, n0 + nr) of W (after row0) over the K block [k0, k0 + kl), unscaled, as FP32
/// [nr][kl].
inline void decode_rows(const GemmArgs& a, Index n0, Index nr, Index k0, Index kl, float* p) {
  for (Index r = 0; r < nr; ++r) {
    const Index row = a.row0 + n0 + r;
    float* dst = p + r * kl;
    Index k = 0;
    for (; k + kW <= kl; k += kW) Ops::store(dst + k, weight_vector(a, row, k0 + k));
    for (; k < kl; ++k) dst[k] = weight(a, row, k0 + k);
  }
}

/// The same as BF16 values [nr][kl rounded up to even] (exact for BF16 and FP8 weights, FP32
/// rounded), zero-padded.
inline void decode_rows_bf16(const GemmArgs& a, Index n0, Index nr, Index k0, Index kl,
                             std::uint16_t* p) {
  const Index kl_even = (kl + 1) / 2 * 2;
  for (Index r = 0; r < nr; ++r) {
    const Index row = a.row0 + n0 + r;
    std::uint16_t* dst = p + r * kl_even;
    Index k = 0;
    if (a.format == Format::kBf16) {
      std::memcpy(dst, static_cast<const unsigned char*>(a.w) + 2 * (row * a.w_stride + k0),
                  2 * static_cast<std::size_t>(kl));
      k = kl;
    } else if (a.format == Format::kFp8) {
      for (; k + kW <= kl; k += kW) Ops::store_bf16_exact(dst + k, weight_vector(a, row, k0 + k));
    } else {
      for (; k + kW <= kl; k += kW) Ops::store_bf16(dst + k, weight_vector(a, row, k0 + k));
    }
    for (; k < kl; ++k) dst[k] = bit_cast<std::uint16_t>(to_bfloat16(weight(a, row, k0 + k)));
    if (kl_even != kl) dst[kl] = 0;
  }
}

/// acc_buf[r0 + r][m0 - mb0 + lanes] += (sum over the block of W[r][k] x[m][k]) * scale[r]
/// (* the token's W8A8 scale), MR weight rows x NR token vectors.
template <int MR, int NR>
MLA_KERNEL_INLINE void rows_tile(const GemmArgs& a, const float* panel, Index kl, Index r0,
                                 Index k0, Index m0, float* acc, Index acc_stride,
                                 const float* scale, const float* sx) {
  V s[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) s[r][v] = Ops::zero();
  if (a.dp) {
    const Index kl_even = (kl + 1) / 2 * 2;
    const auto* p16 = reinterpret_cast<const std::uint16_t*>(panel);
    const std::uint32_t* xt = a.xt_pairs + (k0 / 2) * a.xt_stride + m0;
    for (Index kp = 0; kp < kl_even / 2; ++kp) {
      V b[NR];
      for (int v = 0; v < NR; ++v) {
        b[v] = Ops::load(reinterpret_cast<const float*>(xt + kp * a.xt_stride + v * kW));
      }
      for (int r = 0; r < MR; ++r) {
        const V w = Ops::bcast32(p16 + (r0 + r) * kl_even + 2 * kp);
        for (int v = 0; v < NR; ++v) s[r][v] = Ops::dp_bf16(s[r][v], w, b[v]);
      }
    }
  } else {
    const float* xt = a.xt + k0 * a.xt_stride + m0;
    for (Index kk = 0; kk < kl; ++kk) {
      V b[NR];
      for (int v = 0; v < NR; ++v) b[v] = Ops::load(xt + kk * a.xt_stride + v * kW);
      for (int r = 0; r < MR; ++r) {
        const V w = Ops::set1(panel[(r0 + r) * kl + kk]);
        for (int v = 0; v < NR; ++v) s[r][v] = Ops::fmadd(w, b[v], s[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    const V f = Ops::set1(scale[r0 + r]);
    for (int v = 0; v < NR; ++v) {
      float* dst = acc + (r0 + r) * acc_stride + v * kW;
      const V fv = sx ? Ops::mul(f, Ops::load(sx + m0 + v * kW)) : f;
      Ops::store(dst, Ops::fmadd(s[r][v], fv, Ops::load(dst)));
    }
  }
}

template <int MR>
void rows_tiles(const GemmArgs& a, const float* panel, Index kl, Index r0, Index k0, Index mb0,
                Index mb, float* acc, const float* scale, const float* sx) {
  Index m = 0;
  for (; m + 2 * kW <= mb; m += 2 * kW) {
    rows_tile<MR, 2>(a, panel, kl, r0, k0, mb0 + m, acc + m, kTokensBlock, scale, sx);
  }
  for (; m < mb; m += kW) {
    rows_tile<MR, 1>(a, panel, kl, r0, k0, mb0 + m, acc + m, kTokensBlock, scale, sx);
  }
}

/// The panel's accumulators [rows][kTokensBlock] for tokens [mb0, mb0 + mb) and output columns
/// [n0, n0 + nr), transposed into y [tokens][columns] (added when a.accumulate).
inline void store_rows_panel(const GemmArgs& a, const float* acc, Index mb0, Index mb, Index n0,
                             Index nr) {
  const Index m_end = std::min(a.M, mb0 + mb);
  for (Index m = mb0; m < m_end; ++m) {
    float* y = a.y + m * a.y_stride + n0;
    for (Index r = 0; r < nr; ++r) {
      const float v = acc[r * kTokensBlock + (m - mb0)];
      y[r] = a.accumulate ? y[r] + v : v;
    }
  }
}

inline void rows_panels(const GemmArgs& a) {
  constexpr int MR = kMR;
  float* panel = a.scratch;
  float* acc = a.scratch + kRowsPanel * 256;
  float scale[kRowsPanel];
  const Index m_pad = (a.M + kW - 1) / kW * kW;
  for (Index mb0 = 0; mb0 < m_pad; mb0 += kTokensBlock) {
    const Index mb = std::min(kTokensBlock, m_pad - mb0);
    for (Index n0 = a.n_begin; n0 < a.n_end; n0 += kRowsPanel) {
      const Index nr = std::min(kRowsPanel, a.n_end - n0);
      std::fill(acc, acc + kRowsPanel * kTokensBlock, 0.0f);
      for (Index k0 = 0; k0 < a.K;) {
        const Index k1 = next_k_block(a, k0), kl = k1 - k0;
        if (a.dp) {
          decode_rows_bf16(a, n0, nr, k0, kl, reinterpret_cast<std::uint16_t*>(panel));
        } else {
          decode_rows(a, n0, nr, k0, kl, panel);
        }
        for (Index r = 0; r < nr; ++r) scale[r] = b_scale(a, k0, n0 + r);
        const float* sx = a.xt_scales ? a.xt_scales + (k0 / a.block_cols) * a.xt_stride : nullptr;
        Index r0 = 0;
        for (; r0 + MR <= nr; r0 += MR) {
          rows_tiles<MR>(a, panel, kl, r0, k0, mb0, mb, acc, scale, sx);
        }
        for (; r0 < nr; ++r0) rows_tiles<1>(a, panel, kl, r0, k0, mb0, mb, acc, scale, sx);
        k0 = k1;
      }
      store_rows_panel(a, acc, mb0, mb, n0, nr);
    }
  }
}

}  // namespace gemm_kernel

inline void gemm(const GemmArgs& a) {
  if (a.n_begin >= a.n_end || a.M == 0) return;
  if (a.layout == GemmArgs::Layout::kRowSlice) {
    gemm_kernel::panels(a);
  } else if (a.M <= gemm_kernel::kStreamTokens) {
    gemm_kernel::stream_dispatch(a);
  } else {
    gemm_kernel::rows_panels(a);
  }
}
