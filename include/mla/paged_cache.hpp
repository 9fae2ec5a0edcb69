#pragma once
/// \file
/// An engine's own paged cache as MlaLayer::forward takes it: `PagedCache` (one layer's
/// buffers: latent records and, for DeepSeek-V3.2 layers, index keys) and `PagedEntry` (one
/// sequence's share of a batch: its block table and lengths). The buffers' byte layouts are in
/// mla/latent_view.hpp and mla/index_keys.hpp.

#include <cstdint>

#include "mla/index_keys.hpp"
#include "mla/latent_view.hpp"
#include "mla/matrix.hpp"

namespace mla {

/// One sequence's share of a batch over an engine's own cache (MlaLayer::forward over a
/// PagedCache): its block table (it must already hold the blocks of the new tokens: the engine
/// allocates them), the `cached` tokens it holds before the call, and `tokens` new ones at
/// positions start_pos, start_pos + 1, ... The new tokens' records are written into slots cached,
/// cached + 1, ...
struct PagedEntry {
  const std::int32_t* block_table = nullptr;
  Index cached = 0;
  std::int64_t start_pos = 0;
  Index tokens = 1;
};

/// One layer's part of an engine's paged cache: its latent records (`latents`, required) and,
/// for a DeepSeek-V3.2 layer with an indexer of its own, its index keys (`index_keys`: the same
/// block ids and block size, one block table for both, as vLLM keeps its indexer cache;
/// nullptr for every other layer). Views: the buffers stay the engine's and must outlive the
/// call.
struct PagedCache {
  const PagedLatentBuffer* latents = nullptr;
  const PagedIndexBuffer* index_keys = nullptr;
};

}  // namespace mla
