// CPU decode attention and KV-cache writes for steerserve (loaded with ctypes by cpu_attention.py).
// See cpu_attention.h for layouts and dtypes.
#include "cpu_attention.h"
#include "cpu_decode_avx2.h"
#include "cpu_decode_avx512.h"

#include <atomic>

namespace {

// The next item's rows, fetched into L2 a share at a time while this item runs, so the memory system sees
// one stream with no gap between items (each new (request, head) run otherwise starts cold: ~0.65 us a run
// start measured on the 2-core AVX-512 EPYC, 1.08x / 1.4x faster plain reads at 400 / 100 keys). Contiguous
// requests only; capped so the next item's rows and this one's stay within L2.
struct Ahead {
  static constexpr int64_t kMaxLines = 2048;  // 128 KiB of each of keys and values
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t lines = 0, k_done = 0, v_done = 0;  // lines of each to fetch; fetched so far
  // Fetch the next item's keys (values) up to `num / den` of them.
  void keys(int64_t num, int64_t den) { fetch(k, k_done, num, den); }
  void values(int64_t num, int64_t den) { fetch(v, v_done, num, den); }

 private:
  void fetch(const char* base, int64_t& done, int64_t num, int64_t den) {
    if (!base) return;
    for (const int64_t upto = lines * num / den; done < upto; ++done) __builtin_prefetch(base + 64 * done, 0, 2);
  }
};

// Scores of `n` keys for the G query heads of a group: s[h * n + j] = (q_h . k_j) * scale.
// qb: the same queries in bf16 when they came as bf16 (exact), else null.
template <typename KT, typename RowFn>
void scores(const float* qf, const bf16* qb, int64_t G, int64_t hd, const KT* kb, RowFn row, int64_t n,
            float scale, float* s, Ahead& ahead) {
#ifdef SS_AVX512
  // NOTE: 16 keys at a time, 16 independent FMA chains, one reduction tree per 16 keys.
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, n - j0);
    const KT* k[16];
    for (int i = 0; i < 16; ++i) k[i] = kb + row(j0 + std::min<int64_t>(i, nb - 1));
    // The next block's rows into L1 while this one computes: fp32 caches only. NOTE: a bf16 item's rows are
    // in L2 by now (Ahead: its first 128 KiB), and these prefetches cost more than they saved: decode calls
    // 1.03-1.04x faster without them (the real engine's calls alternating between builds, 5 runs, 2-core
    // AVX-512 EPYC, the same bits)
    if (!std::is_same_v<KT, bf16> && j0 + 16 < n)
      for (int64_t i = j0 + 16; i < std::min<int64_t>(n, j0 + 32); ++i)
        for (int64_t b = 0; b < hd * int64_t(sizeof(KT)); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(kb + row(i)) + b, _MM_HINT_T0);
    ahead.keys(j0 + nb, n);
    for (int64_t h = 0; h < G; ++h) {
      __m512 acc[16];
#ifdef __AVX512BF16__
      if constexpr (std::is_same_v<KT, bf16>) {
        if (qb) {  // bf16 x bf16 pairs: products are exact in fp32, no conversions
          // NOTE: all 16 keys' chains side by side, one query load a step: 4 at a time left the dot
          // products' latency showing (16: 4-10% off a decode call, 2-core AVX-512 EPYC, the same bits)
          __m512 x[16];  // NOTE: chains in locals, copied out for the tree (acc itself: ~10% slower)
          for (int i = 0; i < 16; ++i) x[i] = _mm512_setzero_ps();
          for (int64_t d = 0; d < hd; d += 32) {
            const __mmask32 m = hd - d >= 32 ? ~__mmask32(0) : __mmask32((1u << (hd - d)) - 1);
            const __m512bh q = __m512bh(_mm512_maskz_loadu_epi16(m, qb + h * hd + d));
            for (int i = 0; i < 16; ++i)
              x[i] = _mm512_dpbf16_ps(x[i], q, __m512bh(_mm512_maskz_loadu_epi16(m, k[i] + d)));
          }
          for (int i = 0; i < 16; ++i) acc[i] = x[i];
          store16(s + h * n + j0, _mm512_mul_ps(reduce16(acc), _mm512_set1_ps(scale)), lane_mask(nb));
          continue;
        }
      }
#endif
      // NOTE: 4 keys at a time (4 independent chains, one query load), rows in memory order (16 at a time
      // was 3-9% slower here, fp32 cache)
      for (int i0 = 0; i0 < 16; i0 += 4) {
        __m512 x[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
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
  (void)qb, (void)ahead;
  scores_avx2(qf, G, hd, kb, row, n, scale, s);
#else
  (void)ahead;
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

// acc[h * hd + d] += sum_j p[h * n + j] * v_j[d]
template <typename KT, typename RowFn>
void weighted_values(const float* p, int64_t G, int64_t hd, const KT* vb, RowFn row, int64_t n,
                     float* acc, Ahead& ahead) {
#ifdef SS_AVX512
  // NOTE: blocks of 64 keys (in L1 across head groups) x 64-wide column tiles held in registers.
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t nb = std::min<int64_t>(64, n - j0);
    ahead.values(j0 + nb, n);
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
  (void)ahead;
  weighted_values_avx2(p, G, hd, vb, row, n, acc);
#else
  (void)ahead;
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
// until the hardware prefetcher has seen the stream (measured: 9% / 4% / 2.5% of a decode call at contexts
// of ~100 / 200 / 400 keys, 64 requests x 12 heads, 2-core AVX-512 EPYC).
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
void attend(const AttnArgs& a, int64_t r, int64_t g, std::vector<float>& buf, Ahead& ahead) {
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
    scores(qf, qb, G, hd, kb, row, n, a.scale, s, ahead);
    for (int64_t h = 0; h < G; ++h) inv[h] = softmax_range(s + h * n, 0, n, a.softcap);
    weighted_values(s, G, hd, vb, row, n, acc, ahead);
  });
  QT* op = static_cast<QT*>(a.out) + a.q_rows[r] * a.out_row + g * G * a.out_head;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < hd; ++d) from_f32(acc[h * hd + d] * inv[h], op + h * a.out_head + d);
}

// Start item `i` coming: fetch its first key rows now, and return what fetches the rest of its rows while
// the current item runs (nothing more for a gathered request).
template <typename KT>
Ahead start_next(const AttnArgs& a, int64_t i) {
  const int64_t r = i / a.n_kv_heads, lo = first_key(a, r), n = a.ctx_lens[r] - lo;
  const int64_t off = (i % a.n_kv_heads) * a.cache_head;  // elements: the item's head
  with_key_rows(a, r, lo, [&](auto row) {
    prefetch_rows(static_cast<const KT*>(a.k_cache) + off, row, std::min(n, kPrefetchRows), a.head_dim);
  });
  Ahead ahead;
  if (a.gather[r] < 0) {
    const int64_t first = (off + (a.starts[r] + lo) * a.head_dim) * int64_t(sizeof(KT));  // bytes
    ahead.k = static_cast<const char*>(a.k_cache) + first;
    ahead.v = static_cast<const char*>(a.v_cache) + first;
    ahead.lines = std::min(Ahead::kMaxLines, (n * a.head_dim * int64_t(sizeof(KT)) + 63) / 64);
  }
  return ahead;
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
      Ahead ahead = next < items ? start_next<KT>(a, next) : Ahead{};
      attend<QT, KT>(a, i / a.n_kv_heads, i % a.n_kv_heads, buf, ahead);
    }
  }
}

// The decode kernel's memory reads and nothing else: per (request, kv head) item, in the kernel's order and
// handed out one at a time as it does, its key rows and then its value rows, XOR-folded
// (benchmarks/bench_attention.py prints the kernel's time against this: how far it is from reading its own
// rows plainly). Returns the fold.
uint64_t decode_reads(const AttnArgs& a) {
  const int64_t items = a.n_req * a.n_kv_heads, elem = a.kv_dtype == 1 ? 2 : 4;
  const int64_t row_bytes = a.head_dim * elem, words = row_bytes / 8;
  uint64_t fold = 0;
#pragma omp parallel for num_threads(a.n_threads) schedule(dynamic, 1) reduction(^ : fold)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t r = i / a.n_kv_heads, g = i % a.n_kv_heads, lo = first_key(a, r), n = a.ctx_lens[r] - lo;
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

int ss_abi_version() { return 4; }

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
