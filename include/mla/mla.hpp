#pragma once
/// \file
/// The umbrella header: include this to get the whole library.
///
/// mla is a header-only C++17 library for DeepSeek-style Multi-Head Latent Attention with a
/// latent KV cache. Element types are template parameters; every dimension is a runtime value.

#include "mla/fp8.hpp"
#include "mla/version.hpp"
