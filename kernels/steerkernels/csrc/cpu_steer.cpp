// The CPU backend of steerkernels' ops: steer_add, project_clamp, sae_edit, apply_logit_bias, argmax_rows,
// resample_draw.
//
// Same math as reference.py (the spec), fused per token (per row for logits) so that a decode step's
// edit is one pass over the steered rows instead of a dozen torch ops. Plain C ABI over raw pointers
// and element strides (no torch headers); cpu.py checks and converts the arguments: index tensors come
// as int64, weights and banks as fp32, hidden states as fp32 or bf16 (dtype code 0 / 1). Math is fp32;
// bf16 results round to nearest even like torch. OpenMP threads split tokens (rows) when there is
// enough work; the caller passes torch.get_num_threads().
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

using bf16 = uint16_t;

inline float bf16_to_f32(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 f32_to_bf16(float x) {
  if (std::isnan(x)) return 0x7fc0;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16(u >> 16);
}

// A strided fp32 vector: element i at p[i * s].
struct Vec {
  const float* p;
  int64_t s;
  float operator[](int64_t i) const { return p[i * s]; }
};

// NOTE: 16 independent partial sums let the compiler vectorize the reduction without -ffast-math.
inline float dot(const float* x, Vec w, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  if (w.s == 1) {
    for (; i + 16 <= n; i += 16)
      for (int l = 0; l < 16; ++l) acc[l] += x[i + l] * w.p[i + l];
  }
  for (; i < n; ++i) acc[i & 15] += x[i] * w[i];
  float sum = 0.f;
  for (int l = 0; l < 16; ++l) sum += acc[l];
  return sum;
}

inline void axpy(float* y, float a, Vec x, int64_t n) {
  if (x.s == 1) {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x.p[i];
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  }
}

}  // namespace

extern "C" {

int ss_steer_abi_version() { return 6; }  // cpu.py's ABI_VERSION

// Which tokens a call edits, and the hidden states they live in. Index arrays are int64.
struct TokenArgs {
  void* h;                      // [T, d], row stride h_row, last dim contiguous
  int64_t h_row;
  int32_t h_dtype;              // 0 fp32, 1 bf16
  int64_t T, d, S;              // tokens, hidden size, slots
  const int64_t* slot;          // [T] slot_of_token (stride slot_s), -1 = none
  int64_t slot_s;
  int32_t n_threads;
};

struct AddArgs {
  const float* vec;  // [S, d] slot vectors, strides (vec_s0, vec_s1)
  int64_t vec_s0, vec_s1;
};

struct ClampArgs {
  const float* dirs;  // [S, K, d] strides (dirs_s0, dirs_s1, dirs_s2)
  int64_t dirs_s0, dirs_s1, dirs_s2;
  const float* lo;  // [S, K] strides (lo_s0, lo_s1)
  int64_t lo_s0, lo_s1;
  const float* hi;
  int64_t hi_s0, hi_s1;
  const int64_t* count;  // [S] stride count_s
  int64_t count_s, K;
  const float* tv;  // [T, K] strides (tv_s0, tv_s1), or null: per-token targets, NaN = the slot's lo/hi
  int64_t tv_s0, tv_s1;
};

struct EditArgs {
  const int64_t* feat;  // [S, F] strides (feat_s0, feat_s1), -1 = padding
  int64_t feat_s0, feat_s1, F, d_sae;
  const float* W_enc;  // [d, d_sae] strides (enc_s0, enc_s1)
  int64_t enc_s0, enc_s1;
  const float* b_enc;  // [d_sae] stride b_enc_s
  int64_t b_enc_s;
  const float* W_dec;  // [d_sae, d] strides (dec_s0, dec_s1)
  int64_t dec_s0, dec_s1;
  const float* b_dec;  // [d] stride b_dec_s
  int64_t b_dec_s;
  const float* threshold;  // [d_sae] stride thr_s, or null (relu)
  int64_t thr_s;
  int32_t apply_b_dec;
  const int64_t* mode;  // [S, F] strides (mode_s0, mode_s1): 0 clamp, 1 scale, 2 ablate
  int64_t mode_s0, mode_s1;
  const float* value;  // [S, F] strides (value_s0, value_s1)
  int64_t value_s0, value_s1;
  const float* tok_thr;  // [T] stride tok_thr_s, or null: TopK's per-token rank threshold
  int64_t tok_thr_s;
  const float* tv;  // [T, F] strides (tv_s0, tv_s1), or null: per-token targets, NaN = the slot's mode
  int64_t tv_s0, tv_s1;
};

struct ResampleArgs {
  float* out;  // [T, F] row stride out_row
  int64_t out_row, T, S, F, N;
  const int64_t* slot;  // [T] stride slot_s, -1 = none
  int64_t slot_s;
  const int64_t* key;  // [T] stride key_s
  int64_t key_s;
  const int64_t* pos;  // [T] stride pos_s
  int64_t pos_s;
  const int64_t* stream;  // [S, F] strides (stream_s0, stream_s1), < 0 = not resampled
  int64_t stream_s0, stream_s1;
  const float* density;  // [S, F] strides (dens_s0, dens_s1)
  int64_t dens_s0, dens_s1;
  const int64_t* count;  // [S, F] strides (count_s0, count_s1)
  int64_t count_s0, count_s1;
  const float* samples;  // [S, F, N] strides (smp_s0, smp_s1, smp_s2)
  int64_t smp_s0, smp_s1, smp_s2;
};

}  // extern "C"

namespace {

// The slot token t is steered by, or -1.
inline int64_t steered_slot(const TokenArgs& a, int64_t t) {
  int64_t s = a.slot[t * a.slot_s];
  return (s < 0 || s >= a.S) ? -1 : s;
}

// Runs edit(slot, t, x[d]) -> bool (true: x changed) on every steered token t, x in fp32; writes back only
// the tokens it changed, so other rows stay bit-identical.
template <class Edit>
void for_tokens(const TokenArgs& a, int64_t work_per_token, Edit edit) {
  const int64_t T = a.T, d = a.d;
  const bool parallel = a.n_threads > 1 && T > 1 && T * work_per_token >= (1 << 16);
#pragma omp parallel num_threads(parallel ? a.n_threads : 1)
  {
    std::vector<float> x(d);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      int64_t s = steered_slot(a, t);
      if (s < 0) continue;
      if (a.h_dtype == 0) {
        float* row = static_cast<float*>(a.h) + t * a.h_row;
        std::memcpy(x.data(), row, size_t(d) * sizeof(float));
        if (edit(s, t, x.data())) std::memcpy(row, x.data(), size_t(d) * sizeof(float));
      } else {
        bf16* row = static_cast<bf16*>(a.h) + t * a.h_row;
        for (int64_t i = 0; i < d; ++i) x[i] = bf16_to_f32(row[i]);
        if (edit(s, t, x.data()))
          for (int64_t i = 0; i < d; ++i) row[i] = f32_to_bf16(x[i]);
      }
    }
  }
}

}  // namespace

extern "C" {

int ss_steer_add(const TokenArgs* a, const AddArgs* v) {
  if (a->h_dtype != 0 && a->h_dtype != 1) return 1;
  const int64_t d = a->d;
  for_tokens(*a, d, [&](int64_t s, int64_t, float* x) {
    Vec vec{v->vec + s * v->vec_s0, v->vec_s1};
    for (int64_t i = 0; i < d; ++i) x[i] += vec[i];
    return true;
  });
  return 0;
}

int ss_project_clamp(const TokenArgs* a, const ClampArgs* c) {
  if (a->h_dtype != 0 && a->h_dtype != 1) return 1;
  const int64_t d = a->d;
  for_tokens(*a, d * c->K, [&](int64_t s, int64_t t, float* x) {
    int64_t n = c->count[s * c->count_s];
    n = n < 0 ? 0 : (n > c->K ? c->K : n);
    for (int64_t k = 0; k < n; ++k) {
      Vec u{c->dirs + s * c->dirs_s0 + k * c->dirs_s1, c->dirs_s2};
      float lo = c->lo[s * c->lo_s0 + k * c->lo_s1], hi = c->hi[s * c->hi_s0 + k * c->hi_s1];
      if (c->tv) {  // a per-token target (not NaN): lo = hi = it
        const float tv = c->tv[t * c->tv_s0 + k * c->tv_s1];
        if (tv == tv) lo = hi = tv;
      }
      float proj = dot(x, u, d);
      float clipped = proj < lo ? lo : (proj > hi ? hi : proj);  // NOTE: NaN stays NaN, as torch.clamp
      axpy(x, clipped - proj, u, d);
    }
    return n > 0;
  });
  return 0;
}

int ss_sae_edit(const TokenArgs* a, const EditArgs* e) {
  if (a->h_dtype != 0 && a->h_dtype != 1) return 1;
  const int64_t d = a->d;
  for_tokens(*a, 2 * d * e->F, [&](int64_t s, int64_t t, float* x) {
    thread_local std::vector<float> xin, delta;
    const float tok_thr = e->tok_thr ? e->tok_thr[t * e->tok_thr_s] : 0.f;
    xin.assign(x, x + d);
    if (e->apply_b_dec)
      for (int64_t i = 0; i < d; ++i) xin[i] -= e->b_dec[i * e->b_dec_s];
    delta.assign(d, 0.f);
    bool any = false;
    for (int64_t j = 0; j < e->F; ++j) {
      int64_t f = e->feat[s * e->feat_s0 + j * e->feat_s1];
      if (f < 0 || f >= e->d_sae) continue;
      any = true;
      float pre = dot(xin.data(), Vec{e->W_enc + f * e->enc_s1, e->enc_s0}, d) + e->b_enc[f * e->b_enc_s];
      // SAELens: relu(pre) * (pre > threshold[f]) * (pre > tok_thr), as reference.activation
      float act = pre < 0.f ? 0.f : pre;  // NOTE: relu keeps NaN, as torch.relu
      if (e->threshold) act *= pre > e->threshold[f * e->thr_s] ? 1.f : 0.f;
      if (e->tok_thr) act *= pre > tok_thr ? 1.f : 0.f;
      float value = e->value[s * e->value_s0 + j * e->value_s1];
      float target = e->mode[s * e->mode_s0 + j * e->mode_s1] == 1 ? act * value : value;
      if (e->tv) {  // a per-token target (not NaN) overrides the slot's mode/value
        const float tv = e->tv[t * e->tv_s0 + j * e->tv_s1];
        if (tv == tv) target = tv;
      }
      axpy(delta.data(), target - act, Vec{e->W_dec + f * e->dec_s0, e->dec_s1}, d);
    }
    if (!any) return false;
    for (int64_t i = 0; i < d; ++i) x[i] += delta[i];
    return true;
  });
  return 0;
}

// Wellons' lowbias32 (reference.mix32).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// out[t, j]: reference.resample_draw, cell by cell (same bits: integer hash, exact u, integer index).
int ss_resample_draw(const ResampleArgs* a) {
  const float nan = std::nanf("");
  for (int64_t t = 0; t < a->T; ++t) {
    float* out = a->out + t * a->out_row;
    const int64_t s = a->slot[t * a->slot_s];
    if (s < 0 || s >= a->S) {
      for (int64_t j = 0; j < a->F; ++j) out[j] = nan;
      continue;
    }
    const uint64_t key = uint64_t(a->key[t * a->key_s]);
    const uint32_t pos = uint32_t(uint64_t(a->pos[t * a->pos_s]));
    for (int64_t j = 0; j < a->F; ++j) {
      const int64_t st = a->stream[s * a->stream_s0 + j * a->stream_s1];
      if (st < 0) {
        out[j] = nan;
        continue;
      }
      const uint32_t base = mix32(mix32(mix32(pos) ^ uint32_t(st)) ^ uint32_t(key)) ^ uint32_t(key >> 32);
      const uint32_t h1 = mix32(base), h2 = mix32(base ^ 0x9E3779B9u);
      const float u = float(h1 >> 8) * 0x1p-24f;
      int64_t n = a->count[s * a->count_s0 + j * a->count_s1];
      n = n < 0 ? 0 : (n > a->N ? a->N : n);
      const bool active = u < a->density[s * a->dens_s0 + j * a->dens_s1] && n > 0;
      const int64_t idx = int64_t((uint64_t(h2) * uint64_t(n)) >> 32);
      out[j] = active ? a->samples[s * a->smp_s0 + j * a->smp_s1 + idx * a->smp_s2] : 0.f;
    }
  }
  return 0;
}

// Row max ignoring NaN, and whether the row has a NaN.
inline float row_max(const float* row, int64_t V, bool* nan) {
  float best = -INFINITY;
  int64_t i = 0;
  bool has_nan = false;
#ifdef __AVX512F__
  __m512 m = _mm512_set1_ps(-INFINITY);
  __mmask16 unordered = 0;
  for (; i + 16 <= V; i += 16) {
    __m512 v = _mm512_loadu_ps(row + i);
    unordered |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    m = _mm512_max_ps(v, m);  // NOTE: a NaN in v yields m: NaN never becomes the max
  }
  best = _mm512_reduce_max_ps(m);
  has_nan = unordered != 0;
#endif
  for (; i < V; ++i) {
    best = row[i] > best ? row[i] : best;
    has_nan = has_nan || row[i] != row[i];
  }
  *nan = has_nan;
  return best;
}

// The first index j of row with row[j] == value (value is in the row).
inline int64_t first_equal(const float* row, int64_t V, float value) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512 target = _mm512_set1_ps(value);
  for (; j + 16 <= V; j += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(row + j), target, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
#endif
  for (; j < V; ++j)
    if (row[j] == value) return j;
  return 0;  // NOTE: unreachable for a value taken from the row; an all-NaN row is handled by the caller
}

// The first index of row's largest value, or of its first NaN (torch.argmax's rule).
// NOTE: two passes (a vector max, then a vector scan for the first match) read a row ~1.5 times;
// torch's CPU argmax tracks (value, index) pairs serially and is several times slower on a 50k vocabulary.
inline int64_t row_argmax(const float* row, int64_t V) {
  bool nan = false;
  const float best = row_max(row, V, &nan);
  if (!nan) return first_equal(row, V, best);
  int64_t idx = 0;
  while (row[idx] == row[idx]) ++idx;
  return idx;
}

struct LogitArgs {
  float* logits;  // [R, V] row stride logits_row
  int64_t logits_row, R, V;
  const float* temperature;  // [R]
  const int64_t* sparse_ids;  // [R, Sp] contiguous
  const float* sparse_bias;
  int64_t Sp;
  const float* bank;  // [B, V] row stride bank_row
  int64_t bank_row, B;
  const int64_t* dense_idx;  // [R, D] contiguous: bank rows added whole
  int64_t D;
  const int64_t* penalty_ids;  // [R, P] contiguous
  const int64_t* penalty_counts;
  int64_t P;
  const float* repetition;  // [R] each
  const float* presence;
  const float* frequency;
  int32_t n_threads;
  const bf16* src;  // [R, V] bf16 logits (row stride src_row), converted into `logits` first; null: in place
  int64_t src_row;
  int64_t* argmax;  // [R]: each processed row's row_argmax, or null
  int32_t process;  // 0: no biases, penalties or temperature (conversion and argmax only)
};

// One row's biases, penalties and temperature (steerkernels.apply_logit_bias), in place.
inline void process_row(const LogitArgs* a, int64_t r, float* x) {
  const int64_t V = a->V;
  for (int64_t j = 0; j < a->Sp; ++j) {
    int64_t id = a->sparse_ids[r * a->Sp + j];
    if (id >= 0 && id < V) x[id] += a->sparse_bias[r * a->Sp + j];
  }
  for (int64_t j = 0; j < a->D; ++j) {
    int64_t b = a->dense_idx[r * a->D + j];
    if (b < 0 || b >= a->B) continue;
    const float* bias = a->bank + b * a->bank_row;
    for (int64_t i = 0; i < V; ++i) x[i] += bias[i];
  }
  const float rp = a->repetition[r], pres = a->presence[r], freq = a->frequency[r];
  for (int64_t j = 0; j < a->P; ++j) {
    int64_t id = a->penalty_ids[r * a->P + j];
    if (id < 0 || id >= V) continue;
    float g = x[id];
    g = g > 0.f ? g / rp : g * rp;
    const float count = float(a->penalty_counts[r * a->P + j]);
    if (count > 0.f) g -= pres;
    x[id] = g - freq * count;
  }
  const float temp = a->temperature[r];
  if (temp != 1.f)
    for (int64_t i = 0; i < V; ++i) x[i] /= temp;
}

// Row by row: the bf16 source converted (when given), biases, penalties, temperature (when `process`), then
// the argmax (when asked), all while the row is in L2 (GPT-2's 50257 fp32 logits: 200 KB), so that its
// [R, V] logits go through memory once instead of once per op (convert, bias, argmax).
int ss_apply_logit_bias(const LogitArgs* a) {
  const int64_t R = a->R, V = a->V;
  const bool parallel = a->n_threads > 1 && R > 1 && R * V >= (1 << 16);
#pragma omp parallel for num_threads(parallel ? a->n_threads : 1) schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* x = a->logits + r * a->logits_row;
    if (a->src) {
      const bf16* src = a->src + r * a->src_row;
      for (int64_t i = 0; i < V; ++i) x[i] = bf16_to_f32(src[i]);
    }
    if (a->process) process_row(a, r, x);
    if (a->argmax) a->argmax[r] = row_argmax(x, V);
  }
  return 0;
}

// out[r] = row_argmax of row r.
int ss_argmax_rows(const float* x, int64_t row_stride, int64_t R, int64_t V, int64_t* out, int32_t n_threads) {
  const bool parallel = n_threads > 1 && R > 1 && R * V >= (1 << 16);
#pragma omp parallel for num_threads(parallel ? n_threads : 1) schedule(static)
  for (int64_t r = 0; r < R; ++r) out[r] = row_argmax(x + r * row_stride, V);
  return 0;
}

}  // extern "C"
