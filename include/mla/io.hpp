#pragma once
/// \file
/// Reading real checkpoints: safetensors (memory-mapped, sharded), DeepSeek's config.json, one
/// layer's attention weights by their checkpoint names, Llama-style layers for conversion to
/// MLA, and .npy arrays. Needs nlohmann_json
/// (link mla::io instead of mla::mla).

#include "mla/io/checkpoint.hpp"
#include "mla/io/config.hpp"
#include "mla/io/layer_loader.hpp"
#include "mla/io/llama.hpp"
#include "mla/io/npy.hpp"
#include "mla/io/safetensors.hpp"
#include "mla/mla.hpp"
