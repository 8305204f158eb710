// The tanh GELU's element math, shared by the activation kernel (cpu_activation.cpp) and the GEMM's
// epilogue (cpu_sgemm.cpp), so a fused and an unfused MLP give the same bits:
//   0.5 x (1 + tanh(z)) = x sigmoid(2z),  z = sqrt(2/pi) (x + 0.044715 x^3),
// and sigmoid(y) comes from e = exp(-|y|) <= 1 (no overflow): 1 / (1 + e) for y >= 0, e / (1 + e) else.
#pragma once
#include "cpu_simd.h"

namespace {

constexpr float kGeluTwoC0 = 1.5957691216057308f;  // 2 sqrt(2/pi)
constexpr float kGeluC1 = 0.044715f;
constexpr float kGeluExpFloor = 87.0f;  // exp8/exp16 clamp below -87.3 (2^n stays normal): past it e is 0

#if defined(SS_AVX512)
inline __m512 gelu16(__m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 y = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(kGeluTwoC0)),
                                 _mm512_fmadd_ps(_mm512_mul_ps(v, v), _mm512_set1_ps(kGeluC1), one));
  const __m512 ay = _mm512_abs_ps(y);
  const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(ay, _mm512_set1_ps(kGeluExpFloor), _CMP_LE_OQ),
                                       exp16(_mm512_sub_ps(_mm512_setzero_ps(), ay)));
  const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GE_OQ), e, one);
  return _mm512_mul_ps(v, _mm512_div_ps(num, _mm512_add_ps(one, e)));
}
#elif defined(SS_AVX2)
inline __m256 gelu8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 y = _mm256_mul_ps(_mm256_mul_ps(v, _mm256_set1_ps(kGeluTwoC0)),
                                 _mm256_fmadd_ps(_mm256_mul_ps(v, v), _mm256_set1_ps(kGeluC1), one));
  const __m256 ay = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), y);
  const __m256 e = _mm256_and_ps(_mm256_cmp_ps(ay, _mm256_set1_ps(kGeluExpFloor), _CMP_LE_OQ),
                                 exp8(_mm256_sub_ps(_mm256_setzero_ps(), ay)));
  const __m256 num = _mm256_blendv_ps(e, one, _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GE_OQ));
  return _mm256_mul_ps(v, _mm256_div_ps(num, _mm256_add_ps(one, e)));
}
#endif

inline float gelu1(float v) {  // the scalar build's
  const float y = kGeluTwoC0 * v * (1.0f + kGeluC1 * v * v), e = std::exp(-std::fabs(y));
  return v * ((y >= 0.0f ? 1.0f : e) / (1.0f + e));
}

}  // namespace
