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
// Weights are packed per block of 16 output channels, K-major inside a block. Up to 4 rows (decode),
// each weight is dequantized in a register and used at once (decode_rows, AVX-512). Beyond (gemm), a
// panel of up to four blocks is dequantized into a float32 tile once and then read by every tile of
// rows (register-blocked, up to 6 rows x 64 channels, each chain kept in registers over the tile's K):
// the panel's whole K (an L2 tile), once per block of rows whose activations fit in L2 beside it, so
// the dequantization costs ~1/200 of the FMAs and x is not streamed from L3 once per panel: measured
// as fast as torch's fp32 GEMM at 2K rows (before: 1.25-1.3x slower cold prefill). Work runs under
// at::parallel_for (torch's thread pool and count: engines at one thread stay at one).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <memory>
#include <utility>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 16;  // output channels per block (one AVX-512 vector of float32)
constexpr int64_t kPanel = 4;   // blocks per panel
constexpr int64_t kChunk = 64;  // K per dequantized tile up to kRows rows: 64 x 64 floats = 16 KiB, in L1
constexpr int64_t kRows = 6;    // rows per register tile (6 x 4 accumulators + 4 weights + 1 x)
constexpr int64_t kGroup = 32;  // int4 group size along K

// One tile of R rows against V blocks of one dequantized tile: y[r][c] continues its chain over the
// tile's K (from 0 if `first`), and is multiplied by `scale` (if given) once the chain is complete.
template <int R, int V>
void micro(const float* x, int64_t x_stride, const float* tile, int64_t kc, float* y, int64_t y_stride,
           bool first, const float* scale) {
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
  if (scale)
    for (int v = 0; v < V; ++v) {
      const __m512 s = _mm512_loadu_ps(scale + v * kLanes);
      for (int r = 0; r < R; ++r) acc[r][v] = _mm512_mul_ps(acc[r][v], s);
    }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(y + r * y_stride + v * kLanes, acc[r][v]);
#else  // the same chains, laid out for the compiler to vectorize across the channels
  float acc[R][V * kLanes];
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < V * kLanes; ++c) acc[r][c] = first ? 0.f : y[r * y_stride + c];
  for (int64_t k = 0; k < kc; ++k) {
    const float* wk = tile + k * kPanel * kLanes;
    for (int r = 0; r < R; ++r) {
      const float xr = x[r * x_stride + k];
      for (int64_t c = 0; c < V * kLanes; ++c) acc[r][c] = std::fma(xr, wk[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t c = 0; c < V * kLanes; ++c) y[r * y_stride + c] = scale ? acc[r][c] * scale[c] : acc[r][c];
#endif
}

using Micro = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, bool, const float*);

// micro<r + 1, v + 1> at kMicro[v][r]: one instance per shape of a tile (its last rows, its last blocks)
template <int V, int... R>
constexpr std::array<Micro, kRows> micro_row(std::integer_sequence<int, R...>) {
  return {&micro<R + 1, V>...};
}
template <int... V>
constexpr std::array<std::array<Micro, kRows>, kPanel> micro_table(std::integer_sequence<int, V...>) {
  return {micro_row<V + 1>(std::make_integer_sequence<int, kRows>{})...};
}
constexpr auto kMicro = micro_table(std::make_integer_sequence<int, kPanel>{});

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

// Rows whose activations stay in L2 (~512 KiB of them) while every panel passes over them: a prefill
// of thousands of rows otherwise streams all of x from L3 once per panel and K-chunk.
int64_t block_rows(int64_t K) { return std::max(kRows, (int64_t{1} << 17) / K / kRows * kRows); }

template <typename Weights>
void gemm(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Weights& w, const float* scale) {
  const int64_t blocks = N / kLanes, panels = (blocks + kPanel - 1) / kPanel, rows_per = block_rows(K);
  const int64_t chunk = M <= kRows ? kChunk : K;
  for (int64_t m_begin = 0; m_begin < M; m_begin += rows_per) {
    const int64_t m_end = std::min(M, m_begin + rows_per);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      std::unique_ptr<float[]> scratch(new float[chunk * kPanel * kLanes + kLanes]);  // room to align
      const auto misaligned = reinterpret_cast<uintptr_t>(scratch.get()) / sizeof(float) % kLanes;
      float* const tile = scratch.get() + (kLanes - misaligned) % kLanes;  // on 64 bytes
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b0 = p * kPanel, v = std::min(kPanel, blocks - b0);
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t kc = std::min(chunk, K - k0);
          const float* last = k0 + kc == K && scale ? scale + b0 * kLanes : nullptr;
          for (int64_t i = 0; i < v; ++i) w.dequant(b0 + i, i, k0, kc, tile);
          for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
            const int64_t rows = std::min(kRows, m_end - m0);
            kMicro[v - 1][rows - 1](x + m0 * K + k0, K, tile, kc, y + m0 * N + b0 * kLanes, N, k0 == 0,
                                    last);
          }
        }
      }
    });
  }
}

#if defined(__AVX512F__)
// Decode (up to 4 rows): each weight dequantized in a register, as `dequant` writes it to a tile, and
// used at once, never stored: the same chains in the same K order, so the same bits as gemm's. A
// tile's store and reload per weight cost a decode step's linears ~1.6x, its int8 LM head ~2x.
constexpr int64_t kDecodeBlocks = 8;  // blocks at once: 8 independent chains per row hide FMA latency

// R rows against B int4 blocks from block b0.
template <int R, int B>
void decode_rows(const float* x, int64_t K, int64_t N, float* y, const Int4Weights& w, int64_t b0,
                 const float*) {
  const int64_t groups = K / kGroup;
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < B; ++v) acc[r][v] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi32(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 s[B], o[B];
    for (int v = 0; v < B; ++v) {
      s[v] = _mm512_loadu_ps(w.scale + ((b0 + v) * groups + g) * kLanes);
      o[v] = _mm512_loadu_ps(w.offset + ((b0 + v) * groups + g) * kLanes);
    }
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2)
      for (int v = 0; v < B; ++v) {
        const uint8_t* src = w.q + ((b0 + v) * (K / 2) + k / 2) * kLanes;
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
        const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, low4)), s[v], o[v]);
        const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), s[v], o[v]);
        for (int r = 0; r < R; ++r) {
          acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), lo, acc[r][v]);
          acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + 1]), hi, acc[r][v]);
        }
      }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < B; ++v) _mm512_storeu_ps(y + r * N + (b0 + v) * kLanes, acc[r][v]);
}

// R rows against B int8 blocks from block b0, the scale after the sum.
template <int R, int B>
void decode_rows(const float* x, int64_t K, int64_t N, float* y, const Int8Weights& w, int64_t b0,
                 const float* scale) {
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < B; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k)
    for (int v = 0; v < B; ++v) {
      const int8_t* src = w.q + ((b0 + v) * K + k) * kLanes;
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
      const __m512 wk = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
      for (int r = 0; r < R; ++r) acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), wk, acc[r][v]);
    }
  for (int v = 0; v < B; ++v) {
    const __m512 sv = _mm512_loadu_ps(scale + (b0 + v) * kLanes);
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * N + (b0 + v) * kLanes, _mm512_mul_ps(acc[r][v], sv));
  }
}

template <int R, typename Weights>
void decode_all(const float* x, int64_t K, int64_t N, float* y, const Weights& w, const float* scale) {
  const int64_t blocks = N / kLanes;
  at::parallel_for(0, (blocks + kDecodeBlocks - 1) / kDecodeBlocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b0 = i * kDecodeBlocks;
      if (b0 + kDecodeBlocks <= blocks)
        decode_rows<R, kDecodeBlocks>(x, K, N, y, w, b0, scale);
      else
        for (int64_t b = b0; b < blocks; ++b) decode_rows<R, 1>(x, K, N, y, w, b, scale);
    }
  });
}
#endif

// y = x @ W.T for M rows: decode's registers or gemm's tiles, the same bits either way.
template <typename Weights>
void linear(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Weights& w, const float* scale) {
#if defined(__AVX512F__)
  switch (M) {
    case 1: return decode_all<1>(x, K, N, y, w, scale);
    case 2: return decode_all<2>(x, K, N, y, w, scale);
    case 3: return decode_all<3>(x, K, N, y, w, scale);
    case 4: return decode_all<4>(x, K, N, y, w, scale);
    default: break;
  }
#endif
  gemm(x, M, K, N, y, w, scale);
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
  // the scale per channel, after the sum: the same for every row
  linear(x.data_ptr<float>(), M, K, N, y.data_ptr<float>(), Int8Weights{q.data_ptr<int8_t>(), K},
         scale.data_ptr<float>());
  return y;
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
  const Int4Weights w{q.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset.data_ptr<float>(), K};
  linear(x.data_ptr<float>(), M, K, N, y.data_ptr<float>(), w, nullptr);
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
