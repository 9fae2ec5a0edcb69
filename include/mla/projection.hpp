#pragma once
/// \file
/// The projection concept: a weight object with `rows()`, `cols()` and `apply(x, y)`, and the
/// free function `project(w, x, y)` that the layer calls for every matrix it applies
/// (x -> c^Q, x -> [c^KV ; k_raw], c^Q -> q, c^KV -> [k_nope ; v], o -> u). A Linear holds its
/// weight dense in the compute type, in BF16, or in DeepSeek-V3's block-scaled FP8, owned or
/// borrowed from memory someone else keeps alive (a memory-mapped checkpoint); the call site is
/// the same. For float every storage runs on the kernels of the active instruction set
/// (mla/isa.hpp), threaded over output columns on an Executor (e.g. an mla::ThreadPool) when one is
/// given.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "mla/detail/bfloat16.hpp"
#include "mla/detail/fp8_gemm.hpp"
#include "mla/detail/isa/dispatch.hpp"
#include "mla/error.hpp"
#include "mla/executor.hpp"
#include "mla/matrix.hpp"
#include "mla/precision.hpp"
#include "mla/quant.hpp"

namespace mla {

/// How a block-FP8 weight is multiplied.
enum class Fp8Matmul : std::uint8_t {
  kW8A32,  ///< activations stay in the compute type; weights are FP8
  kW8A8,   ///< activations are quantised to e4m3 per token per 128 channels (DeepSeek's fp8_gemm)
};

/// How to quantise a dense weight to block FP8 (Linear::quantize_fp8).
struct Fp8Options {
  Fp8Matmul matmul = Fp8Matmul::kW8A32;
  Index block_rows = 128;  ///< DeepSeek-V3: weight_block_size [128, 128]
  Index block_cols = 128;
  ScaleFormat weight_scales = ScaleFormat::kFloat32;
  ScaleFormat activation_scales = ScaleFormat::kFloat32;  ///< W8A8 only
};

/// How a Linear stores its weight.
enum class WeightStorage : std::uint8_t {
  kDense,     ///< the compute type itself
  kBf16,      ///< BF16, 2 bytes per value (BF16 checkpoints such as DeepSeek-V2 and V2-Lite)
  kBlockFp8,  ///< e4m3 codes with a scale per block (DeepSeek-V3)
};

namespace detail {

/// Calls f(i0, i1) for [0, n) in blocks of `block`, on the pool when it has several threads.
template <class F>
void for_blocks(Executor* pool, Index n, Index block, F&& f) {
  const Index blocks = (n + block - 1) / block;
  const auto task = [&](Index b, int) { f(b * block, std::min(n, (b + 1) * block)); };
  mla::parallel_for(pool, blocks, task);
}

}  // namespace detail

/// Scratch memory of projections: sized on first use, reused. One workspace serves one call
/// at a time (the calls of one layer, one after the other).
class ProjectionWorkspace {
 public:
  /// (internal) The buffers.
  struct Buffers {
    detail::AlignedVector<float> x;            // activations as the kernel multiplies them [M][K]
    detail::AlignedVector<std::uint16_t> x16;  // the same in BF16, [M][K + 1] (dot products)
    detail::AlignedVector<float> x_scales;     // W8A8: [M][K blocks]
    detail::AlignedVector<float> xt;           // [K][M padded]: the activations transposed
    detail::AlignedVector<std::uint32_t> xt_pairs;     // [K / 2][M padded], BF16 pairs
    detail::AlignedVector<float> xt_scales;            // W8A8: [K blocks][M padded]
    std::vector<float8_e4m3fn> codes;                  // W8A8: one row's codes
    std::vector<detail::AlignedVector<float>> panels;  // per thread: the decoded weight panel
    detail::Fp8GemmScratch<double> reference;          // FP8 weights in double (reference route)
  };
  Buffers& buffers() { return b_; }

  /// Makes room for calls on `threads` threads, and, when `bf16_activations`, for activations
  /// of up to `tokens` x `cols` rounded to BF16 (Precision::kBf16 or W8A8) on the streaming
  /// path (up to 8 tokens). Calls grow it as they need; this moves the allocations out of them.
  void reserve(int threads, Index tokens, Index cols, bool bf16_activations) {
    if (static_cast<int>(b_.panels.size()) < threads) {
      b_.panels.resize(static_cast<std::size_t>(threads));
    }
    for (auto& p : b_.panels) detail::grow(p, detail::isa::kGemmScratchFloats);
    if (bf16_activations) {
      detail::grow(b_.x, tokens * cols);
      detail::grow(b_.x_scales, tokens * ((cols + 15) / 16));
      detail::grow(b_.codes, cols);
    }
  }

 private:
  Buffers b_;
};

/// Where and how a projection runs.
struct ProjectionContext {
  /// Threads for the columns of the output (used, not owned); nullptr: the calling thread.
  Executor* pool = nullptr;
  /// kFp32 (the default: FP32 products of the stored values) or kBf16 (activations rounded to
  /// BF16 once, then BF16 dot products; for BF16 and FP8 weights: dense weights always
  /// multiply in the compute type).
  Precision precision = Precision::kFp32;
  /// Scratch; nullptr makes the call use (and allocate) a temporary one.
  ProjectionWorkspace* workspace = nullptr;
};

/// A linear map stored as a weight [out, in] (the checkpoints' layout): y = W x for each
/// token x. Tokens are rows, so `apply` computes Y = X W^T.
///
/// Copies are cheap for BF16 weights (they share the immutable values) and for borrowed
/// weights; dense and owned FP8 weights are copied.
template <class T>
class Linear {
 public:
  using Scalar = T;

  /// An empty projection (0 x 0), e.g. wq when the query is compressed.
  Linear() = default;

  /// Takes ownership of a dense weight [out, in].
  explicit Linear(RowMatrix<T> weight) : dense_(std::move(weight)) {}

  /// A block-FP8 weight (for instance a checkpoint's codes and weight_scale_inv, owned or
  /// borrowed), multiplied W8A32 or W8A8.
  explicit Linear(BlockFp8Matrix weight, Fp8Matmul matmul = Fp8Matmul::kW8A32,
                  ScaleFormat activation_scales = ScaleFormat::kFloat32)
      : fp8_(std::move(weight)), matmul_(matmul), activation_scales_(activation_scales) {}

  /// Quantises a dense weight [out, in] to block FP8 (from its float values).
  static Linear quantize_fp8(const RowMatrix<T>& weight, const Fp8Options& options = {}) {
    const RowMatrix<float> w = weight.template cast<float>();
    return Linear(BlockFp8Matrix::quantize(w.data(), w.rows(), w.cols(), options.block_rows,
                                           options.block_cols, options.weight_scales),
                  options.matmul, options.activation_scales);
  }

  /// The weight [out, in] rounded once to BF16 (nearest even), owned.
  static Linear bf16(const RowMatrix<T>& weight) {
    auto values =
        std::make_shared<std::vector<std::uint16_t>>(static_cast<std::size_t>(weight.size()));
    for (Index i = 0; i < weight.size(); ++i) {
      (*values)[static_cast<std::size_t>(i)] =
          detail::bit_cast<std::uint16_t>(detail::to_bfloat16(weight.data()[i]));
    }
    const void* data = values->data();
    return borrow_bf16(data, weight.rows(), weight.cols(), std::move(values));
  }

  /// A view of a BF16 weight [rows, cols] (row-major, 2 bytes per value, any alignment) that
  /// this Linear does not own: the memory must stay valid and unchanged while the Linear, or
  /// any copy of it, is used. `keep_alive`, when given, is held by every copy for as long as it
  /// lives (mla::io passes the memory-mapped file the tensor lies in).
  static Linear borrow_bf16(const void* data, Index rows, Index cols,
                            std::shared_ptr<const void> keep_alive = nullptr) {
    detail::require(rows >= 0 && cols >= 0 && (data != nullptr || rows * cols == 0),
                    "Linear::borrow_bf16: a [", rows, ", ", cols, "] weight needs data");
    Linear l;
    l.bf16_ = static_cast<const unsigned char*>(data);
    l.bf16_rows_ = rows;
    l.bf16_cols_ = cols;
    l.keep_alive_ = std::move(keep_alive);
    return l;
  }

  /// Output width (the weight's rows).
  Index rows() const { return fp8_ ? fp8_->rows() : bf16_ ? bf16_rows_ : dense_.rows(); }
  /// Input width (the weight's columns).
  Index cols() const { return fp8_ ? fp8_->cols() : bf16_ ? bf16_cols_ : dense_.cols(); }
  bool empty() const { return rows() == 0 || cols() == 0; }
  WeightStorage storage() const {
    return fp8_ ? WeightStorage::kBlockFp8 : bf16_ ? WeightStorage::kBf16 : WeightStorage::kDense;
  }
  /// True when the weight is stored in block FP8.
  bool is_fp8() const { return fp8_.has_value(); }
  /// True when the weight is stored in BF16.
  bool is_bf16() const { return bf16_ != nullptr; }
  Fp8Matmul fp8_matmul() const { return matmul_; }
  /// Bytes of the weight's values (and FP8 scales), owned or borrowed.
  std::size_t weight_bytes() const {
    if (fp8_) return fp8_->bytes();
    if (bf16_) return 2 * static_cast<std::size_t>(bf16_rows_ * bf16_cols_);
    return sizeof(T) * static_cast<std::size_t>(dense_.size());
  }
  /// The BF16 values, row-major (BF16 storage only; nullptr otherwise).
  const void* bf16_data() const { return bf16_; }

  /// y = x W^T for x [tokens, cols()] and y [tokens, rows()]; y must not overlap x. Throws
  /// mla::Error when the shapes do not match.
  void apply(ConstMatrixRef<T> x, MatrixRef<T> y, const ProjectionContext& ctx = {}) const {
    detail::require(x.cols() == cols() && y.cols() == rows() && y.rows() == x.rows(),
                    "Linear::apply: weight is [", rows(), ", ", cols(), "], input is [", x.rows(),
                    ", ", x.cols(), "], output is [", y.rows(), ", ", y.cols(), "]; expected [",
                    x.rows(), ", ", cols(), "] -> [", x.rows(), ", ", rows(), "]");
    run(Layout::kTransposedRows, 0, rows(), x, y, ctx, true);
  }

  /// y = x W[row0, row0 + n)^T for x [tokens, cols()] and y [tokens, n]: a block of the
  /// output rows (one head's W_UV inside wkv_b, say). FP8 weights multiply W8A32 here.
  void apply_rows(Index row0, Index n, ConstMatrixRef<T> x, MatrixRef<T> y,
                  const ProjectionContext& ctx = {}) const {
    detail::require(row0 >= 0 && n >= 0 && row0 + n <= rows() && x.cols() == cols() &&
                        y.rows() == x.rows() && y.cols() == n,
                    "Linear::apply_rows: rows [", row0, ", ", row0 + n, ") of a [", rows(), ", ",
                    cols(), "] weight, input [", x.rows(), ", ", x.cols(), "], output [", y.rows(),
                    ", ", y.cols(), "]");
    run(Layout::kTransposedRows, row0, n, x, y, ctx, false);
  }

  /// y = x W[row0, row0 + n) for x [tokens, n] and y [tokens, cols()]: the transposed product
  /// with a block of rows (one head's W_UK inside wkv_b, absorbed into the query: q~ = q W_UK).
  /// FP8 weights multiply W8A32 here.
  void apply_rows_transposed(Index row0, Index n, ConstMatrixRef<T> x, MatrixRef<T> y,
                             const ProjectionContext& ctx = {}) const {
    detail::require(row0 >= 0 && n >= 0 && row0 + n <= rows() && x.cols() == n &&
                        y.rows() == x.rows() && y.cols() == cols(),
                    "Linear::apply_rows_transposed: rows [", row0, ", ", row0 + n, ") of a [",
                    rows(), ", ", cols(), "] weight, input [", x.rows(), ", ", x.cols(),
                    "], output [", y.rows(), ", ", y.cols(), "]");
    run(Layout::kRowSlice, row0, n, x, y, ctx, false);
  }

  /// The dense weight. Throws mla::Error for BF16 and FP8 weights (use to_dense()).
  const RowMatrix<T>& dense() const {
    detail::require(storage() == WeightStorage::kDense, "Linear::dense: the weight is stored in ",
                    is_fp8() ? "block FP8" : "BF16", "; use to_dense()");
    return dense_;
  }
  /// The block-FP8 weight. Throws mla::Error for other storage.
  const BlockFp8Matrix& fp8() const {
    detail::require(fp8_.has_value(), "Linear::fp8: the weight is stored ",
                    is_bf16() ? "in BF16" : "dense");
    return *fp8_;
  }
  /// The weight [out, in] as a dense matrix of T (dequantised or widened: exact in double).
  RowMatrix<T> to_dense() const { return rows_as_dense(0, rows()); }

  /// The same projection in another compute type (FP8 codes and BF16 values are kept as they
  /// are).
  template <class U>
  Linear<U> cast() const {
    if (fp8_) return Linear<U>(*fp8_, matmul_, activation_scales_);
    if (bf16_) return Linear<U>::borrow_bf16(bf16_, bf16_rows_, bf16_cols_, keep_alive_);
    return Linear<U>(RowMatrix<U>(dense_.template cast<U>()));
  }

 private:
  using Layout = detail::isa::GemmArgs::Layout;

  /// The weight's element (r, c) in T (BF16 and FP8 storage; exact in double).
  T value(Index r, Index c) const {
    if (fp8_) {
      return static_cast<T>(static_cast<float>(fp8_->codes()[r * cols() + c])) *
             static_cast<T>(fp8_->scale(r / fp8_->block_rows(), c / fp8_->block_cols()));
    }
    return static_cast<T>(
        detail::bfloat16_bits_to_float(bf16_ + 2 * static_cast<std::size_t>(r * cols() + c)));
  }

  /// Rows [row0, row0 + n) of the weight as dense T.
  RowMatrix<T> rows_as_dense(Index row0, Index n) const {
    if (fp8_) {
      RowMatrix<T> w(n, cols());
      for (Index r = 0; r < n; ++r) {
        const Index rr = row0 + r;
        for (Index c = 0; c < cols(); ++c) {
          const float code = fp8_->codes()[rr * cols() + c];
          const float s = fp8_->scale(rr / fp8_->block_rows(), c / fp8_->block_cols());
          // In double the product is exact; in float it is rounded once.
          w(r, c) = static_cast<T>(code) * static_cast<T>(s);
        }
      }
      return w;
    }
    if (bf16_) {
      RowMatrix<T> w(n, cols());
      for (Index r = 0; r < n; ++r) {
        for (Index c = 0; c < cols(); ++c) {
          w(r, c) = static_cast<T>(detail::bfloat16_bits_to_float(
              bf16_ + 2 * static_cast<std::size_t>((row0 + r) * cols() + c)));
        }
      }
      return w;
    }
    return dense_.middleRows(row0, n);
  }

  /// y = x B with B = W[row0, row0 + n)^T (kTransposedRows) or W[row0, row0 + n) (kRowSlice).
  /// `whole` marks apply(), the only call that honours W8A8.
  void run(Layout layout, Index row0, Index n, const ConstMatrixRef<T>& x, MatrixRef<T> y,
           const ProjectionContext& ctx, bool whole) const {
    if (x.rows() == 0 || y.cols() == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      run_kernels(layout, row0, n, x, y, ctx, whole);
    } else {
      // Other compute types (double): the reference route, dequantise then Eigen.
      if (fp8_ && whole) {
        detail::Fp8GemmScratch<T> local;
        detail::Fp8GemmScratch<T>* scratch = &local;
        if constexpr (std::is_same_v<T, double>) {
          if (ctx.workspace) scratch = &ctx.workspace->buffers().reference;
        }
        detail::fp8_block_gemm<T>(x, *fp8_, matmul_ == Fp8Matmul::kW8A8, activation_scales_, y,
                                  *scratch);
      } else if (storage() == WeightStorage::kDense) {
        if (layout == Layout::kTransposedRows) {
          y.noalias() = x * dense_.middleRows(row0, n).transpose();
        } else {
          y.noalias() = x * dense_.middleRows(row0, n);
        }
      } else {
        // BF16, or FP8 rows: plain loops over the exact values (no temporary copy).
        const Index M = x.rows();
        if (layout == Layout::kTransposedRows) {
          for (Index m = 0; m < M; ++m) {
            for (Index j = 0; j < n; ++j) {
              T acc = 0;
              for (Index c = 0; c < cols(); ++c) acc += x(m, c) * value(row0 + j, c);
              y(m, j) = acc;
            }
          }
        } else {
          y.setZero();
          for (Index m = 0; m < M; ++m) {
            for (Index j = 0; j < n; ++j) {
              const T xj = x(m, j);
              for (Index c = 0; c < cols(); ++c) y(m, c) += xj * value(row0 + j, c);
            }
          }
        }
      }
    }
  }

  void run_kernels(Layout layout, Index row0, Index n, const ConstMatrixRef<float>& x,
                   MatrixRef<float> y, const ProjectionContext& ctx, bool whole) const {
    using detail::isa::GemmArgs;
    ProjectionWorkspace local;
    ProjectionWorkspace::Buffers& b = (ctx.workspace ? *ctx.workspace : local).buffers();
    const Index M = x.rows(), K = layout == Layout::kTransposedRows ? cols() : n;
    GemmArgs a;
    a.layout = layout;
    a.row0 = row0;
    a.M = M;
    a.K = K;
    a.N = layout == Layout::kTransposedRows ? n : cols();
    a.y = y.data();
    a.y_stride = y.outerStride();
    a.w_stride = cols();
    if (fp8_) {
      a.format = GemmArgs::Format::kFp8;
      a.w = fp8_->codes();
      a.scales = fp8_->scales();
      a.scale_stride = fp8_->col_blocks();
      a.block_rows = fp8_->block_rows();
      a.block_cols = fp8_->block_cols();
    } else if (bf16_) {
      a.format = GemmArgs::Format::kBf16;
      a.w = bf16_;
    } else {
      a.format = GemmArgs::Format::kF32;
      a.w = dense_.data();
    }
    // The activations the products are made of: as given (kFp32), rounded to BF16 (kBf16), or
    // W8A8's e4m3 codes per token and K block with their scales (DeepSeek's act_quant).
    const bool w8a8 = whole && fp8_ && matmul_ == Fp8Matmul::kW8A8;
    const bool bf16 = !w8a8 && ctx.precision == Precision::kBf16 && (fp8_ || bf16_);
    const bool stream = layout == Layout::kTransposedRows && M <= 8;
    const bool transposed = layout == Layout::kTransposedRows && !stream;
    // BF16 dot products for the compute-bound shapes: the values below as BF16 bits (exact).
    a.dp = (w8a8 || bf16) && !stream && (!fp8_ || fp8_->block_cols() % 2 == 0);
    a.x = x.data();
    a.x_stride = x.outerStride();
    if (w8a8) {
      detail::grow(b.x, M * K);
      const Index bk = fp8_->block_cols(), kb = fp8_->col_blocks();
      detail::grow(b.x_scales, M * kb);
      detail::grow(b.codes, K);
      for (Index m = 0; m < M; ++m) {
        quantize_e4m3_tiles(x.row(m).data(), K, bk, kActivationAmaxFloor, activation_scales_,
                            b.codes.data(), b.x_scales.data() + m * kb);
        from_fp8(b.codes.data(), static_cast<std::size_t>(K), b.x.data() + m * K);
      }
      a.x = b.x.data();
      a.x_stride = K;
      a.x_scales = b.x_scales.data();
      a.x_scale_stride = kb;
    } else if (bf16 && !(transposed && a.dp)) {
      // Rounded once to BF16 (the transposed pairs below round as they go).
      detail::grow(b.x, M * K);
      detail::for_blocks(ctx.pool, M, 16, [&](Index m0, Index m1) {
        for (Index m = m0; m < m1; ++m) {
          for (Index k = 0; k < K; ++k)
            b.x[static_cast<std::size_t>(m * K + k)] = detail::round_bf16(x(m, k));
        }
      });
      a.x = b.x.data();
      a.x_stride = K;
    }
    if (transposed) {
      // Weight rows broadcast against tokens in the vector lanes: the activations transposed,
      // [K][M padded to 16] (or [K / 2] pairs of k for dot products), zeros past M; in blocks
      // of 64 k by 16 tokens, on the pool.
      const Index mp = (M + 15) / 16 * 16;
      a.xt_stride = mp;
      const float* src = a.x;
      const Index ld = a.x_stride;
      if (a.dp) {
        const Index kp = (K + 1) / 2;
        detail::grow(b.xt_pairs, kp * mp);
        std::uint32_t* xt = b.xt_pairs.data();
        detail::for_blocks(ctx.pool, kp, 32, [&](Index p0, Index p1) {
          for (Index m0 = 0; m0 < mp; m0 += 16) {
            for (Index p = p0; p < p1; ++p) {
              for (Index m = m0; m < m0 + 16; ++m) {
                const Index k = 2 * p;
                const auto bits = [&](Index kk) -> std::uint16_t {
                  return m < M && kk < K ? detail::bf16_bits(src[m * ld + kk]) : 0;
                };
                xt[p * mp + m] = detail::bf16_pair(bits(k), bits(k + 1));
              }
            }
          }
        });
        a.xt_pairs = xt;
      } else {
        detail::grow(b.xt, K * mp);
        float* xt = b.xt.data();
        detail::for_blocks(ctx.pool, K, 64, [&](Index k0, Index k1) {
          for (Index m0 = 0; m0 < mp; m0 += 16) {
            for (Index k = k0; k < k1; ++k) {
              for (Index m = m0; m < m0 + 16; ++m) xt[k * mp + m] = m < M ? src[m * ld + k] : 0.0f;
            }
          }
        });
        a.xt = xt;
      }
      if (a.x_scales) {
        const Index kb = a.x_scale_stride;
        detail::grow(b.xt_scales, kb * mp);
        for (Index j = 0; j < kb; ++j) {
          for (Index m = 0; m < mp; ++m) {
            b.xt_scales[static_cast<std::size_t>(j * mp + m)] =
                m < M ? a.x_scales[m * kb + j] : 0.0f;
          }
        }
        a.xt_scales = b.xt_scales.data();
      }
    } else if (a.dp) {
      a.x16_stride = K + 1;
      detail::grow(b.x16, M * (K + 1));
      for (Index m = 0; m < M; ++m) {
        std::uint16_t* row = b.x16.data() + m * (K + 1);
        for (Index k = 0; k < K; ++k) {
          row[k] = static_cast<std::uint16_t>(
              detail::bit_cast<std::uint32_t>(a.x[m * a.x_stride + k]) >> 16);
        }
        row[K] = 0;
      }
      a.x16 = b.x16.data();
    }
    // Output columns over the threads: streaming splits them evenly (memory-bound), panels in
    // chunks of 64.
    const int threads = mla::concurrency(ctx.pool);
    (ctx.workspace ? *ctx.workspace : local).reserve(threads, 0, 0, false);
    const Index N = a.N;
    const Index chunk =
        stream ? std::max<Index>(2, (N + threads - 1) / threads + 1) / 2 * 2
               : std::max<Index>(64, (N + 4 * threads - 1) / (4 * threads) + 63) / 64 * 64;
    const Index tasks = (N + chunk - 1) / chunk;
    const detail::isa::Kernels& k = detail::isa::kernels();
    auto task = [&](Index t, int thread) {
      GemmArgs at = a;
      at.n_begin = t * chunk;
      at.n_end = std::min(N, at.n_begin + chunk);
      at.scratch = b.panels[static_cast<std::size_t>(thread)].data();
      k.gemm(at);
    };
    mla::parallel_for(ctx.pool, tasks, task);
  }

  RowMatrix<T> dense_;
  std::optional<BlockFp8Matrix> fp8_;
  const unsigned char* bf16_ = nullptr;  // BF16 values (owned through keep_alive_, or borrowed)
  Index bf16_rows_ = 0, bf16_cols_ = 0;
  std::shared_ptr<const void> keep_alive_;
  Fp8Matmul matmul_ = Fp8Matmul::kW8A32;
  ScaleFormat activation_scales_ = ScaleFormat::kFloat32;

  template <class U>
  friend class Linear;
};

/// Applies a projection: y = x W^T (see Linear::apply).
template <class W>
void project(const W& w, ConstMatrixRef<typename W::Scalar> x, MatrixRef<typename W::Scalar> y,
             const ProjectionContext& ctx = {}) {
  w.apply(x, y, ctx);
}

}  // namespace mla
