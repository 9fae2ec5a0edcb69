#pragma once
// Command-line parsing shared by the example programs: numbers that must be whole and in range,
// with errors (mla::Error) that name the flag.

#include <cmath>
#include <exception>
#include <string>

#include "mla/error.hpp"

namespace cli {

/// `text` as an integer; throws mla::Error naming `flag` unless the whole text is one.
inline long long parse_integer(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  mla::detail::require(used == text.size() && !text.empty(), flag, " needs an integer, got '", text,
                       "'");
  return v;
}

/// `text` as a finite number; throws mla::Error naming `flag` unless the whole text is one.
inline double parse_number(const std::string& flag, const std::string& text) {
  std::size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  mla::detail::require(used == text.size() && !text.empty() && std::isfinite(v), flag,
                       " needs a number, got '", text, "'");
  return v;
}

}  // namespace cli
