#pragma once
/// \file
/// The latent KV cache: per token and layer only c^KV (d_c values) and k^R (R values), nothing
/// per head. Memory is paged: fixed-size blocks of tokens come from a pool whose size is set at
/// construction, and every sequence has a block table. Sequences are added and removed at
/// will; appends are atomic. Storage is FP32, BF16, FP8 (FlashMLA's layout) or FP64.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mla/config.hpp"
#include "mla/detail/bfloat16.hpp"
#include "mla/error.hpp"
#include "mla/fp8.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla {

/// Element format of the cached latent and rotary key. Bytes per token and layer at DeepSeek
/// sizes (d_c 512, R 64) in brackets.
enum class CacheStorage : std::uint8_t {
  kFloat32,   ///< (d_c + R) * 4 bytes   [2304]
  kBFloat16,  ///< (d_c + R) * 2 bytes   [1152]
  /// FlashMLA's "fp8 with scale" record: d_c e4m3 latent bytes at offset 0, then one FP32 scale
  /// per 128 latent values (tile amax / 448) at offset d_c, then k^R in BF16 (never quantised:
  /// RoPE phases do not survive 3 mantissa bits) at offset d_c + 4 * ceil(d_c / 128).  [656]
  kFp8E4M3,
  kFloat64,  ///< (d_c + R) * 8 bytes, for verification against double references  [4608]
};

/// Printable name of a storage choice.
inline const char* to_string(CacheStorage s) {
  switch (s) {
    case CacheStorage::kFloat32:
      return "fp32";
    case CacheStorage::kBFloat16:
      return "bf16";
    case CacheStorage::kFp8E4M3:
      return "fp8";
    case CacheStorage::kFloat64:
      return "fp64";
  }
  return "unknown";
}

/// Construction parameters of a LatentCache.
struct LatentCacheOptions {
  Index num_layers = 1;     ///< layers of the model that share the cache
  Index block_tokens = 64;  ///< tokens per block
  Index num_blocks = 0;     ///< blocks in the pool (its fixed capacity); must be > 0
  CacheStorage storage = CacheStorage::kFloat32;
  /// FP8 only: round the per-tile scales up to powers of two (DeepSeek-V3.1's ue8m0).
  ScaleFormat fp8_scales = ScaleFormat::kFloat32;
};

/// Identifies a sequence of a LatentCache. Never reused by the same cache.
using SequenceId = std::int64_t;

namespace detail {

/// Where each part of one token's record lives, and how to convert it.
struct LatentLayout {
  /// Latent values per FP8 scale (FlashMLA's tile).
  static constexpr Index kFp8Tile = 128;

  CacheStorage storage = CacheStorage::kFloat32;
  ScaleFormat fp8_scales = ScaleFormat::kFloat32;
  Index kv_lora_rank = 0;  // d_c
  Index rope_dim = 0;      // R
  std::size_t token_bytes = 0;
  std::size_t scales_offset = 0;  // FP8 only
  std::size_t kpe_offset = 0;     // byte offset of k^R in the record

  static LatentLayout make(Index d_c, Index r, CacheStorage storage, ScaleFormat fp8_scales) {
    LatentLayout l;
    l.storage = storage;
    l.fp8_scales = fp8_scales;
    l.kv_lora_rank = d_c;
    l.rope_dim = r;
    const auto dc = static_cast<std::size_t>(d_c), rr = static_cast<std::size_t>(r);
    switch (storage) {
      case CacheStorage::kFp8E4M3:
        l.scales_offset = dc;
        l.kpe_offset = dc + sizeof(float) * static_cast<std::size_t>(fp8_tiles(d_c));
        l.token_bytes = l.kpe_offset + sizeof(Eigen::bfloat16) * rr;
        break;
      default: {
        const std::size_t e = element_bytes(storage);
        l.kpe_offset = dc * e;
        l.token_bytes = (dc + rr) * e;
      }
    }
    return l;
  }

  static Index fp8_tiles(Index d_c) { return (d_c + kFp8Tile - 1) / kFp8Tile; }

  static std::size_t element_bytes(CacheStorage s) {
    switch (s) {
      case CacheStorage::kFloat64:
        return 8;
      case CacheStorage::kBFloat16:
        return 2;
      case CacheStorage::kFp8E4M3:
        return 1;
      case CacheStorage::kFloat32:
        break;
    }
    return 4;
  }

  /// True when records hold T itself, so kernels can read them in place.
  template <class T>
  bool holds() const {
    return (std::is_same_v<T, float> && storage == CacheStorage::kFloat32) ||
           (std::is_same_v<T, double> && storage == CacheStorage::kFloat64);
  }

  /// Encodes one token: c [d_c] and k [R] of T into the record. Quantisation happens here.
  template <class T>
  void write(const T* c, const T* k, unsigned char* rec, float* scratch) const {
    const Index D = kv_lora_rank, R = rope_dim;
    switch (storage) {
      case CacheStorage::kFloat32:
        store_as<float>(c, k, rec);
        break;
      case CacheStorage::kFloat64:
        store_as<double>(c, k, rec);
        break;
      case CacheStorage::kBFloat16:
        store_as<Eigen::bfloat16>(c, k, rec);
        break;
      case CacheStorage::kFp8E4M3: {
        // The latent is quantised from its float value, in 128-value tiles.
        const float* cf = as_float(c, D, scratch);
        float scales[64];  // one per tile; d_c <= 8192 is checked at construction
        quantize_e4m3_tiles(cf, D, kFp8Tile, 0.0f, fp8_scales,
                            reinterpret_cast<float8_e4m3fn*>(rec), scales);
        std::memcpy(rec + scales_offset, scales,
                    sizeof(float) * static_cast<std::size_t>(fp8_tiles(D)));
        for (Index i = 0; i < R; ++i) {
          const Eigen::bfloat16 b = to_bfloat16(k[i]);
          std::memcpy(rec + kpe_offset + sizeof(b) * static_cast<std::size_t>(i), &b, sizeof(b));
        }
        break;
      }
    }
  }

  /// Decodes one token's record into c [d_c] and k [R] of T (exact: every storage format widens
  /// to float without rounding).
  template <class T>
  void read(const unsigned char* rec, T* c, T* k, float* scratch) const {
    const Index D = kv_lora_rank, R = rope_dim;
    switch (storage) {
      case CacheStorage::kFloat32:
        load_as<float>(rec, c, k);
        break;
      case CacheStorage::kFloat64:
        load_as<double>(rec, c, k);
        break;
      case CacheStorage::kBFloat16:
        if constexpr (std::is_same_v<T, float>) {
          bfloat16_to_float(rec, static_cast<std::size_t>(D), c);
          bfloat16_to_float(rec + kpe_offset, static_cast<std::size_t>(R), k);
        } else {
          load_as<Eigen::bfloat16>(rec, c, k);
        }
        break;
      case CacheStorage::kFp8E4M3: {
        float scales[64];
        std::memcpy(scales, rec + scales_offset,
                    sizeof(float) * static_cast<std::size_t>(fp8_tiles(D)));
        const auto* q = reinterpret_cast<const float8_e4m3fn*>(rec);
        if constexpr (std::is_same_v<T, float>) {
          (void)scratch;
          dequantize_e4m3_tiles(q, scales, D, kFp8Tile, c);
        } else {
          dequantize_e4m3_tiles(q, scales, D, kFp8Tile, scratch);
          for (Index i = 0; i < D; ++i) c[i] = static_cast<T>(scratch[i]);
        }
        if constexpr (std::is_same_v<T, float>) {
          bfloat16_to_float(rec + kpe_offset, static_cast<std::size_t>(R), k);
        } else {
          for (Index i = 0; i < R; ++i) {
            Eigen::bfloat16 b;
            std::memcpy(&b, rec + kpe_offset + sizeof(b) * static_cast<std::size_t>(i), sizeof(b));
            k[i] = static_cast<T>(static_cast<float>(b));
          }
        }
        break;
      }
    }
  }

 private:
  template <class T>
  static const float* as_float(const T* x, Index n, float* scratch) {
    if constexpr (std::is_same_v<T, float>) {
      (void)n;
      (void)scratch;
      return x;
    } else {
      for (Index i = 0; i < n; ++i) scratch[i] = static_cast<float>(x[i]);
      return scratch;
    }
  }

  template <class S, class T>
  static S narrow(T x) {
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      return to_bfloat16(x);
    } else {
      return static_cast<S>(x);
    }
  }

  template <class S, class T>
  void store_as(const T* c, const T* k, unsigned char* rec) const {
    S* out = reinterpret_cast<S*>(rec);  // records of S are aligned for S (pool is 64-aligned)
    for (Index i = 0; i < kv_lora_rank; ++i) out[i] = narrow<S>(c[i]);
    for (Index i = 0; i < rope_dim; ++i) out[kv_lora_rank + i] = narrow<S>(k[i]);
  }

  template <class T, class S>
  static T widen(S x) {
    if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
      return static_cast<T>(static_cast<float>(x));  // exact
    } else {
      return static_cast<T>(x);
    }
  }

  template <class S, class T>
  void load_as(const unsigned char* rec, T* c, T* k) const {
    const S* in = reinterpret_cast<const S*>(rec);
    for (Index i = 0; i < kv_lora_rank; ++i) c[i] = widen<T>(in[i]);
    for (Index i = 0; i < rope_dim; ++i) k[i] = widen<T>(in[kv_lora_rank + i]);
  }
};

/// 64-byte aligned, uninitialised byte buffer. Buffers of 2 MiB or more are aligned to 2 MiB
/// and, on Linux, offered to the kernel for transparent huge pages: a decode step streams the
/// whole cache, and with 4 KiB pages every other token's record needs a page walk.
struct AlignedFree {
  std::align_val_t align{64};
  void operator()(unsigned char* p) const { ::operator delete(p, align); }
};
struct AlignedBytes {
  static constexpr std::size_t kHugePage = std::size_t{2} << 20;
  using Free = AlignedFree;
  std::unique_ptr<unsigned char[], Free> data;
  std::size_t size = 0;

  static AlignedBytes allocate(std::size_t bytes) {
    AlignedBytes b;
    const std::align_val_t align{bytes >= kHugePage ? kHugePage : 64};
    b.data = std::unique_ptr<unsigned char[], Free>(
        static_cast<unsigned char*>(::operator new(bytes == 0 ? 1 : bytes, align)), Free{align});
    b.size = bytes;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (bytes >= kHugePage) {
      // Advice only: where huge pages are unavailable the buffer works the same.
      (void)::madvise(b.data.get(), bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
    }
#endif
    return b;
  }
};

}  // namespace detail

/// One sequence's cached tokens for one layer, as the attention kernels read them. Valid until
/// that sequence is appended to or removed, or the cache is destroyed.
class LatentView {
 public:
  /// A tile of keys as T: rows are tokens.
  template <class T>
  using Tile = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

  /// Tokens cached for this layer.
  Index tokens() const { return tokens_; }
  Index block_tokens() const { return block_tokens_; }
  CacheStorage storage() const { return layout_.storage; }
  /// Where each part of a record lies (for kernels that widen records themselves).
  const detail::LatentLayout& layout() const { return layout_; }
  Index kv_lora_rank() const { return layout_.kv_lora_rank; }
  Index rope_dim() const { return layout_.rope_dim; }
  /// Bytes from one token's record to the next.
  std::size_t token_bytes() const { return layout_.token_bytes; }

  /// Start of the records of the b-th block of the sequence (b < ceil(tokens / block_tokens)).
  const unsigned char* block(Index b) const {
    MLA_ASSERT(b >= 0 && b * block_tokens_ < tokens_);
    return layer_base_ + static_cast<std::size_t>(block_table_[b]) * block_bytes_;
  }
  /// The record of one token.
  const unsigned char* record(Index token) const {
    return block(token / block_tokens_) +
           static_cast<std::size_t>(token % block_tokens_) * layout_.token_bytes;
  }

  /// The tokens [first, first + count) as a view of their own, for splitting attention over key
  /// ranges (each part's result merges by its log-sum-exp). `first` must start a block.
  LatentView subview(Index first, Index count) const {
    detail::require(
        first >= 0 && count >= 0 && first + count <= tokens_ && first % block_tokens_ == 0,
        "LatentView::subview: tokens [", first, ", ", first + count, ") must lie in [0, ", tokens_,
        ") and start a block of ", block_tokens_);
    LatentView v = *this;
    v.block_table_ += first / block_tokens_;
    v.tokens_ = count;
    return v;
  }

  /// True when the records hold T itself (FP32 records for float), so [c ; k^R] of a token is
  /// d_c + R contiguous T at record(token).
  template <class T>
  bool holds() const {
    return layout_.holds<T>();
  }

  /// Decodes one token's record into out[0, d_c + R) as float: c, then k^R (exact for FP32,
  /// BF16 and FP8 records). `scratch` holds d_c floats (unused for float output of FP8).
  void decode(Index token, float* out, float* scratch) const {
    layout_.read(record(token), out, out + layout_.kv_lora_rank, scratch);
  }

  /// Calls f(first, n, c, k_pe) for consecutive tiles of at most `max_tile` tokens, in order,
  /// none crossing a block: c is [n, d_c] and k_pe [n, R] of T. When the storage holds T they
  /// point into the cache (read in place); otherwise each tile is converted into the scratch
  /// matrices ([max_tile, d_c], [max_tile, R], and `scratch` of d_c floats), tile by tile.
  template <class T, class F>
  void for_each_tile(Index max_tile, RowMatrix<T>& c_buf, RowMatrix<T>& k_buf, float* scratch,
                     F&& f) const {
    MLA_ASSERT(max_tile > 0 && c_buf.rows() >= max_tile && k_buf.rows() >= max_tile);
    const Index D = layout_.kv_lora_rank, R = layout_.rope_dim;
    for (Index first = 0; first < tokens_;) {
      const Index in_block = first % block_tokens_;
      const Index n = std::min({max_tile, block_tokens_ - in_block, tokens_ - first});
      const unsigned char* rec = record(first);
      if (layout_.holds<T>()) {
        const auto* p = reinterpret_cast<const T*>(rec);
        const Eigen::OuterStride<> stride(static_cast<Index>(layout_.token_bytes / sizeof(T)));
        f(first, n, Tile<T>(p, n, D, stride), Tile<T>(p + D, n, R, stride));
      } else {
        for (Index i = 0; i < n; ++i) {
          layout_.read(rec + static_cast<std::size_t>(i) * layout_.token_bytes, c_buf.row(i).data(),
                       k_buf.row(i).data(), scratch);
        }
        f(first, n, Tile<T>(c_buf.data(), n, D, Eigen::OuterStride<>(c_buf.cols())),
          Tile<T>(k_buf.data(), n, R, Eigen::OuterStride<>(k_buf.cols())));
      }
      first += n;
    }
  }

  /// Converts tokens [first, first + count) to T: c_kv [count, d_c] and k_pe [count, R]
  /// (dequantised for BF16 and FP8 storage). For inspection and tests; the kernels use
  /// for_each_tile.
  template <class T>
  void read(Index first, Index count, MatrixRef<detail::identity_t<T>> c_kv,
            MatrixRef<detail::identity_t<T>> k_pe) const {
    detail::require(first >= 0 && count >= 0 && first + count <= tokens_,
                    "LatentView::read: tokens [", first, ", ", first + count, ") out of [0, ",
                    tokens_, ")");
    detail::require(c_kv.rows() >= count && c_kv.cols() == layout_.kv_lora_rank &&
                        k_pe.rows() >= count && k_pe.cols() == layout_.rope_dim,
                    "LatentView::read: outputs must be [", count, ", ", layout_.kv_lora_rank,
                    "] and [", count, ", ", layout_.rope_dim, "]");
    std::vector<float> scratch(static_cast<std::size_t>(layout_.kv_lora_rank));
    for (Index i = 0; i < count; ++i) {
      layout_.read(record(first + i), c_kv.row(i).data(), k_pe.row(i).data(), scratch.data());
    }
  }

 private:
  friend class LatentCache;
  const unsigned char* layer_base_ = nullptr;
  const std::int32_t* block_table_ = nullptr;
  std::size_t block_bytes_ = 0;
  Index tokens_ = 0;
  Index block_tokens_ = 0;
  detail::LatentLayout layout_;
};

/// Paged latent KV cache for the layers of one model and any number of sequences.
///
/// Per token and layer it stores exactly d_c latent values and R rotary-key values, in the
/// chosen storage format. The pool holds `num_blocks` blocks of `block_tokens` tokens for every
/// layer; a block belongs to one sequence for all layers. Not copyable (it can be large): use
/// clone(). Not safe for concurrent mutation.
class LatentCache {
 public:
  /// Allocates the whole pool. Throws mla::Error for an invalid config or options.
  LatentCache(const MlaConfig& config, const LatentCacheOptions& options) : options_(options) {
    config.validate();
    detail::require(options.num_layers > 0 && options.num_layers <= (Index{1} << 16),
                    "LatentCacheOptions.num_layers must be in [1, 65536], got ",
                    options.num_layers);
    detail::require(options.block_tokens > 0 && options.block_tokens <= (Index{1} << 20),
                    "LatentCacheOptions.block_tokens must be in [1, 2^20], got ",
                    options.block_tokens);
    detail::require(
        options.num_blocks > 0 && options.num_blocks <= std::numeric_limits<std::int32_t>::max(),
        "LatentCacheOptions.num_blocks must be in [1, 2^31), got ", options.num_blocks);
    detail::require(options.storage != CacheStorage::kFp8E4M3 || config.kv_lora_rank <= 8192,
                    "LatentCache: FP8 storage supports kv_lora_rank up to 8192, got ",
                    config.kv_lora_rank);
    layout_ = detail::LatentLayout::make(config.kv_lora_rank, config.qk_rope_head_dim,
                                         options.storage, options.fp8_scales);
    block_bytes_ = layout_.token_bytes * static_cast<std::size_t>(options.block_tokens);
    // The pool size in double first, so that an absurd request fails with a clear message
    // instead of wrapping around.
    const double pool_bytes = static_cast<double>(block_bytes_) *
                              static_cast<double>(options.num_blocks) *
                              static_cast<double>(options.num_layers);
    detail::require(pool_bytes < 0x1p62, "LatentCache: a pool of ", pool_bytes,
                    " bytes is too large");
    layer_bytes_ = block_bytes_ * static_cast<std::size_t>(options.num_blocks);
    try {
      pool_ = detail::AlignedBytes::allocate(layer_bytes_ *
                                             static_cast<std::size_t>(options.num_layers));
    } catch (const std::bad_alloc&) {
      detail::fail("LatentCache: cannot allocate ", pool_bytes / (1 << 20), " MiB for ",
                   options.num_blocks, " blocks x ", options.num_layers, " layers");
    }
    scratch_.resize(static_cast<std::size_t>(config.kv_lora_rank));
    free_blocks_.reserve(static_cast<std::size_t>(options.num_blocks));
    // Hand out low block ids first.
    for (Index b = options.num_blocks - 1; b >= 0; --b) {
      free_blocks_.push_back(static_cast<std::int32_t>(b));
    }
  }

  LatentCache(LatentCache&&) noexcept = default;
  LatentCache& operator=(LatentCache&&) noexcept = default;
  LatentCache(const LatentCache&) = delete;
  LatentCache& operator=(const LatentCache&) = delete;

  /// A deep copy (pool, block tables, lengths). Sequence ids stay valid in the copy.
  LatentCache clone() const { return LatentCache(*this, CloneTag{}); }

  const LatentCacheOptions& options() const { return options_; }
  Index kv_lora_rank() const { return layout_.kv_lora_rank; }
  Index rope_dim() const { return layout_.rope_dim; }

  // ------------------------------------------------------------------------------------------
  // Accounting

  /// Bytes of one token's record in one layer for a config and storage: (d_c + R) * 4 for FP32,
  /// * 2 for BF16, d_c + 4 * ceil(d_c / 128) + 2 * R for FP8 (2304 / 1152 / 656 for DeepSeek).
  static std::size_t bytes_per_token_per_layer(const MlaConfig& config, CacheStorage storage) {
    return detail::LatentLayout::make(config.kv_lora_rank, config.qk_rope_head_dim, storage,
                                      ScaleFormat::kFloat32)
        .token_bytes;
  }
  /// Bytes of one token's record in one layer of this cache.
  std::size_t bytes_per_token_per_layer() const { return layout_.token_bytes; }
  /// Bytes of one token over all layers of this cache.
  std::size_t bytes_per_token() const {
    return layout_.token_bytes * static_cast<std::size_t>(options_.num_layers);
  }
  /// Tokens the pool can hold (per layer), all sequences together.
  Index capacity_tokens() const { return options_.num_blocks * options_.block_tokens; }
  /// Bytes of the pool: capacity_tokens() * bytes_per_token().
  std::size_t capacity_bytes() const { return pool_.size; }
  /// Blocks held by sequences.
  Index blocks_in_use() const { return options_.num_blocks - free_blocks(); }
  /// Blocks not held by any sequence.
  Index free_blocks() const { return static_cast<Index>(free_blocks_.size()); }
  /// Bytes of the blocks held by sequences (all layers): what is taken from the pool.
  std::size_t bytes_in_use() const {
    return block_bytes_ * static_cast<std::size_t>(blocks_in_use()) *
           static_cast<std::size_t>(options_.num_layers);
  }
  /// Bytes holding cached tokens (sum over sequences and layers of length * record bytes):
  /// bytes_in_use() minus the unfilled ends of the last blocks.
  std::size_t bytes_of_tokens() const {
    std::size_t total = 0;
    for (const auto& entry : sequences_) {
      for (Index len : entry.second.lengths)
        total += static_cast<std::size_t>(len) * layout_.token_bytes;
    }
    return total;
  }

  // ------------------------------------------------------------------------------------------
  // Sequences

  /// Adds an empty sequence and returns its id.
  SequenceId add_sequence() {
    Sequence s;
    s.blocks.reserve(static_cast<std::size_t>(options_.num_blocks));  // no allocation on append
    s.lengths.assign(static_cast<std::size_t>(options_.num_layers), 0);
    const SequenceId id = next_id_++;
    sequences_.emplace(id, std::move(s));
    return id;
  }

  /// Removes a sequence and returns its blocks to the pool. Throws for an unknown id.
  void remove_sequence(SequenceId id) {
    Sequence& s = find(id, "remove_sequence");
    free_blocks_.insert(free_blocks_.end(), s.blocks.begin(), s.blocks.end());
    sequences_.erase(id);
  }

  bool contains(SequenceId id) const { return sequences_.count(id) != 0; }
  Index num_sequences() const { return static_cast<Index>(sequences_.size()); }

  /// Tokens cached for a sequence in one layer. Throws for an unknown id or layer.
  Index length(SequenceId id, Index layer) const {
    const Sequence& s = find(id, "length");
    check_layer(layer, "length");
    return s.lengths[static_cast<std::size_t>(layer)];
  }

  /// Position of the sequence's first cached token (the same for every layer), or -1 while the
  /// sequence holds no token in any layer. Throws for an unknown id.
  std::int64_t first_position(SequenceId id) const {
    const Sequence& s = find(id, "first_position");
    return holds_tokens(s) ? s.first_position : -1;
  }

  /// The position the next token of (id, layer) must have: first_position + length(id, layer),
  /// or -1 (any position >= 0) while the sequence holds no token in any layer.
  std::int64_t next_position(SequenceId id, Index layer) const {
    const Sequence& s = find(id, "next_position");
    check_layer(layer, "next_position");
    return holds_tokens(s) ? s.first_position + s.lengths[static_cast<std::size_t>(layer)] : -1;
  }

  /// Throws mla::Error unless `pos` may be the position of the next token of (id, layer):
  /// positions of a sequence are contiguous, so pos must equal next_position(id, layer); the
  /// first token of a sequence that holds nothing may be at any position >= 0.
  void require_position(SequenceId id, Index layer, std::int64_t pos) const {
    const std::int64_t next = next_position(id, layer);
    detail::require(pos >= 0, "LatentCache: sequence ", id, " layer ", layer,
                    ": positions must be >= 0, got ", pos);
    if (next < 0 || pos == next) return;
    const Sequence& s = find(id, "append");
    detail::fail("LatentCache: sequence ", id, " layer ", layer, " holds ",
                 s.lengths[static_cast<std::size_t>(layer)], " tokens from position ",
                 s.first_position, ", so its next token is at position ", next, ", got ", pos,
                 " (positions of a sequence are contiguous)");
  }

  /// Throws mla::Error unless `count` more tokens fit for (id, layer), counting free blocks.
  void require_room(SequenceId id, Index layer, Index count) const {
    require_room(&id, 1, layer, count);
  }

  /// Throws mla::Error unless `count` more tokens fit for each of the `n` distinct sequences
  /// `ids` in `layer` at the same time.
  void require_room(const SequenceId* ids, Index n, Index layer, Index count) const {
    check_layer(layer, "append");
    detail::require(count >= 0, "LatentCache::append: negative token count ", count);
    Index needed = 0;
    for (Index i = 0; i < n; ++i) {
      for (Index j = 0; j < i; ++j) {
        detail::require(ids[i] != ids[j], "LatentCache::append: sequence ", ids[i],
                        " appears twice in one batch");
      }
      needed += blocks_needed(find(ids[i], "append"), layer, count);
    }
    if (needed <= free_blocks()) return;
    if (n == 1) {
      detail::fail("LatentCache::append: sequence ", ids[0], " layer ", layer, " needs ", needed,
                   " more blocks of ", options_.block_tokens, " tokens for ", count,
                   " tokens, but only ", free_blocks(), " of the pool's ", options_.num_blocks,
                   " blocks are free");
    }
    detail::fail("LatentCache::append: ", n, " sequences, layer ", layer, ", need ", needed,
                 " more blocks of ", options_.block_tokens, " tokens for ", count,
                 " tokens each, but only ", free_blocks(), " of the pool's ", options_.num_blocks,
                 " blocks are free");
  }

  /// Appends tokens to (id, layer) at positions start_pos, start_pos + 1, ...: c_kv [n, d_c]
  /// and k_pe [n, R] (RoPE applied at those positions), converted to the storage format once,
  /// here. start_pos must continue the sequence (see require_position). Atomic: when the pool
  /// cannot hold the tokens, the position does not follow, or an argument is wrong, it throws
  /// mla::Error and leaves every sequence as it was.
  template <class T>
  void append(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
              ConstMatrixRef<detail::identity_t<T>> k_pe, std::int64_t start_pos) {
    detail::require(
        c_kv.cols() == kv_lora_rank() && k_pe.cols() == rope_dim() && c_kv.rows() == k_pe.rows(),
        "LatentCache::append: c_kv is [", c_kv.rows(), ", ", c_kv.cols(), "] and k_pe is [",
        k_pe.rows(), ", ", k_pe.cols(), "]; expected [n, ", kv_lora_rank(), "] and [n, ",
        rope_dim(), "]");
    const Index count = c_kv.rows();
    require_room(id, layer, count);
    require_position(id, layer, start_pos);
    // Everything that can fail has been checked; from here on nothing throws.
    Sequence& s = find(id, "append");
    if (count > 0 && !holds_tokens(s)) s.first_position = start_pos;
    const Index needed = blocks_needed(s, layer, count);
    for (Index b = 0; b < needed; ++b) {
      s.blocks.push_back(free_blocks_.back());  // capacity reserved: no allocation
      free_blocks_.pop_back();
    }
    Index& cached = s.lengths[static_cast<std::size_t>(layer)];
    unsigned char* base = pool_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
    for (Index i = 0; i < count; ++i) {
      const Index token = cached + i;
      unsigned char* rec =
          base +
          static_cast<std::size_t>(
              s.blocks[static_cast<std::size_t>(token / options_.block_tokens)]) *
              block_bytes_ +
          static_cast<std::size_t>(token % options_.block_tokens) * layout_.token_bytes;
      layout_.write(c_kv.row(i).data(), k_pe.row(i).data(), rec, scratch_.data());
    }
    cached += count;
  }

  /// Appends tokens at the sequence's next position (position 0 for a sequence that holds
  /// nothing); otherwise as the append above.
  template <class T>
  void append(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
              ConstMatrixRef<detail::identity_t<T>> k_pe) {
    append<T>(id, layer, c_kv, k_pe, std::max<std::int64_t>(0, next_position(id, layer)));
  }

  /// The cached tokens of (id, layer) for reading. Throws for an unknown id or layer.
  LatentView view(SequenceId id, Index layer) const {
    const Sequence& s = find(id, "view");
    check_layer(layer, "view");
    LatentView v;
    v.layer_base_ = pool_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
    v.block_table_ = s.blocks.data();
    v.block_bytes_ = block_bytes_;
    v.tokens_ = s.lengths[static_cast<std::size_t>(layer)];
    v.block_tokens_ = options_.block_tokens;
    v.layout_ = layout_;
    return v;
  }

 private:
  struct Sequence {
    std::vector<std::int32_t> blocks;  // block table, shared by all layers
    std::vector<Index> lengths;        // tokens cached per layer
    std::int64_t first_position = 0;   // position of token 0 (meaningful while holds_tokens)
  };

  static bool holds_tokens(const Sequence& s) {
    return std::any_of(s.lengths.begin(), s.lengths.end(), [](Index n) { return n > 0; });
  }
  struct CloneTag {};

  LatentCache(const LatentCache& other, CloneTag)
      : options_(other.options_),
        layout_(other.layout_),
        block_bytes_(other.block_bytes_),
        layer_bytes_(other.layer_bytes_),
        pool_(detail::AlignedBytes::allocate(other.pool_.size)),
        free_blocks_(other.free_blocks_),
        sequences_(other.sequences_),
        scratch_(other.scratch_),
        next_id_(other.next_id_) {
    std::memcpy(pool_.data.get(), other.pool_.data.get(), pool_.size);
    free_blocks_.reserve(static_cast<std::size_t>(options_.num_blocks));
    for (auto& entry : sequences_) {
      entry.second.blocks.reserve(static_cast<std::size_t>(options_.num_blocks));
    }
  }

  Index blocks_needed(const Sequence& s, Index layer, Index count) const {
    const Index total = s.lengths[static_cast<std::size_t>(layer)] + count;
    const Index blocks = (total + options_.block_tokens - 1) / options_.block_tokens;
    return std::max<Index>(0, blocks - static_cast<Index>(s.blocks.size()));
  }

  const Sequence& find(SequenceId id, const char* what) const {
    const auto it = sequences_.find(id);
    detail::require(it != sequences_.end(), "LatentCache::", what, ": unknown sequence id ", id);
    return it->second;
  }
  Sequence& find(SequenceId id, const char* what) {
    return const_cast<Sequence&>(static_cast<const LatentCache&>(*this).find(id, what));
  }
  void check_layer(Index layer, const char* what) const {
    detail::require(layer >= 0 && layer < options_.num_layers, "LatentCache::", what, ": layer ",
                    layer, " out of range [0, ", options_.num_layers, ")");
  }

  LatentCacheOptions options_;
  detail::LatentLayout layout_;
  std::size_t block_bytes_ = 0;
  std::size_t layer_bytes_ = 0;
  detail::AlignedBytes pool_;
  std::vector<std::int32_t> free_blocks_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  std::vector<float> scratch_;  // d_c floats for converting a token on append
  SequenceId next_id_ = 0;
};

}  // namespace mla
