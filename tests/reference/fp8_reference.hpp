#pragma once
// Independent FP8 reference for the tests, written from the OCP OFP8 specification.
// It shares no code with the library: values come from the format's formula, and rounding
// searches the sorted list of representable values and compares against exact midpoints.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace ref {

/// The parameters the OFP8 spec gives for one format.
struct Fp8Spec {
  int exponent_bits;
  int mantissa_bits;
  int bias;
  bool ieee_specials;  // E5M2: exponent all ones is Inf/NaN. E4M3FN: only S.1111.111 is NaN.
};

inline constexpr Fp8Spec kE4M3FN{4, 3, 7, false};
inline constexpr Fp8Spec kE5M2{5, 2, 15, true};

enum class Kind { kFinite, kInf, kNaN };

/// Decodes code by the format's formula: (-1)^s * 2^(e - bias) * (1 + m / 2^M) for normal
/// codes, (-1)^s * 2^(1 - bias) * (m / 2^M) for exponent field 0.
inline double fp8_value(const Fp8Spec& f, unsigned code, Kind* kind = nullptr) {
  const bool negative = (code >> 7) & 1;
  const unsigned e = (code >> f.mantissa_bits) & ((1u << f.exponent_bits) - 1);
  const unsigned m = code & ((1u << f.mantissa_bits) - 1);
  const unsigned e_max = (1u << f.exponent_bits) - 1;
  const unsigned m_max = (1u << f.mantissa_bits) - 1;
  Kind k = Kind::kFinite;
  double v;
  if (f.ieee_specials && e == e_max) {
    k = m == 0 ? Kind::kInf : Kind::kNaN;
    v = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (!f.ieee_specials && e == e_max && m == m_max) {
    k = Kind::kNaN;
    v = std::numeric_limits<double>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m) / (1u << f.mantissa_bits), 1 - f.bias);
  } else {
    v = std::ldexp(1.0 + static_cast<double>(m) / (1u << f.mantissa_bits),
                   static_cast<int>(e) - f.bias);
  }
  if (kind) *kind = k;
  return negative ? -v : v;
}

/// Largest finite positive code of the format.
inline unsigned fp8_max_code(const Fp8Spec& f) {
  unsigned best = 0;
  for (unsigned c = 0; c < 0x80; ++c) {
    Kind k;
    fp8_value(f, c, &k);
    if (k == Kind::kFinite) best = c;
  }
  return best;
}

/// True when code is a NaN of the format.
inline bool fp8_is_nan(const Fp8Spec& f, unsigned code) {
  Kind k;
  fp8_value(f, code, &k);
  return k == Kind::kNaN;
}

/// The OCP conversion to one format, with the representable values precomputed.
class Fp8Rounder {
 public:
  explicit Fp8Rounder(const Fp8Spec& f) : f_(f), max_code_(fp8_max_code(f)) {
    // Positive finite values in code order (ascending), then the next point of the grid
    // above the largest finite value, as if the exponent range went on. Rounding to that
    // last point means overflow.
    for (unsigned c = 0; c <= max_code_; ++c) grid_.push_back(fp8_value(f, c));
    const double max = grid_.back();
    grid_.push_back(max + std::ldexp(1.0, std::ilogb(max) - f.mantissa_bits));
  }

  unsigned max_code() const { return max_code_; }
  const std::vector<double>& grid() const { return grid_; }

  /// Nearest representable value with ties to the even code, on the unbounded grid, then
  /// the overflow rule (saturate: +-max finite; otherwise E4M3FN NaN, E5M2 Inf). +-Inf
  /// overflows. A NaN input gives the format's canonical NaN with v's sign (callers compare
  /// NaN-ness and sign, not payload).
  unsigned round(double v, bool saturate) const {
    const unsigned sign = std::signbit(v) ? 0x80u : 0u;
    const unsigned overflow_code =
        saturate ? max_code_ : (f_.ieee_specials ? max_code_ + 1 /* Inf */ : 0x7Fu /* NaN */);
    if (std::isnan(v)) return sign | (f_.ieee_specials ? 0x7Eu : 0x7Fu);
    const double m = std::fabs(v);
    if (m >= grid_.back()) return sign | overflow_code;  // includes +-Inf
    // grid_[i] <= m < grid_[i + 1]
    const std::size_t i =
        static_cast<std::size_t>(std::upper_bound(grid_.begin(), grid_.end(), m) - grid_.begin()) -
        1;
    // Both neighbours are dyadic with few bits, so their midpoint is exact in double and
    // the comparisons below are exact.
    const double mid = 0.5 * (grid_[i] + grid_[i + 1]);
    std::size_t pick;
    if (m < mid) {
      pick = i;
    } else if (m > mid) {
      pick = i + 1;
    } else {
      pick = (i % 2 == 0) ? i : i + 1;  // ties to the even code
    }
    if (pick == grid_.size() - 1) return sign | overflow_code;
    return sign | static_cast<unsigned>(pick);
  }

 private:
  Fp8Spec f_;
  unsigned max_code_;
  std::vector<double> grid_;
};

/// The value of a 16-bit IEEE-style pattern with the given field widths, by the formula
/// (exponent all ones: Inf/NaN; exponent 0: subnormal).
inline double binary16_value(std::uint16_t bits, int exponent_bits, int mantissa_bits) {
  const bool negative = bits >> 15;
  const unsigned e = (bits >> mantissa_bits) & ((1u << exponent_bits) - 1);
  const unsigned m = bits & ((1u << mantissa_bits) - 1);
  const int bias = (1 << (exponent_bits - 1)) - 1;
  double v;
  if (e == (1u << exponent_bits) - 1) {
    v = m == 0 ? std::numeric_limits<double>::infinity() : std::numeric_limits<double>::quiet_NaN();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m), 1 - bias - mantissa_bits);
  } else {
    v = std::ldexp(1.0 + std::ldexp(static_cast<double>(m), -mantissa_bits),
                   static_cast<int>(e) - bias);
  }
  return negative ? -v : v;
}

/// IEEE half (binary16): 5 exponent bits, 10 mantissa bits.
inline double fp16_value(std::uint16_t bits) { return binary16_value(bits, 5, 10); }

/// bfloat16: 8 exponent bits, 7 mantissa bits.
inline double bf16_value(std::uint16_t bits) { return binary16_value(bits, 8, 7); }

}  // namespace ref
