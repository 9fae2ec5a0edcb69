// The absorbed decode step in FP32 on FMA (Precision::kFp32): the block policy of the decode
// frame (decode_frame.inl) whose products are FMAs over FP32 queries, written once over `Ops`.
// Included inside a target namespace after decode_frame.inl. No include guard on purpose.
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

namespace decode_fma {

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
MLA_KERNEL_INLINE void score_record(const RecordSegments& segments, std::size_t record_bytes,
                                    const unsigned char* rec, const float* q, float* s, float* row,
                                    const unsigned char* ahead) {
  for (std::size_t b = 0; b < record_bytes; b += 64) Ops::prefetch(ahead + b);
  V acc[kW];
  for (int v = 0; v < kW; ++v) acc[v] = Ops::zero();
  for (const RecordSegment& seg : segments) {
    // The segment's fields in locals: the vector stores below may alias anything in memory.
    const unsigned char* src = rec + seg.offset;
    float* dst = row + seg.first;
    const Index count = seg.count;
    if (seg.element == Element::kE4M3) {
      // The codes are exact values; one multiply by the segment's scale rounds once, as
      // float(code) * scale does.
      const V mul = Ops::set1(seg.scale(rec));
      for (Index k = 0; k < count; k += kW, q += kW * kW) {
        const V a = Ops::mul(Ops::widen_e4m3(src + k), mul);
        Ops::store(dst + k, a);
        for (int v = 0; v < kW; ++v) acc[v] = Ops::fmadd(a, Ops::load(q + v * kW), acc[v]);
      }
    } else {  // BF16
      for (Index k = 0; k < count; k += kW, q += kW * kW) {
        const V a = Ops::widen_bf16(src + 2 * static_cast<std::size_t>(k));
        Ops::store(dst + k, a);
        for (int v = 0; v < kW; ++v) acc[v] = Ops::fmadd(a, Ops::load(q + v * kW), acc[v]);
      }
    }
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

/// sigma * queries in the order the score kernels read them, padding rows zero: for groups of
/// one head vector [group][ceil(K / kW)][kW heads][kW] (score_row), otherwise Q^T [K][rows]
/// (score_heads).
inline void layout_queries(const DecodeArgs& a, const decode_frame::Rows& q, Index rows,
                           bool by_row, Index k_pad, float* qs) {
  const Index K = a.cache.layout.kv_lora_rank + a.cache.layout.rope_dim;
  for (Index k = 0; k < K; ++k) {
    for (Index r = 0; r < rows; ++r) {
      const Index t = q.token(r), h = r - t * q.h_pad1;
      const float x = h < q.heads ? a.scale * a.q[(t * q.heads + h) * a.q_stride + k] : 0.0f;
      qs[by_row ? (r / kW * k_pad + k / kW * kW + r % kW) * kW + k % kW : k * rows + r] = x;
    }
  }
}

/// The FMA policy: FP32 records read in place, BF16 and FP8 records widened (in the score kernel
/// for groups of one head vector, into the thread's block buffer otherwise).
struct FmaPolicy {
  static constexpr bool kAccumulatesInOutput = true;
  RecordSegments segments;  // of the cache's records
  Index K, D, k_pad;
  const float* qs;
  bool by_row, in_place, widen_in_score;

  FmaPolicy(const DecodeArgs& a, const decode_frame::Rows& q, const decode::Geometry& geo) {
    const LatentLayout& l = a.cache.layout;
    segments = segments_of(l);
    D = l.kv_lora_rank;
    K = D + l.rope_dim;
    // Groups of one head vector take their scores along the key width (score_row); wider
    // groups broadcast key values against vectors of query rows (score_heads).
    by_row = geo.h_group == kW;
    k_pad = (K + kW - 1) / kW * kW;
    float* buf = a.buffers->q.data();
    layout_queries(a, q, geo.h_pad, by_row, k_pad, buf);
    qs = buf;
    in_place = l.storage == CacheStorage::kFloat32;
    // Groups of one head vector over BF16 and FP8 caches widen records inside the score kernel.
    widen_in_score = by_row && D % kW == 0 && l.rope_dim % kW == 0 &&
                     (l.storage == CacheStorage::kBFloat16 || l.storage == CacheStorage::kFp8E4M3);
  }

  struct Worker {
    const FmaPolicy& p;
    const decode_frame::Group& g;
    const float** rows;

    Worker(const FmaPolicy& policy, const decode_frame::Group& group)
        : p(policy), g(group), rows(group.t->rows.data()) {}

    MLA_KERNEL_NOINLINE void score(Index j0, Index n) {
      const LatentBlocks& cache = g.a->cache;
      float* tile = g.t->tile.data();
      float* sc = g.scores;
      // Rows in place also name the next block's first few, for score_row to prefetch.
      const Index named = p.in_place ? std::min(n + decode::kAhead, g.last - j0) : n;
      if (p.in_place) {
        for (Index j = 0; j < named; ++j) {
          rows[j] = reinterpret_cast<const float*>(cache.record(j0 + j));
        }
      } else {
        for (Index j = 0; j < n; ++j) rows[j] = tile + j * p.K;
      }
      // Scores [n][hw], row stride g.stride. Records not read in place are widened into the
      // block buffer as they are scored (widen_in_score), or else before.
      if (p.widen_in_score) {
        for (Index j = 0; j < n; ++j) {
          const unsigned char* ahead = cache.record(std::min(j0 + j + decode::kAhead, g.last - 1));
          score_record(p.segments, cache.layout.token_bytes, cache.record(j0 + j),
                       p.qs + g.h0 * p.k_pad, sc + j * kW, tile + j * p.K, ahead);
        }
        return;
      }
      if (!p.in_place) {
        for (Index j = 0; j < n; ++j)
          widen_record(p.segments, cache.record(j0 + j), tile + j * p.K);
      }
      if (p.by_row) {
        for (Index j = 0; j < n; ++j) {
          score_row(rows[j], p.K, p.qs + g.h0 * p.k_pad, sc + j * kW,
                    rows[std::min(j + decode::kAhead, named - 1)]);
        }
      } else {
        const float* qt = p.qs + g.h0;
        for (Index h = 0, hv = g.hw / kW; h < hv;) {
          h = hv - h >= 2 ? score_heads<2>(rows, n, p.K, qt, g.h_pad, sc, g.stride, h)
                          : score_heads<1>(rows, n, p.K, qt, g.h_pad, sc, g.stride, h);
        }
      }
    }

    /// O [rows][D] = corr O + P^T C over the keys the rows see.
    MLA_KERNEL_NOINLINE void accumulate(Index r0, Index r1, Index seen, Index) {
      output_heads(rows, seen, p.D, g.scores + r0, g.stride, g.o + r0 * p.D, p.D, g.corr + r0,
                   r1 - r0);
    }

    void finish() {}
  };
};

}  // namespace decode_fma

inline void decode_absorbed(const DecodeArgs& a) { decode_frame::run<decode_fma::FmaPolicy>(a); }
