// The projections' matmul on AMX tiles for BF16 dot products (GemmArgs::dp: kBf16 activations,
// or W8A8's E4M3 codes) with more tokens than the streaming path takes, B = W^T: per panel of
// up to 64 weight rows and K block, C [16 weight rows][16 tokens] = A (the panel's weight rows
// as BF16, exact for BF16 and FP8 weights) B (the activations transposed in BF16 pairs), the FP32
// sums of each K block scaled (FP8 block scale, W8A8 token scale) and added, as DeepSeek's
// fp8_gemm does. Everything else (FP32 products, row slices, few tokens) stays on the
// AVX512-BF16 kernels. Written over a tile backend; included inside the AMX namespace after
// decode_amx.inl. No include guard on purpose.

namespace gemm_amx {

using decode_amx::for_blocks;
using decode_amx::Operand;
using decode_amx::product;
namespace base = avx512_bf16::gemm_kernel;

/// Floats of GemmArgs::scratch beyond the AVX-512 kernels' panel and accumulators: the padded
/// activation pairs of a K block's last 32 values and four accumulator tiles.
inline constexpr Index kExtraFloats = 16 * base::kTokensBlock + 4 * 256;
static_assert(base::kRowsPanel * 256 + base::kRowsPanel * base::kTokensBlock + kExtraFloats <=
                  kGemmScratchFloats,
              "GemmArgs::scratch holds the tile kernel's buffers");

template <class Tiles>
void rows_panels(const GemmArgs& a) {
  using Ops = avx512_bf16::Ops;
  using V = Ops::V;
  constexpr Index kTB = base::kTokensBlock, kRP = base::kRowsPanel;
  auto* panel = reinterpret_cast<std::uint16_t*>(a.scratch);  // [64][k32] BF16, zero-padded
  float* acc = a.scratch + kRP * 256;                         // [64][kTB]
  std::uint32_t* xpad = reinterpret_cast<std::uint32_t*>(acc + kRP * kTB);  // [16][kTB]
  float* ctmp = reinterpret_cast<float*>(xpad + 16 * kTB);                  // [4][16][16]
  float scale[kRP];
  const Index m_pad = (a.M + 15) / 16 * 16;
  const Index k_pairs = (a.K + 1) / 2;  // pair rows the activations hold
  Tiles tiles;
  tiles.configure(full_tiles());
  for (Index mb0 = 0; mb0 < m_pad; mb0 += kTB) {
    const Index mb = std::min(kTB, m_pad - mb0);
    for (Index n0 = a.n_begin; n0 < a.n_end; n0 += kRP) {
      const Index nr = std::min(kRP, a.n_end - n0), nr16 = (nr + 15) / 16 * 16;
      std::fill(acc, acc + kRP * kTB, 0.0f);
      for (Index k0 = 0; k0 < a.K;) {
        const Index k1 = base::next_k_block(a, k0), kl = k1 - k0;
        const Index kb = (kl + 31) / 32, k32 = kb * 32;
        // Weight rows as BF16, k32 apart, zero past kl and past nr.
        for (Index r = 0; r < nr16; ++r) {
          std::uint16_t* row = panel + r * k32;
          if (r < nr) {
            base::decode_rows_bf16(a, n0 + r, 1, k0, kl, row);
            std::fill(row + kl, row + k32, std::uint16_t{0});
          } else {
            std::fill(row, row + k32, std::uint16_t{0});
          }
        }
        for (Index r = 0; r < nr; ++r) scale[r] = base::b_scale(a, k0, n0 + r);
        const float* sx = a.xt_scales ? a.xt_scales + (k0 / a.block_cols) * a.xt_stride : nullptr;
        // The last k block's activation pairs, zero past K, when the activations end inside it.
        const Index last_pair = k0 / 2 + (kb - 1) * 16;
        const bool pad = last_pair + 16 > k_pairs;
        if (pad) {
          for (Index p = 0; p < 16; ++p) {
            std::uint32_t* dst = xpad + p * kTB;
            if (last_pair + p < k_pairs) {
              std::memcpy(dst, a.xt_pairs + (last_pair + p) * a.xt_stride + mb0,
                          sizeof(std::uint32_t) * static_cast<std::size_t>(mb));
            } else {
              std::fill(dst, dst + mb, 0u);
            }
          }
        }
        Operand A;  // A(i, k) = weight rows 16 i.., k block k
        A.base = reinterpret_cast<const unsigned char*>(panel);
        A.stride = k32 * 2;
        A.step_i = 16 * k32 * 2;
        A.step_k = 64;
        Operand B;  // B(j, k) = pair rows of k block k, tokens 16 j..
        B.base = reinterpret_cast<const unsigned char*>(a.xt_pairs + (k0 / 2) * a.xt_stride + mb0);
        B.stride = a.xt_stride * 4;
        B.step_i = 16 * 4;
        B.step_k = 16 * a.xt_stride * 4;
        Operand Bp = B;  // the padded last k block, as if at k block kb - 1
        Bp.base = reinterpret_cast<const unsigned char*>(xpad) - (kb - 1) * 16 * kTB * 4;
        Bp.stride = kTB * 4;
        Bp.step_k = 16 * kTB * 4;
        for_blocks(nr16 / 16, mb / 16, [&](auto mi, auto nj, Index i, Index j) {
          constexpr int MI = decltype(mi)::value, NJ = decltype(nj)::value;
          Operand Ai = A;
          Ai.base += i * A.step_i;
          Operand Bj = B, Bpj = Bp;
          Bj.base += j * B.step_i;
          Bpj.base += j * Bp.step_i;
          auto* c = reinterpret_cast<unsigned char*>(ctmp);
          const Index plain = pad ? kb - 1 : kb;
          product<MI, NJ, false>(tiles, Ai, Bj, 0, plain, 1, c, 64, 2 * 1024, 1024, false);
          if (pad)
            product<MI, NJ, false>(tiles, Ai, Bpj, kb - 1, kb, 1, c, 64, 2 * 1024, 1024, true);
          // acc[row][token] += tile * scale[row] (* the tokens' W8A8 scales).
          for (int ii = 0; ii < MI; ++ii) {
            for (int jj = 0; jj < NJ; ++jj) {
              const float* src = ctmp + (2 * ii + jj) * 256;
              const Index m = (j + jj) * 16;
              const V fx = sx ? Ops::load(sx + mb0 + m) : Ops::set1(1.0f);
              for (int rr = 0; rr < 16; ++rr) {
                const Index r = (i + ii) * 16 + rr;
                if (r >= nr) break;
                float* dst = acc + r * kTB + m;
                const V f = Ops::mul(Ops::set1(scale[r]), fx);
                Ops::store(dst, Ops::fmadd(Ops::load(src + rr * 16), f, Ops::load(dst)));
              }
            }
          }
        });
        k0 = k1;
      }
      base::store_rows_panel(a, acc, mb0, mb, n0, nr);
    }
  }
  tiles.release();
}

template <class Tiles>
void gemm(const GemmArgs& a) {
  if (a.n_begin < a.n_end && a.M > base::kStreamTokens && a.dp && a.xt_pairs != nullptr &&
      a.layout == GemmArgs::Layout::kTransposedRows) {
    rows_panels<Tiles>(a);
    return;
  }
  avx512_bf16::gemm(a);
}

}  // namespace gemm_amx
