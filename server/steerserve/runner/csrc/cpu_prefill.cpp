// CPU prefill attention for steerserve: every prefill chunk of a step (causal within the chunk, all of
// its cached past, sliding window, softcap, GQA) in one call. See cpu_attention.h for layouts.
//
// Work item: (request, kv head, chunk of 64 query rows). The item copies the keys its rows can see into
// a transposed fp32 buffer Kt[hd][keys], so a score block is a plain outer-product accumulation (one
// broadcast query value times 16 keys per FMA, no horizontal sums); then per tile of 8 query rows:
// scores for the union of their key ranges, softmax over each row's own range (two-pass, fp32),
// and P.V with the 8 rows sharing every value load.
#include "cpu_attention.h"

namespace {

#ifdef SS_AVX512
constexpr int64_t kChunk = 64;  // query rows per work item
constexpr int kRows = 8;        // query rows per register tile (8 x 32 accumulators)

struct Scratch {
  std::vector<float> kt, s, qf;
};

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

template <typename QT, typename KT>
void prefill_item(const AttnArgs& a, int64_t r, int64_t g, int64_t i0, Scratch& sc) {
  const int64_t hd = a.head_dim, G = a.n_heads / a.n_kv_heads;
  const int64_t q_len = a.q_lens[r], past = a.ctx_lens[r] - q_len, i1 = std::min(q_len, i0 + kChunk);
  auto lo_of = [&](int64_t i) { return a.window > 0 ? std::max<int64_t>(0, past + i - a.window + 1) : 0; };
  const int64_t klo = lo_of(i0), nk = past + i1 - klo;  // keys [klo, klo + nk)
  const int64_t ld = (nk + 31) / 32 * 32;               // Kt row stride, padded to whole 32-key blocks
  const KT* kb = static_cast<const KT*>(a.k_cache) + g * a.cache_head;
  const KT* vb = static_cast<const KT*>(a.v_cache) + g * a.cache_head;
  const int64_t* rows = a.gather[r] >= 0 ? a.rows + a.gather[r] : nullptr;
  const int64_t first = a.starts[r];
  auto row = [&](int64_t j) { return (rows ? rows[j] : first + j) * hd; };  // j: key position

  // Kt [hd, ld] = keys transposed to fp32, 16 x 16 blocks (tail keys repeat the last key)
  sc.kt.resize(size_t(hd * ld));
  float* kt = sc.kt.data();
  for (int64_t j0 = 0; j0 < ld; j0 += 16) {
    const KT* k[16];
    for (int i = 0; i < 16; ++i) k[i] = kb + row(klo + std::min<int64_t>(j0 + i, nk - 1));
    for (int64_t d0 = 0; d0 < hd; d0 += 16) {
      const __mmask16 m = lane_mask(hd - d0);
      __m512 t[16];
      for (int i = 0; i < 16; ++i) t[i] = load16(k[i] + d0, m);
      transpose16(t);
      for (int64_t i = 0; i < std::min<int64_t>(16, hd - d0); ++i) _mm512_storeu_ps(kt + (d0 + i) * ld + j0, t[i]);
    }
  }
  sc.s.resize(size_t(kRows * ld));
  sc.qf.resize(size_t(kRows * hd));
  float *s = sc.s.data(), *qf = sc.qf.data(), inv[kRows];
  const __m512 vscale = _mm512_set1_ps(a.scale);

  for (int64_t h = g * G; h < (g + 1) * G; ++h) {
    for (int64_t t0 = i0; t0 < i1; t0 += kRows) {
      const int64_t nr = std::min<int64_t>(kRows, i1 - t0);
      for (int64_t rr = 0; rr < kRows; ++rr) {  // rows past nr repeat the last one (not written out)
        const QT* qp = static_cast<const QT*>(a.q) + (a.q_rows[r] + t0 + std::min(rr, nr - 1)) * a.q_row +
                       h * a.q_head;
        for (int64_t d = 0; d < hd; ++d) qf[rr * hd + d] = to_f32(qp[d]);
      }
      const int64_t jbeg = lo_of(t0) - klo, jend = past + t0 + nr - klo;  // union of the rows' keys
      // scores, 32 keys x 8 rows per block
      for (int64_t j0 = jbeg / 32 * 32; j0 < jend; j0 += 32) {
        __m512 acc[kRows][2];
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) acc[rr][0] = acc[rr][1] = _mm512_setzero_ps();
        for (int64_t d = 0; d < hd; ++d) {
          const __m512 k0 = _mm512_loadu_ps(kt + d * ld + j0), k1 = _mm512_loadu_ps(kt + d * ld + j0 + 16);
#pragma GCC unroll 8
          for (int rr = 0; rr < kRows; ++rr) {
            const __m512 q = _mm512_set1_ps(qf[rr * hd + d]);
            acc[rr][0] = _mm512_fmadd_ps(q, k0, acc[rr][0]);
            acc[rr][1] = _mm512_fmadd_ps(q, k1, acc[rr][1]);
          }
        }
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) {
          _mm512_storeu_ps(s + rr * ld + j0, _mm512_mul_ps(acc[rr][0], vscale));
          _mm512_storeu_ps(s + rr * ld + j0 + 16, _mm512_mul_ps(acc[rr][1], vscale));
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
      // out = P.V, 32 columns x 8 rows of accumulators at a time
      for (int64_t d0 = 0; d0 < hd; d0 += 32) {
        const __mmask16 m0 = lane_mask(hd - d0), m1 = d0 + 16 < hd ? lane_mask(hd - d0 - 16) : 0;
        __m512 o[kRows][2];
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) o[rr][0] = o[rr][1] = _mm512_setzero_ps();
        for (int64_t j = jbeg; j < jend; ++j) {
          const KT* v = vb + row(klo + j) + d0;
          const __m512 v0 = load16(v, m0), v1 = load16(v + 16, m1);
#pragma GCC unroll 8
          for (int rr = 0; rr < kRows; ++rr) {
            const __m512 p = _mm512_set1_ps(s[rr * ld + j]);
            o[rr][0] = _mm512_fmadd_ps(p, v0, o[rr][0]);
            o[rr][1] = _mm512_fmadd_ps(p, v1, o[rr][1]);
          }
        }
        // NOTE: a constant trip count, so o[][] stays in registers (a runtime index would pin it to memory)
#pragma GCC unroll 8
        for (int rr = 0; rr < kRows; ++rr) {
          if (rr >= nr) continue;
          QT* op = static_cast<QT*>(a.out) + (a.q_rows[r] + t0 + rr) * a.out_row + h * a.out_head + d0;
          const __m512 vi = _mm512_set1_ps(inv[rr]);
          store16(op, _mm512_mul_ps(o[rr][0], vi), m0);
          store16(op + 16, _mm512_mul_ps(o[rr][1], vi), m1);
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

// Returns 0 on success, -1 on an unsupported dtype pair, -2 when built without AVX-512 (use SDPA).
int ss_prefill_attention(const AttnArgs* a) {
#ifdef SS_AVX512
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
