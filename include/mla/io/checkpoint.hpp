#pragma once
/// \file
/// A Hugging Face checkpoint directory: `model.safetensors`, or shards listed in
/// `model.safetensors.index.json` (opened when one of their tensors is first asked for), and
/// conversion of its tensors to the library's types.

#include <Eigen/Core>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "mla/detail/bfloat16.hpp"
#include "mla/error.hpp"
#include "mla/fp8.hpp"
#include "mla/io/safetensors.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla::io {

namespace detail {

/// The whole text of a file; throws mla::Error when it cannot be read (naming a directory as
/// such: on Linux a directory opens as a stream and then reads as nothing).
inline std::string read_text(const std::string& path) {
  std::error_code ec;
  mla::detail::require(!std::filesystem::is_directory(path, ec), path,
                       ": is a directory, expected a file");
  std::ifstream in(path, std::ios::binary);
  mla::detail::require(in.good(), path, ": cannot open");
  std::ostringstream s;
  s << in.rdbuf();
  mla::detail::require(!in.bad(), path, ": read error");
  return s.str();
}

inline bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

}  // namespace detail

/// The safetensors files of one checkpoint directory. Not safe for concurrent first access of
/// a shard (shards are opened lazily).
class Checkpoint {
 public:
  /// Reads `dir/model.safetensors.index.json` when present (its weight_map names the shard of
  /// every tensor), otherwise uses `dir/model.safetensors`. Throws mla::Error when neither is
  /// usable.
  static Checkpoint open(const std::string& dir) {
    Checkpoint c;
    c.dir_ = dir;
    const std::string index = dir + "/model.safetensors.index.json";
    if (detail::file_exists(index)) {
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(detail::read_text(index));
      } catch (const nlohmann::json::exception& e) {
        mla::detail::fail(index, ": malformed JSON: ", e.what());
      }
      mla::detail::require(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(),
                           index, ": no 'weight_map' object");
      for (const auto& [name, file] : j["weight_map"].items()) {
        mla::detail::require(file.is_string(), index, ": weight_map entry '", name,
                             "' is not a file name");
        const std::string f = file.get<std::string>();
        mla::detail::require(f.find('/') == std::string::npos && f != ".." && !f.empty(), index,
                             ": weight_map entry '", name, "' names '", f,
                             "', not a file of the directory");
        c.shard_of_[name] = f;
      }
    } else {
      const std::string single = dir + "/model.safetensors";
      mla::detail::require(detail::file_exists(single), dir,
                           ": no model.safetensors and no model.safetensors.index.json");
      auto file = std::make_shared<SafetensorsFile>(SafetensorsFile::open(single));
      for (const std::string& name : file->names()) c.shard_of_[name] = "model.safetensors";
      c.shards_["model.safetensors"] = file;
    }
    return c;
  }

  const std::string& dir() const { return dir_; }
  bool contains(const std::string& name) const { return shard_of_.count(name) != 0; }

  /// The names of every tensor whose name starts with `prefix`, in lexicographic order.
  std::vector<std::string> names_with_prefix(const std::string& prefix) const {
    std::vector<std::string> out;
    for (auto it = shard_of_.lower_bound(prefix);
         it != shard_of_.end() && it->first.compare(0, prefix.size(), prefix) == 0; ++it) {
      out.push_back(it->first);
    }
    return out;
  }

  /// The tensor called `name`, from whichever file holds it. Throws mla::Error when the
  /// checkpoint has no such tensor, or its shard is bad or lacks it.
  const TensorView& tensor(const std::string& name) const {
    const auto it = shard_of_.find(name);
    mla::detail::require(it != shard_of_.end(), dir_, ": missing tensor '", name, "'");
    auto& shard = shards_[it->second];
    if (!shard) {
      shard = std::make_shared<SafetensorsFile>(SafetensorsFile::open(dir_ + "/" + it->second));
    }
    mla::detail::require(shard->contains(name), shard->path(), ": missing tensor '", name,
                         "' (model.safetensors.index.json puts it in this shard)");
    return shard->tensor(name);
  }

  /// Keeps the memory of tensor `name` (its shard's memory map) alive for as long as the
  /// returned pointer lives, whatever becomes of this Checkpoint (see SafetensorsFile).
  std::shared_ptr<const void> keep_alive(const std::string& name) const {
    (void)tensor(name);  // opens the shard, with the same errors
    return shards_[shard_of_.at(name)]->keep_alive();
  }

 private:
  std::string dir_;
  std::map<std::string, std::string> shard_of_;
  mutable std::map<std::string, std::shared_ptr<SafetensorsFile>> shards_;
};

namespace detail {

/// Throws unless t has exactly the given shape; `expected` says what the dimensions are.
inline void require_shape(const TensorView& t, const std::vector<std::int64_t>& shape,
                          const std::string& expected) {
  if (t.shape == shape) return;
  std::string want = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
  mla::detail::fail(t.file, ": tensor '", t.name, "' has shape ", t.shape_string(), ", expected ",
                    want, "] (", expected, ")");
}

/// Element i of a floating-point tensor (F32, F16 or BF16), exactly, as T.
template <class T>
T element(const TensorView& t, std::size_t i) {
  switch (t.dtype) {
    case Dtype::kF32: {
      float v;
      std::memcpy(&v, t.data + 4 * i, 4);
      return static_cast<T>(v);
    }
    case Dtype::kF16: {
      std::uint16_t b;
      std::memcpy(&b, t.data + 2 * i, 2);
      return static_cast<T>(static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(b)));
    }
    case Dtype::kBF16:
      return static_cast<T>(mla::detail::bfloat16_bits_to_float(t.data + 2 * i));
    default:
      break;
  }
  return T(0);
}

inline void require_float_dtype(const TensorView& t) {
  mla::detail::require(t.dtype == Dtype::kF32 || t.dtype == Dtype::kF16 || t.dtype == Dtype::kBF16,
                       t.file, ": tensor '", t.name, "' has dtype ", t.dtype_name,
                       (t.dtype == Dtype::kUnsupported ? " (unsupported)" : ""),
                       ", expected F32, F16 or BF16");
}

}  // namespace detail

/// A 2-D floating-point tensor (F32, F16 or BF16) of shape [rows, cols] as a dense matrix of T.
/// `expected` names the dimensions for the error message when the shape differs.
template <class T>
RowMatrix<T> to_matrix(const TensorView& t, Index rows, Index cols, const std::string& expected) {
  detail::require_float_dtype(t);
  detail::require_shape(t, {rows, cols}, expected);
  RowMatrix<T> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i)
    m.data()[i] = detail::element<T>(t, static_cast<std::size_t>(i));
  return m;
}

/// A 1-D floating-point tensor of n values as a vector of T.
template <class T>
Vector<T> to_vector(const TensorView& t, Index n, const std::string& expected) {
  detail::require_float_dtype(t);
  detail::require_shape(t, {n}, expected);
  Vector<T> v(n);
  for (Index i = 0; i < n; ++i) v(i) = detail::element<T>(t, static_cast<std::size_t>(i));
  return v;
}

/// An F8_E4M3 weight [rows, cols] with its weight_scale_inv [ceil(rows / br), ceil(cols / bc)]
/// (F32, F16 or BF16) as a BlockFp8Matrix that borrows the codes from the file (and the scales
/// too when they are FP32 and aligned; otherwise it owns a converted copy of them), holding
/// `keep_alive` (the file's memory) for as long as it lives.
inline BlockFp8Matrix borrow_block_fp8(const TensorView& weight, const TensorView& scale_inv,
                                       Index rows, Index cols, Index block_rows, Index block_cols,
                                       const std::string& expected,
                                       std::shared_ptr<const void> keep_alive) {
  mla::detail::require(weight.dtype == Dtype::kF8E4M3, weight.file, ": tensor '", weight.name,
                       "' has dtype ", weight.dtype_name, ", expected F8_E4M3");
  detail::require_shape(weight, {rows, cols}, expected);
  const Index rb = (rows + block_rows - 1) / block_rows, cb = (cols + block_cols - 1) / block_cols;
  detail::require_float_dtype(scale_inv);
  detail::require_shape(scale_inv, {rb, cb},
                        "one scale per " + std::to_string(block_rows) + " x " +
                            std::to_string(block_cols) + " block of " + weight.name);
  const auto* codes = reinterpret_cast<const float8_e4m3fn*>(weight.data);
  const bool in_place = scale_inv.dtype == Dtype::kF32 &&
                        reinterpret_cast<std::uintptr_t>(scale_inv.data) % alignof(float) == 0;
  try {
    if (in_place) {
      return BlockFp8Matrix::borrow(rows, cols, block_rows, block_cols, codes,
                                    reinterpret_cast<const float*>(scale_inv.data),
                                    std::move(keep_alive));
    }
    // Scales converted to FP32 (a few values per 16K weights), kept beside the file's memory.
    struct Held {
      std::vector<float> scales;
      std::shared_ptr<const void> file;
    };
    auto held = std::make_shared<Held>();
    held->scales.resize(static_cast<std::size_t>(rb * cb));
    for (std::size_t i = 0; i < held->scales.size(); ++i) {
      held->scales[i] = detail::element<float>(scale_inv, i);
    }
    held->file = std::move(keep_alive);
    const float* scales = held->scales.data();
    return BlockFp8Matrix::borrow(rows, cols, block_rows, block_cols, codes, scales,
                                  std::shared_ptr<const void>(held, held.get()));
  } catch (const Error& e) {
    mla::detail::fail(scale_inv.file, ": tensor '", scale_inv.name, "': ", e.what());
  }
}

/// An F8_E4M3 weight [rows, cols] with its weight_scale_inv [ceil(rows / br), ceil(cols / bc)]
/// (F32, F16 or BF16) as a BlockFp8Matrix that owns a copy.
inline BlockFp8Matrix to_block_fp8(const TensorView& weight, const TensorView& scale_inv,
                                   Index rows, Index cols, Index block_rows, Index block_cols,
                                   const std::string& expected) {
  mla::detail::require(weight.dtype == Dtype::kF8E4M3, weight.file, ": tensor '", weight.name,
                       "' has dtype ", weight.dtype_name, ", expected F8_E4M3");
  detail::require_shape(weight, {rows, cols}, expected);
  const Index rb = (rows + block_rows - 1) / block_rows, cb = (cols + block_cols - 1) / block_cols;
  detail::require_float_dtype(scale_inv);
  detail::require_shape(scale_inv, {rb, cb},
                        "one scale per " + std::to_string(block_rows) + " x " +
                            std::to_string(block_cols) + " block of " + weight.name);
  std::vector<float8_e4m3fn> codes(static_cast<std::size_t>(rows * cols));
  std::memcpy(codes.data(), weight.data, codes.size());
  std::vector<float> scales(static_cast<std::size_t>(rb * cb));
  for (std::size_t i = 0; i < scales.size(); ++i) {
    scales[i] = detail::element<float>(scale_inv, i);
    mla::detail::require(std::isfinite(scales[i]) && scales[i] >= 0.0f, scale_inv.file,
                         ": tensor '", scale_inv.name, "' holds an invalid scale ", scales[i]);
  }
  return BlockFp8Matrix(rows, cols, block_rows, block_cols, std::move(codes), std::move(scales));
}

}  // namespace mla::io
