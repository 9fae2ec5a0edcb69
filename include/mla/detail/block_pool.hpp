#pragma once
/// \file
/// The memory of a paged cache: a pool of fixed-size blocks for every layer, with a reference
/// count per block (blocks shared between sequences by fork are copied before a write) and a free
/// list. It knows blocks, not tokens' meaning: LatentCache (mla/latent_cache.hpp) keeps the
/// sequences, their positions and what a block holds. Not thread-safe: its owner locks. Internal.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "mla/error.hpp"
#include "mla/matrix.hpp"

namespace mla::detail {

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

/// A block table: the ids of one sequence's blocks, in order.
using BlockTable = std::vector<std::int32_t>;

class BlockPool {
 public:
  BlockPool() = default;

  /// Allocates `blocks` blocks of `block_bytes` bytes for each of `layers` layers (layer l's
  /// blocks contiguous). Throws mla::Error when the memory cannot be had.
  BlockPool(Index layers, Index blocks, std::size_t block_bytes)
      : layers_(layers), blocks_(blocks), block_bytes_(block_bytes) {
    // The size in double first, so that an absurd request fails with a clear message instead
    // of wrapping around.
    const double bytes = static_cast<double>(block_bytes) * static_cast<double>(blocks) *
                         static_cast<double>(layers);
    require(bytes < 0x1p62, "LatentCache: a pool of ", bytes, " bytes is too large");
    layer_bytes_ = block_bytes * static_cast<std::size_t>(blocks);
    try {
      memory_ = AlignedBytes::allocate(layer_bytes_ * static_cast<std::size_t>(layers));
    } catch (const std::bad_alloc&) {
      fail("LatentCache: cannot allocate ", bytes / (1 << 20), " MiB for ", blocks, " blocks x ",
           layers, " layers");
    }
    refs_.assign(static_cast<std::size_t>(blocks), 0);
    free_.reserve(static_cast<std::size_t>(blocks));
    // Hand out low block ids first.
    for (Index b = blocks - 1; b >= 0; --b) free_.push_back(static_cast<std::int32_t>(b));
  }

  /// A deep copy: the memory, the counts and the free list.
  BlockPool clone() const {
    BlockPool p;
    p.layers_ = layers_;
    p.blocks_ = blocks_;
    p.block_bytes_ = block_bytes_;
    p.layer_bytes_ = layer_bytes_;
    p.memory_ = AlignedBytes::allocate(memory_.size);
    std::memcpy(p.memory_.data.get(), memory_.data.get(), memory_.size);
    p.refs_ = refs_;
    p.free_ = free_;
    p.free_.reserve(static_cast<std::size_t>(blocks_));
    return p;
  }

  Index num_blocks() const { return blocks_; }
  std::size_t block_bytes() const { return block_bytes_; }
  /// Bytes of the whole pool (every layer).
  std::size_t bytes() const { return memory_.size; }
  /// Block 0 of a layer.
  unsigned char* layer_base(Index layer) const {
    return memory_.data.get() + static_cast<std::size_t>(layer) * layer_bytes_;
  }
  /// Blocks no sequence holds.
  Index free_blocks() const { return static_cast<Index>(free_.size()); }
  /// Blocks held more than once.
  Index shared_blocks() const {
    return static_cast<Index>(
        std::count_if(refs_.begin(), refs_.end(), [](std::int32_t r) { return r > 1; }));
  }

  /// Blocks that writing the slots [first, first + count) of `table` (block_tokens slots per
  /// block) takes: new blocks past the table's end, and copies of shared blocks it would write.
  Index needed(const BlockTable& table, Index first, Index count, Index block_tokens) const {
    if (count <= 0) return 0;
    const Index have = static_cast<Index>(table.size());
    const Index last = (first + count - 1) / block_tokens;  // last block written
    Index n = std::max<Index>(0, last + 1 - have);
    for (Index b = first / block_tokens; b <= last && b < have; ++b) {
      if (refs_[static_cast<std::size_t>(table[static_cast<std::size_t>(b)])] > 1) ++n;
    }
    return n;
  }

  /// Makes the slots [first, first + count) of `table` writable: copies the shared blocks they
  /// fall in (copy on write) and extends the table. needed() blocks must be free.
  void prepare(BlockTable& table, Index first, Index count, Index block_tokens) {
    if (count <= 0) return;
    const Index last = (first + count - 1) / block_tokens;
    for (Index b = first / block_tokens; b <= last && b < static_cast<Index>(table.size()); ++b) {
      std::int32_t& id = table[static_cast<std::size_t>(b)];
      if (refs_[static_cast<std::size_t>(id)] > 1) {
        const std::int32_t fresh = take();
        copy(id, fresh);
        --refs_[static_cast<std::size_t>(id)];
        id = fresh;
      }
    }
    while (static_cast<Index>(table.size()) <= last) table.push_back(take());
  }

  /// Appends to `to` the first `shared` blocks of `from` by reference and copies of its blocks
  /// [shared, used) (a fork: full blocks shared, a partly filled one copied). used - shared
  /// blocks must be free.
  void fork(const BlockTable& from, Index shared, Index used, BlockTable& to) {
    for (Index b = 0; b < shared; ++b) {
      const std::int32_t id = from[static_cast<std::size_t>(b)];
      ++refs_[static_cast<std::size_t>(id)];
      to.push_back(id);
    }
    for (Index b = shared; b < used; ++b) {
      const std::int32_t id = take();
      copy(from[static_cast<std::size_t>(b)], id);
      to.push_back(id);
    }
  }

  /// Gives up the table's blocks from index `keep` on (a block goes back to the free list when
  /// no table holds it any more).
  void release(BlockTable& table, Index keep) {
    for (std::size_t b = static_cast<std::size_t>(keep); b < table.size(); ++b) {
      const std::int32_t id = table[b];
      if (--refs_[static_cast<std::size_t>(id)] == 0) free_.push_back(id);
    }
    table.resize(std::min(table.size(), static_cast<std::size_t>(keep)));
  }

 private:
  std::int32_t take() {
    const std::int32_t id = free_.back();
    free_.pop_back();
    refs_[static_cast<std::size_t>(id)] = 1;
    return id;
  }

  /// Copies block `from` to block `to` in every layer.
  void copy(std::int32_t from, std::int32_t to) {
    for (Index layer = 0; layer < layers_; ++layer) {
      unsigned char* base = layer_base(layer);
      std::memcpy(base + static_cast<std::size_t>(to) * block_bytes_,
                  base + static_cast<std::size_t>(from) * block_bytes_, block_bytes_);
    }
  }

  Index layers_ = 0, blocks_ = 0;
  std::size_t block_bytes_ = 0, layer_bytes_ = 0;
  AlignedBytes memory_;
  std::vector<std::int32_t> refs_;  // per block: tables holding it
  std::vector<std::int32_t> free_;
};

}  // namespace mla::detail
