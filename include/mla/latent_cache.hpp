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
#include "mla/index_keys.hpp"
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
/// (FP8) and rounding (BF16) happen here, once. Uses no heap memory.
template <class T>
void write_record(const LatentLayout& l, const T* c, const T* k, unsigned char* rec) {
  const Index D = l.kv_lora_rank, R = l.rope_dim;
  const auto store_as = [&](auto zero) {
    using S = decltype(zero);
    S* out = reinterpret_cast<S*>(rec);  // records of S are aligned for S (checked for buffers)
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
      constexpr Index kTile = LatentLayout::kFp8Tile;
      auto* codes = reinterpret_cast<float8_e4m3fn*>(rec);
      for (Index t = 0, first = 0; first < D; ++t, first += kTile) {
        const Index n = std::min(kTile, D - first);
        const float* cf = nullptr;
        float tile[kTile];
        if constexpr (std::is_same_v<T, float>) {
          cf = c + first;
        } else {
          for (Index i = 0; i < n; ++i) tile[i] = static_cast<float>(c[first + i]);
          cf = tile;
        }
        float scale = 0.0f;
        quantize_e4m3_tiles(cf, n, kTile, 0.0f, l.fp8_scales, codes + first, &scale);
        std::memcpy(rec + l.scales_offset + sizeof(float) * static_cast<std::size_t>(t), &scale,
                    sizeof(float));
      }
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

/// The bytes of one token's record of one layer, in every storage format: the public form of
/// the record codec, for engines that keep the latent cache in memory of their own.
///
/// Records are packed, with no padding (bytes() from one token to the next):
///  - kFloat32: c^KV [d_c] then k^R [R], FP32 (4 (d_c + R) bytes; 2304 at DeepSeek sizes);
///  - kBFloat16: the same in BF16 (2 (d_c + R); 1152: vLLM's [num_blocks, block_size, 576]
///    BF16 MLA cache, token by token);
///  - kFp8E4M3: FlashMLA's "fp8 with scale" record: d_c E4M3 codes at offset 0, one FP32 scale
///    per 128 codes at offset d_c, k^R in BF16 at rope_offset() (656 bytes at DeepSeek sizes);
///  - kFloat64: c^KV then k^R in double (for verification).
class LatentRecordFormat {
 public:
  LatentRecordFormat() = default;
  /// Throws mla::Error for non-positive widths, or FP8 with d_c above 8192.
  LatentRecordFormat(Index kv_lora_rank, Index rope_dim, CacheStorage storage,
                     ScaleFormat fp8_scales = ScaleFormat::kFloat32) {
    detail::require(kv_lora_rank > 0 && kv_lora_rank <= (Index{1} << 20) && rope_dim >= 0 &&
                        rope_dim <= (Index{1} << 20),
                    "LatentRecordFormat: kv_lora_rank must be in [1, 2^20] and rope_dim in "
                    "[0, 2^20], got ",
                    kv_lora_rank, " and ", rope_dim);
    detail::require(storage != CacheStorage::kFp8E4M3 || kv_lora_rank <= 8192,
                    "LatentRecordFormat: FP8 records support kv_lora_rank up to 8192, got ",
                    kv_lora_rank);
    layout_ = detail::LatentLayout::make(kv_lora_rank, rope_dim, storage, fp8_scales);
  }

  Index kv_lora_rank() const { return layout_.kv_lora_rank; }
  Index rope_dim() const { return layout_.rope_dim; }
  CacheStorage storage() const { return layout_.storage; }
  /// How FP8 scales are rounded when records are written (reading accepts either).
  ScaleFormat fp8_scales() const { return layout_.fp8_scales; }
  /// Bytes of one record.
  std::size_t bytes() const { return layout_.token_bytes; }
  /// FP8: byte offset of the scales; 0 otherwise.
  std::size_t scales_offset() const { return layout_.scales_offset; }
  /// Byte offset of k^R in the record.
  std::size_t rope_offset() const { return layout_.kpe_offset; }
  /// The alignment in bytes that buffers of these records must have: their element's size
  /// (FP8: 4, for the FP32 scales).
  std::size_t alignment() const {
    return layout_.storage == CacheStorage::kFp8E4M3
               ? sizeof(float)
               : detail::LatentLayout::element_bytes(layout_.storage);
  }

  /// Writes one token, c [d_c] and k [R] (RoPE applied), into `record` (bytes() bytes):
  /// rounded to BF16 or quantised to FP8 here, once.
  template <class T>
  void encode(const T* c, const T* k, void* record) const {
    detail::write_record(layout_, c, k, static_cast<unsigned char*>(record));
  }
  /// Reads one record into c [d_c] and k [R] (exact in float and double). Allocates d_c floats
  /// of scratch for BF16 and FP8 into a T other than float.
  template <class T>
  void decode(const void* record, T* c, T* k) const {
    std::vector<float> scratch;
    if (!std::is_same_v<T, float>) scratch.resize(static_cast<std::size_t>(kv_lora_rank()));
    detail::read_record(layout_, static_cast<const unsigned char*>(record), c, k, scratch.data());
  }

  /// (internal) The layout the kernels read.
  const detail::LatentLayout& layout() const { return layout_; }

 private:
  detail::LatentLayout layout_;
};

/// One layer's paged latent cache in memory the library does not own (an engine's buffer):
/// block b's records start at data + b * block_stride, block_tokens records of
/// format.bytes() each, back to back. A vLLM / FlashMLA-style tensor
/// [num_blocks, block_size, 576] BF16 (or [num_blocks, block_size, 656] bytes of FP8 records)
/// is {format, tensor.data_ptr(), num_blocks, block_size} with the default stride. When the
/// layers of a model share one tensor [layers, num_blocks, ...], each layer is its own buffer.
struct PagedLatentBuffer {
  LatentRecordFormat format;
  void* data = nullptr;
  Index num_blocks = 0;
  Index block_tokens = 0;
  /// Bytes from one block to the next; 0 means block_tokens * format.bytes() (packed).
  std::size_t block_stride = 0;

  std::size_t stride() const {
    return block_stride ? block_stride : static_cast<std::size_t>(block_tokens) * format.bytes();
  }
  /// Throws mla::Error naming what is wrong: no data, non-positive sizes, a stride smaller than
  /// a block, or data or stride not aligned to format.alignment().
  void validate() const {
    detail::require(format.bytes() > 0, "PagedLatentBuffer: the record format is empty");
    detail::require(data != nullptr, "PagedLatentBuffer: data is null");
    detail::require(num_blocks > 0 && num_blocks <= std::numeric_limits<std::int32_t>::max() &&
                        block_tokens > 0 && block_tokens <= (Index{1} << 20),
                    "PagedLatentBuffer: num_blocks must be in [1, 2^31) and block_tokens in "
                    "[1, 2^20], got ",
                    num_blocks, " and ", block_tokens);
    const std::size_t packed = static_cast<std::size_t>(block_tokens) * format.bytes();
    detail::require(block_stride == 0 || block_stride >= packed, "PagedLatentBuffer: block_stride ",
                    block_stride, " is smaller than a block of ", block_tokens, " records of ",
                    format.bytes(), " bytes");
    const std::size_t a = format.alignment();
    detail::require(reinterpret_cast<std::uintptr_t>(data) % a == 0 && stride() % a == 0,
                    "PagedLatentBuffer: data and block_stride must be aligned to ", a,
                    " bytes for ", to_string(format.storage()), " records");
  }
  /// The record of slot `slot` of block `block`.
  unsigned char* record(Index block, Index slot) const {
    return static_cast<unsigned char*>(data) + static_cast<std::size_t>(block) * stride() +
           static_cast<std::size_t>(slot) * format.bytes();
  }
};

/// One sequence's cached tokens for one layer, as the attention kernels read them: a record
/// format, the layer's blocks, the sequence's block table and its length. Non-owning.
/// A view from LatentCache::view is valid until that sequence is changed or removed or the
/// cache is destroyed; a view over a PagedLatentBuffer while the buffer and the table live and
/// their records do not change.
class LatentView {
 public:
  /// A tile of keys as T: rows are tokens.
  template <class T>
  using Tile = Eigen::Map<const RowMatrix<T>, 0, Eigen::OuterStride<>>;

  /// An empty view (no tokens).
  LatentView() = default;

  /// A view of `tokens` records of an engine's buffer: token t is slot t % block_tokens of
  /// block block_table[t / block_tokens]. Throws mla::Error for an invalid buffer, a negative
  /// length, a null table, or a table entry outside [0, num_blocks) (the
  /// ceil(tokens / block_tokens) entries used are checked).
  LatentView(const PagedLatentBuffer& buffer, const std::int32_t* block_table, Index tokens) {
    buffer.validate();
    detail::require(tokens >= 0, "LatentView: negative length ", tokens);
    const Index used = (tokens + buffer.block_tokens - 1) / buffer.block_tokens;
    detail::require(used == 0 || block_table != nullptr, "LatentView: the block table is null");
    for (Index b = 0; b < used; ++b) {
      detail::require(block_table[b] >= 0 && block_table[b] < buffer.num_blocks,
                      "LatentView: block table entry ", b, " is ", block_table[b],
                      ", outside the buffer's [0, ", buffer.num_blocks, ") blocks");
    }
    b_.layer_base = static_cast<const unsigned char*>(buffer.data);
    b_.block_table = block_table;
    b_.block_bytes = buffer.stride();
    b_.block_tokens = buffer.block_tokens;
    b_.tokens = tokens;
    b_.layout = buffer.format.layout();
  }

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
    refs_.assign(static_cast<std::size_t>(options.num_blocks), 0);
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
  std::size_t capacity_bytes() const { return pool_.size; }
  /// Blocks held by sequences (a block shared by several counts once).
  Index blocks_in_use() const { return options_.num_blocks - free_blocks(); }
  /// Blocks not held by any sequence.
  Index free_blocks() const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return static_cast<Index>(free_blocks_.size());
  }
  /// Blocks held by more than one sequence.
  Index shared_blocks() const {
    const std::lock_guard<std::mutex> lock(*mutex_);
    return static_cast<Index>(
        std::count_if(refs_.begin(), refs_.end(), [](std::int32_t r) { return r > 1; }));
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
    release_blocks(s, 0);
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
    detail::require(copies <= static_cast<Index>(free_blocks_.size()),
                    "LatentCache::fork: ", "sequence ", parent, " needs ", copies,
                    " free blocks for its partly filled blocks, but the pool has ",
                    free_blocks_.size(), " of ", options_.num_blocks, " free");
    // Nothing fails from here on.
    for (Index b = 0; b < shared; ++b) {
      const std::int32_t id = p.blocks[static_cast<std::size_t>(b)];
      ++refs_[static_cast<std::size_t>(id)];
      child.blocks.push_back(id);
    }
    for (Index b = shared; b < used; ++b) {
      const std::int32_t id = take_block();
      copy_block(p.blocks[static_cast<std::size_t>(b)], id);
      child.blocks.push_back(id);
    }
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
    release_blocks(s, (kept + options_.block_tokens - 1) / options_.block_tokens);
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
    unsigned char* base = layer_base(layer);
    for (Index i = 0; i < count; ++i) {
      const Index token = cached + i;
      unsigned char* rec =
          base +
          static_cast<std::size_t>(
              s->blocks[static_cast<std::size_t>(token / options_.block_tokens)]) *
              block_bytes_ +
          static_cast<std::size_t>(token % options_.block_tokens) * layout_.token_bytes;
      detail::write_record(layout_, c_kv.row(i).data(), k_pe.row(i).data(), rec);
      if (keys) {
        unsigned char* block =
            base + static_cast<std::size_t>(
                       s->blocks[static_cast<std::size_t>(token / options_.block_tokens)]) *
                       block_bytes_;
        const Index slot = token % options_.block_tokens;
        index_format_.encode(
            keys + i * key_stride,
            block + index_codes_offset_ + static_cast<std::size_t>(slot * index_format_.dim()),
            reinterpret_cast<float*>(block + index_scales_offset_) + slot);
      }
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
        layer_bytes_(other.layer_bytes_),
        pool_(detail::AlignedBytes::allocate(other.pool_.size)),
        mutex_(std::make_unique<std::mutex>()) {
    const std::lock_guard<std::mutex> lock(*other.mutex_);
    refs_ = other.refs_;
    free_blocks_ = other.free_blocks_;
    sequences_ = other.sequences_;
    next_id_ = other.next_id_;
    std::memcpy(pool_.data.get(), other.pool_.data.get(), pool_.size);
    free_blocks_.reserve(static_cast<std::size_t>(options_.num_blocks));
    for (auto& entry : sequences_) {
      entry.second.blocks.reserve(static_cast<std::size_t>(options_.num_blocks));
    }
  }

  unsigned char* layer_base(Index layer) const {
    return pool_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
  }

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
    if (count <= 0) return 0;
    const Index bt = options_.block_tokens;
    const Index len = s.lengths[static_cast<std::size_t>(layer)];
    const Index have = static_cast<Index>(s.blocks.size());
    const Index last = (len + count - 1) / bt;  // last block written
    Index needed = std::max<Index>(0, last + 1 - have);
    for (Index b = len / bt; b <= last && b < have; ++b) {
      if (refs_[static_cast<std::size_t>(s.blocks[static_cast<std::size_t>(b)])] > 1) ++needed;
    }
    return needed;
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
    const Index free = static_cast<Index>(free_blocks_.size());
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
    if (count <= 0) return;
    const Index bt = options_.block_tokens;
    const Index len = s.lengths[static_cast<std::size_t>(layer)];
    const Index last = (len + count - 1) / bt;
    for (Index b = len / bt; b <= last && b < static_cast<Index>(s.blocks.size()); ++b) {
      std::int32_t& id = s.blocks[static_cast<std::size_t>(b)];
      if (refs_[static_cast<std::size_t>(id)] > 1) {  // copy on write
        const std::int32_t fresh = take_block();
        copy_block(id, fresh);
        --refs_[static_cast<std::size_t>(id)];
        id = fresh;
      }
    }
    while (static_cast<Index>(s.blocks.size()) <= last) s.blocks.push_back(take_block());
  }

  std::int32_t take_block() {
    const std::int32_t id = free_blocks_.back();
    free_blocks_.pop_back();
    refs_[static_cast<std::size_t>(id)] = 1;
    return id;
  }

  /// Copies block `from` to block `to` in every layer.
  void copy_block(std::int32_t from, std::int32_t to) {
    for (Index layer = 0; layer < options_.num_layers; ++layer) {
      unsigned char* base = layer_base(layer);
      std::memcpy(base + static_cast<std::size_t>(to) * block_bytes_,
                  base + static_cast<std::size_t>(from) * block_bytes_, block_bytes_);
    }
  }

  /// Gives up the sequence's blocks from index `keep` on (lock held).
  void release_blocks(Sequence& s, Index keep) {
    for (std::size_t b = static_cast<std::size_t>(keep); b < s.blocks.size(); ++b) {
      const std::int32_t id = s.blocks[b];
      if (--refs_[static_cast<std::size_t>(id)] == 0) free_blocks_.push_back(id);
    }
    s.blocks.resize(std::min(s.blocks.size(), static_cast<std::size_t>(keep)));
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
  std::size_t layer_bytes_ = 0;
  detail::AlignedBytes pool_;
  std::unique_ptr<std::mutex> mutex_;  // guards everything below
  std::vector<std::int32_t> refs_;     // per block: sequences holding it
  std::vector<std::int32_t> free_blocks_;
  std::unordered_map<SequenceId, Sequence> sequences_;
  SequenceId next_id_ = 0;
};

}  // namespace mla
