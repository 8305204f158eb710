// The tanh-approximated GELU on CPU (F.gelu(approximate="tanh"), transformers' GELUTanh; GPT-2's
// gelu_new after model_loader.fuse_gelu_tanh), vectorised with the Cephes exp of cpu_simd.h. The element
// math is in cpu_gelu.h, which the fp32 GEMM's epilogue (cpu_sgemm.cpp) runs too: the same bits fused.
//
// ATen's kernel computes tanh with Sleef's tanhf8_u10, ~2 ns an element on two AVX2 cores: 11 ms for one
// [1900, 3072] prefill MLP, 5% of a fp32 GPT-2 serving run. Here
//   0.5 x (1 + tanh(z)) = x sigmoid(2z),  z = sqrt(2/pi) (x + 0.044715 x^3),
// and sigmoid(y) comes from e = exp(-|y|) <= 1 (no overflow): 1 / (1 + e) for y >= 0, e / (1 + e) else.
// One exp and one division an element, within a few fp32 ulps of the fp64 formula (torch's own op is
// too; the two differ by such ulps). Tails go through the same vector code with masked loads and stores,
// so an element's value never depends on where it sits: rows are batch-invariant.
#include "cpu_gelu.h"

namespace {

constexpr int64_t kGrain = 1 << 14;  // elements per OpenMP work item (a multiple of every vector width)

#if defined(SS_AVX512)
constexpr int64_t kLanes = 16;
template <typename T>
inline void gelu_block(const T* x, T* out, int64_t left) {
  const __mmask16 m = lane_mask(left);
  store16(out, gelu16(load16(x, m)), m);
}
#elif defined(SS_AVX2)
constexpr int64_t kLanes = 8;
template <typename T>
inline void gelu_block(const T* x, T* out, int64_t left) {
  store8(out, gelu8(load8(x, left)), left);
}
#else
constexpr int64_t kLanes = 1;
template <typename T>
inline void gelu_block(const T* x, T* out, int64_t) {
  from_f32(gelu1(to_f32(*x)), out);
}
#endif

template <typename T>
void gelu_all(const T* x, T* out, int64_t n, int n_threads) {
  const int64_t items = (n + kGrain - 1) / kGrain;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t end = std::min(n, (it + 1) * kGrain);
    for (int64_t i = it * kGrain; i < end; i += kLanes) gelu_block(x + i, out + i, end - i);
  }
}

}  // namespace

extern "C" {

int ss_activation_abi_version() { return 2; }

// out[i] = gelu_tanh(x[i]) for contiguous x and out (out may be x); dtype 0 = fp32, 1 = bf16.
// Returns 0, or -1 on an unsupported dtype.
int ss_gelu_tanh(const void* x, void* out, int64_t n, int32_t dtype, int32_t n_threads) {
  if (dtype == 0) return gelu_all(static_cast<const float*>(x), static_cast<float*>(out), n, n_threads), 0;
  if (dtype == 1) return gelu_all(static_cast<const bf16*>(x), static_cast<bf16*>(out), n, n_threads), 0;
  return -1;
}

// Which vector loop this build has, in cpu_attention's `ss_isa` codes: 2 = AVX-512, 1 = AVX2 + FMA,
// 0 = scalar.
int ss_activation_isa() { return kLanes == 16 ? 2 : kLanes == 8 ? 1 : 0; }
}
