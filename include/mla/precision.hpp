#pragma once
/// \file
/// `Precision`: the arithmetic a kernel uses, an explicit option on the calls that offer a
/// shortcut (the decode attention, projections with BF16 or FP8 weights). The default is always
/// the FP32-accurate one.

#include <cstdint>

namespace mla {

/// The arithmetic of a kernel call.
enum class Precision : std::uint8_t {
  /// FP32 products and sums, as accurate as FP32 arithmetic on the stored values: the decode
  /// attention within 1e-5 relative of a double reference on the cache's values; projections
  /// as the dequantised weights multiplied in FP32. The default.
  kFp32,
  /// Activations (decode: queries times the softmax scale, and the softmax weights; projections
  /// with BF16 or FP8 weights: their inputs) rounded once to BF16; BF16 and FP8 operands used
  /// as they are (FP8 codes are exact in BF16, their scales applied to FP32 partial sums);
  /// FP32 and FP64 cache records rounded to BF16 (dense FP32 weights are not: such projections
  /// stay FP32); every product exact and every sum in FP32. Twice the arithmetic rate where the CPU
  /// has
  /// AVX512-BF16 dot products; a documented, larger error (see the README's tables of bounds).
  kBf16,
};

/// "fp32" or "bf16".
inline const char* to_string(Precision p) { return p == Precision::kBf16 ? "bf16" : "fp32"; }

}  // namespace mla
