// bf16 linear layers on AVX512-BF16 CPUs: y = x @ W + b (or the tanh GELU of it), bf16 in and out, fp32
// sums (issue #26; loaded with ctypes by cpu_bgemm.py).
//
// Why our own: in a decode step every layer's weights come from DRAM (the KV reads between layers evict
// them), and oneDNN's packed bf16 GEMM did not overlap that read with its arithmetic (GPT-2 small's 48
// layers, weights evicted as in serving: +5.5-6 ms a step at every row count, the whole 170 MB at ~30
// GB/s). Here each thread pulls its next column panel into L2 while it computes the current one.
//
// Layout: W [K, N] packed into panels of 32 columns, [ceil(N / 32)][ceil(K / 2)][32][2] (cpu_bgemm.pack):
// dims 2p and 2p + 1 of a column side by side, zero past N and K, so one 64-byte load is the operand of
// one vdpbf16ps for 16 columns. Each output element is the pairs in order, each adding its two exact
// products, then + bias, then the GELU, rounded to bf16 (nearest even): one fixed sequence whatever the row
// count, the row's place or the thread, so a row never depends on the rows beside it.
#include <omp.h>

#include "cpu_gelu.h"

namespace {

#if defined(SS_AVX512) && defined(__AVX512BF16__)
#define SS_BGEMM 1
constexpr int64_t kCols = 32;       // columns a panel
constexpr int kRows = 8;            // rows a register tile: 8 x 2 accumulators
// Rows whose x stays in L2 (~256 KiB of it, beside a panel) while a thread's panels pass over them.
inline int64_t row_block(int64_t K) { return std::clamp<int64_t>((1 << 17) / std::max<int64_t>(K, 1) / 8 * 8, 32, 256); }

inline __m512bh pair_of(const bf16* x) {
  uint32_t v;
  std::memcpy(&v, x, 4);
  return __m512bh(_mm512_set1_epi32(int(v)));
}

// y[R rows, cols] = x[R rows] . panel (+ bias, GELU); pf: a panel to pull into L2 meanwhile (2 lines a step).
template <int R>
void tile(const bf16* x, int64_t ldx, int64_t K, const bf16* panel, const float* bias, int64_t cols, bool gelu,
          bf16* y, int64_t ldy, const char* pf) {
  __m512 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  // One pair step: x_of(r) is row r's pair of x (dims 2p, 2p + 1) as a broadcast operand.
  auto step = [&](int64_t p, auto x_of) {
    const __m512bh w0 = __m512bh(_mm512_loadu_si512(panel + p * 64));
    const __m512bh w1 = __m512bh(_mm512_loadu_si512(panel + p * 64 + 32));
    if (pf) {
      _mm_prefetch(pf + p * 128, _MM_HINT_T1);
      _mm_prefetch(pf + p * 128 + 64, _MM_HINT_T1);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh xr = x_of(r);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xr, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xr, w1);
    }
  };
  const int64_t pairs = K / 2;
  for (int64_t p = 0; p < pairs; ++p) step(p, [&](int r) { return pair_of(x + r * ldx + 2 * p); });
  if (K % 2)  // the last dim alone: its pair's other half is zero in the panel, and must be in x
    step(pairs, [&](int r) { return __m512bh(_mm512_set1_epi32(int(x[r * ldx + K - 1]))); });
  const __mmask16 m0 = lane_mask(cols), m1 = lane_mask(cols - 16 > 0 ? cols - 16 : 0);
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    __m512 v0 = _mm512_add_ps(acc[r][0], b0), v1 = _mm512_add_ps(acc[r][1], b1);
    if (gelu) {
      v0 = gelu16(v0);
      v1 = gelu16(v1);
    }
    store16(y + r * ldy, v0, m0);
    store16(y + r * ldy + 16, v1, m1);
  }
}

template <int R = kRows>
void tile_rows(int r, const bf16* x, int64_t ldx, int64_t K, const bf16* panel, const float* bias, int64_t cols,
               bool gelu, bf16* y, int64_t ldy, const char* pf) {
  if constexpr (R > 0) {
    if (r == R) return tile<R>(x, ldx, K, panel, bias, cols, gelu, y, ldy, pf);
    tile_rows<R - 1>(r, x, ldx, K, panel, bias, cols, gelu, y, ldy, pf);
  }
}
#else
#define SS_BGEMM 0
#endif

}  // namespace

extern "C" {

int32_t ss_bgemm_abi_version() { return 1; }

// 1 when this build has the kernel (AVX-512 with BF16), else 0 (ss_bgemm does nothing).
int32_t ss_bgemm_available() { return SS_BGEMM; }

// x [M, K] bf16 (row stride ldx), packed W (see above), bias [N] fp32 (or null), y [M, N] bf16 (row stride
// ldy); gelu: y = the tanh GELU of x @ W + b, with the activation kernel's element math (csrc/cpu_gelu.h).
void ss_bgemm(const bf16* x, int64_t M, int64_t K, int64_t ldx, const bf16* packed, int64_t N, const float* bias,
              bf16* y, int64_t ldy, int32_t n_threads, int32_t gelu) {
#if SS_BGEMM
  const int64_t panels = (N + kCols - 1) / kCols, panel = (K + 1) / 2 * 64;  // elements a panel
#pragma omp parallel num_threads(n_threads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t p0 = panels * t / T, p1 = panels * (t + 1) / T;  // NOTE: a thread's own run of panels
    const int64_t rb = row_block(K);
    for (int64_t m0 = 0; m0 < M; m0 += rb) {
      const int64_t m1 = std::min(M, m0 + rb);
      for (int64_t p = p0; p < p1; ++p) {
        // the panel after this one: the thread's next, or its first again for the next row block
        const int64_t q = p + 1 < p1 ? p + 1 : (m1 < M ? p0 : -1);
        const char* pf = q >= 0 ? reinterpret_cast<const char*>(packed + q * panel) : nullptr;
        const int64_t n0 = p * kCols, cols = std::min(kCols, N - n0);
        for (int64_t m = m0; m < m1; m += kRows) {
          const int r = int(std::min<int64_t>(kRows, m1 - m));
          tile_rows(r, x + m * ldx, ldx, K, packed + p * panel, bias ? bias + n0 : nullptr, cols, gelu != 0,
                    y + m * ldy + n0, ldy, m == m0 ? pf : nullptr);
        }
      }
    }
  }
#else
  (void)x, (void)M, (void)K, (void)ldx, (void)packed, (void)N, (void)bias, (void)y, (void)ldy, (void)n_threads;
  (void)gelu;
#endif
}

}  // extern "C"
