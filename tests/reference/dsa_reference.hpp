#pragma once
// Plain-loop double reference of DeepSeek-V3.2's sparse attention (DSA): the lightning indexer
// (index queries from c^Q, index key from x with LayerNorm, half-split RoPE on the rotary part,
// the Hadamard rotation, FP8 E4M3 quantisation of queries and keys with one scale per 128-value
// block, the ReLU-weighted head sum), top-k per query over the causal range, and MLA restricted
// to the selected positions. Written from the published math (DeepSeek-V3.2-Exp's reference
// model.py after its indexer-RoPE fix) and sharing no code with the library.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <vector>

#include "reference/fp8_reference.hpp"
#include "reference/mla_reference.hpp"

namespace ref {

/// The indexer's dimensions: H_I heads of d_I (a power of two), top-k, power-of-two scales.
struct IndexerSpec {
  int heads = 0, dim = 0, topk = 0;
  bool pow2_scales = true;
  bool interleaved_rope = false;  // GLM-5: interleaved pairs; V3.2: half-split
};

/// The indexer's weights ([out, in] row-major).
struct IndexerWeights {
  Vec wq_b, wk, k_norm, k_norm_bias, weights_proj;
};

/// H_n x / sqrt(n) with the Sylvester matrix, from its definition: entry (i, j) of H_n is
/// (-1)^popcount(i & j).
inline void hadamard(double* x, int n) {
  Vec y(static_cast<std::size_t>(n), 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) {
      int bits = i & j, parity = 0;
      while (bits) {
        parity ^= bits & 1;
        bits >>= 1;
      }
      y[static_cast<std::size_t>(i)] += (parity ? -1.0 : 1.0) * x[j];
    }
  }
  for (int i = 0; i < n; ++i) x[i] = y[static_cast<std::size_t>(i)] / std::sqrt(double(n));
}

/// (x - mean) / sqrt(biased variance + eps) * g + b.
inline Vec layer_norm(const Vec& x, const Vec& g, const Vec& b, double eps) {
  double mean = 0.0;
  for (double v : x) mean += v;
  mean /= static_cast<double>(x.size());
  double var = 0.0;
  for (double v : x) var += (v - mean) * (v - mean);
  var /= static_cast<double>(x.size());
  Vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    y[i] = (x[i] - mean) / std::sqrt(var + eps) * g[i] + b[i];
  }
  return y;
}

/// DeepSeek's act_quant of one block x[0, n): s = max(amax, 1e-4) / 448 (2^ceil(log2 s) with
/// power-of-two scales), x[i] replaced by the E4M3 value nearest x[i] / s (saturating).
/// Returns s.
inline double act_quant(double* x, int n, bool pow2) {
  static const Fp8Rounder rounder(kE4M3FN);
  double amax = 0.0;
  for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  double s = std::max(amax, 1e-4) / 448.0;
  if (pow2) s = std::exp2(std::ceil(std::log2(s)));
  for (int i = 0; i < n; ++i) {
    x[i] = fp8_value(kE4M3FN, rounder.round(std::clamp(x[i] / s, -448.0, 448.0), true));
  }
  return s;
}

/// What the indexer computes for a sequence of n tokens.
struct IndexerTrace {
  Vec keys;          // [n, d_I] E4M3 values of the index keys
  Vec key_scales;    // [n]
  Vec queries;       // [n, H_I, d_I] E4M3 values
  Vec weights;       // [n, H_I] head weights, query scales and normalisations folded in
  Vec scores;        // [n, n]: scores[t][s] for s <= t, 0 above the diagonal
  KeySets selected;  // per token, the top-k positions, ascending
};

/// The top-k of scores[0, n): higher first, ties to the earlier position (the library's
/// documented rule); ascending positions.
inline std::vector<int> top_k(const double* scores, int n, int k) {
  std::vector<int> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  order.resize(static_cast<std::size_t>(std::min(n, k)));
  std::sort(order.begin(), order.end());
  return order;
}

/// The indexer over the n tokens of x [n, hidden] at positions pos0, ...; cq [n, q_lora] is
/// MLA's normalised query latent of the same tokens. `rope` carries MLA's frequencies; its
/// pairing is replaced by the indexer's own (half-split in V3.2, interleaved in GLM-5).
inline IndexerTrace indexer_forward(const MlaSpec& s, const IndexerSpec& is,
                                    const IndexerWeights& w, const Vec& x, const Vec& cq, int n,
                                    long long pos0) {
  const int H = is.heads, D = is.dim;
  RopeSpec rope = s.rope;
  rope.interleaved = is.interleaved_rope;
  IndexerTrace tr;
  tr.keys.assign(static_cast<std::size_t>(n) * D, 0.0);
  tr.key_scales.assign(static_cast<std::size_t>(n), 0.0);
  tr.queries.assign(static_cast<std::size_t>(n) * H * D, 0.0);
  tr.weights.assign(static_cast<std::size_t>(n) * H, 0.0);
  for (int t = 0; t < n; ++t) {
    const double* xt = &x[static_cast<std::size_t>(t) * s.hidden];
    Vec k = layer_norm(matvec(w.wk, D, s.hidden, xt), w.k_norm, w.k_norm_bias, 1e-6);
    if (rope.dim > 0) rope_rotate(k.data(), rope, pos0 + t);  // its first R values
    hadamard(k.data(), D);
    tr.key_scales[static_cast<std::size_t>(t)] = act_quant(k.data(), D, is.pow2_scales);
    std::copy(k.begin(), k.end(), tr.keys.begin() + static_cast<std::ptrdiff_t>(t) * D);
    Vec q = matvec(w.wq_b, H * D, s.q_lora, &cq[static_cast<std::size_t>(t) * s.q_lora]);
    const Vec hw = matvec(w.weights_proj, H, s.hidden, xt);
    for (int h = 0; h < H; ++h) {
      double* qh = &q[static_cast<std::size_t>(h) * D];
      if (rope.dim > 0) rope_rotate(qh, rope, pos0 + t);
      hadamard(qh, D);
      const double qs = act_quant(qh, D, is.pow2_scales);
      tr.weights[static_cast<std::size_t>(t) * H + h] =
          hw[static_cast<std::size_t>(h)] / std::sqrt(double(H)) * qs / std::sqrt(double(D));
    }
    std::copy(q.begin(), q.end(), tr.queries.begin() + static_cast<std::ptrdiff_t>(t) * H * D);
  }
  tr.scores.assign(static_cast<std::size_t>(n) * n, 0.0);
  for (int t = 0; t < n; ++t) {
    for (int j = 0; j <= t; ++j) {
      double acc = 0.0;
      for (int h = 0; h < H; ++h) {
        double dot = 0.0;
        for (int d = 0; d < D; ++d) {
          dot += tr.queries[(static_cast<std::size_t>(t) * H + h) * D + d] *
                 tr.keys[static_cast<std::size_t>(j) * D + d];
        }
        acc += std::max(dot, 0.0) * tr.weights[static_cast<std::size_t>(t) * H + h];
      }
      tr.scores[static_cast<std::size_t>(t) * n + j] =
          acc * tr.key_scales[static_cast<std::size_t>(j)];
    }
    tr.selected.push_back(top_k(&tr.scores[static_cast<std::size_t>(t) * n], t + 1, is.topk));
  }
  return tr;
}

/// MLA's normalised query latent rms_norm(wq_a x) of each token, [n, q_lora].
inline Vec query_latents(const MlaSpec& s, const MlaWeights& w, const Vec& x, int n) {
  Vec cq;
  for (int t = 0; t < n; ++t) {
    const Vec c =
        rms_norm(matvec(w.wq_a, s.q_lora, s.hidden, &x[static_cast<std::size_t>(t) * s.hidden]),
                 w.q_norm, s.eps);
    cq.insert(cq.end(), c.begin(), c.end());
  }
  return cq;
}

/// DeepSeek-V3.2's attention of the n tokens of x at positions pos0, ...: the indexer selects,
/// MLA attends over the selection (mla_forward's `latents` as there). Fills `indexer` when
/// given.
inline Vec dsa_forward(const MlaSpec& s, const MlaWeights& w, const IndexerSpec& is,
                       const IndexerWeights& iw, const Vec& x, int n, long long pos0,
                       MlaTrace* trace = nullptr, const Vec* latents = nullptr,
                       IndexerTrace* indexer = nullptr) {
  const IndexerTrace tr = indexer_forward(s, is, iw, x, query_latents(s, w, x, n), n, pos0);
  if (indexer) *indexer = tr;
  return mla_forward(s, w, x, n, pos0, trace, latents, &tr.selected);
}

}  // namespace ref
