#pragma once
/// \file
/// The absorbed decode step: attention of one new token's H absorbed queries over the latent
/// cache, in FP32, on SIMD registers and several threads.
///
/// Scores and outputs are two small matrix products per tile of keys, read once for all heads;
/// softmax is online per tile in FP32; the key range is split into parts (and the heads into
/// groups) that threads work on independently and that are merged exactly by their
/// log-sum-exp. FP32 caches are read in place, BF16 and FP8 records widened as they are read.
/// The kernels are those of the active instruction set (mla/isa.hpp), chosen at run time; this
/// header holds only the width-independent checks and the call.

#include "mla/config.hpp"
#include "mla/detail/decode_workspace.hpp"
#include "mla/detail/isa/dispatch.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/latent_cache.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// Scratch memory of decode_absorbed, sized on first use for a config, options, thread count
/// and instruction set, and reused: later calls that fit allocate nothing. One workspace
/// serves one call at a time.
class DecodeWorkspace {
 public:
  /// Makes room for decode_absorbed with these dimensions and up to `tokens` query tokens on a
  /// pool of `threads` threads, for the kernels of the active instruction set (mla/isa.hpp).
  /// Calls grow it as they need, so this only moves the allocation out of the first call.
  void reserve(const MlaConfig& c, const DecodeOptions& o, int threads, Index tokens = 1);

  /// The buffers (internal: for the kernels).
  detail::decode::Buffers& buffers() { return buffers_; }

 private:
  detail::decode::Buffers buffers_;
};

/// The keys per block the active kernels take for `options` (options.tile_tokens, or the
/// kernels' own when it is 0).
inline Index decode_block_tokens(const DecodeOptions& options = {}) {
  return options.tile_tokens > 0 ? options.tile_tokens : detail::isa::kernels().decode_block;
}

inline void DecodeWorkspace::reserve(const MlaConfig& c, const DecodeOptions& o, int threads,
                                     Index tokens) {
  const detail::isa::Kernels& k = detail::isa::kernels();
  DecodeOptions resolved = o;
  resolved.tile_tokens = decode_block_tokens(o);
  k.reserve_decode(buffers_, c, resolved, threads, tokens);
}

/// Most query tokens one decode_absorbed call takes (speculative decoding and multi-token
/// prediction verify 2 to 8 at once; MlaLayer passes chunks of up to 8).
inline constexpr Index kMaxDecodeTokens = 64;

/// Absorbed attention of T consecutive query tokens over the latent cache in one pass: the
/// decode step's attention (T = 1), or the verification of T draft tokens. The last query token
/// sees the first `keys` tokens of `cache` (all of them when keys < 0), token t of the T the
/// first keys - (T - 1 - t): causal among the newest keys, each cache tile read once for all
/// tokens and heads. The cache may be FP32 (read in place), BF16 or FP8 (widened as read), or
/// FP64 (rounded to float).
///
/// - q_latent: [T * H, d_c + R], row t * H + h = [q~_h ; q^pe_h] of token t, with
///   q~_h = W_UK^(h)^T q_h^nope and RoPE applied to q^pe_h (as for attention_absorbed);
/// - out_latent: [T * H, d_c], o~_h = sum_j p_hj c_j;
/// - lse: [T, H], log sum_j exp(scale * (<q~_h, c_j> + <q^pe_h, k^R_j>)).
///
/// options.precision chooses the arithmetic: kFp32 (the default; within 1e-5 relative of a
/// double reference on the cache's values) or kBf16 (queries and softmax weights rounded to
/// BF16; see Precision). Runs on `pool` when given (its threads take the (split, head
/// group) parts), otherwise on the calling thread. After the first call with given dimensions,
/// options, token count, pool size and instruction set it allocates nothing. Throws mla::Error
/// for shapes that do not match.
inline void decode_absorbed(const MlaConfig& c, const LatentView& cache,
                            ConstMatrixRef<float> q_latent, double scale,
                            MatrixRef<float> out_latent, MatrixRef<float> lse, DecodeWorkspace& ws,
                            Executor* pool = nullptr, const DecodeOptions& options = {},
                            Index keys = -1) {
  const Index H = c.num_attention_heads, D = c.kv_lora_rank, R = c.qk_rope_head_dim, K = D + R;
  if (keys < 0) keys = cache.tokens();
  detail::require(cache.kv_lora_rank() == D && cache.rope_dim() == R,
                  "decode_absorbed: the cache holds [", cache.kv_lora_rank(), " + ",
                  cache.rope_dim(), "] per token, the config [", D, " + ", R, "]");
  const Index T = q_latent.rows() / H;
  detail::require(q_latent.rows() % H == 0 && T >= 1 && T <= kMaxDecodeTokens &&
                      q_latent.cols() == K && out_latent.rows() == T * H &&
                      out_latent.cols() == D && lse.rows() == T && lse.cols() == H,
                  "decode_absorbed: q_latent [", q_latent.rows(), ", ", q_latent.cols(),
                  "], out_latent [", out_latent.rows(), ", ", out_latent.cols(), "], lse [",
                  lse.rows(), ", ", lse.cols(), "]; expected [T * ", H, ", ", K, "], [T * ", H,
                  ", ", D, "], [T, ", H, "] for T in [1, ", kMaxDecodeTokens, "] query tokens");
  detail::require(keys >= T && keys <= cache.tokens(), "decode_absorbed: ", keys,
                  " keys requested for ", T, " query tokens, the cache holds ", cache.tokens(),
                  " tokens (the keys must cover every query token)");
  detail::require(
      (options.tile_tokens == 0 || (options.tile_tokens >= 16 && options.tile_tokens % 16 == 0 &&
                                    options.tile_tokens <= 4096)) &&
          options.splits >= 0 && options.splits <= 4096 && options.head_groups >= 1,
      "decode_absorbed: options need tile_tokens 0 or a multiple of 16 in [16, ",
      "4096], splits in [0, 4096] and head_groups >= 1; got ", options.tile_tokens, ", ",
      options.splits, ", ", options.head_groups);
  ws.reserve(c, options, mla::concurrency(pool), T);

  detail::isa::DecodeArgs a;
  a.cache = cache.blocks();
  a.heads = H;
  a.tokens = T;
  a.q = q_latent.data();
  a.q_stride = q_latent.outerStride();
  a.scale = static_cast<float>(scale);
  a.out = out_latent.data();
  a.out_stride = out_latent.outerStride();
  a.lse = lse.data();
  a.lse_stride = lse.outerStride();
  a.buffers = &ws.buffers();
  a.pool = pool;
  a.options = options;
  a.options.tile_tokens = decode_block_tokens(options);
  a.keys = keys;
  const detail::isa::Kernels& k = detail::isa::kernels();
  if (options.precision == Precision::kBf16) {
    k.decode_absorbed_bf16(a);
  } else {
    k.decode_absorbed(a);
  }
}

}  // namespace mla
