#pragma once
// Plain-loop double references of DeepSeek's Multi-Head Latent Attention and of standard
// multi-head attention, written from the published math (DeepSeek-V2/V3 papers and their
// inference code; the other MLA families' Hugging Face modeling code, as ../shared/FAMILIES.md
// transcribes it) and sharing no code with the library. Slow and obvious on purpose.
//
// Matrices are std::vector<double>, row-major; a weight W [out, in] maps x to W x.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

namespace ref {

using Vec = std::vector<double>;

/// RoPE parameters: rotary width, base, YaRN settings, pairing.
struct RopeSpec {
  int dim = 0;  // R
  double theta = 10000.0;
  bool yarn = false;
  double factor = 1.0;
  double original_max_pos = 4096.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  double attention_factor = 0.0;  // HF's attention_factor; 0: absent
  bool interleaved = true;        // pairs (2i, 2i+1); otherwise (i, i + R/2)
  std::vector<double> inv_freq;   // explicit frequencies per pair (then theta and YaRN unused)
};

/// The dimensions of DeepSeek's attention, with config.json's meaning, and the other MLA
/// families' changes to it.
struct MlaSpec {
  int hidden = 0, heads = 0, q_lora = 0, kv_lora = 0, nope = 0, v = 0;
  double eps = 1e-6;
  RopeSpec rope;
  /// Kimi's NoPE MLA (mla_use_nope): the rope dims are used and cached, never rotated.
  bool no_rope = false;
  /// Kimi K3's output gate: o_h *= sigmoid(g_proj x), per value, before o_proj.
  bool output_gate = false;
  /// Mistral Large 3's Llama-4 query scaling: the query of position pos (after RoPE) times
  /// 1 + beta ln(1 + floor(pos / orig)); beta 0: none.
  double llama4_beta = 0.0;
  long long llama4_orig = 8192;
  /// LongCat-Flash: the query latent after its norm times q_lora_scale, the KV latent after its
  /// norm (and in the cache) times kv_lora_scale.
  double q_lora_scale = 1.0, kv_lora_scale = 1.0;
};

/// The weights of one layer (empty vectors for the unused query path and gate).
struct MlaWeights {
  Vec wq, wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo, wg;
};

inline double yarn_mscale(double scale, double m) {
  if (scale <= 1.0) return 1.0;
  return 0.1 * m * std::log(scale) + 1.0;
}

/// Frequencies of the R/2 rotary pairs: base^(-2i/R), blended with base^(-2i/R) / factor by
/// YaRN's linear ramp between the correction dimensions of beta_fast and beta_slow.
inline Vec rope_frequencies(const RopeSpec& r) {
  if (!r.inv_freq.empty()) return r.inv_freq;
  const int half = r.dim / 2;
  Vec f(half);
  const double pi = std::acos(-1.0);
  auto corr_dim = [&](double rotations) {
    return r.dim * std::log(r.original_max_pos / (rotations * 2.0 * pi)) /
           (2.0 * std::log(r.theta));
  };
  double low = std::max(std::floor(corr_dim(r.beta_fast)), 0.0);
  double high = std::min(std::ceil(corr_dim(r.beta_slow)), r.dim - 1.0);
  if (low == high) high += 0.001;
  for (int i = 0; i < half; ++i) {
    const double base_freq = 1.0 / std::pow(r.theta, (2.0 * i) / r.dim);
    if (!r.yarn) {
      f[i] = base_freq;
      continue;
    }
    double ramp = (i - low) / (high - low);
    ramp = std::min(1.0, std::max(0.0, ramp));
    // ramp 0: keep the original frequency (extrapolate); ramp 1: interpolate (divide).
    f[i] = (base_freq / r.factor) * ramp + base_freq * (1.0 - ramp);
  }
  return f;
}

/// The factor HF multiplies cos and sin by (transformers' _compute_yarn_parameters): the
/// attention_factor it is given, else mscale(f, mscale) / mscale(f, mscale_all_dim) when both
/// are set (non-zero), else mscale(f, 1).
inline double rope_magnitude(const RopeSpec& r) {
  if (!r.yarn) return 1.0;
  if (r.attention_factor > 0.0) return r.attention_factor;
  if (r.mscale != 0.0 && r.mscale_all_dim != 0.0) {
    return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim);
  }
  return yarn_mscale(r.factor, 1.0);
}

/// Rotates the R values at x by position pos.
inline void rope_rotate(double* x, const RopeSpec& r, long long pos) {
  const Vec f = rope_frequencies(r);
  const double mag = rope_magnitude(r);
  const int half = r.dim / 2;
  for (int i = 0; i < half; ++i) {
    const double angle = static_cast<double>(pos) * f[i];
    const double c = std::cos(angle) * mag, s = std::sin(angle) * mag;
    const int a = r.interleaved ? 2 * i : i;
    const int b = r.interleaved ? 2 * i + 1 : i + half;
    const double xa = x[a], xb = x[b];
    x[a] = xa * c - xb * s;
    x[b] = xa * s + xb * c;
  }
}

/// y = W x for one vector; W [out, in].
inline Vec matvec(const Vec& w, int out, int in, const double* x) {
  Vec y(out, 0.0);
  for (int o = 0; o < out; ++o) {
    double acc = 0.0;
    for (int i = 0; i < in; ++i) acc += w[static_cast<std::size_t>(o) * in + i] * x[i];
    y[o] = acc;
  }
  return y;
}

/// x / sqrt(mean(x^2) + eps) * gamma.
inline Vec rms_norm(const Vec& x, const Vec& gamma, double eps) {
  double ss = 0.0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  Vec y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * gamma[i];
  return y;
}

/// Softmax scale: (P + R)^-1/2, times mscale^2 when YaRN sets mscale_all_dim.
inline double mla_softmax_scale(const MlaSpec& s) {
  double scale = 1.0 / std::sqrt(static_cast<double>(s.nope + s.rope.dim));
  if (s.rope.yarn && s.rope.mscale_all_dim != 0.0) {
    const double m = yarn_mscale(s.rope.factor, s.rope.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

/// Per query token, the key tokens it attends to (sparse attention); empty: causal, all j <= i.
using KeySets = std::vector<std::vector<int>>;

/// Causal attention of one head: q [n, dk], k [n, dk], v [n, dv] for the n tokens of a
/// sequence, query i seeing keys 0..i (or only keys_of[i], when given). Returns [n, dv];
/// lse[i] = log sum_j exp(scale q_i.k_j).
inline Vec causal_attention(const Vec& q, const Vec& k, const Vec& v, int n, int dk, int dv,
                            double scale, Vec* lse, const KeySets* keys_of = nullptr) {
  Vec out(static_cast<std::size_t>(n) * dv, 0.0);
  if (lse) lse->assign(n, 0.0);
  for (int i = 0; i < n; ++i) {
    std::vector<int> keys;
    if (keys_of) {
      keys = (*keys_of)[static_cast<std::size_t>(i)];
    } else {
      for (int j = 0; j <= i; ++j) keys.push_back(j);
    }
    Vec s(static_cast<std::size_t>(i) + 1, -INFINITY);
    double mx = -INFINITY;
    for (int j : keys) {
      double dot = 0.0;
      for (int d = 0; d < dk; ++d) {
        dot += q[static_cast<std::size_t>(i) * dk + d] * k[static_cast<std::size_t>(j) * dk + d];
      }
      s[j] = scale * dot;
      mx = std::max(mx, s[j]);
    }
    double sum = 0.0;
    for (int j : keys) sum += std::exp(s[j] - mx);
    for (int j : keys) {
      const double p = std::exp(s[j] - mx) / sum;
      for (int d = 0; d < dv; ++d) {
        out[static_cast<std::size_t>(i) * dv + d] += p * v[static_cast<std::size_t>(j) * dv + d];
      }
    }
    if (lse) (*lse)[i] = mx + std::log(sum);
  }
  return out;
}

/// What the reference MLA produces besides its output.
struct MlaTrace {
  Vec lse;     // [n, heads]
  Vec latent;  // [n, kv_lora + R]: the cache, [c^KV ; k^R] per token
};

/// DeepSeek MLA for the n tokens of x [n, hidden] at positions pos0 .. pos0 + n - 1, each
/// attending causally to itself and the tokens before it (all computed from scratch, by
/// rebuilding per-head keys and values). Returns u [n, hidden].
///
/// With `latents` ([n, kv_lora + R], [c^KV ; k^R] per token), attention uses those cached
/// values instead of the ones computed from x: the reference run on a given (e.g. dequantised)
/// cache.
///
/// With `keys_of`, token i attends only to the tokens keys_of[i] (all <= i): sparse attention.
inline Vec mla_forward(const MlaSpec& s, const MlaWeights& w, const Vec& x, int n, long long pos0,
                       MlaTrace* trace = nullptr, const Vec* latents = nullptr,
                       const KeySets* keys_of = nullptr) {
  const int H = s.heads, P = s.nope, R = s.rope.dim, V = s.v, D = s.kv_lora;
  const int QK = P + R;
  Vec q(static_cast<std::size_t>(n) * H * QK), c_kv(static_cast<std::size_t>(n) * D),
      k_pe(static_cast<std::size_t>(n) * R);
  for (int t = 0; t < n; ++t) {
    const double* xt = &x[static_cast<std::size_t>(t) * s.hidden];
    // Query, through its own latent when q_lora_rank > 0.
    Vec qt;
    if (s.q_lora > 0) {
      Vec cq = rms_norm(matvec(w.wq_a, s.q_lora, s.hidden, xt), w.q_norm, s.eps);
      for (double& v : cq) v *= s.q_lora_scale;
      qt = matvec(w.wq_b, H * QK, s.q_lora, cq.data());
    } else {
      qt = matvec(w.wq, H * QK, s.hidden, xt);
    }
    if (!s.no_rope && R > 0) {
      for (int h = 0; h < H; ++h)
        rope_rotate(&qt[static_cast<std::size_t>(h) * QK + P], s.rope, pos0 + t);
    }
    if (s.llama4_beta != 0.0) {
      const double periods = std::floor(static_cast<double>(pos0 + t) / s.llama4_orig);
      const double f = 1.0 + s.llama4_beta * std::log(1.0 + periods);
      for (double& v : qt) v *= f;
    }
    std::copy(qt.begin(), qt.end(), q.begin() + static_cast<std::ptrdiff_t>(t) * H * QK);
    // Latent: [c_raw ; k_raw] = W_kva x, c = RMSNorm(c_raw), k^R = RoPE(k_raw).
    Vec kv = matvec(w.wkv_a, D + R, s.hidden, xt);
    Vec c = rms_norm(Vec(kv.begin(), kv.begin() + D), w.kv_norm, s.eps);
    for (double& v : c) v *= s.kv_lora_scale;
    Vec kr(kv.begin() + D, kv.end());
    if (R > 0 && !s.no_rope) rope_rotate(kr.data(), s.rope, pos0 + t);
    std::copy(c.begin(), c.end(), c_kv.begin() + static_cast<std::ptrdiff_t>(t) * D);
    std::copy(kr.begin(), kr.end(), k_pe.begin() + static_cast<std::ptrdiff_t>(t) * R);
    if (latents) {  // attend over the given cache contents instead
      const double* l = &(*latents)[static_cast<std::size_t>(t) * (D + R)];
      std::copy(l, l + D, c_kv.begin() + static_cast<std::ptrdiff_t>(t) * D);
      std::copy(l + D, l + D + R, k_pe.begin() + static_cast<std::ptrdiff_t>(t) * R);
    }
  }
  const double scale = mla_softmax_scale(s);
  Vec o(static_cast<std::size_t>(n) * H * V);
  if (trace) trace->lse.assign(static_cast<std::size_t>(n) * H, 0.0);
  for (int h = 0; h < H; ++h) {
    // Rebuild this head's keys [W_UK c ; k^R] and values W_UV c for every token.
    Vec qh(static_cast<std::size_t>(n) * QK), kh(static_cast<std::size_t>(n) * QK),
        vh(static_cast<std::size_t>(n) * V);
    for (int t = 0; t < n; ++t) {
      for (int d = 0; d < QK; ++d) {
        qh[static_cast<std::size_t>(t) * QK + d] =
            q[(static_cast<std::size_t>(t) * H + h) * QK + d];
      }
      for (int p = 0; p < P; ++p) {
        double acc = 0.0;
        for (int i = 0; i < D; ++i) {
          acc += w.wkv_b[(static_cast<std::size_t>(h) * (P + V) + p) * D + i] *
                 c_kv[static_cast<std::size_t>(t) * D + i];
        }
        kh[static_cast<std::size_t>(t) * QK + p] = acc;
      }
      for (int r = 0; r < R; ++r) {
        kh[static_cast<std::size_t>(t) * QK + P + r] = k_pe[static_cast<std::size_t>(t) * R + r];
      }
      for (int e = 0; e < V; ++e) {
        double acc = 0.0;
        for (int i = 0; i < D; ++i) {
          acc += w.wkv_b[(static_cast<std::size_t>(h) * (P + V) + P + e) * D + i] *
                 c_kv[static_cast<std::size_t>(t) * D + i];
        }
        vh[static_cast<std::size_t>(t) * V + e] = acc;
      }
    }
    Vec lse_h;
    const Vec oh = causal_attention(qh, kh, vh, n, QK, V, scale, &lse_h, keys_of);
    for (int t = 0; t < n; ++t) {
      for (int e = 0; e < V; ++e) {
        o[(static_cast<std::size_t>(t) * H + h) * V + e] = oh[static_cast<std::size_t>(t) * V + e];
      }
      if (trace) trace->lse[static_cast<std::size_t>(t) * H + h] = lse_h[t];
    }
  }
  if (trace) {
    trace->latent.assign(static_cast<std::size_t>(n) * (D + R), 0.0);
    for (int t = 0; t < n; ++t) {
      for (int i = 0; i < D; ++i) {
        trace->latent[static_cast<std::size_t>(t) * (D + R) + i] =
            c_kv[static_cast<std::size_t>(t) * D + i];
      }
      for (int r = 0; r < R; ++r) {
        trace->latent[static_cast<std::size_t>(t) * (D + R) + D + r] =
            k_pe[static_cast<std::size_t>(t) * R + r];
      }
    }
  }
  if (s.output_gate) {
    // Each of the H * V outputs times the sigmoid of its gate, from the same token's input.
    for (int t = 0; t < n; ++t) {
      const Vec g = matvec(w.wg, H * V, s.hidden, &x[static_cast<std::size_t>(t) * s.hidden]);
      for (int i = 0; i < H * V; ++i) {
        o[static_cast<std::size_t>(t) * H * V + i] *= 1.0 / (1.0 + std::exp(-g[i]));
      }
    }
  }
  Vec u(static_cast<std::size_t>(n) * s.hidden);
  for (int t = 0; t < n; ++t) {
    const Vec ut = matvec(w.wo, s.hidden, H * V, &o[static_cast<std::size_t>(t) * H * V]);
    std::copy(ut.begin(), ut.end(), u.begin() + static_cast<std::ptrdiff_t>(t) * s.hidden);
  }
  return u;
}

/// Standard multi-head attention with RoPE on the last R dimensions of every head's query and
/// key: per head h, q_h = Wq_h x, k_h = Wk_h x, v_h = Wv_h x (weights [H * dk, hidden] and
/// [H * dv, hidden]), causal softmax with the given scale, u = Wo [o_1 .. o_H].
struct MhaSpec {
  int hidden = 0, heads = 0, dk = 0, dv = 0;
  double scale = 0.0;
  RopeSpec rope;  // applied to dimensions [dk - R, dk) of every head
};

inline Vec mha_forward(const MhaSpec& s, const Vec& wq, const Vec& wk, const Vec& wv, const Vec& wo,
                       const Vec& x, int n, long long pos0) {
  const int H = s.heads, R = s.rope.dim;
  Vec o(static_cast<std::size_t>(n) * H * s.dv);
  for (int h = 0; h < H; ++h) {
    Vec qh(static_cast<std::size_t>(n) * s.dk), kh(static_cast<std::size_t>(n) * s.dk),
        vh(static_cast<std::size_t>(n) * s.dv);
    for (int t = 0; t < n; ++t) {
      const double* xt = &x[static_cast<std::size_t>(t) * s.hidden];
      for (int d = 0; d < s.dk; ++d) {
        double aq = 0.0, ak = 0.0;
        for (int i = 0; i < s.hidden; ++i) {
          aq += wq[(static_cast<std::size_t>(h) * s.dk + d) * s.hidden + i] * xt[i];
          ak += wk[(static_cast<std::size_t>(h) * s.dk + d) * s.hidden + i] * xt[i];
        }
        qh[static_cast<std::size_t>(t) * s.dk + d] = aq;
        kh[static_cast<std::size_t>(t) * s.dk + d] = ak;
      }
      for (int e = 0; e < s.dv; ++e) {
        double av = 0.0;
        for (int i = 0; i < s.hidden; ++i) {
          av += wv[(static_cast<std::size_t>(h) * s.dv + e) * s.hidden + i] * xt[i];
        }
        vh[static_cast<std::size_t>(t) * s.dv + e] = av;
      }
      if (R > 0) {
        rope_rotate(&qh[static_cast<std::size_t>(t) * s.dk + s.dk - R], s.rope, pos0 + t);
        rope_rotate(&kh[static_cast<std::size_t>(t) * s.dk + s.dk - R], s.rope, pos0 + t);
      }
    }
    const Vec oh = causal_attention(qh, kh, vh, n, s.dk, s.dv, s.scale, nullptr);
    for (int t = 0; t < n; ++t) {
      for (int e = 0; e < s.dv; ++e) {
        o[(static_cast<std::size_t>(t) * H + h) * s.dv + e] =
            oh[static_cast<std::size_t>(t) * s.dv + e];
      }
    }
  }
  Vec u(static_cast<std::size_t>(n) * s.hidden);
  for (int t = 0; t < n; ++t) {
    const Vec ut = matvec(wo, s.hidden, H * s.dv, &o[static_cast<std::size_t>(t) * H * s.dv]);
    std::copy(ut.begin(), ut.end(), u.begin() + static_cast<std::ptrdiff_t>(t) * s.hidden);
  }
  return u;
}

}  // namespace ref
