#pragma once
/// \file
/// `RunOptions`: how one forward call of MlaLayer runs (which attention path, on which threads,
/// with which arithmetic). Passed with each call; the workspace (mla/workspace.hpp) holds only
/// memory, so one workspace serves calls with different options.

#include <cstdint>

#include "mla/decode_options.hpp"
#include "mla/executor.hpp"
#include "mla/precision.hpp"

namespace mla {

/// Which attention path a forward call takes.
enum class AttentionPath : std::uint8_t {
  kAuto,      ///< absorbed for one token; otherwise whichever needs fewer multiply-adds
  kExpanded,  ///< rebuild K and V per head from the latent
  kAbsorbed,  ///< attend over the latent with absorbed queries
};

/// The options of one forward call. The defaults run on the calling thread, FP32-accurate, on
/// the path each sequence's chunk suits.
///
///     mla::RunOptions run;
///     run.executor = &pool;                 // an mla::ThreadPool or an engine's Executor
///     run.decode.precision = mla::Precision::kBf16;
///     layer.forward(x, batch, cache, y, ws, run);
///
/// An AttentionPath converts to the options with that path and every other default, so
/// `layer.forward(..., ws, mla::AttentionPath::kExpanded)` reads as it did.
struct RunOptions {
  RunOptions() = default;
  RunOptions(AttentionPath p) : path(p) {}  // NOLINT(google-explicit-constructor)

  /// The path of every sequence of the call (kAuto: auto_attention_path per sequence; rows of
  /// DeepSeek-V3.2 layers that attend sparsely take the absorbed path whatever this says).
  AttentionPath path = AttentionPath::kAuto;
  /// Threads for the projections, the absorbed per-head products, the decode attention and the
  /// indexer: used, not owned, and it must outlive the call; nullptr runs on the calling thread.
  Executor* executor = nullptr;
  /// The arithmetic of the projections whose weights are BF16 or FP8 (kFp32: the dequantised
  /// weights multiplied in FP32; kBf16: activations rounded to BF16 once).
  Precision projection_precision = Precision::kFp32;
  /// How the absorbed decode attention of float layers divides its work and its arithmetic
  /// (DecodeOptions::precision also sets the expanded attention's).
  DecodeOptions decode;
};

}  // namespace mla
