#pragma once
/// \file
/// DeepSeek's config.json (Hugging Face format) to MlaConfig, plus what the checkpoint's
/// quantisation looks like.

#include <cmath>
#include <cstdint>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>

#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/io/checkpoint.hpp"

namespace mla::io {

/// What config.json says about one layer's attention and about the checkpoint's weights.
struct CheckpointConfig {
  MlaConfig mla;
  /// quantization_config {quant_method "fp8", fmt "e4m3"}: projection weights are F8_E4M3
  /// with weight_scale_inv tensors.
  bool fp8_weights = false;
  Index weight_block_rows = 128;  ///< quantization_config.weight_block_size[0]
  Index weight_block_cols = 128;  ///< quantization_config.weight_block_size[1]
  /// quantization_config.scale_fmt: "ue8m0" (DeepSeek-V3.1 / V3.2) makes the W8A8 activation
  /// scales powers of two (kPowerOfTwo); absent or null, they are any FP32 value.
  ScaleFormat activation_scales = ScaleFormat::kFloat32;
};

namespace detail {

class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& j, std::string source) : j_(j), source_(std::move(source)) {}

  const nlohmann::json* find(const nlohmann::json& obj, const char* field) const {
    const auto it = obj.find(field);
    return it == obj.end() ? nullptr : &*it;
  }

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
  std::int64_t integer(const char* field) const { return integer(j_, field, field); }

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

  std::string string_or(const nlohmann::json& obj, const char* field, const std::string& fallback,
                        const std::string& path) const {
    const nlohmann::json* v = find(obj, field);
    if (v == nullptr || v->is_null()) return fallback;
    mla::detail::require(v->is_string(), source_, ": field '", path, "' must be a string, got ",
                         v->dump());
    return v->get<std::string>();
  }

  const nlohmann::json& root() const { return j_; }
  const std::string& source() const { return source_; }

 private:
  const nlohmann::json& j_;
  std::string source_;
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

}  // namespace detail

/// Parses config.json text. `source` names it in messages. Throws mla::Error for malformed
/// JSON, a missing or mistyped field, an unsupported rope_scaling or quantisation, or values
/// MlaConfig::validate() rejects.
inline CheckpointConfig parse_config(const std::string& text,
                                     const std::string& source = "config.json") {
  const nlohmann::json j = detail::parse_json_object(text, source);
  const detail::ConfigReader r(j, source);
  CheckpointConfig out;
  MlaConfig& c = out.mla;
  c.hidden_size = r.integer("hidden_size");
  c.num_attention_heads = r.integer("num_attention_heads");
  c.q_lora_rank = r.integer_or(j, "q_lora_rank", 0, "q_lora_rank");  // null or absent: none
  c.kv_lora_rank = r.integer("kv_lora_rank");
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim");
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim");
  c.v_head_dim = r.integer("v_head_dim");
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.rms_norm_eps = r.number_or(j, "rms_norm_eps", 1e-6, "rms_norm_eps");
  c.max_position_embeddings = r.integer_or(j, "max_position_embeddings", c.max_position_embeddings,
                                           "max_position_embeddings");
  // HF's rope_interleave: true (DeepSeek's own layout, the default) rotates pairs (2i, 2i + 1),
  // false the halves (i, i + R/2).
  c.rope_layout = r.boolean_or(j, "rope_interleave", true, "rope_interleave")
                      ? RopeLayout::kInterleaved
                      : RopeLayout::kHalfSplit;
  // DeepSeek-V3.2's sparse attention: models with an indexer are those with index_topk; then
  // index_n_heads and index_head_dim are required too.
  if (const nlohmann::json* k = r.find(j, "index_topk"); k != nullptr && !k->is_null()) {
    c.index_topk = r.integer("index_topk");
    c.index_n_heads = r.integer("index_n_heads");
    c.index_head_dim = r.integer("index_head_dim");
  }

  // RoPE: rope_theta and rope_scaling (the common form), or transformers' newer
  // rope_parameters, which holds both.
  const nlohmann::json* rp = r.find(j, "rope_parameters");
  const bool parameters = rp != nullptr && !rp->is_null();
  const nlohmann::json* rs = parameters ? rp : r.find(j, "rope_scaling");
  const std::string where = parameters ? "rope_parameters" : "rope_scaling";
  c.rope_theta = r.number_or(j, "rope_theta", 10000.0, "rope_theta");
  if (rs != nullptr && !rs->is_null()) {
    mla::detail::require(rs->is_object(), source, ": field '", where,
                         "' must be an object or null");
    if (parameters)
      c.rope_theta = r.number_or(*rs, "rope_theta", c.rope_theta, where + ".rope_theta");
    // Hugging Face writes "type" (older) or "rope_type" (newer); "default" is plain RoPE.
    std::string type = r.string_or(*rs, "type", "", where + ".type");
    if (type.empty()) type = r.string_or(*rs, "rope_type", "", where + ".rope_type");
    mla::detail::require(type == "yarn" || type == "default" || (type.empty() && parameters),
                         source, ": ", where, " type '", type,
                         "' is not supported (only 'yarn', as DeepSeek uses, or 'default')");
    if (type == "yarn") {
      RopeScaling& y = c.rope_scaling;
      y.type = RopeScaling::Type::kYarn;
      y.factor = r.number_or(*rs, "factor", 1.0, where + ".factor");
      y.original_max_position_embeddings =
          r.integer_or(*rs, "original_max_position_embeddings", 4096,
                       where + ".original_max_position_embeddings");
      y.beta_fast = r.number_or(*rs, "beta_fast", 32.0, where + ".beta_fast");
      y.beta_slow = r.number_or(*rs, "beta_slow", 1.0, where + ".beta_slow");
      y.mscale = r.number_or(*rs, "mscale", 1.0, where + ".mscale");
      y.mscale_all_dim = r.number_or(*rs, "mscale_all_dim", 0.0, where + ".mscale_all_dim");
    }
  }

  c.index_scales = ScaleFormat::kFloat32;  // no scale_fmt: any FP32 scale (ue8m0 below)
  if (const nlohmann::json* q = r.find(j, "quantization_config"); q != nullptr && !q->is_null()) {
    mla::detail::require(q->is_object(), source, ": field 'quantization_config' must be an object");
    const std::string method =
        r.string_or(*q, "quant_method", "", "quantization_config.quant_method");
    mla::detail::require(method == "fp8", source, ": quantization_config.quant_method '", method,
                         "' is not supported (only 'fp8')");
    const std::string fmt = r.string_or(*q, "fmt", "e4m3", "quantization_config.fmt");
    mla::detail::require(fmt == "e4m3", source, ": quantization_config.fmt '", fmt,
                         "' is not supported (only 'e4m3')");
    const std::string scheme =
        r.string_or(*q, "activation_scheme", "dynamic", "quantization_config.activation_scheme");
    mla::detail::require(scheme == "dynamic", source, ": quantization_config.activation_scheme '",
                         scheme,
                         "' is not supported (only 'dynamic': activation scales per token tile)");
    const std::string scale_fmt = r.string_or(*q, "scale_fmt", "", "quantization_config.scale_fmt");
    mla::detail::require(scale_fmt.empty() || scale_fmt == "ue8m0", source,
                         ": quantization_config.scale_fmt '", scale_fmt,
                         "' is not supported (only 'ue8m0', power-of-two scales)");
    out.activation_scales = scale_fmt == "ue8m0" ? ScaleFormat::kPowerOfTwo : ScaleFormat::kFloat32;
    // The indexer quantises its queries and keys with the same act_quant (and scale_fmt).
    c.index_scales = out.activation_scales;
    out.fp8_weights = true;
    if (const nlohmann::json* bs = r.find(*q, "weight_block_size"); bs != nullptr) {
      mla::detail::require(bs->is_array() && bs->size() == 2 && (*bs)[0].is_number_integer() &&
                               (*bs)[1].is_number_integer() && (*bs)[0].get<std::int64_t>() > 0 &&
                               (*bs)[1].get<std::int64_t>() > 0,
                           source,
                           ": quantization_config.weight_block_size must be two positive "
                           "integers, got ",
                           bs->dump());
      out.weight_block_rows = (*bs)[0].get<std::int64_t>();
      out.weight_block_cols = (*bs)[1].get<std::int64_t>();
    }
  }

  try {
    c.validate();
  } catch (const Error& e) {
    mla::detail::fail(source, ": ", e.what());
  }
  return out;
}

/// Reads and parses a config.json file (see parse_config).
inline CheckpointConfig read_config(const std::string& path) {
  return parse_config(detail::read_text(path), path);
}

}  // namespace mla::io
