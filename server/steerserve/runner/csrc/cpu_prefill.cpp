// CPU prefill attention for steerserve: every prefill chunk of a step (causal within the chunk, all of
// its cached past, sliding window, softcap, GQA) in one call. See cpu_attention.h for layouts.
//
// Work item: (request, kv head, chunk of kChunk query rows). The item copies the keys its rows can see
// into a transposed fp32 buffer Kt[hd][keys], so a score block is a plain outer-product accumulation (one
// broadcast query value times W keys per FMA, no horizontal sums); then per tile of kRows query rows:
// scores for the union of their key ranges, softmax over each row's own range (two-pass, fp32),
// and P.V with the tile's rows sharing every value load.
//
// One template for both ISAs through `Vec` (W lanes, kRows rows a register tile, two registers of
// columns a row): AVX-512 16 lanes x 8 rows, AVX2 8 lanes x 6 rows (12 accumulators + 3 of its 16
// registers). Same products and sums in the same order per lane width.
#include "cpu_attention.h"

namespace {

#if defined(SS_AVX512)
// In-register transpose: r[i] lane j -> r[j] lane i.
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    for (int k = 0; k < 2; ++k) {
      const __m512d a = _mm512_castps_pd(t[i + k]), b = _mm512_castps_pd(t[i + 2 + k]);
      r[i + 2 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));  // lane L: column 4L + 2k
      r[i + 2 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));  // column 4L + 2k + 1
    }
  }
  // now r[i] holds, per 128-bit lane L, 4 values of rows 4*(i/4)..+3; gather lanes across groups
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
    t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xDD);
    t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
    t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
    r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xDD);
    r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
    r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xDD);
  }
}

struct Vec {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int W = 16, kRows = 8;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, reg x) { _mm512_storeu_ps(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static mask mask_of(int64_t left) { return left > 0 ? lane_mask(left) : mask(0); }
  template <typename T>
  static reg load(const T* p, mask m) { return load16(p, m); }
  template <typename T>
  static void store(T* p, reg x, mask m) { store16(p, x, m); }
  static void transpose(reg* r) { transpose16(r); }
};
#elif defined(SS_AVX2)
// In-register transpose: r[i] lane j -> r[j] lane i.
inline void transpose8(__m256* r) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

struct Vec {
  using reg = __m256;
  using mask = int64_t;  // elements left in the row (load8 / store8 take it)
  static constexpr int W = 8, kRows = 6;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, reg x) { _mm256_storeu_ps(p, x); }
  static reg fmadd(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static mask mask_of(int64_t left) { return std::max<int64_t>(left, 0); }
  template <typename T>
  static reg load(const T* p, mask m) { return load8(p, m); }
  template <typename T>
  static void store(T* p, reg x, mask m) { store8(p, x, m); }
  static void transpose(reg* r) { transpose8(r); }
};
#endif

#if defined(SS_AVX512) || defined(SS_AVX2)
constexpr int W = Vec::W, kRows = Vec::kRows, kTile = 2 * W;  // kTile: keys (or columns) a block
constexpr int64_t kChunk = 8 * kRows;                             // query rows per work item
using reg = Vec::reg;

struct Scratch {
  std::vector<float> kt, s, qf;  // kt and qf hold bf16 pairs (32-bit lanes) on the pair path
};

#if defined(SS_AVX512) && defined(__AVX512BF16__)
template <typename QT, typename KT>
constexpr bool kPairs = std::is_same_v<QT, bf16> && std::is_same_v<KT, bf16>;

// Kt2 [hd / 2, ld]: the keys' dims 2p and 2p + 1 as one 32-bit lane, transposed in 16 x 16 blocks of
// lanes (tail keys repeat the last key), so a score block multiplies one broadcast query pair by 16 keys.
template <typename RowFn>
void pair_keys(const bf16* kb, RowFn row, int64_t klo, int64_t nk, int64_t ld, int64_t hd, uint32_t* kt2) {
  const int64_t hp = hd / 2;
  for (int64_t j0 = 0; j0 < ld; j0 += 16) {
    const bf16* k[16];
    for (int i = 0; i < 16; ++i) k[i] = kb + row(klo + std::min<int64_t>(j0 + i, nk - 1));
    for (int64_t p0 = 0; p0 < hp; p0 += 16) {
      const __mmask16 m = lane_mask(hp - p0);
      __m512 t[16];
      for (int i = 0; i < 16; ++i) t[i] = _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(m, k[i] + 2 * p0));
      transpose16(t);
      for (int64_t i = 0; i < std::min<int64_t>(16, hp - p0); ++i)
        _mm512_storeu_ps(reinterpret_cast<float*>(kt2 + (p0 + i) * ld + j0), t[i]);
    }
  }
}

// s[rr * ld + j0 + c] = (q_rr . k_{j0 + c}) * scale for kRows rows x 32 keys; q2: each row's hd / 2 query
// pairs, rows hd lanes apart.
// Per lane: the pairs in order, each adding its two exact products (vdpbf16ps), as the decode kernel does.
inline void score_block_pairs(const uint32_t* kt2, int64_t ld, int64_t j0, const uint32_t* q2, int64_t hd,
                              float scale, float* s) {
  const int64_t hp = hd / 2;
  __m512 acc[kRows][2];
#pragma GCC unroll 8
  for (int rr = 0; rr < kRows; ++rr) acc[rr][0] = acc[rr][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < hp; ++p) {
    const __m512bh k0 = __m512bh(_mm512_loadu_si512(kt2 + p * ld + j0));
    const __m512bh k1 = __m512bh(_mm512_loadu_si512(kt2 + p * ld + j0 + 16));
#pragma GCC unroll 8
    for (int rr = 0; rr < kRows; ++rr) {
      const __m512bh q = __m512bh(_mm512_set1_epi32(int(q2[rr * hd + p])));
      acc[rr][0] = _mm512_dpbf16_ps(acc[rr][0], q, k0);
      acc[rr][1] = _mm512_dpbf16_ps(acc[rr][1], q, k1);
    }
  }
  const __m512 vscale = _mm512_set1_ps(scale);
#pragma GCC unroll 8
  for (int rr = 0; rr < kRows; ++rr) {
    _mm512_storeu_ps(s + rr * ld + j0, _mm512_mul_ps(acc[rr][0], vscale));
    _mm512_storeu_ps(s + rr * ld + j0 + 16, _mm512_mul_ps(acc[rr][1], vscale));
  }
}
#else
template <typename QT, typename KT>
constexpr bool kPairs = false;
inline void score_block_pairs(const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float, float*) {}
#endif

template <typename QT, typename KT>
void prefill_item(const AttnArgs& a, int64_t r, int64_t g, int64_t i0, Scratch& sc) {
  const int64_t hd = a.head_dim, G = a.n_heads / a.n_kv_heads;
  const int64_t q_len = a.q_lens[r], past = a.ctx_lens[r] - q_len, i1 = std::min(q_len, i0 + kChunk);
  auto lo_of = [&](int64_t i) { return a.window > 0 ? std::max<int64_t>(0, past + i - a.window + 1) : 0; };
  const int64_t klo = lo_of(i0), nk = past + i1 - klo;  // keys [klo, klo + nk)
  const int64_t ld = (nk + kTile - 1) / kTile * kTile;  // Kt row stride, padded to whole key blocks
  const KT* kb = static_cast<const KT*>(a.k_cache) + g * a.cache_head;
  const KT* vb = static_cast<const KT*>(a.v_cache) + g * a.cache_head;
  const int64_t* rows = a.gather[r] >= 0 ? a.rows + a.gather[r] : nullptr;
  const int64_t first = a.starts[r];
  auto row = [&](int64_t j) { return (rows ? rows[j] : first + j) * hd; };  // j: key position

  // bf16 queries over a bf16 cache on AVX512-BF16: scores from bf16 pairs (exact products, fp32 sums)
  const bool pairs = kPairs<QT, KT> && hd % 2 == 0;
  sc.kt.resize(size_t(hd * ld));
  float* kt = sc.kt.data();
  if (pairs) {
    if constexpr (kPairs<QT, KT>) pair_keys(kb, row, klo, nk, ld, hd, reinterpret_cast<uint32_t*>(kt));
  } else {  // Kt [hd, ld] = keys transposed to fp32, W x W blocks (tail keys repeat the last key)
    for (int64_t j0 = 0; j0 < ld; j0 += W) {
      const KT* k[W];
      for (int i = 0; i < W; ++i) k[i] = kb + row(klo + std::min<int64_t>(j0 + i, nk - 1));
      for (int64_t d0 = 0; d0 < hd; d0 += W) {
        const Vec::mask m = Vec::mask_of(hd - d0);
        reg t[W];
        for (int i = 0; i < W; ++i) t[i] = Vec::load(k[i] + d0, m);
        Vec::transpose(t);
        for (int64_t i = 0; i < std::min<int64_t>(W, hd - d0); ++i) Vec::storeu(kt + (d0 + i) * ld + j0, t[i]);
      }
    }
  }
  sc.s.resize(size_t(kRows * ld));
  sc.qf.resize(size_t(kRows * hd));
  float *s = sc.s.data(), *qf = sc.qf.data(), inv[kRows];
  const reg vscale = Vec::set1(a.scale);

  for (int64_t h = g * G; h < (g + 1) * G; ++h) {
    for (int64_t t0 = i0; t0 < i1; t0 += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, i1 - t0);
      for (int64_t rr = 0; rr < kRows; ++rr) {  // rows past nr repeat the last one (not written out)
        const QT* qp = static_cast<const QT*>(a.q) + (a.q_rows[r] + t0 + std::min(rr, nr - 1)) * a.q_row +
                       h * a.q_head;
        if (pairs)
          std::memcpy(qf + rr * hd, qp, size_t(hd) * sizeof(QT));  // bf16 pairs, as they came
        else
          for (int64_t d = 0; d < hd; ++d) qf[rr * hd + d] = to_f32(qp[d]);
      }
      const int64_t jbeg = lo_of(t0) - klo, jend = past + t0 + nr - klo;  // union of the rows' keys
      // scores, kTile keys x kRows rows per block
      for (int64_t j0 = jbeg / kTile * kTile; j0 < jend; j0 += kTile) {
        if (pairs) {
          score_block_pairs(reinterpret_cast<const uint32_t*>(kt), ld, j0, reinterpret_cast<const uint32_t*>(qf),
                            hd, a.scale, s);
          continue;
        }
        reg acc[kRows][2];
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) acc[rr][0] = acc[rr][1] = Vec::zero();
        for (int64_t d = 0; d < hd; ++d) {
          const reg k0 = Vec::loadu(kt + d * ld + j0), k1 = Vec::loadu(kt + d * ld + j0 + W);
#pragma GCC unroll 8
          for (int rr = 0; rr < kRows; ++rr) {
            const reg q = Vec::set1(qf[rr * hd + d]);
            acc[rr][0] = Vec::fmadd(q, k0, acc[rr][0]);
            acc[rr][1] = Vec::fmadd(q, k1, acc[rr][1]);
          }
        }
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) {
          Vec::storeu(s + rr * ld + j0, Vec::mul(acc[rr][0], vscale));
          Vec::storeu(s + rr * ld + j0 + W, Vec::mul(acc[rr][1], vscale));
        }
      }
      // softmax over each row's own keys [lo, pos]; zero elsewhere in [jbeg, jend)
      for (int64_t rr = 0; rr < kRows; ++rr) {
        float* sr = s + rr * ld;
        if (rr >= nr) {
          std::fill(sr + jbeg, sr + jend, 0.0f);
          continue;
        }
        const int64_t lo = lo_of(t0 + rr) - klo, hi = past + t0 + rr + 1 - klo;
        inv[rr] = softmax_range(sr, lo, hi, a.softcap);
        std::fill(sr + jbeg, sr + lo, 0.0f);
        std::fill(sr + hi, sr + jend, 0.0f);
      }
      // out = P.V, kTile columns x kRows rows of accumulators at a time
      for (int64_t d0 = 0; d0 < hd; d0 += kTile) {
        const Vec::mask m0 = Vec::mask_of(hd - d0), m1 = Vec::mask_of(hd - d0 - W);
        reg o[kRows][2];
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) o[rr][0] = o[rr][1] = Vec::zero();
        for (int64_t j = jbeg; j < jend; ++j) {
          const KT* v = vb + row(klo + j) + d0;
          const reg v0 = Vec::load(v, m0), v1 = Vec::load(v + W, m1);
#pragma GCC unroll 8
          for (int rr = 0; rr < kRows; ++rr) {
            const reg p = Vec::set1(s[rr * ld + j]);
            o[rr][0] = Vec::fmadd(p, v0, o[rr][0]);
            o[rr][1] = Vec::fmadd(p, v1, o[rr][1]);
          }
        }
        // NOTE: a constant trip count, so o[][] stays in registers (a runtime index would pin it to memory)
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) {
          if (rr >= nr) continue;
          QT* op = static_cast<QT*>(a.out) + (a.q_rows[r] + t0 + rr) * a.out_row + h * a.out_head + d0;
          const reg vi = Vec::set1(inv[rr]);
          Vec::store(op, Vec::mul(o[rr][0], vi), m0);
          Vec::store(op + W, Vec::mul(o[rr][1], vi), m1);
        }
      }
    }
  }
}

template <typename QT, typename KT>
void prefill_all(const AttnArgs& a) {
  std::vector<int64_t> offset(size_t(a.n_req + 1), 0);  // first work item of each request
  for (int64_t r = 0; r < a.n_req; ++r)
    offset[r + 1] = offset[r] + a.n_kv_heads * ((a.q_lens[r] + kChunk - 1) / kChunk);
  const int64_t items = offset[a.n_req];
#pragma omp parallel num_threads(a.n_threads)
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = items - 1; i >= 0; --i) {  // NOTE: last chunks (the most keys) first
      const int64_t r = std::upper_bound(offset.begin(), offset.end(), i) - offset.begin() - 1;
      const int64_t chunks = (a.q_lens[r] + kChunk - 1) / kChunk, k = i - offset[r];
      prefill_item<QT, KT>(a, r, k / chunks, (k % chunks) * kChunk, sc);
    }
  }
}
#endif

}  // namespace

extern "C" {

// Returns 0 on success, -1 on an unsupported dtype pair, -2 when built without AVX-512 or AVX2 (use SDPA).
int ss_prefill_attention(const AttnArgs* a) {
#if defined(SS_AVX512) || defined(SS_AVX2)
  if (a->q_dtype == 0 && a->kv_dtype == 0) return prefill_all<float, float>(*a), 0;
  if (a->q_dtype == 0 && a->kv_dtype == 1) return prefill_all<float, bf16>(*a), 0;
  if (a->q_dtype == 1 && a->kv_dtype == 0) return prefill_all<bf16, float>(*a), 0;
  if (a->q_dtype == 1 && a->kv_dtype == 1) return prefill_all<bf16, bf16>(*a), 0;
  return -1;
#else
  (void)a;
  return -2;
#endif
}
}
