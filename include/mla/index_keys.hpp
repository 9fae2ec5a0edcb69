#pragma once
/// \file
/// The index-key cache of DeepSeek-V3.2's sparse attention: per token and layer one index key
/// of d_I values as d_I E4M3 codes and one FP32 scale (132 bytes at d_I = 128), paged like the
/// latent. Within a block of `block_tokens` tokens the codes come first, token by token
/// ([block_tokens, d_I] bytes), then the block_tokens scales (vLLM's indexer-cache block:
/// 64 x 128 code bytes then 64 x 4 scale bytes). A LatentCache of a config with an indexer keeps
/// these blocks beside its latent records, in the same blocks (mla/latent_cache.hpp); an engine
/// can describe its own buffer with PagedIndexBuffer.

#include <cstddef>
#include <cstdint>
#include <limits>

#include "mla/detail/record_layout.hpp"
#include "mla/error.hpp"
#include "mla/fp8.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla {

/// The codec of one index key: x [dim] -> dim E4M3 codes and one scale, quantised as
/// DeepSeek's act_quant does (scale = max(amax, 1e-4) / 448, rounded up to a power of two for
/// kPowerOfTwo; codes = e4m3(x / scale), saturating).
class IndexKeyFormat {
 public:
  IndexKeyFormat() = default;
  /// Throws mla::Error unless dim is even and in [2, 8192].
  explicit IndexKeyFormat(Index dim, ScaleFormat scales = ScaleFormat::kPowerOfTwo)
      : dim_(dim), scales_(scales) {
    detail::require(dim >= 2 && dim <= 8192 && dim % 2 == 0,
                    "IndexKeyFormat: the index key width must be even and in [2, 8192], got ", dim);
  }

  Index dim() const { return dim_; }
  ScaleFormat scales() const { return scales_; }
  /// Bytes per token: dim codes and one FP32 scale (132 at dim 128).
  std::size_t bytes_per_token() const { return static_cast<std::size_t>(dim_) + sizeof(float); }

  /// Quantises one key (dim floats) into its codes and scale.
  void encode(const float* key, unsigned char* codes, float* scale) const {
    quantize_e4m3_tiles(key, dim_, dim_, kActivationAmaxFloor, scales_,
                        reinterpret_cast<float8_e4m3fn*>(codes), scale);
  }
  /// The key's values float(code) * scale.
  void decode(const unsigned char* codes, float scale, float* key) const {
    from_fp8(reinterpret_cast<const float8_e4m3fn*>(codes), static_cast<std::size_t>(dim_), key,
             scale);
  }

 private:
  Index dim_ = 0;
  ScaleFormat scales_ = ScaleFormat::kPowerOfTwo;
};

/// One layer's paged index keys in memory the library does not own: block b starts at
/// data + b * stride(); its codes [block_tokens, dim] at codes_offset, its FP32 scales
/// [block_tokens] at scales_at(). A vLLM-style indexer cache [num_blocks, block_size * 132]
/// bytes is {format, data, num_blocks, block_size} with every other field left 0.
struct PagedIndexBuffer {
  IndexKeyFormat format;
  void* data = nullptr;
  Index num_blocks = 0;
  Index block_tokens = 0;
  /// Bytes from one block to the next; 0 means block_tokens * format.bytes_per_token().
  std::size_t block_stride = 0;
  /// Byte offset of a block's codes from the block's start.
  std::size_t codes_offset = 0;
  /// Byte offset of a block's scales from the block's start; 0 means right after the codes.
  std::size_t scales_offset = 0;

  std::size_t stride() const {
    return block_stride ? block_stride
                        : static_cast<std::size_t>(block_tokens) * format.bytes_per_token();
  }
  std::size_t scales_at() const {
    return scales_offset ? scales_offset
                         : codes_offset + static_cast<std::size_t>(block_tokens * format.dim());
  }
  /// Throws mla::Error naming what is wrong: no data, non-positive sizes, codes or scales
  /// outside a block or overlapping, scales or stride not aligned to 4 bytes.
  void validate() const {
    detail::require(format.dim() > 0, "PagedIndexBuffer: the index key format is empty");
    detail::require(data != nullptr, "PagedIndexBuffer: data is null");
    detail::require(num_blocks > 0 && num_blocks <= std::numeric_limits<std::int32_t>::max() &&
                        block_tokens > 0 && block_tokens <= (Index{1} << 20),
                    "PagedIndexBuffer: num_blocks must be in [1, 2^31) and block_tokens in "
                    "[1, 2^20], got ",
                    num_blocks, " and ", block_tokens);
    const auto codes = static_cast<std::size_t>(block_tokens * format.dim());
    const auto scales = sizeof(float) * static_cast<std::size_t>(block_tokens);
    const std::size_t s = scales_at();
    detail::require(codes_offset + codes <= stride() && s + scales <= stride() &&
                        (s >= codes_offset + codes || s + scales <= codes_offset),
                    "PagedIndexBuffer: codes [", codes_offset, ", ", codes_offset + codes,
                    ") and scales [", s, ", ", s + scales, ") must lie apart within a block of ",
                    stride(), " bytes");
    detail::require(reinterpret_cast<std::uintptr_t>(data) % sizeof(float) == 0 &&
                        stride() % sizeof(float) == 0 && s % sizeof(float) == 0,
                    "PagedIndexBuffer: data, block_stride and the scales must be aligned to 4 "
                    "bytes");
  }
  unsigned char* block(Index b) const {
    return static_cast<unsigned char*>(data) + static_cast<std::size_t>(b) * stride();
  }
  /// Writes one key (dim floats) into slot `slot` of block `b`: its codes and its scale.
  void encode(Index b, Index slot, const float* key) const {
    unsigned char* p = block(b);
    format.encode(key, p + codes_offset + static_cast<std::size_t>(slot * format.dim()),
                  reinterpret_cast<float*>(p + scales_at()) + slot);
  }
};

/// One sequence's index keys of one layer, as the indexer reads them: the buffer, the block
/// table and the length. Non-owning, valid as LatentView is.
class IndexKeyView {
 public:
  IndexKeyView() = default;

  /// Token t is slot t % block_tokens of block block_table[t / block_tokens]. Throws mla::Error
  /// for an invalid buffer, a negative length, a null table or an entry outside the buffer.
  IndexKeyView(const PagedIndexBuffer& buffer, const std::int32_t* block_table, Index tokens)
      : buffer_(buffer), table_(block_table), tokens_(tokens) {
    buffer.validate();
    detail::require(tokens >= 0, "IndexKeyView: negative length ", tokens);
    const Index used = (tokens + buffer.block_tokens - 1) / buffer.block_tokens;
    detail::require(used == 0 || block_table != nullptr, "IndexKeyView: the block table is null");
    for (Index b = 0; b < used; ++b) {
      detail::require(block_table[b] >= 0 && block_table[b] < buffer.num_blocks,
                      "IndexKeyView: block table entry ", b, " is ", block_table[b],
                      ", outside the buffer's [0, ", buffer.num_blocks, ") blocks");
    }
  }

  Index tokens() const { return tokens_; }
  Index dim() const { return buffer_.format.dim(); }
  Index block_tokens() const { return buffer_.block_tokens; }
  const IndexKeyFormat& format() const { return buffer_.format; }
  /// Codes [block_tokens, dim] of the sequence's b-th block.
  const unsigned char* codes(Index b) const {
    MLA_ASSERT(b >= 0 && b * block_tokens() < tokens_);
    return buffer_.block(table_[b]) + buffer_.codes_offset;
  }
  /// Scales [block_tokens] of the sequence's b-th block.
  const float* scales(Index b) const {
    MLA_ASSERT(b >= 0 && b * block_tokens() < tokens_);
    return reinterpret_cast<const float*>(buffer_.block(table_[b]) + buffer_.scales_at());
  }
  /// Token t's key values (dim floats).
  void decode(Index t, float* key) const {
    detail::require(t >= 0 && t < tokens_, "IndexKeyView::decode: token ", t, " out of [0, ",
                    tokens_, ")");
    const Index b = t / block_tokens(), i = t % block_tokens();
    format().decode(codes(b) + i * dim(), scales(b)[i], key);
  }

 private:
  PagedIndexBuffer buffer_;
  const std::int32_t* table_ = nullptr;
  Index tokens_ = 0;
};

}  // namespace mla
