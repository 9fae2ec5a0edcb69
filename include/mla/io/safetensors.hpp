#pragma once
/// \file
/// Hugging Face safetensors files, memory-mapped: an 8-byte little-endian header length, a JSON
/// header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the tensor data.
/// Every structural property is checked when a file is opened; a bad file gives mla::Error
/// naming the file and the tensor.

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "mla/error.hpp"
#include "mla/matrix.hpp"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mla/io reads little-endian files on little-endian hosts only"
#endif

namespace mla::io {

/// Element types of safetensors tensors (the names the files use).
enum class Dtype : std::uint8_t {
  kF32,          ///< "F32"
  kF16,          ///< "F16"
  kBF16,         ///< "BF16"
  kF8E4M3,       ///< "F8_E4M3"
  kF8E5M2,       ///< "F8_E5M2"
  kUnsupported,  ///< anything else ("F64", "I64", ...): listed, but not readable
};

/// The dtype of a safetensors name (kUnsupported for names this library does not read).
inline Dtype parse_dtype(const std::string& name) {
  if (name == "F32") return Dtype::kF32;
  if (name == "F16") return Dtype::kF16;
  if (name == "BF16") return Dtype::kBF16;
  if (name == "F8_E4M3") return Dtype::kF8E4M3;
  if (name == "F8_E5M2") return Dtype::kF8E5M2;
  return Dtype::kUnsupported;
}

/// Bytes per element of the safetensors dtype name, or 0 when the name is not a dtype of the
/// format at all.
inline std::size_t dtype_bytes(const std::string& name) {
  static const std::map<std::string, std::size_t> sizes = {
      {"F64", 8},     {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"F8_E4M3", 1},
      {"F8_E5M2", 1}, {"I64", 8}, {"I32", 4}, {"I16", 2},  {"I8", 1},
      {"U64", 8},     {"U32", 4}, {"U16", 2}, {"U8", 1},   {"BOOL", 1}};
  const auto it = sizes.find(name);
  return it == sizes.end() ? 0 : it->second;
}

/// One tensor of a safetensors file: where its bytes are and what they hold.
struct TensorView {
  std::string name;
  std::string dtype_name;  ///< as written in the file
  Dtype dtype = Dtype::kUnsupported;
  std::vector<std::int64_t> shape;
  const unsigned char* data = nullptr;
  std::size_t bytes = 0;
  std::string file;  ///< the file it lives in (for messages)

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (std::int64_t d : shape) n *= d;
    return n;
  }
  /// "[a, b]"
  std::string shape_string() const {
    std::string s = "[";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

namespace detail {

/// Bytes that stay where they are while a SafetensorsFile uses them: a read-only memory map,
/// or an owned buffer.
class Bytes {
 public:
  virtual ~Bytes() = default;
  virtual const unsigned char* data() const = 0;
  virtual std::size_t size() const = 0;
};

class MappedBytes final : public Bytes {
 public:
  explicit MappedBytes(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    mla::detail::require(fd >= 0, path, ": cannot open (", std::strerror(errno), ")");
    struct stat st {};
    if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
      ::close(fd);
      mla::detail::fail(path, ": not a regular file");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      ::close(fd);
      mla::detail::require(p != MAP_FAILED, path, ": cannot map ", size_, " bytes (",
                           std::strerror(errno), ")");
      data_ = static_cast<const unsigned char*>(p);
    } else {
      ::close(fd);
    }
  }
  ~MappedBytes() override {
    if (data_) ::munmap(const_cast<unsigned char*>(data_), size_);
  }
  MappedBytes(const MappedBytes&) = delete;
  MappedBytes& operator=(const MappedBytes&) = delete;
  const unsigned char* data() const override { return data_; }
  std::size_t size() const override { return size_; }

 private:
  const unsigned char* data_ = nullptr;
  std::size_t size_ = 0;
};

class OwnedBytes final : public Bytes {
 public:
  explicit OwnedBytes(std::vector<unsigned char> bytes) : bytes_(std::move(bytes)) {}
  const unsigned char* data() const override { return bytes_.data(); }
  std::size_t size() const override { return bytes_.size(); }

 private:
  std::vector<unsigned char> bytes_;
};

/// A non-negative integer that fits in int64, or an mla::Error saying what `what` is.
inline std::int64_t json_count(const nlohmann::json& v, const std::string& what) {
  mla::detail::require(
      v.is_number_unsigned() || (v.is_number_integer() && v.get<std::int64_t>() >= 0), what,
      " must be a non-negative integer, got ", v.dump());
  const auto u = v.get<std::uint64_t>();
  mla::detail::require(u <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()),
                       what, " is too large: ", u);
  return static_cast<std::int64_t>(u);
}

}  // namespace detail

/// A parsed safetensors file. Opening checks: the file is not empty or truncated; the header
/// length lies inside the file; the header is a JSON object; every entry has a string dtype,
/// an integer shape and two ordered data offsets inside the data section; the byte count equals
/// dtype size x shape for every dtype of the format; no two tensors overlap. Tensors of dtypes
/// this library does not read are listed and reported only when used.
class SafetensorsFile {
 public:
  /// Maps and checks the file. Throws mla::Error naming the file and what is wrong.
  static SafetensorsFile open(const std::string& path) {
    return SafetensorsFile(std::make_shared<detail::MappedBytes>(path), path);
  }

  /// Checks bytes held in memory (`name` is used in messages).
  static SafetensorsFile parse(std::vector<unsigned char> bytes, const std::string& name) {
    return SafetensorsFile(std::make_shared<detail::OwnedBytes>(std::move(bytes)), name);
  }

  const std::string& path() const { return path_; }
  /// Tensor names, sorted.
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const auto& e : tensors_) n.push_back(e.first);
    return n;
  }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  /// The tensor called `name`; throws mla::Error when the file has none.
  const TensorView& tensor(const std::string& name) const {
    const auto it = tensors_.find(name);
    mla::detail::require(it != tensors_.end(), path_, ": no tensor '", name, "'");
    return it->second;
  }
  /// The "__metadata__" entries (string to string), if any.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// Keeps the file's bytes (the memory map) alive for as long as the returned pointer, or a
  /// copy of it, lives, whatever becomes of this object: what borrowed weights hold.
  std::shared_ptr<const void> keep_alive() const { return bytes_; }

 private:
  SafetensorsFile(std::shared_ptr<const detail::Bytes> bytes, std::string path)
      : bytes_(std::move(bytes)), path_(std::move(path)) {
    using mla::detail::fail;
    using mla::detail::require;
    const unsigned char* p = bytes_->data();
    const std::size_t size = bytes_->size();
    require(size > 0, path_, ": empty file");
    require(size >= 8, path_, ": truncated: ", size,
            " bytes, shorter than the 8-byte header length");
    std::uint64_t header_len = 0;
    std::memcpy(&header_len, p, 8);  // little-endian
    require(header_len <= size - 8, path_, ": header length ", header_len,
            " runs past the end of the file (", size - 8, " bytes follow the length)");
    const char* header = reinterpret_cast<const char*>(p + 8);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(header, header + header_len);
    } catch (const nlohmann::json::exception& e) {
      fail(path_, ": malformed JSON header: ", e.what());
    }
    require(j.is_object(), path_, ": the JSON header must be an object, got ", j.type_name());
    const unsigned char* data = p + 8 + header_len;
    const std::size_t data_size = size - 8 - static_cast<std::size_t>(header_len);
    for (const auto& [name, entry] : j.items()) {
      if (name == "__metadata__") {
        require(entry.is_object(), path_, ": __metadata__ must be an object");
        for (const auto& [k, v] : entry.items()) {
          require(v.is_string(), path_, ": __metadata__ value of '", k, "' must be a string");
          metadata_[k] = v.get<std::string>();
        }
        continue;
      }
      const std::string where = path_ + ": tensor '" + name + "'";
      require(entry.is_object(), where, " must be an object");
      require(entry.contains("dtype") && entry["dtype"].is_string(), where,
              " has no string 'dtype'");
      require(entry.contains("shape") && entry["shape"].is_array(), where, " has no 'shape' array");
      require(entry.contains("data_offsets") && entry["data_offsets"].is_array() &&
                  entry["data_offsets"].size() == 2,
              where, " has no 'data_offsets' pair");
      TensorView t;
      t.name = name;
      t.file = path_;
      t.dtype_name = entry["dtype"].get<std::string>();
      t.dtype = parse_dtype(t.dtype_name);
      const std::size_t elem = dtype_bytes(t.dtype_name);
      require(elem != 0, where, " has unknown dtype '", t.dtype_name, "'");
      // The element count, checked for overflow on the way.
      std::uint64_t numel = 1;
      for (const auto& d : entry["shape"]) {
        const auto n = static_cast<std::uint64_t>(detail::json_count(d, where + " shape entry"));
        require(n == 0 || numel <= std::numeric_limits<std::uint64_t>::max() / n / elem, where,
                " has an impossibly large shape");
        numel *= n;
        t.shape.push_back(static_cast<std::int64_t>(n));
      }
      const auto begin = static_cast<std::uint64_t>(
          detail::json_count(entry["data_offsets"][0], where + " data offset"));
      const auto end = static_cast<std::uint64_t>(
          detail::json_count(entry["data_offsets"][1], where + " data offset"));
      require(begin <= end && end <= data_size, where, " has data offsets [", begin, ", ", end,
              ") out of range (the data section holds ", data_size, " bytes)");
      require(end - begin == numel * elem, where, " is ", t.dtype_name, " ", t.shape_string(),
              " = ", numel * elem, " bytes, but its data offsets [", begin, ", ", end, ") hold ",
              end - begin);
      t.data = data + begin;
      t.bytes = static_cast<std::size_t>(end - begin);
      tensors_.emplace(name, std::move(t));
    }
    // No two tensors may share bytes.
    std::vector<const TensorView*> by_offset;
    for (const auto& e : tensors_) {
      if (e.second.bytes > 0) by_offset.push_back(&e.second);
    }
    std::sort(by_offset.begin(), by_offset.end(),
              [](const TensorView* a, const TensorView* b) { return a->data < b->data; });
    for (std::size_t i = 1; i < by_offset.size(); ++i) {
      const TensorView& a = *by_offset[i - 1];
      const TensorView& b = *by_offset[i];
      require(a.data + a.bytes <= b.data, path_, ": tensors '", a.name, "' and '", b.name,
              "' overlap in the data section");
    }
  }

  std::shared_ptr<const detail::Bytes> bytes_;
  std::string path_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace mla::io
