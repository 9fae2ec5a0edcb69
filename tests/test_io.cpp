// mla/io: safetensors, checkpoints, config.json, one layer's weights, .npy, and the
// deepseek_layer runner, on fixtures the tests write themselves.

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "io_fixtures.hpp"
#include "mla/io.hpp"
#include "reference/fp8_reference.hpp"
#include "reference/mla_reference.hpp"
#include "test_util.hpp"

namespace {

using fixture::Storage;
using fixture::TempDir;
using fixture::Tensor;
using mla::Index;
using mla::MlaConfig;
using mla::RowMatrix;

Tensor f32_tensor(const std::string& name, std::vector<std::int64_t> shape, std::vector<float> v) {
  Tensor t{name, "F32", std::move(shape), std::vector<unsigned char>(v.size() * 4)};
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

/// Writes `bytes` as a file in dir and opens it, returning the error message ("" if none).
std::string open_error(const TempDir& dir, const std::vector<unsigned char>& bytes) {
  fixture::write_bytes(dir / "x.safetensors", bytes);
  try {
    mla::io::SafetensorsFile::open(dir / "x.safetensors");
  } catch (const mla::Error& e) {
    return e.what();
  }
  return "";
}

/// A hand-made header + data, for files the fixture writer would never produce.
std::vector<unsigned char> raw_file(const std::string& header, std::size_t data_bytes,
                                    std::uint64_t header_len_override = 0) {
  std::vector<unsigned char> out(8);
  const std::uint64_t len = header_len_override ? header_len_override : header.size();
  std::memcpy(out.data(), &len, 8);
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes);
  return out;
}

// ---------------------------------------------------------------------------------------------
// safetensors

TEST(Safetensors, ReadsEveryDtypeWithShapeAndData) {
  TempDir dir;
  Tensor bf{"b", "BF16", {3}, {0x80, 0x3F, 0x00, 0x40, 0x80, 0xC0}};  // 1, 2, -4
  Tensor h{"h", "F16", {2}, {0x00, 0x3C, 0x00, 0xC4}};                // 1, -4
  Tensor e4{"q", "F8_E4M3", {2, 2}, {0x38, 0x40, 0xB8, 0x7E}};        // 1, 2, -1, 448
  Tensor e5{"r", "F8_E5M2", {1}, {0x3C}};
  Tensor i8{"i", "I64", {1}, std::vector<unsigned char>(8, 0)};
  const Tensor f = f32_tensor("f", {2, 3}, {1, 2, 3, 4, 5, 6});
  fixture::write_bytes(dir / "a.safetensors", fixture::safetensors_bytes({f, bf, h, e4, e5, i8}));
  const auto file = mla::io::SafetensorsFile::open(dir / "a.safetensors");
  EXPECT_EQ(file.names(), (std::vector<std::string>{"b", "f", "h", "i", "q", "r"}));
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.tensor("f").dtype, mla::io::Dtype::kF32);
  EXPECT_EQ(file.tensor("f").shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(mla::io::to_matrix<double>(file.tensor("f"), 2, 3, "test"),
            (RowMatrix<double>(2, 3) << 1, 2, 3, 4, 5, 6).finished());
  EXPECT_EQ(mla::io::to_vector<float>(file.tensor("b"), 3, "test"), Eigen::Vector3f(1, 2, -4));
  EXPECT_EQ(mla::io::to_vector<float>(file.tensor("h"), 2, "test"), Eigen::Vector2f(1, -4));
  EXPECT_EQ(file.tensor("q").dtype, mla::io::Dtype::kF8E4M3);
  EXPECT_EQ(file.tensor("r").dtype, mla::io::Dtype::kF8E5M2);
  // An I64 tensor is listed, and refused only when read as floats.
  EXPECT_EQ(file.tensor("i").dtype, mla::io::Dtype::kUnsupported);
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::io::to_vector<float>(file.tensor("i"), 1, "test"); },
      "tensor 'i' has dtype I64 (unsupported), expected F32, F16 or BF16"));
  EXPECT_TRUE(test::throws_error_containing([&] { file.tensor("nope"); }, "no tensor 'nope'"));
}

TEST(Safetensors, BadFilesAreClearErrors) {
  TempDir dir;
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  EXPECT_EQ(open_error(dir, raw_file(ok, 8)), "");
  EXPECT_NE(open_error(dir, {}).find("empty file"), std::string::npos);
  EXPECT_NE(open_error(dir, {1, 2, 3}).find("truncated: 3 bytes"), std::string::npos);
  EXPECT_NE(open_error(dir, raw_file(ok, 8, 1000)).find("header length 1000 runs past the end"),
            std::string::npos);
  EXPECT_NE(open_error(dir, raw_file(R"({"a":{"dtype":"F32",)", 8)).find("malformed JSON header"),
            std::string::npos);
  EXPECT_NE(open_error(dir, raw_file("[1,2]", 0)).find("must be an object"), std::string::npos);
  EXPECT_NE(
      open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", 8))
          .find("data offsets [0, 16) out of range (the data section holds 8 bytes)"),
      std::string::npos);
  EXPECT_NE(
      open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,4]}})", 8))
          .find("out of range"),
      std::string::npos);
  EXPECT_NE(
      open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8))
          .find("is F32 [3] = 12 bytes, but its data offsets [0, 8) hold 8"),
      std::string::npos);
  EXPECT_NE(open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                     R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                     12))
                .find("tensors 'a' and 'b' overlap"),
            std::string::npos);
  EXPECT_NE(open_error(dir, raw_file(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8))
                .find("unknown dtype 'Q4'"),
            std::string::npos);
  EXPECT_NE(
      open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8))
          .find("shape entry must be a non-negative integer"),
      std::string::npos);
  EXPECT_NE(open_error(dir, raw_file(R"({"a":{"dtype":"F32","shape":[2]}})", 8))
                .find("no 'data_offsets'"),
            std::string::npos);
  EXPECT_NE(
      open_error(
          dir,
          raw_file(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})",
                   8))
          .find("impossibly large shape"),
      std::string::npos);
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::io::SafetensorsFile::open(dir / "missing"); }, "cannot open"));
}

// ---------------------------------------------------------------------------------------------
// config.json

TEST(Config, ReadsDeepSeekConfigs) {
  for (const MlaConfig& c : {MlaConfig::deepseek_v2_lite(), MlaConfig::deepseek_v3()}) {
    const bool fp8 = c.has_q_lora();
    const auto r = mla::io::parse_config(fixture::config_json(c, fp8, 128).dump());
    EXPECT_EQ(r.mla.hidden_size, c.hidden_size);
    EXPECT_EQ(r.mla.num_attention_heads, c.num_attention_heads);
    EXPECT_EQ(r.mla.q_lora_rank, c.q_lora_rank);  // null -> 0 for V2-Lite
    EXPECT_EQ(r.mla.kv_lora_rank, 512);
    EXPECT_EQ(r.mla.num_hidden_layers, c.num_hidden_layers);
    EXPECT_EQ(r.mla.rope_scaling.type, mla::RopeScaling::Type::kYarn);
    EXPECT_EQ(r.mla.rope_scaling.mscale_all_dim, c.rope_scaling.mscale_all_dim);
    EXPECT_DOUBLE_EQ(mla::softmax_scale(r.mla), mla::softmax_scale(c));
    EXPECT_EQ(r.fp8_weights, fp8);
    EXPECT_EQ(r.weight_block_rows, 128);
  }
  // q_lora_rank null means none; rope_type (newer HF spelling) works; no rope_scaling is plain.
  nlohmann::json j = fixture::config_json(MlaConfig::small_v3(), false, 16);
  j["q_lora_rank"] = nullptr;
  j["rope_scaling"] = {
      {"rope_type", "yarn"}, {"factor", 4.0}, {"original_max_position_embeddings", 4096}};
  auto r = mla::io::parse_config(j.dump());
  EXPECT_EQ(r.mla.q_lora_rank, 0);
  EXPECT_EQ(r.mla.rope_scaling.factor, 4.0);
  // Neither mscale given: Hugging Face's magnitude mscale(4, 1), sigma unscaled.
  EXPECT_DOUBLE_EQ(mla::Rope(r.mla).magnitude(), mla::yarn_get_mscale(4.0, 1.0));
  EXPECT_DOUBLE_EQ(mla::softmax_scale(r.mla), 1.0 / std::sqrt(24.0));
  j["rope_scaling"] = nullptr;
  r = mla::io::parse_config(j.dump());
  EXPECT_EQ(r.mla.rope_scaling.type, mla::RopeScaling::Type::kNone);
}

TEST(Config, BadConfigsNameTheField) {
  const nlohmann::json good = fixture::config_json(MlaConfig::small_v3(), true, 16);
  struct Bad {
    std::function<void(nlohmann::json&)> edit;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {[](auto& j) { j.erase("kv_lora_rank"); }, "missing field 'kv_lora_rank'"},
      {[](auto& j) { j["hidden_size"] = "64"; },
       "field 'hidden_size' must be an integer, got \"64\""},
      {[](auto& j) { j["num_attention_heads"] = 2.5; },
       "field 'num_attention_heads' must be an integer"},
      {[](auto& j) { j.erase("q_lora_rank"); }, "missing field 'q_lora_rank'"},
      {[](auto& j) { j["rope_scaling"].erase("original_max_position_embeddings"); },
       "field 'rope_scaling.original_max_position_embeddings' is required under YaRN"},
      {[](auto& j) { j["qk_rope_head_dim"] = 7; }, "MlaConfig.qk_rope_head_dim must be even"},
      {[](auto& j) { j["v_head_dim"] = 0; }, "MlaConfig.v_head_dim"},
      {[](auto& j) { j["rope_scaling"]["type"] = "linear"; },
       "rope_scaling.type = \"linear\": not supported"},
      {[](auto& j) { j["rope_scaling"]["factor"] = -1; }, "MlaConfig.rope_scaling.factor"},
      {[](auto& j) { j["quantization_config"]["quant_method"] = "gptq"; },
       "quantization_config.quant_method = \"gptq\": not supported"},
      {[](auto& j) { j["quantization_config"]["weight_block_size"] = {128}; },
       "quantization_config.weight_block_size must be two positive integers"},
      {[](auto& j) { j = nlohmann::json::array(); }, "must be a JSON object"},
  };
  for (const Bad& b : bad) {
    nlohmann::json j = good;
    b.edit(j);
    EXPECT_TRUE(
        test::throws_error_containing([&] { mla::io::parse_config(j.dump(), "my/config.json"); },
                                      "my/config.json: " + b.message));
  }
  EXPECT_TRUE(
      test::throws_error_containing([] { mla::io::parse_config("{\"a\": "); }, "malformed JSON"));
  EXPECT_TRUE(
      test::throws_error_containing([] { mla::io::read_config("/nonexistent/config.json"); },
                                    "/nonexistent/config.json: cannot open"));
}

TEST(Config, ReadsWhatPublishedMlaModelsWrite) {
  // A config written like those of models built on DeepSeek-V3's attention (Kimi K2: equal
  // betas; V3.1: scale_fmt ue8m0), with HF's rope_interleave and fields this library does not
  // use (mixture-of-experts settings, auto_map), which are ignored.
  nlohmann::json j = fixture::config_json(MlaConfig::small_v3(), true, 16);
  j["rope_scaling"]["beta_fast"] = 1.0;
  j["rope_scaling"]["beta_slow"] = 1.0;
  j["rope_scaling"]["factor"] = 32.0;
  j["quantization_config"]["scale_fmt"] = "ue8m0";
  j["rope_interleave"] = true;
  j["n_routed_experts"] = 384;
  j["moe_intermediate_size"] = 2048;
  j["topk_method"] = "noaux_tc";
  j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"}};
  auto r = mla::io::parse_config(j.dump());
  EXPECT_EQ(r.mla.rope_scaling.beta_fast, 1.0);
  EXPECT_EQ(r.mla.rope_scaling.beta_slow, 1.0);
  EXPECT_EQ(r.activation_scales, mla::ScaleFormat::kPowerOfTwo);
  EXPECT_EQ(r.mla.rope_layout, mla::RopeLayout::kInterleaved);
  j["rope_interleave"] = false;
  EXPECT_EQ(mla::io::parse_config(j.dump()).mla.rope_layout, mla::RopeLayout::kHalfSplit);
  j.erase("rope_interleave");
  j["quantization_config"].erase("scale_fmt");
  r = mla::io::parse_config(j.dump());
  EXPECT_EQ(r.mla.rope_layout, mla::RopeLayout::kInterleaved);  // DeepSeek's own layout
  EXPECT_EQ(r.activation_scales, mla::ScaleFormat::kFloat32);
  // transformers' newer rope_parameters (theta and scaling in one object); "default" is plain.
  nlohmann::json p = j;
  p.erase("rope_scaling");
  p.erase("rope_theta");
  p["rope_parameters"] = {{"rope_type", "yarn"}, {"rope_theta", 50000.0},
                          {"factor", 8.0},       {"original_max_position_embeddings", 2048},
                          {"beta_fast", 16.0},   {"beta_slow", 2.0}};
  r = mla::io::parse_config(p.dump());
  EXPECT_EQ(r.mla.rope_theta, 50000.0);
  EXPECT_EQ(r.mla.rope_scaling.type, mla::RopeScaling::Type::kYarn);
  EXPECT_EQ(r.mla.rope_scaling.factor, 8.0);
  EXPECT_EQ(r.mla.rope_scaling.beta_slow, 2.0);
  p["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 20000.0}};
  r = mla::io::parse_config(p.dump());
  EXPECT_EQ(r.mla.rope_theta, 20000.0);
  EXPECT_EQ(r.mla.rope_scaling.type, mla::RopeScaling::Type::kNone);
}

TEST(Config, IntegersBeyondInt64AndDirectoriesAreNamed) {
  nlohmann::json j = fixture::config_json(MlaConfig::small_v3(), false, 16);
  j["hidden_size"] = 18446744073709551615ull;
  EXPECT_TRUE(test::throws_error_containing(
      [&] { mla::io::parse_config(j.dump(), "c.json"); },
      "c.json: field 'hidden_size' = 18446744073709551615 overflows a 64-bit signed integer"));
  j["hidden_size"] = 9223372036854775808ull;  // 2^63: one past the int64 maximum
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(j.dump()); },
                                            "overflows a 64-bit signed integer"));
  // Integers beyond even uint64 reach the parser as floating-point numbers.
  j["hidden_size"] = 64;
  std::string text = j.dump();
  const std::string from = "\"hidden_size\":64";
  ASSERT_NE(text.find(from), std::string::npos);
  text.replace(text.find(from), from.size(), "\"hidden_size\":100000000000000000000000000000");
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(text); },
                                            "beyond the 64-bit signed range"));
  // A config.json that is a directory says so.
  TempDir dir;
  ASSERT_EQ(::mkdir((dir / "config.json").c_str(), 0700), 0);
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::read_config(dir / "config.json"); },
                                            "config.json: is a directory, expected a file"));
}

TEST(Config, KnownFieldsOfTheWrongTypeAreNamed) {
  const nlohmann::json good = fixture::config_json(MlaConfig::small_v3(), true, 16);
  struct Bad {
    std::function<void(nlohmann::json&)> edit;
    std::string message;
  };
  const std::vector<Bad> bad = {
      {[](auto& j) { j["rope_interleave"] = "true"; },
       "field 'rope_interleave' must be true or false, got \"true\""},
      {[](auto& j) { j["quantization_config"]["scale_fmt"] = "fp32"; },
       "quantization_config.scale_fmt = \"fp32\": not supported"},
      {[](auto& j) { j["quantization_config"]["scale_fmt"] = 8; },
       "field 'quantization_config.scale_fmt' must be a string"},
      {[](auto& j) { j["quantization_config"]["activation_scheme"] = "static"; },
       "quantization_config.activation_scheme = \"static\": not supported"},
      {[](auto& j) { j["rope_scaling"]["beta_fast"] = "32"; },
       "field 'rope_scaling.beta_fast' must be a number"},
      {[](auto& j) { j["rope_scaling"]["beta_slow"] = 0; }, "MlaConfig.rope_scaling.beta_slow"},
      {[](auto& j) {
         j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", "big"}};
       },
       "field 'rope_parameters.factor' must be a number"},
      {[](auto& j) { j["rope_parameters"] = 3; }, "field 'rope_parameters' must be an object"},
      {[](auto& j) { j["max_position_embeddings"] = true; },
       "field 'max_position_embeddings' must be an integer, got true"},
  };
  for (const Bad& b : bad) {
    nlohmann::json j = good;
    b.edit(j);
    EXPECT_TRUE(
        test::throws_error_containing([&] { mla::io::parse_config(j.dump(), "my/config.json"); },
                                      "my/config.json: " + b.message));
  }
}

// ---------------------------------------------------------------------------------------------
// One layer from a checkpoint, against the double reference

struct CheckpointCase {
  const char* name;
  MlaConfig config;
  Storage storage;
  int shards;
};

std::vector<CheckpointCase> checkpoint_cases() {
  std::vector<CheckpointCase> v;
  for (Storage s : {Storage::kF32, Storage::kBF16, Storage::kFp8}) {
    for (int shards : {1, 3}) {
      v.push_back({"v2lite", MlaConfig::small_v2_lite(), s, shards});
      v.push_back({"v3", MlaConfig::small_v3(), s, shards});
    }
  }
  return v;
}

const char* storage_name(Storage s) {
  return s == Storage::kF32 ? "F32" : s == Storage::kBF16 ? "BF16" : "FP8";
}

TEST(LayerFromCheckpoint, MatchesTheReferenceOnTheStoredWeights) {
  for (const CheckpointCase& k : checkpoint_cases()) {
    SCOPED_TRACE(std::string(k.name) + " " + storage_name(k.storage) + " shards " +
                 std::to_string(k.shards));
    TempDir dir;
    // Two layers, so that loading picks the right one.
    const std::vector<mla::MlaWeights<float>> w = {mla::MlaWeights<float>::random(k.config, 1),
                                                   mla::MlaWeights<float>::random(k.config, 2)};
    const auto stored = fixture::write_checkpoint(dir.path(), k.config, w, k.storage, k.shards);
    const auto cfg = mla::io::read_config(dir / "config.json");
    EXPECT_EQ(cfg.fp8_weights, k.storage == Storage::kFp8);
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    const mla::MlaWeights<float> loaded = mla::io::load_attention_weights<float>(ckpt, cfg, 1);
    EXPECT_EQ(loaded.wkv_b.is_fp8(), k.storage == Storage::kFp8);
    // The loaded projections hold exactly the stored values (compared in double, where an FP8
    // code times its scale is exact).
    EXPECT_EQ(loaded.wkv_a.cast<double>().to_dense(), stored[1].wkv_a.to_dense());
    EXPECT_EQ(loaded.wo.cast<double>().to_dense(), stored[1].wo.to_dense());

    const mla::MlaLayer<float> layer(cfg.mla, loaded);
    const Index n = 30;
    const RowMatrix<float> x = test::random_input<float>(n, k.config.hidden_size, 3);
    mla::LatentCacheOptions o;
    o.num_blocks = 1;
    mla::LatentCache cache(cfg.mla, o);
    const auto seq = cache.add_sequence();
    mla::MlaWorkspace<float> ws;
    RowMatrix<float> y(n, k.config.hidden_size);
    layer.forward(x.topRows(20), 500, cache, seq, y.topRows(20), ws);
    for (Index t = 20; t < n; ++t) layer.forward(x.row(t), 500 + t, cache, seq, y.row(t), ws);
    const std::vector<double> want = ref::mla_forward(
        test::to_ref(k.config), test::to_ref(stored[1]), test::to_vec(x), static_cast<int>(n), 500);
    EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-5);
  }
}

TEST(LayerFromCheckpoint, BorrowedWeightsCostTheFilesBytesAndOutliveTheCheckpoint) {
  // BF16 and FP8 projections use the mapped file in place: the layer's weights take the bytes
  // the checkpoint stores for its projections (codes and scales) plus its two norm vectors as
  // float (the stated overhead); they stay valid after the Checkpoint object is destroyed and
  // the files are deleted (the mapping lives as long as the projections).
  for (const CheckpointCase& k : checkpoint_cases()) {
    SCOPED_TRACE(std::string(k.name) + " " + storage_name(k.storage) + " shards " +
                 std::to_string(k.shards));
    const mla::MlaWeights<float> w = mla::MlaWeights<float>::random(k.config, 4);
    std::size_t projection_bytes = 0;
    for (const fixture::Tensor& t : fixture::layer_tensors(k.config, w, 0, k.storage, 16).tensors) {
      if (t.name.find("layernorm") == std::string::npos) projection_bytes += t.bytes.size();
    }
    const std::size_t norm_bytes =
        sizeof(float) * static_cast<std::size_t>(k.config.q_lora_rank + k.config.kv_lora_rank);
    std::optional<mla::MlaLayer<float>> layer;
    std::vector<mla::MlaWeights<double>> stored;
    mla::io::CheckpointConfig cfg;
    {
      TempDir dir;
      stored = fixture::write_checkpoint(dir.path(), k.config, {w}, k.storage, k.shards);
      cfg = mla::io::read_config(dir / "config.json");
      const auto ckpt = mla::io::Checkpoint::open(dir.path());
      const mla::MlaWeights<float> loaded = mla::io::load_attention_weights<float>(ckpt, cfg, 0);
      const mla::WeightStorage want = k.storage == Storage::kBF16  ? mla::WeightStorage::kBf16
                                      : k.storage == Storage::kFp8 ? mla::WeightStorage::kBlockFp8
                                                                   : mla::WeightStorage::kDense;
      EXPECT_EQ(loaded.wkv_b.storage(), want);
      EXPECT_EQ(loaded.wo.storage(), want);
      if (k.storage == Storage::kFp8) {
        EXPECT_FALSE(loaded.wkv_b.fp8().owns());
      }
      layer.emplace(cfg.mla, loaded);
    }  // the Checkpoint, the loaded weights and the files are gone; the layer holds the mapping
    EXPECT_EQ(layer->weight_bytes(), projection_bytes + norm_bytes);
    const Index n = 24;
    const RowMatrix<float> x = test::random_input<float>(n, k.config.hidden_size, 5);
    mla::LatentCacheOptions o;
    o.num_blocks = 1;
    mla::LatentCache cache(cfg.mla, o);
    const auto seq = cache.add_sequence();
    mla::MlaWorkspace<float> ws;
    RowMatrix<float> y(n, k.config.hidden_size);
    layer->forward(x, 0, cache, seq, y, ws);
    const std::vector<double> want = ref::mla_forward(
        test::to_ref(k.config), test::to_ref(stored[0]), test::to_vec(x), static_cast<int>(n), 0);
    EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-5);
  }
}

TEST(LayerFromCheckpoint, EdgeYarnAndHalfSplitConfigsRunLikeTheReference) {
  // The checkpoint's config.json says: equal betas, factor 32, rope_interleave false. The
  // reference is given the same settings directly (not through the parser).
  MlaConfig c = MlaConfig::small_v3();
  c.rope_scaling.beta_fast = 1.0;
  c.rope_scaling.beta_slow = 1.0;
  c.rope_scaling.factor = 32.0;
  c.rope_layout = mla::RopeLayout::kHalfSplit;
  for (bool interleave : {false, true}) {
    SCOPED_TRACE(interleave ? "rope_interleave true" : "rope_interleave false");
    TempDir dir;
    const std::vector<mla::MlaWeights<float>> w = {mla::MlaWeights<float>::random(c, 4)};
    const auto stored = fixture::write_checkpoint(dir.path(), c, w, Storage::kF32, 1);
    nlohmann::json j = fixture::config_json(c, false, 16);
    j["rope_interleave"] = interleave;
    fixture::write_text(dir / "config.json", j.dump());
    const auto cfg = mla::io::read_config(dir / "config.json");
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    const mla::MlaLayer<double> layer(cfg.mla,
                                      mla::io::load_attention_weights<double>(ckpt, cfg, 0));
    const Index n = 24;
    const RowMatrix<double> x = test::random_input<double>(n, c.hidden_size, 5);
    mla::LatentCacheOptions o;
    o.num_blocks = 1;
    o.storage = mla::CacheStorage::kFloat64;
    mla::LatentCache cache(cfg.mla, o);
    const auto seq = cache.add_sequence();
    mla::MlaWorkspace<double> ws;
    RowMatrix<double> y(n, c.hidden_size);
    layer.forward(x, 150000, cache, seq, y, ws);
    MlaConfig expected = c;
    expected.rope_layout = interleave ? mla::RopeLayout::kInterleaved : mla::RopeLayout::kHalfSplit;
    const std::vector<double> want =
        ref::mla_forward(test::to_ref(expected), test::to_ref(stored[0]), test::to_vec(x),
                         static_cast<int>(n), 150000);
    EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-12);
    if (!interleave) {
      // And the layout does matter: the other pairing gives another answer.
      MlaConfig other = expected;
      other.rope_layout = mla::RopeLayout::kInterleaved;
      const std::vector<double> wrong =
          ref::mla_forward(test::to_ref(other), test::to_ref(stored[0]), test::to_vec(x),
                           static_cast<int>(n), 150000);
      EXPECT_GT(test::rel_error(test::to_vec(y), wrong), 1e-3);
    }
  }
}

/// DeepSeek's fp8_gemm W8A8 for one projection, in scalar loops: activations quantised per
/// token per 128 channels with scale max(amax, 1e-4) / 448 (rounded up to a power of two for
/// ue8m0), e4m3 rounding by the OCP reference; per K block the exact products summed, then
/// multiplied by both scales.
std::vector<double> w8a8_reference(const RowMatrix<float>& x, const mla::BlockFp8Matrix& w,
                                   bool pow2) {
  const ref::Fp8Rounder e4m3(ref::kE4M3FN);
  const Index M = x.rows(), K = x.cols(), N = w.rows(), bk = w.block_cols();
  std::vector<double> y(static_cast<std::size_t>(M * N), 0.0);
  for (Index m = 0; m < M; ++m) {
    for (Index b = 0; b * bk < K; ++b) {
      const Index k0 = b * bk, k1 = std::min(K, k0 + bk);
      // In float, as act_quant computes it.
      float amax = 0.0f;
      for (Index k = k0; k < k1; ++k) amax = std::max(amax, std::fabs(x(m, k)));
      float sx = std::max(amax, 1e-4f) / 448.0f;
      if (pow2) sx = static_cast<float>(std::exp2(std::ceil(std::log2(static_cast<double>(sx)))));
      for (Index n = 0; n < N; ++n) {
        double p = 0.0;
        for (Index k = k0; k < k1; ++k) {
          const double q =
              ref::fp8_value(ref::kE4M3FN, e4m3.round(static_cast<double>(x(m, k) / sx), true));
          p += q * static_cast<double>(static_cast<float>(w.codes()[n * K + k]));
        }
        y[static_cast<std::size_t>(m * N + n)] +=
            p * static_cast<double>(sx) * static_cast<double>(w.scale(n / w.block_rows(), b));
      }
    }
  }
  return y;
}

TEST(LayerFromCheckpoint, ScaleFmtUe8m0MakesW8A8ActivationScalesPowersOfTwo) {
  const MlaConfig c = MlaConfig::small_v3();
  TempDir dir;
  fixture::write_checkpoint(dir.path(), c, {mla::MlaWeights<float>::random(c, 6)}, Storage::kFp8,
                            1);
  const RowMatrix<float> x = test::random_input<float>(5, c.hidden_size, 7) * 3.0f;
  std::vector<std::vector<double>> got;
  for (bool ue8m0 : {false, true}) {
    SCOPED_TRACE(ue8m0 ? "ue8m0" : "fp32 scales");
    nlohmann::json j = fixture::config_json(c, true, 16);
    if (ue8m0) j["quantization_config"]["scale_fmt"] = "ue8m0";
    fixture::write_text(dir / "config.json", j.dump());
    const auto cfg = mla::io::read_config(dir / "config.json");
    mla::io::LoadOptions load;
    load.fp8_matmul = mla::Fp8Matmul::kW8A8;
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    const mla::MlaWeights<float> w = mla::io::load_attention_weights<float>(ckpt, cfg, 0, load);
    ASSERT_TRUE(w.wq_a.is_fp8());
    RowMatrix<float> y(5, w.wq_a.rows());
    mla::project(w.wq_a, x, y);
    const std::vector<double> want = w8a8_reference(x, w.wq_a.fp8(), ue8m0);
    const std::vector<double> other = w8a8_reference(x, w.wq_a.fp8(), !ue8m0);
    EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-6);
    EXPECT_GT(test::rel_error(test::to_vec(y), other), 1e-4) << "the scale format matters";
    // An explicit LoadOptions choice overrides the config.
    load.activation_scales = ue8m0 ? mla::ScaleFormat::kFloat32 : mla::ScaleFormat::kPowerOfTwo;
    const mla::MlaWeights<float> w2 = mla::io::load_attention_weights<float>(ckpt, cfg, 0, load);
    mla::project(w2.wq_a, x, y);
    EXPECT_LE(test::rel_error(test::to_vec(y), other), 1e-6);
  }
}

TEST(LayerFromCheckpoint, BadCheckpointsNameTheFileAndTensor) {
  const MlaConfig c = MlaConfig::small_v3();
  const std::vector<mla::MlaWeights<float>> w = {mla::MlaWeights<float>::random(c, 1)};
  const std::string p = "model.layers.0.self_attn.";
  auto with_tensors = [&](const std::function<void(std::vector<Tensor>&)>& edit, Storage s) {
    auto dir = std::make_unique<TempDir>();
    fixture::write_text(*dir / "config.json",
                        fixture::config_json(c, s == Storage::kFp8, 16).dump());
    auto t = fixture::layer_tensors(c, w[0], 0, s, 16).tensors;
    edit(t);
    fixture::write_bytes(*dir / "model.safetensors", fixture::safetensors_bytes(t));
    return dir;
  };
  auto load_error = [&](const TempDir& dir, Index layer = 0) -> std::string {
    try {
      const auto cfg = mla::io::read_config(dir / "config.json");
      mla::io::load_attention_weights<float>(mla::io::Checkpoint::open(dir.path()), cfg, layer);
    } catch (const mla::Error& e) {
      return e.what();
    }
    return "";
  };
  auto find = [&](std::vector<Tensor>& t, const std::string& name) -> Tensor& {
    for (Tensor& x : t) {
      if (x.name == name) return x;
    }
    throw std::runtime_error("fixture has no " + name);
  };
  {  // a missing tensor
    auto d = with_tensors([&](auto& t) { t.erase(t.begin() + 3); }, Storage::kF32);
    EXPECT_NE(load_error(*d).find("missing tensor 'model.layers.0.self_attn."), std::string::npos);
  }
  {  // a shape that does not match the config
    auto d = with_tensors(
        [&](auto& t) {
          Tensor& kvb = find(t, p + "kv_b_proj.weight");
          kvb.shape = {kvb.shape[1], kvb.shape[0]};
        },
        Storage::kF32);
    const std::string e = load_error(*d);
    EXPECT_NE(e.find("model.safetensors: tensor 'model.layers.0.self_attn.kv_b_proj.weight' has "
                     "shape [32, 112], "
                     "expected [112, 32]"),
              std::string::npos)
        << e;
  }
  {  // a dtype that does not match (an integer weight), and one this library does not read
    auto d =
        with_tensors([&](auto& t) { find(t, p + "o_proj.weight").dtype = "I32"; }, Storage::kF32);
    EXPECT_NE(
        load_error(*d).find("'model.layers.0.self_attn.o_proj.weight' has dtype I32 (unsupported)"),
        std::string::npos);
    auto d2 = with_tensors(
        [&](auto& t) {
          Tensor& o = find(t, p + "kv_a_layernorm.weight");
          o.dtype = "F64";
          o.bytes.resize(o.bytes.size() * 2);
        },
        Storage::kF32);
    EXPECT_NE(load_error(*d2).find(
                  "kv_a_layernorm.weight' has dtype F64 (unsupported), expected F32, F16 or BF16"),
              std::string::npos);
  }
  {  // FP8: a missing scale, a scale of the wrong shape, an E5M2 weight
    auto d = with_tensors(
        [&](auto& t) {
          t.erase(std::find_if(t.begin(), t.end(), [&](const Tensor& x) {
            return x.name == p + "o_proj.weight_scale_inv";
          }));
        },
        Storage::kFp8);
    EXPECT_NE(
        load_error(*d).find("missing tensor 'model.layers.0.self_attn.o_proj.weight_scale_inv'"),
        std::string::npos);
    auto d2 = with_tensors(
        [&](auto& t) {
          Tensor& s = find(t, p + "kv_b_proj.weight_scale_inv");
          s.shape = {s.shape[0] * s.shape[1]};
        },
        Storage::kFp8);
    EXPECT_NE(load_error(*d2).find("kv_b_proj.weight_scale_inv' has shape [14], expected [7, 2]"),
              std::string::npos)
        << load_error(*d2);
    auto d3 =
        with_tensors([&](auto& t) { find(t, p + "kv_a_proj_with_mqa.weight").dtype = "F8_E5M2"; },
                     Storage::kFp8);
    EXPECT_NE(
        load_error(*d3).find("kv_a_proj_with_mqa.weight' has dtype F8_E5M2, expected F8_E4M3"),
        std::string::npos);
  }
  {  // a layer the model does not have
    auto d = with_tensors([](auto&) {}, Storage::kF32);
    EXPECT_NE(load_error(*d, 5).find("layer 5 out of range: the model has 2 layers"),
              std::string::npos);
    EXPECT_NE(load_error(*d, 1).find("missing tensor 'model.layers.1.self_attn."),
              std::string::npos);
  }
  {  // no weights at all; an index that names a shard which is not there
    TempDir d;
    fixture::write_text(d / "config.json", fixture::config_json(c, false, 16).dump());
    EXPECT_NE(load_error(d).find("no model.safetensors and no model.safetensors.index.json"),
              std::string::npos);
    fixture::write_text(
        d / "model.safetensors.index.json",
        R"({"weight_map": {"model.layers.0.self_attn.q_a_proj.weight": "gone.safetensors"}})");
    EXPECT_NE(load_error(d).find("gone.safetensors: cannot open"), std::string::npos);
    fixture::write_text(d / "model.safetensors.index.json", R"({"weight_map": {"a": "../x"}})");
    EXPECT_NE(load_error(d).find("not a file of the directory"), std::string::npos);
  }
}

// ---------------------------------------------------------------------------------------------
// .npy

std::vector<unsigned char> npy_bytes(const std::string& header_dict, std::size_t data_bytes,
                                     int version = 1) {
  std::string h = header_dict;
  const std::size_t pre = version == 1 ? 10 : 12;
  while ((pre + h.size() + 1) % 64 != 0) h += ' ';
  h += '\n';
  std::vector<unsigned char> out = {
      0x93, 'N', 'U', 'M', 'P', 'Y', static_cast<unsigned char>(version), 0};
  if (version == 1) {
    out.push_back(static_cast<unsigned char>(h.size() & 0xFF));
    out.push_back(static_cast<unsigned char>(h.size() >> 8));
  } else {
    const std::uint32_t n = static_cast<std::uint32_t>(h.size());
    out.resize(12);
    std::memcpy(out.data() + 8, &n, 4);
  }
  out.insert(out.end(), h.begin(), h.end());
  for (std::size_t i = 0; i < data_bytes; ++i) out.push_back(static_cast<unsigned char>(i * 7));
  return out;
}

std::string npy_error(const std::vector<unsigned char>& b) {
  try {
    mla::io::parse_npy(b.data(), b.size(), "x.npy");
  } catch (const mla::Error& e) {
    return e.what();
  }
  return "";
}

TEST(Npy, ReadsWhatNumpyWritesAndWritesWhatItReads) {
  const std::vector<unsigned char> v1 =
      npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 24);
  const RowMatrix<float> m = mla::io::parse_npy(v1.data(), v1.size(), "x.npy");
  ASSERT_EQ(m.rows(), 3);
  ASSERT_EQ(m.cols(), 2);
  EXPECT_EQ(std::memcmp(m.data(), v1.data() + v1.size() - 24, 24), 0);  // the data is last
  const std::vector<unsigned char> v2 =
      npy_bytes("{\"descr\":\"<f4\",\"shape\":(3,2),\"fortran_order\":False}", 24, 2);
  EXPECT_EQ(mla::io::parse_npy(v2.data(), v2.size(), "x.npy"), m);
  TempDir dir;
  mla::io::write_npy(dir / "y.npy", m);
  EXPECT_EQ(mla::io::read_npy(dir / "y.npy"), m);
  std::ifstream in(dir / "y.npy", std::ios::binary);
  const std::vector<unsigned char> written((std::istreambuf_iterator<char>(in)),
                                           std::istreambuf_iterator<char>());
  EXPECT_EQ(written, v1);  // byte for byte numpy's layout: the same header, 64-byte aligned data
  const std::vector<unsigned char> empty =
      npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (0, 5), }", 0);
  EXPECT_EQ(mla::io::parse_npy(empty.data(), empty.size(), "x.npy").cols(), 5);
}

TEST(Npy, BadArraysAreClearErrors) {
  EXPECT_NE(npy_error({}).find("empty file"), std::string::npos);
  EXPECT_NE(npy_error({'P', 'K', 3, 4, 0, 0, 0, 0, 0, 0, 0}).find("not a .npy file"),
            std::string::npos);
  EXPECT_NE(npy_error(npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (3, 2), }", 48))
                .find("must hold float32 ('<f4'), got '<f8'"),
            std::string::npos);
  EXPECT_NE(npy_error(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }", 24))
                .find("must be 2-D, got shape (6,)"),
            std::string::npos);
  EXPECT_NE(
      npy_error(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2, 3), }", 24))
          .find("must be 2-D, got shape (1, 2, 3)"),
      std::string::npos);
  EXPECT_NE(npy_error(npy_bytes("{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }", 24))
                .find("Fortran-ordered"),
            std::string::npos);
  EXPECT_NE(npy_error(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 20))
                .find("truncated: shape (3, 2) needs 24 bytes of data, the file holds 20"),
            std::string::npos);
  EXPECT_NE(npy_error(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 28))
                .find("4 unexpected bytes after"),
            std::string::npos);
  EXPECT_NE(
      npy_error(npy_bytes("{'descr': '<f4', 'shape': (3, 2), }", 24)).find("malformed .npy header"),
      std::string::npos);
  EXPECT_NE(
      npy_error(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 24, 4))
          .find("unsupported .npy version 4"),
      std::string::npos);
  std::vector<unsigned char> cut =
      npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }", 24);
  cut.resize(30);
  EXPECT_NE(npy_error(cut).find("truncated header"), std::string::npos);
  EXPECT_NE(
      npy_error(
          npy_bytes(
              "{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999, 2), }", 0))
          .find("dimension too large"),
      std::string::npos);
}

TEST(LayerFromCheckpoint, BadIndexerTensorsAndFieldsAreNamed) {
  const MlaConfig c = MlaConfig::small_v32();
  TempDir dir;
  const auto w = mla::MlaWeights<float>::random(c, 3);
  fixture::LayerTensors t = fixture::layer_tensors(c, w, 0, Storage::kBF16, 16);
  const auto write = [&](const std::vector<fixture::Tensor>& tensors) {
    fixture::write_text(dir / "config.json", fixture::config_json(c, false, 16).dump());
    fixture::write_bytes(dir / "model.safetensors", fixture::safetensors_bytes(tensors));
  };
  const auto load = [&] {
    const auto ckpt = mla::io::Checkpoint::open(dir.path());
    (void)mla::io::load_attention_weights<float>(ckpt, mla::io::read_config(dir / "config.json"),
                                                 0);
  };
  write(t.tensors);
  EXPECT_NO_THROW(load());
  for (const char* name : {"indexer.wk.weight", "indexer.k_norm.bias",
                           "indexer.weights_proj.weight", "indexer.wq_b.weight"}) {
    std::vector<fixture::Tensor> missing;
    for (const auto& x : t.tensors) {
      if (x.name.find(name) == std::string::npos) missing.push_back(x);
    }
    write(missing);
    EXPECT_TRUE(test::throws_error_containing(
        load, std::string("missing tensor 'model.layers.0.self_attn.") + name))
        << name;
  }
  std::vector<fixture::Tensor> wrong = t.tensors;
  for (auto& x : wrong) {
    if (x.name.find("indexer.wk.weight") != std::string::npos) {
      x.shape = {8, c.hidden_size * 2};  // same bytes, wrong shape
    }
  }
  write(wrong);
  EXPECT_TRUE(test::throws_error_containing(load, "indexer.wk.weight"));

  // Config fields: index_topk without the others, and impossible values.
  nlohmann::json j = fixture::config_json(c, false, 16);
  j.erase("index_head_dim");
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(j.dump()); },
                                            "missing field 'index_head_dim'"));
  j = fixture::config_json(c, false, 16);
  j["index_head_dim"] = 24;
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(j.dump()); },
                                            "index_head_dim must be a power of two"));
  j = fixture::config_json(c, false, 16);
  j["index_topk"] = "2048";
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(j.dump()); },
                                            "'index_topk' must be an integer"));
  j = fixture::config_json(c, false, 16);
  j.erase("index_topk");
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(j.dump()); },
                                            "missing field 'index_topk'"));
  // The same fields on a type without an indexer are refused, not ignored.
  j = fixture::config_json(c, false, 16);
  j["model_type"] = "deepseek_v3";
  EXPECT_TRUE(test::throws_error_containing([&] { mla::io::parse_config(j.dump()); },
                                            "model_type 'deepseek_v3' has no sparse attention"));
  for (const char* f : {"index_topk", "index_n_heads", "index_head_dim"}) j.erase(f);
  const auto dense = mla::io::parse_config(j.dump());
  EXPECT_FALSE(dense.mla.has_indexer());
}

// ---------------------------------------------------------------------------------------------
// deepseek_layer, end to end (built with the examples)

using CliResult = test::CommandResult;
using fixture::run_program;

#ifdef MLA_DEEPSEEK_LAYER

CliResult run_cli(const TempDir& dir, const std::string& args) {
  return run_program(MLA_DEEPSEEK_LAYER, dir, args);
}

TEST(DeepSeekLayer, RunsACheckpointLayerLikeTheLibrary) {
  for (Storage s : {Storage::kBF16, Storage::kFp8}) {
    const MlaConfig c = MlaConfig::small_v3();
    TempDir dir;
    const std::vector<mla::MlaWeights<float>> w = {mla::MlaWeights<float>::random(c, 7),
                                                   mla::MlaWeights<float>::random(c, 8)};
    const auto stored = fixture::write_checkpoint(dir / "", c, w, s, 2);
    const RowMatrix<float> x = test::random_input<float>(20, c.hidden_size, 9);
    mla::io::write_npy(dir / "x.npy", x);
    for (const char* cache : {"fp32", "bf16", "fp8"}) {
      SCOPED_TRACE(std::string(storage_name(s)) + " cache " + cache);
      const CliResult r =
          run_cli(dir, "--model " + dir.path() + " --layer 1 --input " + (dir / "x.npy") +
                           " --output " + (dir / "y.npy") + " --start 4096 --prefill 12 --cache " +
                           cache + " --threads 2");
      ASSERT_EQ(r.status, 0) << r.err;
      const std::size_t bytes = std::string(cache) == "fp32"   ? 160
                                : std::string(cache) == "bf16" ? 80
                                                               : 52;
      EXPECT_EQ(r.out, "cache_bytes_per_token_per_layer: " + std::to_string(bytes) + "\n");
      const RowMatrix<float> y = mla::io::read_npy(dir / "y.npy");
      ASSERT_EQ(y.rows(), 20);
      // Against the double reference, for the FP32 cache (others round the latent).
      if (std::string(cache) == "fp32") {
        const std::vector<double> want =
            ref::mla_forward(test::to_ref(c), test::to_ref(stored[1]), test::to_vec(x), 20, 4096);
        EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-5);
      }
      std::remove((dir / "y.npy").c_str());
    }
  }
}

TEST(DeepSeekLayer, ErrorsSayWhatAndWhereAndWriteNothing) {
  const MlaConfig c = MlaConfig::small_v3();
  TempDir dir;
  fixture::write_checkpoint(dir / "", c, {mla::MlaWeights<float>::random(c, 7)}, Storage::kBF16, 1);
  mla::io::write_npy(dir / "x.npy", test::random_input<float>(5, c.hidden_size, 1));
  mla::io::write_npy(dir / "narrow.npy", test::random_input<float>(5, 10, 1));
  fixture::write_bytes(
      dir / "f64.npy",
      npy_bytes("{'descr': '<f8', 'fortran_order': False, 'shape': (1, 64), }", 512));
  fixture::write_bytes(
      dir / "cut.npy",
      npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (5, 64), }", 100));
  const std::string base = "--model " + dir.path() + " --output " + (dir / "y.npy");
  struct Case {
    std::string args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {base + " --layer 0 --input " + (dir / "narrow.npy"),
       "narrow.npy: has 10 columns, expected hidden_size = 64"},
      {base + " --layer 0 --input " + (dir / "f64.npy"), "f64.npy: must hold float32"},
      {base + " --layer 0 --input " + (dir / "cut.npy"), "cut.npy: truncated"},
      {base + " --layer 0 --input " + (dir / "none.npy"), "none.npy: cannot open"},
      {base + " --layer 3 --input " + (dir / "x.npy"), "layer 3 out of range"},
      {base + " --layer 1 --input " + (dir / "x.npy"), "missing tensor 'model.layers.1.self_attn."},
      {base + " --layer 0 --input " + (dir / "x.npy") + " --prefill 9",
       "--prefill 9 exceeds the 5 tokens"},
      {base + " --layer 0 --input " + (dir / "x.npy") + " --cache fp16",
       "--cache must be fp32, bf16 or fp8"},
      {base + " --layer zero --input " + (dir / "x.npy"), "--layer needs an integer, got 'zero'"},
      {base + " --layer 0 --input " + (dir / "x.npy") + " --bogus 1", "unknown option '--bogus'"},
      {base + " --layer 0 --input", "--input needs a value"},
      {"--layer 0 --input x.npy --output y.npy --model " + (dir / "nowhere"),
       "nowhere/config.json: cannot open"},
  };
  for (const Case& k : cases) {
    const CliResult r = run_cli(dir, k.args);
    EXPECT_EQ(r.status, 1) << k.args;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(k.message), std::string::npos)
        << "stderr: " << r.err << " expected: " << k.message;
    EXPECT_TRUE(r.out.empty()) << r.out;
    EXPECT_FALSE(std::ifstream(dir / "y.npy").good()) << "Y written after: " << k.args;
  }
}

/// A DeepSeek-V3.2-format checkpoint (FP8 indexer wq_b / wk with block scales, BF16 k_norm and
/// weights_proj, index_* config fields, ue8m0) runs through deepseek_layer like the double
/// reference of sparse attention; its config without index_topk runs dense.
TEST(DeepSeekLayer, RunsV32SparseLayersLikeTheReference) {
  for (Storage s : {Storage::kBF16, Storage::kFp8}) {
    SCOPED_TRACE(storage_name(s));
    const MlaConfig c = MlaConfig::small_v32();
    TempDir dir;
    const auto stored =
        fixture::write_checkpoint(dir / "", c, {mla::MlaWeights<float>::random(c, 21)}, s, 1);
    const RowMatrix<float> x = test::random_input<float>(24, c.hidden_size, 5);
    mla::io::write_npy(dir / "x.npy", x);
    const CliResult r =
        run_cli(dir, "--model " + dir.path() + " --layer 0 --input " + (dir / "x.npy") +
                         " --output " + (dir / "y.npy") + " --start 100 --prefill 14 --threads 2");
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(r.out, "cache_bytes_per_token_per_layer: 180\n");  // 160 + 16 + 4
    const RowMatrix<float> y = mla::io::read_npy(dir / "y.npy");
    const mla::io::CheckpointConfig cfg = mla::io::read_config(dir / "config.json");
    EXPECT_EQ(cfg.mla.index_scales,
              s == Storage::kFp8 ? mla::ScaleFormat::kPowerOfTwo : mla::ScaleFormat::kFloat32);
    ref::IndexerTrace tr;
    const std::vector<double> want = ref::dsa_forward(
        test::to_ref(cfg.mla), test::to_ref(stored[0]), test::to_ref_indexer(cfg.mla),
        test::to_ref_indexer(stored[0].indexer), test::to_vec(x), 24, 100, nullptr, nullptr, &tr);
    EXPECT_LE(test::rel_error(test::to_vec(y), want), 1e-5);
    EXPECT_EQ(tr.selected.back().size(), 8u);  // sparse for the later tokens
  }
}

TEST(DeepSeekLayer, HelpPrintsUsageAndExitsZero) {
  TempDir dir;
  for (const char* flag : {"--help", "-h"}) {
    const CliResult r = run_cli(dir, flag);
    EXPECT_EQ(r.status, 0);
    EXPECT_EQ(r.out.rfind("usage: deepseek_layer --model DIR", 0), 0u) << r.out;
    EXPECT_NE(r.out.find("--cache S"), std::string::npos) << r.out;
    EXPECT_TRUE(r.err.empty()) << r.err;
  }
}

TEST(DeepSeekLayer, RunsFp8CheckpointsW8A8WithTheConfigsScaleFormat) {
  const MlaConfig c = MlaConfig::small_v3();
  TempDir dir;
  fixture::write_checkpoint(dir / "", c, {mla::MlaWeights<float>::random(c, 3)}, Storage::kFp8, 1);
  nlohmann::json j = fixture::config_json(c, true, 16);
  j["quantization_config"]["scale_fmt"] = "ue8m0";
  fixture::write_text(dir / "config.json", j.dump());
  const RowMatrix<float> x = test::random_input<float>(9, c.hidden_size, 4);
  mla::io::write_npy(dir / "x.npy", x);
  const CliResult r =
      run_cli(dir, "--model " + dir.path() + " --layer 0 --input " + (dir / "x.npy") +
                       " --output " + (dir / "y.npy") + " --prefill 5 --fp8 w8a8");
  ASSERT_EQ(r.status, 0) << r.err;
  // The library with the same choices, in process.
  const auto cfg = mla::io::read_config(dir / "config.json");
  mla::io::LoadOptions load;
  load.fp8_matmul = mla::Fp8Matmul::kW8A8;
  const auto ckpt = mla::io::Checkpoint::open(dir.path());
  const mla::MlaLayer<float> layer(cfg.mla,
                                   mla::io::load_attention_weights<float>(ckpt, cfg, 0, load));
  mla::LatentCacheOptions o;
  o.num_blocks = 1;
  mla::LatentCache cache(cfg.mla, o);
  const auto seq = cache.add_sequence();
  mla::MlaWorkspace<float> ws;
  RowMatrix<float> want(9, c.hidden_size);
  layer.forward(x.topRows(5), 0, cache, seq, want.topRows(5), ws);
  for (Index t = 5; t < 9; ++t) layer.forward(x.row(t), t, cache, seq, want.row(t), ws);
  EXPECT_LE(test::rel_error(test::to_vec(mla::io::read_npy(dir / "y.npy")), test::to_vec(want)),
            1e-6);
  const CliResult bad =
      run_cli(dir, "--model " + dir.path() + " --layer 0 --input " + (dir / "x.npy") +
                       " --output " + (dir / "z.npy") + " --fp8 w4a4");
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("--fp8 must be w8a32 or w8a8, got 'w4a4'"), std::string::npos) << bad.err;
}

#endif  // MLA_DEEPSEEK_LAYER

// ---------------------------------------------------------------------------------------------
// Llama-style config.json

TEST(LlamaConfig, ReadsFieldsAndDefaultsAndNamesBadOnes) {
  const mla::io::LlamaConfig a = mla::io::parse_llama_config(
      R"({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 3})");
  EXPECT_EQ(a.attention.num_kv_heads, 4);  // MHA when num_key_value_heads is absent
  EXPECT_EQ(a.attention.head_dim, 16);     // hidden_size / heads
  EXPECT_EQ(a.attention.rope_dim, 16);     // RoPE on whole heads
  EXPECT_EQ(a.attention.rope_layout, mla::RopeLayout::kHalfSplit);
  EXPECT_EQ(a.attention.rope_theta, 10000.0);
  EXPECT_EQ(a.num_hidden_layers, 3);
  const mla::io::LlamaConfig b = mla::io::parse_llama_config(
      R"({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
          "num_hidden_layers": 1, "num_key_value_heads": 2, "head_dim": 8,
          "rope_theta": 500000.0, "sliding_window": null})");
  EXPECT_EQ(b.attention.num_kv_heads, 2);
  EXPECT_EQ(b.attention.head_dim, 8);
  EXPECT_EQ(b.attention.rope_theta, 500000.0);
  const auto error = [](const std::string& text) {
    return test::throws_error_containing([&] { mla::io::parse_llama_config(text, "c.json"); },
                                         "c.json");
  };
  EXPECT_TRUE(test::throws_error_containing(
      [] {
        mla::io::parse_llama_config(
            R"({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1})");
      },
      "missing field 'num_attention_heads'"));
  EXPECT_TRUE(test::throws_error_containing(
      [] {
        mla::io::parse_llama_config(R"({"model_type": "llama", "hidden_size": 64,
                                        "num_attention_heads": 4, "num_hidden_layers": 1,
                                        "rope_theta": "x"})");
      },
      "field 'rope_theta' must be a number"));
  EXPECT_TRUE(test::throws_error_containing(
      [] {
        mla::io::parse_llama_config(R"({"model_type": "llama", "hidden_size": 64,
                                        "num_attention_heads": 4, "num_hidden_layers": 1,
                                        "num_key_value_heads": 3})");
      },
      "num_kv_heads (3) must divide num_heads (4)"));
  EXPECT_TRUE(error("{not json"));
  // What the conversion does not implement is refused, naming the field and its value.
  const nlohmann::json good = {{"model_type", "llama"},
                               {"hidden_size", 64},
                               {"num_attention_heads", 4},
                               {"num_hidden_layers", 1}};
  const std::vector<std::pair<nlohmann::json, std::string>> refused = {
      {{{"model_type", "qwen2"}}, "model_type = \"qwen2\": not a Llama-style model type"},
      {{{"model_type", nullptr}}, "model_type = \"\""},
      {{{"rope_scaling", {{"rope_type", "llama3"}, {"factor", 8.0}}}},
       "rope_scaling = {\"factor\":8.0,\"rope_type\":\"llama3\"}: only plain RoPE"},
      {{{"attention_bias", true}}, "attention_bias = true"},
      {{{"sliding_window", 4096}}, "sliding_window = 4096"},
      {{{"partial_rotary_factor", 0.5}}, "partial_rotary_factor = 0.5"},
  };
  for (const auto& [edit, message] : refused) {
    nlohmann::json j = good;
    j.update(edit);
    EXPECT_TRUE(test::throws_error_containing(
        [&] { mla::io::parse_llama_config(j.dump(), "c.json"); }, "c.json: " + message));
  }
  nlohmann::json plain = good;
  plain["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_NO_THROW(mla::io::parse_llama_config(plain.dump()));
}

// ---------------------------------------------------------------------------------------------
// convert_mha, end to end

#ifdef MLA_CONVERT_MHA

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

TEST(ConvertMha, WritesTheTableAsJsonWithConsistentRows) {
  TempDir dir;
  // No RoPE: the full-rank MLA row must be exact.
  const CliResult r = run_program(MLA_CONVERT_MHA, dir,
                                  "--hidden 48 --heads 4 --kv-heads 4 --head-dim 8 --v-head-dim 6 "
                                  "--rope-dim 0 --tokens 10 --decay 0.8 --json " +
                                      (dir / "t.json"));
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json rows = read_json(dir / "t.json");
  ASSERT_TRUE(rows.is_array());
  int gqa = 0, mla = 0;
  double previous = INFINITY;
  for (const auto& row : rows) {
    ASSERT_EQ(row.size(), 7u) << row.dump();
    EXPECT_EQ(row.at("context").get<long long>(), 10);
    const std::string method = row.at("method").get<std::string>();
    const auto bytes = row.at("cache_bytes_per_token").get<long long>();
    const double error = row.at("rel_error").get<double>();
    EXPECT_GE(error, 0.0);
    if (method == "gqa") {
      ++gqa;
      EXPECT_TRUE(row.at("rank").is_null());
      const auto g = row.at("groups").get<long long>();
      EXPECT_EQ(4 % g, 0);
      EXPECT_EQ(bytes, g * (8 + 6) * 4);
      if (g == 4) {
        EXPECT_LE(error, 1e-12);  // GQA with every head is the MHA itself
      }
    } else {
      ASSERT_EQ(method, "mla");
      ++mla;
      EXPECT_TRUE(row.at("groups").is_null());
      const auto rank = row.at("rank").get<long long>();
      EXPECT_EQ(bytes, rank * 4);
      EXPECT_LE(error, previous * (1 + 1e-9)) << "rank " << rank;  // ranks ascend
      previous = error;
      if (rank == 4 * (8 + 6)) {
        EXPECT_LE(error, 1e-9);
      }
    }
  }
  EXPECT_EQ(gqa, 3);  // 1, 2, 4 groups
  EXPECT_GE(mla, 4);
  EXPECT_NE(r.out.find("method"), std::string::npos);
}

TEST(ConvertMha, PartialRopeRowsPerRopeKeepAndContext) {
  TempDir dir;
  const CliResult r = run_program(
      MLA_CONVERT_MHA, dir,
      "--hidden 48 --heads 4 --kv-heads 4 --head-dim 8 --v-head-dim 6 --rope-dim 4 --tokens 8 "
      "--rope-keep 4,2,0 --context 8,512 --rope-rank 2 --json " +
          (dir / "p.json"));
  ASSERT_EQ(r.status, 0) << r.err;
  const nlohmann::json rows = read_json(dir / "p.json");
  std::map<std::pair<long long, long long>, std::vector<double>> mla;  // (keep, context) -> errors
  int gqa = 0;
  for (const auto& row : rows) {
    const long long context = row.at("context").get<long long>();
    EXPECT_TRUE(context == 8 || context == 512);
    if (row.at("method") == "gqa") {
      ++gqa;
      EXPECT_TRUE(row.at("rope_keep").is_null());
      continue;
    }
    const long long keep = row.at("rope_keep").get<long long>();
    const long long rank = row.at("rank").get<long long>();
    EXPECT_EQ(row.at("cache_bytes_per_token").get<long long>(), (rank + 2 * keep) * 4);
    mla[{keep, context}].push_back(row.at("rel_error").get<double>());
  }
  EXPECT_EQ(gqa, 6);  // 1, 2, 4 groups at each context
  ASSERT_EQ(mla.size(), 6u);
  for (const auto& entry : mla) {
    EXPECT_GE(entry.second.size(), 2u);  // several ranks per (rope_keep, context)
    for (double e : entry.second) EXPECT_TRUE(e >= 0 && e < 2) << e;
  }
  // Moving every rotary pair into the latent costs more at the longer context.
  const double short_context = mla[{0, 8}].back(), long_context = mla[{0, 512}].back();
  EXPECT_GT(long_context, short_context);
  const CliResult bad =
      run_program(MLA_CONVERT_MHA, dir, "--rope-dim 4 --rope-keep 3 --json " + (dir / "p.json"));
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("--rope-keep values must be even"), std::string::npos) << bad.err;
  const CliResult bad2 = run_program(MLA_CONVERT_MHA, dir, "--tokens 16 --context 8");
  EXPECT_NE(bad2.err.find("--context values must be >= --tokens (16), got 8"), std::string::npos)
      << bad2.err;
}

TEST(ConvertMha, ReadsALlamaStyleCheckpoint) {
  // Multi-query (one KV head) with RoPE on whole heads: the shared rotary key is exact, so the
  // full-rank conversion of the stored layer must be too.
  TempDir dir;
  const Index hidden = 32, heads = 4, dk = 8;
  std::vector<Tensor> tensors;
  const auto add = [&](const std::string& name, Index rows, Index cols, unsigned seed) {
    tensors.push_back(fixture::store("model.layers.0.self_attn." + name,
                                     test::random_input<float>(rows, cols, seed), Storage::kF32,
                                     128)
                          .weight);
  };
  add("q_proj.weight", heads * dk, hidden, 1);
  add("k_proj.weight", dk, hidden, 2);
  add("v_proj.weight", dk, hidden, 3);
  add("o_proj.weight", hidden, heads * dk, 4);
  fixture::write_bytes(dir / "model.safetensors", fixture::safetensors_bytes(tensors));
  fixture::write_text(dir / "config.json",
                      R"({"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4,
                          "num_key_value_heads": 1, "num_hidden_layers": 1,
                          "rope_theta": 500000.0})");
  const CliResult r =
      run_program(MLA_CONVERT_MHA, dir,
                  "--model " + dir.path() + " --layer 0 --tokens 6 --json " + (dir / "t.json"));
  ASSERT_EQ(r.status, 0) << r.err;
  double full = INFINITY;
  for (const auto& row : read_json(dir / "t.json")) {
    if (row.at("method") == "mla" && row.at("rank") == 8) full = row.at("rel_error").get<double>();
  }
  EXPECT_LE(full, 1e-9);
  // A layer the checkpoint does not have, and a missing tensor, are named; OUT stays as it was.
  const CliResult bad = run_program(
      MLA_CONVERT_MHA, dir, "--model " + dir.path() + " --layer 3 --json " + (dir / "t.json"));
  EXPECT_EQ(bad.status, 1);
  EXPECT_NE(bad.err.find("layer 3 out of range: the model has 1 layers"), std::string::npos)
      << bad.err;
  tensors.pop_back();
  fixture::write_bytes(dir / "model.safetensors", fixture::safetensors_bytes(tensors));
  const std::string before = read_json(dir / "t.json").dump();
  const CliResult missing = run_program(
      MLA_CONVERT_MHA, dir, "--model " + dir.path() + " --layer 0 --json " + (dir / "t.json"));
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("o_proj.weight"), std::string::npos) << missing.err;
  EXPECT_EQ(read_json(dir / "t.json").dump(), before);
  const CliResult flag = run_program(MLA_CONVERT_MHA, dir, "--rope-dim 3");
  EXPECT_EQ(flag.status, 1);
  EXPECT_NE(flag.err.find("rope_dim must be even"), std::string::npos) << flag.err;
}

TEST(ConvertMha, HelpPrintsUsageAndExitsZero) {
  TempDir dir;
  const CliResult r = run_program(MLA_CONVERT_MHA, dir, "--hidden 64 --help");
  EXPECT_EQ(r.status, 0);
  EXPECT_EQ(r.out.rfind("usage: convert_mha", 0), 0u) << r.out;
  EXPECT_NE(r.out.find("--rope-shared F"), std::string::npos) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;
}

#endif  // MLA_CONVERT_MHA

}  // namespace
