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
/// are what hot paths call; element by element they equal the scalar conversions.
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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "mla/detail/bit_cast.hpp"

namespace mla {

/// What a conversion to FP8 does with a value whose rounded magnitude exceeds the largest
/// finite FP8 number, and with +-Inf. NaN inputs always give NaN, whatever the mode.
enum class Fp8Overflow : std::uint8_t {
  kSaturate,    ///< +-largest finite value (NVIDIA SATFINITE, CUTLASS, vLLM). The default.
  kNoSaturate,  ///< E4M3FN: NaN with the input's sign; E5M2: +-Inf.
};

namespace detail {

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
// GCC 12 reports -Wstringop-overflow for the vector body of these loops when they are inlined
// at a call site whose buffer is shorter than one vector; that path never runs for such n.
// The pragma keeps users' -Werror builds clean; it covers these two loops only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
template <class Format, bool kSaturate, bool kScaled>
inline void encode_span(const float* src, std::size_t n, std::uint8_t* dst, float scale) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const float x = kScaled ? src[i] / scale : src[i];
    dst[i] = encode_fp8<Format, kSaturate>(x);
  }
}
template <class Format, bool kScaled>
inline void decode_span(const std::uint8_t* src, std::size_t n, float* dst, float scale) noexcept {
  for (std::size_t i = 0; i < n; ++i) {
    const float x = decode_fp8<Format>(src[i]);
    dst[i] = kScaled ? x * scale : x;
  }
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

#if defined(__AVX512F__)
/// E4M3FN widening, 16 codes per step, through FP16: a code's exponent and mantissa fields
/// shifted into FP16 position give its value / 2^8 exactly (normal and subnormal codes alike,
/// since FP16 has the wider exponent), the hardware widens FP16 to float, and one multiply by
/// 2^8 * scale rounds once, as float(code) * scale does. NaN codes become the float NaN the
/// scalar conversion gives. Only for |scale| <= 2^100, where 2^8 * scale cannot overflow.
/// Whether the FP16 route below decodes codes times `scale` exactly: |scale| <= 2^100, where
/// the multiplier 2^8 * scale cannot overflow (false for NaN).
inline bool fp16_route_covers(float scale) noexcept { return std::fabs(scale) <= 0x1p100f; }

/// 16 codes at src times `mul` / 2^8 (mul = 2^8 * scale): the step of decode_e4m3_avx512.
inline __m512 widen16_e4m3_avx512(const std::uint8_t* src, __m512 mul) noexcept {
  const __m256i low7 = _mm256_set1_epi16(0x7F), high = _mm256_set1_epi16(0x80);
  const __m256i nan = _mm256_set1_epi16(0x7F80);  // FP16 NaN with the FP8 NaN's payload
  const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m256i em = _mm256_and_si256(w, low7);
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(w, high), 8);
  const __m256i is_nan = _mm256_cmpeq_epi16(em, low7);
  const __m256i h =
      _mm256_or_si256(sign, _mm256_blendv_epi8(_mm256_slli_epi16(em, 7), nan, is_nan));
  return _mm512_mul_ps(_mm512_cvtph_ps(h), mul);
}

#if defined(__AVX512BW__)
/// 32 codes at src times `mul` / 2^8, as lo (codes 0..15) and hi (16..31): the same FP16 route
/// on 32 lanes of 16 bits, with fewer operations per code. Shifted left by 7, a code has its
/// exponent and mantissa in FP16 position and its sign at bit 14; adding bit 14 to itself
/// carries the sign to bit 15 and clears bit 14. NaN codes (exponent and mantissa all ones)
/// get FP16's all-ones exponent by adding bit 14 once more.
inline void widen32_e4m3_avx512(const std::uint8_t* src, __m512 mul, __m512& lo,
                                __m512& hi) noexcept {
  const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  const __m512i t = _mm512_slli_epi16(w, 7);
  const __m512i bit14 = _mm512_set1_epi16(0x4000), em = _mm512_set1_epi16(0x3F80);
  __m512i h = _mm512_add_epi16(t, _mm512_and_si512(t, bit14));
  const __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(t, em), em);
  h = _mm512_mask_add_epi16(h, nan, h, bit14);
  lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), mul);
  hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), mul);
}
#endif

inline std::size_t decode_e4m3_avx512(const std::uint8_t* src, std::size_t n, float* dst,
                                      float scale) noexcept {
  const __m512 mul = _mm512_set1_ps(scale * 256.0f);
  std::size_t i = 0;
#if defined(__AVX512BW__)
  for (; i + 32 <= n; i += 32) {
    __m512 lo, hi;
    widen32_e4m3_avx512(src + i, mul, lo, hi);
    _mm512_storeu_ps(dst + i, lo);
    _mm512_storeu_ps(dst + i + 16, hi);
  }
#endif
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, widen16_e4m3_avx512(src + i, mul));
  return i;
}
#endif
}  // namespace detail

/// Bulk narrowing: `dst[i] = F8(src[i] / scale, mode)` for i < n, where `scale` is the
/// dequantisation multiplier (the stored values times `scale` approximate `src`). With
/// scale == 1 no division happens, so the result is exactly the scalar conversion; otherwise
/// `src[i] / scale` is first rounded to float, as DeepSeek's act_quant does. The ranges must
/// not overlap. Vectorised by the compiler (branch-free body).
template <class F8>
inline std::enable_if_t<is_float8_v<F8>> to_fp8(
    const float* src, std::size_t n, F8* dst, float scale = 1.0f,
    Fp8Overflow mode = Fp8Overflow::kSaturate) noexcept {
  using Format = typename F8::format;
  // An FP8 object is one byte with no padding; its object representation is its code.
  auto* out = reinterpret_cast<std::uint8_t*>(dst);
  const bool saturate = mode == Fp8Overflow::kSaturate;
  if (scale == 1.0f) {
    saturate ? detail::encode_span<Format, true, false>(src, n, out, scale)
             : detail::encode_span<Format, false, false>(src, n, out, scale);
  } else {
    saturate ? detail::encode_span<Format, true, true>(src, n, out, scale)
             : detail::encode_span<Format, false, true>(src, n, out, scale);
  }
}

/// Bulk widening: `dst[i] = float(src[i]) * scale` for i < n (exact when scale == 1). The
/// ranges must not overlap. Vectorised by the compiler (branch-free body).
template <class F8>
inline std::enable_if_t<is_float8_v<F8>> from_fp8(const F8* src, std::size_t n, float* dst,
                                                  float scale = 1.0f) noexcept {
  using Format = typename F8::format;
  const auto* in = reinterpret_cast<const std::uint8_t*>(src);
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<Format, detail::E4M3FNFormat>) {
    if (detail::fp16_route_covers(scale)) {
      const std::size_t done = detail::decode_e4m3_avx512(in, n, dst, scale);
      in += done;
      dst += done;
      n -= done;
    }
  }
#endif
  if (scale == 1.0f) {
    detail::decode_span<Format, false>(in, n, dst, scale);
  } else {
    detail::decode_span<Format, true>(in, n, dst, scale);
  }
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
