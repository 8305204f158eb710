// CPU decode attention and KV-cache writes for steerserve (loaded with ctypes by cpu_attention.py).
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
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SS_AVX512 1
#endif

namespace {

using bf16 = uint16_t;

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void from_f32(float x, float* dst) { *dst = x; }
inline void from_f32(float x, bf16* dst) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) {
    *dst = 0x7fc0;
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  *dst = bf16(u >> 16);
}

#ifdef SS_AVX512
// NOTE: masked loads/stores cover head_dim % 16 != 0; m is the lane mask of the chunk.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const bf16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 x, __mmask16 m) { _mm512_mask_storeu_ps(p, m, x); }
inline void store16(bf16* p, __m512 x, __mmask16 m) {
  __m512i u = _mm512_castps_si512(x);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
  __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
inline __mmask16 lane_mask(int64_t left) { return left >= 16 ? 0xffff : __mmask16((1u << left) - 1); }

// exp(x) for x <= 0 (softmax after subtracting the max): Cephes polynomial, ~1 ulp.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

struct DecodeArgs {
  const void* q;
  int64_t q_row, q_head;
  const void* k_cache;
  const void* v_cache;
  int64_t cache_head;
  void* out;
  int64_t out_row, out_head;
  const int64_t* q_rows;    // [n_req] row of each request's query in the packed batch
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

// One (request, kv head) item: the group's query heads share every key and value row they read.
template <typename QT, typename KT>
void attend(const DecodeArgs& a, int64_t r, int64_t g, std::vector<float>& buf) {
  const int64_t hd = a.head_dim, G = a.n_heads / a.n_kv_heads, ctx = a.ctx_lens[r];
  const int64_t lo = a.window > 0 ? std::max<int64_t>(0, ctx - a.window) : 0, n = ctx - lo;
  const KT* kb = static_cast<const KT*>(a.k_cache) + g * a.cache_head;
  const KT* vb = static_cast<const KT*>(a.v_cache) + g * a.cache_head;
  const int64_t* rows = a.gather[r] >= 0 ? a.rows + a.gather[r] + lo : nullptr;
  const int64_t first = a.starts[r] + lo;
  auto row = [&](int64_t j) { return (rows ? rows[j] : first + j) * hd; };

  buf.resize(size_t(G * (2 * hd + n + 1)));
  float* qf = buf.data();    // [G, hd] queries in fp32
  float* acc = qf + G * hd;  // [G, hd] sum of p * v
  float* inv = acc + G * hd; // [G] 1 / sum of p
  float* s = inv + G;        // [G, n] scores, then probabilities
  const QT* qp = static_cast<const QT*>(a.q) + a.q_rows[r] * a.q_row + g * G * a.q_head;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < hd; ++d) qf[h * hd + d] = to_f32(qp[h * a.q_head + d]);
  std::fill(acc, acc + G * hd, 0.0f);

  // scores: s[h, j] = softcap(q_h . k_j * scale)
  for (int64_t j = 0; j < n; ++j) {
    const KT* k = kb + row(j);
    for (int64_t h = 0; h < G; ++h) {
      const float* q = qf + h * hd;
#ifdef SS_AVX512
      __m512 v = _mm512_setzero_ps();
      for (int64_t d = 0; d < hd; d += 16) {
        __mmask16 m = lane_mask(hd - d);
        v = _mm512_fmadd_ps(load16(q + d, m), load16(k + d, m), v);
      }
      float dot = _mm512_reduce_add_ps(v);
#else
      float dot = 0.0f;
      for (int64_t d = 0; d < hd; ++d) dot += q[d] * to_f32(k[d]);
#endif
      s[h * n + j] = dot * a.scale;
    }
  }
  // softmax per head (fp32), unnormalised; 1/sum is applied to the output
  for (int64_t h = 0; h < G; ++h) {
    float* sh = s + h * n;
    if (a.softcap > 0.0f)
      for (int64_t j = 0; j < n; ++j) sh[j] = a.softcap * std::tanh(sh[j] / a.softcap);
    float mx = -INFINITY;
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sh[j]);
    float sum = 0.0f;
#ifdef SS_AVX512
    __m512 vs = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx);
    for (int64_t j = 0; j < n; j += 16) {
      __mmask16 m = lane_mask(n - j);
      __m512 e = exp16(_mm512_sub_ps(load16(sh + j, m), vm));
      store16(sh + j, e, m);
      vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(m, e));
    }
    sum = _mm512_reduce_add_ps(vs);
#else
    for (int64_t j = 0; j < n; ++j) sum += (sh[j] = std::exp(sh[j] - mx));
#endif
    inv[h] = 1.0f / sum;
  }
  // acc[h] = sum_j p[h, j] * v_j
  for (int64_t j = 0; j < n; ++j) {
    const KT* v = vb + row(j);
    for (int64_t h = 0; h < G; ++h) {
      float p = s[h * n + j];
      float* o = acc + h * hd;
#ifdef SS_AVX512
      __m512 vp = _mm512_set1_ps(p);
      for (int64_t d = 0; d < hd; d += 16) {
        __mmask16 m = lane_mask(hd - d);
        store16(o + d, _mm512_fmadd_ps(vp, load16(v + d, m), load16(o + d, m)), m);
      }
#else
      for (int64_t d = 0; d < hd; ++d) o[d] += p * to_f32(v[d]);
#endif
    }
  }
  QT* op = static_cast<QT*>(a.out) + a.q_rows[r] * a.out_row + g * G * a.out_head;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < hd; ++d) from_f32(acc[h * hd + d] * inv[h], op + h * a.out_head + d);
}

template <typename QT, typename KT>
void decode_all(const DecodeArgs& a) {
  const int64_t items = a.n_req * a.n_kv_heads;
#pragma omp parallel num_threads(a.n_threads)
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) attend<QT, KT>(a, i / a.n_kv_heads, i % a.n_kv_heads, buf);
  }
}

struct WriteArgs {
  const void* key;  // [H_kv, T, hd] with strides (k_head, k_row)
  const void* value;
  int64_t k_head, k_row, v_head, v_row;
  void* k_cache;
  void* v_cache;
  int64_t cache_head;
  const int64_t* slots;  // [T] cache row of each new token
  int64_t n_tokens, n_kv_heads, head_dim;
  int32_t src_dtype, kv_dtype, n_threads;
};

template <typename ST, typename KT>
void write_all(const WriteArgs& a) {
  const int64_t items = a.n_tokens * a.n_kv_heads, hd = a.head_dim;
  const int nt = items * hd >= (1 << 16) ? a.n_threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t i = 0; i < items; ++i) {
    const int64_t t = i / a.n_kv_heads, g = i % a.n_kv_heads;
    const ST* ks = static_cast<const ST*>(a.key) + g * a.k_head + t * a.k_row;
    const ST* vs = static_cast<const ST*>(a.value) + g * a.v_head + t * a.v_row;
    KT* kd = static_cast<KT*>(a.k_cache) + g * a.cache_head + a.slots[t] * hd;
    KT* vd = static_cast<KT*>(a.v_cache) + g * a.cache_head + a.slots[t] * hd;
    for (int64_t d = 0; d < hd; ++d) {
      from_f32(to_f32(ks[d]), kd + d);
      from_f32(to_f32(vs[d]), vd + d);
    }
  }
}

}  // namespace

extern "C" {

int ss_abi_version() { return 1; }

int ss_has_avx512() {
#ifdef SS_AVX512
  return 1;
#else
  return 0;
#endif
}

// Returns 0 on success, -1 on an unsupported dtype pair.
int ss_decode_attention(const DecodeArgs* a) {
  if (a->q_dtype == 0 && a->kv_dtype == 0) return decode_all<float, float>(*a), 0;
  if (a->q_dtype == 0 && a->kv_dtype == 1) return decode_all<float, bf16>(*a), 0;
  if (a->q_dtype == 1 && a->kv_dtype == 0) return decode_all<bf16, float>(*a), 0;
  if (a->q_dtype == 1 && a->kv_dtype == 1) return decode_all<bf16, bf16>(*a), 0;
  return -1;
}

int ss_write_kv(const WriteArgs* a) {
  if (a->src_dtype == 0 && a->kv_dtype == 0) return write_all<float, float>(*a), 0;
  if (a->src_dtype == 0 && a->kv_dtype == 1) return write_all<float, bf16>(*a), 0;
  if (a->src_dtype == 1 && a->kv_dtype == 0) return write_all<bf16, float>(*a), 0;
  if (a->src_dtype == 1 && a->kv_dtype == 1) return write_all<bf16, bf16>(*a), 0;
  return -1;
}
}
