#pragma once
/// \file
/// NumPy .npy files holding a 2-D float32 array (little-endian, C order): read and write.

#include <unistd.h>

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "mla/error.hpp"
#include "mla/io/checkpoint.hpp"
#include "mla/matrix.hpp"

namespace mla::io {

namespace detail {

/// The fields of a .npy header dict: {'descr': ..., 'fortran_order': ..., 'shape': (...)}.
struct NpyHeader {
  std::string descr;
  bool fortran_order = false;
  std::vector<std::int64_t> shape;
};

/// A strict reader of the Python literal a .npy header holds.
class NpyHeaderParser {
 public:
  NpyHeaderParser(const std::string& text, const std::string& file) : s_(text), file_(file) {}

  NpyHeader parse() {
    NpyHeader h;
    bool have_descr = false, have_order = false, have_shape = false;
    expect('{');
    for (;;) {
      skip_space();
      if (peek() == '}') break;
      const std::string key = string_literal();
      expect(':');
      skip_space();
      if (key == "descr") {
        h.descr = string_literal();
        have_descr = true;
      } else if (key == "fortran_order") {
        h.fortran_order = boolean();
        have_order = true;
      } else if (key == "shape") {
        h.shape = tuple();
        have_shape = true;
      } else {
        fail("unexpected key '" + key + "'");
      }
      skip_space();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      skip_space();
      if (peek() != '}') fail("expected ',' or '}'");
    }
    ++i_;
    if (!have_descr || !have_order || !have_shape)
      fail("missing 'descr', 'fortran_order' or 'shape'");
    return h;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    mla::detail::fail(file_, ": malformed .npy header (", what, "): ", s_);
  }
  char peek() const { return i_ < s_.size() ? s_[i_] : '\0'; }
  void skip_space() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  void expect(char c) {
    skip_space();
    if (peek() != c) fail(std::string("expected '") + c + "'");
    ++i_;
  }
  std::string string_literal() {
    skip_space();
    const char q = peek();
    if (q != '\'' && q != '"') fail("expected a quoted string");
    const std::size_t end = s_.find(q, i_ + 1);
    if (end == std::string::npos) fail("unterminated string");
    std::string v = s_.substr(i_ + 1, end - i_ - 1);
    i_ = end + 1;
    return v;
  }
  bool boolean() {
    if (s_.compare(i_, 4, "True") == 0) {
      i_ += 4;
      return true;
    }
    if (s_.compare(i_, 5, "False") == 0) {
      i_ += 5;
      return false;
    }
    fail("expected True or False");
  }
  std::vector<std::int64_t> tuple() {
    std::vector<std::int64_t> v;
    expect('(');
    for (;;) {
      skip_space();
      if (peek() == ')') break;
      std::int64_t n = 0;
      std::size_t digits = 0;
      while (std::isdigit(static_cast<unsigned char>(peek()))) {
        if (n > (INT64_MAX - 9) / 10) fail("dimension too large");
        n = n * 10 + (peek() - '0');
        ++i_;
        ++digits;
      }
      if (digits == 0) fail("expected a dimension");
      v.push_back(n);
      skip_space();
      if (peek() == ',') {
        ++i_;
      } else if (peek() != ')') {
        fail("expected ',' or ')'");
      }
    }
    ++i_;
    return v;
  }

  const std::string& s_;
  const std::string& file_;
  std::size_t i_ = 0;
};

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

}  // namespace detail

/// Parses .npy bytes holding a 2-D little-endian float32 C-order array (`name` is used in
/// messages). Throws mla::Error for anything else: bad magic or version, a malformed or
/// truncated header, another dtype, another rank, Fortran order, missing or extra data.
inline RowMatrix<float> parse_npy(const unsigned char* data, std::size_t size,
                                  const std::string& name) {
  using mla::detail::require;
  require(size > 0, name, ": empty file");
  require(size >= 10 && std::memcmp(data, "\x93NUMPY", 6) == 0, name, ": not a .npy file");
  const unsigned major = data[6];
  require(major >= 1 && major <= 3, name, ": unsupported .npy version ", major, ".",
          unsigned{data[7]});
  std::size_t header_len = 0, offset = 0;
  if (major == 1) {
    header_len = static_cast<std::size_t>(data[8]) | (static_cast<std::size_t>(data[9]) << 8);
    offset = 10;
  } else {
    require(size >= 12, name, ": truncated header");
    std::uint32_t len;
    std::memcpy(&len, data + 8, 4);
    header_len = len;
    offset = 12;
  }
  require(header_len <= size - offset, name, ": truncated header (", header_len,
          " header bytes announced, ", size - offset, " in the file)");
  const std::string text(reinterpret_cast<const char*>(data + offset), header_len);
  const detail::NpyHeader h = detail::NpyHeaderParser(text, name).parse();
  require(h.descr == "<f4", name, ": must hold float32 ('<f4'), got '", h.descr, "'");
  require(!h.fortran_order, name, ": Fortran-ordered arrays are not supported (save in C order)");
  require(h.shape.size() == 2, name, ": must be 2-D, got shape ", detail::shape_text(h.shape));
  const auto rows = static_cast<std::size_t>(h.shape[0]),
             cols = static_cast<std::size_t>(h.shape[1]);
  require(cols == 0 || rows <= (SIZE_MAX / 4) / cols, name, ": shape ", detail::shape_text(h.shape),
          " is too large");
  const std::size_t need = rows * cols * 4;
  const std::size_t have = size - offset - header_len;
  require(have >= need, name, ": truncated: shape ", detail::shape_text(h.shape), " needs ", need,
          " bytes of data, the file holds ", have);
  require(have == need, name, ": ", have - need, " unexpected bytes after the ",
          detail::shape_text(h.shape), " array");
  RowMatrix<float> m(h.shape[0], h.shape[1]);
  if (need > 0) std::memcpy(m.data(), data + offset + header_len, need);
  return m;
}

/// Reads a .npy file (see parse_npy).
inline RowMatrix<float> read_npy(const std::string& path) {
  detail::MappedBytes bytes(path);
  return parse_npy(bytes.data(), bytes.size(), path);
}

/// Writes m as a .npy file (version 1.0, '<f4', C order). The file appears complete or not at
/// all: the bytes go to a temporary file in the same directory, renamed over `path` at the end.
/// Throws mla::Error when it cannot be written.
inline void write_npy(const std::string& path, ConstMatrixRef<float> m) {
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                       std::to_string(m.rows()) + ", " + std::to_string(m.cols()) + "), }";
  // Pad so that the data starts at a multiple of 64 bytes, ending the header with '\n'.
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  mla::detail::require(f != nullptr, path, ": cannot write (", std::strerror(errno), ")");
  const unsigned char preamble[10] = {0x93,
                                      'N',
                                      'U',
                                      'M',
                                      'P',
                                      'Y',
                                      1,
                                      0,
                                      static_cast<unsigned char>(header.size() & 0xFF),
                                      static_cast<unsigned char>(header.size() >> 8)};
  bool ok = std::fwrite(preamble, 1, 10, f) == 10 &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (Index r = 0; ok && r < m.rows(); ++r) {
    ok = std::fwrite(m.row(r).data(), 4, static_cast<std::size_t>(m.cols()), f) ==
         static_cast<std::size_t>(m.cols());
  }
  ok = std::fclose(f) == 0 && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp.c_str());
    mla::detail::fail(path, ": cannot write (", std::strerror(err), ")");
  }
}

}  // namespace mla::io
