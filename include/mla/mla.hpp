#pragma once
/// \file
/// The umbrella header: include this to get the whole library.
///
/// mla is a header-only C++17 library for DeepSeek-style Multi-Head Latent Attention with a
/// latent KV cache. Element types are template parameters; every dimension is a runtime value.

#include "mla/attention.hpp"
#include "mla/config.hpp"
#include "mla/decode.hpp"
#include "mla/decode_options.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/formats.hpp"
#include "mla/fp8.hpp"
#include "mla/index_keys.hpp"
#include "mla/isa.hpp"
#include "mla/latent_cache.hpp"
#include "mla/latent_view.hpp"
#include "mla/layer.hpp"
#include "mla/matrix.hpp"
#include "mla/norm.hpp"
#include "mla/paged_cache.hpp"
#include "mla/precision.hpp"
#include "mla/projection.hpp"
#include "mla/quant.hpp"
#include "mla/rope.hpp"
#include "mla/run_options.hpp"
#include "mla/sparse.hpp"
#include "mla/thread_pool.hpp"
#include "mla/version.hpp"
#include "mla/weights.hpp"
#include "mla/workspace.hpp"
