#pragma once
/// \file
/// One layer's latent records where they are: the record format and its codec
/// (LatentRecordFormat), an engine's paged buffer of records (PagedLatentBuffer) and one
/// sequence's records as the kernels read them (LatentView). LatentCache (mla/latent_cache.hpp)
/// owns such records; an engine can keep its own.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mla/detail/bfloat16.hpp"
#include "mla/detail/isa/dispatch.hpp"
#include "mla/detail/latent_blocks.hpp"
#include "mla/detail/record_layout.hpp"
#include "mla/error.hpp"
#include "mla/formats.hpp"
#include "mla/fp8.hpp"
#include "mla/matrix.hpp"
#include "mla/quant.hpp"

namespace mla {

class LatentCache;

namespace detail {

/// The record codec: encodes one token, c [d_c] and k [R] of T, into its record, segment by
/// segment (for_each_segment). Quantisation (FP8) and rounding (BF16) happen here, once. Uses no
/// heap memory.
template <class T>
void write_record(const LatentLayout& l, const T* c, const T* k, unsigned char* rec) {
  const Index D = l.kv_lora_rank;
  for_each_segment(l, [&](const RecordSegment& s) {
    const T* src = s.first < D ? c + s.first : k + (s.first - D);
    unsigned char* dst = rec + s.offset;
    const auto n = static_cast<std::size_t>(s.count);
    const auto store_as = [&](auto zero) {
      using S = decltype(zero);
      for (std::size_t i = 0; i < n; ++i) {
        S x;
        if constexpr (std::is_same_v<S, Eigen::bfloat16>) {
          x = to_bfloat16(src[i]);
        } else {
          x = static_cast<S>(src[i]);
        }
        std::memcpy(dst + sizeof(S) * i, &x, sizeof(S));
      }
    };
    switch (s.element) {
      case Element::kFloat32:
        store_as(float{});
        break;
      case Element::kFloat64:
        store_as(double{});
        break;
      case Element::kBFloat16:
        store_as(Eigen::bfloat16{});
        break;
      case Element::kE4M3: {
        // Quantised from the values as float, one scale per segment (a 128-value tile).
        const float* cf = nullptr;
        float tile[LatentLayout::kFp8Tile];
        if constexpr (std::is_same_v<T, float>) {
          cf = src;
        } else {
          for (std::size_t i = 0; i < n; ++i) tile[i] = static_cast<float>(src[i]);
          cf = tile;
        }
        float scale = 0.0f;
        quantize_e4m3_tiles(cf, s.count, s.count, 0.0f, l.fp8_scales,
                            reinterpret_cast<float8_e4m3fn*>(dst), &scale);
        std::memcpy(rec + s.scale_offset, &scale, sizeof(float));
        break;
      }
    }
  });
}

/// The record codec: decodes one token's record into c [d_c] and k [R] of T, segment by segment
/// (exact for float and double: every storage format widens to float without rounding).
/// `scratch` holds d_c floats (used when T is not float).
template <class T>
void read_record(const LatentLayout& l, const unsigned char* rec, T* c, T* k, float* scratch) {
  const Index D = l.kv_lora_rank;
  for_each_segment(l, [&](const RecordSegment& s) {
    T* dst = s.first < D ? c + s.first : k + (s.first - D);
    const unsigned char* src = rec + s.offset;
    const auto n = static_cast<std::size_t>(s.count);
    const auto load_as = [&](auto zero) {
      using S = decltype(zero);
      for (std::size_t i = 0; i < n; ++i) {
        S x;
        std::memcpy(&x, src + sizeof(S) * i, sizeof(S));
        dst[i] = static_cast<T>(x);
      }
    };
    if (s.element == Element::kFloat32) {
      load_as(float{});
    } else if (s.element == Element::kFloat64) {
      load_as(double{});
    } else {  // BF16 values or E4M3 codes times the scale: through float, exactly
      float* f = std::is_same_v<T, float> ? reinterpret_cast<float*>(dst) : scratch;
      if (s.element == Element::kBFloat16) {
        bfloat16_to_float(src, n, f);
      } else {
        from_fp8(reinterpret_cast<const float8_e4m3fn*>(src), n, f, s.scale(rec));
      }
      if constexpr (!std::is_same_v<T, float>) {
        for (std::size_t i = 0; i < n; ++i) dst[i] = static_cast<T>(f[i]);
      }
    }
  });
}
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

  /// Start of the records of the b-th block of the sequence (b < ceil(tokens / block_tokens));
  /// not for a selection.
  const unsigned char* block(Index b) const { return b_.block(b); }
  /// The record of one token.
  const unsigned char* record(Index token) const { return b_.record(token); }
  /// Where the records are (for the kernels).
  const detail::LatentBlocks& blocks() const { return b_; }

  /// The tokens [first, first + count) as a view of their own, for splitting attention over key
  /// ranges (each part's result merges by its log-sum-exp). `first` must start a block; not for
  /// a selection.
  LatentView subview(Index first, Index count) const {
    detail::require(b_.positions == nullptr, "LatentView::subview: the view is a selection");
    detail::require(
        first >= 0 && count >= 0 && first + count <= b_.tokens && first % b_.block_tokens == 0,
        "LatentView::subview: tokens [", first, ", ", first + count, ") must lie in [0, ",
        b_.tokens, ") and start a block of ", b_.block_tokens);
    LatentView v = *this;
    v.b_.block_table += first / b_.block_tokens;
    v.b_.tokens = count;
    return v;
  }
  /// The records of the positions `positions[0, count)` (each in [0, tokens()), any order,
  /// repeats allowed) as a view of `count` tokens, read where they are: token j of the result is
  /// token positions[j] of this view. The positions must outlive the result. Throws mla::Error
  /// naming the first position out of range, or for a view that is a selection itself.
  LatentView select(const std::int32_t* positions, Index count) const {
    detail::require(b_.positions == nullptr, "LatentView::select: the view is a selection");
    detail::require(count >= 0 && (count == 0 || positions != nullptr),
                    "LatentView::select: ", count, " positions at ",
                    static_cast<const void*>(positions));
    for (Index i = 0; i < count; ++i) {
      detail::require(positions[i] >= 0 && positions[i] < b_.tokens,
                      "LatentView::select: position ", positions[i], " (entry ", i,
                      ") is outside [0, ", b_.tokens, ")");
    }
    LatentView v = *this;
    v.b_.positions = positions;
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
      // A selection's records are not contiguous: its tiles are always converted, record by
      // record.
      const Index n = b_.positions
                          ? std::min(max_tile, b_.tokens - first)
                          : std::min({max_tile, b_.block_tokens - in_block, b_.tokens - first});
      const unsigned char* rec = record(first);
      if (b_.layout.holds<T>() && !b_.positions) {
        const auto* p = reinterpret_cast<const T*>(rec);
        const Eigen::OuterStride<> stride(static_cast<Index>(b_.layout.token_bytes / sizeof(T)));
        f(first, n, Tile<T>(p, n, D, stride), Tile<T>(p + D, n, R, stride));
      } else {
        for (Index i = 0; i < n; ++i) {
          detail::read_record(b_.layout, record(first + i), c_buf.row(i).data(),
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

}  // namespace mla
