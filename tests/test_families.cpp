// The MLA families published beside DeepSeek's (GLM-4.7-Flash, GLM-5 and GLM-5.1's IndexShare,
// Mistral Large 3, LongCat-Flash, Kimi Linear, Kimi K3, and qk_rope_head_dim 0), each from a
// checkpoint in that model's own format, against a double reference written from its published
// math; and everything a loader must refuse, through the API and through deepseek_layer.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "family_fixtures.hpp"
#include "io_fixtures.hpp"
#include "mla/io.hpp"
#include "reference/fp8_reference.hpp"
#include "test_util.hpp"

namespace {

using fixture::Family;
using fixture::Storage;
using fixture::TempDir;
using mla::AttentionPath;
using mla::CacheStorage;
using mla::Index;
using mla::MlaConfig;
using mla::RowMatrix;

/// A family's checkpoint on disk, read back through mla::io.
struct Model {
  TempDir dir;
  fixture::StoredModel stored;
  mla::io::CheckpointConfig cfg;

  Model(const Family& f, Storage s, const nlohmann::json& config = nullptr) {
    stored = fixture::write_family(dir.path(), f, s, config);
    cfg = mla::io::read_config(dir / "config.json");
  }
  std::unique_ptr<mla::MlaLayer<float>> layer(Index l, Index block = 0) const {
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    mla::io::LoadOptions o;
    o.attention_block = block;
    return std::make_unique<mla::MlaLayer<float>>(
        cfg.layer_config(l), mla::io::load_attention_weights<float>(ckpt, cfg, l, o), l);
  }
};

mla::LatentCacheOptions cache_options(CacheStorage storage, Index layers = 1) {
  mla::LatentCacheOptions o;
  o.block_tokens = 16;
  o.num_blocks = 16;
  o.num_layers = layers;
  o.storage = storage;
  return o;
}

/// The layer over x in chunks of the given sizes (the last repeated until x is used up), on a
/// fresh cache of `storage`; `latents` receives the cache's contents (dequantised).
RowMatrix<float> run_chunks(const mla::MlaLayer<float>& layer, const RowMatrix<float>& x,
                            long long start, std::vector<Index> chunks, AttentionPath path,
                            CacheStorage storage, std::vector<double>* latents = nullptr) {
  mla::LatentCache cache(layer.config(), cache_options(storage, layer.layer_index() + 1));
  const auto seq = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  RowMatrix<float> y(x.rows(), x.cols());
  Index done = 0;
  for (std::size_t i = 0; done < x.rows(); ++i) {
    const Index n = std::min(chunks[std::min(i, chunks.size() - 1)], x.rows() - done);
    layer.forward(x.middleRows(done, n), start + done, cache, seq, y.middleRows(done, n), ws, path);
    done += n;
  }
  if (latents) {
    *latents = test::to_vec(test::cache_contents(cache, seq, layer.layer_index()));
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// config.json as each family writes it

TEST(FamilyConfig, ReadsEachFamilyAsPublished) {
  using mla::io::ModelFamily;
  {
    const auto r = mla::io::parse_config(fixture::glm47_flash().config.dump());
    EXPECT_EQ(r.family, ModelFamily::kGlm4MoeLite);
    EXPECT_EQ(r.mla.qk_nope_head_dim, 24);
    EXPECT_EQ(r.mla.v_head_dim, 20);
    EXPECT_EQ(r.mla.rope_theta, 1e6);
    EXPECT_EQ(r.mla.rms_norm_eps, 1e-6);  // the latent norms', not rms_norm_eps 1e-5
    EXPECT_EQ(r.mla.rope_layout, mla::RopeLayout::kInterleaved);  // rope_interleave absent
    EXPECT_EQ(r.mla.rope_scaling.type, mla::RopeScaling::Type::kNone);
    EXPECT_DOUBLE_EQ(mla::softmax_scale(r.mla), 1.0 / std::sqrt(32.0));
    nlohmann::json j = fixture::glm47_flash().config;
    j["rope_interleave"] = false;  // honoured (HF honours it for this type)
    EXPECT_EQ(mla::io::parse_config(j.dump()).mla.rope_layout, mla::RopeLayout::kHalfSplit);
  }
  {
    const auto r = mla::io::parse_config(fixture::glm5().config.dump());
    EXPECT_EQ(r.family, ModelFamily::kGlmMoeDsa);
    EXPECT_EQ(r.mla.rope_theta, 1e6);  // from rope_parameters alone
    EXPECT_TRUE(r.mla.has_indexer());
    EXPECT_EQ(r.mla.index_rope_layout, mla::RopeLayout::kInterleaved);
    EXPECT_EQ(r.mla.index_scales, mla::ScaleFormat::kFloat32);
    EXPECT_EQ(r.index_shared, std::vector<bool>({false, false}));
    nlohmann::json j = fixture::glm5().config;
    j.erase("indexer_rope_interleave");  // absent: interleaved for GLM-5
    EXPECT_EQ(mla::io::parse_config(j.dump()).mla.index_rope_layout, mla::RopeLayout::kInterleaved);
    j["indexer_rope_interleave"] = false;
    EXPECT_EQ(mla::io::parse_config(j.dump()).mla.index_rope_layout, mla::RopeLayout::kHalfSplit);
    // IndexShare, from indexer_types or derived from index_topk_freq / offset (full at 0, 1, 2,
    // then every 4th from 6, as GLM-5.2 declares with freq 4 and offset 3).
    const auto s = mla::io::parse_config(fixture::glm51().config.dump());
    EXPECT_EQ(s.index_shared, std::vector<bool>({false, true, false, true}));
    EXPECT_TRUE(s.layer_config(1).index_shared);
    EXPECT_FALSE(s.layer_config(1).has_indexer());
    EXPECT_TRUE(s.layer_config(1).has_sparse_attention());
    j = fixture::glm5().config;
    j["num_hidden_layers"] = 12;
    j["index_topk_freq"] = 4;
    j["index_skip_topk_offset"] = 3;
    const auto d = mla::io::parse_config(j.dump());
    std::vector<bool> want(12, true);
    for (int l : {0, 1, 2, 6, 10}) want[static_cast<std::size_t>(l)] = false;
    EXPECT_EQ(d.index_shared, want);
    j["index_topk_pattern"] = "FFFSSSFSSSFS";
    EXPECT_EQ(mla::io::parse_config(j.dump()).index_shared, want);
  }
  {
    const auto r = mla::io::parse_config(fixture::mistral_large3().config.dump());
    EXPECT_EQ(r.family, ModelFamily::kMistral4);
    EXPECT_EQ(r.mla.rope_scaling.type, mla::RopeScaling::Type::kYarn);
    EXPECT_EQ(r.mla.rope_scaling.factor, 36.0);
    EXPECT_EQ(r.mla.rope_scaling.original_max_position_embeddings, 64);
    EXPECT_EQ(r.mla.llama_4_scaling.beta, 0.1);
    EXPECT_EQ(r.mla.llama_4_scaling.original_max_position_embeddings, 64);
    EXPECT_DOUBLE_EQ(mla::softmax_scale(r.mla), 1.0 / std::sqrt(24.0));  // no magnitude
    EXPECT_EQ(mla::Rope(r.mla).magnitude(), 1.0);
    // transformers' params.json converter writes mscale 1, mscale_all_dim 1 and no
    // attention_factor: HF then scales sigma by mscale(36, 1)^2 = 1.8451; so does the library.
    nlohmann::json j = fixture::mistral_large3().config;
    j["rope_parameters"]["mscale"] = 1.0;
    j["rope_parameters"]["mscale_all_dim"] = 1.0;
    j["rope_parameters"].erase("attention_factor");
    const auto c = mla::io::parse_config(j.dump());
    EXPECT_NEAR(mla::softmax_scale(c.mla) * std::sqrt(24.0), 1.8451, 1e-4);
    EXPECT_EQ(mla::Rope(c.mla).magnitude(), 1.0);
    // The Llama-4 factor: 1 below orig, 1 + 0.1 ln 2 up to 2 orig - 1, 1 + 0.1 ln 9 at 8 orig.
    const mla::QueryScaling& q =
        mla::io::parse_config(fixture::mistral_large3().config.dump()).mla.llama_4_scaling;
    EXPECT_EQ(q.factor(63), 1.0);
    EXPECT_NEAR(q.factor(64), 1.0693147, 1e-7);
    EXPECT_NEAR(q.factor(127), 1.0693147, 1e-7);
    EXPECT_NEAR(q.factor(512), 1.2197225, 1e-7);
  }
  {
    const auto r = mla::io::parse_config(fixture::longcat_flash().config.dump());
    EXPECT_EQ(r.family, ModelFamily::kLongcatFlash);
    EXPECT_EQ(r.num_layers, 2);
    EXPECT_EQ(r.attention_blocks, 2);
    EXPECT_EQ(r.mla.num_hidden_layers, 4);  // MLA blocks in the model: the caches it needs
    EXPECT_EQ(r.mla.q_lora_scale, 2.0);
    EXPECT_DOUBLE_EQ(r.mla.kv_lora_scale, std::sqrt(2.0));
    EXPECT_EQ(r.attention_prefix(1, 1), "model.layers.1.self_attn.1.");
    nlohmann::json j = fixture::longcat_flash().config;
    j["mla_scale_q_lora"] = false;  // an explicit false is honoured
    j.erase("mla_scale_kv_lora");   // absent scales (HF)
    const auto s = mla::io::parse_config(j.dump());
    EXPECT_EQ(s.mla.q_lora_scale, 1.0);
    EXPECT_DOUBLE_EQ(s.mla.kv_lora_scale, std::sqrt(2.0));
  }
  {
    const auto r = mla::io::parse_config(fixture::kimi_linear().config.dump());
    EXPECT_EQ(r.family, ModelFamily::kKimiLinear);
    EXPECT_TRUE(r.mla.mla_use_nope);
    EXPECT_FALSE(r.mla.has_q_lora());
    EXPECT_EQ(r.mla_layers, std::vector<Index>({1, 3}));
    EXPECT_FALSE(r.is_mla_layer(0));
    EXPECT_EQ(r.mla.num_hidden_layers, 2);
    EXPECT_EQ(r.mla.max_position_embeddings, 1048576);  // model_max_length
  }
  {
    const auto r = mla::io::parse_config(fixture::kimi_k3().config.dump());
    EXPECT_EQ(r.family, ModelFamily::kKimiK3);
    EXPECT_EQ(r.model_type, "kimi_k3");
    EXPECT_TRUE(r.mla.mla_use_nope);
    EXPECT_TRUE(r.mla.mla_use_output_gate);
    EXPECT_FALSE(r.fp8_weights);  // the MXFP4 quantisation ignores self_attn
    EXPECT_EQ(r.attention_prefix(1), "language_model.model.layers.1.self_attn.");
  }
  {
    const auto r = mla::io::parse_config(fixture::rope_zero().config.dump());
    EXPECT_EQ(r.mla.qk_rope_head_dim, 0);
    EXPECT_EQ(r.mla.latent_cache_width(), 32);
    EXPECT_DOUBLE_EQ(mla::softmax_scale(r.mla), 0.25);  // P^-1/2
  }
}

// Every case FAMILIES.md says a loader must refuse: an mla::Error naming the field and value.
struct Refusal {
  std::string what;
  std::function<nlohmann::json()> config;
  std::string message;
};

std::vector<Refusal> refusals() {
  using nlohmann::json;
  const auto edit = [](Family f, std::function<void(json&)> e) {
    return [f, e] {
      json j = f.config;
      e(j);
      return j;
    };
  };
  const Family glm = fixture::glm5(), mis = fixture::mistral_large3(),
               lc = fixture::longcat_flash(), kimi = fixture::kimi_linear(),
               k3 = fixture::kimi_k3(), glm47 = fixture::glm47_flash();
  const Family v3 = [] {
    Family f;
    f.config = fixture::config_json(MlaConfig::small_v3(), false, 16);
    return f;
  }();
  return {
      {"unknown model_type", edit(v3, [](json& j) { j["model_type"] = "deepseek_v41"; }),
       "model_type = \"deepseek_v41\": not a model type mla::io implements"},
      {"minicpm3", edit(v3, [](json& j) { j["model_type"] = "minicpm3"; }),
       "model_type = \"minicpm3\""},
      {"deepseek_v4", edit(v3, [](json& j) { j["model_type"] = "deepseek_v4"; }),
       "DeepSeek-V4's attention"},
      {"no model_type", edit(v3, [](json& j) { j.erase("model_type"); }),
       "missing field 'model_type'"},
      {"missing dim", edit(glm47, [](json& j) { j.erase("qk_rope_head_dim"); }),
       "missing field 'qk_rope_head_dim'"},
      {"q_lora_rank absent", edit(glm47, [](json& j) { j.erase("q_lora_rank"); }),
       "missing field 'q_lora_rank'"},
      {"attention_bias", edit(v3, [](json& j) { j["attention_bias"] = true; }),
       "attention_bias = true"},
      {"rope type",
       edit(glm47,
            [](json& j) {
              j["rope_scaling"] = {{"type", "linear"}};
            }),
       "rope_scaling.type = \"linear\": not supported"},
      {"llama3 rope", edit(glm, [](json& j) { j["rope_parameters"]["rope_type"] = "llama3"; }),
       "rope_parameters.rope_type = \"llama3\""},
      {"partial_rotary_factor", edit(glm47, [](json& j) { j["partial_rotary_factor"] = 0.5; }),
       "partial_rotary_factor = 0.5: gives 4"},
      {"mistral partial_rotary_factor",
       edit(mis, [](json& j) { j["rope_parameters"]["partial_rotary_factor"] = 1.0; }),
       "partial_rotary_factor = 1.0: gives 24"},
      {"glm5 shared layer 0",
       edit(glm,
            [](json& j) {
              j["indexer_types"] = {"shared", "full"};
            }),
       "layer 0 is shared"},
      {"glm5 unknown indexer type",
       edit(glm,
            [](json& j) {
              j["indexer_types"] = {"full", "pooled"};
            }),
       "indexer_types[1] = \"pooled\": unknown indexer type"},
      {"glm5 schedules disagree",
       edit(glm,
            [](json& j) {
              j["indexer_types"] = {"full", "shared"};
              j["index_topk_freq"] = 1;
            }),
       "disagrees with the schedule"},
      {"glm5 rope_interleave false", edit(glm, [](json& j) { j["rope_interleave"] = false; }),
       "rope_interleave = false"},
      {"glm5 qk_head_dim", edit(glm, [](json& j) { j["qk_head_dim"] = 30; }),
       "qk_head_dim = 30: must equal"},
      {"glm5.3 pooled keys", edit(glm, [](json& j) { j["index_kpool_compress"] = true; }),
       "index_kpool_compress = true: an indexer field this library does not implement"},
      {"mistral4 without rope_parameters", edit(mis, [](json& j) { j.erase("rope_parameters"); }),
       "'rope_parameters' is required for mistral4"},
      {"yarn without factor", edit(mis, [](json& j) { j["rope_parameters"].erase("factor"); }),
       "rope_parameters.factor' is required under YaRN"},
      {"llama4 without original",
       edit(mis,
            [](json& j) {
              j["rope_parameters"]["rope_type"] = "default";
              j["rope_parameters"].erase("original_max_position_embeddings");
            }),
       "original_max_position_embeddings' is required with llama_4_scaling_beta"},
      {"llama4 on deepseek",
       edit(v3, [](json& j) { j["rope_scaling"]["llama_4_scaling_beta"] = 0.1; }),
       "llama_4_scaling_beta = 0.1: only mistral4 applies it"},
      {"longcat index fields", edit(lc, [](json& j) { j["index_topk"] = 8; }),
       "index_topk = 8: model_type 'longcat_flash' has no sparse attention"},
      {"longcat rope_interleave false", edit(lc, [](json& j) { j["rope_interleave"] = false; }),
       "rope_interleave = false"},
      {"longcat without num_layers", edit(lc, [](json& j) { j.erase("num_layers"); }),
       "missing field 'num_layers'"},
      {"latent scale elsewhere", edit(v3, [](json& j) { j["mla_scale_q_lora"] = true; }),
       "mla_scale_q_lora = true: only longcat_flash"},
      {"nope elsewhere", edit(glm47, [](json& j) { j["mla_use_nope"] = true; }),
       "mla_use_nope = true: model_type 'glm4_moe_lite' does not have it"},
      {"gate elsewhere", edit(v3, [](json& j) { j["mla_use_output_gate"] = true; }),
       "mla_use_output_gate = true"},
      {"kimi without nope", edit(kimi, [](json& j) { j.erase("mla_use_nope"); }),
       "mla_use_nope = null: Kimi's MLA never rotates"},
      {"kimi nope false", edit(kimi, [](json& j) { j["mla_use_nope"] = false; }),
       "mla_use_nope = false"},
      {"kimi without full_attn_layers",
       edit(kimi, [](json& j) { j["linear_attn_config"].erase("full_attn_layers"); }),
       "linear_attn_config.full_attn_layers' is required"},
      {"kimi full_attn_layers out of range",
       edit(kimi,
            [](json& j) {
              j["linear_attn_config"]["full_attn_layers"] = {0, 4};
            }),
       "entries must be layer numbers in [1, 4]"},
      {"k3 text of another type",
       edit(k3, [](json& j) { j["text_config"]["model_type"] = "deepseek_v3"; }),
       "text_config.model_type = \"deepseek_v3\": kimi_k3's text model must be kimi_linear"},
      {"k3 without text_config", edit(k3, [](json& j) { j.erase("text_config"); }),
       "kimi_k3 needs a 'text_config' object"},
      {"k3 quantised attention",
       edit(k3, [](json& j) { j["text_config"]["quantization_config"]["ignore"] = {"lm_head"}; }),
       "text_config.quantization_config.quant_method = \"compressed-tensors\": not supported for "
       "the attention tensors"},
      {"nvfp4",
       edit(v3,
            [](json& j) {
              j["quantization_config"] = {{"quant_method", "modelopt"}};
            }),
       "quantization_config.quant_method = \"modelopt\""},
      {"fp8 e5m2",
       edit(v3,
            [](json& j) {
              j["quantization_config"] = {{"quant_method", "fp8"}, {"fmt", "e5m2"}};
            }),
       "quantization_config.fmt = \"e5m2\": not supported"},
  };
}

TEST(FamilyConfig, RefusesWhatIsNotImplementedNamingTheFieldAndValue) {
  for (const Refusal& r : refusals()) {
    SCOPED_TRACE(r.what);
    std::string what;
    try {
      mla::io::parse_config(r.config().dump(), "m/config.json");
    } catch (const mla::Error& e) {
      what = e.what();
    }
    EXPECT_EQ(what.rfind("m/config.json: ", 0), 0u) << what;
    EXPECT_NE(what.find(r.message), std::string::npos) << what << "\nwanted: " << r.message;
  }
  // The fields that do not touch attention stay ignored.
  nlohmann::json j = fixture::glm5().config;
  j["n_routed_experts"] = 256;
  j["moe_intermediate_size"] = 2048;
  j["index_share_for_mtp_iteration"] = true;
  j["rms_norm_eps"] = "not read";
  EXPECT_NO_THROW(mla::io::parse_config(j.dump()));
}

// ---------------------------------------------------------------------------------------------
// Each family's layer against its reference

TEST(FamilyLayer, PrefillDecodeAndChunksMatchTheReferenceOnEveryPath) {
  for (const Family& f : fixture::all_families()) {
    for (Storage s : {Storage::kF32, f.fp8 ? Storage::kFp8 : Storage::kBF16}) {
      const Model m(f, s);
      for (int block = 0; block < f.blocks; ++block) {
        SCOPED_TRACE(f.name +
                     (s == Storage::kF32   ? " F32"
                      : s == Storage::kFp8 ? " FP8"
                                           : " BF16") +
                     " block " + std::to_string(block));
        const auto layer = m.layer(f.layer, block);
        EXPECT_EQ(layer->config().num_attention_heads, 4);
        const Index n = 30;
        const RowMatrix<float> x = test::random_input<float>(n, 64, 11 + block);
        const fixture::StoredBlock& stored = m.stored.at({f.layer, block});
        const std::vector<double> want =
            fixture::family_reference(f, stored, test::to_vec(x), static_cast<int>(n), f.start);
        const CacheStorage exact = CacheStorage::kFloat32;
        struct Run {
          const char* name;
          std::vector<Index> chunks;
          AttentionPath path;
        };
        std::vector<Run> runs = {{"prefill then decode", {11, 1}, AttentionPath::kAuto}};
        if (s == Storage::kF32) {
          runs.push_back({"one prefill", {n}, AttentionPath::kAuto});
          runs.push_back({"chunks expanded", {7, 1, 5, 1, 1, 9}, AttentionPath::kExpanded});
          runs.push_back({"chunks absorbed", {7, 1, 5, 1, 1, 9}, AttentionPath::kAbsorbed});
        }
        for (const Run& run : runs) {
          const RowMatrix<float> y = run_chunks(*layer, x, f.start, run.chunks, run.path, exact);
          const double err = test::rel_error(test::to_vec(y), want);
          EXPECT_LE(err, 1e-5) << run.name;
          std::printf("    [measured] %-24s %-4s block %d %-20s rel error %.2e\n", f.name.c_str(),
                      s == Storage::kF32   ? "F32"
                      : s == Storage::kFp8 ? "FP8"
                                           : "BF16",
                      block, run.name, err);
        }
      }
    }
  }
}

/// The value of x in BF16 (round to nearest even), by the definition: 8 significant bits.
double round_bf16(double x) {
  if (x == 0.0 || !std::isfinite(x)) return x;
  int e = 0;
  std::frexp(x, &e);  // x = m 2^e, m in [0.5, 1)
  const double scale = std::ldexp(1.0, 8 - e);
  return std::nearbyint(x * scale) / scale;
}

/// The reference's own rounding of the cached latents [n, d_c + R] to `storage`: BF16 values;
/// or FlashMLA's FP8 record (each 128-value tile of c^KV as E4M3 times amax / 448, k^R BF16).
std::vector<double> round_latents(std::vector<double> l, int d_c, int r, CacheStorage storage) {
  static const ref::Fp8Rounder e4m3(ref::kE4M3FN);
  const std::size_t width = static_cast<std::size_t>(d_c + r);
  for (std::size_t t = 0; t < l.size() / width; ++t) {
    double* row = &l[t * width];
    if (storage == CacheStorage::kBFloat16) {
      for (std::size_t i = 0; i < width; ++i) row[i] = round_bf16(row[i]);
      continue;
    }
    for (int tile = 0; tile < d_c; tile += 128) {
      const int end = std::min(d_c, tile + 128);
      double amax = 0.0;
      for (int i = tile; i < end; ++i) amax = std::max(amax, std::fabs(row[i]));
      const double scale = amax > 0.0 ? amax / 448.0 : 1.0;
      for (int i = tile; i < end; ++i) {
        row[i] = ref::fp8_value(ref::kE4M3FN, e4m3.round(row[i] / scale, true)) * scale;
      }
    }
    for (int i = d_c; i < d_c + r; ++i) row[i] = round_bf16(row[i]);
  }
  return l;
}

TEST(FamilyLayer, QuantisedCachesStayWithinTheReferencesOwnRounding) {
  // The reference rounds its own latents to the storage and attends over them: that moves its
  // output by e_ref. The library's output on the same storage may differ from the exact
  // reference by at most 1.2 e_ref (its float arithmetic and the odd value rounded the other
  // way add little).
  for (const Family& f : fixture::all_families()) {
    const Model m(f, Storage::kF32);
    const auto layer = m.layer(f.layer);
    const Index n = 26;
    const RowMatrix<float> x = test::random_input<float>(n, 64, 21);
    const fixture::StoredBlock& stored = m.stored.at({f.layer, 0});
    ref::MlaTrace trace;
    const std::vector<double> exact = fixture::family_reference(
        f, stored, test::to_vec(x), static_cast<int>(n), f.start, nullptr, &trace);
    const int d_c = f.spec.kv_lora, r = f.spec.rope.dim;
    for (CacheStorage storage : {CacheStorage::kBFloat16, CacheStorage::kFp8E4M3}) {
      SCOPED_TRACE(f.name + " " + mla::to_string(storage));
      const std::vector<double> rounded = round_latents(trace.latent, d_c, r, storage);
      const double e_ref =
          test::rel_error(fixture::family_reference(f, stored, test::to_vec(x), static_cast<int>(n),
                                                    f.start, &rounded),
                          exact);
      ASSERT_GT(e_ref, 0.0);
      std::vector<double> cached;
      const RowMatrix<float> y =
          run_chunks(*layer, x, f.start, {9, 1}, AttentionPath::kAuto, storage, &cached);
      const double e_lib = test::rel_error(test::to_vec(y), exact);
      EXPECT_LE(e_lib, 1.2 * e_ref) << "e_ref " << e_ref;
      std::printf(
          "    [measured] %-24s %-4s cache: library %.2e, reference's own rounding %.2e "
          "(%.2fx)\n",
          f.name.c_str(), mla::to_string(storage), e_lib, e_ref, e_lib / e_ref);
      // And the cache holds the reference's rounding of its latents.
      EXPECT_LE(test::max_abs_error(cached, rounded),
                storage == CacheStorage::kBFloat16 ? 0.02 : 0.2);
    }
  }
}

TEST(FamilyLayer, BatchesAndEnginePagedBuffersMatchTheReference) {
  for (const Family& f : fixture::all_families()) {
    SCOPED_TRACE(f.name);
    const Model m(f, Storage::kF32);
    const auto layer = m.layer(f.layer);
    const fixture::StoredBlock& stored = m.stored.at({f.layer, 0});
    const mla::MlaConfig& c = layer->config();
    // Two sequences: A from f.start, B from f.start + 37; a prefill of each, then mixed batches
    // of a chunk of A beside a decode token of B.
    const Index na = 20, nb = 16;
    const RowMatrix<float> xa = test::random_input<float>(na, 64, 31);
    const RowMatrix<float> xb = test::random_input<float>(nb, 64, 32);
    const long long sa = f.start, sb = f.start + 37;
    const auto want_a =
        fixture::family_reference(f, stored, test::to_vec(xa), static_cast<int>(na), sa);
    const auto want_b =
        fixture::family_reference(f, stored, test::to_vec(xb), static_cast<int>(nb), sb);
    mla::LatentCache cache(c, cache_options(CacheStorage::kBFloat16, f.layer + 1));
    const auto a = cache.add_sequence(), b = cache.add_sequence();
    // The engine's own buffer: the same records, scrambled block tables.
    const Index bt = 4, blocks = 16;
    const mla::LatentRecordFormat format(c.kv_lora_rank, c.qk_rope_head_dim,
                                         CacheStorage::kBFloat16);
    std::vector<float> memory(format.bytes() * bt * blocks / sizeof(float) + 16);
    mla::PagedLatentBuffer buf;
    buf.format = format;
    buf.data = memory.data();
    buf.num_blocks = blocks;
    buf.block_tokens = bt;
    std::vector<std::int32_t> table_a = {9, 2, 14, 4, 11}, table_b = {0, 15, 5, 7};
    // The sparse families' index keys: the same block ids in a buffer of their own.
    const mla::IndexKeyFormat keys = c.has_indexer()
                                         ? mla::IndexKeyFormat(c.index_head_dim, c.index_scales)
                                         : mla::IndexKeyFormat();
    std::vector<float> key_memory(c.has_indexer() ? keys.bytes_per_token() * bt * blocks : 0);
    mla::PagedIndexBuffer ibuf;
    ibuf.format = keys;
    ibuf.data = key_memory.data();
    ibuf.num_blocks = blocks;
    ibuf.block_tokens = bt;
    const auto paged_forward = [&](const RowMatrix<float>& x, const std::vector<mla::PagedEntry>& e,
                                   auto&& y, mla::MlaWorkspace<float>& w) {
      if (c.has_indexer()) {
        layer->forward_paged(x, buf, ibuf, e, y, w);
      } else {
        layer->forward_paged(x, buf, e, y, w);
      }
    };
    mla::MlaWorkspace<float> ws, ws_paged;
    RowMatrix<float> ya(na, 64), yb(nb, 64), pa(na, 64), pb(nb, 64);
    layer->forward_batch(xa.topRows(6), {{a, sa, 6}}, cache, ya.topRows(6), ws);
    paged_forward(xa.topRows(6), {{table_a.data(), 0, sa, 6}}, pa.topRows(6), ws_paged);
    layer->forward(xb.topRows(5), sb, cache, b, yb.topRows(5), ws);
    paged_forward(xb.topRows(5), {{table_b.data(), 0, sb, 5}}, pb.topRows(5), ws_paged);
    Index la = 6, lb = 5;
    while (la < na || lb < nb) {
      const Index ka = std::min<Index>(3, na - la), kb = lb < nb ? 1 : 0;
      RowMatrix<float> x(ka + kb, 64), y(ka + kb, 64), p(ka + kb, 64);
      x.topRows(ka) = xa.middleRows(la, ka);
      if (kb) x.bottomRows(kb) = xb.middleRows(lb, kb);
      std::vector<mla::BatchEntry> entries;
      std::vector<mla::PagedEntry> paged;
      if (ka) {
        entries.push_back({a, sa + la, ka});
        paged.push_back({table_a.data(), la, sa + la, ka});
      }
      if (kb) {
        entries.push_back({b, sb + lb, kb});
        paged.push_back({table_b.data(), lb, sb + lb, kb});
      }
      layer->forward_batch(x, entries, cache, y, ws);
      paged_forward(x, paged, p, ws_paged);
      ya.middleRows(la, ka) = y.topRows(ka);
      pa.middleRows(la, ka) = p.topRows(ka);
      if (kb) {
        yb.middleRows(lb, kb) = y.bottomRows(kb);
        pb.middleRows(lb, kb) = p.bottomRows(kb);
      }
      la += ka;
      lb += kb;
    }
    // BF16 caches: within a bound of the storage (the two runs store the same records).
    EXPECT_LE(test::rel_error(test::to_vec(ya), want_a), 2e-2);
    EXPECT_LE(test::rel_error(test::to_vec(yb), want_b), 2e-2);
    EXPECT_EQ(pa, ya);
    EXPECT_EQ(pb, yb);
  }
}

TEST(FamilyLayer, SharedTopkLayersAttendOverThePreviousFullLayersSelection) {
  // GLM-5.1: layer 0 runs the indexer; layer 1 (shared) attends over layer 0's top-k of the
  // same tokens. The model's layers share one cache (with index keys: layer 1 leaves zeros)
  // and one workspace, as a model runs them.
  const Family f = fixture::glm51();
  const Model m(f, Storage::kF32);
  const auto full = m.layer(0), shared = m.layer(1);
  ASSERT_TRUE(shared->config().index_shared);
  EXPECT_TRUE(shared->weights().indexer.empty());
  const Index n = 28;
  const RowMatrix<float> x0 = test::random_input<float>(n, 64, 41);
  const RowMatrix<float> x1 = test::random_input<float>(n, 64, 42);
  ref::IndexerTrace tr;
  (void)fixture::family_reference(f, m.stored.at({0, 0}), test::to_vec(x0), static_cast<int>(n),
                                  f.start, nullptr, nullptr, &tr);
  ASSERT_EQ(tr.selected.back().size(), 8u);
  const std::vector<double> want1 =
      fixture::family_reference(f, m.stored.at({1, 0}), test::to_vec(x1), static_cast<int>(n),
                                f.start, nullptr, nullptr, nullptr, &tr.selected);
  // And the selection matters: dense attention gives another answer.
  const std::vector<double> dense = ref::mla_forward(
      f.spec, m.stored.at({1, 0}).w, test::to_vec(x1), static_cast<int>(n), f.start);
  ASSERT_GT(test::rel_error(want1, dense), 1e-3);

  mla::LatentCache cache(m.cfg.mla, cache_options(CacheStorage::kFloat32, 2));
  ASSERT_TRUE(cache.has_index_keys());
  const auto seq = cache.add_sequence();
  // The shared layer on a cache of its own (without index keys), from the copied selection.
  MlaConfig dense_cache = m.cfg.mla;
  dense_cache.index_topk = dense_cache.index_n_heads = dense_cache.index_head_dim = 0;
  mla::LatentCache cache_b(dense_cache, cache_options(CacheStorage::kFloat32, 2));
  const auto seq_b = cache_b.add_sequence();
  mla::MlaWorkspace<float> ws, other;
  RowMatrix<float> y0(n, 64), y1(n, 64), y1b(n, 64);
  Index done = 0;
  for (const Index chunk : {10, 1, 1, 4, 1, 11}) {
    full->forward(x0.middleRows(done, chunk), f.start + done, cache, seq,
                  y0.middleRows(done, chunk), ws);
    // The selection passed on through a second workspace, as an engine would copy it.
    other.topk_selection() = ws.topk_selection();
    EXPECT_EQ(ws.topk_selection().rows(), chunk);
    shared->forward(x1.middleRows(done, chunk), f.start + done, cache, seq,
                    y1.middleRows(done, chunk), ws);
    shared->forward(x1.middleRows(done, chunk), f.start + done, cache_b, seq_b,
                    y1b.middleRows(done, chunk), other);
    done += chunk;
  }
  EXPECT_LE(test::rel_error(test::to_vec(y1), want1), 1e-5);
  EXPECT_EQ(y1b, y1);
  // A selection that does not fit the call is refused before the cache changes.
  const Index before = cache.length(seq, 1);
  RowMatrix<float> extra = test::random_input<float>(2, 64, 43), out(2, 64);
  EXPECT_TRUE(test::throws_error_containing(
      [&] { shared->forward(extra, f.start + n, cache, seq, out, ws); },
      "shares the top-k of the previous layer"));
  EXPECT_EQ(cache.length(seq, 1), before);
  // A shared layer on a workspace that never saw a full layer fails too.
  mla::MlaWorkspace<float> fresh;
  EXPECT_THROW(shared->forward(extra.topRows(1), f.start + n, cache, seq, out.topRows(1), fresh),
               mla::Error);
  EXPECT_EQ(cache.length(seq, 1), before);
}

// ---------------------------------------------------------------------------------------------
// The loader

TEST(FamilyLoader, RefusesKdaLayersMissingBlocksAndTensorsItWouldNotUse) {
  {
    const Model m(fixture::kimi_linear(), Storage::kF32);
    const auto ckpt = mla::io::Checkpoint::open(m.dir.path());
    EXPECT_TRUE(test::throws_error_containing(
        [&] { mla::io::load_attention_weights<float>(ckpt, m.cfg, 2); },
        "layer 2 of this kimi_linear model is not an MLA layer"));
    EXPECT_NO_THROW(mla::io::load_attention_weights<float>(ckpt, m.cfg, 1));
    mla::io::LoadOptions o;
    o.attention_block = 1;
    EXPECT_TRUE(test::throws_error_containing(
        [&] { mla::io::load_attention_weights<float>(ckpt, m.cfg, 1, o); },
        "attention block 1 out of range: kimi_linear layers have 1 MLA block"));
  }
  {
    // A tensor under the block's prefix that the library would not use: an indexer in a dense
    // model, a gate where the config has none.
    const Family f = fixture::glm47_flash();
    TempDir dir;
    fixture::write_family(dir.path(), f, Storage::kF32);
    nlohmann::json j = f.config;
    // The same checkpoint with an extra tensor: write again with one more.
    std::vector<fixture::Tensor> tensors =
        fixture::attention_tensors(f.shapes, fixture::family_weights(f, 0, 0),
                                   "model.layers.0.self_attn.", Storage::kF32, 16)
            .tensors;
    tensors.push_back(fixture::f32_vector("model.layers.0.self_attn.indexer.k_norm.weight",
                                          mla::Vector<float>::Ones(16)));
    fixture::write_bytes(dir / "model.safetensors", fixture::safetensors_bytes(tensors));
    const auto cfg = mla::io::read_config(dir / "config.json");
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    EXPECT_TRUE(test::throws_error_containing(
        [&] { mla::io::load_attention_weights<float>(ckpt, cfg, 0); },
        "unexpected tensor 'model.layers.0.self_attn.indexer.k_norm.weight'"));
  }
  {
    // GLM-5.1's shared layers hold no indexer; one that does is refused.
    const Family f = fixture::glm51();
    TempDir dir;
    fixture::write_family(dir.path(), f, Storage::kF32);
    mla::MlaConfig full = f.shapes;
    std::vector<fixture::Tensor> tensors =
        fixture::attention_tensors(full, fixture::family_weights(f, 0, 0),
                                   "model.layers.1.self_attn.", Storage::kF32, 16)
            .tensors;
    fixture::write_bytes(dir / "model.safetensors", fixture::safetensors_bytes(tensors));
    const auto cfg = mla::io::read_config(dir / "config.json");
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    EXPECT_TRUE(
        test::throws_error_containing([&] { mla::io::load_attention_weights<float>(ckpt, cfg, 1); },
                                      "unexpected tensor 'model.layers.1.self_attn.indexer."));
  }
  {
    // Mistral's own tensor names are named as such; its params.json alone too.
    const Family f = fixture::mistral_large3();
    TempDir dir;
    fixture::write_text(dir / "config.json", f.config.dump());
    fixture::write_bytes(
        dir / "model.safetensors",
        fixture::safetensors_bytes({fixture::f32_vector("layers.0.attention.kv_a_norm.weight",
                                                        mla::Vector<float>::Ones(32))}));
    const auto cfg = mla::io::read_config(dir / "config.json");
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    EXPECT_TRUE(
        test::throws_error_containing([&] { mla::io::load_attention_weights<float>(ckpt, cfg, 0); },
                                      "tensors in Mistral's own names"));
    std::remove((dir / "config.json").c_str());
    fixture::write_text(dir / "params.json", "{}");
    EXPECT_TRUE(test::throws_error_containing([&] { mla::io::read_config(dir / "config.json"); },
                                              "Mistral's params.json"));
  }
}

// ---------------------------------------------------------------------------------------------
// deepseek_layer

#ifdef MLA_DEEPSEEK_LAYER

test::CommandResult run_cli(const TempDir& dir, const std::string& args) {
  return fixture::run_program(MLA_DEEPSEEK_LAYER, dir, args);
}

TEST(FamilyCli, DeepSeekLayerRunsEveryFamilyLikeTheReference) {
  for (const Family& f : fixture::all_families()) {
    for (int block = 0; block < f.blocks; ++block) {
      SCOPED_TRACE(f.name + " block " + std::to_string(block));
      const Model m(f, Storage::kF32);
      const Index n = 18;
      const RowMatrix<float> x = test::random_input<float>(n, 64, 51);
      mla::io::write_npy(m.dir / "x.npy", x);
      const test::CommandResult r =
          run_cli(m.dir, "--model " + m.dir.path() + " --layer " + std::to_string(f.layer) +
                             " --attn-block " + std::to_string(block) + " --input " +
                             (m.dir / "x.npy") + " --output " + (m.dir / "y.npy") + " --start " +
                             std::to_string(f.start) + " --prefill 10 --threads 2");
      ASSERT_EQ(r.status, 0) << r.err;
      EXPECT_EQ(r.out,
                "cache_bytes_per_token_per_layer: " + std::to_string(f.cache_bytes_fp32) + "\n");
      const auto want = fixture::family_reference(f, m.stored.at({f.layer, block}), test::to_vec(x),
                                                  static_cast<int>(n), f.start);
      EXPECT_LE(test::rel_error(test::to_vec(mla::io::read_npy(m.dir / "y.npy")), want), 1e-5);
    }
  }
}

TEST(FamilyCli, DeepSeekLayerRefusesWithAnErrorAndWritesNothing) {
  std::vector<Refusal> cases = refusals();
  for (const Refusal& k : cases) {
    SCOPED_TRACE(k.what);
    TempDir dir;
    // A checkpoint with a valid layer 0 of small_v3's shape; the config is the refused one.
    fixture::write_text(dir / "config.json", k.config().dump());
    mla::io::write_npy(dir / "x.npy", test::random_input<float>(3, 64, 1));
    const test::CommandResult r =
        run_cli(dir, "--model " + dir.path() + " --layer 0 --input " + (dir / "x.npy") +
                         " --output " + (dir / "y.npy"));
    EXPECT_EQ(r.status, 1);
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(k.message), std::string::npos) << r.err;
    EXPECT_FALSE(std::ifstream(dir / "y.npy").good());
  }
  // The loader's refusals too: a KDA layer, a block out of range, a shared layer alone.
  struct Case {
    Family family;
    std::string args, message;
  };
  const std::vector<Case> loader = {
      {fixture::kimi_linear(), "--layer 0", "layer 0 of this kimi_linear model is not an MLA"},
      {fixture::longcat_flash(), "--layer 0 --attn-block 2", "attention block 2 out of range"},
      {fixture::glm5(), "--layer 0 --attn-block 1", "attention block 1 out of range"},
      {fixture::glm51(), "--layer 1", "has no indexer of its own"},
  };
  for (const Case& k : loader) {
    SCOPED_TRACE(k.args);
    const Model m(k.family, Storage::kF32);
    mla::io::write_npy(m.dir / "x.npy", test::random_input<float>(3, 64, 1));
    const test::CommandResult r =
        run_cli(m.dir, "--model " + m.dir.path() + " " + k.args + " --input " + (m.dir / "x.npy") +
                           " --output " + (m.dir / "y.npy"));
    EXPECT_EQ(r.status, 1);
    EXPECT_NE(r.err.find(k.message), std::string::npos) << r.err;
    EXPECT_FALSE(std::ifstream(m.dir / "y.npy").good());
  }
}

#endif

}  // namespace
