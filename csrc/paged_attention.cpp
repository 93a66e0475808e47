// Paged attention on CPU: every query attends the K/V of its sequence read in place from the KV
// pool's blocks through the sequence's block table, with no gathered copy (see
// dualpath_sdk/model/kernel.py, which builds and loads this file, and model/paged.py, the pure-torch
// path it is tested against).
//
// One work unit is (sequence, its KV heads or one of them, a tile of queries). It holds, per row
// (query x query head of a KV head's group, so GQA reads each K/V row once for the whole group), the
// running max, the running sum and the output accumulated in place in `out`: an online softmax over
// key tiles that start on block boundaries, so a row's sum runs in the same order whatever the batch
// around it. Scores come from a register-blocked tile (R rows x KT keys) against a transposed copy
// of the tile's K; P.V reads the tile's V rows in place, or from a packed copy when many rows reuse
// it (prefill): the only copies, one tile each, L1-sized. Units run under at::parallel_for: torch's
// own thread pool and thread count, so engines at one thread stay at one.
//
// The pool may hold K/V in float32, bfloat16 or float16 (EngineConfig.kv_dtype): 16-bit K and V rows are
// widened to float32 as a tile is copied (V then always goes through the packed copy), so the math, and
// a row's order of sums, is the same in every KV dtype.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr int64_t kKeyVecs = 4;                  // vectors of keys per score tile
constexpr int64_t kTile = kKeyVecs * kLanes;     // keys per score tile (64 with AVX-512)
constexpr int64_t kAccumulators = kLanes >= 16 ? 24 : 12;  // vector registers the micro-kernels may hold
#define UNROLL _Pragma("GCC unroll 16")
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Args {
  const float* q;            // [T, heads, D]
  const void* kv;            // blocks of [block_size, 2, kv_heads, D], in KV (float, BFloat16 or Half)
  const int64_t* tables;     // [B, table_stride] each sequence's blocks
  const int64_t* q_offsets;  // [B] first row of each sequence in q / out
  const int64_t* starts;     // [B] position of each sequence's first query
  float* out;                // [T, heads, D]
  int64_t heads, kv_heads, group, block_size, table_stride;
  int64_t token_stride;  // elements between two tokens of a block (2 * kv_heads * D)
  int64_t block_stride;  // elements between two blocks
  int64_t window;        // keys a query sees, itself included; 0: all earlier ones
  float scale;
};

struct Unit {  // queries [first, first + count) of sequence `seq`, KV heads [head, head + heads)
  int64_t seq, head, heads, first, count;
};

// `n` elements of a 16-bit KV row widened to float32 (n a multiple of 16 where vectors are used).
inline void widen(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void widen(const at::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

template <int64_t D, typename KV>
struct Kernel {
  static constexpr bool kWide = std::is_same_v<KV, float>;
  static_assert(D % kLanes == 0, "head_dim must be a multiple of the vector width");
  static constexpr int64_t kDimVecs = D / kLanes;
  static constexpr int kRows = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>(6, kAccumulators / std::max<int64_t>(kDimVecs, kKeyVecs))));
  static_assert(kRows <= kLanes, "a group's rescaling factors are exp'd as one vector");

  // One key tile for `N` rows: scores against `kt` ([D, kTile], transposed K), online-softmax update
  // of (m, l), then out += P.V with V rows read from the block. `lo`/`hi`: each row's visible keys.
  template <int N>
  static void step(const float* const* q, float* const* o, float* m, float* l, const float* lo,
                   const float* hi, const float* kt, const float* v, int64_t v_stride, int64_t k0, int64_t nk,
                   bool full, float scale) {
    Vec acc[N][kKeyVecs];
    UNROLL
    for (int r = 0; r < N; ++r)
      UNROLL
      for (int c = 0; c < kKeyVecs; ++c) acc[r][c] = Vec(0.f);
    for (int64_t d = 0; d < D; ++d) {
      Vec k[kKeyVecs];
      UNROLL
      for (int c = 0; c < kKeyVecs; ++c) k[c] = Vec::loadu(kt + d * kTile + c * kLanes);
      UNROLL
      for (int r = 0; r < N; ++r) {
        const Vec qd(q[r][d]);
        UNROLL
        for (int c = 0; c < kKeyVecs; ++c) acc[r][c] = at::vec::fmadd(qd, k[c], acc[r][c]);
      }
    }
    alignas(64) float p[N][kTile];
    alignas(64) float alpha[kLanes] = {};
    float top[N];
    UNROLL
    for (int r = 0; r < N; ++r) {
      Vec* s = acc[r];  // raw scores: scale > 0, so the max is taken before scaling
      if (!full) {
        const Vec lo_v(lo[r]), hi_v(std::min<float>(hi[r], static_cast<float>(k0 + nk)));
        UNROLL
        for (int c = 0; c < kKeyVecs; ++c) {
          const Vec pos = Vec::arange(static_cast<float>(k0 + c * kLanes), 1.f);
          s[c] = Vec::blendv(Vec(kNegInf), s[c], (pos >= lo_v) & (pos < hi_v));
        }
      }
      Vec t = s[0];
      UNROLL
      for (int c = 1; c < kKeyVecs; ++c) t = at::vec::maximum(t, s[c]);
      top[r] = t.reduce_max();
    }
    // each row of a group sees a key of the tile (see run), so every new max is finite
    const Vec scale_v(scale);
    Vec sums[N];
    UNROLL
    for (int r = 0; r < N; ++r) {
      const float m_new = std::max(m[r], top[r]);
      alpha[r] = (m[r] - m_new) * scale;  // exp'd below, all rows at once; exp(-inf) = 0 on a first tile
      m[r] = m_new;
      const Vec m_scaled(m_new * scale);
      sums[r] = Vec(0.f);
      UNROLL
      for (int c = 0; c < kKeyVecs; ++c) {
        const Vec e = at::vec::fmsub(acc[r][c], scale_v, m_scaled).exp_u20();  // masked: exp(-inf) = 0
        e.store(p[r] + c * kLanes);
        sums[r] = sums[r] + e;
      }
    }
    Vec::loadu(alpha).exp_u20().store(alpha);
    UNROLL
    for (int r = 0; r < N; ++r) l[r] = l[r] * alpha[r] + sums[r].reduce_add();
    Vec acc_o[N][kDimVecs];
    UNROLL
    for (int r = 0; r < N; ++r) {
      const Vec a(alpha[r]);
      UNROLL
      for (int c = 0; c < kDimVecs; ++c) acc_o[r][c] = Vec::loadu(o[r] + c * kLanes) * a;
    }
    for (int64_t t = 0; t < nk; ++t) {
      Vec vrow[kDimVecs];
      UNROLL
      for (int c = 0; c < kDimVecs; ++c) vrow[c] = Vec::loadu(v + t * v_stride + c * kLanes);
      UNROLL
      for (int r = 0; r < N; ++r) {
        const Vec pt(p[r][t]);
        UNROLL
        for (int c = 0; c < kDimVecs; ++c) acc_o[r][c] = at::vec::fmadd(pt, vrow[c], acc_o[r][c]);
      }
    }
    UNROLL
    for (int r = 0; r < N; ++r)
      UNROLL
      for (int c = 0; c < kDimVecs; ++c) acc_o[r][c].store(o[r] + c * kLanes);
  }

  template <int N = kRows>
  static void step_n(int n, const float* const* q, float* const* o, float* m, float* l, const float* lo,
                     const float* hi, const float* kt, const float* v, int64_t v_stride, int64_t k0,
                     int64_t nk, bool full, float scale) {
    if constexpr (N > 1) {
      if (n < N) {
        step_n<N - 1>(n, q, o, m, l, lo, hi, kt, v, v_stride, k0, nk, full, scale);
        return;
      }
    }
    step<N>(q, o, m, l, lo, hi, kt, v, v_stride, k0, nk, full, scale);
  }

  static void run(const Args& a, const Unit& u) {
    const int64_t g = a.group, rows = u.count * g;  // rows of one KV head
    const int64_t pos0 = a.starts[u.seq] + u.first;  // the unit's first query's position
    const int64_t khi = pos0 + u.count;              // keys [klo, khi) are seen by some row
    const int64_t klo = a.window > 0 ? std::max<int64_t>(0, pos0 - a.window + 1) : 0;
    std::vector<const float*> q(rows * u.heads);
    std::vector<float*> o(rows * u.heads);
    std::vector<float> m(rows * u.heads, kNegInf), l(rows * u.heads, 0.f), lo(rows), hi(rows);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = pos0 + r / g;
      hi[r] = static_cast<float>(pos + 1);
      lo[r] = a.window > 0 ? static_cast<float>(pos - a.window + 1) : 0.f;
      for (int64_t h = 0; h < u.heads; ++h) {
        const int64_t row = (a.q_offsets[u.seq] + u.first + r / g) * a.heads + (u.head + h) * g + r % g;
        q[h * rows + r] = a.q + row * D;
        o[h * rows + r] = a.out + row * D;
        std::fill(a.out + row * D, a.out + row * D + D, 0.f);
      }
    }
    // few rows (decode) read float32 V in place; many (prefill), and 16-bit V, a packed float32 copy
    const bool pack_v = !kWide || rows > 2 * kRows;
    alignas(64) float kt[D * kTile];  // the tile's K, transposed
    alignas(64) float vt[kTile * D];  // the tile's V rows, packed
    alignas(64) float kw[kWide ? 1 : kTile * D];  // 16-bit K rows widened, before the transpose
    const KV* kv = static_cast<const KV*>(a.kv);
    const int64_t* table = a.tables + u.seq * a.table_stride;
    const int64_t bs = a.block_size;
    for (int64_t j = klo / bs; j * bs < khi; ++j) {
      for (int64_t t0 = 0; t0 < bs && j * bs + t0 < khi; t0 += kTile) {
        const int64_t k0 = j * bs + t0, nk = std::min({kTile, bs - t0, khi - k0});
        if (k0 + nk <= klo) continue;
        // rows that see a key of [k0, k0 + nk): causal from below, the window from above
        const int64_t r_begin = std::max<int64_t>(0, (k0 - pos0) * g);
        const int64_t r_end =
            a.window > 0 ? std::min(rows, (k0 + nk - 1 + a.window - pos0) * g) : rows;
        if (r_begin >= r_end) continue;
        for (int64_t h = 0; h < u.heads; ++h) {
          const KV* keys = kv + table[j] * a.block_stride + t0 * a.token_stride + (u.head + h) * D;
          const KV* values = keys + a.kv_heads * D;
          if (nk < kTile) std::fill(kt, kt + D * kTile, 0.f);
          const float* k_rows;
          int64_t k_stride;
          if constexpr (kWide) {
            k_rows = keys, k_stride = a.token_stride;
          } else {
            for (int64_t t = 0; t < nk; ++t) widen(keys + t * a.token_stride, kw + t * D, D);
            k_rows = kw, k_stride = D;
          }
          at::vec::transpose_mxn<float>(k_rows, k_stride, kt, kTile, static_cast<int>(nk), static_cast<int>(D));
          if (pack_v)
            for (int64_t t = 0; t < nk; ++t) {
              if constexpr (kWide) {
                for (int64_t c = 0; c < D; c += kLanes)
                  Vec::loadu(values + t * a.token_stride + c).store(vt + t * D + c);
              } else {
                widen(values + t * a.token_stride, vt + t * D, D);
              }
            }
          const float* v_rows = nullptr;
          if constexpr (kWide) v_rows = values;
          const int64_t base = h * rows;
          for (int64_t r = r_begin; r < r_end; r += kRows) {
            const int n = static_cast<int>(std::min<int64_t>(kRows, r_end - r));
            const int64_t first_pos = pos0 + r / g, last_pos = pos0 + (r + n - 1) / g;
            const bool full = nk == kTile && first_pos >= k0 + nk - 1 &&
                              (a.window <= 0 || last_pos - a.window + 1 <= k0);
            step_n(n, q.data() + base + r, o.data() + base + r, m.data() + base + r, l.data() + base + r,
                   lo.data() + r, hi.data() + r, kt, pack_v ? vt : v_rows, pack_v ? D : a.token_stride,
                   k0, nk, full, a.scale);
          }
        }
      }
    }
    for (int64_t r = 0; r < rows * u.heads; ++r) {
      const Vec inv(1.f / l[r]);
      for (int64_t c = 0; c < D; c += kLanes) (Vec::loadu(o[r] + c) * inv).store(o[r] + c);
    }
  }
};

template <int64_t D, typename KV>
void run_units(const Args& a, const std::vector<Unit>& units) {
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) Kernel<D, KV>::run(a, units[i]);
  });
}

template <typename KV>
void run_dim(int64_t d, const Args& a, const std::vector<Unit>& units) {
  switch (d) {
    case 64: run_units<64, KV>(a, units); break;
    case 128: run_units<128, KV>(a, units); break;
    case 32: run_units<32, KV>(a, units); break;
    case 256: run_units<256, KV>(a, units); break;
    case 16: run_units<16, KV>(a, units); break;
    default: TORCH_CHECK(false, "head_dim ", d, " is not built into this kernel");
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& block_tables,
                           const at::Tensor& q_offsets, const at::Tensor& starts,
                           const at::Tensor& q_lens, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.scalar_type() == at::kFloat,
              "q: contiguous float32 [tokens, heads, head_dim]");
  const auto kv_type = kv.scalar_type();
  TORCH_CHECK(kv.dim() == 5 && kv.size(2) == 2 &&
                  (kv_type == at::kFloat || kv_type == at::kBFloat16 || kv_type == at::kHalf),
              "kv: float32, bfloat16 or float16 [blocks, block_size, 2, kv_heads, head_dim]");
  const int64_t heads = q.size(1), d = q.size(2), kv_heads = kv.size(3), bs = kv.size(1);
  TORCH_CHECK(kv.size(4) == d && heads % kv_heads == 0, "kv's heads or head_dim do not fit q's");
  TORCH_CHECK(kv.stride(4) == 1 && kv.stride(3) == d && kv.stride(2) == kv_heads * d &&
                  kv.stride(1) == 2 * kv_heads * d,
              "kv: each block must be contiguous");
  for (const auto* t : {&block_tables, &q_offsets, &starts, &q_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "metadata: contiguous int64");
  auto out = at::empty_like(q);
  const int64_t seqs = q_lens.size(0), group = heads / kv_heads;
  const int64_t* lens = q_lens.data_ptr<int64_t>();
  // a unit's rows (queries x query heads) keep their outputs hot: up to ~64K floats of them, in even
  // tiles of queries. A unit takes every KV head when they fit, so it reads each block in one pass,
  // unless that would leave threads idle (fewer sequences than threads)
  const int64_t budget = 65536 / d;
  const bool all_heads = group * kv_heads <= budget && seqs >= at::get_num_threads();
  const int64_t per_unit = all_heads ? kv_heads : 1;
  const int64_t most = std::max<int64_t>(1, budget / (group * per_unit));
  std::vector<Unit> units;
  for (int64_t b = 0; b < seqs; ++b) {
    if (lens[b] == 0) continue;
    const int64_t tiles = (lens[b] + most - 1) / most, tile = (lens[b] + tiles - 1) / tiles;
    for (int64_t h = 0; h < kv_heads; h += per_unit)
      for (int64_t first = 0; first < lens[b]; first += tile)
        units.push_back({b, h, per_unit, first, std::min(tile, lens[b] - first)});
  }
  const Args args{q.data_ptr<float>(),
                  kv.data_ptr(),
                  block_tables.data_ptr<int64_t>(),
                  q_offsets.data_ptr<int64_t>(),
                  starts.data_ptr<int64_t>(),
                  out.data_ptr<float>(),
                  heads,
                  kv_heads,
                  group,
                  bs,
                  block_tables.size(1),
                  kv.stride(1),
                  kv.stride(0),
                  window,
                  static_cast<float>(scale)};
  if (kv_type == at::kFloat)
    run_dim<float>(d, args, units);
  else if (kv_type == at::kBFloat16)
    run_dim<at::BFloat16>(d, args, units);
  else
    run_dim<at::Half>(d, args, units);
  return out;
}

}  // namespace

TORCH_LIBRARY(dualpath, m) {
  m.def(
      "paged_attention(Tensor q, Tensor kv, Tensor block_tables, Tensor q_offsets, Tensor starts, "
      "Tensor q_lens, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(dualpath, CPU, m) { m.impl("paged_attention", &paged_attention); }
