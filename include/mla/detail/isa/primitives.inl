// The primitives every kernel of a target builds on, written once over `Ops` (the target's
// vector of floats and its operations): the vector exp, the FP8 and BF16 conversions, the
// widening of a record segment by segment, and the one online softmax step. Included first by
// kernels.inl, inside the target's namespace. No include guard on purpose.

// ---------------------------------------------------------------------------------------------
// Elementary functions

/// e^x per lane for x <= 88 (larger x saturate at e^88), 0 for x < -87.33 (so exp(-inf) = 0
/// clears an empty softmax state), NaN for NaN. Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2,
/// e^r = 1 + r + r^2 P(r) with P of degree 5, times 2^n: within 2 ulp.
inline V exp(V x) {
  const V hi = Ops::set1(88.0f), lo = Ops::set1(-87.33654475f);
  // Clamp so that n stays in [-126, 127]; NaN passes both (it is never "less").
  const V xc = Ops::max(lo, Ops::select_less(hi, x, hi, x));
  // n = round(x / ln2) by the 1.5 * 2^23 trick (round to nearest even in the FPU's mode).
  const V magic = Ops::set1(12582912.0f);
  const V n = Ops::sub(Ops::fmadd(xc, Ops::set1(1.44269504088896341f), magic), magic);
  // r = x - n ln2, ln2 split in two so that n * C1 is exact.
  V r = Ops::fmadd(n, Ops::set1(-0.693359375f), xc);
  r = Ops::fmadd(n, Ops::set1(2.12194440e-4f), r);
  V p = Ops::set1(1.9875691500e-4f);
  p = Ops::fmadd(p, r, Ops::set1(1.3981999507e-3f));
  p = Ops::fmadd(p, r, Ops::set1(8.3334519073e-3f));
  p = Ops::fmadd(p, r, Ops::set1(4.1665795894e-2f));
  p = Ops::fmadd(p, r, Ops::set1(1.6666665459e-1f));
  p = Ops::fmadd(p, r, Ops::set1(5.0000001201e-1f));
  const V er = Ops::add(Ops::fmadd(p, Ops::mul(r, r), r), Ops::set1(1.0f));
  return Ops::select_less(x, lo, Ops::zero(), Ops::mul(er, Ops::exp2_int(n)));
}

/// dst[i] = exp(src[i]) for n values (the table's exp).
inline void exp_span(const float* src, std::size_t n, float* dst) {
  std::size_t i = 0;
  for (; i + kW <= n; i += kW) Ops::store(dst + i, exp(Ops::load(src + i)));
  if (i < n) {  // the tail through one padded vector
    float in[kW] = {}, out[kW];
    for (std::size_t j = i; j < n; ++j) in[j - i] = src[j];
    Ops::store(out, exp(Ops::load(in)));
    for (std::size_t j = i; j < n; ++j) dst[j] = out[j - i];
  }
}

// ---------------------------------------------------------------------------------------------
// Conversions (element by element equal to the scalar codecs of fp8_codec.hpp / bfloat16.hpp)

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports -Wstringop-overflow for the vector body of these loops when they are inlined
// at a call site whose buffer is shorter than one vector; that path never runs for such n.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstringop-overflow"
#endif
template <class Format, bool kSaturate, bool kScaled>
inline void encode_span(const float* src, std::size_t n, std::uint8_t* dst, float scale) {
  // Branch-free per element, so the compiler vectorises it at this target's width.
  for (std::size_t i = 0; i < n; ++i) {
    const float x = kScaled ? src[i] / scale : src[i];
    dst[i] = encode_fp8<Format, kSaturate>(x);
  }
}
template <class Format>
inline void decode_span(const std::uint8_t* src, std::size_t n, float* dst, float scale) {
  for (std::size_t i = 0; i < n; ++i) dst[i] = decode_fp8<Format>(src[i]) * scale;
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

template <class Format>
inline void encode(const float* src, std::size_t n, std::uint8_t* dst, float scale, bool saturate) {
  if (scale == 1.0f) {
    saturate ? encode_span<Format, true, false>(src, n, dst, scale)
             : encode_span<Format, false, false>(src, n, dst, scale);
  } else {
    saturate ? encode_span<Format, true, true>(src, n, dst, scale)
             : encode_span<Format, false, true>(src, n, dst, scale);
  }
}
inline void encode_e4m3(const float* src, std::size_t n, std::uint8_t* dst, float scale,
                        bool saturate) {
  encode<E4M3FNFormat>(src, n, dst, scale, saturate);
}
inline void encode_e5m2(const float* src, std::size_t n, std::uint8_t* dst, float scale,
                        bool saturate) {
  encode<E5M2Format>(src, n, dst, scale, saturate);
}

inline void decode_e4m3(const std::uint8_t* src, std::size_t n, float* dst, float scale) {
  std::size_t i = 0;
  if (scale == 1.0f) {  // exact, and NaN codes keep the scalar decoder's bits
    for (; i + kW <= n; i += kW) Ops::store(dst + i, Ops::widen_e4m3(src + i));
  } else {
    const V s = Ops::set1(scale);
    for (; i + kW <= n; i += kW) Ops::store(dst + i, Ops::mul(Ops::widen_e4m3(src + i), s));
  }
  for (; i < n; ++i) {
    const float x = decode_fp8<E4M3FNFormat>(src[i]);
    dst[i] = scale == 1.0f ? x : x * scale;
  }
}
inline void decode_e5m2(const std::uint8_t* src, std::size_t n, float* dst, float scale) {
  if (scale == 1.0f) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = decode_fp8<E5M2Format>(src[i]);
  } else {
    decode_span<E5M2Format>(src, n, dst, scale);
  }
}

inline void widen_bf16(const unsigned char* src, std::size_t n, float* dst) {
  std::size_t i = 0;
  for (; i + kW <= n; i += kW) Ops::store(dst + i, Ops::widen_bf16(src + 2 * i));
  for (; i < n; ++i) dst[i] = bfloat16_bits_to_float(src + 2 * i);
}

/// One segment of a record (see for_each_segment) as floats: dst[i] = value first + i (exact for
/// FP32, BF16 and E4M3 segments; FP64 rounds to float once).
inline void widen_segment(const RecordSegment& s, const unsigned char* rec, float* dst) {
  const unsigned char* src = rec + s.offset;
  const auto n = static_cast<std::size_t>(s.count);
  switch (s.element) {
    case Element::kFloat32:
      std::memcpy(dst, src, sizeof(float) * n);
      break;
    case Element::kFloat64:
      for (std::size_t i = 0; i < n; ++i) {
        double x;
        std::memcpy(&x, src + sizeof(double) * i, sizeof(x));
        dst[i] = static_cast<float>(x);
      }
      break;
    case Element::kBFloat16:
      widen_bf16(src, n, dst);
      break;
    case Element::kE4M3:
      decode_e4m3(src, n, dst, s.scale(rec));
      break;
  }
}

/// One token's record as floats: out[0, d_c) = c, out[d_c, d_c + R) = k^R (`segments`: the
/// record's, segments_of(layout)).
inline void widen_record(const RecordSegments& segments, const unsigned char* rec, float* out) {
  for (const RecordSegment& s : segments) widen_segment(s, rec, out + s.first);
}

// ---------------------------------------------------------------------------------------------
// The online softmax step

/// For `cols` independent softmax rows whose next n scores (already scaled) are the columns of
/// s [n][cols] (rows `stride` apart): updates each row's running maximum m[c] and sum l[c],
/// writes corr[c] = exp(m_old - m_new), the factor by which that row's accumulator must be
/// scaled, and replaces the scores by exp(s - m_new). The first step starts from m = -inf,
/// l = 0 (exp(-inf) = 0 clears them). A NaN score makes its row NaN. Vectorised over the
/// columns for float; one column at a time otherwise.
template <class T>
inline void online_softmax_step(T* s, Index n, Index cols, Index stride, T* m, T* l, T* corr) {
  Index c = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; c + kW <= cols; c += kW) {
      const V m_old = Ops::load(m + c);
      V m_new = m_old;
      for (Index j = 0; j < n; ++j) m_new = Ops::max(m_new, Ops::load(s + j * stride + c));
      const V cr = exp(Ops::sub(m_old, m_new));
      V sum = Ops::zero();
      for (Index j = 0; j < n; ++j) {
        const V p = exp(Ops::sub(Ops::load(s + j * stride + c), m_new));
        Ops::store(s + j * stride + c, p);
        sum = Ops::add(sum, p);
      }
      Ops::store(l + c, Ops::fmadd(Ops::load(l + c), cr, sum));
      Ops::store(m + c, m_new);
      Ops::store(corr + c, cr);
    }
  }
  for (; c < cols; ++c) {
    T m_new = m[c];
    for (Index j = 0; j < n; ++j) {
      const T x = s[j * stride + c];
      m_new = m_new > x ? m_new : x;
    }
    const T cr = std::exp(m[c] - m_new);
    T sum = 0;
    for (Index j = 0; j < n; ++j) {
      T& x = s[j * stride + c];
      x = std::exp(x - m_new);
      sum += x;
    }
    l[c] = l[c] * cr + sum;
    m[c] = m_new;
    corr[c] = cr;
  }
}
