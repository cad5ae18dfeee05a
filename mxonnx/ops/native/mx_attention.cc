// GroupAttention kernels (see mx_attention.h for the contract).
#include "mx_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "mx_format.h"

#if defined(__x86_64__) && !defined(__clang__) && !defined(MXONNX_NO_VECTOR_CLONES)
#define MXONNX_AVX2_ATTENTION 1
#include <immintrin.h>
#endif

namespace mxonnx {

namespace {

constexpr int kTileRows = 3;   // query rows per tile (the G heads of a position are adjacent rows)
constexpr int kTileKeys = 4;   // keys per score tile
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One tile of query rows: where their q and O rows are, their bias rows, and the union of their key ranges.
struct Tile {
  int rows;
  const float* q[kTileRows];
  const float* bias[kTileRows];
  float* out[kTileRows];
  int64_t lo, hi;
};

// Max of s[0, n) and whether it is a usable softmax shift: finite, and no NaN in the row. Portable.
bool row_shift(const float* s, int64_t n, float& m) {
  m = kNegInf;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    nan |= std::isnan(s[j]);
    m = std::max(m, s[j]);
  }
  return !nan && std::isfinite(m);
}

void portable_tile(const Tile& t, const float* k, const float* v, int64_t d, float scale, float* scores) {
  const int64_t n = t.hi - t.lo;
  for (int r = 0; r < t.rows; ++r) {
    float* s = scores + r * n;
    for (int64_t j = 0; j < n; ++j) {
      const float* kj = k + (t.lo + j) * d;
      float dot = 0.0f;
      for (int64_t x = 0; x < d; ++x) dot += t.q[r][x] * kj[x];
      s[j] = scale * dot + t.bias[r][t.lo + j];
    }
    float m;
    float* o = t.out[r];
    if (!row_shift(s, n, m)) {
      std::fill(o, o + d, 0.0f);
      continue;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (s[j] = std::exp(s[j] - m));
    std::fill(o, o + d, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* vj = v + (t.lo + j) * d;
      for (int64_t x = 0; x < d; ++x) o[x] += s[j] * vj[x];
    }
    const float inv = 1.0f / sum;
    for (int64_t x = 0; x < d; ++x) o[x] *= inv;
  }
}

#ifdef MXONNX_AVX2_ATTENTION
#define AVX2 __attribute__((target("avx2,fma")))

bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool cpu_has_avx512f() { return __builtin_cpu_supports("avx512f"); }

// exp(x) for x <= 0 (or -inf): 2^n p(r), n = round(x / ln2), r = x - n ln2 (ln2 split in a 9-bit head, exact
// products, and a tail), p(r) = sum_{i<=7} r^i / i! by Horner with FMA (|r| <= 0.347: truncation < 5.3e-9
// relative). x < -87.3 (exp(x) < 2^-126, n would leave the normal range) gives 0, -inf included.
AVX2 inline __m256 exp_nonpositive(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

AVX2 inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// s[r][c] = q_r . k_c for R rows and C = 4 keys (rows k + c d), 4 sums at a time.
template <int R>
AVX2 inline void dots4(const float* const* q, const float* k, int64_t d, __m128* s) {
  __m256 acc[R][kTileKeys];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  for (int64_t x = 0; x < d; x += 8) {
    __m256 kc[kTileKeys];
    for (int c = 0; c < kTileKeys; ++c) kc[c] = _mm256_loadu_ps(k + c * d + x);
    for (int r = 0; r < R; ++r) {
      const __m256 qr = _mm256_loadu_ps(q[r] + x);
      for (int c = 0; c < kTileKeys; ++c) acc[r][c] = _mm256_fmadd_ps(qr, kc[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(acc[r][0], acc[r][1]), _mm256_hadd_ps(acc[r][2], acc[r][3]));
    s[r] = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  }
}

template <int R>
AVX2 inline void dots1(const float* const* q, const float* k, int64_t d, float* s) {
  __m256 acc[R];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t x = 0; x < d; x += 8) {
    const __m256 kc = _mm256_loadu_ps(k + x);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q[r] + x), kc, acc[r]);
  }
  for (int r = 0; r < R; ++r) s[r] = hsum(acc[r]);
}

// scores[r][0, n) = scale q_r . k_(lo + j) + bias_r[lo + j]; [n, n8) = -inf (n8 = n rounded up to 8).
template <int R>
AVX2 void tile_scores(const Tile& t, const float* k, int64_t d, float scale, float* scores, int64_t ld) {
  const int64_t n = t.hi - t.lo;
  const __m128 sc = _mm_set1_ps(scale);
  int64_t j = 0;
  for (; j + kTileKeys <= n; j += kTileKeys) {
    __m128 s[R];
    dots4<R>(t.q, k + (t.lo + j) * d, d, s);
    for (int r = 0; r < R; ++r) {
      const __m128 b = _mm_loadu_ps(t.bias[r] + t.lo + j);
      _mm_storeu_ps(scores + r * ld + j, _mm_add_ps(_mm_mul_ps(sc, s[r]), b));
    }
  }
  for (; j < n; ++j) {
    float s[R];
    dots1<R>(t.q, k + (t.lo + j) * d, d, s);
    for (int r = 0; r < R; ++r) scores[r * ld + j] = scale * s[r] + t.bias[r][t.lo + j];
  }
  for (int r = 0; r < R; ++r) std::fill(scores + r * ld + n, scores + r * ld + ld, kNegInf);
}

// scores row [0, n8) -> exp(s - max) in place; returns 1 / sum, or 0 when the row is guarded (all weights 0).
AVX2 float softmax_row(float* s, int64_t n8) {
  __m256 m = _mm256_set1_ps(kNegInf), nan = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    m = _mm256_max_ps(m, x);
  }
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  const float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  if (_mm256_movemask_ps(nan) != 0 || !std::isfinite(top)) {
    std::fill(s, s + n8, 0.0f);
    return 0.0f;
  }
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n8; j += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), shift));
    _mm256_storeu_ps(s + j, p);
    sum = _mm256_add_ps(sum, p);
  }
  return 1.0f / hsum(sum);
}

// out_r[col, col + 8 V) = inv_r sum_j p_r[j] v[(lo + j) d + col ..] (0 for a guarded row).
template <int R, int V>
AVX2 void weighted_sum(const float* const* p, const float* v, int64_t d, int64_t n, int64_t col, const float* inv,
                       float* const* out) {
  __m256 acc[R][V];
  for (auto& row : acc)
    for (auto& a : row) a = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * d + col;
    __m256 vc[V];
    for (int c = 0; c < V; ++c) vc[c] = _mm256_loadu_ps(vj + 8 * c);
    for (int r = 0; r < R; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p[r] + j);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm256_fmadd_ps(pr, vc[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 scale = _mm256_set1_ps(inv[r]);
    for (int c = 0; c < V; ++c) {
      _mm256_storeu_ps(out[r] + col + 8 * c, inv[r] == 0.0f ? _mm256_setzero_ps() : _mm256_mul_ps(acc[r][c], scale));
    }
  }
}

// weighted_sum with 16-lane vectors, all of a row's columns (col 0, d = 16 V) in one pass over the keys.
template <int R, int V>
__attribute__((target("avx512f"))) void weighted_sum16(const float* const* p, const float* v, int64_t d, int64_t n,
                                                       const float* inv, float* const* out) {
  __m512 acc[R][V];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const float* vj = v + j * d;
    __m512 vc[V];
    for (int c = 0; c < V; ++c) vc[c] = _mm512_loadu_ps(vj + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r][j]);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm512_fmadd_ps(pr, vc[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 scale = _mm512_set1_ps(inv[r]);
    for (int c = 0; c < V; ++c) {
      _mm512_storeu_ps(out[r] + 16 * c, inv[r] == 0.0f ? _mm512_setzero_ps() : _mm512_mul_ps(acc[r][c], scale));
    }
  }
}

template <int R>
AVX2 void tile_output(const Tile& t, const float* v, int64_t d, float* scores, int64_t ld, bool wide) {
  const int64_t n = t.hi - t.lo;
  float inv[R];
  const float* p[R];
  for (int r = 0; r < R; ++r) {
    inv[r] = softmax_row(scores + r * ld, ld);
    p[r] = scores + r * ld;
  }
  const float* vlo = v + t.lo * d;
  if (wide && d == 64) return weighted_sum16<R, 4>(p, vlo, d, n, inv, t.out);
  int64_t col = 0;
  for (; col + 32 <= d; col += 32) weighted_sum<R, 4>(p, vlo, d, n, col, inv, t.out);
  for (; col + 16 <= d; col += 16) weighted_sum<R, 2>(p, vlo, d, n, col, inv, t.out);
  for (; col < d; col += 8) weighted_sum<R, 1>(p, vlo, d, n, col, inv, t.out);
}

template <int R>
AVX2 void vector_tile(const Tile& t, const float* k, const float* v, int64_t d, float scale, float* scores, bool wide) {
  const int64_t ld = (t.hi - t.lo + 7) / 8 * 8;
  tile_scores<R>(t, k, d, scale, scores, ld);
  tile_output<R>(t, v, d, scores, ld, wide);
}

#undef AVX2
#else
bool cpu_has_avx2_fma() { return false; }
bool cpu_has_avx512f() { return false; }
#endif

}  // namespace

AttentionKernel::AttentionKernel(float scale)
    : scale_(scale),
      vector_(cpu_has_avx2_fma() && isa_cap() >= Isa::kAvx2),
      wide_(vector_ && cpu_has_avx512f() && isa_cap() >= Isa::kAvx512Vnni) {}

void AttentionKernel::copy_caches(const AttentionDims& d, const AttentionTensors& t, int64_t b, int64_t kv) const {
  const int64_t hd = d.head_dim, row = d.kv_heads * hd, cache = (b * d.kv_heads + kv) * d.total() * hd;
  const int64_t past = (b * d.kv_heads + kv) * d.past * hd;
  const float* news[2] = {t.k, t.v};
  const float* pasts[2] = {t.past_key, t.past_value};
  float* presents[2] = {t.present_key, t.present_value};
  for (int c = 0; c < 2; ++c) {
    float* dst = presents[c] + cache;
    if (d.past) std::memcpy(dst, pasts[c] + past, d.past * hd * sizeof(float));
    dst += d.past * hd;
    const float* src = news[c] + b * d.seq * row + kv * hd;
    for (int64_t s = 0; s < d.seq; ++s) std::memcpy(dst + s * hd, src + s * row, hd * sizeof(float));
  }
}

std::pair<int64_t, int64_t> AttentionKernel::key_range(const AttentionDims& d, const AttentionTensors& t, int64_t b,
                                                       int64_t i) {
  const int64_t total = d.total();
  const float* bias = t.bias + ((d.bias_broadcast ? 0 : b) * d.seq + i) * total;
  int64_t lo = 0, hi = total;
  while (lo < total && bias[lo] == kNegInf) ++lo;
  if (lo == total) return {0, 0};
  while (bias[hi - 1] == kNegInf) --hi;
  return {lo, hi};
}

void AttentionKernel::attend(const AttentionDims& d, const AttentionTensors& t,
                             const std::vector<std::pair<int64_t, int64_t>>& ranges, int64_t b, int64_t kv, int64_t i0,
                             int64_t i1) const {
  const int64_t g = d.group(), hd = d.head_dim, total = d.total();
  const float* k = t.present_key + (b * d.kv_heads + kv) * total * hd;
  const float* v = t.present_value + (b * d.kv_heads + kv) * total * hd;
  std::vector<float> scores(kTileRows * ((total + 7) / 8 * 8));
  const int64_t rows = (i1 - i0) * g;
  for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
    Tile tile{static_cast<int>(std::min<int64_t>(kTileRows, rows - r0)), {}, {}, {}, total, 0};
    for (int r = 0; r < tile.rows; ++r) {
      const int64_t i = i0 + (r0 + r) / g, h = kv * g + (r0 + r) % g;
      const int64_t offset = ((b * d.seq + i) * d.heads + h) * hd;
      tile.q[r] = t.q + offset;
      tile.out[r] = t.out + offset;
      tile.bias[r] = t.bias + ((d.bias_broadcast ? 0 : b) * d.seq + i) * total;
      const auto& range = ranges[b * d.seq + i];
      if (range.second > range.first) {
        tile.lo = std::min(tile.lo, range.first);
        tile.hi = std::max(tile.hi, range.second);
      }
    }
    if (tile.hi <= tile.lo) {  // every key of every row masked
      for (int r = 0; r < tile.rows; ++r) std::fill(tile.out[r], tile.out[r] + hd, 0.0f);
      continue;
    }
#ifdef MXONNX_AVX2_ATTENTION
    if (vector_ && hd % 8 == 0) {
      switch (tile.rows) {
        case 3: vector_tile<3>(tile, k, v, hd, scale_, scores.data(), wide_); continue;
        case 2: vector_tile<2>(tile, k, v, hd, scale_, scores.data(), wide_); continue;
        default: vector_tile<1>(tile, k, v, hd, scale_, scores.data(), wide_); continue;
      }
    }
#endif
    portable_tile(tile, k, v, hd, scale_, scores.data());
  }
}

}  // namespace mxonnx
