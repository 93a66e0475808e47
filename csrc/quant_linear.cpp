// Weight-only quantized linears on CPU, `y = x @ W.T` with x and y in float32 and W in int8 (per output
// channel) or int4 (groups of 32 along K), and the small ops of a layer around them: see
// dualpath_sdk/model/quant.py, which packs the weights and calls these, and dualpath_sdk/model/kernel.py,
// which builds and loads this file.
//
// Every output is computed in one fixed order: int8, one chain of fused multiply-adds in K order,
// `acc = fma(x[k], q[k], acc)` from 0, scaled after the sum; int4, such a chain over each group's levels,
// folded into the output group by group (the int4 section below). Vectors hold 16 output channels, never a
// split of K, so a row's result is bitwise the same whatever the rows around it (decode, a chunk, a long
// prefill, a batch) and whatever the thread count: a token's KV never depends on the forward that
// computed it.
//
// Weights are packed per block of 16 output channels, K-major inside a block. Up to 4 rows of int8, 8 of
// int4 (decode), each weight is widened in a register and used at once (decode_rows, decode4_rows,
// AVX-512). Beyond (gemm, gemm4), a panel of up to four blocks is widened into a float32 tile once and
// then read by every tile of rows (register-blocked, each chain kept in registers over the tile's K): the
// panel's whole K (an L2 tile), once per block of rows whose activations fit in L2 beside it, so the
// widening costs ~1/200 of the FMAs and x is not streamed from L3 once per panel: measured as fast as
// torch's fp32 GEMM at 2K rows. Work runs under at::parallel_for (torch's thread pool and count: engines
// at one thread stay at one).
//
// A decode step's layer also runs ~20 small ops besides its linears and attention, each microseconds of
// dispatch whatever its size: more than half a step's time beside the linears'. So the linears take the
// layer's work around them (`Around`): before, the input's RMS norm (the layer norms) or SwiGLU's
// silu(gate) * up (the input being the fused gate/up projection's output); after, the bias and the
// residual; and `rope_store` rotates q and k and writes k and v into the KV pool in one pass. A decode
// layer is then five calls and the attention. Each row is computed alone in a fixed order, so rows stay
// bitwise independent of the batch here too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

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

// `n` floats starting on a 64-byte boundary (the tiles' aligned loads), in storage `holder` owns.
float* aligned_floats(std::unique_ptr<float[]>& holder, int64_t n) {
  holder.reset(new float[n + kLanes]);
  const auto misaligned = reinterpret_cast<uintptr_t>(holder.get()) / sizeof(float) % kLanes;
  return holder.get() + (kLanes - misaligned) % kLanes;
}

// Blocks [0, blocks) B at a time under at::parallel_for (torch's pool and thread count): `wide(b0)` runs
// the B blocks from b0, `one(b)` a block of the last, shorter run alone.
template <int64_t B, typename Wide, typename One>
void by_blocks(int64_t blocks, const Wide& wide, const One& one) {
  at::parallel_for(0, (blocks + B - 1) / B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b0 = i * B;
      if (b0 + B <= blocks)
        wide(b0);
      else
        for (int64_t b = b0; b < blocks; ++b) one(b);
    }
  });
}

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
      std::unique_ptr<float[]> scratch;
      float* const tile = aligned_floats(scratch, chunk * kPanel * kLanes);
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
  by_blocks<kDecodeBlocks>(
      N / kLanes, [&](int64_t b0) { decode_rows<R, kDecodeBlocks>(x, K, N, y, w, b0, scale); },
      [&](int64_t b) { decode_rows<R, 1>(x, K, N, y, w, b, scale); });
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

// ---- int4 ------------------------------------------------------------------------------------------
// Nibbles [N / 16, K / 2, 16], k even in the low nibble, k + 1 in the high one: levels q in 0..15; per
// group of 32 along K a bf16 scale and zero per channel, [N / 16, K / 32, 16]: w = (q - 8) * scale + zero
// (Q4_1's form). A group's part of an output is scale * sum(x * q) + (zero - 8 * scale) * sum(x): one
// chain of FMAs over the group's levels (small integers, exact in float32), then two FMAs into the
// output, groups in K order, sum(x) once per row and group. Per weight that is a widening and one FMA,
// not a dequantizing FMA as well (a fifth fewer vector instructions: decode's linears 1.1-1.35x faster
// with their weights in cache), and bf16 factors are half float32's bytes (the default model's int4
// projections 67 MB, not 80).

struct Int4Weights {
  const uint8_t* q;
  const uint16_t* scale;  // bf16 bits
  const uint16_t* zero;
  int64_t K;
  int64_t groups() const { return K / kGroup; }
  // block b's levels for K rows [k0, k0 + kc) -> tile columns of block slot v, as float32
  void levels(int64_t b, int64_t v, int64_t k0, int64_t kc, float* tile) const {
    for (int64_t k = 0; k < kc; k += 2) {
      const uint8_t* src = q + (b * (K / 2) + (k0 + k) / 2) * kLanes;
      float* lo = tile + k * kPanel * kLanes + v * kLanes;
      float* hi = lo + kPanel * kLanes;
#if defined(__AVX512F__)
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)), low4 = _mm_set1_epi8(15);
      _mm512_store_ps(lo, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, low4))));
      _mm512_store_ps(hi, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4))));
#else
      for (int64_t c = 0; c < kLanes; ++c) {
        lo[c] = static_cast<float>(src[c] & 15);
        hi[c] = static_cast<float>(src[c] >> 4);
      }
#endif
    }
  }
  // block b's factors of group g: the scale and zero - 8 * scale, 16 channels each
  void factors(int64_t b, int64_t g, float* s, float* o) const {
    const int64_t at = (b * groups() + g) * kLanes;
    for (int64_t c = 0; c < kLanes; ++c) {
      s[c] = bf16(scale[at + c]);
      o[c] = std::fma(-8.f, s[c], bf16(zero[at + c]));
    }
  }
  static float bf16(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &wide, sizeof f);
    return f;
  }
};

// sum(x) of each group of 32 along a row: 16 partial sums (k, k + 16), then halved in a fixed order.
void group_sums(const float* x, int64_t K, float* out) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    float part[16];
    for (int i = 0; i < 16; ++i) part[i] = x[g * kGroup + i] + x[g * kGroup + 16 + i];
    for (int width = 8; width >= 1; width /= 2)
      for (int i = 0; i < width; ++i) part[i] += part[i + width];
    out[g] = part[0];
  }
}

// R rows against V blocks of a tile of levels holding whole groups: y[r][c] continues over the tile
// (from 0 if `first`), one group at a time, kept in y between groups (the registers hold the group's
// chains: R x V of them, as micro's). `sums` [R, row_groups] the rows' group sums from the tile's first
// group; `fs`, `fo` [groups in tile, kPanel, 16] the factors.
template <int R, int V>
void micro4(const float* x, int64_t x_stride, const float* sums, int64_t row_groups, const float* tile,
            const float* fs, const float* fo, int64_t kc, float* y, int64_t y_stride, bool first) {
#if defined(__AVX512F__)
  for (int64_t g = 0; g * kGroup < kc; ++g) {
    __m512 part[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) part[r][v] = _mm512_setzero_ps();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) {
      __m512 w[V];
      for (int v = 0; v < V; ++v) w[v] = _mm512_load_ps(tile + k * kPanel * kLanes + v * kLanes);
      for (int r = 0; r < R; ++r) {
        const __m512 xr = _mm512_set1_ps(x[r * x_stride + k]);
        for (int v = 0; v < V; ++v) part[r][v] = _mm512_fmadd_ps(xr, w[v], part[r][v]);
      }
    }
    const bool zero = first && g == 0;
    for (int v = 0; v < V; ++v) {
      const __m512 s = _mm512_loadu_ps(fs + (g * kPanel + v) * kLanes);
      const __m512 o = _mm512_loadu_ps(fo + (g * kPanel + v) * kLanes);
      for (int r = 0; r < R; ++r) {
        float* out = y + r * y_stride + v * kLanes;
        const __m512 acc = zero ? _mm512_setzero_ps() : _mm512_loadu_ps(out);
        _mm512_storeu_ps(out, _mm512_fmadd_ps(o, _mm512_set1_ps(sums[r * row_groups + g]),
                                              _mm512_fmadd_ps(s, part[r][v], acc)));
      }
    }
  }
#else  // the same chains, laid out for the compiler to vectorize across the channels
  for (int64_t g = 0; g * kGroup < kc; ++g) {
    float part[R][V * kLanes] = {};
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) {
      const float* wk = tile + k * kPanel * kLanes;
      for (int r = 0; r < R; ++r)
        for (int64_t c = 0; c < V * kLanes; ++c) part[r][c] = std::fma(x[r * x_stride + k], wk[c], part[r][c]);
    }
    const bool zero = first && g == 0;
    for (int r = 0; r < R; ++r)
      for (int64_t c = 0; c < V * kLanes; ++c) {
        float& out = y[r * y_stride + c];
        out = std::fma(fo[g * kPanel * kLanes + c], sums[r * row_groups + g],
                       std::fma(fs[g * kPanel * kLanes + c], part[r][c], zero ? 0.f : out));
      }
  }
#endif
}

using Micro4 = void (*)(const float*, int64_t, const float*, int64_t, const float*, const float*, const float*,
                        int64_t, float*, int64_t, bool);
template <int V, int... R>
constexpr std::array<Micro4, kRows> micro4_row(std::integer_sequence<int, R...>) {
  return {&micro4<R + 1, V>...};
}
template <int... V>
constexpr std::array<std::array<Micro4, kRows>, kPanel> micro4_table(std::integer_sequence<int, V...>) {
  return {micro4_row<V + 1>(std::make_integer_sequence<int, kRows>{})...};
}
constexpr auto kMicro4 = micro4_table(std::make_integer_sequence<int, kPanel>{});

void gemm4(const float* x, const float* sums, int64_t M, int64_t K, int64_t N, float* y, const Int4Weights& w) {
  const int64_t blocks = N / kLanes, panels = (blocks + kPanel - 1) / kPanel, rows_per = block_rows(K);
  const int64_t groups = w.groups(), chunk = M <= kRows ? kChunk : K;
  for (int64_t m_begin = 0; m_begin < M; m_begin += rows_per) {
    const int64_t m_end = std::min(M, m_begin + rows_per);
    at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
      const int64_t tile_floats = chunk * kPanel * kLanes, factor_floats = chunk / kGroup * kPanel * kLanes;
      std::unique_ptr<float[]> scratch;
      float* const tile = aligned_floats(scratch, tile_floats + 2 * factor_floats);
      float* const fs = tile + tile_floats;
      float* const fo = fs + factor_floats;
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b0 = p * kPanel, v = std::min(kPanel, blocks - b0);
        for (int64_t k0 = 0; k0 < K; k0 += chunk) {
          const int64_t kc = std::min(chunk, K - k0);
          for (int64_t i = 0; i < v; ++i) {
            w.levels(b0 + i, i, k0, kc, tile);
            for (int64_t g = 0; g < kc / kGroup; ++g)
              w.factors(b0 + i, k0 / kGroup + g, fs + (g * kPanel + i) * kLanes, fo + (g * kPanel + i) * kLanes);
          }
          for (int64_t m0 = m_begin; m0 < m_end; m0 += kRows) {
            const int64_t rows = std::min(kRows, m_end - m0);
            kMicro4[v - 1][rows - 1](x + m0 * K + k0, K, sums + m0 * groups + k0 / kGroup, groups, tile, fs, fo,
                                     kc, y + m0 * N + b0 * kLanes, N, k0 == 0);
          }
        }
      }
    });
  }
}

#if defined(__AVX512F__)
inline __m512 widen_bf16(const uint16_t* bits) {  // 16 bf16 -> float32, exact
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// R rows against B int4 blocks from block b0, the levels widened in registers and used at once: the
// same chains as micro4's, so the same bits. The nibbles split in 128 bits, before widening.
template <int R, int B>
void decode4_rows(const float* x, const float* sums, int64_t K, int64_t N, float* y, const Int4Weights& w,
                  int64_t b0) {
  const int64_t groups = w.groups();
  __m512 acc[R][B];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < B; ++v) acc[r][v] = _mm512_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R][B];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < B; ++v) part[r][v] = _mm512_setzero_ps();
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; k += 2)
      for (int v = 0; v < B; ++v) {
        const uint8_t* src = w.q + ((b0 + v) * (K / 2) + k / 2) * kLanes;
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
        const __m128i lo8 = _mm_and_si128(bytes, low4), hi8 = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo8));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi8));
        for (int r = 0; r < R; ++r) {
          part[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k]), lo, part[r][v]);
          part[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * K + k + 1]), hi, part[r][v]);
        }
      }
    for (int v = 0; v < B; ++v) {  // the factors as Int4Weights::factors makes them
      const int64_t at = ((b0 + v) * groups + g) * kLanes;
      const __m512 sv = widen_bf16(w.scale + at);
      const __m512 ov = _mm512_fmadd_ps(_mm512_set1_ps(-8.f), sv, widen_bf16(w.zero + at));
      for (int r = 0; r < R; ++r)
        acc[r][v] = _mm512_fmadd_ps(ov, _mm512_set1_ps(sums[r * groups + g]), _mm512_fmadd_ps(sv, part[r][v], acc[r][v]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < B; ++v) _mm512_storeu_ps(y + r * N + (b0 + v) * kLanes, acc[r][v]);
}

template <int R>
void decode4_all(const float* x, const float* sums, int64_t K, int64_t N, float* y, const Int4Weights& w) {
  constexpr int B = R == 1 ? 8 : R == 2 ? 4 : R <= 4 ? 2 : 1;  // R B chains hide FMA latency; 2 R B registers
  by_blocks<B>(
      N / kLanes, [&](int64_t b0) { decode4_rows<R, B>(x, sums, K, N, y, w, b0); },
      [&](int64_t b) { decode4_rows<R, 1>(x, sums, K, N, y, w, b); });
}
#endif

// y = x @ W.T for M rows of int4: decode's registers or gemm4's tiles, the same bits either way.
void linear4(const float* x, int64_t M, int64_t K, int64_t N, float* y, const Int4Weights& w) {
  std::vector<float> sums(M * w.groups());
  at::parallel_for(0, M, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) group_sums(x + m * K, K, sums.data() + m * w.groups());
  });
#if defined(__AVX512F__)
  switch (M) {
    case 1: return decode4_all<1>(x, sums.data(), K, N, y, w);
    case 2: return decode4_all<2>(x, sums.data(), K, N, y, w);
    case 3: return decode4_all<3>(x, sums.data(), K, N, y, w);
    case 4: return decode4_all<4>(x, sums.data(), K, N, y, w);
    case 5: return decode4_all<5>(x, sums.data(), K, N, y, w);
    case 6: return decode4_all<6>(x, sums.data(), K, N, y, w);
    case 7: return decode4_all<7>(x, sums.data(), K, N, y, w);
    case 8: return decode4_all<8>(x, sums.data(), K, N, y, w);
    default: break;
  }
#endif
  gemm4(x, sums.data(), M, K, N, y, w);
}

using Vec = at::vec::Vectorized<float>;

// One row of the layer norm: x * rsqrt(mean(x^2) + eps) * w (the sum of squares in vector lanes, then
// across them, then the tail: the same order for every row).
void rms_norm_row(const float* x, const float* w, float eps, int64_t K, float* y) {
  Vec acc(0.f);
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    const Vec v = Vec::loadu(x + k);
    acc = at::vec::fmadd(v, v, acc);
  }
  float squares = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; k < K; ++k) squares = std::fma(x[k], x[k], squares);
  const float rstd = 1.f / std::sqrt(squares / static_cast<float>(K) + eps);
  k = 0;
  for (; k + Vec::size() <= K; k += Vec::size())
    (Vec::loadu(x + k) * Vec(rstd) * Vec::loadu(w + k)).store(y + k);
  for (; k < K; ++k) y[k] = x[k] * rstd * w[k];
}

// One row of SwiGLU's input: silu(gate) * up = gate / (1 + exp(-gate)) * up, gate and up the two halves of x.
void swiglu_row(const float* x, int64_t K, float* y) {
  const float* up = x + K;
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) {
    const Vec g = Vec::loadu(x + k);
    (g / (Vec(1.f) + g.neg().exp_u20()) * Vec::loadu(up + k)).store(y + k);
  }
  for (; k < K; ++k) y[k] = x[k] / (1.f + std::exp(-x[k])) * up[k];
}

// What a linear does around its multiplication: the input made from x (as it is, RMS-normalized by
// `norm`, or SwiGLU of its halves: `gate`), then the bias and the residual added to the output.
struct Around {
  std::optional<at::Tensor> norm;
  double eps = 0.;
  bool gate = false;
  std::optional<at::Tensor> bias, residual;

  // x [M, K] (or [M, 2K] with `gate`) -> the linear's input [M, K], contiguous float32
  at::Tensor input(const at::Tensor& x, int64_t K) const {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x: float32 [rows, in_features]");
    TORCH_CHECK(x.size(1) == (gate ? 2 * K : K), "x has ", x.size(1), " features, the weights ", K,
                gate ? " (x 2: gate and up)" : "");
    TORCH_CHECK(!(gate && norm), "a linear's input is normalized or gated, not both");
    if (!norm && !gate) return x.contiguous();
    const at::Tensor src = x.contiguous();
    at::Tensor out = at::empty({x.size(0), K}, x.options());
    const float* w = nullptr;
    if (norm) {
      TORCH_CHECK(norm->numel() == K && norm->is_contiguous() && norm->scalar_type() == at::kFloat,
                  "norm: contiguous float32 [in_features]");
      w = norm->data_ptr<float>();
    }
    const float* in = src.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const auto e = static_cast<float>(eps);
    at::parallel_for(0, x.size(0), 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        if (w)
          rms_norm_row(in + m * K, w, e, K, dst + m * K);
        else
          swiglu_row(in + m * 2 * K, K, dst + m * K);
    });
    return out;
  }

  // y [M, N] += bias, then += residual (each an fp32 add: the bits of torch's `residual + (y + bias)`)
  void finish(at::Tensor& y) const {
    const int64_t M = y.size(0), N = y.size(1);
    const float* b = nullptr;
    const float* r = nullptr;
    if (bias) {
      TORCH_CHECK(bias->numel() == N && bias->is_contiguous() && bias->scalar_type() == at::kFloat,
                  "bias: contiguous float32 [out_features]");
      b = bias->data_ptr<float>();
    }
    if (residual) {
      TORCH_CHECK(residual->dim() == 2 && residual->size(0) == M && residual->size(1) == N &&
                      residual->is_contiguous() && residual->scalar_type() == at::kFloat,
                  "residual: contiguous float32 [rows, out_features]");
      r = residual->data_ptr<float>();
    }
    if (!b && !r) return;
    float* out = y.data_ptr<float>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        for (int64_t n = 0; n < N; ++n) {
          float v = out[m * N + n];
          if (b) v = v + b[n];
          if (r) v = r[m * N + n] + v;
          out[m * N + n] = v;
        }
    });
  }
};

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const std::optional<at::Tensor>& norm, double eps, bool gate,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kLanes && q.is_contiguous() && q.scalar_type() == at::kChar,
              "q: contiguous int8 [out / 16, in, 16]");
  const int64_t K = q.size(1), N = q.size(0) * kLanes;
  TORCH_CHECK(scale.numel() == N && scale.is_contiguous() && scale.scalar_type() == at::kFloat,
              "scale: contiguous float32 [out]");
  const Around around{norm, eps, gate, bias, residual};
  const at::Tensor in = around.input(x, K);
  const int64_t M = in.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // the scale per channel, after the sum: the same for every row
  linear(in.data_ptr<float>(), M, K, N, y.data_ptr<float>(), Int8Weights{q.data_ptr<int8_t>(), K},
         scale.data_ptr<float>());
  around.finish(y);
  return y;
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                       const at::Tensor& zero, const std::optional<at::Tensor>& norm, double eps, bool gate,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(q.dim() == 3 && q.size(2) == kLanes && q.is_contiguous() && q.scalar_type() == at::kByte,
              "q: contiguous uint8 [out / 16, in / 2, 16]");
  const int64_t K = q.size(1) * 2, N = q.size(0) * kLanes;
  TORCH_CHECK(K % kGroup == 0, "int4: in_features must be a multiple of ", kGroup);
  for (const auto* t : {&scale, &zero})
    TORCH_CHECK(t->numel() == N * (K / kGroup) && t->is_contiguous() && t->scalar_type() == at::kBFloat16,
                "scale, zero: contiguous bfloat16 [out / 16, in / 32, 16]");
  const Around around{norm, eps, gate, bias, residual};
  const at::Tensor in = around.input(x, K);
  const int64_t M = in.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const Int4Weights w{q.data_ptr<uint8_t>(), reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>()),
                      reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>()), K};
  linear4(in.data_ptr<float>(), M, K, N, y.data_ptr<float>(), w);
  around.finish(y);
  return y;
}

// A 16-bit or float32 KV element from float32 (to nearest even, as torch's casts round).
template <typename KV>
void store(const float* src, KV* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<KV>(src[i]);
}

// `x * cos + rotate_half(x) * sin` for one head (sin signed: its first half negated, Transformer.rope).
void rotate(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < D; ++i) out[i] = std::fma(x[(i + half) % D], sin[i], x[i] * cos[i]);
}

template <typename KV>
void rope_store_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv,
                     const at::Tensor& slots, int64_t heads, at::Tensor& q) {
  const int64_t T = qkv.size(0), all = qkv.size(1), D = qkv.size(2), kv_heads = (all - heads) / 2;
  const float* src = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  KV* pool = static_cast<KV*>(kv.data_ptr());
  float* out = q.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> k(D);
    for (int64_t t = begin; t < end; ++t) {
      const float* row = src + t * all * D;
      for (int64_t h = 0; h < heads; ++h) rotate(row + h * D, c + t * D, s + t * D, D, out + (t * heads + h) * D);
      KV* dst = pool + slot[t] * 2 * kv_heads * D;  // [2, kv_heads, D]: the token's K, then its V
      for (int64_t h = 0; h < kv_heads; ++h) {
        rotate(row + (heads + h) * D, c + t * D, s + t * D, D, k.data());
        store(k.data(), dst + h * D, D);
        store(row + (heads + kv_heads + h) * D, dst + (kv_heads + h) * D, D);
      }
    }
  });
}

// qkv [T, heads + 2 kv_heads, D] (one projection's output): q and k rotated by RoPE, k and v written into
// the layer's KV `[num_blocks, block_size, 2, kv_heads, D]` at `slot_mapping` in its dtype; returns q.
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor kv,
                      const at::Tensor& slot_mapping, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous() && qkv.scalar_type() == at::kFloat,
              "qkv: contiguous float32 [tokens, heads + 2 kv_heads, head_dim]");
  const int64_t T = qkv.size(0), D = qkv.size(2), kv_heads = (qkv.size(1) - heads) / 2;
  TORCH_CHECK(kv_heads > 0 && heads + 2 * kv_heads == qkv.size(1) && D % 2 == 0, "qkv: heads do not add up");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->numel() == T * D && t->is_contiguous() && t->scalar_type() == at::kFloat,
                "cos, sin: contiguous float32 [tokens, 1, head_dim]");
  TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && kv.size(2) == 2 && kv.size(3) == kv_heads && kv.size(4) == D,
              "kv: contiguous [num_blocks, block_size, 2, kv_heads, head_dim]");
  TORCH_CHECK(slot_mapping.numel() == T && slot_mapping.is_contiguous() && slot_mapping.scalar_type() == at::kLong,
              "slot_mapping: contiguous int64 [tokens]");
  const int64_t slots = kv.size(0) * kv.size(1);
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot ", slot[t], " out of the KV");
  auto q = at::empty({T, heads, D}, qkv.options());
  switch (kv.scalar_type()) {
    case at::kFloat: rope_store_rows<float>(qkv, cos, sin, kv, slot_mapping, heads, q); break;
    case at::kBFloat16: rope_store_rows<at::BFloat16>(qkv, cos, sin, kv, slot_mapping, heads, q); break;
    case at::kHalf: rope_store_rows<at::Half>(qkv, cos, sin, kv, slot_mapping, heads, q); break;
    default: TORCH_CHECK(false, "kv: float32, bfloat16 or float16");
  }
  return q;
}

}  // namespace

TORCH_LIBRARY(dualpath_quant, m) {
  m.def(
      "int8_linear(Tensor x, Tensor q, Tensor scale, Tensor? norm=None, float eps=0., bool gate=False, "
      "Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def(
      "int4_linear(Tensor x, Tensor q, Tensor scale, Tensor zero, Tensor? norm=None, float eps=0., "
      "bool gate=False, Tensor? bias=None, Tensor? residual=None) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) kv, Tensor slot_mapping, int heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualpath_quant, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("rope_store", &rope_store);
}
