// The expanded prefill attention (AttentionTileArgs): one head's causal attention of a block of
// query rows over one block of rebuilt keys and values, written once over a target's `Ops`.
// Included inside a target namespace (by kernels.inl, and by the AVX512-BF16 namespace for its
// dot products). No include guard on purpose.
//
// Per register block of query rows: the scores against every visible key (keys transposed
// once per call so that they sit in the vector lanes, a query value broadcast), one online
// softmax step per row (FP32), then the weighted values added to the rows' outputs (value
// columns in the lanes, a weight broadcast), the outputs rescaled on the way. The keys a row
// does not see yet are never multiplied: their scores are computed with the block's and then
// ignored, their values are skipped row by row.
//
// kBf16 (attention_tile_bf16): the queries times the scale, the keys, the values and the
// softmax weights are rounded to BF16 once, and both products run as BF16 dot products over
// pairs (two consecutive query dimensions; two consecutive keys), in FP32 sums.

namespace attention_kernel {

inline constexpr int kMR = kW == 16 ? 8 : 4;  // query rows per register block
inline constexpr int kNR = 2;                 // vectors per register block
inline constexpr Index kKeyStep = kNR * kW;   // keys per score tile

/// Keys rounded up to whole score tiles (the transposed keys' row length).
inline Index padded_keys(Index keys) { return (keys + kKeyStep - 1) / kKeyStep * kKeyStep; }

/// The keys visible to query row i: min(keys, visible0 + i).
inline Index visible(const AttentionTileArgs& a, Index i) {
  return std::min(a.keys, a.visible0 + i);
}

/// kt [P + R][kp] = the keys transposed, zero past `keys`.
inline void transpose_keys(const AttentionTileArgs& a, Index kp, float* kt) {
  const Index QK = a.P + a.R;
  for (Index d = 0; d < QK; ++d) std::fill(kt + d * kp + a.keys, kt + (d + 1) * kp, 0.0f);
  for (Index j = 0; j < a.keys; ++j) {
    const float* k = a.k + j * a.k_stride;
    for (Index d = 0; d < a.P; ++d) kt[d * kp + j] = k[d];
    const float* r = a.kpe + j * a.kpe_stride;
    for (Index d = 0; d < a.R; ++d) kt[(a.P + d) * kp + j] = r[d];
  }
}

/// The first n lanes of p, the others `fill`.
inline V load_prefix(const float* p, Index n, float fill) {
  if (n >= kW) return Ops::load(p);
  float lanes[kW];
  for (Index i = 0; i < kW; ++i) lanes[i] = i < n ? p[i] : fill;
  return Ops::load(lanes);
}

inline float lane_max(V v) {
  float lanes[kW];
  Ops::store(lanes, v);
  float r = lanes[0];
  for (int i = 1; i < kW; ++i) r = r > lanes[i] ? r : lanes[i];
  return r;
}

inline float lane_sum(V v) {
  float lanes[kW];
  Ops::store(lanes, v);
  float r = 0.0f;
  for (int i = 0; i < kW; ++i) r += lanes[i];
  return r;
}

/// One online softmax step over the row's first n scores s (n >= 1): updates the running
/// maximum and sum, replaces s[0, n) by exp(s - m_new) and zeroes s up to the next whole score
/// tile, and returns exp(m_old - m_new), the factor for the row's output. A NaN score makes the
/// row's sum and output NaN (through exp(NaN)).
inline float softmax_row(float* s, Index n, float& m, float& l) {
  const float inf = std::numeric_limits<float>::infinity();
  V mv = Ops::set1(m);
  for (Index j = 0; j < n; j += kW) mv = Ops::max(load_prefix(s + j, n - j, -inf), mv);
  const float m_new = lane_max(mv);
  const V mn = Ops::set1(m_new);
  V sum = Ops::zero();
  Index j = 0;
  for (; j + kW <= n; j += kW) {
    const V p = exp(Ops::sub(Ops::load(s + j), mn));
    Ops::store(s + j, p);
    sum = Ops::add(sum, p);
  }
  if (j < n) {
    V p = exp(Ops::sub(load_prefix(s + j, n - j, -inf), mn));  // exp(-inf) = 0
    float lanes[kW];
    Ops::store(lanes, p);
    for (Index i = n - j; i < kW; ++i) lanes[i] = 0.0f;  // also when m_new is -inf or NaN
    p = Ops::load(lanes);
    Ops::store(s + j, p);
    sum = Ops::add(sum, p);
    j += kW;
  }
  for (; j < padded_keys(n); ++j) s[j] = 0.0f;
  float lanes[kW];
  Ops::store(lanes, exp(Ops::set1(m - m_new)));
  const float corr = lanes[0];
  l = l * corr + lane_sum(sum);
  m = m_new;
  return corr;
}

// ------------------------------------------------------------------------------------------
// FP32

/// s[r][0, keys) = <qs[r], key> for MR rows (qs [MR][QK], already scaled) and the first
/// `keys` keys (whole tiles) of kt.
template <int MR>
void scores(const float* qs, Index QK, const float* kt, Index kp, Index keys, float* s) {
  for (Index j0 = 0; j0 < keys; j0 += kKeyStep) {
    V acc[MR][kNR];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::zero();
    for (Index d = 0; d < QK; ++d) {
      V b[kNR];
      for (int v = 0; v < kNR; ++v) b[v] = Ops::load(kt + d * kp + j0 + v * kW);
      for (int r = 0; r < MR; ++r) {
        const V x = Ops::set1(qs[r * QK + d]);
        for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::fmadd(x, b[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNR; ++v) Ops::store(s + r * kp + j0 + v * kW, acc[r][v]);
  }
}

/// o[r] = corr[r] o[r] + sum_{j < vis[r]} p[r][j] v[j] for MR rows (vis ascending): the keys all
/// rows see in one register block, the rest row by row.
template <int MR>
void add_values(const AttentionTileArgs& a, float* const* o, const float* p, Index kp,
                const Index* vis, const float* corr) {
  const Index common = vis[0], last = vis[MR - 1];
  Index c0 = 0;
  for (; c0 + kNR * kW <= a.V; c0 += kNR * kW) {
    V acc[MR][kNR];
    for (int r = 0; r < MR; ++r) {
      const V f = Ops::set1(corr[r]);
      for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::mul(Ops::load(o[r] + c0 + v * kW), f);
    }
    for (Index j = 0; j < common; ++j) {
      const float* vj = a.v + j * a.v_stride + c0;
      V b[kNR];
      for (int v = 0; v < kNR; ++v) b[v] = Ops::load(vj + v * kW);
      for (int r = 0; r < MR; ++r) {
        const V w = Ops::set1(p[r * kp + j]);
        for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::fmadd(w, b[v], acc[r][v]);
      }
    }
    for (Index j = common; j < last; ++j) {
      const float* vj = a.v + j * a.v_stride + c0;
      V b[kNR];
      for (int v = 0; v < kNR; ++v) b[v] = Ops::load(vj + v * kW);
      for (int r = 0; r < MR; ++r) {
        if (j >= vis[r]) continue;
        const V w = Ops::set1(p[r * kp + j]);
        for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::fmadd(w, b[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNR; ++v) Ops::store(o[r] + c0 + v * kW, acc[r][v]);
  }
  for (; c0 < a.V; ++c0) {  // columns past the last whole register block
    for (int r = 0; r < MR; ++r) {
      float acc = o[r][c0] * corr[r];
      for (Index j = 0; j < vis[r]; ++j) acc += p[r * kp + j] * a.v[j * a.v_stride + c0];
      o[r][c0] = acc;
    }
  }
}

template <int MR>
void rows_fp32(const AttentionTileArgs& a, Index i0, const float* kt, Index kp, float* qs,
               float* s) {
  const Index QK = a.P + a.R;
  Index vis[MR];
  float corr[MR];
  float* o[MR];
  for (int r = 0; r < MR; ++r) {
    const float* q = a.q + (i0 + r) * a.q_stride;
    for (Index d = 0; d < QK; ++d) qs[r * QK + d] = q[d] * a.scale;
    vis[r] = visible(a, i0 + r);
    o[r] = a.o + (i0 + r) * a.o_stride;
  }
  scores<MR>(qs, QK, kt, kp, padded_keys(vis[MR - 1]), s);
  for (int r = 0; r < MR; ++r) {
    const Index i = i0 + r;
    corr[r] = softmax_row(s + r * kp, vis[r], a.m[i * a.ml_stride], a.l[i * a.ml_stride]);
  }
  add_values<MR>(a, o, s, kp, vis, corr);
}

inline void run_fp32(const AttentionTileArgs& a) {
  const Index QK = a.P + a.R, kp = padded_keys(a.keys);
  float* kt = a.scratch;
  float* s = kt + QK * kp;
  float* qs = s + kMR * kp;
  transpose_keys(a, kp, kt);
  Index i = 0;
  for (; i + kMR <= a.M; i += kMR) rows_fp32<kMR>(a, i, kt, kp, qs, s);
  for (; i < a.M; ++i) rows_fp32<1>(a, i, kt, kp, qs, s);
}

// ------------------------------------------------------------------------------------------
// BF16 dot products

/// s[r][0, keys) = <qs[r], key> over BF16 pairs: qs [MR][QK rounded up to even] BF16, kt2
/// [ceil(QK / 2)][kp] pairs of consecutive dimensions per key.
template <int MR>
void scores_bf16(const std::uint16_t* qs, Index QK2, const std::uint32_t* kt2, Index kp, Index keys,
                 float* s) {
  for (Index j0 = 0; j0 < keys; j0 += kKeyStep) {
    V acc[MR][kNR];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::zero();
    for (Index d = 0; d < QK2; ++d) {
      V b[kNR];
      for (int v = 0; v < kNR; ++v) {
        b[v] = Ops::load(reinterpret_cast<const float*>(kt2 + d * kp + j0 + v * kW));
      }
      for (int r = 0; r < MR; ++r) {
        const V x = Ops::bcast32(qs + r * 2 * QK2 + 2 * d);
        for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::dp_bf16(acc[r][v], x, b[v]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < kNR; ++v) Ops::store(s + r * kp + j0 + v * kW, acc[r][v]);
  }
}

/// The same as add_values over BF16 weights p16 [MR][kp] and value pairs vt2 [kp / 2][vp] (two
/// consecutive keys per word, vp columns, zero past V); the keys past the pairs every row sees
/// in full are added row by row from the values rounded to BF16, v16 [keys][vp].
template <int MR>
void add_values_bf16(const AttentionTileArgs& a, float* const* o, const std::uint16_t* p16,
                     Index kp, const std::uint32_t* vt2, const std::uint16_t* v16, Index vp,
                     const Index* vis, const float* corr) {
  const Index pairs = vis[0] / 2, last = vis[MR - 1];
  for (Index c0 = 0; c0 < a.V; c0 += kNR * kW) {
    const Index n = std::min<Index>(kNR * kW, a.V - c0);  // columns of this block
    V acc[MR][kNR];
    float lanes[kNR * kW];
    for (int r = 0; r < MR; ++r) {
      const V f = Ops::set1(corr[r]);
      const float* src = o[r] + c0;
      if (n < kNR * kW) {
        for (Index c = 0; c < kNR * kW; ++c) lanes[c] = c < n ? o[r][c0 + c] : 0.0f;
        src = lanes;
      }
      for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::mul(Ops::load(src + v * kW), f);
    }
    for (Index jp = 0; jp < pairs; ++jp) {
      V b[kNR];
      for (int v = 0; v < kNR; ++v) {
        b[v] = Ops::load(reinterpret_cast<const float*>(vt2 + jp * vp + c0 + v * kW));
      }
      for (int r = 0; r < MR; ++r) {
        const V w = Ops::bcast32(p16 + r * kp + 2 * jp);
        for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::dp_bf16(acc[r][v], w, b[v]);
      }
    }
    for (Index j = 2 * pairs; j < last; ++j) {
      V b[kNR];
      for (int v = 0; v < kNR; ++v) {
        b[v] = Ops::widen_bf16(reinterpret_cast<const unsigned char*>(v16 + j * vp + c0 + v * kW));
      }
      for (int r = 0; r < MR; ++r) {
        if (j >= vis[r]) continue;
        const V w = Ops::set1(
            bfloat16_bits_to_float(reinterpret_cast<const unsigned char*>(p16 + r * kp + j)));
        for (int v = 0; v < kNR; ++v) acc[r][v] = Ops::fmadd(w, b[v], acc[r][v]);
      }
    }
    for (int r = 0; r < MR; ++r) {
      if (n == kNR * kW) {
        for (int v = 0; v < kNR; ++v) Ops::store(o[r] + c0 + v * kW, acc[r][v]);
        continue;
      }
      for (int v = 0; v < kNR; ++v) Ops::store(lanes + v * kW, acc[r][v]);
      for (Index c = 0; c < n; ++c) o[r][c0 + c] = lanes[c];
    }
  }
}

template <int MR>
void rows_bf16(const AttentionTileArgs& a, Index i0, const std::uint32_t* kt2, Index kp,
               const std::uint32_t* vt2, const std::uint16_t* v16, Index vp, std::uint16_t* qs,
               float* s, std::uint16_t* p16) {
  const Index QK = a.P + a.R, QK2 = (QK + 1) / 2;
  Index vis[MR];
  float corr[MR];
  float* o[MR];
  for (int r = 0; r < MR; ++r) {
    const float* q = a.q + (i0 + r) * a.q_stride;
    std::uint16_t* dst = qs + r * 2 * QK2;
    for (Index d = 0; d < QK; ++d) dst[d] = bit_cast<std::uint16_t>(to_bfloat16(q[d] * a.scale));
    if (QK2 * 2 != QK) dst[QK] = 0;
    vis[r] = visible(a, i0 + r);
    o[r] = a.o + (i0 + r) * a.o_stride;
  }
  scores_bf16<MR>(qs, QK2, kt2, kp, padded_keys(vis[MR - 1]), s);
  for (int r = 0; r < MR; ++r) {
    const Index i = i0 + r;
    corr[r] = softmax_row(s + r * kp, vis[r], a.m[i * a.ml_stride], a.l[i * a.ml_stride]);
    // The weights as BF16 (zero past the row's visible keys, up to a whole tile).
    for (Index j = 0; j < padded_keys(vis[r]); j += kW) {
      Ops::store_bf16(p16 + r * kp + j, Ops::load(s + r * kp + j));
    }
  }
  add_values_bf16<MR>(a, o, p16, kp, vt2, v16, vp, vis, corr);
}

inline void run_bf16(const AttentionTileArgs& a) {
  const Index QK = a.P + a.R, QK2 = (QK + 1) / 2, kp = padded_keys(a.keys);
  const Index vp = (a.V + kNR * kW - 1) / (kNR * kW) * (kNR * kW);
  // Scratch: kt (FP32, then its pairs), s, the values' pairs and BF16 rows, qs, p16.
  float* kt = a.scratch;
  auto* kt2 = reinterpret_cast<std::uint32_t*>(kt + 2 * QK2 * kp);
  float* s = reinterpret_cast<float*>(kt2 + QK2 * kp);
  auto* vt2 = reinterpret_cast<std::uint32_t*>(s + kMR * kp);
  auto* v16 = reinterpret_cast<std::uint16_t*>(vt2 + (kp / 2) * vp);
  auto* qs = v16 + kp * vp;
  auto* p16 = qs + kMR * 2 * QK2;
  transpose_keys(a, kp, kt);
  if (QK2 * 2 != QK) std::fill(kt + QK * kp, kt + (QK + 1) * kp, 0.0f);
  for (Index d = 0; d < QK2; ++d) {
    for (Index j = 0; j < kp; j += kW) {
      const V pair =
          Ops::pack_bf16(Ops::load(kt + 2 * d * kp + j), Ops::load(kt + (2 * d + 1) * kp + j));
      Ops::store(reinterpret_cast<float*>(kt2 + d * kp + j), pair);
    }
  }
  // The values rounded to BF16, rows zero past V and past `keys`, and their pairs.
  for (Index j = 0; j < kp; ++j) {
    std::uint16_t* dst = v16 + j * vp;
    if (j >= a.keys) {
      std::fill(dst, dst + vp, std::uint16_t{0});
      continue;
    }
    const float* src = a.v + j * a.v_stride;
    for (Index c = 0; c < a.V; ++c) dst[c] = bit_cast<std::uint16_t>(to_bfloat16(src[c]));
    std::fill(dst + a.V, dst + vp, std::uint16_t{0});
  }
  for (Index jp = 0; jp < kp / 2; ++jp) {
    for (Index c = 0; c < vp; c += kW) {
      const V pair = Ops::interleave_bf16(v16 + 2 * jp * vp + c, v16 + (2 * jp + 1) * vp + c);
      Ops::store(reinterpret_cast<float*>(vt2 + jp * vp + c), pair);
    }
  }
  Index i = 0;
  for (; i + kMR <= a.M; i += kMR) rows_bf16<kMR>(a, i, kt2, kp, vt2, v16, vp, qs, s, p16);
  for (; i < a.M; ++i) rows_bf16<1>(a, i, kt2, kp, vt2, v16, vp, qs, s, p16);
}

}  // namespace attention_kernel

inline void attention_tile(const AttentionTileArgs& a) {
  if (a.M <= 0 || a.keys <= 0) return;
  if (a.bf16) {
    attention_kernel::run_bf16(a);
  } else {
    attention_kernel::run_fp32(a);
  }
}
