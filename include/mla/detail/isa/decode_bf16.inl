// The absorbed decode step with BF16 queries and softmax weights (Precision::kBf16),
// written once over a target's `Ops` and its BF16-pair operations: dp_bf16 (VDPBF16PS in the
// AVX512-BF16 namespace, two FMAs on the widened halves everywhere else), pack_bf16,
// interleave_bf16, store_bf16, bcast32. Included inside a target namespace, after kernels.inl's
// decode_kernel (whose frame it shares: query rows, splits, merge). No include guard on purpose.
//
// What is rounded, and where: the queries (times the softmax scale) once to BF16; the cached
// keys are BF16 as they are (BF16 records, and FP8 codes, which BF16 holds exactly; the FP8
// tile scales multiply FP32 partial sums and FP32 weights), FP32 and FP64 records are rounded
// to BF16; the softmax runs in FP32 and its weights (times the FP8 scale of the output tile)
// are rounded once to BF16. Every product of two BF16 values is exact in FP32; every sum is
// FP32. The operands are kept in BF16 pairs, two consecutive k (scores) or two consecutive keys
// (outputs) per 32-bit word: the layout AMX's B tiles use too.

namespace decode_bf16_kernel {

using decode_kernel::Rows;

/// BF16 bits of x, nearest even (the scalar route of the tails).
inline std::uint16_t bf16_bits(float x) { return bit_cast<std::uint16_t>(to_bfloat16(x)); }

/// Where a record's parts go in a key row of BF16 values: the latent padded to even length
/// (so that no pair mixes the latent with k^R, whose multipliers differ for FP8), then k^R.
struct KeyLayout {
  Index d, r, d_even, k_even;  // k_even = d_even + r; pairs: k_even / 2
  explicit KeyLayout(const LatentLayout& l)
      : d(l.kv_lora_rank), r(l.rope_dim), d_even((d + 1) / 2 * 2), k_even(d_even + r) {}
};

/// One record's [c ; k^R] as BF16 into dst [k_even]: exact for BF16 records and FP8 codes
/// (unscaled: the scales are applied as multipliers), rounded for FP32 and FP64. `scratch`
/// holds d + r floats.
inline void key_to_bf16(const LatentLayout& l, const KeyLayout& k, const unsigned char* rec,
                        std::uint16_t* dst, float* scratch) {
  const auto round_row = [&](const float* x, Index n, std::uint16_t* out) {
    Index i = 0;
    for (; i + kW <= n; i += kW) Ops::store_bf16(out + i, Ops::load(x + i));
    for (; i < n; ++i) out[i] = bf16_bits(x[i]);
  };
  switch (l.storage) {
    case CacheStorage::kBFloat16:
      std::memcpy(dst, rec, sizeof(std::uint16_t) * static_cast<std::size_t>(k.d));
      std::memcpy(dst + k.d_even, rec + l.kpe_offset,
                  sizeof(std::uint16_t) * static_cast<std::size_t>(k.r));
      break;
    case CacheStorage::kFp8E4M3: {
      Index i = 0;
      for (; i + kW <= k.d; i += kW) Ops::store_bf16_exact(dst + i, Ops::widen_e4m3(rec + i));
      for (; i < k.d; ++i) dst[i] = bf16_bits(decode_fp8<E4M3FNFormat>(rec[i]));
      std::memcpy(dst + k.d_even, rec + l.kpe_offset,
                  sizeof(std::uint16_t) * static_cast<std::size_t>(k.r));
      break;
    }
    default:  // FP32, FP64: widened to float (FP64 rounds once), then rounded to BF16
      widen_record(l, rec, scratch);
      round_row(scratch, k.d, dst);
      round_row(scratch + k.d, k.r, dst + k.d_even);
      break;
  }
  if (k.d_even != k.d) dst[k.d] = 0;
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
  constexpr int MR = decode_kernel::kRows<NR>;
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

/// One (split, head group) part of a BF16 decode step.
struct Part {
  const DecodeArgs* a;
  const Rows* q;
  const decode::Geometry* geo;
  Index split_keys;
  const float* qp;  // query pairs [k_even / 2][h_pad], as float-typed 32-bit words
  KeyLayout kl;
  Index segments;  // FP8: one per scale tile + k^R; otherwise 1
  bool fp8, in_place;

  void operator()(Index item, int thread) const {
    const LatentBlocks& cache = a->cache;
    decode::Buffers& ws = *a->buffers;
    const Index D = kl.d;
    const Index groups = geo->groups, h_group = geo->h_group, h_pad = geo->h_pad;
    const Index s = item / groups, g = item % groups;
    const Index h0 = g * h_group;
    const Index hw = std::min(h_group, h_pad - h0);
    decode::Buffers::PerThread& t = ws.per_thread[static_cast<std::size_t>(thread)];
    float* o = ws.partial_o.data() + item * D * h_group;
    float* m = ws.partial_m.data() + item * h_group;
    float* l = ws.partial_l.data() + item * h_group;
    std::fill(o, o + D * h_group, 0.0f);
    std::fill(m, m + h_group, -std::numeric_limits<float>::infinity());
    std::fill(l, l + h_group, 0.0f);
    const Index tile = a->options.tile_tokens, max_pairs = (tile + 1) / 2;
    const Index first = s * split_keys, last = std::min(a->keys, first + split_keys);
    const Index tiles8 = segments - 1;  // FP8 scale tiles
    float* sc = t.scores.data();
    float* corr = t.correction.data();
    float* mult = t.mult.data();
    const std::uint16_t** rows = t.rows16.data();
    std::uint32_t* cp = t.c_pairs.data();
    std::uint32_t* pp = t.p_pairs.data();
    float tail_p[decode_kernel::kOutputHeads];
    for (Index j0 = first; j0 < last; j0 += tile) {
      const Index n = std::min(tile, last - j0);
      // Keys as BF16 rows (in place for BF16 records of even d_c), and their multipliers.
      for (Index j = 0; j < n; ++j) {
        const unsigned char* rec = cache.record(j0 + j);
        if (in_place) {
          rows[j] = reinterpret_cast<const std::uint16_t*>(rec);
        } else {
          std::uint16_t* row = t.keys16.data() + j * kl.k_even;
          key_to_bf16(cache.layout, kl, rec, row, t.tile.data());
          rows[j] = row;
        }
        if (fp8) {
          std::memcpy(mult + j * segments, rec + cache.layout.scales_offset,
                      sizeof(float) * static_cast<std::size_t>(tiles8));
          mult[j * segments + tiles8] = 1.0f;
        }
      }
      // Latent pairs of consecutive keys, [n / 2][d_c]: the output's B operand. Meanwhile the
      // next tile's records are prefetched, two per pair: this tile's scores, softmax and
      // outputs take long enough for them to arrive (the first pass over a tile reads from
      // DRAM otherwise).
      const Index pairs_n = n / 2;
      const Index next = j0 + tile, next_n = std::min(tile, last - next);
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
        for (; d < D; ++d) dst[d] = std::uint32_t{lo[d]} | (std::uint32_t{hi[d]} << 16);
      }
      // Scores [n][hw]: per segment (FP8: scale tile, then k^R), added up in FP32.
      const Index kp_latent = kl.d_even / 2, kp_all = kl.k_even / 2;
      const auto score_range = [&](Index kp0, Index kp1, const float* mu, bool first_segment) {
        const float* qt = qp + h0;
        for (Index h = 0, hv = hw / kW; h < hv;) {
          if (hv - h >= 2) {
            score_heads<2>(rows, n, kp0, kp1, qt, h_pad, sc, h_group, h, mu, segments,
                           first_segment);
            h += 2;
          } else {
            score_heads<1>(rows, n, kp0, kp1, qt, h_pad, sc, h_group, h, mu, segments,
                           first_segment);
            h += 1;
          }
        }
      };
      if (fp8) {
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
      // Per query token: online softmax over the keys it sees, then the weights as BF16 pairs
      // (times each output tile's FP8 scale) and the outputs over the same keys.
      q->for_each_segment(h0, hw, j0, n, [&](Index r0, Index r1, Index seen) {
        if (seen == 0) return;
        online_softmax_step(sc + r0, seen, r1 - r0, h_group, m + r0, l + r0, corr + r0);
        const Index pairs = seen / 2;
        const Index out_segments = fp8 ? tiles8 : 1;
        for (Index os = 0; os < out_segments; ++os) {
          std::uint32_t* p = pp + os * max_pairs * h_group;
          for (Index jp = 0; jp < pairs; ++jp) {
            const float* s0 = sc + 2 * jp * h_group;
            const float* s1 = s0 + h_group;
            const V m0 = Ops::set1(fp8 ? mult[2 * jp * segments + os] : 1.0f);
            const V m1 = Ops::set1(fp8 ? mult[(2 * jp + 1) * segments + os] : 1.0f);
            for (Index r = r0; r < r1; r += kW) {
              Ops::store(
                  reinterpret_cast<float*>(p + jp * h_group + r),
                  Ops::pack_bf16(Ops::mul(Ops::load(s0 + r), m0), Ops::mul(Ops::load(s1 + r), m1)));
            }
          }
        }
        const bool odd = seen % 2 == 1;
        const std::uint16_t* tail_row = odd ? rows[seen - 1] : nullptr;
        constexpr int MR = decode_kernel::kOutputHeads;
        for (Index r = r0; r < r1; r += MR) {
          float* orow = o + r * D;
          Index d = 0;
          const auto block = [&](auto nr, Index os) {
            constexpr int NR = decltype(nr)::value;
            if (odd) {
              const float mu = fp8 ? mult[(seen - 1) * segments + os] : 1.0f;
              for (int i = 0; i < MR; ++i) {
                tail_p[i] = bit_cast<float>(
                    std::uint32_t{bf16_bits(sc[(seen - 1) * h_group + r + i] * mu)} << 16);
              }
            }
            output_block<MR, NR>(cp, D, pairs, tail_row, d, pp + os * max_pairs * h_group + r,
                                 h_group, tail_p, orow, D, corr + r);
          };
          for (; d + 2 * kW <= D; d += 2 * kW) {
            block(std::integral_constant<int, 2>{}, fp8 ? d / 128 : 0);
          }
          for (; d + kW <= D; d += kW) block(std::integral_constant<int, 1>{}, fp8 ? d / 128 : 0);
          for (; d < D; ++d) {  // latent widths that are not a multiple of the SIMD width
            for (int i = 0; i < MR; ++i) {
              float acc = orow[i * D + d] * corr[r + i];
              for (Index j = 0; j < seen; ++j) {
                const float mu = fp8 ? mult[j * segments + d / 128] : 1.0f;
                const float w =
                    bit_cast<float>(std::uint32_t{bf16_bits(sc[j * h_group + r + i] * mu)} << 16);
                acc += w * bit_cast<float>(std::uint32_t{rows[j][d]} << 16);
              }
              orow[i * D + d] = acc;
            }
          }
        }
      });
    }
  }
};

inline void run(const DecodeArgs& a) {
  const LatentBlocks& cache = a.cache;
  const int threads = mla::concurrency(a.pool);
  const Rows q = decode_kernel::rows_of(a);
  const decode::Geometry geo(a.tokens * q.h_pad1, a.options, threads, kW);
  const Index tile = a.options.tile_tokens;
  const Index split_len = (a.keys + geo.splits - 1) / geo.splits;
  const Index split_keys = (split_len + tile - 1) / tile * tile;
  const KeyLayout kl(cache.layout);
  // sigma * queries as BF16 pairs [k_even / 2][h_pad], in the key rows' layout (latent padded
  // to even length, then k^R); padding rows and the pad column zero.
  const Index rows = geo.h_pad;
  auto* qp = reinterpret_cast<std::uint32_t*>(a.buffers->q.data());
  for (Index kp = 0; kp < kl.k_even / 2; ++kp) {
    for (Index r = 0; r < rows; ++r) {
      const Index t = q.token(r), h = r - t * q.h_pad1;
      float x[2] = {0.0f, 0.0f};
      for (int i = 0; i < 2; ++i) {
        const Index k = 2 * kp + i;  // position in the key row
        const Index src = k < kl.d_even ? (k < kl.d ? k : -1) : kl.d + (k - kl.d_even);
        if (h < q.heads && src >= 0) x[i] = a.scale * a.q[(t * q.heads + h) * a.q_stride + src];
      }
      qp[kp * rows + r] = std::uint32_t{bf16_bits(x[0])} | (std::uint32_t{bf16_bits(x[1])} << 16);
    }
  }
  const bool fp8 = cache.layout.storage == CacheStorage::kFp8E4M3;
  const bool in_place = cache.layout.storage == CacheStorage::kBFloat16 && kl.d == kl.d_even;
  const Index segments = fp8 ? (kl.d + 127) / 128 + 1 : 1;
  const Part part{&a, &q,       &geo, split_keys, reinterpret_cast<const float*>(qp),
                  kl, segments, fp8,  in_place};
  decode_kernel::run_parts(a, q, geo, part);
}

}  // namespace decode_bf16_kernel

inline void decode_absorbed_bf16(const DecodeArgs& a) { decode_bf16_kernel::run(a); }
