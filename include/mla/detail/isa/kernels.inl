// The kernels of one instruction-set target, written once over `Ops` (the target's vector of
// floats and its operations, defined just before this file is included) and compiled once per
// target, file by concern: primitives.inl (exp, conversions, record widening, the online
// softmax step), decode_frame.inl with its policies decode_fma.inl and decode_bf16.inl,
// attention.inl (expanded prefill), gemm.inl (projections), and the table here: each
// detail/isa/<target>.hpp includes this file inside its own namespace and, for the x86 targets,
// inside its instruction-set region. So every function here has one body per target and a distinct
// name per target. Nothing here names an instruction set. No include guard on purpose; everything
// it uses comes from kernels_prelude.hpp.

using V = Ops::V;
inline constexpr int kW = Ops::kWidth;

// In this order: each file uses the ones before it.
// clang-format off
#include "mla/detail/isa/primitives.inl"
#include "mla/detail/isa/decode_frame.inl"
#include "mla/detail/isa/decode_fma.inl"
#include "mla/detail/isa/decode_bf16.inl"
#include "mla/detail/isa/attention.inl"
#include "mla/detail/isa/gemm.inl"
// clang-format on

// ---------------------------------------------------------------------------------------------
// The table

/// The decode steps' scratch at this target's width.
inline void reserve_decode(decode::Buffers& b, const MlaConfig& c, const DecodeOptions& o,
                           int threads, Index tokens) {
  b.reserve(c, o, threads, kW, tokens, false);
}

inline const Kernels& table() {
  static const Kernels k = [] {
    Kernels t;
    t.isa = Ops::kIsa;
    t.width = kW;
    t.reserve_decode = &reserve_decode;
    t.encode_e4m3 = &encode_e4m3;
    t.encode_e5m2 = &encode_e5m2;
    t.decode_e4m3 = &decode_e4m3;
    t.decode_e5m2 = &decode_e5m2;
    t.widen_bf16 = &widen_bf16;
    t.exp = &exp_span;
    t.decode_absorbed = &decode_absorbed;
    t.decode_absorbed_bf16 = &decode_absorbed_bf16;
    t.gemm = &gemm;
    t.attention_tile = &attention_tile;
    return t;
  }();
  return k;
}
