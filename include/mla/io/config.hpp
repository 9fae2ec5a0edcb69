#pragma once
/// \file
/// A model's config.json (Hugging Face format) to MlaConfig: the model families whose attention
/// is MLA (DeepSeek-V2 / V3 / V3.2, GLM-4.7-Flash, GLM-5, Mistral Large 3, LongCat-Flash, Kimi
/// Linear, Kimi K3), each read by its own rules, and what the checkpoint's quantisation and
/// tensor layout look like. Strict where it matters: a model type the library does not
/// implement, or a field whose value changes the attention in a way it does not implement, is
/// an mla::Error naming the field and the value, never a silent default. Fields that do not
/// touch attention (mixture-of-experts settings, vocabulary, ...) are ignored.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/io/checkpoint.hpp"

namespace mla::io {

/// The model families mla::io reads, by config.json's `model_type`.
enum class ModelFamily : std::uint8_t {
  kDeepSeekV2,    ///< deepseek_v2 (V2, V2-Lite)
  kDeepSeekV3,    ///< deepseek_v3 (V3, R1, V3.1), kimi_k2 (Kimi K2: V3's attention)
  kDeepSeekV32,   ///< deepseek_v32 (V3.2: V3 plus the lightning indexer)
  kGlm4MoeLite,   ///< glm4_moe_lite (GLM-4.7-Flash: P 192, V 256)
  kGlmMoeDsa,     ///< glm_moe_dsa (GLM-5, GLM-5.1: the indexer with interleaved RoPE)
  kMistral4,      ///< mistral4 (Mistral Large 3: YaRN, Llama-4 query scaling)
  kLongcatFlash,  ///< longcat_flash (two MLA blocks per layer, scaled latents)
  kKimiLinear,    ///< kimi_linear (NoPE MLA on full_attn_layers, KDA elsewhere)
  kKimiK3,        ///< kimi_k3 (a kimi_linear text_config with the output gate)
};

/// The model_type string of a family (kimi_k2 reads as kDeepSeekV3 and prints as deepseek_v3).
inline const char* to_string(ModelFamily f) {
  switch (f) {
    case ModelFamily::kDeepSeekV2:
      return "deepseek_v2";
    case ModelFamily::kDeepSeekV3:
      return "deepseek_v3";
    case ModelFamily::kDeepSeekV32:
      return "deepseek_v32";
    case ModelFamily::kGlm4MoeLite:
      return "glm4_moe_lite";
    case ModelFamily::kGlmMoeDsa:
      return "glm_moe_dsa";
    case ModelFamily::kMistral4:
      return "mistral4";
    case ModelFamily::kLongcatFlash:
      return "longcat_flash";
    case ModelFamily::kKimiLinear:
      return "kimi_linear";
    case ModelFamily::kKimiK3:
      return "kimi_k3";
  }
  return "unknown";
}

/// What config.json says about the model's attention and about the checkpoint's weights.
struct CheckpointConfig {
  /// An MLA block of the model (layer_config(l) adds what differs per layer). num_hidden_layers
  /// counts the model's MLA blocks, which is what whole-model cache accounting multiplies by
  /// (LongCat: 2 per decoder layer; Kimi: only full_attn_layers).
  MlaConfig mla;
  ModelFamily family = ModelFamily::kDeepSeekV3;
  std::string model_type;  ///< as config.json spells it (the top level's for Kimi K3)
  /// Tensor names: layer_prefix + L + ".self_attn." (+ block + "." with several blocks).
  std::string layer_prefix = "model.layers.";
  Index num_layers = 0;        ///< decoder layers (num_hidden_layers; LongCat's num_layers)
  Index attention_blocks = 1;  ///< MLA blocks per decoder layer (LongCat-Flash: 2)
  /// The decoder layers whose attention is MLA, ascending (all of them but in Kimi models, whose
  /// others are KDA linear attention).
  std::vector<Index> mla_layers;
  /// Per decoder layer of a sparse (DSA) model: true where the layer has no indexer and reuses
  /// the previous full layer's top-k (GLM-5.1's indexer_types "shared"). Empty: none.
  std::vector<bool> index_shared;

  /// quantization_config {quant_method "fp8", fmt "e4m3"}: projection weights are F8_E4M3
  /// with weight_scale_inv tensors.
  bool fp8_weights = false;
  Index weight_block_rows = 128;  ///< quantization_config.weight_block_size[0]
  Index weight_block_cols = 128;  ///< quantization_config.weight_block_size[1]
  /// quantization_config.scale_fmt: "ue8m0" (DeepSeek-V3.1 / V3.2) makes the W8A8 activation
  /// scales powers of two (kPowerOfTwo); absent or null, they are any FP32 value.
  ScaleFormat activation_scales = ScaleFormat::kFloat32;

  /// True when decoder layer `layer` has MLA attention.
  bool is_mla_layer(Index layer) const {
    return std::binary_search(mla_layers.begin(), mla_layers.end(), layer);
  }
  /// The MlaConfig of decoder layer `layer` (mla, with index_shared as that layer has it).
  MlaConfig layer_config(Index layer) const {
    MlaConfig c = mla;
    if (layer >= 0 && layer < static_cast<Index>(index_shared.size())) {
      c.index_shared = index_shared[static_cast<std::size_t>(layer)];
    }
    return c;
  }
  /// The prefix of the attention tensors of (layer, block): e.g. "model.layers.3.self_attn."
  /// or, with several blocks per layer, "model.layers.3.self_attn.1.".
  std::string attention_prefix(Index layer, Index block = 0) const {
    std::string p = layer_prefix + std::to_string(layer) + ".self_attn.";
    if (attention_blocks > 1) p += std::to_string(block) + ".";
    return p;
  }
};

namespace detail {

/// Typed access to the fields of one JSON object, with messages that name the source and the
/// field's path (`prefix` + field: "text_config.hidden_size").
class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string source, std::string prefix = "")
      : j_(j), source_(std::move(source)), prefix_(std::move(prefix)) {}

  const nlohmann::json* find(const nlohmann::json& obj, const char* field) const {
    const auto it = obj.find(field);
    return it == obj.end() ? nullptr : &*it;
  }
  /// The field of the root object, absent or null both as nullptr.
  const nlohmann::json* value(const char* field) const {
    const nlohmann::json* v = find(j_, field);
    return v == nullptr || v->is_null() ? nullptr : v;
  }
  /// The printable path of a root field.
  std::string path(const char* field) const { return prefix_ + field; }

  std::int64_t integer(const nlohmann::json& obj, const char* field,
                       const std::string& path) const {
    const nlohmann::json* v = find(obj, field);
    mla::detail::require(v != nullptr, source_, ": missing field '", path, "'");
    // JSON integers beyond int64 arrive as unsigned (up to 2^64 - 1) or, larger still, as
    // floating-point numbers: name them as too large rather than wrap them around.
    constexpr auto kMax = static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max());
    mla::detail::require(!v->is_number_unsigned() || v->get<std::uint64_t>() <= kMax, source_,
                         ": field '", path, "' = ", v->dump(),
                         " overflows a 64-bit signed integer");
    mla::detail::require(!v->is_number_float() || std::fabs(v->get<double>()) < 0x1p63, source_,
                         ": field '", path, "' = ", v->dump(),
                         " is not an integer (and beyond the 64-bit signed range)");
    mla::detail::require(v->is_number_integer(), source_, ": field '", path,
                         "' must be an integer, got ", v->dump());
    return v->get<std::int64_t>();
  }
  std::int64_t integer(const char* field) const { return integer(j_, field, path(field)); }

  std::int64_t integer_or(const nlohmann::json& obj, const char* field, std::int64_t fallback,
                          const std::string& path) const {
    const nlohmann::json* v = find(obj, field);
    return v == nullptr || v->is_null() ? fallback : integer(obj, field, path);
  }

  double number_or(const nlohmann::json& obj, const char* field, double fallback,
                   const std::string& path) const {
    const nlohmann::json* v = find(obj, field);
    if (v == nullptr || v->is_null()) return fallback;
    mla::detail::require(v->is_number(), source_, ": field '", path, "' must be a number, got ",
                         v->dump());
    return v->get<double>();
  }

  bool boolean_or(const nlohmann::json& obj, const char* field, bool fallback,
                  const std::string& path) const {
    const nlohmann::json* v = find(obj, field);
    if (v == nullptr || v->is_null()) return fallback;
    mla::detail::require(v->is_boolean(), source_, ": field '", path,
                         "' must be true or false, got ", v->dump());
    return v->get<bool>();
  }
  bool boolean_or(const char* field, bool fallback) const {
    return boolean_or(j_, field, fallback, path(field));
  }

  std::string string_or(const nlohmann::json& obj, const char* field, const std::string& fallback,
                        const std::string& path) const {
    const nlohmann::json* v = find(obj, field);
    if (v == nullptr || v->is_null()) return fallback;
    mla::detail::require(v->is_string(), source_, ": field '", path, "' must be a string, got ",
                         v->dump());
    return v->get<std::string>();
  }

  /// Throws "<source>: <path> = <value>: <why>".
  template <class... Why>
  [[noreturn]] void refuse(const std::string& path, const nlohmann::json& value,
                           const Why&... why) const {
    mla::detail::fail(source_, ": ", path, " = ", value.dump(), ": ", why...);
  }

  const nlohmann::json& root() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  const nlohmann::json& j_;
  std::string source_;
  std::string prefix_;
};

/// `text` parsed as a JSON object; throws mla::Error naming `source` otherwise.
inline nlohmann::json parse_json_object(const std::string& text, const std::string& source) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    mla::detail::fail(source, ": malformed JSON: ", e.what());
  }
  mla::detail::require(j.is_object(), source, ": must be a JSON object");
  return j;
}

/// The family of a model_type, or false for a type the library does not implement.
inline bool family_of(const std::string& type, ModelFamily& f) {
  static const std::pair<const char*, ModelFamily> kTypes[] = {
      {"deepseek_v2", ModelFamily::kDeepSeekV2},    {"deepseek_v3", ModelFamily::kDeepSeekV3},
      {"kimi_k2", ModelFamily::kDeepSeekV3},        {"deepseek_v32", ModelFamily::kDeepSeekV32},
      {"glm4_moe_lite", ModelFamily::kGlm4MoeLite}, {"glm_moe_dsa", ModelFamily::kGlmMoeDsa},
      {"mistral4", ModelFamily::kMistral4},         {"longcat_flash", ModelFamily::kLongcatFlash},
      {"kimi_linear", ModelFamily::kKimiLinear},    {"kimi_k3", ModelFamily::kKimiK3}};
  for (const auto& [name, family] : kTypes) {
    if (type == name) {
      f = family;
      return true;
    }
  }
  return false;
}

inline constexpr const char* kModelTypes =
    "deepseek_v2, deepseek_v3, kimi_k2, deepseek_v32, glm4_moe_lite, glm_moe_dsa, mistral4, "
    "longcat_flash, kimi_linear, kimi_k3";

inline bool is_dsa(ModelFamily f) {
  return f == ModelFamily::kDeepSeekV32 || f == ModelFamily::kGlmMoeDsa;
}
inline bool is_kimi(ModelFamily f) {
  return f == ModelFamily::kKimiLinear || f == ModelFamily::kKimiK3;
}

/// The RoPE of a config: rope_parameters (transformers' newer form: type, theta and scaling in
/// one object) or rope_theta + rope_scaling; partial_rotary_factor; the pairing.
inline void read_rope(const ConfigReader& r, ModelFamily family, MlaConfig& c) {
  const nlohmann::json* rp = r.value("rope_parameters");
  const nlohmann::json* legacy = r.value("rope_scaling");
  if (family == ModelFamily::kMistral4) {
    // HF substitutes Mistral Small 4's defaults (YaRN 128, mscale 1) for a missing object.
    mla::detail::require(rp != nullptr, r.source(), ": field '", r.path("rope_parameters"),
                         "' is required for mistral4 (Hugging Face would substitute another "
                         "model's YaRN defaults)");
  }
  const nlohmann::json* rs = rp != nullptr ? rp : legacy;
  const std::string where = r.path(rp != nullptr ? "rope_parameters" : "rope_scaling");
  c.rope_theta = r.number_or(r.root(), "rope_theta", 10000.0, r.path("rope_theta"));
  double partial =
      r.number_or(r.root(), "partial_rotary_factor", 0.0, r.path("partial_rotary_factor"));
  if (rs != nullptr) {
    mla::detail::require(rs->is_object(), r.source(), ": field '", where,
                         "' must be an object or null");
    if (rp != nullptr)
      c.rope_theta = r.number_or(*rs, "rope_theta", c.rope_theta, where + ".rope_theta");
    partial = r.number_or(*rs, "partial_rotary_factor", partial, where + ".partial_rotary_factor");
    // Hugging Face writes "type" (older) or "rope_type" (newer); "default" is plain RoPE.
    const char* type_field = "type";
    std::string type = r.string_or(*rs, "type", "", where + ".type");
    if (type.empty()) {
      type_field = "rope_type";
      type = r.string_or(*rs, "rope_type", "", where + ".rope_type");
    }
    if (!(type == "yarn" || type == "default" || (type.empty() && rp != nullptr))) {
      r.refuse(where + "." + type_field, nlohmann::json(type),
               "not supported (only 'yarn', as DeepSeek uses, or 'default')");
    }
    if (type == "yarn") {
      RopeScaling& y = c.rope_scaling;
      y.type = RopeScaling::Type::kYarn;
      mla::detail::require(r.find(*rs, "factor") != nullptr && !(*rs)["factor"].is_null(),
                           r.source(), ": field '", where, ".factor' is required under YaRN");
      y.factor = r.number_or(*rs, "factor", 1.0, where + ".factor");
      // Implementations differ when it is absent (DeepSeek's code: 4096; HF:
      // max_position_embeddings), so it is required.
      mla::detail::require(r.find(*rs, "original_max_position_embeddings") != nullptr &&
                               !(*rs)["original_max_position_embeddings"].is_null(),
                           r.source(), ": field '", where,
                           ".original_max_position_embeddings' is required under YaRN");
      y.original_max_position_embeddings = r.integer(*rs, "original_max_position_embeddings",
                                                     where + ".original_max_position_embeddings");
      y.beta_fast = r.number_or(*rs, "beta_fast", 32.0, where + ".beta_fast");
      y.beta_slow = r.number_or(*rs, "beta_slow", 1.0, where + ".beta_slow");
      // Absent reads as 0: Hugging Face's rule tests them for truth (see yarn_magnitude).
      y.mscale = r.number_or(*rs, "mscale", 0.0, where + ".mscale");
      y.mscale_all_dim = r.number_or(*rs, "mscale_all_dim", 0.0, where + ".mscale_all_dim");
      y.attention_factor = r.number_or(*rs, "attention_factor", 0.0, where + ".attention_factor");
      mla::detail::require(y.attention_factor >= 0.0, r.source(), ": field '", where,
                           ".attention_factor' must be > 0, got ", y.attention_factor);
    }
    // Llama-4's query temperature (Mistral Large 3).
    if (const nlohmann::json* b = r.find(*rs, "llama_4_scaling_beta"); b && !b->is_null()) {
      const double beta =
          r.number_or(*rs, "llama_4_scaling_beta", 0.0, where + ".llama_4_scaling_beta");
      if (family != ModelFamily::kMistral4 && beta != 0.0) {
        r.refuse(where + ".llama_4_scaling_beta", *b, "only mistral4 applies it; model_type '",
                 to_string(family), "' does not");
      }
      mla::detail::require(r.find(*rs, "original_max_position_embeddings") != nullptr, r.source(),
                           ": field '", where,
                           ".original_max_position_embeddings' is required with "
                           "llama_4_scaling_beta");
      c.llama_4_scaling.beta = beta;
      c.llama_4_scaling.original_max_position_embeddings = r.integer(
          *rs, "original_max_position_embeddings", where + ".original_max_position_embeddings");
    }
  }
  // partial_rotary_factor is relative to HF's head_dim: P + R for mistral4, R elsewhere (the
  // DeepSeek-style types map head_dim to qk_rope_head_dim). It must give the R rotary dims.
  if (partial != 0.0) {
    const double base = static_cast<double>(family == ModelFamily::kMistral4 ? c.qk_head_dim()
                                                                             : c.qk_rope_head_dim);
    if (!(std::fabs(partial * base - static_cast<double>(c.qk_rope_head_dim)) <= 1e-6 * base)) {
      r.refuse(r.path("partial_rotary_factor"), nlohmann::json(partial), "gives ", partial * base,
               " rotary dims of a head of ", base, ", but qk_rope_head_dim is ",
               c.qk_rope_head_dim);
    }
  }
  // Pairing: HF's rope_interleave (absent = true: DeepSeek's own layout). GLM-5 and LongCat
  // always interleave in HF, so a false there is refused rather than followed or ignored.
  const bool interleave = r.boolean_or("rope_interleave", true);
  if (!interleave && (family == ModelFamily::kGlmMoeDsa || family == ModelFamily::kLongcatFlash)) {
    r.refuse(r.path("rope_interleave"), nlohmann::json(false), "model_type '", to_string(family),
             "' always rotates interleaved pairs in Hugging Face's code");
  }
  c.rope_layout = interleave ? RopeLayout::kInterleaved : RopeLayout::kHalfSplit;
}

/// The per-layer indexer schedule of a DSA model: indexer_types, else index_topk_pattern, else
/// index_topk_freq / index_skip_topk_offset (a layer is shared when
/// max(layer - offset + 1, 0) % freq != 0; GLM-5 declares neither: every layer full).
inline std::vector<bool> read_index_schedule(const ConfigReader& r, Index layers) {
  std::vector<bool> shared(static_cast<std::size_t>(layers), false);
  const std::int64_t freq = r.integer_or(r.root(), "index_topk_freq", 1, r.path("index_topk_freq"));
  const std::int64_t offset =
      r.integer_or(r.root(), "index_skip_topk_offset", 2, r.path("index_skip_topk_offset"));
  if (freq < 1) r.refuse(r.path("index_topk_freq"), nlohmann::json(freq), "must be >= 1");
  for (Index l = 0; l < layers; ++l) {
    shared[static_cast<std::size_t>(l)] = std::max<std::int64_t>(l - offset + 1, 0) % freq != 0;
  }
  if (const nlohmann::json* p = r.value("index_topk_pattern")) {
    if (!p->is_string() || static_cast<Index>(p->get<std::string>().size()) != layers) {
      r.refuse(r.path("index_topk_pattern"), *p, "must be a string of one letter per layer (",
               layers, "): F full, S shared");
    }
    const std::string s = p->get<std::string>();
    for (Index l = 0; l < layers; ++l) {
      const char k = s[static_cast<std::size_t>(l)];
      if (k != 'F' && k != 'S') {
        r.refuse(r.path("index_topk_pattern"), *p, "letter ", l, " is '", std::string(1, k),
                 "', expected F (full) or S (shared)");
      }
      shared[static_cast<std::size_t>(l)] = k == 'S';
    }
  }
  if (const nlohmann::json* t = r.value("indexer_types")) {
    if (!t->is_array() || static_cast<Index>(t->size()) != layers) {
      r.refuse(r.path("indexer_types"), *t, "must be a list of one entry per layer (", layers,
               "): \"full\" or \"shared\"");
    }
    const bool derived = r.value("index_topk_freq") || r.value("index_topk_pattern");
    for (Index l = 0; l < layers; ++l) {
      const nlohmann::json& e = (*t)[static_cast<std::size_t>(l)];
      if (!e.is_string() || (e != "full" && e != "shared")) {
        r.refuse(r.path("indexer_types") + "[" + std::to_string(l) + "]", e,
                 "unknown indexer type (only \"full\" and \"shared\")");
      }
      const bool s = e == "shared";
      if (derived && s != shared[static_cast<std::size_t>(l)]) {
        r.refuse(r.path("indexer_types") + "[" + std::to_string(l) + "]", e,
                 "disagrees with the schedule of index_topk_freq / index_skip_topk_offset / "
                 "index_topk_pattern");
      }
      shared[static_cast<std::size_t>(l)] = s;
    }
  }
  if (layers > 0 && shared[0]) {
    r.refuse(r.path("indexer_types"), nlohmann::json("shared"),
             "layer 0 is shared, but no earlier layer has an indexer");
  }
  return shared;
}

/// quantization_config: block FP8 (DeepSeek's) for the attention tensors, or a quantisation of
/// other tensors only (its `ignore` list names the attention modules).
inline void read_quantization(const ConfigReader& r, const nlohmann::json& q,
                              const std::string& where, CheckpointConfig& out) {
  const std::string& source = r.source();
  mla::detail::require(q.is_object(), source, ": field '", where, "' must be an object");
  const std::string method = r.string_or(q, "quant_method", "", where + ".quant_method");
  if (method != "fp8") {
    // Kimi K3: compressed-tensors (MXFP4) for the experts, with `re:.*self_attn.*` ignored, so
    // attention stays BF16. Anything that may quantise the attention tensors is refused.
    bool attention_ignored = false;
    if (const nlohmann::json* ig = r.find(q, "ignore"); ig && ig->is_array()) {
      for (const nlohmann::json& e : *ig) {
        attention_ignored |=
            e.is_string() && e.get<std::string>().find("self_attn") != std::string::npos;
      }
    }
    if (!attention_ignored) {
      r.refuse(where + ".quant_method", nlohmann::json(method),
               "not supported for the attention tensors (only 'fp8': block-scaled E4M3 with "
               "weight_scale_inv; or a quantisation whose 'ignore' list excludes self_attn)");
    }
    return;
  }
  const std::string fmt = r.string_or(q, "fmt", "e4m3", where + ".fmt");
  if (fmt != "e4m3") r.refuse(where + ".fmt", nlohmann::json(fmt), "not supported (only 'e4m3')");
  const std::string scheme =
      r.string_or(q, "activation_scheme", "dynamic", where + ".activation_scheme");
  if (scheme != "dynamic") {
    r.refuse(where + ".activation_scheme", nlohmann::json(scheme),
             "not supported (only 'dynamic': activation scales per token tile)");
  }
  const std::string scale_fmt = r.string_or(q, "scale_fmt", "", where + ".scale_fmt");
  if (!scale_fmt.empty() && scale_fmt != "ue8m0") {
    r.refuse(where + ".scale_fmt", nlohmann::json(scale_fmt),
             "not supported (only 'ue8m0', power-of-two scales)");
  }
  out.activation_scales = scale_fmt == "ue8m0" ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32;
  // The indexer quantises its queries and keys with the same act_quant (and scale_fmt).
  out.mla.index_scales = out.activation_scales;
  out.fp8_weights = true;
  if (const nlohmann::json* bs = r.find(q, "weight_block_size"); bs != nullptr) {
    mla::detail::require(bs->is_array() && bs->size() == 2 && (*bs)[0].is_number_integer() &&
                             (*bs)[1].is_number_integer() && (*bs)[0].get<std::int64_t>() > 0 &&
                             (*bs)[1].get<std::int64_t>() > 0 &&
                             (*bs)[0].get<std::int64_t>() <= (std::int64_t{1} << 24) &&
                             (*bs)[1].get<std::int64_t>() <= (std::int64_t{1} << 24),
                         source, ": ", where,
                         ".weight_block_size must be two positive integers, got ", bs->dump());
    out.weight_block_rows = (*bs)[0].get<std::int64_t>();
    out.weight_block_cols = (*bs)[1].get<std::int64_t>();
  }
}

}  // namespace detail

/// Parses config.json text. `source` names it in messages. Throws mla::Error for malformed
/// JSON, a model_type the library does not implement, a missing or mistyped field, a field
/// whose value changes the attention in a way the library does not implement (named with its
/// value), or values MlaConfig::validate() rejects. The README lists the fields read per
/// family.
inline CheckpointConfig parse_config(const std::string& json_text,
                                     const std::string& source = "config.json") {
  const nlohmann::json root = detail::parse_json_object(json_text, source);
  CheckpointConfig out;
  {
    const detail::ConfigReader top(root, source);
    out.model_type = top.string_or(root, "model_type", "", "model_type");
    mla::detail::require(!out.model_type.empty(), source, ": missing field 'model_type' (one of ",
                         detail::kModelTypes, ")");
    if (out.model_type == "deepseek_v4") {
      top.refuse("model_type", root["model_type"],
                 "DeepSeek-V4's attention (sliding window, compressed entries, sinks) is not "
                 "implemented");
    }
    if (!detail::family_of(out.model_type, out.family)) {
      top.refuse("model_type", root["model_type"], "not a model type mla::io implements (",
                 detail::kModelTypes, ")");
    }
  }
  // Kimi K3 is a vision-language wrapper: the text model is its text_config.
  const nlohmann::json* text = &root;
  std::string prefix;
  if (out.family == ModelFamily::kKimiK3) {
    const auto it = root.find("text_config");
    mla::detail::require(it != root.end() && it->is_object(), source,
                         ": kimi_k3 needs a 'text_config' object (the text model)");
    text = &*it;
    prefix = "text_config.";
    const std::string inner = detail::ConfigReader(*text, source, prefix)
                                  .string_or(*text, "model_type", "", "text_config.model_type");
    if (inner != "kimi_linear") {
      detail::ConfigReader(root, source)
          .refuse("text_config.model_type", nlohmann::json(inner),
                  "kimi_k3's text model must be kimi_linear");
    }
    out.layer_prefix = "language_model.model.layers.";
  }
  const detail::ConfigReader r(*text, source, prefix);
  const nlohmann::json& j = *text;
  const ModelFamily family = out.family;
  MlaConfig& c = out.mla;

  // Dimensions: all required (HF's class defaults differ between versions and families).
  c.hidden_size = r.integer("hidden_size");
  c.num_attention_heads = r.integer("num_attention_heads");
  mla::detail::require(r.find(j, "q_lora_rank") != nullptr, source, ": missing field '",
                       r.path("q_lora_rank"), "' (null: no query compression)");
  c.q_lora_rank = r.integer_or(j, "q_lora_rank", 0, r.path("q_lora_rank"));
  c.kv_lora_rank = r.integer("kv_lora_rank");
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim");
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim");
  c.v_head_dim = r.integer("v_head_dim");
  if (const nlohmann::json* v = r.value("qk_head_dim")) {
    if (r.integer("qk_head_dim") != c.qk_nope_head_dim + c.qk_rope_head_dim) {
      r.refuse(r.path("qk_head_dim"), *v, "must equal qk_nope_head_dim + qk_rope_head_dim = ",
               c.qk_nope_head_dim + c.qk_rope_head_dim);
    }
  }
  if (r.boolean_or("attention_bias", false)) {
    r.refuse(r.path("attention_bias"), nlohmann::json(true),
             "projections with biases are not implemented");
  }
  // The latent RMSNorms (q_a_layernorm, kv_a_layernorm) use 1e-6 in every family: Hugging
  // Face builds them with the class default, not rms_norm_eps (which is the decoder's).
  c.rms_norm_eps = 1e-6;
  c.max_position_embeddings = r.integer_or(
      j, "max_position_embeddings",
      r.integer_or(j, "model_max_length", c.max_position_embeddings, r.path("model_max_length")),
      r.path("max_position_embeddings"));

  // Decoder layers and the MLA blocks among them.
  if (family == ModelFamily::kLongcatFlash) {
    out.num_layers = r.integer("num_layers");  // HF's num_hidden_layers counts 2 per layer
    out.attention_blocks = 2;
  } else {
    out.num_layers = r.integer("num_hidden_layers");
  }
  mla::detail::require(
      out.num_layers >= 1 && out.num_layers <= (1 << 20), source, ": field '",
      r.path(family == ModelFamily::kLongcatFlash ? "num_layers" : "num_hidden_layers"),
      "' must be in [1, 2^20], got ", out.num_layers);
  if (detail::is_kimi(family)) {
    // Only full_attn_layers (1-indexed) are MLA; the others are KDA linear attention.
    const nlohmann::json* lin = r.value("linear_attn_config");
    const nlohmann::json* full =
        lin && lin->is_object() ? r.find(*lin, "full_attn_layers") : nullptr;
    mla::detail::require(full != nullptr && full->is_array(), source, ": field '",
                         r.path("linear_attn_config.full_attn_layers"),
                         "' is required (a list of the 1-indexed layers with MLA)");
    for (const nlohmann::json& e : *full) {
      if (!e.is_number_integer() || e.get<std::int64_t>() < 1 ||
          e.get<std::int64_t>() > out.num_layers) {
        r.refuse(r.path("linear_attn_config.full_attn_layers"), e, "entries must be layer ",
                 "numbers in [1, ", out.num_layers, "] (1-indexed)");
      }
      out.mla_layers.push_back(e.get<std::int64_t>() - 1);
    }
    std::sort(out.mla_layers.begin(), out.mla_layers.end());
    out.mla_layers.erase(std::unique(out.mla_layers.begin(), out.mla_layers.end()),
                         out.mla_layers.end());
  } else {
    for (Index l = 0; l < out.num_layers; ++l) out.mla_layers.push_back(l);
  }
  c.num_hidden_layers =
      std::max<Index>(1, static_cast<Index>(out.mla_layers.size()) * out.attention_blocks);

  // NoPE and the output gate: Kimi's fields, refused elsewhere.
  if (detail::is_kimi(family)) {
    const nlohmann::json* nope = r.value("mla_use_nope");
    // HF's class default is false, yet its attention never rotates: such a file is undefined.
    if (c.qk_rope_head_dim > 0 && !(nope && nope->is_boolean() && nope->get<bool>())) {
      r.refuse(r.path("mla_use_nope"), nope ? *nope : nlohmann::json(nullptr),
               "Kimi's MLA never rotates, so qk_rope_head_dim > 0 needs mla_use_nope true");
    }
    c.mla_use_nope = true;  // qk_rope_head_dim 0 is NoPE too (HF infers it)
    c.mla_use_output_gate = r.boolean_or("mla_use_output_gate", false);
  } else {
    for (const char* f : {"mla_use_nope", "mla_use_output_gate"}) {
      if (r.boolean_or(f, false)) {
        r.refuse(r.path(f), nlohmann::json(true), "model_type '", out.model_type,
                 "' does not have it (only kimi_linear / kimi_k3)");
      }
    }
  }
  // LongCat's latent scalings: an explicit true/false is honoured, absent scales (HF).
  if (family == ModelFamily::kLongcatFlash) {
    if (r.boolean_or("mla_scale_q_lora", true)) {
      mla::detail::require(c.q_lora_rank > 0, source, ": mla_scale_q_lora needs q_lora_rank");
      c.q_lora_scale = std::sqrt(static_cast<double>(c.hidden_size) / c.q_lora_rank);
    }
    if (r.boolean_or("mla_scale_kv_lora", true)) {
      mla::detail::require(c.kv_lora_rank > 0, source, ": mla_scale_kv_lora needs kv_lora_rank");
      c.kv_lora_scale = std::sqrt(static_cast<double>(c.hidden_size) / c.kv_lora_rank);
    }
  } else {
    for (const char* f : {"mla_scale_q_lora", "mla_scale_kv_lora"}) {
      if (r.boolean_or(f, false)) {
        r.refuse(r.path(f), nlohmann::json(true), "only longcat_flash scales its latents");
      }
    }
  }

  // RoPE (not read under NoPE: Kimi's files carry fields no code uses).
  if (!c.mla_use_nope) detail::read_rope(r, family, c);

  // The lightning indexer (DSA): deepseek_v32 and glm_moe_dsa only; every index* field of
  // another type, and every one the library does not know, is refused.
  static const char* const kIndexFields[] = {"index_topk",
                                             "index_n_heads",
                                             "index_head_dim",
                                             "indexer_rope_interleave",
                                             "indexer_types",
                                             "index_topk_freq",
                                             "index_skip_topk_offset",
                                             "index_topk_pattern",
                                             "index_share_for_mtp_iteration"};
  for (const auto& item : j.items()) {
    const std::string& key = item.key();
    const nlohmann::json& value = item.value();
    if (key.rfind("index", 0) != 0 || value.is_null()) continue;
    const bool known = std::any_of(std::begin(kIndexFields), std::end(kIndexFields),
                                   [&](const char* f) { return key == f; });
    if (!detail::is_dsa(family)) {
      r.refuse(r.path(key.c_str()), value, "model_type '", out.model_type,
               "' has no sparse attention (only deepseek_v32 and glm_moe_dsa have an indexer)");
    }
    if (!known) {
      r.refuse(r.path(key.c_str()), value,
               "an indexer field this library does not implement (e.g. GLM-5.3's pooled keys)");
    }
  }
  if (detail::is_dsa(family)) {
    c.index_topk = r.integer("index_topk");
    c.index_n_heads = r.integer("index_n_heads");
    c.index_head_dim = r.integer("index_head_dim");
    // V3.2 rotates the indexer half-split; GLM-5 interleaved (HF always, for its type).
    const bool interleave =
        r.boolean_or("indexer_rope_interleave", family == ModelFamily::kGlmMoeDsa);
    c.index_rope_layout = interleave ? RopeLayout::kInterleaved : RopeLayout::kHalfSplit;
    out.index_shared = detail::read_index_schedule(r, out.num_layers);
  }

  // Quantisation: the text model's own quantization_config (K3), else the top level's.
  c.index_scales = ScaleFormat::kFloat32;  // no scale_fmt: any FP32 scale (ue8m0 below)
  if (const nlohmann::json* q = r.value("quantization_config")) {
    detail::read_quantization(r, *q, r.path("quantization_config"), out);
  } else if (text != &root) {
    if (const auto it = root.find("quantization_config"); it != root.end() && !it->is_null()) {
      detail::read_quantization(detail::ConfigReader(root, source), *it, "quantization_config",
                                out);
    }
  }

  try {
    c.validate();
  } catch (const Error& e) {
    mla::detail::fail(source, ": ", e.what());
  }
  return out;
}

/// Reads and parses a config.json file (see parse_config). A directory with Mistral's own
/// params.json but no config.json is named as such.
inline CheckpointConfig read_config(const std::string& path) {
  if (!detail::file_exists(path)) {
    const std::string dir = path.substr(0, path.find_last_of('/') + 1);
    mla::detail::require(!detail::file_exists(dir + "params.json"), path,
                         ": cannot open (the directory has Mistral's params.json, which mla::io "
                         "does not read: convert the checkpoint to Hugging Face's format)");
  }
  return parse_config(detail::read_text(path), path);
}

}  // namespace mla::io
