#pragma once
/// \file
/// `DecodeOptions`: how a decode step (decode_absorbed, the layer's absorbed path, sparse
/// attention) divides its work and which arithmetic it uses. Vocabulary: the kernels and the
/// ops both name it.

#include "mla/matrix.hpp"
#include "mla/precision.hpp"

namespace mla {

/// How decode_absorbed divides its work.
struct DecodeOptions {
  /// Parts the key range is split into (each merged by log-sum-exp); 0 means one per thread of
  /// the pool. More parts than threads balance uneven progress; each costs d_c x H floats.
  Index splits = 0;
  /// Groups the heads are split into (each reads the cache on its own). 1 reads every key tile
  /// once for all heads, which is what makes the kernel fast; more groups give threads work
  /// when the context is too short to split.
  Index head_groups = 1;
  /// Keys per block, a multiple of 16 (the softmax and the FP8/BF16 conversion work per block);
  /// 0 (the default) takes the kernel's own: 64 on the FMA and AVX512-BF16 kernels, 256 on AMX
  /// tiles (see mla::decode_block_tokens()).
  Index tile_tokens = 0;
  /// The arithmetic (mla/precision.hpp): kFp32 (the default) or kBf16.
  Precision precision = Precision::kFp32;
};

}  // namespace mla
