// The kernels of one instruction-set target, written once over `Ops` (the target's vector of
// floats and its operations, defined just before this file is included) and compiled once per
// target: each detail/isa/<target>.hpp includes this file inside its own namespace and, for the
// x86 targets, inside its instruction-set region. So every function here has one body per
// target and a distinct name per target. Nothing here names an instruction set. No include
// guard on purpose; everything it uses comes from kernels_prelude.hpp.

using V = Ops::V;
inline constexpr int kW = Ops::kWidth;

// ---------------------------------------------------------------------------------------------
// Elementary functions

/// e^x per lane for x <= 88 (larger x saturate at e^88), 0 for x < -87.33 (so exp(-inf) = 0
/// clears an empty softmax state), NaN for NaN. Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2,
/// e^r = 1 + r + r^2 P(r) with P of degree 5, times 2^n: within 2 ulp.
inline V exp(V x) {
  const V hi = Ops::set1(88.0f), lo = Ops::set1(-87.33654475f);
  // Clamp so that n stays in [-126, 127]; NaN passes both (it is never "less").
  const V xc = Ops::max(lo, Ops::select_less(hi, x, hi, x));
  // n = round(x / ln2) by the 1.5 * 2^23 trick (round to nearest even in the FPU's mode).
  const V magic = Ops::set1(12582912.0f);
  const V n = Ops::sub(Ops::fmadd(xc, Ops::set1(1.44269504088896341f), magic), magic);
  // r = x - n ln2, ln2 split in two so that n * C1 is exact.
  V r = Ops::fmadd(n, Ops::set1(-0.693359375f), xc);
  r = Ops::fmadd(n, Ops::set1(2.12194440e-4f), r);
  V p = Ops::set1(1.9875691500e-4f);
  p = Ops::fmadd(p, r, Ops::set1(1.3981999507e-3f));
  p = Ops::fmadd(p, r, Ops::set1(8.3334519073e-3f));
  p = Ops::fmadd(p, r, Ops::set1(4.1665795894e-2f));
  p = Ops::fmadd(p, r, Ops::set1(1.6666665459e-1f));
  p = Ops::fmadd(p, r, Ops::set1(5.0000001201e-1f));
  const V er = Ops::add(Ops::fmadd(p, Ops::mul(r, r), r), Ops::set1(1.0f));
  return Ops::select_less(x, lo, Ops::zero(), Ops::mul(er, Ops::exp2_int(n)));
}

/// dst[i] = exp(src[i]) for n values (the table's exp).
inline void exp_span(const float* src, std::size_t n, float* dst) {
  std::size_t i = 0;
  for (; i + kW <= n; i += kW) Ops::store(dst + i, exp(Ops::load(src + i)));
  if (i < n) {  // the tail through one padded vector
    float in[kW] = {}, out[kW];
    for (std::size_t j = i; j < n; ++j) in[j - i] = src[j];
    Ops::store(out, exp(Ops::load(in)));
    for (std::size_t j = i; j < n; ++j) dst[j] = out[j - i];
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions (element by element equal to the scalar codecs of fp8_codec.hpp / bfloat16.hpp)

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports -Wstringop-overflow for the vector body of these loops when they are inlined
// at a call site whose buffer is shorter than one vector; that path never runs for such n.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
template <class Format, bool kSaturate, bool kScaled>
inline void encode_span(const float* src, std::size_t n, std::uint8_t* dst, float scale) {
  // Branch-free per element, so the compiler vectorises it at this target's width.
  for (std::size_t i = 0; i < n; ++i) {
    const float x = kScaled ? src[i] / scale : src[i];
    dst[i] = encode_fp8<Format, kSaturate>(x);
  }
}
template <class Format>
inline void decode_span(const std::uint8_t* src, std::size_t n, float* dst, float scale) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = decode_fp8<Format>(src[i]) * scale;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <class Format>
inline void encode(const float* src, std::size_t n, std::uint8_t* dst, float scale, bool saturate) {
  if (scale == 1.0f) {
    saturate ? encode_span<Format, true, false>(src, n, dst, scale)
             : encode_span<Format, false, false>(src, n, dst, scale);
  } else {
    saturate ? encode_span<Format, true, true>(src, n, dst, scale)
             : encode_span<Format, false, true>(src, n, dst, scale);
  }
}
inline void encode_e4m3(const float* src, std::size_t n, std::uint8_t* dst, float scale,
                        bool saturate) {
  encode<E4M3FNFormat>(src, n, dst, scale, saturate);
}
inline void encode_e5m2(const float* src, std::size_t n, std::uint8_t* dst, float scale,
                        bool saturate) {
  encode<E5M2Format>(src, n, dst, scale, saturate);
}

inline void decode_e4m3(const std::uint8_t* src, std::size_t n, float* dst, float scale) {
  std::size_t i = 0;
  if (scale == 1.0f) {  // exact, and NaN codes keep the scalar decoder's bits
    for (; i + kW <= n; i += kW) Ops::store(dst + i, Ops::widen_e4m3(src + i));
  } else {
    const V s = Ops::set1(scale);
    for (; i + kW <= n; i += kW) Ops::store(dst + i, Ops::mul(Ops::widen_e4m3(src + i), s));
  }
  for (; i < n; ++i) {
    const float x = decode_fp8<E4M3FNFormat>(src[i]);
    dst[i] = scale == 1.0f ? x : x * scale;
  }
}
inline void decode_e5m2(const std::uint8_t* src, std::size_t n, float* dst, float scale) {
  if (scale == 1.0f) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = decode_fp8<E5M2Format>(src[i]);
  } else {
    decode_span<E5M2Format>(src, n, dst, scale);
  }
}

inline void widen_bf16(const unsigned char* src, std::size_t n, float* dst) {
  std::size_t i = 0;
  for (; i + kW <= n; i += kW) Ops::store(dst + i, Ops::widen_bf16(src + 2 * i));
  for (; i < n; ++i) dst[i] = bfloat16_bits_to_float(src + 2 * i);
}

/// One token's record as floats: out[0, d_c) = c, out[d_c, d_c + R) = k^R (exact for FP32,
/// BF16 and FP8 records; FP64 rounds to float once).
inline void widen_record(const LatentLayout& l, const unsigned char* rec, float* out) {
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  switch (l.storage) {
    case CacheStorage::kFloat32:
      std::memcpy(out, rec, sizeof(float) * static_cast<std::size_t>(D + R));
      break;
    case CacheStorage::kFloat64:
      for (Index i = 0; i < D + R; ++i) {
        double x;
        std::memcpy(&x, rec + sizeof(double) * static_cast<std::size_t>(i), sizeof(x));
        out[i] = static_cast<float>(x);
      }
      break;
    case CacheStorage::kBFloat16:
      widen_bf16(rec, static_cast<std::size_t>(D + R), out);
      break;
    case CacheStorage::kFp8E4M3:
      for (Index t = 0; t * LatentLayout::kFp8Tile < D; ++t) {
        float scale;
        std::memcpy(&scale, rec + l.scales_offset + sizeof(float) * static_cast<std::size_t>(t),
                    sizeof(scale));
        const Index first = t * LatentLayout::kFp8Tile;
        const Index len = std::min(LatentLayout::kFp8Tile, D - first);
        decode_e4m3(rec + first, static_cast<std::size_t>(len), out + first, scale);
      }
      widen_bf16(rec + l.kpe_offset, static_cast<std::size_t>(R), out + D);
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// The online softmax step

/// For `cols` independent softmax rows whose next n scores (already scaled) are the columns of
/// s [n][cols] (rows `stride` apart): updates each row's running maximum m[c] and sum l[c],
/// writes corr[c] = exp(m_old - m_new), the factor by which that row's accumulator must be
/// scaled, and replaces the scores by exp(s - m_new). The first step starts from m = -inf,
/// l = 0 (exp(-inf) = 0 clears them). A NaN score makes its row NaN. Vectorised over the
/// columns for float; one column at a time otherwise.
template <class T>
inline void online_softmax_step(T* s, Index n, Index cols, Index stride, T* m, T* l, T* corr) {
  Index c = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; c + kW <= cols; c += kW) {
      const V m_old = Ops::load(m + c);
      V m_new = m_old;
      for (Index j = 0; j < n; ++j) m_new = Ops::max(m_new, Ops::load(s + j * stride + c));
      const V cr = exp(Ops::sub(m_old, m_new));
      V sum = Ops::zero();
      for (Index j = 0; j < n; ++j) {
        const V p = exp(Ops::sub(Ops::load(s + j * stride + c), m_new));
        Ops::store(s + j * stride + c, p);
        sum = Ops::add(sum, p);
      }
      Ops::store(l + c, Ops::fmadd(Ops::load(l + c), cr, sum));
      Ops::store(m + c, m_new);
      Ops::store(corr + c, cr);
    }
  }
  for (; c < cols; ++c) {
    T m_new = m[c];
    for (Index j = 0; j < n; ++j) {
      const T x = s[j * stride + c];
      m_new = m_new > x ? m_new : x;
    }
    const T cr = std::exp(m[c] - m_new);
    T sum = 0;
    for (Index j = 0; j < n; ++j) {
      T& x = s[j * stride + c];
      x = std::exp(x - m_new);
      sum += x;
    }
    l[c] = l[c] * cr + sum;
    m[c] = m_new;
    corr[c] = cr;
  }
}

// ---------------------------------------------------------------------------------------------
// The absorbed decode step
//
// Scores and outputs are two small matrix products per tile of keys,
//   S[j, h] = <K_j, Q_h>          K_j = [c_j ; k^R_j] (d_c + R),  Q_h = sigma [q~_h ; q^pe_h]
//   O[h, d] += sum_j P[j, h] C[j, d]                              C_j = c_j (d_c)
// on register blocks that read every key tile once for all heads. Scores are vectorised over
// heads (a key value broadcast against vectors of heads) when a group has several head
// vectors, and along the key width (one transposing reduction per key) when it has one, as
// DeepSeek-V2-Lite's 16 heads do on AVX-512; outputs are vectorised along the latent, the
// softmax weights broadcast. Softmax is online per tile; the key range is split into parts
// (and the heads into groups) that threads work on independently and that are merged exactly by
// their log-sum-exp. FP32 records are read in place; BF16 and FP8 records are widened in
// registers as they are scored (one head vector) or into a small tile buffer that stays in cache.

namespace decode_kernel {

/// S[r][h] (+)= sum_{k0 <= k < k1} rows[r][k] * qt[k][h] for MR key rows and NR head vectors:
/// starts from 0 on the first chunk of k (k0 == 0), adds to S on later ones. Vectorised over
/// heads: a key value broadcast once serves NR vectors of heads.
template <int MR, int NR>
MLA_KERNEL_INLINE void score_block(const float* const* rows, Index k0, Index k1, const float* qt,
                                   Index qt_stride, float* s, Index s_stride) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v)
      acc[r][v] = k0 == 0 ? Ops::zero() : Ops::load(s + r * s_stride + v * kW);
  const float* row[MR];
  for (int r = 0; r < MR; ++r) row[r] = rows[r];
  for (Index k = k0; k < k1; ++k) {
    const float* q = qt + k * qt_stride;
    V b[NR];
    for (int v = 0; v < NR; ++v) b[v] = Ops::load(q + v * kW);
    for (int r = 0; r < MR; ++r) {
      const V a = Ops::set1(row[r][k]);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) Ops::store(s + r * s_stride + v * kW, acc[r][v]);
}

/// Register blocks of score_block: MR x NR accumulators, half the vector registers (16 of
/// AVX-512's 32, 8 of the narrower sets' 16), with NR at most 2 head vectors: measured fastest
/// for 128 heads, as two head vectors leave room for 8 key rows per block.
template <int NR>
inline constexpr int kRows = (kW == 16 ? 16 : 8) / NR;

/// Scores of n key rows against the head vectors [h, h + NR) of a group; returns h + NR.
template <int NR>
inline Index score_heads(const float* const* rows, Index n, Index width, const float* qt,
                         Index qt_stride, float* s, Index s_stride, Index h) {
  constexpr int MR = kRows<NR>;
  // Chunks of the key width whose slice of Q^T (KC x NR vectors, 24 KiB) stays in L1 while
  // every row group of the tile uses it.
  constexpr Index KC = 24576 / (NR * kW * static_cast<Index>(sizeof(float)));
  for (Index k0 = 0; k0 < width; k0 += KC) {
    const Index k1 = std::min(width, k0 + KC);
    Index r = 0;
    for (; r + MR <= n; r += MR) {
      score_block<MR, NR>(rows + r, k0, k1, qt + h * kW, qt_stride, s + r * s_stride + h * kW,
                          s_stride);
    }
    for (; r < n; ++r) {
      score_block<1, NR>(rows + r, k0, k1, qt + h * kW, qt_stride, s + r * s_stride + h * kW,
                         s_stride);
    }
  }
  return h + NR;
}

/// s[v] = sum_k row[k] q_v[k] for the kW heads of one vector: vectorised along the key width,
/// for groups of a single head vector, where broadcasting key values would cost a load for
/// every multiply. The partial sums are added across their lanes by one transposing reduction
/// per key. q holds the heads interleaved by vectors of the width, [ceil(width / kW)][kW
/// heads][kW], so that one pointer reaches all of them (with a runtime stride between heads the
/// address arithmetic costs half the speed). `ahead` is a row to prefetch.
MLA_KERNEL_INLINE void score_row(const float* row, Index width, const float* q, float* s,
                                 const float* ahead) {
  V acc[kW];
  for (int v = 0; v < kW; ++v) acc[v] = Ops::zero();
  Index k = 0;
  for (; k + kW <= width; k += kW, q += kW * kW) {
    Ops::prefetch(ahead + k);
    const V a = Ops::load(row + k);
    for (int v = 0; v < kW; ++v) acc[v] = Ops::fmadd(a, Ops::load(q + v * kW), acc[v]);
  }
  Ops::store(s, Ops::transpose_sum(acc));
  for (Index i = 0; k + i < width; ++i) {
    for (int v = 0; v < kW; ++v) s[v] += row[k + i] * q[v * kW + i];
  }
}

/// score_row for one BF16 or FP8 record, widened in registers as it is scored: the widened
/// [c ; k^R] is also stored at `row` for the output pass, so the record is read once and no
/// separate conversion pass runs. Needs d_c and R multiples of kW (checked by the caller).
/// `ahead` is a record to prefetch.
MLA_KERNEL_INLINE void score_record(const LatentLayout& l, const unsigned char* rec, const float* q,
                                    float* s, float* row, const unsigned char* ahead) {
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  for (std::size_t b = 0; b < l.token_bytes; b += 64) Ops::prefetch(ahead + b);
  V acc[kW];
  for (int v = 0; v < kW; ++v) acc[v] = Ops::zero();
  const auto step = [&](V a, Index k) {
    Ops::store(row + k, a);
    for (int v = 0; v < kW; ++v) acc[v] = Ops::fmadd(a, Ops::load(q + v * kW), acc[v]);
    q += kW * kW;
  };
  if (l.storage == CacheStorage::kFp8E4M3) {
    for (Index t = 0; t * LatentLayout::kFp8Tile < D; ++t) {
      // The tile's codes are exact values; one multiply by the tile's scale rounds once, as
      // float(code) * scale does.
      float scale;
      std::memcpy(&scale, rec + l.scales_offset + sizeof(float) * static_cast<std::size_t>(t),
                  sizeof(scale));
      const V mul = Ops::set1(scale);
      const Index end = std::min(D, (t + 1) * LatentLayout::kFp8Tile);
      for (Index k = t * LatentLayout::kFp8Tile; k < end; k += kW) {
        step(Ops::mul(Ops::widen_e4m3(rec + k), mul), k);
      }
    }
  } else {
    for (Index k = 0; k < D; k += kW)
      step(Ops::widen_bf16(rec + 2 * static_cast<std::size_t>(k)), k);
  }
  for (Index k = D; k < D + R; k += kW) {
    step(Ops::widen_bf16(rec + l.kpe_offset + 2 * static_cast<std::size_t>(k - D)), k);
  }
  Ops::store(s, Ops::transpose_sum(acc));
}

/// O[h][d0 + i] = corr[h] O[h][d0 + i] + sum_j p[j][h] rows[j][d0 + i] for MR heads and the
/// NR vectors of latent dimensions from d0: vectorised along the latent, so each key row is
/// read as vectors and its softmax weights are broadcast. p, o and corr point at the first
/// head of the block; o's rows (heads) are o_stride apart.
template <int MR, int NR>
MLA_KERNEL_INLINE void output_block(const float* const* rows, Index n, Index d0, const float* p,
                                    Index p_stride, float* o, Index o_stride, const float* corr) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    const V c = Ops::set1(corr[r]);
    for (int v = 0; v < NR; ++v) acc[r][v] = Ops::mul(Ops::load(o + r * o_stride + d0 + v * kW), c);
  }
  for (Index j = 0; j < n; ++j) {
    const float* cj = rows[j] + d0;
    V b[NR];
    for (int v = 0; v < NR; ++v) b[v] = Ops::load(cj + v * kW);
    const float* pj = p + j * p_stride;
    for (int r = 0; r < MR; ++r) {
      const V a = Ops::set1(pj[r]);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) Ops::store(o + r * o_stride + d0 + v * kW, acc[r][v]);
}

/// Heads per output block: 8 x 2 vectors (16 accumulators) at width 16, measured fastest for 16
/// and 128 heads; 4 x 2 on the narrower sets. Divides the SIMD width, so every group's width.
inline constexpr int kOutputHeads = kW == 16 ? 8 : 4;

/// O [hw][D] (rows o_stride apart) = corr O + P^T C for the heads [0, hw) of a group, hw a
/// multiple of the SIMD width.
inline void output_heads(const float* const* rows, Index n, Index D, const float* p, Index p_stride,
                         float* o, Index o_stride, const float* corr, Index hw) {
  constexpr int MR = kOutputHeads;
  for (Index h = 0; h < hw; h += MR) {
    const float* ph = p + h;
    const float* ch = corr + h;
    float* oh = o + h * o_stride;
    Index d = 0;
    for (; d + 2 * kW <= D; d += 2 * kW) {
      output_block<MR, 2>(rows, n, d, ph, p_stride, oh, o_stride, ch);
    }
    for (; d + kW <= D; d += kW) output_block<MR, 1>(rows, n, d, ph, p_stride, oh, o_stride, ch);
    for (; d < D; ++d) {  // latent widths that are not a multiple of the SIMD width
      for (int r = 0; r < MR; ++r) {
        float acc = oh[r * o_stride + d] * ch[r];
        for (Index j = 0; j < n; ++j) acc += rows[j][d] * ph[j * p_stride + r];
        oh[r * o_stride + d] = acc;
      }
    }
  }
}

/// The query rows of a call: token t's heads are rows [t * h_pad1, t * h_pad1 + H) (the rest of
/// its h_pad1 rows are zero padding), and it sees the first limit(t) keys.
struct Rows {
  Index heads, tokens, h_pad1, keys;
  Index token(Index row) const { return row / h_pad1; }
  Index limit(Index t) const { return keys - (tokens - 1 - t); }
  /// Calls f(r0, r1, keys_seen) for each token's part [r0, r1) of the rows [h0, h0 + hw) and
  /// the keys of [j0, j0 + n) it sees (0 .. n).
  template <class F>
  void for_each_segment(Index h0, Index hw, Index j0, Index n, F&& f) const {
    for (Index r = h0; r < h0 + hw;) {
      const Index t = token(r), end = std::min(h0 + hw, (t + 1) * h_pad1);
      f(r - h0, end - h0, std::clamp<Index>(limit(t) - j0, 0, n));
      r = end;
    }
  }
};

/// The query rows of `a` (kW-wide padding per token).
inline Rows rows_of(const DecodeArgs& a) {
  return {a.heads, a.tokens, (a.heads + kW - 1) / kW * kW, a.keys};
}

/// sigma * queries in the order the score kernels read them, padding rows zero: for groups of
/// one head vector [group][ceil(K / kW)][kW heads][kW] (score_row), otherwise Q^T [K][rows]
/// (score_heads).
inline void layout_queries(const DecodeArgs& a, const Rows& q, Index rows, bool by_row, Index k_pad,
                           float* qs) {
  const Index K = a.cache.layout.kv_lora_rank + a.cache.layout.rope_dim;
  for (Index k = 0; k < K; ++k) {
    for (Index r = 0; r < rows; ++r) {
      const Index t = q.token(r), h = r - t * q.h_pad1;
      const float x = h < q.heads ? a.scale * a.q[(t * q.heads + h) * a.q_stride + k] : 0.0f;
      qs[by_row ? (r / kW * k_pad + k / kW * kW + r % kW) * kW + k % kW : k * rows + r] = x;
    }
  }
}

/// Exact merge of the splits of every query row by their log-sum-exp: weights exp(m_s - M) / L
/// with L = sum_s l_s exp(m_s - M), written over partial_m; returns nothing, sets the lse.
inline void merge_weights(const DecodeArgs& a, const Rows& q, const decode::Geometry& geo) {
  decode::Buffers& ws = *a.buffers;
  const Index groups = geo.groups, h_group = geo.h_group;
  for (Index r = 0; r < geo.h_pad; ++r) {
    const Index t = q.token(r), h = r - t * q.h_pad1;
    if (h >= q.heads) continue;
    const Index g = r / h_group, hl = r % h_group;
    float mx = -std::numeric_limits<float>::infinity();
    for (Index s = 0; s < geo.splits; ++s) {
      mx = std::max(mx, ws.partial_m[static_cast<std::size_t>((s * groups + g) * h_group + hl)]);
    }
    double sum = 0;
    for (Index s = 0; s < geo.splits; ++s) {
      const auto i = static_cast<std::size_t>((s * groups + g) * h_group + hl);
      const float w = std::exp(ws.partial_m[i] - mx);
      ws.partial_m[i] = w;  // reused as the split's weight
      sum += static_cast<double>(w) * ws.partial_l[i];
    }
    const auto inv = static_cast<float>(1.0 / sum);
    for (Index s = 0; s < geo.splits; ++s) {
      ws.partial_m[static_cast<std::size_t>((s * groups + g) * h_group + hl)] *= inv;
    }
    a.lse[t * a.lse_stride + h] = mx + static_cast<float>(std::log(sum));
  }
}

/// Each query row's output: the splits' rows, weighted (the weights from merge_weights).
struct Merge {
  const DecodeArgs* a;
  const Rows* q;
  const decode::Geometry* geo;

  void operator()(Index task, int) const {
    const decode::Buffers& ws = *a->buffers;
    const Index D = a->cache.layout.kv_lora_rank;
    const Index groups = geo->groups, h_group = geo->h_group;
    const Index t = task / q->heads, h = task % q->heads, r = t * q->h_pad1 + h;
    const Index g = r / h_group, hl = r % h_group;
    float* out = a->out + task * a->out_stride;
    std::fill(out, out + D, 0.0f);
    for (Index s = 0; s < geo->splits; ++s) {
      const Index i = s * groups + g;
      const float wf = ws.partial_m[static_cast<std::size_t>(i * h_group + hl)];
      const V w = Ops::set1(wf);
      const float* part = ws.partial_o.data() + (i * h_group + hl) * D;
      Index d = 0;
      for (; d + kW <= D; d += kW) {
        Ops::store(out + d, Ops::fmadd(w, Ops::load(part + d), Ops::load(out + d)));
      }
      for (; d < D; ++d) out[d] += wf * part[d];
    }
  }
};

/// Runs `part` over every (split, group) item and merges: the frame shared by both precisions.
template <class Part>
void run_parts(const DecodeArgs& a, const Rows& q, const decode::Geometry& geo, const Part& part) {
  const Index items = geo.splits * geo.groups;
  if (a.pool) {
    mla::parallel_for(a.pool, items, part);
  } else {
    for (Index i = 0; i < items; ++i) part(i, 0);
  }
  merge_weights(a, q, geo);
  const Merge merge{&a, &q, &geo};
  const Index outputs = a.tokens * a.heads;
  if (a.pool) {
    mla::parallel_for(a.pool, outputs, merge);
  } else {
    for (Index i = 0; i < outputs; ++i) merge(i, 0);
  }
}

/// One (split, head group) part of a decode step: its keys' online softmax and outputs.
struct Part {
  const DecodeArgs* a;
  const Rows* q;
  const decode::Geometry* geo;
  Index split_keys, k_pad;
  const float* qs;
  bool by_row, in_place, widen_in_score;

  void operator()(Index item, int thread) const {
    const LatentBlocks& cache = a->cache;
    decode::Buffers& ws = *a->buffers;
    const Index D = cache.layout.kv_lora_rank, K = D + cache.layout.rope_dim;
    const Index groups = geo->groups, h_group = geo->h_group, h_pad = geo->h_pad;
    const Index s = item / groups, g = item % groups;
    const Index h0 = g * h_group;
    const Index hw = std::min(h_group, h_pad - h0);  // this group's width, a multiple of kW
    decode::Buffers::PerThread& t = ws.per_thread[static_cast<std::size_t>(thread)];
    float* o = ws.partial_o.data() + item * D * h_group;
    float* m = ws.partial_m.data() + item * h_group;
    float* l = ws.partial_l.data() + item * h_group;
    std::fill(o, o + D * h_group, 0.0f);
    std::fill(m, m + h_group, -std::numeric_limits<float>::infinity());
    std::fill(l, l + h_group, 0.0f);
    const Index tile = a->options.tile_tokens;
    const Index first = s * split_keys, last = std::min(a->keys, first + split_keys);
    float* sc = t.scores.data();
    float* corr = t.correction.data();
    const float** rows = t.rows.data();
    for (Index j0 = first; j0 < last; j0 += tile) {
      const Index n = std::min(tile, last - j0);
      // Rows in place also name the next tile's first few, for score_row to prefetch.
      const Index named = in_place ? std::min(n + decode::kAhead, last - j0) : n;
      if (in_place) {
        for (Index j = 0; j < named; ++j) {
          rows[j] = reinterpret_cast<const float*>(cache.record(j0 + j));
        }
      } else {
        for (Index j = 0; j < n; ++j) rows[j] = t.tile.data() + j * K;
      }
      // Scores of the tile for this group's rows: [n][hw], row stride h_group. Records that
      // are not read in place are widened into the tile as they are scored (widen_in_score),
      // or else before. Keys a query token must not see are scored too (they are the newest
      // keys of the newest tile) but never read.
      if (widen_in_score) {
        for (Index j = 0; j < n; ++j) {
          const unsigned char* ahead = cache.record(std::min(j0 + j + decode::kAhead, last - 1));
          score_record(cache.layout, cache.record(j0 + j), qs + h0 * k_pad, sc + j * kW,
                       t.tile.data() + j * K, ahead);
        }
      } else {
        if (!in_place) {
          for (Index j = 0; j < n; ++j) {
            widen_record(cache.layout, cache.record(j0 + j), t.tile.data() + j * K);
          }
        }
        if (by_row) {
          for (Index j = 0; j < n; ++j) {
            score_row(rows[j], K, qs + h0 * k_pad, sc + j * kW,
                      rows[std::min(j + decode::kAhead, named - 1)]);
          }
        } else {
          const float* qt = qs + h0;
          for (Index h = 0, hv = hw / kW; h < hv;) {
            h = hv - h >= 2 ? score_heads<2>(rows, n, K, qt, h_pad, sc, h_group, h)
                            : score_heads<1>(rows, n, K, qt, h_pad, sc, h_group, h);
          }
        }
      }
      // Per query token: online softmax over the keys it sees (vectorised over heads), then
      // O [rows][D] = corr O + P^T C over the same keys, never touching the others.
      q->for_each_segment(h0, hw, j0, n, [&](Index r0, Index r1, Index seen) {
        if (seen == 0) return;
        online_softmax_step(sc + r0, seen, r1 - r0, h_group, m + r0, l + r0, corr + r0);
        output_heads(rows, seen, D, sc + r0, h_group, o + r0 * D, D, corr + r0, r1 - r0);
      });
    }
  }
};

inline void run(const DecodeArgs& a) {
  const LatentBlocks& cache = a.cache;
  const Index D = cache.layout.kv_lora_rank, R = cache.layout.rope_dim, K = D + R;
  const int threads = mla::concurrency(a.pool);
  const Rows q = rows_of(a);
  const decode::Geometry geo(a.tokens * q.h_pad1, a.options, threads, kW);
  const Index tile = a.options.tile_tokens;
  // Split boundaries on whole tiles.
  const Index split_len = (a.keys + geo.splits - 1) / geo.splits;
  const Index split_keys = (split_len + tile - 1) / tile * tile;
  // Groups of one head vector take their scores along the key width (score_row); wider groups
  // broadcast key values against vectors of query rows (score_heads).
  const bool by_row = geo.h_group == kW;
  const Index k_pad = (K + kW - 1) / kW * kW;
  float* qs = a.buffers->q.data();
  layout_queries(a, q, geo.h_pad, by_row, k_pad, qs);
  const bool in_place = cache.layout.storage == CacheStorage::kFloat32;
  // Groups of one head vector over BF16 and FP8 caches widen records inside the score kernel.
  const bool widen_in_score = by_row && D % kW == 0 && R % kW == 0 &&
                              (cache.layout.storage == CacheStorage::kBFloat16 ||
                               cache.layout.storage == CacheStorage::kFp8E4M3);
  const Part part{&a, &q, &geo, split_keys, k_pad, qs, by_row, in_place, widen_in_score};
  run_parts(a, q, geo, part);
}

}  // namespace decode_kernel

inline void decode_absorbed(const DecodeArgs& a) { decode_kernel::run(a); }

#include "mla/detail/isa/attention.inl"
#include "mla/detail/isa/decode_bf16.inl"
#include "mla/detail/isa/gemm.inl"

// ---------------------------------------------------------------------------------------------
// The table

inline const Kernels& table() {
  static const Kernels k = [] {
    Kernels t;
    t.isa = Ops::kIsa;
    t.width = kW;
    t.encode_e4m3 = &encode_e4m3;
    t.encode_e5m2 = &encode_e5m2;
    t.decode_e4m3 = &decode_e4m3;
    t.decode_e5m2 = &decode_e5m2;
    t.widen_bf16 = &widen_bf16;
    t.exp = &exp_span;
    t.decode_absorbed = &decode_absorbed;
    t.decode_absorbed_bf16 = &decode_absorbed_bf16;
    t.gemm = &gemm;
    t.attention_tile = &attention_tile;
    return t;
  }();
  return k;
}
