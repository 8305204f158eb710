// fp32 GEMM for decode-sized row counts on AVX2 CPUs: y[M, N] = x[M, K] @ W[K, N] (+ bias), with W packed
// once into column panels (issue #26, runner/cpu_sgemm.py).
//
// Why: at 1-64 rows oneDNN's packed sgemm reaches 14-150 GFLOP/s on GPT-2 small's shapes and LM head
// (2-core AVX2 EPYC), MKL's less. A 6x16 register tile over a panel-packed weight reaches 16-178 there,
// 1.15-1.8x.
//
// Exactness: every output element is one fixed sequence of fp32 operations, whatever the row count, the
// tile its row falls in or the thread that runs it. Within a K block of kKBlock it is one FMA chain from
// zero, k ascending; the blocks' partial sums are added left to right, then the bias. So a row's result
// never depends on the rows beside it (batch-invariant), and the blocked sum keeps the rounding error
// near a blocked GEMM's rather than a 3,072-term chain's.
//
// Without AVX2 + FMA the scalar loop runs the same operations in the same order (std::fma), so the same
// bits (tests/runner/test_cpu_sgemm.py builds it and checks).
//
// Packed layout: panels of kPanel (16) output columns, [ceil(N / 16)][K][16], zero past N.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SS_SGEMM_AVX2 1
#endif

namespace {

constexpr int64_t kPanel = 16;  // output columns a panel holds: two 8-lane vectors
constexpr int kRows = 6;        // rows a register tile holds: 6 x 2 accumulators + 2 weights + 1 broadcast
constexpr int64_t kKBlock = 256;  // K per partial sum (a 16 KiB panel block stays in L1 across tiles)
constexpr int64_t kMBlock = 96;   // rows whose K block (96 KiB at kKBlock) stays in L2 across panels

// One tile: rows r (r <= kRows) x one panel's 16 columns over k in [k0, k1). `first`: store the partial
// sum; else add it to what y holds. `bias` (its `cols` values) is added after the last block.
#if defined(SS_SGEMM_AVX2)
template <int R>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1, float* y,
                 int64_t ldy, int64_t cols, bool first, const float* bias) {
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel), w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
      acc[i][0] = _mm256_fmadd_ps(a, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, w1, acc[i][1]);
    }
  }
  alignas(32) float buf[kPanel] = {};
  __m256 b0 = _mm256_setzero_ps(), b1 = b0;
  if (bias) {
    std::memcpy(buf, bias, cols * sizeof(float));
    b0 = _mm256_load_ps(buf), b1 = _mm256_load_ps(buf + 8);
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    float* row = y + i * ldy;
    __m256 s0 = acc[i][0], s1 = acc[i][1];
    if (!first) {
      std::memcpy(buf, row, cols * sizeof(float));
      s0 = _mm256_add_ps(_mm256_load_ps(buf), s0), s1 = _mm256_add_ps(_mm256_load_ps(buf + 8), s1);
    }
    if (bias) s0 = _mm256_add_ps(s0, b0), s1 = _mm256_add_ps(s1, b1);
    if (cols == kPanel) {
      _mm256_storeu_ps(row, s0);
      _mm256_storeu_ps(row + 8, s1);
    } else {
      _mm256_store_ps(buf, s0);
      _mm256_store_ps(buf + 8, s1);
      std::memcpy(row, buf, cols * sizeof(float));
    }
  }
}
#else
template <int R>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t k0, int64_t k1, float* y,
                 int64_t ldy, int64_t cols, bool first, const float* bias) {
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < cols; ++j) {
      float acc = 0.0f;
      for (int64_t k = k0; k < k1; ++k) acc = std::fma(x[i * ldx + k], panel[k * kPanel + j], acc);
      float s = first ? acc : y[i * ldy + j] + acc;
      y[i * ldy + j] = bias ? s + bias[j] : s;
    }
}
#endif

inline int64_t panel_count(int64_t N) { return (N + kPanel - 1) / kPanel; }

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t, int64_t, bool,
                        const float*);
constexpr TileFn kTiles[kRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

}  // namespace

extern "C" {

int32_t ss_sgemm_abi_version() { return 1; }

int32_t ss_sgemm_isa() {
#if defined(SS_SGEMM_AVX2)
  return 1;
#else
  return 0;
#endif
}

int64_t ss_sgemm_packed_numel(int64_t K, int64_t N) { return panel_count(N) * K * kPanel; }

// w's element (k, n) is w[k * sk + n * sn]: a Conv1D weight [in, out] and a Linear weight [out, in] pack
// without a transposed copy.
void ss_sgemm_pack(const float* w, int64_t K, int64_t N, int64_t sk, int64_t sn, float* out) {
  const int64_t panels = panel_count(N);
#pragma omp parallel for schedule(static)
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kPanel; ++j) {
        const int64_t n = p * kPanel + j;
        out[(p * K + k) * kPanel + j] = n < N ? w[k * sk + n * sn] : 0.0f;
      }
}

// x [M, K] (row stride ldx), packed W, bias [N] (or null), y [M, N] (row stride ldy).
// Each thread owns a contiguous range of panels, so no two threads write the same element.
void ss_sgemm(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, int64_t N,
              const float* bias, float* y, int64_t ldy, int32_t n_threads) {
  const int64_t panels = panel_count(N);
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(n_threads, panels)));
#pragma omp parallel num_threads(nt)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
#else
    const int t = 0;
#endif
    const int64_t p0 = panels * t / nt, p1 = panels * (t + 1) / nt;
    for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
      const int64_t m1 = std::min(M, m0 + kMBlock);
      for (int64_t p = p0; p < p1; ++p) {
        const float* panel = packed + p * K * kPanel;
        const int64_t cols = std::min(kPanel, N - p * kPanel);
        for (int64_t k0 = 0;; k0 += kKBlock) {  // NOTE: once also for K = 0 (y = bias, or zeros)
          const int64_t k1 = std::min(K, k0 + kKBlock);
          const float* b = (bias && k1 == K) ? bias + p * kPanel : nullptr;
          for (int64_t r = m0; r < m1; r += kRows) {
            const int64_t rows = std::min<int64_t>(kRows, m1 - r);
            kTiles[rows](x + r * ldx, ldx, panel, k0, k1, y + r * ldy + p * kPanel, ldy, cols, k0 == 0, b);
          }
          if (k1 == K) break;
        }
      }
    }
  }
}

}  // extern "C"
