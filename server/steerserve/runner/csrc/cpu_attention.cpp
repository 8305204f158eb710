// CPU decode attention and KV-cache writes for steerserve (loaded with ctypes by cpu_attention.py).
// See cpu_attention.h for layouts and dtypes.
#include "cpu_attention.h"
#include "cpu_decode_avx2.h"

#include <atomic>

namespace {

#ifdef SS_AVX512
// Sixteen vectors -> one: lane i = sum of the lanes of a[i] (a transpose-and-add tree, 15 adds).
inline __m512 reduce16(__m512* a) {
  __m512 c[8], d[4], e[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves: lanes 0-7 key 2i, 8-15 key 2i+1
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane l: key 4i + l
    d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)  // lane l: two partials of keys 8i + l and 8i + 4 + l
    e[i] = _mm512_add_ps(_mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(d[2 * i], d[2 * i + 1], 0xEE));
  __m512 f = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88), _mm512_shuffle_ps(e[0], e[1], 0xDD));
  // f[4l + i] = key 4i + l
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(idx, f);
}
#endif

// Scores of `n` keys for the G query heads of a group: s[h * n + j] = (q_h . k_j) * scale.
// qb: the same queries in bf16 when they came as bf16 (exact), else null.
template <typename KT, typename RowFn>
void scores(const float* qf, const bf16* qb, int64_t G, int64_t hd, const KT* kb, RowFn row, int64_t n,
            float scale, float* s) {
#ifdef SS_AVX512
  // NOTE: 16 keys at a time, 16 independent FMA chains, one reduction tree per 16 keys.
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, n - j0);
    const KT* k[16];
    for (int i = 0; i < 16; ++i) k[i] = kb + row(j0 + std::min<int64_t>(i, nb - 1));
    if (j0 + 16 < n)  // the next block's rows, while this one computes
      for (int64_t i = j0 + 16; i < std::min<int64_t>(n, j0 + 32); ++i)
        for (int64_t b = 0; b < hd * int64_t(sizeof(KT)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(kb + row(i)) + b, _MM_HINT_T0);
    for (int64_t h = 0; h < G; ++h) {
      __m512 acc[16];
      // NOTE: 4 keys at a time (4 independent chains, one query load), rows in memory order
      for (int i0 = 0; i0 < 16; i0 += 4) {
        __m512 x[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#ifdef __AVX512BF16__
        if constexpr (std::is_same_v<KT, bf16>) {
          if (qb) {  // bf16 x bf16 pairs: products are exact in fp32, no conversions
            for (int64_t d = 0; d < hd; d += 32) {
              const __mmask32 m = hd - d >= 32 ? ~__mmask32(0) : __mmask32((1u << (hd - d)) - 1);
              const __m512bh q = __m512bh(_mm512_maskz_loadu_epi16(m, qb + h * hd + d));
              for (int ii = 0; ii < 4; ++ii)
                x[ii] = _mm512_dpbf16_ps(x[ii], q, __m512bh(_mm512_maskz_loadu_epi16(m, k[i0 + ii] + d)));
            }
            for (int ii = 0; ii < 4; ++ii) acc[i0 + ii] = x[ii];
            continue;
          }
        }
#endif
        for (int64_t d = 0; d < hd; d += 16) {
          const __mmask16 m = lane_mask(hd - d);
          const __m512 q = load16(qf + h * hd + d, m);
          for (int ii = 0; ii < 4; ++ii) x[ii] = _mm512_fmadd_ps(q, load16(k[i0 + ii] + d, m), x[ii]);
        }
        for (int ii = 0; ii < 4; ++ii) acc[i0 + ii] = x[ii];
      }
      store16(s + h * n + j0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)), lane_mask(nb));
    }
  }
#elif defined(SS_AVX2)
  (void)qb;
  scores_avx2(qf, G, hd, kb, row, n, scale, s);
#else
  for (int64_t j = 0; j < n; ++j) {
    const KT* k = kb + row(j);
    for (int64_t h = 0; h < G; ++h) {
      float dot = 0.0f;
      for (int64_t d = 0; d < hd; ++d) dot += qf[h * hd + d] * to_f32(k[d]);
      s[h * n + j] = dot * scale;
    }
  }
#endif
}

#ifdef SS_AVX512
// acc[h, d0:d0+64] += sum_i p[h, i] * v_i[d0:d0+64] for NH heads at once: each value chunk is loaded
// and converted once for all of them. NOTE: with 1-2 heads, two accumulator sets (even and odd keys)
// keep enough FMA chains in flight.
template <int NH, typename KT, typename RowFn>
inline void pv_tile(const float* p, int64_t n, int64_t j0, int64_t nb, int64_t hd, int64_t d0, const KT* vb,
                    RowFn row, float* acc) {
  constexpr int S = NH <= 2 ? 2 : 1;
  __mmask16 m[4];
  __m512 o[S][NH][4];
  for (int c = 0; c < 4; ++c) m[c] = d0 + 16 * c < hd ? lane_mask(hd - d0 - 16 * c) : 0;
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) {
      o[0][h][c] = load16(acc + h * hd + d0 + 16 * c, m[c]);
      if constexpr (S == 2) o[1][h][c] = _mm512_setzero_ps();
    }
  int64_t i = 0;
  for (; i + S <= nb; i += S) {
    for (int t = 0; t < S; ++t) {
      const KT* v = vb + row(j0 + i + t) + d0;
      __m512 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = load16(v + 16 * c, m[c]);
      for (int h = 0; h < NH; ++h) {
        const __m512 ph = _mm512_set1_ps(p[h * n + j0 + i + t]);
        for (int c = 0; c < 4; ++c) o[t][h][c] = _mm512_fmadd_ps(ph, vv[c], o[t][h][c]);
      }
    }
  }
  for (; i < nb; ++i) {
    const KT* v = vb + row(j0 + i) + d0;
    for (int c = 0; c < 4; ++c) {
      const __m512 vc = load16(v + 16 * c, m[c]);
      for (int h = 0; h < NH; ++h) o[0][h][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[h * n + j0 + i]), vc, o[0][h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) {
      __m512 x = o[0][h][c];
      if constexpr (S == 2) x = _mm512_add_ps(x, o[1][h][c]);
      store16(acc + h * hd + d0 + 16 * c, x, m[c]);
    }
}
#endif

#ifdef SS_AVX512
// pv_tile for bf16 values: one 32-element load gives two fp32 vectors without crossing lanes, its even
// elements (shifted into the high half) and its odd ones (masked), so the accumulators hold the even and
// the odd dims of each 32-dim chunk apart, and are (de)interleaved once per tile. Per dim, the products
// and the order they are summed in are pv_tile's: the same bits, with 2 conversion ops a key and chunk
// instead of 4 (vpmovzxwd crosses lanes).
template <int NH, typename RowFn>
inline void pv_tile_bf16(const float* p, int64_t n, int64_t j0, int64_t nb, int64_t hd, int64_t d0,
                         const bf16* vb, RowFn row, float* acc) {
  constexpr int S = NH <= 2 ? 2 : 1;
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i high_half = _mm512_set1_epi32(int(0xFFFF0000u));
  __mmask32 m[2];
  __mmask16 ma[2][2];
  __m512 o[S][NH][4];  // [2c]: even dims of chunk c, [2c + 1]: odd dims
  for (int c = 0; c < 2; ++c) {
    const int64_t left = std::max<int64_t>(0, hd - d0 - 32 * c);
    m[c] = left >= 32 ? ~__mmask32(0) : __mmask32((1u << left) - 1);
    ma[c][0] = lane_mask(left);
    ma[c][1] = lane_mask(std::max<int64_t>(0, left - 16));
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 2; ++c) {
      const float* a = acc + h * hd + d0 + 32 * c;
      const __m512 a0 = _mm512_maskz_loadu_ps(ma[c][0], a), a1 = _mm512_maskz_loadu_ps(ma[c][1], a + 16);
      o[0][h][2 * c] = _mm512_permutex2var_ps(a0, even, a1);
      o[0][h][2 * c + 1] = _mm512_permutex2var_ps(a0, odd, a1);
      if constexpr (S == 2) o[1][h][2 * c] = o[1][h][2 * c + 1] = _mm512_setzero_ps();
    }
  auto add_key = [&](int t, int64_t j) {
    const bf16* v = vb + row(j) + d0;
    for (int c = 0; c < 2; ++c) {
      const __m512i x = _mm512_maskz_loadu_epi16(m[c], v + 32 * c);
      const __m512 ve = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      const __m512 vo = _mm512_castsi512_ps(_mm512_and_si512(x, high_half));
      for (int h = 0; h < NH; ++h) {
        const __m512 ph = _mm512_set1_ps(p[h * n + j]);
        o[t][h][2 * c] = _mm512_fmadd_ps(ph, ve, o[t][h][2 * c]);
        o[t][h][2 * c + 1] = _mm512_fmadd_ps(ph, vo, o[t][h][2 * c + 1]);
      }
    }
  };
  int64_t i = 0;
  for (; i + S <= nb; i += S)
    for (int t = 0; t < S; ++t) add_key(t, j0 + i + t);
  for (; i < nb; ++i) add_key(0, j0 + i);
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 2; ++c) {
      __m512 e = o[0][h][2 * c], od = o[0][h][2 * c + 1];
      if constexpr (S == 2) e = _mm512_add_ps(e, o[1][h][2 * c]), od = _mm512_add_ps(od, o[1][h][2 * c + 1]);
      float* a = acc + h * hd + d0 + 32 * c;
      _mm512_mask_storeu_ps(a, ma[c][0], _mm512_permutex2var_ps(e, lo, od));
      _mm512_mask_storeu_ps(a + 16, ma[c][1], _mm512_permutex2var_ps(e, hi, od));
    }
}

// One NH-head tile of weighted_values: pv_tile_bf16 for bf16 values, pv_tile for fp32 ones.
template <int NH, typename KT, typename RowFn>
inline void pv_any(const float* p, int64_t n, int64_t j0, int64_t nb, int64_t hd, int64_t d0, const KT* vb,
                   RowFn row, float* acc) {
  if constexpr (std::is_same_v<KT, bf16>)
    pv_tile_bf16<NH>(p, n, j0, nb, hd, d0, vb, row, acc);
  else
    pv_tile<NH>(p, n, j0, nb, hd, d0, vb, row, acc);
}
#endif

// acc[h * hd + d] += sum_j p[h * n + j] * v_j[d]
template <typename KT, typename RowFn>
void weighted_values(const float* p, int64_t G, int64_t hd, const KT* vb, RowFn row, int64_t n,
                     float* acc) {
#ifdef SS_AVX512
  // NOTE: blocks of 64 keys (in L1 across head groups) x 64-wide column tiles held in registers.
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t nb = std::min<int64_t>(64, n - j0);
    for (int64_t d0 = 0; d0 < hd; d0 += 64) {
      int64_t h = 0;
      for (; h + 4 <= G; h += 4) pv_any<4>(p + h * n, n, j0, nb, hd, d0, vb, row, acc + h * hd);
      if (G - h >= 2) {
        pv_any<2>(p + h * n, n, j0, nb, hd, d0, vb, row, acc + h * hd);
        h += 2;
      }
      if (h < G) pv_any<1>(p + h * n, n, j0, nb, hd, d0, vb, row, acc + h * hd);
    }
  }
#elif defined(SS_AVX2)
  weighted_values_avx2(p, G, hd, vb, row, n, acc);
#else
  for (int64_t j = 0; j < n; ++j) {
    const KT* v = vb + row(j);
    for (int64_t h = 0; h < G; ++h)
      for (int64_t d = 0; d < hd; ++d) acc[h * hd + d] += p[h * n + j] * to_f32(v[d]);
  }
#endif
}

// f(row), where row(j) is the cache offset of request r's key lo + j: its own lambda type for contiguous
// and for gathered rows, so the inner loops carry no branch.
template <typename F>
inline void with_key_rows(const AttnArgs& a, int64_t r, int64_t lo, F f) {
  const int64_t hd = a.head_dim;
  if (a.gather[r] >= 0) {
    const int64_t* rows = a.rows + a.gather[r] + lo;
    f([rows, hd](int64_t j) { return rows[j] * hd; });
  } else {
    const int64_t first = a.starts[r] + lo;
    f([first, hd](int64_t j) { return (first + j) * hd; });
  }
}

// Rows whose fetch is started ahead: a stream's first rows are otherwise demand misses one after another
// until the hardware prefetcher has seen the stream (measured: 3-10% of a decode call at contexts of
// 100-400 keys, 64 requests x 12 heads, 2-core AVX-512 EPYC).
constexpr int64_t kPrefetchRows = 32;

// Prefetch rows 0..n-1 (into L2: they are used after the next few thousand loads, not the next few).
template <typename KT, typename RowFn>
inline void prefetch_rows(const KT* base, RowFn row, int64_t n, int64_t hd) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t b = 0; b < hd * int64_t(sizeof(KT)); b += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(base + row(j)) + b, 0, 2);
}

// The window of request r's keys: [lo, ctx).
inline int64_t first_key(const AttnArgs& a, int64_t r) {
  return a.window > 0 ? std::max<int64_t>(0, a.ctx_lens[r] - a.window) : 0;
}

// One (request, kv head) item: the group's query heads share every key and value row they read.
template <typename QT, typename KT>
void attend(const AttnArgs& a, int64_t r, int64_t g, std::vector<float>& buf) {
  const int64_t hd = a.head_dim, G = a.n_heads / a.n_kv_heads, lo = first_key(a, r), n = a.ctx_lens[r] - lo;
  const KT* kb = static_cast<const KT*>(a.k_cache) + g * a.cache_head;
  const KT* vb = static_cast<const KT*>(a.v_cache) + g * a.cache_head;

  buf.resize(size_t(G * (3 * hd + n + 1)));
  float* qf = buf.data();     // [G, hd] queries in fp32
  float* acc = qf + G * hd;   // [G, hd] sum of p * v
  float* inv = acc + G * hd;  // [G] 1 / sum of p
  float* s = inv + G;         // [G, n] scores, then probabilities
  bf16* qb = nullptr;         // [G, hd] queries in bf16, when they are bf16
  const QT* qp = static_cast<const QT*>(a.q) + a.q_rows[r] * a.q_row + g * G * a.q_head;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < hd; ++d) qf[h * hd + d] = to_f32(qp[h * a.q_head + d]);
  if constexpr (std::is_same_v<QT, bf16>) {
    qb = reinterpret_cast<bf16*>(s + G * n);
    for (int64_t h = 0; h < G; ++h) std::memcpy(qb + h * hd, qp + h * a.q_head, size_t(hd) * sizeof(bf16));
  }
  std::fill(acc, acc + G * hd, 0.0f);

  with_key_rows(a, r, lo, [&](auto row) {
    prefetch_rows(vb, row, std::min(n, kPrefetchRows), hd);  // NOTE: on their way while the scores run
    scores(qf, qb, G, hd, kb, row, n, a.scale, s);
    for (int64_t h = 0; h < G; ++h) inv[h] = softmax_range(s + h * n, 0, n, a.softcap);
    weighted_values(s, G, hd, vb, row, n, acc);
  });
  QT* op = static_cast<QT*>(a.out) + a.q_rows[r] * a.out_row + g * G * a.out_head;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < hd; ++d) from_f32(acc[h * hd + d] * inv[h], op + h * a.out_head + d);
}

template <typename QT, typename KT>
void decode_all(const AttnArgs& a) {
  const int64_t items = a.n_req * a.n_kv_heads;
  std::atomic<int64_t> claimed{0};  // NOTE: dynamic schedule by hand: each thread knows its next item early
#pragma omp parallel num_threads(a.n_threads)
  {
    std::vector<float> buf;
    for (int64_t i = claimed.fetch_add(1, std::memory_order_relaxed), next; i < items; i = next) {
      next = claimed.fetch_add(1, std::memory_order_relaxed);
      if (next < items) {  // its first key rows, while this item runs
        const int64_t r = next / a.n_kv_heads, lo = first_key(a, r);
        const KT* kb = static_cast<const KT*>(a.k_cache) + (next % a.n_kv_heads) * a.cache_head;
        with_key_rows(a, r, lo, [&](auto row) {
          prefetch_rows(kb, row, std::min(a.ctx_lens[r] - lo, kPrefetchRows), a.head_dim);
        });
      }
      attend<QT, KT>(a, i / a.n_kv_heads, i % a.n_kv_heads, buf);
    }
  }
}

// The decode kernel's memory reads and nothing else: per (request, kv head) item, in the kernel's order and
// schedule, its key rows and then its value rows, XOR-folded (benchmarks/bench_attention.py prints the
// kernel's time against this: how far it is from reading its own rows plainly). Returns the fold.
uint64_t decode_reads(const AttnArgs& a) {
  const int64_t items = a.n_req * a.n_kv_heads;
  const int64_t row_bytes = a.head_dim * (a.kv_dtype == 1 ? 2 : 4), words = row_bytes / 8;
  uint64_t fold = 0;
#pragma omp parallel for num_threads(a.n_threads) schedule(dynamic, 1) reduction(^ : fold)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / a.n_kv_heads, g = i % a.n_kv_heads, lo = first_key(a, r), n = a.ctx_lens[r] - lo;
    const int64_t elem = row_bytes / a.head_dim;
    for (const void* cache : {a.k_cache, a.v_cache}) {
      const char* base = static_cast<const char*>(cache) + g * a.cache_head * elem;
      with_key_rows(a, r, lo, [&](auto row) {
        for (int64_t j = 0; j < n; ++j) {
          const char* p = base + row(j) * elem;
          for (int64_t w = 0; w < words; ++w) {
            uint64_t x;
            std::memcpy(&x, p + 8 * w, 8);
            fold ^= x;
          }
          if (row_bytes % 8) {  // a row's last bytes, zero-padded to a word
            uint64_t x = 0;
            std::memcpy(&x, p + 8 * words, size_t(row_bytes % 8));
            fold ^= x;
          }
        }
      });
    }
  }
  return fold;
}

struct WriteArgs {
  const void* key;  // [H_kv, T, hd] with strides (k_head, k_row)
  const void* value;
  int64_t k_head, k_row, v_head, v_row;
  void* k_cache;
  void* v_cache;
  int64_t cache_head;
  const int64_t* slots;  // [T] cache row of each new token
  int64_t n_tokens, n_kv_heads, head_dim;
  int32_t src_dtype, kv_dtype, n_threads;
};

// dst[:n] = src[:n] in dst's dtype (bf16: round to nearest even).
template <typename ST, typename KT>
inline void copy_row(const ST* src, KT* dst, int64_t n) {
  if constexpr (std::is_same_v<ST, KT>) {
    std::memcpy(dst, src, size_t(n) * sizeof(KT));
  } else {
#ifdef SS_AVX512
    for (int64_t d = 0; d < n; d += 16) {
      const __mmask16 m = lane_mask(n - d);
      store16(dst + d, load16(src + d, m), m);
    }
#else
    for (int64_t d = 0; d < n; ++d) from_f32(to_f32(src[d]), dst + d);
#endif
  }
}

template <typename ST, typename KT>
void write_all(const WriteArgs& a) {
  const int64_t items = a.n_tokens * a.n_kv_heads, hd = a.head_dim;
  const int nt = items * hd >= (1 << 14) ? a.n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t t = i / a.n_kv_heads, g = i % a.n_kv_heads;
    const ST* ks = static_cast<const ST*>(a.key) + g * a.k_head + t * a.k_row;
    const ST* vs = static_cast<const ST*>(a.value) + g * a.v_head + t * a.v_row;
    KT* kd = static_cast<KT*>(a.k_cache) + g * a.cache_head + a.slots[t] * hd;
    KT* vd = static_cast<KT*>(a.v_cache) + g * a.cache_head + a.slots[t] * hd;
    copy_row(ks, kd, hd);
    copy_row(vs, vd, hd);
  }
}

}  // namespace

extern "C" {

int ss_abi_version() { return 3; }

// Which vector loops this build's kernels have: 2 = AVX-512, 1 = AVX2 + FMA, 0 = none (decode runs
// scalar loops, prefill chunks go to SDPA).
int ss_isa() {
#if defined(SS_AVX512)
  return 2;
#elif defined(SS_AVX2)
  return 1;
#else
  return 0;
#endif
}

// Returns 0 on success, -1 on an unsupported dtype pair.
int ss_decode_attention(const AttnArgs* a) {
  if (a->q_dtype == 0 && a->kv_dtype == 0) return decode_all<float, float>(*a), 0;
  if (a->q_dtype == 0 && a->kv_dtype == 1) return decode_all<float, bf16>(*a), 0;
  if (a->q_dtype == 1 && a->kv_dtype == 0) return decode_all<bf16, float>(*a), 0;
  if (a->q_dtype == 1 && a->kv_dtype == 1) return decode_all<bf16, bf16>(*a), 0;
  return -1;
}

uint64_t ss_decode_reads(const AttnArgs* a) { return decode_reads(*a); }

int ss_write_kv(const WriteArgs* a) {
  if (a->src_dtype == 0 && a->kv_dtype == 0) return write_all<float, float>(*a), 0;
  if (a->src_dtype == 0 && a->kv_dtype == 1) return write_all<float, bf16>(*a), 0;
  if (a->src_dtype == 1 && a->kv_dtype == 0) return write_all<bf16, float>(*a), 0;
  if (a->src_dtype == 1 && a->kv_dtype == 1) return write_all<bf16, bf16>(*a), 0;
  return -1;
}
}
