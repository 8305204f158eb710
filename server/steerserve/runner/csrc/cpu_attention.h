// Shared by cpu_attention.cpp (decode, KV writes) and cpu_prefill.cpp: the softmax and the argument
// block both kernels take from cpu_attention.py (vector primitives: cpu_simd.h).
//
// No torch headers: the library is plain C ABI over raw pointers, so it compiles in about a second.
// OpenMP comes from the libgomp.so.1 that torch has already loaded (same soname), so the kernel
// shares torch's thread pool; the caller passes torch.get_num_threads().
//
// Layouts (element strides, last dimension contiguous):
//   query  [T, H, hd]      row stride q_row, head stride q_head
//   cache  [H_kv, rows, hd] per layer, head stride cache_head, row stride hd
//   out    [T, H, hd]      row stride out_row, head stride out_head
// dtypes: 0 = float32, 1 = bfloat16. Math is fp32 throughout; bf16 outputs round to nearest even,
// like torch's .to(torch.bfloat16).
#pragma once
#include "cpu_simd.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

// Softmax of s[lo:hi] in place (fp32), after optional tanh soft-capping; unnormalised: returns 1 / sum.
inline float softmax_range(float* s, int64_t lo, int64_t hi, float softcap) {
  if (softcap > 0.0f)
    for (int64_t j = lo; j < hi; ++j) s[j] = softcap * std::tanh(s[j] / softcap);
#ifdef SS_AVX512
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t j = lo; j < hi; j += 16) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(vm, lane_mask(hi - j), s + j));
  vm = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
  __m512 vs = _mm512_setzero_ps();
  for (int64_t j = lo; j < hi; j += 16) {
    const __mmask16 m = lane_mask(hi - j);
    const __m512 e = exp16(_mm512_sub_ps(load16(s + j, m), vm));
    store16(s + j, e, m);
    vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(m, e));
  }
  return 1.0f / _mm512_reduce_add_ps(vs);
#elif defined(SS_AVX2)
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  __m256 vm = ninf;
  for (int64_t j = lo; j < hi; j += 8) {
    const __m256i m = lane_mask8(hi - j);
    vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, load8(s + j, hi - j), _mm256_castsi256_ps(m)));
  }
  vm = _mm256_set1_ps(hmax8(vm));
  __m256 vs = _mm256_setzero_ps();
  for (int64_t j = lo; j < hi; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(load8(s + j, hi - j), vm));
    store8(s + j, e, hi - j);
    vs = _mm256_add_ps(vs, _mm256_and_ps(e, _mm256_castsi256_ps(lane_mask8(hi - j))));
  }
  return 1.0f / hsum8(vs);
#else
  float mx = -INFINITY, sum = 0.0f;
  for (int64_t j = lo; j < hi; ++j) mx = std::max(mx, s[j]);
  for (int64_t j = lo; j < hi; ++j) sum += (s[j] = std::exp(s[j] - mx));
  return 1.0f / sum;
#endif
}

struct AttnArgs {
  const void* q;
  int64_t q_row, q_head;
  const void* k_cache;
  const void* v_cache;
  int64_t cache_head;
  void* out;
  int64_t out_row, out_head;
  const int64_t* q_rows;    // [n_req] first row of each request's queries in the packed batch
  const int64_t* q_lens;    // [n_req] query rows (prefill only; decode rows are 1 each)
  const int64_t* ctx_lens;  // [n_req] keys attended to
  const int64_t* starts;    // [n_req] first cache row (contiguous requests), else -1
  const int64_t* gather;    // [n_req] offset into rows (fragmented requests), else -1
  const int64_t* rows;      // concatenated cache rows of the fragmented requests
  int64_t n_req, n_heads, n_kv_heads, head_dim;
  int64_t window;  // sliding window (keys), 0 = none
  float scale;
  float softcap;  // 0 = none
  int32_t q_dtype, kv_dtype, n_threads;
};


}  // namespace
