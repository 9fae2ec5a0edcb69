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
#include <mutex>
#include <unordered_map>
#include <vector>

#include "mla/config.hpp"
#include "mla/detail/block_pool.hpp"
#include "mla/detail/record_layout.hpp"
#include "mla/error.hpp"
#include "mla/index_keys.hpp"
#include "mla/latent_view.hpp"
#include "mla/matrix.hpp"

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

/// Paged latent KV cache for the layers of one model and any number of sequences.
///
/// Per token and layer it stores exactly d_c latent values and R rotary-key values, in the
/// chosen storage format. For a config with DeepSeek-V3.2's indexer (MlaConfig::has_indexer)
/// every block also holds the index keys of its tokens (mla/index_keys.hpp: codes, then
/// scales, after the block's latent records), written by the same append. The pool holds
/// `num_blocks` blocks of `block_tokens` tokens for every layer; a block serves one position range
/// of its sequences in all layers. Blocks are reference-counted: fork() lets sequences share full
/// blocks (a common prefix is stored once), and a write into a shared block first copies it (copy
/// on write). Not copyable (it can be large): use clone().
///
/// Threads: different sequences may be appended to, viewed and decoded from different threads
/// at the same time (the pool, the block tables' bookkeeping and the accounting are behind one
/// mutex, and no two sequences ever write the same block). Operations on one sequence must not
/// overlap each other, and a view must not be read while its sequence is appended to,
/// truncated or removed. clone(), moves and destruction need the cache to be otherwise idle.
class LatentCache {
 public:
  /// Allocates the whole pool. Throws mla::Error for an invalid config or options.
  LatentCache(const MlaConfig& config, const LatentCacheOptions& options)
      : options_(options), mutex_(std::make_unique<std::mutex>()) {
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
    format_ = LatentRecordFormat(config.kv_lora_rank, config.qk_rope_head_dim, options.storage,
                                 options.fp8_scales);
    layout_ = format_.layout();
    block_bytes_ = layout_.token_bytes * static_cast<std::size_t>(options.block_tokens);
    if (config.has_indexer()) {
      // [latent records][index codes][index scales], each part 64-byte aligned.
      const auto bt = static_cast<std::size_t>(options.block_tokens);
      index_format_ = IndexKeyFormat(config.index_head_dim, config.index_scales);
      index_codes_offset_ = align64(block_bytes_);
      index_scales_offset_ =
          align64(index_codes_offset_ + bt * static_cast<std::size_t>(config.index_head_dim));
      block_bytes_ = align64(index_scales_offset_ + sizeof(float) * bt);
    }
    pool_ = detail::BlockPool(options.num_layers, options.num_blocks, block_bytes_);
  }

  LatentCache(LatentCache&&) noexcept = default;
  LatentCache& operator=(LatentCache&&) noexcept = default;
  LatentCache(const LatentCache&) = delete;
  LatentCache& operator=(const LatentCache&) = delete;

  /// A deep copy (pool, block tables, sharing, lengths). Sequence ids stay valid in the copy.
  LatentCache clone() const { return LatentCache(*this, CloneTag{}); }

  const LatentCacheOptions& options() const { return options_; }
  Index kv_lora_rank() const { return layout_.kv_lora_rank; }
  Index rope_dim() const { return layout_.rope_dim; }
  /// The records' byte layout (see LatentRecordFormat).
  const LatentRecordFormat& record_format() const { return format_; }
  /// One layer's part of the pool as a PagedLatentBuffer (block ids are those of block_table);
  /// the cache stays its owner. For reading: writes go through append.
  PagedLatentBuffer buffer(Index layer) const {
    check_layer(layer, "buffer");
    PagedLatentBuffer b;
    b.format = format_;
    b.data = const_cast<unsigned char*>(layer_base(layer));
    b.num_blocks = options_.num_blocks;
    b.block_tokens = options_.block_tokens;
    b.block_stride = block_bytes_;
    return b;
  }

  // ------------------------------------------------------------------------------------------
  // Accounting

  /// Bytes of one token's record in one layer for a config and storage: (d_c + R) * 4 for FP32,
  /// * 2 for BF16, d_c + 4 * ceil(d_c / 128) + 2 * R for FP8 (2304 / 1152 / 656 for DeepSeek),
  /// plus index_head_dim + 4 for the index key of a config with an indexer (V3.2 with the FP8
  /// latent: 656 + 132 = 788).
  static std::size_t bytes_per_token_per_layer(const MlaConfig& config, CacheStorage storage) {
    return detail::LatentLayout::make(config.kv_lora_rank, config.qk_rope_head_dim, storage,
                                      ScaleFormat::kFloat32)
               .token_bytes +
           (config.has_indexer() ? static_cast<std::size_t>(config.index_head_dim) + 4 : 0);
  }
  /// Bytes of one token's record (and index key) in one layer of this cache.
  std::size_t bytes_per_token_per_layer() const { return layout_.token_bytes + index_key_bytes(); }
  /// Bytes of one token over all layers of this cache.
  std::size_t bytes_per_token() const {
    return bytes_per_token_per_layer() * static_cast<std::size_t>(options_.num_layers);
  }
  /// Tokens the pool can hold (per layer), all sequences together.
  Index capacity_tokens() const { return options_.num_blocks * options_.block_tokens; }
  /// Bytes of the pool: capacity_tokens() * bytes_per_token().
  std::size_t capacity_bytes() const { return pool_.bytes(); }
  /// Blocks held by sequences (a block shared by several counts once).
  Index blocks_in_use() const { return options_.num_blocks - free_blocks(); }
  /// Blocks not held by any sequence.
  Index free_blocks() const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return pool_.free_blocks();
  }
  /// Blocks held by more than one sequence.
  Index shared_blocks() const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return pool_.shared_blocks();
  }
  /// Bytes of the blocks held by sequences (all layers): what is taken from the pool. Shared
  /// blocks count once.
  std::size_t bytes_in_use() const {
    return block_bytes_ * static_cast<std::size_t>(blocks_in_use()) *
           static_cast<std::size_t>(options_.num_layers);
  }
  /// Bytes holding cached tokens: for every block in use and every layer, the records filled
  /// by the sequences that hold it (a shared record counts once). bytes_in_use() minus the
  /// unfilled ends of blocks.
  std::size_t bytes_of_tokens() const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    std::size_t total = 0;
    std::vector<Index> filled(static_cast<std::size_t>(options_.num_blocks));
    for (Index layer = 0; layer < options_.num_layers; ++layer) {
      std::fill(filled.begin(), filled.end(), 0);
      for (const auto& entry : sequences_) {
        const Sequence& s = entry.second;
        const Index len = s.lengths[static_cast<std::size_t>(layer)];
        for (Index b = 0; b * options_.block_tokens < len; ++b) {
          Index& f = filled[static_cast<std::size_t>(s.blocks[static_cast<std::size_t>(b)])];
          f = std::max(f, std::min(options_.block_tokens, len - b * options_.block_tokens));
        }
      }
      for (Index f : filled) total += static_cast<std::size_t>(f) * bytes_per_token_per_layer();
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
    const std::lock_guard<std::mutex> lock(*mutex_);
    const SequenceId id = next_id_++;
    sequences_.emplace(id, std::move(s));
    return id;
  }

  /// Removes a sequence and returns the blocks only it held to the pool. Throws for an unknown
  /// id.
  void remove_sequence(SequenceId id) {
    const std::lock_guard<std::mutex> lock(*mutex_);
    Sequence& s = find(id, "remove_sequence");
    pool_.release(s.blocks, 0);
    sequences_.erase(id);
  }

  /// A new sequence holding the first `tokens` tokens of `parent` in every layer (each layer:
  /// min(tokens, its length); all of them by default), at the parent's positions. Full blocks
  /// of that prefix are shared by reference count; a partly filled last block is copied, so
  /// that parent and child write only blocks of their own (a later write into a shared block,
  /// after truncate, copies it first). Forking one prompt many times stores its full blocks
  /// once (prefix sharing). Atomic: throws mla::Error for an unknown parent, a negative
  /// `tokens`, or a pool without a free block for the copy, and then changes nothing.
  SequenceId fork(SequenceId parent, Index tokens = std::numeric_limits<Index>::max()) {
    detail::require(tokens >= 0, "LatentCache::fork: negative token count ", tokens);
    Sequence child;
    child.blocks.reserve(static_cast<std::size_t>(options_.num_blocks));
    child.lengths.assign(static_cast<std::size_t>(options_.num_layers), 0);
    const std::lock_guard<std::mutex> lock(*mutex_);
    const Sequence& p = find(parent, "fork");
    Index shortest = std::numeric_limits<Index>::max(), longest = 0;
    for (std::size_t l = 0; l < child.lengths.size(); ++l) {
      child.lengths[l] = std::min(tokens, p.lengths[l]);
      shortest = std::min(shortest, child.lengths[l]);
      longest = std::max(longest, child.lengths[l]);
    }
    const Index bt = options_.block_tokens;
    const Index shared = shortest / bt;          // full in every layer
    const Index used = (longest + bt - 1) / bt;  // blocks the child's tokens touch
    const Index copies = used - shared;
    detail::require(copies <= pool_.free_blocks(), "LatentCache::fork: ", "sequence ", parent,
                    " needs ", copies,
                    " free blocks for its partly filled blocks, but the pool has ",
                    pool_.free_blocks(), " of ", options_.num_blocks, " free");
    // Nothing fails from here on.
    pool_.fork(p.blocks, shared, used, child.blocks);
    child.first_position = p.first_position;
    const SequenceId id = next_id_++;
    sequences_.emplace(id, std::move(child));
    return id;
  }

  /// Drops the tokens from index `tokens` on in every layer (speculative decoding's rejected
  /// drafts): each layer keeps min(tokens, its length); blocks no longer used go back to the
  /// pool (or lose one reference when shared). Truncating to 0 leaves an empty sequence whose
  /// next token may again be at any position. Atomic: throws mla::Error for an unknown id or a
  /// `tokens` outside [0, the longest layer's length], and then changes nothing.
  void truncate(SequenceId id, Index tokens) {
    const std::lock_guard<std::mutex> lock(*mutex_);
    Sequence& s = find(id, "truncate");
    const Index longest = *std::max_element(s.lengths.begin(), s.lengths.end());
    detail::require(tokens >= 0 && tokens <= longest, "LatentCache::truncate: sequence ", id,
                    " holds ", longest, " tokens (longest layer), cannot truncate to ", tokens);
    Index kept = 0;
    for (Index& len : s.lengths) {
      len = std::min(len, tokens);
      kept = std::max(kept, len);
    }
    pool_.release(s.blocks, (kept + options_.block_tokens - 1) / options_.block_tokens);
  }

  bool contains(SequenceId id) const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return sequences_.count(id) != 0;
  }
  Index num_sequences() const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return static_cast<Index>(sequences_.size());
  }

  /// Tokens cached for a sequence in one layer. Throws for an unknown id or layer.
  Index length(SequenceId id, Index layer) const {
    check_layer(layer, "length");
    const std::lock_guard<std::mutex> lock(*mutex_);
    return find(id, "length").lengths[static_cast<std::size_t>(layer)];
  }

  /// Position of the sequence's first cached token (the same for every layer), or -1 while the
  /// sequence holds no token in any layer. Throws for an unknown id.
  std::int64_t first_position(SequenceId id) const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    const Sequence& s = find(id, "first_position");
    return holds_tokens(s) ? s.first_position : -1;
  }

  /// The position the next token of (id, layer) must have: first_position + length(id, layer),
  /// or -1 (any position >= 0) while the sequence holds no token in any layer.
  std::int64_t next_position(SequenceId id, Index layer) const {
    check_layer(layer, "next_position");
    const std::lock_guard<std::mutex> lock(*mutex_);
    return next_position_locked(find(id, "next_position"), layer);
  }

  /// Throws mla::Error unless `pos` may be the position of the next token of (id, layer):
  /// positions of a sequence are contiguous, so pos must equal next_position(id, layer); the
  /// first token of a sequence that holds nothing may be at any position >= 0.
  void require_position(SequenceId id, Index layer, std::int64_t pos) const {
    check_layer(layer, "append");
    const std::lock_guard<std::mutex> lock(*mutex_);
    require_position_locked(id, find(id, "append"), layer, pos);
  }

  /// Throws mla::Error unless `count` more tokens fit for (id, layer), counting free blocks.
  void require_room(SequenceId id, Index layer, Index count) const {
    const Index counts[1] = {count};
    require_room(&id, counts, 1, layer);
  }

  /// Throws mla::Error unless `count` more tokens fit for each of the `n` distinct sequences
  /// `ids` in `layer` at the same time.
  void require_room(const SequenceId* ids, Index n, Index layer, Index count) const {
    check_layer(layer, "append");
    detail::require(count >= 0, "LatentCache::append: negative token count ", count);
    const std::lock_guard<std::mutex> lock(*mutex_);
    (void)blocks_for(
        ids, [count](Index) { return count; }, n, layer);
  }

  /// Throws mla::Error unless counts[i] more tokens fit for each of the `n` distinct sequences
  /// `ids` in `layer` at the same time.
  void require_room(const SequenceId* ids, const Index* counts, Index n, Index layer) const {
    check_layer(layer, "append");
    const std::lock_guard<std::mutex> lock(*mutex_);
    (void)blocks_for(
        ids, [counts](Index i) { return counts[i]; }, n, layer);
  }

  /// Makes sure counts[i] more tokens of ids[i] (distinct sequences) can be appended to
  /// `layer` at positions positions[i], ... without taking more blocks: checks every position
  /// and the room first, then takes the blocks (and copies shared blocks the tokens will
  /// write), all under one lock, so that a batch either gets all its blocks or none even with
  /// other threads allocating. The appends that follow cannot fail for want of room. Throws
  /// mla::Error (nothing changed) as append would.
  void reserve_append(const SequenceId* ids, const Index* counts, const std::int64_t* positions,
                      Index n, Index layer) {
    check_layer(layer, "append");
    const std::lock_guard<std::mutex> lock(*mutex_);
    for (Index i = 0; i < n; ++i) {
      require_position_locked(ids[i], find(ids[i], "append"), layer, positions[i]);
    }
    (void)blocks_for(
        ids, [counts](Index i) { return counts[i]; }, n, layer);
    for (Index i = 0; i < n; ++i) prepare_blocks(find(ids[i], "append"), layer, counts[i]);
  }

  /// Appends tokens to (id, layer) at positions start_pos, start_pos + 1, ...: c_kv [n, d_c]
  /// and k_pe [n, R] (RoPE applied at those positions), converted to the storage format once,
  /// here. start_pos must continue the sequence (see require_position). Atomic: when the pool
  /// cannot hold the tokens, the position does not follow, or an argument is wrong, it throws
  /// mla::Error and leaves every sequence as it was.
  ///
  /// A cache with index keys (has_index_keys) needs them: use the append below.
  template <class T>
  void append(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
              ConstMatrixRef<detail::identity_t<T>> k_pe, std::int64_t start_pos) {
    detail::require(!has_index_keys(), "LatentCache::append: this cache keeps DeepSeek-V3.2 ",
                    "index keys (index_head_dim ", index_format_.dim(),
                    "); append them with the tokens");
    append_records<T>(id, layer, c_kv, k_pe, nullptr, 0, start_pos);
  }

  /// Appends tokens with their index keys (caches of configs with an indexer): index_keys
  /// [n, index_head_dim] in FP32 (RoPE and the Hadamard rotation applied), quantised to E4M3
  /// with one scale per key here, written with the latent records, atomically.
  template <class T>
  void append(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
              ConstMatrixRef<detail::identity_t<T>> k_pe, ConstMatrixRef<float> index_keys,
              std::int64_t start_pos) {
    detail::require(has_index_keys(), "LatentCache::append: index keys given, but this cache ",
                    "keeps none (its config has no indexer)");
    detail::require(index_keys.rows() == c_kv.rows() && index_keys.cols() == index_format_.dim(),
                    "LatentCache::append: index_keys is [", index_keys.rows(), ", ",
                    index_keys.cols(), "], expected [", c_kv.rows(), ", ", index_format_.dim(),
                    "]");
    append_records<T>(id, layer, c_kv, k_pe, index_keys.data(), index_keys.outerStride(),
                      start_pos);
  }

  /// True when the cache keeps DeepSeek-V3.2 index keys beside the latent.
  bool has_index_keys() const { return index_format_.dim() > 0; }
  /// The index keys' codec (dim() 0 without index keys).
  const IndexKeyFormat& index_key_format() const { return index_format_; }
  /// Bytes of one token's index key (0 without).
  std::size_t index_key_bytes() const {
    return has_index_keys() ? index_format_.bytes_per_token() : 0;
  }
  /// One layer's index keys as a PagedIndexBuffer (block ids as in block_table). Throws
  /// without index keys.
  PagedIndexBuffer index_buffer(Index layer) const {
    check_layer(layer, "index_buffer");
    detail::require(has_index_keys(), "LatentCache::index_buffer: this cache keeps no index keys");
    PagedIndexBuffer b;
    b.format = index_format_;
    b.data = const_cast<unsigned char*>(layer_base(layer));
    b.num_blocks = options_.num_blocks;
    b.block_tokens = options_.block_tokens;
    b.block_stride = block_bytes_;
    b.codes_offset = index_codes_offset_;
    b.scales_offset = index_scales_offset_;
    return b;
  }
  /// The index keys of (id, layer), as many as the layer's cached tokens. Throws for an unknown
  /// id or layer, or a cache without index keys.
  IndexKeyView index_view(SequenceId id, Index layer) const {
    const PagedIndexBuffer b = index_buffer(layer);
    const std::lock_guard<std::mutex> lock(*mutex_);
    const Sequence& s = find(id, "index_view");
    return IndexKeyView(b, s.blocks.data(), s.lengths[static_cast<std::size_t>(layer)]);
  }

 private:
  template <class T>
  void append_records(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
                      ConstMatrixRef<detail::identity_t<T>> k_pe, const float* keys,
                      Index key_stride, std::int64_t start_pos) {
    detail::require(
        c_kv.cols() == kv_lora_rank() && k_pe.cols() == rope_dim() && c_kv.rows() == k_pe.rows(),
        "LatentCache::append: c_kv is [", c_kv.rows(), ", ", c_kv.cols(), "] and k_pe is [",
        k_pe.rows(), ", ", k_pe.cols(), "]; expected [n, ", kv_lora_rank(), "] and [n, ",
        rope_dim(), "]");
    const Index count = c_kv.rows();
    reserve_append(&id, &count, &start_pos, 1, layer);
    if (count == 0) return;
    // The blocks are there and private to this sequence: write without the lock (another
    // thread may write other sequences' blocks meanwhile), then publish the length.
    Sequence* s = nullptr;
    Index cached = 0;
    {
      const std::lock_guard<std::mutex> lock(*mutex_);
      s = &find(id, "append");
      cached = s->lengths[static_cast<std::size_t>(layer)];
    }
    // The layer's records and index keys as the engine-facing buffers address them.
    const PagedLatentBuffer records = buffer(layer);
    const PagedIndexBuffer index = keys ? index_buffer(layer) : PagedIndexBuffer{};
    const Index bt = options_.block_tokens;
    for (Index i = 0; i < count; ++i) {
      const Index token = cached + i, slot = token % bt;
      const std::int32_t block = s->blocks[static_cast<std::size_t>(token / bt)];
      detail::write_record(layout_, c_kv.row(i).data(), k_pe.row(i).data(),
                           records.record(block, slot));
      if (keys) index.encode(block, slot, keys + i * key_stride);
    }
    const std::lock_guard<std::mutex> lock(*mutex_);
    if (!holds_tokens(*s)) s->first_position = start_pos;
    s->lengths[static_cast<std::size_t>(layer)] += count;
  }

 public:
  /// Appends tokens at the sequence's next position (position 0 for a sequence that holds
  /// nothing); otherwise as the first append above.
  template <class T>
  void append(SequenceId id, Index layer, ConstMatrixRef<detail::identity_t<T>> c_kv,
              ConstMatrixRef<detail::identity_t<T>> k_pe) {
    append<T>(id, layer, c_kv, k_pe, std::max<std::int64_t>(0, next_position(id, layer)));
  }

  /// The cached tokens of (id, layer) for reading. Throws for an unknown id or layer.
  LatentView view(SequenceId id, Index layer) const {
    check_layer(layer, "view");
    const std::lock_guard<std::mutex> lock(*mutex_);
    const Sequence& s = find(id, "view");
    LatentView v;
    v.b_.layer_base = layer_base(layer);
    v.b_.block_table = s.blocks.data();
    v.b_.block_bytes = block_bytes_;
    v.b_.tokens = s.lengths[static_cast<std::size_t>(layer)];
    v.b_.block_tokens = options_.block_tokens;
    v.b_.layout = layout_;
    return v;
  }

  /// The block ids of a sequence, in order (valid until it is changed or removed), for
  /// inspection and for building views of one's own.
  std::vector<std::int32_t> block_table(SequenceId id) const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return find(id, "block_table").blocks;
  }

 private:
  struct Sequence {
    std::vector<std::int32_t> blocks;  // block table, shared by all layers
    std::vector<Index> lengths;        // tokens cached per layer
    std::int64_t first_position = 0;   // position of token 0 (meaningful while holds_tokens)
  };

  static std::size_t align64(std::size_t n) { return (n + 63) / 64 * 64; }

  static bool holds_tokens(const Sequence& s) {
    return std::any_of(s.lengths.begin(), s.lengths.end(), [](Index n) { return n > 0; });
  }
  struct CloneTag {};

  LatentCache(const LatentCache& other, CloneTag)
      : options_(other.options_),
        format_(other.format_),
        layout_(other.layout_),
        index_format_(other.index_format_),
        index_codes_offset_(other.index_codes_offset_),
        index_scales_offset_(other.index_scales_offset_),
        block_bytes_(other.block_bytes_),
        mutex_(std::make_unique<std::mutex>()) {
    const std::lock_guard<std::mutex> lock(*other.mutex_);
    pool_ = other.pool_.clone();
    sequences_ = other.sequences_;
    next_id_ = other.next_id_;
    for (auto& entry : sequences_) {
      entry.second.blocks.reserve(static_cast<std::size_t>(options_.num_blocks));
    }
  }

  unsigned char* layer_base(Index layer) const { return pool_.layer_base(layer); }

  std::int64_t next_position_locked(const Sequence& s, Index layer) const {
    return holds_tokens(s) ? s.first_position + s.lengths[static_cast<std::size_t>(layer)] : -1;
  }

  void require_position_locked(SequenceId id, const Sequence& s, Index layer,
                               std::int64_t pos) const {
    detail::require(pos >= 0, "LatentCache: sequence ", id, " layer ", layer,
                    ": positions must be >= 0, got ", pos);
    const std::int64_t next = next_position_locked(s, layer);
    if (next < 0 || pos == next) return;
    detail::fail("LatentCache: sequence ", id, " layer ", layer, " holds ",
                 s.lengths[static_cast<std::size_t>(layer)], " tokens from position ",
                 s.first_position, ", so its next token is at position ", next, ", got ", pos,
                 " (positions of a sequence are contiguous)");
  }

  /// Blocks that `count` more tokens of (s, layer) take from the pool: new blocks past the
  /// table's end, and copies of shared blocks the tokens would write.
  Index blocks_needed(const Sequence& s, Index layer, Index count) const {
    return pool_.needed(s.blocks, s.lengths[static_cast<std::size_t>(layer)], count,
                        options_.block_tokens);
  }

  /// The blocks a batch of appends needs (lock held); throws when they are not free.
  template <class Count>
  Index blocks_for(const SequenceId* ids, Count&& counts, Index n, Index layer) const {
    Index needed = 0;
    for (Index i = 0; i < n; ++i) {
      detail::require(counts(i) >= 0, "LatentCache::append: negative token count ", counts(i));
      for (Index j = 0; j < i; ++j) {
        detail::require(ids[i] != ids[j], "LatentCache::append: sequence ", ids[i],
                        " appears twice in one batch");
      }
      needed += blocks_needed(find(ids[i], "append"), layer, counts(i));
    }
    const Index free = pool_.free_blocks();
    if (needed <= free) return needed;
    if (n == 1) {
      detail::fail("LatentCache::append: sequence ", ids[0], " layer ", layer, " needs ", needed,
                   " more blocks of ", options_.block_tokens, " tokens for ", counts(0),
                   " tokens, but only ", free, " of the pool's ", options_.num_blocks,
                   " blocks are free");
    }
    detail::fail("LatentCache::append: ", n, " sequences, layer ", layer, ", need ", needed,
                 " more blocks of ", options_.block_tokens, " tokens, but only ", free,
                 " of the pool's ", options_.num_blocks, " blocks are free");
  }

  /// Takes and copies the blocks `count` more tokens of (s, layer) write (lock held; room was
  /// checked).
  void prepare_blocks(Sequence& s, Index layer, Index count) {
    pool_.prepare(s.blocks, s.lengths[static_cast<std::size_t>(layer)], count,
                  options_.block_tokens);
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
  LatentRecordFormat format_;
  detail::LatentLayout layout_;
  IndexKeyFormat index_format_;                                   // dim() 0: no index keys
  std::size_t index_codes_offset_ = 0, index_scales_offset_ = 0;  // within a block
  std::size_t block_bytes_ = 0;
  std::unique_ptr<std::mutex> mutex_;  // guards everything below
  detail::BlockPool pool_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  SequenceId next_id_ = 0;
};

}  // namespace mla
