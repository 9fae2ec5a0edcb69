#pragma once
/// \file
/// The scalar FP8 codecs (OCP OFP8): one value to its code and back, by integer arithmetic on
/// the IEEE bit patterns. Internal: the FP8 types of mla/fp8.hpp and the kernels of
/// detail/isa/ build on these.

#include <cstdint>

#include "mla/detail/bit_cast.hpp"

namespace mla::detail {

/// OCP E4M3FN: 1 sign, 4 exponent (bias 7), 3 mantissa bits. S.1111.111 is NaN; no Inf.
struct E4M3FNFormat {
  static constexpr int kExponentBits = 4;
  static constexpr int kMantissaBits = 3;
  static constexpr int kBias = 7;
  static constexpr std::uint32_t kMaxFinite = 0x7E;     ///< 448 = 1.75 * 2^8
  static constexpr std::uint32_t kFirstSpecial = 0x7F;  ///< magnitude codes >= this are NaN
  static constexpr bool kHasInfinity = false;
  static constexpr std::uint32_t kQuietNaN = 0x7F;
  static constexpr int kMaxDigits10 = 3;  ///< ceil(1 + 4 log10 2)
};

/// OCP E5M2: 1 sign, 5 exponent (bias 15), 2 mantissa bits. IEEE-style: S.11111.00 is Inf,
/// S.11111.{01,10,11} are NaN.
struct E5M2Format {
  static constexpr int kExponentBits = 5;
  static constexpr int kMantissaBits = 2;
  static constexpr int kBias = 15;
  static constexpr std::uint32_t kMaxFinite = 0x7B;     ///< 57344 = 1.75 * 2^15
  static constexpr std::uint32_t kFirstSpecial = 0x7C;  ///< 0x7C is Inf, 0x7D..0x7F NaN
  static constexpr bool kHasInfinity = true;
  static constexpr std::uint32_t kQuietNaN = 0x7E;
  static constexpr int kMaxDigits10 = 2;  ///< ceil(1 + 3 log10 2)
};

/// Bit layout of the IEEE binary source types a conversion starts from.
template <class Src>
struct IeeeBinary;
template <>
struct IeeeBinary<float> {
  using Bits = std::uint32_t;
  using SignedBits = std::int32_t;
  static constexpr int kExponentBits = 8;
  static constexpr int kMantissaBits = 23;
  static constexpr int kBias = 127;
};
template <>
struct IeeeBinary<double> {
  using Bits = std::uint64_t;
  using SignedBits = std::int64_t;
  static constexpr int kExponentBits = 11;
  static constexpr int kMantissaBits = 52;
  static constexpr int kBias = 1023;
};

/// Encodes `x` as an FP8 code of `Format`, rounding once to nearest-even, then applying the
/// overflow rule. Branch-free (selects only), so loops over it vectorise.
template <class Format, bool kSaturate, class Src>
inline std::uint8_t encode_fp8(Src x) noexcept {
  using B = IeeeBinary<Src>;
  using Bits = typename B::Bits;
  using SignedBits = typename B::SignedBits;
  constexpr int kSrcBits = static_cast<int>(sizeof(Bits) * 8);
  constexpr int kM = Format::kMantissaBits;
  // Source mantissa bits that rounding removes.
  constexpr int kDrop = B::kMantissaBits - kM;
  constexpr Bits kAbsMask = ~Bits{0} >> 1;
  constexpr Bits kInfBits = ((Bits{1} << B::kExponentBits) - 1) << B::kMantissaBits;
  constexpr Bits kImplicitOne = Bits{1} << B::kMantissaBits;
  // Biased source exponent of the smallest normal FP8 value 2^(1 - bias).
  constexpr SignedBits kMinNormalExp = B::kBias + 1 - Format::kBias;
  constexpr Bits kMinNormalBits = Bits(kMinNormalExp) << B::kMantissaBits;
  constexpr Bits kOverflowCode = kSaturate              ? Format::kMaxFinite
                                 : Format::kHasInfinity ? Format::kFirstSpecial  // Inf
                                                        : Format::kQuietNaN;

  const Bits u = bit_cast<Bits>(x);
  const Bits a = u & kAbsMask;  // |x|
  const auto sign = static_cast<std::uint32_t>(u >> (kSrcBits - 8)) & 0x80u;

  // Normal FP8 result: rebias the exponent, then round the mantissa to nearest even by adding
  // just under half an FP8 ulp plus the lowest kept bit. A carry out of the mantissa bumps the
  // exponent, which is exactly the right result (1.111|1 -> 10.000).
  const Bits kept_lsb = (a >> kDrop) & 1u;
  const Bits normal = (a - (Bits(B::kBias - Format::kBias) << B::kMantissaBits) +
                       ((Bits{1} << (kDrop - 1)) - 1) + kept_lsb) >>
                      kDrop;

  // Subnormal FP8 result: |x| / 2^(1 - bias - mbits) rounded to nearest even, i.e. the
  // significand shifted right by a per-value amount. Shifts beyond mbits + 2 all give 0
  // (|x| < half the smallest subnormal), so the amount is clamped, which also keeps every
  // shift defined when this lane is not selected. A round-up to 2^mbits lands on the smallest
  // normal code, which is again the right result.
  const auto exponent = static_cast<SignedBits>(a >> B::kMantissaBits);
  SignedBits shift = SignedBits{kDrop} + kMinNormalExp - exponent;
  shift = shift < 1 ? 1 : shift;
  shift = shift > B::kMantissaBits + 2 ? B::kMantissaBits + 2 : shift;
  // Same round-to-nearest-even trick as above: add half - 1 plus the lowest kept bit.
  const Bits significand = (a & (kImplicitOne - 1)) | kImplicitOne;
  const Bits sub_lsb = (significand >> shift) & 1u;
  const Bits subnormal = (significand + (Bits{1} << (shift - 1)) - 1 + sub_lsb) >> shift;

  Bits code = a < kMinNormalBits ? subnormal : normal;
  // Overflow is decided after rounding: E4M3 464 is a tie that rounds to 448 and stays finite.
  code = code > Format::kMaxFinite ? kOverflowCode : code;
  // NaN keeps its sign and as much payload as fits; a payload that truncates to zero becomes
  // the quiet NaN instead of turning into E5M2 infinity.
  const Bits payload = (a >> kDrop) & ((Bits{1} << kM) - 1);
  const Bits nan_code = Format::kHasInfinity && payload == 0 ? Bits{Format::kQuietNaN}
                                                             : (Format::kFirstSpecial | payload);
  code = a > kInfBits ? nan_code : code;
  return static_cast<std::uint8_t>(code | sign);
}

/// Decodes an FP8 code of `Format` to the float of the same value (exact). NaN codes keep
/// their sign and payload. Every lane does the same operations (no branch-only float op),
/// so loops over it vectorise.
template <class Format>
inline float decode_fp8(std::uint8_t code) noexcept {
  constexpr int kM = Format::kMantissaBits;
  constexpr std::uint32_t kRebias = std::uint32_t{127 - Format::kBias} << 23;
  constexpr std::uint32_t kMinNormalBits = std::uint32_t{128 - Format::kBias} << 23;  // 2^(1-bias)
  const std::uint32_t sign = static_cast<std::uint32_t>(code & 0x80u) << 24;
  const std::uint32_t em = code & 0x7Fu;  // exponent and mantissa fields
  // A normal code's value is its fields moved into float position with the exponent rebiased.
  // A subnormal code m (exponent field 0) is worth 2^(1-bias) * m/2^M: read it as if its
  // exponent field were 1, which gives 2^(1-bias) * (1 + m/2^M), and subtract 2^(1-bias)
  // (exact). Normal codes subtract +0, so every lane does the same float subtraction.
  const bool is_subnormal = em < (1u << kM);
  const std::uint32_t fields = is_subnormal ? em | (1u << kM) : em;
  const float minuend = bit_cast<float>((fields << (23 - kM)) + kRebias);
  const float subtrahend = bit_cast<float>(is_subnormal ? kMinNormalBits : 0u);
  const std::uint32_t finite = bit_cast<std::uint32_t>(minuend - subtrahend);
  // Inf/NaN: exponent all ones, FP8 mantissa as the leading payload bits. E4M3FN's NaN (m = 7)
  // becomes a quiet float NaN; E5M2 0x7C becomes +-Inf.
  const std::uint32_t special = 0x7F800000u | ((em & ((1u << kM) - 1)) << (23 - kM));
  const std::uint32_t magnitude = em >= Format::kFirstSpecial ? special : finite;
  return bit_cast<float>(sign | magnitude);
}

}  // namespace mla::detail
