// Weight-only quantized linears on CPU, `y = x @ W.T` with x and y in float32 and W in int8 (per output
// channel) or int4 (groups of 32 along K): see dualpath_sdk/model/quant.py, which packs the weights and
// calls these, and dualpath_sdk/model/kernel.py, which builds and loads this file.
//
// Every output is one chain of fused multiply-adds in K order, `acc = fma(x[k], w[k], acc)` from 0, with
// `w[k]` the exact float32 of the stored weight (int8: the integer, scaled after the sum; int4:
// `fma(q, scale, offset)` of its group). Vectors hold 16 output channels, never a split of K, so a row's
// result is bitwise the same whatever the rows around it (decode, a chunk, a long prefill, a batch) and
// whatever the thread count or vector width: a token's KV never depends on the forward that computed it.
//
// Weights are packed per block of 16 output channels, K-major inside a block: a K-chunk of a panel of
// up to four blocks is dequantized into an L1-resident float32 tile once and then read by every tile of
// rows (register-blocked, up to 6 rows x 64 channels), so a decode step streams the packed bytes once
// and a prefill amortizes the dequantization over its rows. Panels run under at::parallel_for (torch's
// thread pool and count: engines at one thread stay at one).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // output channels per block (one AVX-512 vector of float32)
constexpr int64_t kPanel = 4;   // blocks per panel
constexpr int64_t kChunk = 64;  // K per dequantized tile: 64 x 64 floats = 16 KiB
constexpr int64_t kRows = 6;    // rows per register tile (6 x 4 accumulators + 4 weights + 1 x)
constexpr int64_t kGroup = 32;  // int4 group size along K

// One tile of rows against one dequantized tile: y[r][c] continues its chain over the tile's K.
template <int R, int V>
void micro(const float* x, int64_t x_stride, const float* tile, int64_t kc, float* y, int64_t y_stride,
           bool first) {
#if defined(__AVX512F__)
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(y + r * y_stride + v * kLanes);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 w[V];
    for (int v = 0; v < V; ++v) w[v] = _mm512_load_ps(tile + k * kPanel * kLanes + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * x_stride + k]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(xr, w[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + r * y_stride + v * kLanes, acc[r][v]);
#else
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < V * kLanes; ++c) {
      float acc = first ? 0.f : y[r * y_stride + c];
      for (int64_t k = 0; k < kc; ++k) acc = std::fma(x[r * x_stride + k], tile[k * kPanel * kLanes + c], acc);
      y[r * y_stride + c] = acc;
    }
#endif
}

template <int V>
void rows_tile(int rows, const float* x, int64_t x_stride, const float* tile, int64_t kc, float* y,
               int64_t y_stride, bool first) {
  switch (rows) {
    case 6: micro<6, V>(x, x_stride, tile, kc, y, y_stride, first); break;
    case 5: micro<5, V>(x, x_stride, tile, kc, y, y_stride, first); break;
    case 4: micro<4, V>(x, x_stride, tile, kc, y, y_stride, first); break;
    case 3: micro<3, V>(x, x_stride, tile, kc, y, y_stride, first); break;
    case 2: micro<2, V>(x, x_stride, tile, kc, y, y_stride, first); break;
    default: micro<1, V>(x, x_stride, tile, kc, y, y_stride, first); break;
  }
}

void tile_rows(int64_t v, int rows, const float* x, int64_t x_stride, const float* tile, int64_t kc,
               float* y, int64_t y_stride, bool first) {
  switch (v) {
    case 4: rows_tile<4>(rows, x, x_stride, tile, kc, y, y_stride, first); break;
    case 3: rows_tile<3>(rows, x, x_stride, tile, kc, y, y_stride, first); break;
    case 2: rows_tile<2>(rows, x, x_stride, tile, kc, y, y_stride, first); break;
    default: rows_tile<1>(rows, x, x_stride, tile, kc, y, y_stride, first); break;
  }
}

// int8 block b, K rows [k0, k0 + kc) -> tile columns of block slot v (exact: an int8 is a float32).
struct Int8Weights {
  const int8_t* q;  // [N / 16, K, 16]
  int64_t K;
  void dequant(int64_t b, int64_t v, int64_t k0, int64_t kc, float* tile) const {
    const int8_t* src = q + (b * K + k0) * kLanes;
    for (int64_t k = 0; k < kc; ++k) {
      float* dst = tile + k * kPanel * kLanes + v * kLanes;
#if defined(__AVX512F__)
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k * kLanes));
      _mm512_store_ps(dst, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
#else
      for (int64_t c = 0; c < kLanes; ++c) dst[c] = static_cast<float>(src[k * kLanes + c]);
#endif
    }
  }
};

// int4 block b: bytes [N / 16, K / 2, 16], k even in the low nibble, k + 1 in the high one; per group
// of 32 along K a scale and an offset per channel, [N / 16, K / 32, 16]: w = fma(q, scale, offset).
struct Int4Weights {
  const uint8_t* q;
  const float* scale;
  const float* offset;
  int64_t K;
  void dequant(int64_t b, int64_t v, int64_t k0, int64_t kc, float* tile) const {
    const int64_t groups = K / kGroup;
    for (int64_t k = 0; k < kc; k += 2) {
      const int64_t kk = k0 + k, g = kk / kGroup;
      const uint8_t* src = q + (b * (K / 2) + kk / 2) * kLanes;
      const float* s = scale + (b * groups + g) * kLanes;
      const float* o = offset + (b * groups + g) * kLanes;
      float* lo_dst = tile + k * kPanel * kLanes + v * kLanes;
      float* hi_dst = lo_dst + kPanel * kLanes;
#if defined(__AVX512F__)
      const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
      const __m512 sv = _mm512_loadu_ps(s), ov = _mm512_loadu_ps(o);
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
      _mm512_store_ps(lo_dst, _mm512_fmadd_ps(lo, sv, ov));
      _mm512_store_ps(hi_dst, _mm512_fmadd_ps(hi, sv, ov));
#else
      for (int64_t c = 0; c < kLanes; ++c) {
        lo_dst[c] = std::fma(static_cast<float>(src[c] & 15), s[c], o[c]);
        hi_dst[c] = std::fma(static_cast<float>(src[c] >> 4), s[c], o[c]);
      }
#endif
    }
  }
};

template <typename Weights>
void gemm(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Weights& w) {
  const int64_t blocks = N / kLanes, panels = (blocks + kPanel - 1) / kPanel;
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float tile[kChunk * kPanel * kLanes];
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b0 = p * kPanel, v = std::min(kPanel, blocks - b0);
      for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
        const int64_t kc = std::min(kChunk, K - k0);
        for (int64_t i = 0; i < v; ++i) w.dequant(b0 + i, i, k0, kc, tile);
        for (int64_t m0 = 0; m0 < M; m0 += kRows) {
          const int rows = static_cast<int>(std::min(kRows, M - m0));
          tile_rows(v, rows, x + m0 * K + k0, K, tile, kc, y + m0 * N + b0 * kLanes, N, k0 == 0);
        }
      }
    }
  });
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x: contiguous float32 [rows, in_features]");
  TORCH_CHECK(x.size(1) == K, "x has ", x.size(1), " features, the weights ", K);
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kLanes && q.is_contiguous() && q.scalar_type() == at::kChar,
              "q: contiguous int8 [out / 16, in, 16]");
  const int64_t K = q.size(1), N = q.size(0) * kLanes, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous() && scale.scalar_type() == at::kFloat,
              "scale: contiguous float32 [out]");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  gemm(x.data_ptr<float>(), M, K, N, y.data_ptr<float>(), Int8Weights{q.data_ptr<int8_t>(), K});
  return y.mul_(scale);  // per channel, after the sum: the same for every row
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const at::Tensor& offset) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kLanes && q.is_contiguous() && q.scalar_type() == at::kByte,
              "q: contiguous uint8 [out / 16, in / 2, 16]");
  const int64_t K = q.size(1) * 2, N = q.size(0) * kLanes, M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(K % kGroup == 0, "int4: in_features must be a multiple of ", kGroup);
  for (const auto* t : {&scale, &offset})
    TORCH_CHECK(t->numel() == N * (K / kGroup) && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "scale, offset: contiguous float32 [out / 16, in / 32, 16]");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  gemm(x.data_ptr<float>(), M, K, N, y.data_ptr<float>(),
       Int4Weights{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), K});
  return y;
}

}  // namespace

TORCH_LIBRARY(dualpath_quant, m) {
  m.def("int8_linear(Tensor x, Tensor q, Tensor scale) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor q, Tensor scale, Tensor offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualpath_quant, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
}
