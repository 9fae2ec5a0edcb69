// The absorbed decode step with BF16 queries and softmax weights (Precision::kBf16): the block
// policy of the decode frame (decode_frame.inl) whose products are BF16 pair dot products,
// written once over a target's `Ops` and its BF16-pair operations: dp_bf16 (VDPBF16PS in the
// AVX512-BF16 namespace, two FMAs on the widened halves everywhere else), pack_bf16,
// interleave_bf16, store_bf16, bcast32. Included inside a target namespace after
// decode_frame.inl. No include guard on purpose.
//
// What is rounded, and where: the queries (times the softmax scale) once to BF16; the cached
// keys are BF16 as they are (BF16 records, and FP8 codes, which BF16 holds exactly; the FP8
// tile scales multiply FP32 partial sums and FP32 weights), FP32 and FP64 records are rounded
// to BF16; the softmax runs in FP32 and its weights (times the FP8 scale of the output tile)
// are rounded once to BF16. Every product of two BF16 values is exact in FP32; every sum is
// FP32. The operands are kept in BF16 pairs, two consecutive k (scores) or two consecutive keys
// (outputs) per 32-bit word: the layout AMX's B tiles use too.

namespace decode_bf16 {

/// Where a record's parts go in a key row of BF16 values: the latent padded to even length
/// (so that no pair mixes the latent with k^R, whose multipliers differ for FP8), then k^R.
struct KeyLayout {
  Index d, r, d_even, k_even;  // k_even = d_even + r; pairs: k_even / 2
  explicit KeyLayout(const LatentLayout& l)
      : d(l.kv_lora_rank), r(l.rope_dim), d_even((d + 1) / 2 * 2), k_even(d_even + r) {}
};

/// E4M3 codes to BF16 through the target's widening to float, a vector at a time.
struct WidenE4M3 {
  void operator()(const unsigned char* src, Index count, std::uint16_t* out) const {
    Index i = 0;
    for (; i + kW <= count; i += kW) Ops::store_bf16_exact(out + i, Ops::widen_e4m3(src + i));
    for (; i < count; ++i) out[i] = bf16_bits(decode_fp8<E4M3FNFormat>(src[i]));
  }
};

/// One record's [c ; k^R] as BF16 into dst [k_even], segment by segment: exact for BF16
/// segments and E4M3 codes (unscaled: the scales are applied as multipliers; `e4m3` widens
/// them, a target may pass a faster route), rounded for FP32 and FP64. `scratch` holds d + r
/// floats.
template <class E4M3 = WidenE4M3>
inline void key_to_bf16(const RecordSegments& segments, const KeyLayout& k,
                        const unsigned char* rec, std::uint16_t* dst, float* scratch,
                        E4M3 e4m3 = {}) {
  for (const RecordSegment& s : segments) {
    // The segment's fields in locals: the vector stores below may alias anything in memory.
    const unsigned char* src = rec + s.offset;
    std::uint16_t* out = dst + (s.first < k.d ? s.first : k.d_even + (s.first - k.d));
    const Index count = s.count;
    Index i = 0;
    switch (s.element) {
      case Element::kBFloat16:
        std::memcpy(out, src, sizeof(std::uint16_t) * static_cast<std::size_t>(count));
        break;
      case Element::kE4M3:
        e4m3(src, count, out);
        break;
      default:  // FP32, FP64: widened to float (FP64 rounds once), then rounded to BF16
        widen_segment(s, rec, scratch);
        for (; i + kW <= count; i += kW) Ops::store_bf16(out + i, Ops::load(scratch + i));
        for (; i < count; ++i) out[i] = bf16_bits(scratch[i]);
        break;
    }
  }
  if (k.d_even != k.d) dst[k.d] = 0;
}

/// The multipliers of one record's score segments (see for_each_segment: the E4M3 scales, 1
/// for k^R) into mult [segments.count].
inline void segment_multipliers(const RecordSegments& segments, const unsigned char* rec,
                                float* mult) {
  for (const RecordSegment& s : segments) mult[s.index] = s.scale(rec);
}

/// S[r][h] (+)= mult_r * sum_{kp0 <= kp < kp1} K_r . Q over the pairs kp, for MR key rows and NR
/// vectors of query rows; mult (per key row, mult_stride apart) may be null (1). The first
/// segment stores, later ones add.
template <int MR, int NR>
MLA_KERNEL_INLINE void score_block(const std::uint16_t* const* rows, Index kp0, Index kp1,
                                   const float* qp, Index qp_stride, float* s, Index s_stride,
                                   const float* mult, Index mult_stride, bool first) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) acc[r][v] = Ops::zero();
  for (Index kp = kp0; kp < kp1; ++kp) {
    const float* q = qp + kp * qp_stride;
    V b[NR];
    for (int v = 0; v < NR; ++v) b[v] = Ops::load(q + v * kW);
    for (int r = 0; r < MR; ++r) {
      const V a = Ops::bcast32(rows[r] + 2 * kp);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::dp_bf16(acc[r][v], a, b[v]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    const V m = Ops::set1(mult ? mult[r * mult_stride] : 1.0f);
    for (int v = 0; v < NR; ++v) {
      float* dst = s + r * s_stride + v * kW;
      const V x = mult ? Ops::mul(acc[r][v], m) : acc[r][v];
      Ops::store(dst, first ? x : Ops::add(Ops::load(dst), x));
    }
  }
}

/// Scores of n key rows against the query-row vectors [h, h + NR) over the pairs [kp0, kp1).
template <int NR>
MLA_KERNEL_NOINLINE void score_heads(const std::uint16_t* const* rows, Index n, Index kp0,
                                     Index kp1, const float* qp, Index qp_stride, float* s,
                                     Index s_stride, Index h, const float* mult, Index mult_stride,
                                     bool first) {
  constexpr int MR = decode_fma::kRows<NR>;
  Index r = 0;
  for (; r + MR <= n; r += MR) {
    score_block<MR, NR>(rows + r, kp0, kp1, qp + h * kW, qp_stride, s + r * s_stride + h * kW,
                        s_stride, mult ? mult + r * mult_stride : nullptr, mult_stride, first);
  }
  for (; r < n; ++r) {
    score_block<1, NR>(rows + r, kp0, kp1, qp + h * kW, qp_stride, s + r * s_stride + h * kW,
                       s_stride, mult ? mult + r * mult_stride : nullptr, mult_stride, first);
  }
}

/// O[r][d0 ..] = corr[r] O[r][d0 ..] + sum over the key pairs jp < pairs of dp(P pair, C pair),
/// plus the lone key `tail` (>= 0: an odd count of keys seen) by FMA, for MR query rows and NR
/// vectors of latent dimensions. pp: weight pairs [pairs][p_stride] of this output tile; tail_p:
/// the lone key's weights per row (already BF16 values).
template <int MR, int NR>
MLA_KERNEL_INLINE void output_block(const std::uint32_t* cp, Index D, Index pairs,
                                    const std::uint16_t* tail_row, Index d0,
                                    const std::uint32_t* pp, Index p_stride, const float* tail_p,
                                    float* o, Index o_stride, const float* corr) {
  V acc[MR][NR];
  for (int r = 0; r < MR; ++r) {
    const V c = Ops::set1(corr[r]);
    for (int v = 0; v < NR; ++v) acc[r][v] = Ops::mul(Ops::load(o + r * o_stride + d0 + v * kW), c);
  }
  for (Index jp = 0; jp < pairs; ++jp) {
    V b[NR];
    for (int v = 0; v < NR; ++v) {
      b[v] = Ops::load(reinterpret_cast<const float*>(cp + jp * D + d0 + v * kW));
    }
    const std::uint32_t* pj = pp + jp * p_stride;
    for (int r = 0; r < MR; ++r) {
      const V a = Ops::bcast32(pj + r);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::dp_bf16(acc[r][v], a, b[v]);
    }
  }
  if (tail_row) {
    V b[NR];
    for (int v = 0; v < NR; ++v) {
      b[v] = Ops::widen_bf16(reinterpret_cast<const unsigned char*>(tail_row + d0 + v * kW));
    }
    for (int r = 0; r < MR; ++r) {
      const V a = Ops::set1(tail_p[r]);
      for (int v = 0; v < NR; ++v) acc[r][v] = Ops::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) Ops::store(o + r * o_stride + d0 + v * kW, acc[r][v]);
}

/// The BF16 policy: keys as BF16 rows (in place for BF16 records of even d_c), the latent as
/// pairs of consecutive keys, weights as BF16 pairs per output segment.
struct Bf16Policy {
  static constexpr bool kAccumulatesInOutput = true;
  RecordSegments record;  // the cache's record segments
  KeyLayout kl;
  const float* qp;  // query pairs [k_even / 2][h_pad], as float-typed 32-bit words
  Index segments;   // FP8: one per scale tile + k^R; otherwise 1
  bool fp8, in_place;

  Bf16Policy(const DecodeArgs& a, const decode_frame::Rows& q, const decode::Geometry& geo)
      : record(segments_of(a.cache.layout)), kl(a.cache.layout) {
    // sigma * queries as BF16 pairs [k_even / 2][h_pad], in the key rows' layout (latent padded
    // to even length, then k^R); padding rows and the pad column zero.
    const Index rows = geo.h_pad;
    auto* pairs = reinterpret_cast<std::uint32_t*>(a.buffers->q.data());
    for (Index kp = 0; kp < kl.k_even / 2; ++kp) {
      for (Index r = 0; r < rows; ++r) {
        const Index t = q.token(r), h = r - t * q.h_pad1;
        std::uint16_t x[2] = {0, 0};
        for (int i = 0; i < 2; ++i) {
          const Index k = 2 * kp + i;  // position in the key row
          const Index src = k < kl.d_even ? (k < kl.d ? k : -1) : kl.d + (k - kl.d_even);
          if (h < q.heads && src >= 0) {
            x[i] = bf16_bits(a.scale * a.q[(t * q.heads + h) * a.q_stride + src]);
          }
        }
        pairs[kp * rows + r] = bf16_pair(x[0], x[1]);
      }
    }
    qp = reinterpret_cast<const float*>(pairs);
    fp8 = a.cache.layout.storage == CacheStorage::kFp8E4M3;
    in_place = a.cache.layout.storage == CacheStorage::kBFloat16 && kl.d == kl.d_even;
    segments = fp8 ? LatentLayout::fp8_tiles(kl.d) + 1 : 1;
  }

  struct Worker {
    const Bf16Policy& p;
    const decode_frame::Group& g;
    const std::uint16_t** rows;
    float* mult;
    std::uint32_t* cp;
    std::uint32_t* pp;
    Index max_pairs;

    Worker(const Bf16Policy& policy, const decode_frame::Group& group)
        : p(policy),
          g(group),
          rows(group.t->rows16.data()),
          mult(group.t->mult.data()),
          cp(group.t->c_pairs.data()),
          pp(group.t->p_pairs.data()),
          max_pairs((group.a->options.tile_tokens + 1) / 2) {}

    MLA_KERNEL_NOINLINE void score(Index j0, Index n) {
      const LatentBlocks& cache = g.a->cache;
      const Index D = p.kl.d, tiles8 = p.segments - 1;
      // Keys as BF16 rows, and their multipliers.
      for (Index j = 0; j < n; ++j) {
        const unsigned char* rec = cache.record(j0 + j);
        if (p.in_place) {
          rows[j] = reinterpret_cast<const std::uint16_t*>(rec);
        } else {
          std::uint16_t* row = g.t->keys16.data() + j * p.kl.k_even;
          key_to_bf16(p.record, p.kl, rec, row, g.t->tile.data());
          rows[j] = row;
        }
        if (p.fp8) segment_multipliers(p.record, rec, mult + j * p.segments);
      }
      // Latent pairs of consecutive keys, [n / 2][d_c]: the output's B operand. Meanwhile the
      // next block's records are prefetched, two per pair: this block's scores, softmax and
      // outputs take long enough for them to arrive (the first pass over a block reads from
      // DRAM otherwise).
      const Index pairs_n = n / 2;
      const Index next = j0 + n, next_n = std::min(n, g.last - next);
      const std::size_t record_bytes = cache.layout.token_bytes;
      for (Index jp = 0; jp < pairs_n; ++jp) {
        for (Index j = 2 * jp; j < std::min(next_n, 2 * jp + 2); ++j) {
          const unsigned char* rec = cache.record(next + j);
          for (std::size_t b = 0; b < record_bytes; b += 64) Ops::prefetch(rec + b);
        }
        const std::uint16_t* lo = rows[2 * jp];
        const std::uint16_t* hi = rows[2 * jp + 1];
        std::uint32_t* dst = cp + jp * D;
        Index d = 0;
        for (; d + kW <= D; d += kW) {
          Ops::store(reinterpret_cast<float*>(dst + d), Ops::interleave_bf16(lo + d, hi + d));
        }
        for (; d < D; ++d) dst[d] = bf16_pair(lo[d], hi[d]);
      }
      // Scores [n][hw]: per segment (FP8: scale tile, then k^R), added up in FP32.
      const Index kp_latent = p.kl.d_even / 2, kp_all = p.kl.k_even / 2;
      const auto score_range = [&](Index kp0, Index kp1, const float* mu, bool first_segment) {
        const float* qt = p.qp + g.h0;
        for (Index h = 0, hv = g.hw / kW; h < hv;) {
          if (hv - h >= 2) {
            score_heads<2>(rows, n, kp0, kp1, qt, g.h_pad, g.scores, g.stride, h, mu, p.segments,
                           first_segment);
            h += 2;
          } else {
            score_heads<1>(rows, n, kp0, kp1, qt, g.h_pad, g.scores, g.stride, h, mu, p.segments,
                           first_segment);
            h += 1;
          }
        }
      };
      if (p.fp8) {
        for (Index tt = 0; tt < tiles8; ++tt) {
          score_range(tt * 64, std::min(kp_latent, (tt + 1) * 64), mult + tt, tt == 0);
        }
        if (kp_all > kp_latent) score_range(kp_latent, kp_all, mult + tiles8, false);
      } else {
        // Chunks of 64 pairs keep the query slice in L1.
        for (Index kp = 0; kp < kp_all; kp += 64) {
          score_range(kp, std::min(kp_all, kp + 64), nullptr, kp == 0);
        }
      }
    }

    /// The weights as BF16 pairs (times each output segment's FP8 scale) and the outputs over
    /// the keys the rows [r0, r1) see.
    MLA_KERNEL_NOINLINE void accumulate(Index r0, Index r1, Index seen, Index) {
      const Index D = p.kl.d, h_group = g.stride, segments = p.segments;
      const bool fp8 = p.fp8;
      const float* sc = g.scores;
      const Index pairs = seen / 2;
      const Index out_segments = fp8 ? segments - 1 : 1;
      for (Index os = 0; os < out_segments; ++os) {
        std::uint32_t* pw = pp + os * max_pairs * h_group;
        for (Index jp = 0; jp < pairs; ++jp) {
          const float* s0 = sc + 2 * jp * h_group;
          const float* s1 = s0 + h_group;
          const V m0 = Ops::set1(fp8 ? mult[2 * jp * segments + os] : 1.0f);
          const V m1 = Ops::set1(fp8 ? mult[(2 * jp + 1) * segments + os] : 1.0f);
          for (Index r = r0; r < r1; r += kW) {
            Ops::store(
                reinterpret_cast<float*>(pw + jp * h_group + r),
                Ops::pack_bf16(Ops::mul(Ops::load(s0 + r), m0), Ops::mul(Ops::load(s1 + r), m1)));
          }
        }
      }
      const bool odd = seen % 2 == 1;
      const std::uint16_t* tail_row = odd ? rows[seen - 1] : nullptr;
      constexpr int MR = decode_fma::kOutputHeads;
      float tail_p[MR] = {};
      for (Index r = r0; r < r1; r += MR) {
        float* orow = g.o + r * D;
        Index d = 0;
        const auto block = [&](auto nr, Index os) {
          constexpr int NR = decltype(nr)::value;
          if (odd) {
            const float mu = fp8 ? mult[(seen - 1) * segments + os] : 1.0f;
            for (int i = 0; i < MR; ++i) {
              tail_p[i] = round_bf16(sc[(seen - 1) * h_group + r + i] * mu);
            }
          }
          output_block<MR, NR>(cp, D, pairs, tail_row, d, pp + os * max_pairs * h_group + r,
                               h_group, tail_p, orow, D, g.corr + r);
        };
        for (; d + 2 * kW <= D; d += 2 * kW)
          block(std::integral_constant<int, 2>{}, fp8 ? d / 128 : 0);
        for (; d + kW <= D; d += kW) block(std::integral_constant<int, 1>{}, fp8 ? d / 128 : 0);
        for (; d < D; ++d) {  // latent widths that are not a multiple of the SIMD width
          for (int i = 0; i < MR; ++i) {
            float acc = orow[i * D + d] * g.corr[r + i];
            for (Index j = 0; j < seen; ++j) {
              const float mu = fp8 ? mult[j * segments + d / 128] : 1.0f;
              acc += round_bf16(sc[j * h_group + r + i] * mu) * bf16_value(rows[j][d]);
            }
            orow[i * D + d] = acc;
          }
        }
      }
    }

    void finish() {}
  };
};

}  // namespace decode_bf16

inline void decode_absorbed_bf16(const DecodeArgs& a) {
  decode_frame::run<decode_bf16::Bf16Policy>(a);
}
