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

/// Parses a Llama-style config.json: hidden_size, num_attention_heads, num_hidden_layers;
/// num_key_value_heads (default num_attention_heads), head_dim (default hidden_size /
/// num_attention_heads), rope_theta (default 10000). `source` names it in messages. Throws
/// mla::Error for malformed JSON, a missing or mistyped field, or dimensions MhaConfig rejects.
inline LlamaConfig parse_llama_config(const std::string& text,
                                      const std::string& source = "config.json") {
  const nlohmann::json j = detail::parse_json_object(text, source);
  const detail::ConfigReader r(j, source);
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
