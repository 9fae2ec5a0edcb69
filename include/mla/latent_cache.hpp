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
#include "mla/detail/isa/dispatch.hpp"
#include "mla/detail/latent_blocks.hpp"
#include "mla/detail/record_layout.hpp"
#include "mla/error.hpp"
#include "mla/fp8.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla {

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

/// The record codec: encodes one token, c [d_c] and k [R] of T, into its record. Quantisation
/// (FP8) and rounding (BF16) happen here, once.
template <class T>
void write_record(const LatentLayout& l, const T* c, const T* k, unsigned char* rec,
                  float* scratch) {
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  const auto store_as = [&](auto zero) {
    using S = decltype(zero);
    S* out = reinterpret_cast<S*>(rec);  // records of S are aligned for S (pool is 64-aligned)
    const auto narrow = [](T x) {
      if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
        return to_bfloat16(x);
      } else {
        return static_cast<S>(x);
      }
    };
    for (Index i = 0; i < D; ++i) out[i] = narrow(c[i]);
    for (Index i = 0; i < R; ++i) out[D + i] = narrow(k[i]);
  };
  switch (l.storage) {
    case CacheStorage::kFloat32:
      store_as(float{});
      break;
    case CacheStorage::kFloat64:
      store_as(double{});
      break;
    case CacheStorage::kBFloat16:
      store_as(Eigen::bfloat16{});
      break;
    case CacheStorage::kFp8E4M3: {
      // The latent is quantised from its float value, in 128-value tiles.
      const float* cf = nullptr;
      if constexpr (std::is_same_v<T, float>) {
        cf = c;
      } else {
        for (Index i = 0; i < D; ++i) scratch[i] = static_cast<float>(c[i]);
        cf = scratch;
      }
      float scales[64];  // one per tile; d_c <= 8192 is checked at construction
      quantize_e4m3_tiles(cf, D, LatentLayout::kFp8Tile, 0.0f, l.fp8_scales,
                          reinterpret_cast<float8_e4m3fn*>(rec), scales);
      std::memcpy(rec + l.scales_offset, scales,
                  sizeof(float) * static_cast<std::size_t>(LatentLayout::fp8_tiles(D)));
      // k^R stays BF16: RoPE phases do not survive 3 mantissa bits.
      for (Index i = 0; i < R; ++i) {
        const Eigen::bfloat16 b = to_bfloat16(k[i]);
        std::memcpy(rec + l.kpe_offset + sizeof(b) * static_cast<std::size_t>(i), &b, sizeof(b));
      }
      break;
    }
  }
}

/// The record codec: decodes one token's record into c [d_c] and k [R] of T (exact for float
/// and double: every storage format widens to float without rounding). `scratch` holds d_c
/// floats (used when T is not float).
template <class T>
void read_record(const LatentLayout& l, const unsigned char* rec, T* c, T* k, float* scratch) {
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  const auto widen = [&](const float* src, Index n, T* dst) {
    for (Index i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
  };
  switch (l.storage) {
    case CacheStorage::kFloat32:
    case CacheStorage::kFloat64: {
      const auto load_as = [&](auto zero) {
        using S = decltype(zero);
        const S* in = reinterpret_cast<const S*>(rec);
        for (Index i = 0; i < D; ++i) c[i] = static_cast<T>(in[i]);
        for (Index i = 0; i < R; ++i) k[i] = static_cast<T>(in[D + i]);
      };
      l.storage == CacheStorage::kFloat32 ? load_as(float{}) : load_as(double{});
      break;
    }
    case CacheStorage::kBFloat16:
    case CacheStorage::kFp8E4M3: {
      // The latent: BF16 values, or FP8 codes times their tile's scale.
      float* cf = std::is_same_v<T, float> ? reinterpret_cast<float*>(c) : scratch;
      if (l.storage == CacheStorage::kBFloat16) {
        bfloat16_to_float(rec, static_cast<std::size_t>(D), cf);
      } else {
        float scales[64];
        std::memcpy(scales, rec + l.scales_offset,
                    sizeof(float) * static_cast<std::size_t>(LatentLayout::fp8_tiles(D)));
        dequantize_e4m3_tiles(reinterpret_cast<const float8_e4m3fn*>(rec), scales, D,
                              LatentLayout::kFp8Tile, cf);
      }
      if constexpr (!std::is_same_v<T, float>) widen(cf, D, c);
      // k^R: BF16 in both formats.
      if constexpr (std::is_same_v<T, float>) {
        bfloat16_to_float(rec + l.kpe_offset, static_cast<std::size_t>(R), k);
      } else {
        for (Index i = 0; i < R; ++i) {
          k[i] = static_cast<T>(
              bfloat16_bits_to_float(rec + l.kpe_offset + 2 * static_cast<std::size_t>(i)));
        }
      }
      break;
    }
  }
}

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
  Index tokens() const { return b_.tokens; }
  Index block_tokens() const { return b_.block_tokens; }
  CacheStorage storage() const { return b_.layout.storage; }
  /// Where each part of a record lies (for kernels that widen records themselves).
  const detail::LatentLayout& layout() const { return b_.layout; }
  Index kv_lora_rank() const { return b_.layout.kv_lora_rank; }
  Index rope_dim() const { return b_.layout.rope_dim; }
  /// Bytes from one token's record to the next.
  std::size_t token_bytes() const { return b_.layout.token_bytes; }

  /// Start of the records of the b-th block of the sequence (b < ceil(tokens / block_tokens)).
  const unsigned char* block(Index b) const { return b_.block(b); }
  /// The record of one token.
  const unsigned char* record(Index token) const { return b_.record(token); }
  /// Where the records are (for the kernels).
  const detail::LatentBlocks& blocks() const { return b_; }

  /// The tokens [first, first + count) as a view of their own, for splitting attention over key
  /// ranges (each part's result merges by its log-sum-exp). `first` must start a block.
  LatentView subview(Index first, Index count) const {
    detail::require(
        first >= 0 && count >= 0 && first + count <= b_.tokens && first % b_.block_tokens == 0,
        "LatentView::subview: tokens [", first, ", ", first + count, ") must lie in [0, ",
        b_.tokens, ") and start a block of ", b_.block_tokens);
    LatentView v = *this;
    v.b_.block_table += first / b_.block_tokens;
    v.b_.tokens = count;
    return v;
  }

  /// True when the records hold T itself (FP32 records for float), so [c ; k^R] of a token is
  /// d_c + R contiguous T at record(token).
  template <class T>
  bool holds() const {
    return b_.layout.holds<T>();
  }

  /// Decodes one token's record into out[0, d_c + R) as float: c, then k^R (exact for FP32,
  /// BF16 and FP8 records). `scratch` holds d_c floats (unused for float output of FP8).
  void decode(Index token, float* out, float* scratch) const {
    detail::read_record(b_.layout, record(token), out, out + b_.layout.kv_lora_rank, scratch);
  }

  /// Calls f(first, n, c, k_pe) for consecutive tiles of at most `max_tile` tokens, in order,
  /// none crossing a block: c is [n, d_c] and k_pe [n, R] of T. When the storage holds T they
  /// point into the cache (read in place); otherwise each tile is converted into the scratch
  /// matrices ([max_tile, d_c], [max_tile, R], and `scratch` of d_c floats), tile by tile.
  template <class T, class F>
  void for_each_tile(Index max_tile, RowMatrix<T>& c_buf, RowMatrix<T>& k_buf, float* scratch,
                     F&& f) const {
    MLA_ASSERT(max_tile > 0 && c_buf.rows() >= max_tile && k_buf.rows() >= max_tile);
    const Index D = b_.layout.kv_lora_rank, R = b_.layout.rope_dim;
    for (Index first = 0; first < b_.tokens;) {
      const Index in_block = first % b_.block_tokens;
      const Index n = std::min({max_tile, b_.block_tokens - in_block, b_.tokens - first});
      const unsigned char* rec = record(first);
      if (b_.layout.holds<T>()) {
        const auto* p = reinterpret_cast<const T*>(rec);
        const Eigen::OuterStride<> stride(static_cast<Index>(b_.layout.token_bytes / sizeof(T)));
        f(first, n, Tile<T>(p, n, D, stride), Tile<T>(p + D, n, R, stride));
      } else {
        for (Index i = 0; i < n; ++i) {
          detail::read_record(b_.layout, rec + static_cast<std::size_t>(i) * b_.layout.token_bytes,
                              c_buf.row(i).data(), k_buf.row(i).data(), scratch);
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
    detail::require(first >= 0 && count >= 0 && first + count <= b_.tokens,
                    "LatentView::read: tokens [", first, ", ", first + count, ") out of [0, ",
                    b_.tokens, ")");
    detail::require(c_kv.rows() >= count && c_kv.cols() == b_.layout.kv_lora_rank &&
                        k_pe.rows() >= count && k_pe.cols() == b_.layout.rope_dim,
                    "LatentView::read: outputs must be [", count, ", ", b_.layout.kv_lora_rank,
                    "] and [", count, ", ", b_.layout.rope_dim, "]");
    std::vector<float> scratch(static_cast<std::size_t>(b_.layout.kv_lora_rank));
    for (Index i = 0; i < count; ++i) {
      detail::read_record(b_.layout, record(first + i), c_kv.row(i).data(), k_pe.row(i).data(),
                          scratch.data());
    }
  }

 private:
  friend class LatentCache;
  detail::LatentBlocks b_;
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
      detail::write_record(layout_, c_kv.row(i).data(), k_pe.row(i).data(), rec, scratch_.data());
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
    v.b_.layer_base = pool_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
    v.b_.block_table = s.blocks.data();
    v.b_.block_bytes = block_bytes_;
    v.b_.tokens = s.lengths[static_cast<std::size_t>(layer)];
    v.b_.block_tokens = options_.block_tokens;
    v.b_.layout = layout_;
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
