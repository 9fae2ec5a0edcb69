#pragma once
/// \file
/// FP8 storage types, bit-exact to the OCP 8-bit floating point specification (OFP8):
/// `mla::float8_e4m3fn` (E4M3, no infinities, one NaN per sign) and `mla::float8_e5m2`
/// (E5M2, IEEE-style infinities and NaNs).
///
/// FP8 is a storage format here. Narrowing from float/double is explicit and rounds once,
/// to nearest with ties to even, and only then decides overflow. Widening to float is
/// implicit and exact. There are no FP8 arithmetic operators: an expression such as `a + b`
/// widens both operands and is computed in float. The bulk conversions `to_fp8` / `from_fp8`
/// (mla/quant.hpp, on the kernels of the active instruction set) are what hot paths call;
/// element by element they equal the scalar conversions. This header is vocabulary only: it
/// includes no kernel.
///
/// The conversions are integer arithmetic on the IEEE bit patterns (decoding adds one float
/// subtraction that is always exact), so they do not depend on the floating-point environment
/// (rounding mode, flush-to-zero). Only the optional scale of the bulk narrowing divides in
/// float, under the current rounding mode.

#include <Eigen/Core>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <ostream>
#include <type_traits>

#include "mla/detail/bit_cast.hpp"
#include "mla/detail/fp8_codec.hpp"

namespace mla {

/// What a conversion to FP8 does with a value whose rounded magnitude exceeds the largest
/// finite FP8 number, and with +-Inf. NaN inputs always give NaN, whatever the mode.
enum class Fp8Overflow : std::uint8_t {
  kSaturate,    ///< +-largest finite value (NVIDIA SATFINITE, CUTLASS, vLLM). The default.
  kNoSaturate,  ///< E4M3FN: NaN with the input's sign; E5M2: +-Inf.
};

namespace detail {

/// The shared implementation of the FP8 types: one byte holding a `Format` code. `Derived` is
/// the public type (CRTP), so that `from_bits` and the conversions return it.
template <class Derived, class Format>
class Float8Base {
 public:
  /// The bit-layout description (internal).
  using format = Format;

  /// +0.
  constexpr Float8Base() noexcept = default;

  /// Rounds `x` once to the nearest FP8 value (ties to even), then applies `mode` to values
  /// beyond the largest finite number and to +-Inf.
  explicit Float8Base(float x, Fp8Overflow mode = Fp8Overflow::kSaturate) noexcept
      : bits_(mode == Fp8Overflow::kSaturate ? encode_fp8<Format, true>(x)
                                             : encode_fp8<Format, false>(x)) {}

  /// Rounds the double `x` directly (never through float, which would round twice).
  explicit Float8Base(double x, Fp8Overflow mode = Fp8Overflow::kSaturate) noexcept
      : bits_(mode == Fp8Overflow::kSaturate ? encode_fp8<Format, true>(x)
                                             : encode_fp8<Format, false>(x)) {}

  /// From BF16 / FP16: both are exact in float, so this is still a single rounding.
  explicit Float8Base(Eigen::bfloat16 x, Fp8Overflow mode = Fp8Overflow::kSaturate) noexcept
      : Float8Base(static_cast<float>(x), mode) {}
  explicit Float8Base(Eigen::half x, Fp8Overflow mode = Fp8Overflow::kSaturate) noexcept
      : Float8Base(static_cast<float>(x), mode) {}

  /// From an integer, via double (exact up to 2^53; anything larger overflows FP8 anyway).
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  explicit Float8Base(I x, Fp8Overflow mode = Fp8Overflow::kSaturate) noexcept
      : Float8Base(static_cast<double>(x), mode) {}

  /// The value with the given bit pattern (sign, exponent, mantissa from the top bit down).
  static constexpr Derived from_bits(std::uint8_t bits) noexcept {
    Derived d;
    static_cast<Float8Base&>(d).bits_ = bits;
    return d;
  }

  /// The bit pattern.
  constexpr std::uint8_t bits() const noexcept { return bits_; }

  /// The exact value as a float (NaN keeps its sign and payload).
  operator float() const noexcept { return decode_fp8<Format>(bits_); }

 private:
  std::uint8_t bits_ = 0;
};

}  // namespace detail

/// OCP FP8 E4M3 without infinities ("fn"): 1 sign, 4 exponent (bias 7), 3 mantissa bits;
/// range +-448, NaN at 0x7F/0xFF only. The format of DeepSeek-V3's weights and activations.
///
/// One trivially copyable byte, value-initialised to +0. Construction from float, double,
/// bf16, fp16 or an integer is explicit and rounds once (nearest, ties to even), then applies
/// the overflow mode (saturating by default). Widening to float is implicit and exact;
/// `from_bits` / `bits()` give the code.
class float8_e4m3fn : public detail::Float8Base<float8_e4m3fn, detail::E4M3FNFormat> {
 public:
  using Float8Base::Float8Base;
};

/// OCP FP8 E5M2: 1 sign, 5 exponent (bias 15), 2 mantissa bits; range +-57344, IEEE-style
/// +-Inf (0x7C/0xFC) and NaN (0x7D-0x7F, 0xFD-0xFF). Same interface as `float8_e4m3fn`.
class float8_e5m2 : public detail::Float8Base<float8_e5m2, detail::E5M2Format> {
 public:
  using Float8Base::Float8Base;
};

/// True for the FP8 storage types of this header.
template <class T>
inline constexpr bool is_float8_v =
    std::is_same_v<T, float8_e4m3fn> || std::is_same_v<T, float8_e5m2>;

/// Prints the value as its float.
template <class Derived, class Format>
std::ostream& operator<<(std::ostream& os, const detail::Float8Base<Derived, Format>& x) {
  return os << static_cast<float>(x);
}

namespace detail {

/// numeric_limits members for an FP8 type T (values as in ml_dtypes and the OFP8 spec).
template <class T>
class Float8Limits {
  using Format = typename T::format;
  static constexpr int kM = Format::kMantissaBits;
  static constexpr int kMaxExponentField = static_cast<int>(Format::kMaxFinite >> kM);

 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = Format::kHasInfinity;
  static constexpr bool has_quiet_NaN = true;
  /// E5M2 keeps IEEE's signalling NaNs (quiet bit clear); E4M3FN has a single NaN per sign.
  static constexpr bool has_signaling_NaN = Format::kHasInfinity;
  static constexpr std::float_denorm_style has_denorm = std::denorm_present;
  static constexpr bool has_denorm_loss = false;
  static constexpr std::float_round_style round_style = std::round_to_nearest;
  static constexpr bool is_iec559 = false;
  static constexpr bool is_bounded = true;
  static constexpr bool is_modulo = false;
  static constexpr int digits = kM + 1;
  static constexpr int digits10 = 0;  // floor((digits - 1) log10 2) is 0 for both formats
  static constexpr int max_digits10 = Format::kMaxDigits10;
  static constexpr int radix = 2;
  static constexpr int min_exponent = 2 - Format::kBias;
  static constexpr int max_exponent = kMaxExponentField - Format::kBias + 1;
  /// E4M3FN: 0.1 is normal, 0.01 is not; E5M2: 1e-4 is normal, 1e-5 is not.
  static constexpr int min_exponent10 = Format::kHasInfinity ? -4 : -1;
  /// E4M3FN: 100 <= 448 < 1000; E5M2: 1e4 <= 57344 < 1e5.
  static constexpr int max_exponent10 = Format::kHasInfinity ? 4 : 2;
  static constexpr bool traps = false;
  static constexpr bool tinyness_before = false;

  /// Smallest positive normal value, 2^(1 - bias).
  static constexpr T min() noexcept { return T::from_bits(1u << kM); }
  static constexpr T max() noexcept { return T::from_bits(Format::kMaxFinite); }
  static constexpr T lowest() noexcept { return T::from_bits(0x80u | Format::kMaxFinite); }
  /// 2^-mbits: the gap between 1 and the next value.
  static constexpr T epsilon() noexcept { return T::from_bits((Format::kBias - kM) << kM); }
  /// 0.5 (round to nearest).
  static constexpr T round_error() noexcept { return T::from_bits((Format::kBias - 1) << kM); }
  /// E5M2: +Inf. E4M3FN has no infinity and returns its NaN, so misuse is never a number.
  static constexpr T infinity() noexcept {
    return T::from_bits(Format::kHasInfinity ? Format::kFirstSpecial : Format::kQuietNaN);
  }
  static constexpr T quiet_NaN() noexcept { return T::from_bits(Format::kQuietNaN); }
  /// E5M2: 0x7D (quiet bit clear). E4M3FN: its only NaN.
  static constexpr T signaling_NaN() noexcept {
    return T::from_bits(Format::kHasInfinity ? Format::kFirstSpecial + 1 : Format::kQuietNaN);
  }
  /// Smallest positive subnormal value, 2^(1 - bias - mbits).
  static constexpr T denorm_min() noexcept { return T::from_bits(0x01); }
};

}  // namespace detail
}  // namespace mla

namespace std {
template <>
class numeric_limits<mla::float8_e4m3fn> : public mla::detail::Float8Limits<mla::float8_e4m3fn> {};
template <>
class numeric_limits<mla::float8_e5m2> : public mla::detail::Float8Limits<mla::float8_e5m2> {};
}  // namespace std

namespace mla::detail {
/// Eigen::NumTraits for an FP8 type T: lets Eigen containers hold it (as storage: compute
/// after `.cast<float>()`).
template <class T>
struct Float8NumTraits : Eigen::GenericNumTraits<T> {
  using Real = T;
  using NonInteger = T;
  using Literal = T;
  using Nested = T;
  enum {
    IsComplex = 0,
    IsInteger = 0,
    IsSigned = 1,
    RequireInitialization = 0,
    ReadCost = 1,
    AddCost = 3,
    MulCost = 3
  };
  /// Two units in the last place at 1: the resolution an FP8 result can be trusted to.
  static T dummy_precision() {
    using Format = typename T::format;
    return T::from_bits((Format::kBias - Format::kMantissaBits + 1) << Format::kMantissaBits);
  }
};
}  // namespace mla::detail

namespace Eigen {
template <>
struct NumTraits<mla::float8_e4m3fn> : mla::detail::Float8NumTraits<mla::float8_e4m3fn> {};
template <>
struct NumTraits<mla::float8_e5m2> : mla::detail::Float8NumTraits<mla::float8_e5m2> {};
}  // namespace Eigen
