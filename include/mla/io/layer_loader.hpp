#pragma once
/// \file
/// Loading one layer's attention weights from a DeepSeek checkpoint, by the checkpoint's names
/// `model.layers.{i}.self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj, kv_a_proj_with_mqa,
/// kv_a_layernorm, kv_b_proj, o_proj}.weight` (+ `.weight_scale_inv` for FP8 weights), and for
/// DeepSeek-V3.2 the indexer's `self_attn.indexer.{wq_b, wk, weights_proj}.weight` and
/// `indexer.k_norm.{weight, bias}`.

#include <optional>
#include <string>

#include "mla/error.hpp"
#include "mla/io/checkpoint.hpp"
#include "mla/io/config.hpp"
#include "mla/projection.hpp"
#include "mla/weights.hpp"

namespace mla::io {

/// How FP8 projections of a checkpoint are multiplied.
struct LoadOptions {
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

/// The attention weights of layer `layer`, shape-checked against `cfg`. BF16 tensors become BF16
/// projections and F8_E4M3 tensors (with their weight_scale_inv) block-FP8 projections, both
/// using the values in place in the memory-mapped files (each projection keeps its file mapped
/// for as long as it, or a copy, lives: the Checkpoint may be destroyed first); F32 and F16
/// tensors become dense T (copied). Norm vectors are copied. Throws mla::Error naming the file and
/// tensor for a missing tensor, a dtype or shape that does not match, or a layer index out of
/// range.
template <class T>
MlaWeights<T> load_attention_weights(const Checkpoint& ckpt, const CheckpointConfig& cfg,
                                     Index layer, const LoadOptions& options = {}) {
  const MlaConfig& c = cfg.mla;
  mla::detail::require(layer >= 0 && layer < c.num_hidden_layers, "layer ", layer,
                       " out of range: the model has ", c.num_hidden_layers,
                       " layers (num_hidden_layers)");
  const std::string p = "model.layers." + std::to_string(layer) + ".self_attn.";
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim;
  const Index q_out = H * c.qk_head_dim();
  const auto proj = [&](const char* name, Index rows, Index cols, const char* expected) {
    return detail::load_projection<T>(ckpt, cfg, p + name, rows, cols, expected, options);
  };
  MlaWeights<T> w;
  if (c.has_q_lora()) {
    w.wq_a = proj("q_a_proj", c.q_lora_rank, c.hidden_size, "q_lora_rank, hidden_size");
    w.q_norm = to_vector<T>(ckpt.tensor(p + "q_a_layernorm.weight"), c.q_lora_rank, "q_lora_rank");
    w.wq_b = proj("q_b_proj", q_out, c.q_lora_rank,
                  "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), q_lora_rank");
  } else {
    w.wq = proj("q_proj", q_out, c.hidden_size,
                "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim), hidden_size");
  }
  w.wkv_a = proj("kv_a_proj_with_mqa", D + R, c.hidden_size,
                 "kv_lora_rank + qk_rope_head_dim, hidden_size");
  w.kv_norm = to_vector<T>(ckpt.tensor(p + "kv_a_layernorm.weight"), D, "kv_lora_rank");
  w.wkv_b = proj("kv_b_proj", H * (c.qk_nope_head_dim + c.v_head_dim), D,
                 "num_attention_heads * (qk_nope_head_dim + v_head_dim), kv_lora_rank");
  w.wo = proj("o_proj", c.hidden_size, H * c.v_head_dim,
              "hidden_size, num_attention_heads * v_head_dim");
  if (c.has_indexer()) {
    const Index HI = c.index_n_heads, DI = c.index_head_dim;
    IndexerWeights<T>& ix = w.indexer;
    ix.wq_b =
        proj("indexer.wq_b", HI * DI, c.q_lora_rank, "index_n_heads * index_head_dim, q_lora_rank");
    ix.wk = proj("indexer.wk", DI, c.hidden_size, "index_head_dim, hidden_size");
    ix.k_norm = to_vector<T>(ckpt.tensor(p + "indexer.k_norm.weight"), DI, "index_head_dim");
    ix.k_norm_bias = to_vector<T>(ckpt.tensor(p + "indexer.k_norm.bias"), DI, "index_head_dim");
    ix.weights_proj = proj("indexer.weights_proj", HI, c.hidden_size, "index_n_heads, hidden_size");
  }
  return w;
}

}  // namespace mla::io
