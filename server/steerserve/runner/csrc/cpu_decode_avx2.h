// The decode kernel's two inner loops for CPUs with AVX2 + FMA and no AVX-512 (8 fp32 lanes, 16 vector
// registers): scores (q . k) and the probability-weighted sum of values. Included by cpu_attention.cpp,
// which picks these when SS_AVX2 is defined; the math (fp32 products, fp32 sums) is the AVX-512 one.
#pragma once
#include "cpu_attention.h"

#ifdef SS_AVX2
namespace {

// Eight vectors -> one: lane i = the sum of the lanes of a[i].
inline __m256 reduce8(const __m256* a) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // 128-bit halves: keys 0-3, 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// s[h * n + j] = (q_h . k_j) * scale for the G query heads of a group.
template <typename KT, typename RowFn>
void scores_avx2(const float* qf, int64_t G, int64_t hd, const KT* kb, RowFn row, int64_t n, float scale,
                 float* s) {
  // NOTE: 8 keys a block, in two passes of 4 independent FMA chains that share each query load.
  for (int64_t j0 = 0; j0 < n; j0 += 8) {
    const int64_t nb = std::min<int64_t>(8, n - j0);
    const KT* k[8];
    for (int i = 0; i < 8; ++i) k[i] = kb + row(j0 + std::min<int64_t>(i, nb - 1));
    for (int64_t i = j0 + 8; i < std::min<int64_t>(n, j0 + 16); ++i)  // the next block's rows
      for (int64_t b = 0; b < hd * int64_t(sizeof(KT)); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(kb + row(i)) + b, _MM_HINT_T0);
    for (int64_t h = 0; h < G; ++h) {
      __m256 acc[8];
      for (int i0 = 0; i0 < 8; i0 += 4) {
        __m256 x[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t d = 0; d < hd; d += 8) {
          const __m256 q = load8(qf + h * hd + d, hd - d);
          for (int ii = 0; ii < 4; ++ii) x[ii] = _mm256_fmadd_ps(q, load8(k[i0 + ii] + d, hd - d), x[ii]);
        }
        for (int ii = 0; ii < 4; ++ii) acc[i0 + ii] = x[ii];
      }
      store8(s + h * n + j0, _mm256_mul_ps(reduce8(acc), _mm256_set1_ps(scale)), nb);
    }
  }
}

// acc[h, d0:d0+32] += sum_i p[h, i] * v_i[d0:d0+32] for NH heads: each value chunk is loaded and
// converted once for them. NOTE: one head keeps two accumulator sets (even and odd keys) so that 8 FMA
// chains are in flight; 2 heads x 4 chunks are 8 already. 8 accumulators + 4 values fit 16 registers.
template <int NH, typename KT, typename RowFn>
inline void pv_tile_avx2(const float* p, int64_t n, int64_t j0, int64_t nb, int64_t hd, int64_t d0,
                         const KT* vb, RowFn row, float* acc) {
  constexpr int S = NH == 1 ? 2 : 1;
  int64_t left[4];
  __m256 o[S][NH][4];
  for (int c = 0; c < 4; ++c) left[c] = hd - d0 - 8 * c;
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) {
      o[0][h][c] = load8(acc + h * hd + d0 + 8 * c, left[c]);
      if constexpr (S == 2) o[1][h][c] = _mm256_setzero_ps();
    }
  int64_t i = 0;
  for (; i + S <= nb; i += S)
    for (int t = 0; t < S; ++t) {
      const KT* v = vb + row(j0 + i + t) + d0;
      __m256 vv[4];
      for (int c = 0; c < 4; ++c) vv[c] = load8(v + 8 * c, left[c]);
      for (int h = 0; h < NH; ++h) {
        const __m256 ph = _mm256_set1_ps(p[h * n + j0 + i + t]);
        for (int c = 0; c < 4; ++c) o[t][h][c] = _mm256_fmadd_ps(ph, vv[c], o[t][h][c]);
      }
    }
  for (; i < nb; ++i) {
    const KT* v = vb + row(j0 + i) + d0;
    for (int c = 0; c < 4; ++c) {
      const __m256 vc = load8(v + 8 * c, left[c]);
      for (int h = 0; h < NH; ++h)
        o[0][h][c] = _mm256_fmadd_ps(_mm256_set1_ps(p[h * n + j0 + i]), vc, o[0][h][c]);
    }
  }
  for (int h = 0; h < NH; ++h)
    for (int c = 0; c < 4; ++c) {
      __m256 x = o[0][h][c];
      if constexpr (S == 2) x = _mm256_add_ps(x, o[1][h][c]);
      store8(acc + h * hd + d0 + 8 * c, x, left[c]);
    }
}

// acc[h * hd + d] += sum_j p[h * n + j] * v_j[d]: blocks of 64 keys (in L1 across the head pairs) x
// 32-wide column tiles held in registers.
template <typename KT, typename RowFn>
void weighted_values_avx2(const float* p, int64_t G, int64_t hd, const KT* vb, RowFn row, int64_t n,
                          float* acc) {
  for (int64_t j0 = 0; j0 < n; j0 += 64) {
    const int64_t nb = std::min<int64_t>(64, n - j0);
    for (int64_t d0 = 0; d0 < hd; d0 += 32) {
      int64_t h = 0;
      for (; h + 2 <= G; h += 2) pv_tile_avx2<2>(p + h * n, n, j0, nb, hd, d0, vb, row, acc + h * hd);
      if (h < G) pv_tile_avx2<1>(p + h * n, n, j0, nb, hd, d0, vb, row, acc + h * hd);
    }
  }
}

}  // namespace
#endif
