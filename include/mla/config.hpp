#pragma once
/// \file
/// `MlaConfig`: the runtime dimensions and hyper-parameters of one MLA layer, with the field
/// names of DeepSeek's config.json, plus presets for DeepSeek-V2-Lite, V2 and V3.

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mla/error.hpp"
#include "mla/formats.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// How the rotary part of a query/key is paired for rotation.
enum class RopeLayout : std::uint8_t {
  /// Pairs (x[2i], x[2i+1]): DeepSeek's checkpoints and official inference code.
  kInterleaved,
  /// Pairs (x[i], x[i + R/2]) ("rotate half"): Hugging Face / GPT-NeoX storage order.
  kHalfSplit,
};

/// config.json's `rope_scaling`. `type == kNone` means plain RoPE (the other fields unused).
struct RopeScaling {
  enum class Type : std::uint8_t { kNone, kYarn };
  Type type = Type::kNone;
  double factor = 1.0;                                   ///< context extension factor s
  std::int64_t original_max_position_embeddings = 4096;  ///< pre-extension context length
  double beta_fast = 32.0;      ///< rotations at which the YaRN ramp starts (high frequencies)
  double beta_slow = 1.0;       ///< rotations at which the ramp ends (low frequencies)
  double mscale = 1.0;          ///< HF's cos/sin magnitude numerator (0: absent)
  double mscale_all_dim = 0.0;  ///< softmax-scale mscale; 0 leaves the softmax scale alone
  /// HF's `attention_factor`: the cos/sin magnitude itself; 0 (absent) derives it from mscale
  /// and mscale_all_dim by Hugging Face's rule (see Rope::magnitude).
  double attention_factor = 0.0;
};

/// Llama-4's position-dependent query temperature (Mistral Large 3: rope_parameters'
/// `llama_4_scaling_beta` and `original_max_position_embeddings`): after RoPE, the whole query
/// (nope and rope parts) of the token at position pos is multiplied by
/// 1 + beta * ln(1 + floor(pos / original_max_position_embeddings)). beta 0: no scaling.
struct QueryScaling {
  double beta = 0.0;
  std::int64_t original_max_position_embeddings = 8192;

  bool enabled() const { return beta != 0.0; }
  /// The factor of the query at `pos` (1 when disabled, and below
  /// original_max_position_embeddings).
  double factor(std::int64_t pos) const {
    if (!enabled()) return 1.0;
    const std::int64_t periods = pos / original_max_position_embeddings;
    return 1.0 + beta * std::log1p(static_cast<double>(periods));
  }
};

/// Dimensions and hyper-parameters of one MLA layer. Field names follow DeepSeek's
/// config.json so a loaded config reads line by line against the file.
///
/// Symbols used in the docs: H heads, d_c = kv_lora_rank, d_c' = q_lora_rank,
/// P = qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim.
struct MlaConfig {
  std::int64_t hidden_size = 0;          ///< model width (DeepSeek "dim")
  std::int64_t num_attention_heads = 0;  ///< H
  std::int64_t q_lora_rank = 0;          ///< d_c'; 0 means no query compression (plain wq)
  std::int64_t kv_lora_rank = 0;         ///< d_c, the cached latent width
  std::int64_t qk_nope_head_dim = 0;     ///< P, per-head key/query width without RoPE
  std::int64_t qk_rope_head_dim = 0;     ///< R, the decoupled rotary width (even)
  std::int64_t v_head_dim = 0;           ///< V
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling{};
  std::int64_t max_position_embeddings = 163840;
  /// Layers of the whole model: not used by one layer, but by whole-model cache accounting.
  std::int64_t num_hidden_layers = 1;
  /// Pairing of the rotary dimensions in the weights and in the cached k^R. Not a config.json
  /// field: DeepSeek's own checkpoints are interleaved.
  RopeLayout rope_layout = RopeLayout::kInterleaved;
  /// Explicit RoPE frequencies theta_i (radians per position) of the R/2 pairs, replacing
  /// rope_theta and YaRN's ramp (the magnitude factor of rope_scaling still applies); empty
  /// (the default): computed from rope_theta. Not a config.json field: layers converted with
  /// partial RoPE (mla/convert.hpp) keep a subset of their source's frequencies. 0 is allowed
  /// (a pair that does not turn).
  std::vector<double> rope_inv_freq;
  /// RMSNorm on the KV latent before it is cached (kv_a_layernorm; MlaWeights::kv_norm). Every
  /// DeepSeek model has it; layers converted from MHA (mla/convert.hpp) do not, since a norm is
  /// no linear map and would make the conversion inexact.
  bool kv_latent_norm = true;

  /// DeepSeek-V3.2's sparse attention (DSA, mla/sparse.hpp): the lightning indexer's heads
  /// H_I, their width d_I (a power of two: the Hadamard rotation), and the positions each query
  /// attends to, k. All 0 (the default) means dense MLA; DeepSeek-V3.2: 64, 128, 2048.
  std::int64_t index_n_heads = 0;
  std::int64_t index_head_dim = 0;
  std::int64_t index_topk = 0;
  /// How the indexer's FP8 scales of queries and keys are rounded (config.json's
  /// quantization_config.scale_fmt: "ue8m0" in V3.2 gives powers of two).
  ScaleFormat index_scales = ScaleFormat::kPowerOfTwo;
  /// Pairing of the indexer's RoPE (config.json's `indexer_rope_interleave`): half-split in
  /// DeepSeek-V3.2, interleaved in GLM-5. The frequencies are MLA's.
  RopeLayout index_rope_layout = RopeLayout::kHalfSplit;
  /// This layer has no indexer of its own (GLM-5.1's IndexShare, `indexer_types` "shared"): it
  /// attends sparsely (index_topk > 0) over the top-k selection of the previous layer that has
  /// one, which the caller passes in the workspace (MlaWorkspace::topk_selection). Its cache
  /// holds no index keys of its own.
  bool index_shared = false;

  /// NoPE MLA (config.json's `mla_use_nope`: Kimi Linear, Kimi K3): the R "rope" dimensions of
  /// queries and keys exist, enter q.k and k^R is cached, but nothing is ever rotated. No
  /// position enters attention except through the causal mask.
  bool mla_use_nope = false;
  /// The sigmoid output gate (`mla_use_output_gate`, Kimi K3): before W_o, the H * V per-head
  /// outputs are multiplied elementwise by sigmoid(W_g x) of the same token's input
  /// (MlaWeights::wg, `g_proj`).
  bool mla_use_output_gate = false;
  /// Position-dependent query scaling (Mistral Large 3); disabled by default.
  QueryScaling llama_4_scaling{};
  /// Factors on the normalised latents (LongCat-Flash's `mla_scale_q_lora` /
  /// `mla_scale_kv_lora`: sqrt(hidden_size / q_lora_rank) and sqrt(hidden_size / kv_lora_rank)):
  /// c^Q = q_lora_scale * RMSNorm(W_qa x) and c^KV = kv_lora_scale * RMSNorm(c_raw); the cache
  /// holds the scaled c^KV, k^R is not scaled. 1 (the default): none.
  double q_lora_scale = 1.0;
  double kv_lora_scale = 1.0;

  /// P + R, the per-head query/key width of the expanded path.
  Index qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  /// True when the query goes through its own latent (q_lora_rank > 0).
  bool has_q_lora() const { return q_lora_rank > 0; }
  /// Numbers cached per token and layer: d_c + R.
  Index latent_cache_width() const { return kv_lora_rank + qk_rope_head_dim; }
  /// True for DeepSeek-V3.2-style sparse attention (index_topk > 0), with an indexer of the
  /// layer's own or a shared selection (index_shared).
  bool has_sparse_attention() const { return index_topk > 0; }
  /// True when the layer runs a lightning indexer of its own (sparse, not index_shared): its
  /// weights hold one and its cache keeps index keys.
  bool has_indexer() const { return index_topk > 0 && !index_shared; }

  /// Throws mla::Error naming the first field that holds an impossible value.
  void validate() const;

  /// DeepSeek-V2-Lite: 16 heads, no query compression, YaRN (factor 40, mscale 0.707).
  static MlaConfig deepseek_v2_lite();
  /// DeepSeek-V2: 128 heads, q_lora_rank 1536, YaRN (factor 40, mscale 0.707).
  static MlaConfig deepseek_v2();
  /// DeepSeek-V3 / R1: 128 heads, q_lora_rank 1536, YaRN (factor 40, mscale 1.0).
  static MlaConfig deepseek_v3();
  /// DeepSeek-V3.2: V3's attention plus the lightning indexer (64 heads of 128, top-2048).
  static MlaConfig deepseek_v32();
  /// Test-sized config shaped like V2-Lite (no query compression, mscale 0.707): hidden 64,
  /// 4 heads, d_c 32, P 16, R 8, V 16.
  static MlaConfig small_v2_lite();
  /// Test-sized config shaped like V3 (query compression, mscale 1.0): hidden 64, 4 heads,
  /// d_c' 24, d_c 32, P 16, R 8, V 12.
  static MlaConfig small_v3();
  /// small_v3 with a test-sized indexer: 4 index heads of 16, top-8.
  static MlaConfig small_v32();
};

/// YaRN's magnitude correction (DeepSeek/HF `yarn_get_mscale`): 0.1 * mscale * ln(factor) + 1
/// for factor > 1, else 1.
inline double yarn_get_mscale(double factor, double mscale) {
  return factor <= 1.0 ? 1.0 : 0.1 * mscale * std::log(factor) + 1.0;
}

namespace detail {

inline void require_dim(std::int64_t value, std::int64_t min, const char* field) {
  // The bound keeps every product of dimensions far from overflow.
  constexpr std::int64_t kMax = std::int64_t{1} << 24;
  require(value >= min && value <= kMax, "MlaConfig.", field, " must be in [", min, ", ", kMax,
          "], got ", value);
}

inline void require_finite(double value, double min_exclusive, const char* field) {
  require(std::isfinite(value) && value > min_exclusive, "MlaConfig.", field,
          " must be a finite number > ", min_exclusive, ", got ", value);
}

/// DeepSeek's YaRN defaults (all published V2/V3 configs share them but mscale).
inline RopeScaling deepseek_yarn(double mscale) {
  RopeScaling s;
  s.type = RopeScaling::Type::kYarn;
  s.factor = 40.0;
  s.original_max_position_embeddings = 4096;
  s.beta_fast = 32.0;
  s.beta_slow = 1.0;
  s.mscale = mscale;
  s.mscale_all_dim = mscale;
  return s;
}

}  // namespace detail

inline void MlaConfig::validate() const {
  using detail::require;
  detail::require_dim(hidden_size, 1, "hidden_size");
  detail::require_dim(num_attention_heads, 1, "num_attention_heads");
  detail::require_dim(q_lora_rank, 0, "q_lora_rank");
  detail::require_dim(kv_lora_rank, 1, "kv_lora_rank");
  detail::require_dim(qk_nope_head_dim, 0, "qk_nope_head_dim");
  detail::require_dim(qk_rope_head_dim, 0, "qk_rope_head_dim");
  detail::require_dim(v_head_dim, 1, "v_head_dim");
  require(qk_rope_head_dim % 2 == 0,
          "MlaConfig.qk_rope_head_dim must be even (RoPE rotates pairs), got ", qk_rope_head_dim);
  require(qk_nope_head_dim + qk_rope_head_dim > 0,
          "MlaConfig.qk_nope_head_dim + qk_rope_head_dim must be > 0, got 0");
  detail::require_finite(rms_norm_eps, 0.0, "rms_norm_eps");
  detail::require_finite(rope_theta, 0.0, "rope_theta");
  require(rope_inv_freq.empty() || static_cast<Index>(rope_inv_freq.size()) * 2 == qk_rope_head_dim,
          "MlaConfig.rope_inv_freq must be empty or hold qk_rope_head_dim / 2 = ",
          qk_rope_head_dim / 2, " frequencies, got ", rope_inv_freq.size());
  for (double f : rope_inv_freq) {
    require(std::isfinite(f) && f >= 0.0,
            "MlaConfig.rope_inv_freq must hold finite frequencies >= 0, got ", f);
  }
  detail::require_dim(max_position_embeddings, 1, "max_position_embeddings");
  detail::require_dim(num_hidden_layers, 1, "num_hidden_layers");
  if (index_n_heads != 0 || index_head_dim != 0 || index_topk != 0) {
    detail::require_dim(index_n_heads, 1, "index_n_heads");
    detail::require_dim(index_head_dim, 1, "index_head_dim");
    detail::require_dim(index_topk, 1, "index_topk");
    require((index_head_dim & (index_head_dim - 1)) == 0 && index_head_dim <= 8192,
            "MlaConfig.index_head_dim must be a power of two up to 8192 (the indexer's Hadamard "
            "rotation), got ",
            index_head_dim);
    require(index_head_dim >= qk_rope_head_dim, "MlaConfig.index_head_dim (", index_head_dim,
            ") must hold the rotary part of qk_rope_head_dim = ", qk_rope_head_dim, " values");
    require(q_lora_rank > 0,
            "MlaConfig: the indexer (index_topk > 0) reads the query latent, so q_lora_rank must "
            "be > 0");
  }
  require(!index_shared || index_topk > 0,
          "MlaConfig.index_shared needs sparse attention (index_topk > 0)");
  require(std::isfinite(llama_4_scaling.beta),
          "MlaConfig.llama_4_scaling.beta must be finite, got ", llama_4_scaling.beta);
  require(!llama_4_scaling.enabled() || llama_4_scaling.original_max_position_embeddings > 0,
          "MlaConfig.llama_4_scaling.original_max_position_embeddings must be > 0, got ",
          llama_4_scaling.original_max_position_embeddings);
  detail::require_finite(q_lora_scale, 0.0, "q_lora_scale");
  detail::require_finite(kv_lora_scale, 0.0, "kv_lora_scale");
  require(q_lora_scale == 1.0 || q_lora_rank > 0,
          "MlaConfig.q_lora_scale scales the query latent, so q_lora_rank must be > 0");
  if (rope_scaling.type == RopeScaling::Type::kYarn) {
    // What DeepSeek's and HF's YaRN accept: every logarithm and quotient in the frequency ramp
    // and the mscale factors defined. No order between beta_fast and beta_slow is required
    // (equal betas, as some DeepSeek-V3-based models publish, make low == high, which the ramp
    // handles by adding 0.001 to high).
    require(rope_theta != 1.0,
            "MlaConfig.rope_theta must not be 1 under YaRN (its correction range divides by "
            "log(rope_theta))");
    detail::require_finite(rope_scaling.factor, 0.0, "rope_scaling.factor");
    require(rope_scaling.original_max_position_embeddings > 0,
            "MlaConfig.rope_scaling.original_max_position_embeddings must be > 0, got ",
            rope_scaling.original_max_position_embeddings);
    detail::require_finite(rope_scaling.beta_fast, 0.0, "rope_scaling.beta_fast");
    detail::require_finite(rope_scaling.beta_slow, 0.0, "rope_scaling.beta_slow");
    require(std::isfinite(rope_scaling.mscale),
            "MlaConfig.rope_scaling.mscale must be finite, got ", rope_scaling.mscale);
    require(std::isfinite(rope_scaling.mscale_all_dim),
            "MlaConfig.rope_scaling.mscale_all_dim must be finite, got ",
            rope_scaling.mscale_all_dim);
    require(std::isfinite(rope_scaling.attention_factor) && rope_scaling.attention_factor >= 0.0,
            "MlaConfig.rope_scaling.attention_factor must be a finite number >= 0 (0: derived), "
            "got ",
            rope_scaling.attention_factor);
    // RoPE's magnitude divides by 0.1 * mscale_all_dim * ln(factor) + 1 (for factor > 1).
    require(yarn_get_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim) != 0.0,
            "MlaConfig.rope_scaling: 0.1 * mscale_all_dim * ln(factor) + 1 is 0 (mscale_all_dim ",
            rope_scaling.mscale_all_dim, ", factor ", rope_scaling.factor,
            "), and RoPE's cos/sin magnitude divides by it");
  }
}

inline MlaConfig MlaConfig::deepseek_v2_lite() {
  MlaConfig c;
  c.hidden_size = 2048;
  c.num_attention_heads = 16;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.rope_scaling = detail::deepseek_yarn(0.707);
  c.num_hidden_layers = 27;
  return c;
}

inline MlaConfig MlaConfig::deepseek_v2() {
  MlaConfig c = deepseek_v2_lite();
  c.hidden_size = 5120;
  c.num_attention_heads = 128;
  c.q_lora_rank = 1536;
  c.num_hidden_layers = 60;
  return c;
}

inline MlaConfig MlaConfig::deepseek_v3() {
  MlaConfig c = deepseek_v2();
  c.hidden_size = 7168;
  c.rope_scaling = detail::deepseek_yarn(1.0);
  c.num_hidden_layers = 61;
  return c;
}

inline MlaConfig MlaConfig::deepseek_v32() {
  MlaConfig c = deepseek_v3();
  c.index_n_heads = 64;
  c.index_head_dim = 128;
  c.index_topk = 2048;
  return c;
}

inline MlaConfig MlaConfig::small_v2_lite() {
  MlaConfig c;
  c.hidden_size = 64;
  c.num_attention_heads = 4;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.rope_scaling = detail::deepseek_yarn(0.707);
  c.num_hidden_layers = 2;
  return c;
}

inline MlaConfig MlaConfig::small_v3() {
  MlaConfig c = small_v2_lite();
  c.q_lora_rank = 24;
  c.v_head_dim = 12;  // differs from P, so a mix-up of the two is caught
  c.rope_scaling = detail::deepseek_yarn(1.0);
  return c;
}

inline MlaConfig MlaConfig::small_v32() {
  MlaConfig c = small_v3();
  c.index_n_heads = 4;
  c.index_head_dim = 16;
  c.index_topk = 8;
  return c;
}

}  // namespace mla
