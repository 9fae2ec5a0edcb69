#pragma once
/// \file
/// Where a forward pass of MlaLayer writes its new records and what its rows attend over: a
/// LatentCache (CacheTarget) or an engine's paged buffers (PagedTarget). MlaLayer's one forward
/// pass (MlaLayer::run) is written over either. Internal.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "mla/index_keys.hpp"
#include "mla/latent_cache.hpp"
#include "mla/latent_view.hpp"
#include "mla/matrix.hpp"
#include "mla/paged_cache.hpp"

namespace mla {

namespace detail {

/// Where a call's new records go and what its rows attend over: a LatentCache (CacheTarget)
/// or an engine's paged buffers (PagedTarget). Each provides cached(i) (part i's records
/// before the call), prepare() (everything that can fail, before anything is written),
/// write(i, c, k, index_key) for part i's rows, view(i) and index_view(i) (after the writes),
/// and index_key_dim() (0: no index keys kept).
template <class T, class Part>
struct CacheTarget {
  LatentCache& cache;
  Index layer;
  const std::vector<Part>& parts;
  const std::vector<SequenceId>& ids;
  std::vector<Index>& counts;
  std::vector<std::int64_t>& positions;

  Index cached(std::size_t i) const { return cache.length(ids[i], layer); }
  Index index_key_dim() const {
    return cache.has_index_keys() ? cache.index_key_format().dim() : 0;
  }
  /// Positions, room and the blocks of every part, atomically (under the cache's lock).
  void prepare() {
    const std::size_t n = parts.size();
    counts.resize(n);
    positions.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      counts[i] = parts[i].tokens;
      positions[i] = parts[i].start_pos;
    }
    cache.reserve_append(ids.data(), counts.data(), positions.data(), static_cast<Index>(n), layer);
  }
  template <class C, class K, class I>
  void write(std::size_t i, const C& c, const K& k, const I& index_key) {
    const auto& p = parts[i];
    if (index_key_dim() > 0) {
      cache.append<T>(ids[i], layer, c, k, index_key, p.start_pos);
    } else {
      cache.append<T>(ids[i], layer, c, k, p.start_pos);
    }
  }
  LatentView view(std::size_t i) const { return cache.view(ids[i], layer); }
  IndexKeyView index_view(std::size_t i) const { return cache.index_view(ids[i], layer); }
};

template <class T>
struct PagedTarget {
  const PagedLatentBuffer& buffer;
  const PagedIndexBuffer* index_buffer;  // DeepSeek-V3.2 layers' index keys, else nullptr
  const std::vector<PagedEntry>& entries;

  Index cached(std::size_t i) const { return entries[i].cached; }
  Index index_key_dim() const { return index_buffer ? index_buffer->format.dim() : 0; }
  void prepare() {}  // checked by the entry point: the engine owns the blocks
  template <class C, class K, class I>
  void write(std::size_t i, const C& c, const K& k, const I& index_key) {
    const PagedEntry& e = entries[i];
    const Index bt = buffer.block_tokens;
    for (Index t = 0; t < c.rows(); ++t) {
      const Index token = e.cached + t, block = e.block_table[token / bt], slot = token % bt;
      buffer.format.encode<T>(c.row(t).data(), k.row(t).data(), buffer.record(block, slot));
      if (index_buffer) index_buffer->encode(block, slot, index_key.row(t).data());
    }
  }
  LatentView view(std::size_t i) const {
    return LatentView(buffer, entries[i].block_table, entries[i].cached + entries[i].tokens);
  }
  IndexKeyView index_view(std::size_t i) const {
    return index_buffer ? IndexKeyView(*index_buffer, entries[i].block_table,
                                       entries[i].cached + entries[i].tokens)
                        : IndexKeyView();
  }
};

}  // namespace detail
}  // namespace mla
