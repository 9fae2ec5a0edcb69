#pragma once
// Checkpoint fixtures the I/O tests write themselves: a small safetensors writer, config.json
// text, and the attention tensors of test-sized layers stored as F32, BF16 or FP8 (with
// weight_scale_inv), single-file or sharded. Everything here is independent of the library's
// readers; the stored values are also returned decoded, for the double reference.

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mla/mla.hpp"
#include "test_util.hpp"

namespace fixture {

/// One tensor as it goes into a file.
struct Tensor {
  std::string name;
  std::string dtype;
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;
};

/// The bytes of a safetensors file holding `tensors` in this order: 8-byte length, JSON
/// header padded with spaces to a multiple of 8, then the data.
inline std::vector<unsigned char> safetensors_bytes(const std::vector<Tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = {{"format", "pt"}};
  std::size_t offset = 0;
  for (const Tensor& t : tensors) {
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.bytes.size()}}};
    offset += t.bytes.size();
  }
  std::string text = header.dump();
  while (text.size() % 8 != 0) text += ' ';
  // Sized once and filled with memcpy (GCC 12 misreports vector::insert here as out of bounds).
  std::vector<unsigned char> out(8 + text.size() + offset);
  const std::uint64_t len = text.size();
  std::memcpy(out.data(), &len, 8);
  std::memcpy(out.data() + 8, text.data(), text.size());
  std::size_t at = 8 + text.size();
  for (const Tensor& t : tensors) {
    if (!t.bytes.empty()) std::memcpy(out.data() + at, t.bytes.data(), t.bytes.size());
    at += t.bytes.size();
  }
  return out;
}

inline void write_bytes(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

inline void write_text(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

/// A fresh directory under the system's temporary directory, removed with the object.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "mla-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

/// Runs `program args` with stdout and stderr captured in files of `dir`.
inline test::CommandResult run_program(const std::string& program, const TempDir& dir,
                                       const std::string& args) {
  return test::run_command(program + " " + args, dir.path());
}

/// How the fixture stores the projection weights.
enum class Storage { kF32, kBF16, kFp8 };

/// A matrix stored in a dtype, and the values that dtype holds, as double (decoded here).
struct Stored {
  Tensor weight;
  Tensor scale_inv;  // FP8 only
  mla::RowMatrix<double> values;
};

inline Stored store(const std::string& name, const mla::RowMatrix<float>& m, Storage s, int block) {
  Stored out;
  out.values.resize(m.rows(), m.cols());
  out.weight.name = name;
  out.weight.shape = {m.rows(), m.cols()};
  if (s == Storage::kF32) {
    out.weight.dtype = "F32";
    out.weight.bytes.resize(static_cast<std::size_t>(m.size()) * 4);
    std::memcpy(out.weight.bytes.data(), m.data(), out.weight.bytes.size());
    out.values = m.cast<double>();
  } else if (s == Storage::kBF16) {
    out.weight.dtype = "BF16";
    for (Eigen::Index i = 0; i < m.size(); ++i) {
      const Eigen::bfloat16 b(m.data()[i]);
      const auto bits = Eigen::numext::bit_cast<std::uint16_t>(b);
      out.weight.bytes.push_back(static_cast<unsigned char>(bits & 0xFF));
      out.weight.bytes.push_back(static_cast<unsigned char>(bits >> 8));
      out.values.data()[i] = static_cast<double>(static_cast<float>(b));
    }
  } else {
    // DeepSeek-V3's layout: e4m3 codes, one scale per block x block (amax / 448).
    out.weight.dtype = "F8_E4M3";
    const Eigen::Index rb = (m.rows() + block - 1) / block, cb = (m.cols() + block - 1) / block;
    std::vector<float> scales(static_cast<std::size_t>(rb * cb));
    for (Eigen::Index i = 0; i < rb; ++i) {
      for (Eigen::Index j = 0; j < cb; ++j) {
        const auto blk =
            m.block(i * block, j * block, std::min<Eigen::Index>(block, m.rows() - i * block),
                    std::min<Eigen::Index>(block, m.cols() - j * block));
        const float amax = blk.cwiseAbs().maxCoeff();
        scales[static_cast<std::size_t>(i * cb + j)] = amax > 0 ? amax / 448.0f : 1.0f;
      }
    }
    for (Eigen::Index r = 0; r < m.rows(); ++r) {
      for (Eigen::Index c = 0; c < m.cols(); ++c) {
        const float s = scales[static_cast<std::size_t>((r / block) * cb + c / block)];
        const mla::float8_e4m3fn q(m(r, c) / s);
        out.weight.bytes.push_back(q.bits());
        out.values(r, c) = static_cast<double>(static_cast<float>(q)) * static_cast<double>(s);
      }
    }
    out.scale_inv.name = name + "_scale_inv";
    out.scale_inv.dtype = "F32";
    out.scale_inv.shape = {rb, cb};
    out.scale_inv.bytes.resize(scales.size() * 4);
    std::memcpy(out.scale_inv.bytes.data(), scales.data(), out.scale_inv.bytes.size());
  }
  return out;
}

inline Tensor f32_vector(const std::string& name, const mla::Vector<float>& v) {
  Tensor t{
      name, "F32", {v.size()}, std::vector<unsigned char>(static_cast<std::size_t>(v.size()) * 4)};
  std::memcpy(t.bytes.data(), v.data(), t.bytes.size());
  return t;
}

/// A vector stored as BF16 (as V3.2 stores the indexer's k_norm), and the values it holds.
inline Tensor bf16_vector(const std::string& name, const mla::Vector<float>& v,
                          mla::Vector<double>& values) {
  const Stored st = store(name, v.transpose(), Storage::kBF16, 1);
  Tensor t = st.weight;
  t.shape = {v.size()};
  values = st.values.row(0).transpose();
  return t;
}

/// A layer's attention tensors under the checkpoint's names, and the weights they hold (decoded
/// to double, as the reference reads them). Norms are always F32.
struct LayerTensors {
  std::vector<Tensor> tensors;
  mla::MlaWeights<double> values;
};

/// The attention tensors of one MLA block under `prefix` (e.g. "model.layers.3.self_attn."),
/// projections stored as `s` except those named in `keep_bf16` (stored BF16, as Mistral Large
/// 3 keeps q_a_proj and kv_a_proj_with_mqa), the indexer's wq_b and wk as projections and the
/// rest of it BF16 (as V3.2 and GLM-5 store them), the output gate when the config has one.
inline LayerTensors attention_tensors(const mla::MlaConfig& c, const mla::MlaWeights<float>& w,
                                      const std::string& p, Storage s, int block,
                                      const std::vector<std::string>& keep_bf16 = {}) {
  LayerTensors out;
  auto add = [&](const char* name, const mla::Linear<float>& l, mla::Linear<double>& value) {
    const bool bf16 = std::find(keep_bf16.begin(), keep_bf16.end(), name) != keep_bf16.end();
    const Storage st_kind = bf16 ? Storage::kBF16 : s;
    const Stored st = store(p + name + ".weight", l.to_dense(), st_kind, block);
    out.tensors.push_back(st.weight);
    if (st_kind == Storage::kFp8) out.tensors.push_back(st.scale_inv);
    value = mla::Linear<double>(st.values);
  };
  if (c.has_q_lora()) {
    add("q_a_proj", w.wq_a, out.values.wq_a);
    out.tensors.push_back(f32_vector(p + "q_a_layernorm.weight", w.q_norm));
    out.values.q_norm = w.q_norm.cast<double>();
    add("q_b_proj", w.wq_b, out.values.wq_b);
  } else {
    add("q_proj", w.wq, out.values.wq);
  }
  add("kv_a_proj_with_mqa", w.wkv_a, out.values.wkv_a);
  out.tensors.push_back(f32_vector(p + "kv_a_layernorm.weight", w.kv_norm));
  out.values.kv_norm = w.kv_norm.cast<double>();
  add("kv_b_proj", w.wkv_b, out.values.wkv_b);
  add("o_proj", w.wo, out.values.wo);
  if (c.mla_use_output_gate) add("g_proj", w.wg, out.values.wg);
  if (c.has_indexer()) {  // DeepSeek-V3.2: wq_b and wk as the projections, the rest BF16
    add("indexer.wq_b", w.indexer.wq_b, out.values.indexer.wq_b);
    add("indexer.wk", w.indexer.wk, out.values.indexer.wk);
    out.tensors.push_back(
        bf16_vector(p + "indexer.k_norm.weight", w.indexer.k_norm, out.values.indexer.k_norm));
    out.tensors.push_back(bf16_vector(p + "indexer.k_norm.bias", w.indexer.k_norm_bias,
                                      out.values.indexer.k_norm_bias));
    const Stored wp = store(p + "indexer.weights_proj.weight", w.indexer.weights_proj.to_dense(),
                            Storage::kBF16, block);
    out.tensors.push_back(wp.weight);
    out.values.indexer.weights_proj = mla::Linear<double>(wp.values);
  }
  return out;
}

/// A DeepSeek layer's attention tensors under the checkpoint's names, and the weights they hold
/// (decoded to double, as the reference reads them). Norms are always F32.
inline LayerTensors layer_tensors(const mla::MlaConfig& c, const mla::MlaWeights<float>& w,
                                  int layer, Storage s, int block) {
  return attention_tensors(c, w, "model.layers." + std::to_string(layer) + ".self_attn.", s, block);
}

/// config.json for c, written the way DeepSeek's Hugging Face configs are.
inline nlohmann::json config_json(const mla::MlaConfig& c, bool fp8, int block) {
  nlohmann::json j = {
      {"architectures", {"DeepseekV3ForCausalLM"}},
      {"model_type", "deepseek_v3"},
      {"hidden_size", c.hidden_size},
      {"num_attention_heads", c.num_attention_heads},
      {"kv_lora_rank", c.kv_lora_rank},
      {"qk_nope_head_dim", c.qk_nope_head_dim},
      {"qk_rope_head_dim", c.qk_rope_head_dim},
      {"v_head_dim", c.v_head_dim},
      {"num_hidden_layers", c.num_hidden_layers},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rope_scaling",
       {{"type", "yarn"},
        {"factor", c.rope_scaling.factor},
        {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings},
        {"beta_fast", c.rope_scaling.beta_fast},
        {"beta_slow", c.rope_scaling.beta_slow},
        {"mscale", c.rope_scaling.mscale},
        {"mscale_all_dim", c.rope_scaling.mscale_all_dim}}}};
  j["q_lora_rank"] = c.has_q_lora() ? nlohmann::json(c.q_lora_rank) : nlohmann::json(nullptr);
  if (fp8) {
    j["quantization_config"] = {{"activation_scheme", "dynamic"},
                                {"fmt", "e4m3"},
                                {"quant_method", "fp8"},
                                {"weight_block_size", {block, block}}};
  }
  if (c.has_indexer()) {  // DeepSeek-V3.2's config: the indexer and ue8m0 scales
    j["architectures"] = {"DeepseekV32ForCausalLM"};
    j["model_type"] = "deepseek_v32";
    j["index_n_heads"] = c.index_n_heads;
    j["index_head_dim"] = c.index_head_dim;
    j["index_topk"] = c.index_topk;
    if (fp8) j["quantization_config"]["scale_fmt"] = "ue8m0";
  }
  return j;
}

/// A checkpoint directory with config.json and every layer of `weights`; with shards > 1 the
/// tensors are spread over that many files listed in model.safetensors.index.json. Returns the
/// stored weights of every layer (decoded to double).
inline std::vector<mla::MlaWeights<double>> write_checkpoint(
    const std::string& dir, const mla::MlaConfig& c,
    const std::vector<mla::MlaWeights<float>>& weights, Storage s, int shards, int block = 16) {
  write_text(dir + "/config.json", config_json(c, s == Storage::kFp8, block).dump(2));
  std::vector<Tensor> all;
  std::vector<mla::MlaWeights<double>> values;
  for (std::size_t l = 0; l < weights.size(); ++l) {
    LayerTensors t = layer_tensors(c, weights[l], static_cast<int>(l), s, block);
    all.insert(all.end(), t.tensors.begin(), t.tensors.end());
    values.push_back(t.values);
  }
  if (shards <= 1) {
    write_bytes(dir + "/model.safetensors", safetensors_bytes(all));
    return values;
  }
  nlohmann::json index = {{"metadata", {{"total_size", 0}}},
                          {"weight_map", nlohmann::json::object()}};
  for (int k = 0; k < shards; ++k) {
    const std::string file =
        "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(shards) + ".safetensors";
    std::vector<Tensor> part;
    for (std::size_t i = static_cast<std::size_t>(k); i < all.size();
         i += static_cast<std::size_t>(shards)) {
      part.push_back(all[i]);
      index["weight_map"][all[i].name] = file;
    }
    write_bytes(dir + "/" + file, safetensors_bytes(part));
  }
  write_text(dir + "/model.safetensors.index.json", index.dump(2));
  return values;
}

}  // namespace fixture
