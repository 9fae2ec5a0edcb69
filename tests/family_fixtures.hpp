#pragma once
// The MLA families published beside DeepSeek's, at test size: for each, config.json written
// the way that model's own file is (its model_type, field names, nesting and defaults), its
// tensors under that model's names, and the reference's view of its attention written from its
// published math (FAMILIES.md: Hugging Face's modeling code), not from the library's parser.

#include <cmath>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "io_fixtures.hpp"
#include "reference/dsa_reference.hpp"
#include "reference/mla_reference.hpp"
#include "test_util.hpp"

namespace fixture {

/// One family at test size.
struct Family {
  std::string name;          // what the tests print
  nlohmann::json config;     // config.json as the model writes it (without quantisation)
  mla::MlaConfig shapes;     // only the shapes and switches, to draw random weights
  ref::MlaSpec spec;         // the reference's attention, from the published math
  ref::IndexerSpec indexer;  // DSA families (heads 0 otherwise)
  std::string prefix = "model.layers.";
  int layers = 1;               // decoder layers in the checkpoint
  int blocks = 1;               // MLA blocks per layer (LongCat: 2)
  std::vector<int> mla_layers;  // the decoder layers with MLA (others: Kimi's KDA)
  std::vector<bool> shared;     // per layer: reuses the previous full layer's top-k (GLM-5.1)
  int layer = 0;                // the layer the tests run
  long long start = 0;          // the first position the tests use
  std::vector<std::string> keep_bf16;  // projections an FP8 checkpoint keeps in BF16
  bool fp8 = true;                     // whether the family publishes block-FP8 attention weights
  std::size_t cache_bytes_fp32 = 0;    // per token and layer, FP32 cache
};

/// The weights of one stored MLA block, as the reference reads them.
struct StoredBlock {
  ref::MlaWeights w;
  ref::IndexerWeights ix;
};

/// (layer, block) -> what the checkpoint holds.
using StoredModel = std::map<std::pair<int, int>, StoredBlock>;

inline ref::RopeSpec plain_rope(int dim, double theta) {
  ref::RopeSpec r;
  r.dim = dim;
  r.theta = theta;
  return r;
}

inline mla::MlaConfig small_shapes(int q_lora, int nope, int rope, int v) {
  mla::MlaConfig c;
  c.hidden_size = 64;
  c.num_attention_heads = 4;
  c.q_lora_rank = q_lora;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = nope;
  c.qk_rope_head_dim = rope;
  c.v_head_dim = v;
  return c;
}

/// The reference's widths from the shapes; everything that is the family's own (RoPE, its
/// options) is set by the family below, from its published math.
inline ref::MlaSpec spec_of(const mla::MlaConfig& shapes, const ref::RopeSpec& rope) {
  mla::MlaConfig widths;
  widths.hidden_size = shapes.hidden_size;
  widths.num_attention_heads = shapes.num_attention_heads;
  widths.q_lora_rank = shapes.q_lora_rank;
  widths.kv_lora_rank = shapes.kv_lora_rank;
  widths.qk_nope_head_dim = shapes.qk_nope_head_dim;
  widths.v_head_dim = shapes.v_head_dim;
  ref::MlaSpec s = test::to_ref(widths);
  s.eps = 1e-6;  // the latent norms' (HF's class default), whatever rms_norm_eps says
  s.rope = rope;
  return s;
}

inline nlohmann::json dims_json(const mla::MlaConfig& c) {
  return {
      {"hidden_size", c.hidden_size},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_attention_heads},
      {"q_lora_rank", c.q_lora_rank > 0 ? nlohmann::json(c.q_lora_rank) : nlohmann::json(nullptr)},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"v_head_dim", c.v_head_dim}};
}

/// GLM-4.7-Flash (glm4_moe_lite): P 192 / V 256 in the real model, here P 24 / V 20 (so that
/// P + R != V); theta 1e6, no scaling, rope_interleave absent (interleaved).
inline Family glm47_flash() {
  Family f;
  f.name = "glm4_moe_lite";
  f.shapes = small_shapes(24, 24, 8, 20);
  f.config = dims_json(f.shapes);
  f.config.update({{"architectures", {"Glm4MoeLiteForCausalLM"}},
                   {"model_type", "glm4_moe_lite"},
                   {"num_hidden_layers", 2},
                   {"rms_norm_eps", 1e-5},
                   {"rope_theta", 1000000.0},
                   {"rope_scaling", nullptr},
                   {"partial_rotary_factor", 1.0},
                   {"max_position_embeddings", 202752},
                   {"n_routed_experts", 64},
                   {"first_k_dense_replace", 1}});
  f.spec = spec_of(f.shapes, plain_rope(8, 1e6));
  f.layers = 2;
  f.mla_layers = {0, 1};
  f.layer = 1;
  f.start = 70000;
  f.cache_bytes_fp32 = 160;
  return f;
}

/// GLM-5 (glm_moe_dsa): GLM-4.7's widths plus the DSA indexer with interleaved RoPE; theta only
/// in rope_parameters (a reader of the top-level rope_theta would get 10000).
inline Family glm5() {
  Family f;
  f.name = "glm_moe_dsa";
  f.shapes = small_shapes(24, 24, 8, 20);
  f.shapes.index_n_heads = 4;
  f.shapes.index_head_dim = 16;
  f.shapes.index_topk = 8;
  f.shapes.index_rope_layout = mla::RopeLayout::kInterleaved;
  f.config = dims_json(f.shapes);
  f.config.update({{"architectures", {"GlmMoeDsaForCausalLM"}},
                   {"model_type", "glm_moe_dsa"},
                   {"num_hidden_layers", 2},
                   {"head_dim", 8},
                   {"qk_head_dim", 32},
                   {"index_n_heads", 4},
                   {"index_head_dim", 16},
                   {"index_topk", 8},
                   {"indexer_rope_interleave", true},
                   {"rope_interleave", true},
                   {"rope_parameters", {{"rope_theta", 1000000.0}, {"rope_type", "default"}}},
                   {"rms_norm_eps", 1e-5},
                   {"max_position_embeddings", 202752}});
  f.spec = spec_of(f.shapes, plain_rope(8, 1e6));
  f.indexer.heads = 4;
  f.indexer.dim = 16;
  f.indexer.topk = 8;
  f.indexer.pow2_scales = false;  // no scale_fmt: FP32 scales
  f.indexer.interleaved_rope = true;
  f.layers = 2;
  f.mla_layers = {0, 1};
  f.shared = {false, false};
  f.layer = 0;
  f.start = 300;
  f.cache_bytes_fp32 = 160 + 16 + 4;
  return f;
}

/// GLM-5.1's IndexShare: four layers, 1 and 3 reuse the top-k of 0 and 2 (indexer_types), and
/// carry no indexer tensors.
inline Family glm51() {
  Family f = glm5();
  f.name = "glm_moe_dsa (IndexShare)";
  f.config["num_hidden_layers"] = 4;
  f.config["indexer_types"] = {"full", "shared", "full", "shared"};
  f.layers = 4;
  f.mla_layers = {0, 1, 2, 3};
  f.shared = {false, true, false, true};
  return f;
}

/// Mistral Large 3 as Hugging Face writes it (mistral4): YaRN 36 with no magnitude anywhere
/// (mscale 0, mscale_all_dim 0, attention_factor 1), Llama-4 query scaling beta 0.1. The test
/// size shrinks original_max_position_embeddings to 64 so that positions 100..160 cross two
/// periods of the scaling.
inline Family mistral_large3() {
  Family f;
  f.name = "mistral4";
  f.shapes = small_shapes(24, 16, 8, 16);
  f.config = dims_json(f.shapes);
  f.config.update({{"architectures", {"Mistral4ForCausalLM"}},
                   {"model_type", "mistral4"},
                   {"num_hidden_layers", 2},
                   {"rms_norm_eps", 1e-6},
                   {"max_position_embeddings", 294912},
                   {"rope_interleave", true},
                   {"rope_parameters",
                    {{"rope_type", "yarn"},
                     {"rope_theta", 10000.0},
                     {"factor", 36.0},
                     {"original_max_position_embeddings", 64},
                     {"beta_fast", 32.0},
                     {"beta_slow", 1.0},
                     {"mscale", 0.0},
                     {"mscale_all_dim", 0.0},
                     {"attention_factor", 1.0},
                     {"llama_4_scaling_beta", 0.1},
                     {"partial_rotary_factor", 1.0 / 3.0}}}});
  ref::RopeSpec rope = plain_rope(8, 10000.0);
  rope.yarn = true;
  rope.factor = 36.0;
  rope.original_max_pos = 64.0;
  rope.beta_fast = 32.0;
  rope.beta_slow = 1.0;
  rope.mscale = 0.0;
  rope.mscale_all_dim = 0.0;
  rope.attention_factor = 1.0;
  f.spec = spec_of(f.shapes, rope);
  f.spec.llama4_beta = 0.1;
  f.spec.llama4_orig = 64;
  f.layers = 2;
  f.mla_layers = {0, 1};
  f.layer = 0;
  f.start = 100;
  f.keep_bf16 = {"q_a_proj", "kv_a_proj_with_mqa"};  // the published FP8 checkpoint's
  f.cache_bytes_fp32 = 160;
  return f;
}

/// LongCat-Flash: two MLA blocks per layer (self_attn.0 / .1), num_layers, the latents scaled
/// by sqrt(hidden / rank) (here 2 and sqrt(2)), theta 1e7.
inline Family longcat_flash() {
  Family f;
  f.name = "longcat_flash";
  f.shapes = small_shapes(16, 16, 8, 16);
  f.config = dims_json(f.shapes);
  f.config.update({{"architectures", {"LongcatFlashForCausalLM"}},
                   {"model_type", "longcat_flash"},
                   {"num_layers", 2},
                   {"num_hidden_layers", 4},
                   {"mla_scale_q_lora", true},
                   {"mla_scale_kv_lora", true},
                   {"rms_norm_eps", 1e-5},
                   {"rope_theta", 10000000.0},
                   {"max_position_embeddings", 131072}});
  f.spec = spec_of(f.shapes, plain_rope(8, 1e7));
  f.spec.q_lora_scale = std::sqrt(64.0 / 16.0);
  f.spec.kv_lora_scale = std::sqrt(64.0 / 32.0);
  f.layers = 2;
  f.blocks = 2;
  f.mla_layers = {0, 1};
  f.layer = 1;
  f.start = 9;
  f.cache_bytes_fp32 = 160;
  return f;
}

/// Kimi Linear: NoPE MLA without a query latent, only on full_attn_layers (1-indexed: [2, 4]
/// are checkpoint layers 1 and 3); layers 0 and 2 are KDA, whose tensors share names with MLA's.
inline Family kimi_linear() {
  Family f;
  f.name = "kimi_linear";
  f.shapes = small_shapes(0, 16, 8, 16);
  f.shapes.mla_use_nope = true;
  f.config = dims_json(f.shapes);
  f.config.update({{"architectures", {"KimiLinearForCausalLM"}},
                   {"model_type", "kimi_linear"},
                   {"num_hidden_layers", 4},
                   {"mla_use_nope", true},
                   {"rms_norm_eps", 1e-5},
                   {"rope_theta", 10000.0},
                   {"rope_scaling", nullptr},
                   {"model_max_length", 1048576},
                   {"linear_attn_config",
                    {{"full_attn_layers", {2, 4}},
                     {"kda_layers", {1, 3}},
                     {"num_heads", 4},
                     {"head_dim", 16},
                     {"short_conv_kernel_size", 4}}}});
  f.spec = spec_of(f.shapes, plain_rope(8, 10000.0));
  f.spec.no_rope = true;
  f.layers = 4;
  f.mla_layers = {1, 3};
  f.layer = 3;
  f.start = 5000;
  f.cache_bytes_fp32 = 160;
  return f;
}

/// Kimi K3: a vision-language wrapper (model_type kimi_k3) whose text_config is a kimi_linear
/// with a query latent and the sigmoid output gate; tensors under language_model.; attention
/// BF16 (its quantization_config ignores self_attn).
inline Family kimi_k3() {
  Family f;
  f.name = "kimi_k3";
  f.shapes = small_shapes(24, 16, 8, 16);
  f.shapes.mla_use_nope = true;
  f.shapes.mla_use_output_gate = true;
  nlohmann::json text = dims_json(f.shapes);
  text.update({{"model_type", "kimi_linear"},
               {"num_hidden_layers", 2},
               {"mla_use_nope", true},
               {"mla_use_output_gate", true},
               {"rms_norm_eps", 1e-5},
               {"linear_attn_config", {{"full_attn_layers", {2}}, {"kda_layers", {1}}}},
               {"quantization_config",
                {{"quant_method", "compressed-tensors"},
                 {"format", "mxfp4-pack-quantized"},
                 {"ignore", {"lm_head", "re:.*self_attn.*", "re:.*shared_experts.*"}}}}});
  f.config = {{"architectures", {"KimiK3ForConditionalGeneration"}},
              {"model_type", "kimi_k3"},
              {"vision_config", {{"hidden_size", 32}}},
              {"text_config", text}};
  f.spec = spec_of(f.shapes, plain_rope(8, 10000.0));
  f.spec.no_rope = true;
  f.spec.output_gate = true;
  f.prefix = "language_model.model.layers.";
  f.layers = 2;
  f.mla_layers = {1};
  f.layer = 1;
  f.start = 0;
  f.fp8 = false;
  f.cache_bytes_fp32 = 160;
  return f;
}

/// qk_rope_head_dim 0 (GLM-5.3-Flash's widths, kimi_linear layout): nothing positional
/// anywhere, a cache of c^KV alone, sigma = P^-1/2.
inline Family rope_zero() {
  Family f;
  f.name = "kimi_linear R=0";
  f.shapes = small_shapes(24, 16, 0, 16);
  f.shapes.mla_use_nope = true;
  f.config = dims_json(f.shapes);
  f.config.update({{"architectures", {"KimiLinearForCausalLM"}},
                   {"model_type", "kimi_linear"},
                   {"num_hidden_layers", 1},
                   {"mla_use_nope", true},
                   {"rms_norm_eps", 1e-5},
                   {"linear_attn_config",
                    {{"full_attn_layers", {1}}, {"kda_layers", nlohmann::json::array()}}}});
  f.spec = spec_of(f.shapes, plain_rope(0, 10000.0));
  f.spec.no_rope = true;
  f.layers = 1;
  f.mla_layers = {0};
  f.layer = 0;
  f.start = 40;
  f.cache_bytes_fp32 = 128;
  return f;
}

inline std::vector<Family> all_families() {
  return {glm47_flash(), glm5(),    mistral_large3(), longcat_flash(),
          kimi_linear(), kimi_k3(), rope_zero()};
}

/// The weights of a layer (and block) of the family drawn from a seed of their own.
inline mla::MlaWeights<float> family_weights(const Family& f, int layer, int block) {
  mla::MlaConfig c = f.shapes;
  if (!f.shared.empty() && f.shared[static_cast<std::size_t>(layer)]) c.index_shared = true;
  return mla::MlaWeights<float>::random(
      c, 1000 + 10 * static_cast<std::uint64_t>(layer) + static_cast<std::uint64_t>(block));
}

/// Writes config.json and model.safetensors of `f` into `dir` with projections stored as `s`
/// (block FP8 with 16 x 16 blocks and a quantization_config as DeepSeek's, for kFp8), plus
/// KDA-like tensors under the same self_attn. names in the layers that are not MLA. Returns
/// what every MLA block holds.
inline StoredModel write_family(const std::string& dir, const Family& f, Storage s,
                                const nlohmann::json& config_override = nullptr) {
  nlohmann::json j = config_override.is_null() ? f.config : config_override;
  if (s == Storage::kFp8) {
    nlohmann::json q = {{"quant_method", "fp8"},
                        {"fmt", "e4m3"},
                        {"activation_scheme", "dynamic"},
                        {"weight_block_size", {16, 16}}};
    if (!f.keep_bf16.empty()) q["modules_to_not_convert"] = f.keep_bf16;
    j["quantization_config"] = q;
  }
  write_text(dir + "/config.json", j.dump(2));
  std::vector<Tensor> all;
  StoredModel out;
  for (int l = 0; l < f.layers; ++l) {
    const std::string base = f.prefix + std::to_string(l) + ".self_attn.";
    const bool mla = std::find(f.mla_layers.begin(), f.mla_layers.end(), l) != f.mla_layers.end();
    if (!mla) {
      // KDA linear attention: q/k/v/o/g projections of its own shapes under the same names.
      mla::detail::Uniform rng(77 + static_cast<std::uint64_t>(l));
      for (const char* name : {"q_proj", "k_proj", "v_proj", "o_proj", "g_proj"}) {
        all.push_back(store(base + name + ".weight",
                            mla::detail::random_linear<float>(rng, 64, 64).to_dense(),
                            Storage::kBF16, 16)
                          .weight);
      }
      continue;
    }
    for (int b = 0; b < f.blocks; ++b) {
      mla::MlaConfig c = f.shapes;
      if (!f.shared.empty() && f.shared[static_cast<std::size_t>(l)]) c.index_shared = true;
      const std::string p = f.blocks > 1 ? base + std::to_string(b) + "." : base;
      LayerTensors t = attention_tensors(c, family_weights(f, l, b), p, s, 16, f.keep_bf16);
      all.insert(all.end(), t.tensors.begin(), t.tensors.end());
      StoredBlock& sb = out[{l, b}];
      const mla::MlaWeights<double>& v = t.values;
      const auto vec = [](const auto& m) {
        std::vector<double> r;
        for (Eigen::Index i = 0; i < m.rows(); ++i)
          for (Eigen::Index k = 0; k < m.cols(); ++k) r.push_back(m(i, k));
        return r;
      };
      sb.w.wq = vec(v.wq.to_dense());
      sb.w.wq_a = vec(v.wq_a.to_dense());
      sb.w.q_norm = vec(v.q_norm.transpose());
      sb.w.wq_b = vec(v.wq_b.to_dense());
      sb.w.wkv_a = vec(v.wkv_a.to_dense());
      sb.w.kv_norm = vec(v.kv_norm.transpose());
      sb.w.wkv_b = vec(v.wkv_b.to_dense());
      sb.w.wo = vec(v.wo.to_dense());
      sb.w.wg = vec(v.wg.to_dense());
      sb.ix.wq_b = vec(v.indexer.wq_b.to_dense());
      sb.ix.wk = vec(v.indexer.wk.to_dense());
      sb.ix.k_norm = vec(v.indexer.k_norm.transpose());
      sb.ix.k_norm_bias = vec(v.indexer.k_norm_bias.transpose());
      sb.ix.weights_proj = vec(v.indexer.weights_proj.to_dense());
    }
  }
  write_bytes(dir + "/model.safetensors", safetensors_bytes(all));
  return out;
}

/// The reference output of the family's layer (and block) for x [n, hidden] at positions
/// start, ...: DSA families through their indexer (or, for a shared layer, `keys_of`).
inline std::vector<double> family_reference(const Family& f, const StoredBlock& b,
                                            const std::vector<double>& x, int n, long long start,
                                            const std::vector<double>* latents = nullptr,
                                            ref::MlaTrace* trace = nullptr,
                                            ref::IndexerTrace* indexer = nullptr,
                                            const ref::KeySets* keys_of = nullptr) {
  if (keys_of) return ref::mla_forward(f.spec, b.w, x, n, start, trace, latents, keys_of);
  if (f.indexer.heads > 0) {
    return ref::dsa_forward(f.spec, b.w, f.indexer, b.ix, x, n, start, trace, latents, indexer);
  }
  return ref::mla_forward(f.spec, b.w, x, n, start, trace, latents);
}

}  // namespace fixture
