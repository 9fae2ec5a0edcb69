// The absorbed decode step's frame, written once: the query rows of a call, its division into
// (key split, head group) parts that threads run independently, the walk of each part over its
// keys in blocks with the online softmax, and the exact log-sum-exp merge of the parts. What a
// block of keys costs is a policy's business:
//   - decode_fma.inl: FP32 products on FMA (Precision::kFp32 on every target);
//   - decode_bf16.inl: BF16 pair dot products (kBf16; VDPBF16PS where the target has it);
//   - decode_amx.inl: AMX tile products (both precisions, on the amx and amx_model targets).
// A policy P is constructed once per call as P(args, rows, geometry) (plus its own arguments),
// which lays the queries out as its products read them; its Worker, one per part, provides
//   Worker(const P&, const Group&);
//   void score(Index j0, Index n);   // scores of keys [j0, j0 + n) into group.scores [n][stride]
//   void accumulate(Index r0, Index r1, Index seen, Index n);  // rows [r0, r1): o = corr o + P C
//   void finish();                   // the part's output in group.o [hw][d_c]
// and says whether its Worker adds to group.o from the start (kAccumulatesInOutput: the frame
// zeroes it) or writes it in finish() (accumulating elsewhere).
// and the frame calls them in that order for every block. Included inside a target namespace,
// after primitives.inl. No include guard on purpose.

namespace decode_frame {

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

/// What a policy's Worker works on: one (split, head group) part of a call.
struct Group {
  const DecodeArgs* a;
  const Rows* q;
  Index h0, hw;       ///< the group's query rows [h0, h0 + hw), hw a multiple of kW
  Index stride;       ///< row stride of scores, m, l, corr: the geometry's h_group
  Index h_pad;        ///< query rows of the call
  Index first, last;  ///< the part's keys
  float* o;           ///< [hw][d_c], unnormalised output (zero at the start)
  float* m;           ///< [hw] running maximum
  float* l;           ///< [hw] running sum
  float* scores;      ///< [block][stride] scores, then softmax weights
  float* corr;        ///< [hw] the last step's correction factors
  decode::Buffers::PerThread* t;
};

/// Exact merge of the splits of every query row by their log-sum-exp (lse_merge): the splits'
/// weights are written over partial_m and the rows' log-sum-exp to a.lse.
inline void merge_weights(const DecodeArgs& a, const Rows& q, const decode::Geometry& geo) {
  decode::Buffers& ws = *a.buffers;
  const Index stride = geo.groups * geo.h_group;  // from one split's state of a row to the next
  for (Index r = 0; r < geo.h_pad; ++r) {
    const Index t = q.token(r), h = r - t * q.h_pad1;
    if (h >= q.heads) continue;
    // Row r's state in split 0 is at index r (group r / h_group, row r % h_group in it).
    float* m = ws.partial_m.data() + r;
    a.lse[t * a.lse_stride + h] = lse_merge(geo.splits, m, ws.partial_l.data() + r, stride, m);
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

/// One (split, head group) part: the walk over its keys in blocks, with a policy's Worker.
template <class Policy>
struct Part {
  const DecodeArgs* a;
  const Rows* q;
  const decode::Geometry* geo;
  Index split_keys;
  const Policy* policy;

  void operator()(Index item, int thread) const {
    decode::Buffers& ws = *a->buffers;
    const Index D = a->cache.layout.kv_lora_rank;
    const Index groups = geo->groups, h_group = geo->h_group;
    const Index s = item / groups, h0 = item % groups * h_group;
    decode::Buffers::PerThread& t = ws.per_thread[static_cast<std::size_t>(thread)];
    Group g{a,
            q,
            h0,
            std::min(h_group, geo->h_pad - h0),
            h_group,
            geo->h_pad,
            s * split_keys,
            std::min(a->keys, s * split_keys + split_keys),
            ws.partial_o.data() + item * D * h_group,
            ws.partial_m.data() + item * h_group,
            ws.partial_l.data() + item * h_group,
            t.scores.data(),
            t.correction.data(),
            &t};
    if constexpr (Policy::kAccumulatesInOutput) std::fill(g.o, g.o + D * h_group, 0.0f);
    std::fill(g.m, g.m + h_group, -std::numeric_limits<float>::infinity());
    std::fill(g.l, g.l + h_group, 0.0f);
    typename Policy::Worker w(*policy, g);
    const Index block = a->options.tile_tokens;
    for (Index j0 = g.first; j0 < g.last; j0 += block) {
      const Index n = std::min(block, g.last - j0);
      // Keys a query token must not see (the newest keys of the newest block) may be scored,
      // but are never weighted into its output.
      w.score(j0, n);
      // Per query token: the online softmax over the keys it sees (vectorised over rows), then
      // its outputs over the same keys.
      q->for_each_segment(h0, g.hw, j0, n, [&](Index r0, Index r1, Index seen) {
        if (seen == 0) return;
        online_softmax_step(g.scores + r0, seen, r1 - r0, h_group, g.m + r0, g.l + r0, g.corr + r0);
        w.accumulate(r0, r1, seen, n);
      });
    }
    w.finish();
  }
};

/// One decode step on policy P: lays out the rows, builds the policy (P(a, rows, geometry,
/// extra...)), runs every (split, group) part, on the executor when there is one, and merges.
template <class P, class... Extra>
void run(const DecodeArgs& a, Extra... extra) {
  const Rows q = rows_of(a);
  const decode::Geometry geo(a.tokens * q.h_pad1, a.options, mla::concurrency(a.pool), kW);
  const P policy(a, q, geo, extra...);
  // Split boundaries on whole blocks.
  const Index block = a.options.tile_tokens;
  const Index split_len = (a.keys + geo.splits - 1) / geo.splits;
  const Part<P> part{&a, &q, &geo, (split_len + block - 1) / block * block, &policy};
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

}  // namespace decode_frame
