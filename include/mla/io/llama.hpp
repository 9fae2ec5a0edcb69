#pragma once
/// \file
/// Llama-style checkpoints (Hugging Face format) as the MHA/GQA layers mla/convert.hpp turns
/// into MLA: config.json and one layer's q/k/v/o_proj weights.

#include <string>

#include "mla/convert.hpp"
#include "mla/io/checkpoint.hpp"
#include "mla/io/config.hpp"

namespace mla::io {

/// What a Llama-style config.json says about attention.
struct LlamaConfig {
  MhaConfig attention;  ///< RoPE on whole heads, half-split (HF's rotate_half)
  Index num_hidden_layers = 0;
};

/// Parses a Llama-style config.json (model_type "llama" or "mistral"): hidden_size,
/// num_attention_heads, num_hidden_layers; num_key_value_heads (default num_attention_heads),
/// head_dim (default hidden_size / num_attention_heads), rope_theta (default 10000). `source`
/// names it in messages. Throws mla::Error for malformed JSON, a missing or mistyped field,
/// dimensions MhaConfig rejects, another model_type, or a field that changes the attention in a
/// way the conversion does not implement: a rope_scaling other than "default" (Llama 3's
/// frequency ramp), attention_bias, a partial_rotary_factor other than 1, a sliding_window.
inline LlamaConfig parse_llama_config(const std::string& json_text,
                                      const std::string& source = "config.json") {
  const nlohmann::json j = detail::parse_json_object(json_text, source);
  const detail::ConfigReader r(j, source);
  const std::string type = r.string_or(j, "model_type", "", "model_type");
  if (type != "llama" && type != "mistral") {
    r.refuse("model_type", nlohmann::json(type),
             "not a Llama-style model type the conversion reads (llama, mistral)");
  }
  for (const char* field : {"rope_scaling", "rope_parameters"}) {
    if (const nlohmann::json* v = r.value(field)) {
      const std::string kind =
          v->is_object()
              ? r.string_or(*v, "rope_type", r.string_or(*v, "type", "default", field), field)
              : "";
      if (kind != "default") {
        r.refuse(field, *v, "only plain RoPE (rope_type 'default') is implemented");
      }
    }
  }
  if (r.boolean_or("attention_bias", false)) {
    r.refuse("attention_bias", nlohmann::json(true), "projections with biases are not implemented");
  }
  if (const nlohmann::json* v = r.value("sliding_window")) {
    r.refuse("sliding_window", *v, "sliding-window attention is not implemented");
  }
  const double partial = r.number_or(j, "partial_rotary_factor", 1.0, "partial_rotary_factor");
  if (partial != 1.0) {
    r.refuse("partial_rotary_factor", nlohmann::json(partial),
             "only RoPE on whole heads (1.0) is implemented");
  }
  LlamaConfig out;
  MhaConfig& c = out.attention;
  c.hidden_size = r.integer("hidden_size");
  c.num_heads = r.integer("num_attention_heads");
  out.num_hidden_layers = r.integer("num_hidden_layers");
  c.num_kv_heads = r.integer_or(j, "num_key_value_heads", c.num_heads, "num_key_value_heads");
  c.head_dim =
      r.integer_or(j, "head_dim", c.num_heads > 0 ? c.hidden_size / c.num_heads : 0, "head_dim");
  c.v_head_dim = c.head_dim;
  c.rope_dim = c.head_dim;  // Llama rotates whole heads, halves against halves
  c.rope_layout = RopeLayout::kHalfSplit;
  c.rope_theta = r.number_or(j, "rope_theta", 10000.0, "rope_theta");
  c.validate();
  return out;
}

/// Reads and parses the file at `path` (parse_llama_config).
inline LlamaConfig read_llama_config(const std::string& path) {
  return parse_llama_config(detail::read_text(path), path);
}

/// Layer `layer`'s attention from model.layers.{layer}.self_attn.{q,k,v,o}_proj.weight (F32,
/// F16 or BF16), shape-checked against `cfg`. Throws mla::Error naming the file and tensor for
/// a missing tensor, a dtype or shape that does not match, or a layer out of range.
template <class T>
MhaWeights<T> load_llama_attention(const Checkpoint& ckpt, const LlamaConfig& cfg, Index layer) {
  mla::detail::require(layer >= 0 && layer < cfg.num_hidden_layers, "layer ", layer,
                       " out of range: the model has ", cfg.num_hidden_layers, " layers");
  const MhaConfig& c = cfg.attention;
  const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
  const auto load = [&](const char* name, Index rows, Index cols) {
    return to_matrix<T>(ckpt.tensor(p + name), rows, cols,
                        "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
  };
  const Index H = c.num_heads, G = c.num_kv_heads, hid = c.hidden_size;
  return {load("q_proj.weight", H * c.head_dim, hid), load("k_proj.weight", G * c.head_dim, hid),
          load("v_proj.weight", G * c.v_head_dim, hid),
          load("o_proj.weight", hid, H * c.v_head_dim)};
}

}  // namespace mla::io
