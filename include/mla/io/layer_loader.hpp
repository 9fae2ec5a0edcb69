#pragma once
/// \file
/// Loading one MLA block's attention weights from a checkpoint of any family mla::io reads, by
/// the checkpoint's names `<prefix>{i}.self_attn.[<block>.]{q_proj | q_a_proj, q_a_layernorm,
/// q_b_proj, kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}.weight` (+
/// `.weight_scale_inv` for FP8 weights), Kimi K3's output gate `g_proj.weight`, and for the
/// sparse (DSA) families the indexer's `self_attn.indexer.{wq_b, wk, weights_proj}.weight` and
/// `indexer.k_norm.{weight, bias}`.

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "mla/error.hpp"
#include "mla/io/checkpoint.hpp"
#include "mla/io/config.hpp"
#include "mla/projection.hpp"
#include "mla/weights.hpp"

namespace mla::io {

/// Which block of a layer to load, and how FP8 projections of a checkpoint are multiplied.
struct LoadOptions {
  /// The MLA block of the decoder layer (LongCat-Flash has two, self_attn.0 and self_attn.1,
  /// each with its own weights and its own cache); 0 for every other family.
  Index attention_block = 0;
  Fp8Matmul fp8_matmul = Fp8Matmul::kW8A32;
  /// W8A8 only: the activation scales' format; unset, what config.json's
  /// quantization_config.scale_fmt says (CheckpointConfig::activation_scales).
  std::optional<ScaleFormat> activation_scales;
};

namespace detail {

template <class T>
Linear<T> load_projection(const Checkpoint& ckpt, const CheckpointConfig& cfg,
                          const std::string& name, Index rows, Index cols,
                          const std::string& expected, const LoadOptions& options) {
  const TensorView& w = ckpt.tensor(name + ".weight");
  mla::detail::require(w.dtype != Dtype::kF8E5M2, w.file, ": tensor '", w.name,
                       "' has dtype F8_E5M2, expected F8_E4M3 (block-scaled, with "
                       "weight_scale_inv) or F32, F16, BF16");
  if (w.dtype == Dtype::kF8E4M3) {
    // Codes (and FP32 scales) stay in the memory-mapped file; the Linear keeps it mapped.
    const TensorView& s = ckpt.tensor(name + ".weight_scale_inv");
    return Linear<T>(borrow_block_fp8(w, s, rows, cols, cfg.weight_block_rows,
                                      cfg.weight_block_cols, expected, ckpt.keep_alive(w.name)),
                     options.fp8_matmul, options.activation_scales.value_or(cfg.activation_scales));
  }
  if (w.dtype == Dtype::kBF16) {
    // BF16 values are used where they are, in the memory-mapped file (no widening, no copy).
    require_float_dtype(w);
    require_shape(w, {rows, cols}, expected);
    return Linear<T>::borrow_bf16(w.data, rows, cols, ckpt.keep_alive(w.name));
  }
  return Linear<T>(to_matrix<T>(w, rows, cols, expected));
}

}  // namespace detail

/// The attention weights of MLA block `options.attention_block` of decoder layer `layer`,
/// shape-checked against cfg.layer_config(layer) (pass that config to the MlaLayer). BF16
/// tensors become BF16 projections and F8_E4M3 tensors (with their weight_scale_inv) block-FP8
/// projections, both using the values in place in the memory-mapped files (each projection
/// keeps its file mapped for as long as it, or a copy, lives: the Checkpoint may be destroyed
/// first); F32 and F16 tensors become dense T (copied). Norm vectors are copied. Throws
/// mla::Error naming the file and tensor for a missing tensor, a dtype or shape that does not
/// match, or an unexpected tensor under the block's prefix (e.g. an indexer in a model without
/// one); and for a layer index out of range, a layer without MLA (Kimi's KDA layers) or a block
/// the layer does not have.
template <class T>
MlaWeights<T> load_attention_weights(const Checkpoint& ckpt, const CheckpointConfig& cfg,
                                     Index layer, const LoadOptions& options = {}) {
  mla::detail::require(layer >= 0 && layer < cfg.num_layers, "layer ", layer,
                       " out of range: the model has ", cfg.num_layers, " layers");
  mla::detail::require(cfg.is_mla_layer(layer), "layer ", layer, " of this ", cfg.model_type,
                       " model is not an MLA layer (linear_attn_config.full_attn_layers lists "
                       "the MLA layers, 1-indexed; the others are KDA linear attention)");
  mla::detail::require(
      options.attention_block >= 0 &&
              options.attention_block<cfg.attention_blocks, "attention block ",
                                      options.attention_block, " out of range: ", cfg.model_type,
                                      " layers have ", cfg.attention_blocks, " MLA block",
                                      cfg.attention_blocks> 1
          ? "s"
          : "");
  const MlaConfig c = cfg.layer_config(layer);
  const std::string p = cfg.attention_prefix(layer, options.attention_block);
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  const Index q_out = H * c.qk_head_dim();
  std::vector<std::string> expected;  // every tensor name this block may hold
  const auto proj = [&](const char* name, Index rows, Index cols, const char* what) {
    expected.push_back(p + name + ".weight");
    if (ckpt.contains(p + name + ".weight") &&
        ckpt.tensor(p + name + ".weight").dtype == Dtype::kF8E4M3) {
      expected.push_back(p + name + ".weight_scale_inv");
    }
    return detail::load_projection<T>(ckpt, cfg, p + name, rows, cols, what, options);
  };
  const auto vec = [&](const std::string& name, Index n, const char* what) {
    expected.push_back(p + name);
    return to_vector<T>(ckpt.tensor(p + name), n, what);
  };
  // A checkpoint in Mistral's own names (layers.L.attention.wq_a) is named as such.
  if (!ckpt.contains(p + "kv_a_proj_with_mqa.weight")) {
    const std::string mistral = "layers." + std::to_string(layer) + ".attention.";
    mla::detail::require(ckpt.names_with_prefix(mistral).empty(), ckpt.dir(),
                         ": tensors in Mistral's own names ('", mistral,
                         "*'), which mla::io does not map: convert the checkpoint to Hugging "
                         "Face's names (model.layers.L.self_attn.*)");
  }
  MlaWeights<T> w;
  if (c.has_q_lora()) {
    w.wq_a = proj("q_a_proj", c.q_lora_rank, c.hidden_size, "q_lora_rank, hidden_size");
    w.q_norm = vec("q_a_layernorm.weight", c.q_lora_rank, "q_lora_rank");
    w.wq_b = proj("q_b_proj", q_out, c.q_lora_rank,
                  "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank");
  } else {
    w.wq = proj("q_proj", q_out, c.hidden_size,
                "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), hidden_size");
  }
  w.wkv_a = proj("kv_a_proj_with_mqa", D + R, c.hidden_size,
                 "kv_lora_rank + qk_rope_head_dim, hidden_size");
  w.kv_norm = vec("kv_a_layernorm.weight", D, "kv_lora_rank");
  w.wkv_b = proj("kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), D,
                 "num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank");
  w.wo = proj("o_proj", c.hidden_size, H * c.v_head_dim,
              "hidden_size, num_attention_heads * v_head_dim");
  if (c.mla_use_output_gate) {
    w.wg = proj("g_proj", H * c.v_head_dim, c.hidden_size,
                "num_attention_heads * v_head_dim, hidden_size");
  }
  if (c.has_indexer()) {
    const Index HI = c.index_n_heads, DI = c.index_head_dim;
    IndexerWeights<T>& ix = w.indexer;
    ix.wq_b =
        proj("indexer.wq_b", HI * DI, c.q_lora_rank, "index_n_heads * index_head_dim, q_lora_rank");
    ix.wk = proj("indexer.wk", DI, c.hidden_size, "index_head_dim, hidden_size");
    ix.k_norm = vec("indexer.k_norm.weight", DI, "index_head_dim");
    ix.k_norm_bias = vec("indexer.k_norm.bias", DI, "index_head_dim");
    ix.weights_proj = proj("indexer.weights_proj", HI, c.hidden_size, "index_n_heads, hidden_size");
  }
  // Nothing else may sit under the block's prefix: a tensor the library does not use would be
  // a part of the attention it does not compute (an indexer, a bias, a gate).
  for (const std::string& name : ckpt.names_with_prefix(p)) {
    if (std::find(expected.begin(), expected.end(), name) != expected.end()) continue;
    const std::string buffer = "rotary_emb.inv_freq";
    if (name.size() >= buffer.size() &&
        name.compare(name.size() - buffer.size(), buffer.size(), buffer) == 0) {
      continue;  // a RoPE buffer some exporters write: computed here from the config
    }
    mla::detail::fail(ckpt.dir(), ": unexpected tensor '", name, "' in the attention of layer ",
                      layer, " (model_type ", cfg.model_type,
                      c.index_shared ? ", a layer that shares the previous layer's top-k" : "",
                      "): the library does not implement what it would compute");
  }
  return w;
}

}  // namespace mla::io
