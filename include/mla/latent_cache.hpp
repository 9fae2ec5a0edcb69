#pragma once
/// \file
/// The latent KV cache: per token and layer only c^KV (d_c values) and k^R (R values), nothing
/// per head. Memory is paged: fixed-size blocks of tokens come from a pool whose size is set at
/// construction, and every sequence has a block table. Sequences are added and removed at
/// will; appends are atomic.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <unordered_map>
#include <vector>

#include "mla/config.hpp"
#include "mla/error.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// Element type of the cached latent and rotary key.
enum class CacheStorage : std::uint8_t {
  kFloat32,  ///< 4 bytes per number: (d_c + R) * 4 bytes per token and layer
  kFloat64,  ///< 8 bytes per number; for verification against double references
};

/// Printable name of a storage choice.
inline const char* to_string(CacheStorage s) {
  switch (s) {
    case CacheStorage::kFloat32:
      return "fp32";
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
};

/// Identifies a sequence of a LatentCache. Never reused by the same cache.
using SequenceId = std::int64_t;

namespace detail {

template <class S>
struct StorageTag {
  using type = S;
};

/// Calls f(StorageTag<S>{}) with the storage element type S of `s` (dispatch once per call).
template <class F>
decltype(auto) visit_storage(CacheStorage s, F&& f) {
  switch (s) {
    case CacheStorage::kFloat64:
      return f(StorageTag<double>{});
    case CacheStorage::kFloat32:
      break;
  }
  return f(StorageTag<float>{});
}

inline std::size_t storage_element_bytes(CacheStorage s) {
  return visit_storage(s, [](auto tag) { return sizeof(typename decltype(tag)::type); });
}

/// 64-byte aligned, uninitialised byte buffer.
struct AlignedBytes {
  static constexpr std::align_val_t kAlign{64};
  struct Free {
    void operator()(unsigned char* p) const { ::operator delete(p, kAlign); }
  };
  std::unique_ptr<unsigned char[], Free> data;
  std::size_t size = 0;

  static AlignedBytes allocate(std::size_t bytes) {
    AlignedBytes b;
    b.data.reset(static_cast<unsigned char*>(::operator new(bytes == 0 ? 1 : bytes, kAlign)));
    b.size = bytes;
    return b;
  }
};

}  // namespace detail

/// One sequence's cached tokens for one layer, as the attention kernels read them: records of
/// [c^KV (d_c) | k^R (R)] per token, in blocks. Valid until that sequence is appended to or
/// removed, or the cache is destroyed.
class LatentView {
 public:
  /// Tokens cached for this layer.
  Index tokens() const { return tokens_; }
  Index block_tokens() const { return block_tokens_; }
  CacheStorage storage() const { return storage_; }
  Index kv_lora_rank() const { return kv_lora_rank_; }
  Index rope_dim() const { return rope_dim_; }
  /// Bytes from one token's record to the next.
  std::size_t token_bytes() const { return token_bytes_; }

  /// Start of the records of the b-th block of the sequence (b < ceil(tokens / block_tokens)).
  const unsigned char* block(Index b) const {
    MLA_ASSERT(b >= 0 && b * block_tokens_ < tokens_);
    return layer_base_ + static_cast<std::size_t>(block_table_[b]) * block_bytes_;
  }

  /// Converts tokens [first, first + count) to T: c_kv [count, d_c] and k_pe [count, R]. Reads
  /// block by block; the conversion is exact when T is at least as wide as the storage.
  template <class T>
  void read(Index first, Index count, MatrixRef<detail::identity_t<T>> c_kv,
            MatrixRef<detail::identity_t<T>> k_pe) const {
    MLA_ASSERT(first >= 0 && count >= 0 && first + count <= tokens_);
    MLA_ASSERT(c_kv.rows() >= count && c_kv.cols() == kv_lora_rank_);
    MLA_ASSERT(k_pe.rows() >= count && k_pe.cols() == rope_dim_);
    detail::visit_storage(storage_, [&](auto tag) {
      using S = typename decltype(tag)::type;
      using Records = Eigen::Map<const RowMatrix<S>, 0, Eigen::OuterStride<>>;
      const Index stride = static_cast<Index>(token_bytes_ / sizeof(S));
      Index done = 0;
      while (done < count) {
        const Index token = first + done;
        const Index in_block = token % block_tokens_;
        const Index n = std::min(count - done, block_tokens_ - in_block);
        const auto* rec = reinterpret_cast<const S*>(
            block(token / block_tokens_) + static_cast<std::size_t>(in_block) * token_bytes_);
        const Records c(rec, n, kv_lora_rank_, Eigen::OuterStride<>(stride));
        const Records k(rec + kv_lora_rank_, n, rope_dim_, Eigen::OuterStride<>(stride));
        c_kv.middleRows(done, n) = c.template cast<T>();
        k_pe.middleRows(done, n) = k.template cast<T>();
        done += n;
      }
    });
  }

 private:
  friend class LatentCache;
  const unsigned char* layer_base_ = nullptr;
  const std::int32_t* block_table_ = nullptr;
  std::size_t block_bytes_ = 0;
  std::size_t token_bytes_ = 0;
  Index tokens_ = 0;
  Index block_tokens_ = 0;
  Index kv_lora_rank_ = 0;
  Index rope_dim_ = 0;
  CacheStorage storage_ = CacheStorage::kFloat32;
};

/// Paged latent KV cache for the layers of one model and any number of sequences.
///
/// Per token and layer it stores exactly d_c latent values and R rotary-key values. The pool
/// holds `num_blocks` blocks of `block_tokens` tokens for every layer; a block belongs to one
/// sequence for all layers. Not copyable (it can be large): use clone(). Not safe for concurrent
/// mutation.
class LatentCache {
 public:
  /// Allocates the whole pool. Throws mla::Error for an invalid config or options.
  LatentCache(const MlaConfig& config, const LatentCacheOptions& options)
      : options_(options), kv_lora_rank_(config.kv_lora_rank), rope_dim_(config.qk_rope_head_dim) {
    config.validate();
    detail::require(options.num_layers > 0, "LatentCacheOptions.num_layers must be > 0, got ",
                    options.num_layers);
    detail::require(options.block_tokens > 0 && options.block_tokens <= (Index{1} << 20),
                    "LatentCacheOptions.block_tokens must be in [1, 2^20], got ",
                    options.block_tokens);
    detail::require(
        options.num_blocks > 0 && options.num_blocks <= std::numeric_limits<std::int32_t>::max(),
        "LatentCacheOptions.num_blocks must be in [1, 2^31), got ", options.num_blocks);
    token_bytes_ = static_cast<std::size_t>(config.latent_cache_width()) *
                   detail::storage_element_bytes(options.storage);
    block_bytes_ = token_bytes_ * static_cast<std::size_t>(options.block_tokens);
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
  LatentCache clone() const {
    LatentCache c(*this, CloneTag{});
    return c;
  }

  const LatentCacheOptions& options() const { return options_; }
  Index kv_lora_rank() const { return kv_lora_rank_; }
  Index rope_dim() const { return rope_dim_; }
  /// Bytes of one token's record in one layer.
  std::size_t bytes_per_token_per_layer() const { return token_bytes_; }
  /// Blocks not held by any sequence.
  Index free_blocks() const { return static_cast<Index>(free_blocks_.size()); }

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

  /// Throws mla::Error unless `count` more tokens fit for (id, layer), counting free blocks.
  void require_room(SequenceId id, Index layer, Index count) const {
    const Sequence& s = find(id, "append");
    check_layer(layer, "append");
    detail::require(count >= 0, "LatentCache::append: negative token count ", count);
    const Index needed = blocks_needed(s, layer, count);
    detail::require(needed <= free_blocks(), "LatentCache::append: sequence ", id, " layer ", layer,
                    " needs ", needed, " more blocks of ", options_.block_tokens, " tokens for ",
                    count, " tokens, but only ", free_blocks(), " of the pool's ",
                    options_.num_blocks, " blocks are free");
  }

  /// Appends tokens to (id, layer): c_kv [n, d_c] and k_pe [n, R], converted to the storage
  /// type once, here. Atomic: when the pool cannot hold them (or an argument is wrong) it
  /// throws mla::Error and leaves every sequence as it was.
  template <class T>
  void append(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
              ConstMatrixRef<detail::identity_t<T>> k_pe) {
    detail::require(
        c_kv.cols() == kv_lora_rank_ && k_pe.cols() == rope_dim_ && c_kv.rows() == k_pe.rows(),
        "LatentCache::append: c_kv is [", c_kv.rows(), ", ", c_kv.cols(), "] and k_pe is [",
        k_pe.rows(), ", ", k_pe.cols(), "]; expected [n, ", kv_lora_rank_, "] and [n, ", rope_dim_,
        "]");
    const Index count = c_kv.rows();
    require_room(id, layer, count);
    Sequence& s = find(id, "append");
    // Everything that can fail has been checked; from here on nothing throws.
    const Index needed = blocks_needed(s, layer, count);
    for (Index b = 0; b < needed; ++b) {
      s.blocks.push_back(free_blocks_.back());  // capacity reserved: no allocation
      free_blocks_.pop_back();
    }
    Index& cached = s.lengths[static_cast<std::size_t>(layer)];
    unsigned char* base = pool_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
    detail::visit_storage(options_.storage, [&](auto tag) {
      using S = typename decltype(tag)::type;
      using Records = Eigen::Map<RowMatrix<S>, 0, Eigen::OuterStride<>>;
      const Index stride = static_cast<Index>(token_bytes_ / sizeof(S));
      Index done = 0;
      while (done < count) {
        const Index token = cached + done;
        const Index in_block = token % options_.block_tokens;
        const Index n = std::min(count - done, options_.block_tokens - in_block);
        auto* rec = reinterpret_cast<S*>(
            base +
            static_cast<std::size_t>(
                s.blocks[static_cast<std::size_t>(token / options_.block_tokens)]) *
                block_bytes_ +
            static_cast<std::size_t>(in_block) * token_bytes_);
        Records c(rec, n, kv_lora_rank_, Eigen::OuterStride<>(stride));
        Records k(rec + kv_lora_rank_, n, rope_dim_, Eigen::OuterStride<>(stride));
        c = c_kv.middleRows(done, n).template cast<S>();
        k = k_pe.middleRows(done, n).template cast<S>();
        done += n;
      }
    });
    cached += count;
  }

  /// The cached tokens of (id, layer) for reading. Throws for an unknown id or layer.
  LatentView view(SequenceId id, Index layer) const {
    const Sequence& s = find(id, "view");
    check_layer(layer, "view");
    LatentView v;
    v.layer_base_ = pool_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
    v.block_table_ = s.blocks.data();
    v.block_bytes_ = block_bytes_;
    v.token_bytes_ = token_bytes_;
    v.tokens_ = s.lengths[static_cast<std::size_t>(layer)];
    v.block_tokens_ = options_.block_tokens;
    v.kv_lora_rank_ = kv_lora_rank_;
    v.rope_dim_ = rope_dim_;
    v.storage_ = options_.storage;
    return v;
  }

 private:
  struct Sequence {
    std::vector<std::int32_t> blocks;  // block table, shared by all layers
    std::vector<Index> lengths;        // tokens cached per layer
  };
  struct CloneTag {};

  LatentCache(const LatentCache& other, CloneTag)
      : options_(other.options_),
        kv_lora_rank_(other.kv_lora_rank_),
        rope_dim_(other.rope_dim_),
        token_bytes_(other.token_bytes_),
        block_bytes_(other.block_bytes_),
        layer_bytes_(other.layer_bytes_),
        pool_(detail::AlignedBytes::allocate(other.pool_.size)),
        free_blocks_(other.free_blocks_),
        sequences_(other.sequences_),
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
  Index kv_lora_rank_;
  Index rope_dim_;
  std::size_t token_bytes_ = 0;
  std::size_t block_bytes_ = 0;
  std::size_t layer_bytes_ = 0;
  detail::AlignedBytes pool_;
  std::vector<std::int32_t> free_blocks_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  SequenceId next_id_ = 0;
};

}  // namespace mla
