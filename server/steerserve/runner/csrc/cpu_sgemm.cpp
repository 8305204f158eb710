// fp32 GEMM for decode-sized row counts on AVX2 CPUs: y[M, N] = x[M, K] @ W[K, N] (+ bias), with W packed
// once into column panels (issue #26, runner/cpu_sgemm.py).
//
// Why: at 1-64 rows oneDNN's packed sgemm reaches 14-150 GFLOP/s on GPT-2 small's shapes and LM head
// (2-core AVX2 EPYC), MKL's less. Register tiles of 4-6 rows x 16 columns (1-2 rows x 32) over a
// panel-packed weight reach 29-178 there, 1.15-2x.
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

#include "cpu_gelu.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SS_SGEMM_AVX2 1
#endif
// The GELU epilogue computes cpu_activation's element math on the tile's registers: gelu8 in an AVX2
// build, gelu1 in the scalar one. An AVX-512 build's activation kernel runs gelu16, so it has none.
#if defined(SS_AVX512)
#define SS_SGEMM_GELU 0
#else
#define SS_SGEMM_GELU 1
#endif

namespace {

constexpr int64_t kPanel = 16;  // output columns a panel holds: two 8-lane vectors
constexpr int kRows = 6;        // most rows a tile holds: 6 x 2 accumulators + 2 weights + 1 broadcast
constexpr int64_t kKBlock = 256;  // K per partial sum (a 16 KiB panel block stays in L1 across tiles)
constexpr int64_t kMBlock = 96;   // rows whose K block (96 KiB at kKBlock) stays in L2 across panels

// One tile: R rows x P adjacent panels (P * 16 columns) over k in [k0, k1). `first`: store the partial
// sum; else add it to what y holds. `bias` (`cols` values) is added after the last block. Only P = 1 takes
// a partial panel (cols < 16). NOTE: an FMA has a 4-cycle latency and 2 issue a cycle, so 8 independent
// chains keep it busy: tiles of 1-2 rows span 2 panels; every element is still one chain over k.
#if defined(SS_SGEMM_AVX2)
// The first pf_n k steps also prefetch a line of each panel's block at pf (see ss_sgemm; pf_n is 0 only for
// a thread's last block).
template <int R, int P>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, int64_t k0, int64_t k1,
                 float* y, int64_t ldy, int64_t cols, bool first, const float* bias, bool gelu, const float* pf,
                 int64_t pf_n) {
  constexpr int V = 2 * P;  // 8-lane vectors a row spans
  __m256 acc[R][V];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; ++k) {
    if (k - k0 < pf_n)  // one 64-byte line of each panel's next block a step
#pragma GCC unroll 2
      for (int q = 0; q < P; ++q)
        _mm_prefetch(reinterpret_cast<const char*>(pf + q * K * kPanel + (k - k0) * kPanel), _MM_HINT_T0);
    __m256 w[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      w[v] = _mm256_loadu_ps(panel + (v / 2) * K * kPanel + k * kPanel + (v % 2) * 8);
      // NOTE: keeps a reused weight in a register; GCC would fold it into R memory-operand FMAs, and those
      // loads (R per vector) held 3-4 row tiles to 48-66 GFLOP/s a core against 76-99 (measured)
      if constexpr (R > 1) asm("" : "+x"(w[v]));
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(a, w[v], acc[i][v]);
    }
  }
  alignas(32) float buf[kPanel * P] = {};
  const int64_t n = P == 1 ? cols : kPanel * P;
  __m256 b[V];
#pragma GCC unroll 8
  for (int v = 0; v < V; ++v) b[v] = _mm256_setzero_ps();
  if (bias) {
    std::memcpy(buf, bias, n * sizeof(float));
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) b[v] = _mm256_load_ps(buf + 8 * v);
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) {
    float* row = y + i * ldy;
    __m256 s[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) s[v] = acc[i][v];
    if (!first) {
      std::memcpy(buf, row, n * sizeof(float));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) s[v] = _mm256_add_ps(_mm256_load_ps(buf + 8 * v), s[v]);
    }
    if (bias)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) s[v] = _mm256_add_ps(s[v], b[v]);
#if SS_SGEMM_GELU
    if (gelu)
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) s[v] = gelu8(s[v]);
#endif
    if (n == kPanel * P) {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) _mm256_storeu_ps(row + 8 * v, s[v]);
    } else {
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) _mm256_store_ps(buf + 8 * v, s[v]);
      std::memcpy(row, buf, n * sizeof(float));
    }
  }
}
#else
template <int R, int P>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t K, int64_t k0, int64_t k1,
                 float* y, int64_t ldy, int64_t cols, bool first, const float* bias, bool gelu, const float*,
                 int64_t) {
  const int64_t n = P == 1 ? cols : kPanel * P;
  for (int i = 0; i < R; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const float* w = panel + (j / kPanel) * K * kPanel + j % kPanel;
      float acc = 0.0f;
      for (int64_t k = k0; k < k1; ++k) acc = std::fma(x[i * ldx + k], w[k * kPanel], acc);
      float s = first ? acc : y[i * ldy + j] + acc;
      s = bias ? s + bias[j] : s;
      y[i * ldy + j] = gelu ? gelu1(s) : s;
    }
}
#endif

inline int64_t panel_count(int64_t N) { return (N + kPanel - 1) / kPanel; }

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t, int64_t,
                       bool, const float*, bool, const float*, int64_t);
constexpr TileFn kTiles[kRows + 1] = {nullptr, tile<1, 1>, tile<2, 1>, tile<3, 1>, tile<4, 1>, tile<5, 1>, tile<6, 1>};
// Blocks of 1-2 rows run tiles two panels wide (8 FMA chains for 2 rows; 1 row streams the weight anyway).
constexpr int64_t kWide = 2;
constexpr TileFn kWideTiles[3] = {nullptr, tile<1, kWide>, tile<2, kWide>};

}  // namespace

extern "C" {

int32_t ss_sgemm_abi_version() { return 2; }

// Whether ss_sgemm's `gelu` applies the tanh GELU (else it is ignored; see SS_SGEMM_GELU).
int32_t ss_sgemm_has_gelu() { return SS_SGEMM_GELU; }

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

// x [M, K] (row stride ldx), packed W, bias [N] (or null), y [M, N] (row stride ldy); `gelu`: y = the tanh
// GELU of it, computed on the last K block's registers (one pass less over y).
// Each thread owns a contiguous range of panels, so no two threads write the same element.
void ss_sgemm(const float* x, int64_t M, int64_t K, int64_t ldx, const float* packed, int64_t N,
              const float* bias, float* y, int64_t ldy, int32_t n_threads, int32_t gelu) {
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
      const int64_t mb = std::min(kMBlock, M - m0);
      // NOTE: ceil(mb / 6) tiles of near-equal size: 4-6 rows (8-12 FMA chains) from 8 rows up, 4 + 3 at 7,
      // where 6 + 1 would leave a 1-row tile at a quarter of the FMA rate (measured, L1-resident: 6/5/4/3/2/1
      // rows 100/99/95/76/52/28 GFLOP/s a core)
      const int64_t n_tiles = (mb + kRows - 1) / kRows;
      for (int64_t p = p0; p < p1;) {
        const bool is_wide = mb <= 2 && p + kWide <= p1 && (p + kWide) * kPanel <= N;
        const int64_t np = is_wide ? kWide : 1;
        const float* panel = packed + p * K * kPanel;
        const int64_t cols = std::min(kPanel, N - p * kPanel);
        for (int64_t k0 = 0;; k0 += kKBlock) {  // NOTE: once also for K = 0 (y = bias, or zeros)
          const int64_t k1 = std::min(K, k0 + kKBlock);
          const float* b = (bias && k1 == K) ? bias + p * kPanel : nullptr;
          // NOTE: the first tile over a block waits on memory while the others compute from L1, so the
          // tiles prefetch the thread's next block between them, a share each (after its last panel, the
          // first panel again for the next M block): decode GEMMs and LM head 3-8% faster on the real
          // workload's steps, the 100-600 row GEMMs of steps mixing a prompt with decodes and prefill
          // steps 2-6% (measured, interleaved)
          const float* next = k1 < K ? panel + k1 * kPanel
                              : p + np < p1 ? packed + (p + np) * K * kPanel
                              : m0 + mb < M ? packed + p0 * K * kPanel
                                            : nullptr;
          const int64_t next_k = next ? std::min(kKBlock, k1 < K ? K - k1 : K) : 0;
          for (int64_t i = 0, r = m0; i < n_tiles; ++i) {
            const int64_t rows = mb / n_tiles + (i < mb % n_tiles);
            const TileFn fn = is_wide ? kWideTiles[rows] : kTiles[rows];
            const int64_t s0 = next_k * i / n_tiles, s1 = next_k * (i + 1) / n_tiles;
            fn(x + r * ldx, ldx, panel, K, k0, k1, y + r * ldy + p * kPanel, ldy, cols, k0 == 0, b,
               gelu && SS_SGEMM_GELU && k1 == K, next ? next + s0 * kPanel : nullptr, s1 - s0);
            r += rows;
          }
          if (k1 == K) break;
        }
        p += np;
      }
    }
  }
}

}  // extern "C"
