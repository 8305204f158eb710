// The decode kernel's AVX-512 inner loops (16 fp32 lanes, 32 vector registers): the reduction tree of the
// scores and the probability-weighted sum of values. Included by cpu_attention.cpp, which uses these when
// SS_AVX512 is defined (cpu_decode_avx2.h holds the AVX2 + FMA ones; the math is the same).
#pragma once
#include "cpu_attention.h"

#ifdef SS_AVX512
namespace {

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

}  // namespace
#endif
