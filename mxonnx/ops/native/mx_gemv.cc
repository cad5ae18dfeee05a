// Matrix-vector kernels against packed MX weights (see mx_gemv.h for the contract and the error bound).
//
// AVX2 integer kernel, 4-bit weights: two rows k, k+1 of 64 packed codes (2 x 32 bytes) are interleaved byte-wise,
// so that each 16-bit lane holds the byte j of both rows; masking the low / high nibbles gives, per lane, the pair
// (w_k, w_k+1) of column 2j / 2j+1. A pshufb table maps a nibble to its value plus an offset (unsigned, as
// _mm256_maddubs_epi16 wants), maddubs multiplies the pairs with the broadcast activation pair (a_k, a_k+1) and adds
// them in 16 bits; a few pairs are summed in int16 (no overflow by construction), then widened to int32, and the
// offset times the segment's activation sum is taken off at the end: sum a (w + o) - o sum a = sum a w.
// 8-bit weights: the interleaved pairs are sign-extended to int16 and multiplied with _mm256_madd_epi16.
#include "mx_gemv.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

#include "mx_kernels.h"

#if defined(__x86_64__) && !defined(__clang__) && !defined(MXONNX_NO_VECTOR_CLONES)
#define MXONNX_AVX2_GEMV 1
#include <immintrin.h>
#endif

namespace mxonnx {

namespace {

constexpr int kMaxActCode = 127;                  // |MXINT8 code| <= 127 (max_norm 127/64); smaller MXINTs fit
alignas(32) const uint8_t kZeroRow[kGemvColumns] = {};  // stands for the missing partner of a segment's last odd row

#ifdef MXONNX_AVX2_GEMV
bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

#define AVX2 __attribute__((target("avx2,fma")))

// The GEMV kernels walk one 64-column unit down the rows of a segment (row after row, stride N bytes or N / 2), so
// each row's next cache line is the next unit's: fetching it now, a whole segment ahead of its use, keeps the loads
// off main memory's latency (SmolLM2's decode GEMVs ran about 1.4x faster with it; 4-bit rows are 32 bytes per
// unit, so the line after next is two units on; 8-bit rows are 64 bytes, fetched four units ahead). Prefetches of
// addresses past the weight never fault.
constexpr int64_t kNibblePrefetch = 64;
constexpr int64_t kBytePrefetch = 256;

AVX2 inline void prefetch_ahead(const uint8_t* a, const uint8_t* b) {
  _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(b), _MM_HINT_T0);
}

// The int16 lanes of e (columns 2j) and o (columns 2j+1) of an interleaved half, widened and added to int32
// accumulators in column order: see the mapping in int_nibbles.
AVX2 inline void widen_pairs(__m256i e, __m256i o, __m256i& a0, __m256i& a1, __m256i& a4, __m256i& a5) {
  const __m256i first = _mm256_unpacklo_epi16(e, o), second = _mm256_unpackhi_epi16(e, o);
  a0 = _mm256_add_epi32(a0, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(first)));
  a4 = _mm256_add_epi32(a4, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(first, 1)));
  a1 = _mm256_add_epi32(a1, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(second)));
  a5 = _mm256_add_epi32(a5, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(second, 1)));
}

// y[0..64) += float(acc[q] - correction) * 2^(Ew - 127) u_w * scale_a for the 64 columns whose exponents start at e.
// The weight scale 2^(Ew - 127 + unit_exp) (u_w = 2^unit_exp) is a normal float for Ew in [1 - unit_exp, 254]: there
// its bits are (Ew + unit_exp) << 23, built in registers, the same value as the table entry. Only when one of the 64
// exponents lies outside (NaN at 255, subnormal scales) are the 8-lane groups gathered from the table.
AVX2 inline void scale_segment(const __m256i* acc, int32_t correction, float act_scale, const uint8_t* e,
                               const float* weight_scale, int unit_exp, float* y) {
  const __m256i corr = _mm256_set1_epi32(correction);
  const __m256 as = _mm256_set1_ps(act_scale);
  const __m256i lo = _mm256_set1_epi8(static_cast<char>(1 - unit_exp)), hi = _mm256_set1_epi8(static_cast<char>(254));
  const __m256i e0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e));
  const __m256i e1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + 32));
  const __m256i in0 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_max_epu8(e0, lo), e0),
                                       _mm256_cmpeq_epi8(_mm256_min_epu8(e0, hi), e0));
  const __m256i in1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_max_epu8(e1, lo), e1),
                                       _mm256_cmpeq_epi8(_mm256_min_epu8(e1, hi), e1));
  const bool direct = _mm256_movemask_epi8(_mm256_and_si256(in0, in1)) == -1;
  const __m256i bias = _mm256_set1_epi32(unit_exp);
  for (int q = 0; q < 8; ++q) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e + 8 * q)));
    const __m256 ws = direct ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(idx, bias), 23))
                             : _mm256_i32gather_ps(weight_scale, idx, 4);
    const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[q], corr)), ws);
    _mm256_storeu_ps(y + 8 * q, _mm256_add_ps(_mm256_loadu_ps(y + 8 * q), _mm256_mul_ps(v, as)));
  }
}

// Integer route, 4-bit codes, columns [n_begin, n_end) (a multiple of 64 columns; n_begin and N even). Segments
// outermost, so that the rows of one segment (contiguous bytes) are read once, front to back, for all columns.
AVX2 void int_nibbles(const uint8_t* lut32, int offset, int pairs_per_flush, const PackedWeight& w,
                      const ActivationCodes& a, int64_t segment, int64_t weight_block, const float* weight_scale,
                      int unit_exp, int64_t n_begin, int64_t n_end, float* y) {
  const int64_t row_bytes = w.n / 2;
  const __m256i lut = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut32));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  std::fill(y + n_begin, y + n_end, 0.0f);
  const int8_t* codes = a.codes.data();
  const int64_t segments = (w.k + segment - 1) / segment;
  for (int64_t s = 0; s < segments; ++s) {
   for (int64_t n0 = n_begin; n0 < n_end; n0 += kGemvColumns) {
    const int64_t k0 = s * segment, k1 = std::min(k0 + segment, w.k);
    __m256i acc[8];
    for (auto& v : acc) v = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1;) {
      __m256i e_lo = _mm256_setzero_si256(), o_lo = e_lo, e_hi = e_lo, o_hi = e_lo;
      const int64_t k_end = std::min(k1, k + 2 * pairs_per_flush);
      for (; k < k_end; k += 2) {
        const uint8_t* ra = w.codes + k * row_bytes + n0 / 2;
        const bool pair = k + 1 < k1;
        const uint8_t* rb = pair ? ra + row_bytes : kZeroRow;
        const uint16_t a_pair = static_cast<uint8_t>(codes[k]) | (pair ? static_cast<uint8_t>(codes[k + 1]) << 8 : 0);
        const __m256i ap = _mm256_set1_epi16(static_cast<int16_t>(a_pair));
        prefetch_ahead(ra + kNibblePrefetch, rb + kNibblePrefetch);
        const __m256i ma = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra));
        const __m256i mb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb));
        // lo: lane 0 bytes j = 0..7 of both rows, lane 1 j = 16..23; hi: j = 8..15 and 24..31
        const __m256i lo = _mm256_unpacklo_epi8(ma, mb), hi = _mm256_unpackhi_epi8(ma, mb);
        const __m256i lo_e = _mm256_shuffle_epi8(lut, _mm256_and_si256(lo, low4));
        const __m256i lo_o = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(lo, 4), low4));
        const __m256i hi_e = _mm256_shuffle_epi8(lut, _mm256_and_si256(hi, low4));
        const __m256i hi_o = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(hi, 4), low4));
        e_lo = _mm256_add_epi16(e_lo, _mm256_maddubs_epi16(lo_e, ap));
        o_lo = _mm256_add_epi16(o_lo, _mm256_maddubs_epi16(lo_o, ap));
        e_hi = _mm256_add_epi16(e_hi, _mm256_maddubs_epi16(hi_e, ap));
        o_hi = _mm256_add_epi16(o_hi, _mm256_maddubs_epi16(hi_o, ap));
      }
      // int16 lane i of lo (lane 0: j = i, lane 1: j = 16 + i) is column 2j (e) / 2j + 1 (o): interleaving e and o
      // gives columns 0..7 | 32..39 and 8..15 | 40..47; hi the same 16 columns further.
      widen_pairs(e_lo, o_lo, acc[0], acc[1], acc[4], acc[5]);
      widen_pairs(e_hi, o_hi, acc[2], acc[3], acc[6], acc[7]);
    }
    scale_segment(acc, offset * a.segment_sum[s], a.segment_scale[s], w.exponents + (k0 / weight_block) * w.n + n0,
                  weight_scale, unit_exp, y + n0);
   }
  }
}

// 16 interleaved (row k, row k+1) byte pairs -> int16 pairs sign-extended from `bits` bits.
AVX2 inline __m256i byte_pairs(__m128i pairs, __m128i shift) {
  const __m256i v = _mm256_cvtepi8_epi16(pairs);
  return _mm256_sra_epi16(_mm256_sll_epi16(v, shift), shift);
}

// Integer route, 8-bit codes holding `bits`-bit two's-complement integers, columns [n_begin, n_end) (as int_nibbles).
AVX2 void int_bytes(int bits, const PackedWeight& w, const ActivationCodes& a, int64_t segment, int64_t weight_block,
                    const float* weight_scale, int unit_exp, int64_t n_begin, int64_t n_end, float* y) {
  const __m128i shift = _mm_cvtsi32_si128(16 - bits);
  std::fill(y + n_begin, y + n_end, 0.0f);
  const int8_t* codes = a.codes.data();
  const int64_t segments = (w.k + segment - 1) / segment;
  for (int64_t s = 0; s < segments; ++s) {
   for (int64_t n0 = n_begin; n0 < n_end; n0 += kGemvColumns) {
    const int64_t k0 = s * segment, k1 = std::min(k0 + segment, w.k);
    __m256i acc[8];
    for (auto& v : acc) v = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 2) {
      const uint8_t* ra = w.codes + k * w.n + n0;
      const bool pair = k + 1 < k1;
      const uint8_t* rb = pair ? ra + w.n : kZeroRow;
      const uint32_t a_pair = static_cast<uint16_t>(static_cast<int16_t>(codes[k])) |
                              (pair ? static_cast<uint32_t>(static_cast<uint16_t>(static_cast<int16_t>(codes[k + 1]))) << 16 : 0u);
      const __m256i ap = _mm256_set1_epi32(static_cast<int32_t>(a_pair));
      prefetch_ahead(ra + kBytePrefetch, rb + kBytePrefetch);
      for (int h = 0; h < 2; ++h) {
        const __m256i ma = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + 32 * h));
        const __m256i mb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 32 * h));
        // lo: columns 0..7 (lane 0) and 16..23 (lane 1) of this half; hi: 8..15 and 24..31
        const __m256i lo = _mm256_unpacklo_epi8(ma, mb), hi = _mm256_unpackhi_epi8(ma, mb);
        __m256i* q = acc + 4 * h;
        q[0] = _mm256_add_epi32(q[0], _mm256_madd_epi16(byte_pairs(_mm256_castsi256_si128(lo), shift), ap));
        q[2] = _mm256_add_epi32(q[2], _mm256_madd_epi16(byte_pairs(_mm256_extracti128_si256(lo, 1), shift), ap));
        q[1] = _mm256_add_epi32(q[1], _mm256_madd_epi16(byte_pairs(_mm256_castsi256_si128(hi), shift), ap));
        q[3] = _mm256_add_epi32(q[3], _mm256_madd_epi16(byte_pairs(_mm256_extracti128_si256(hi, 1), shift), ap));
      }
    }
    scale_segment(acc, 0, a.segment_scale[s], w.exponents + (k0 / weight_block) * w.n + n0, weight_scale, unit_exp,
                  y + n0);
   }
  }
}

// How the float route turns a row of 64 codes into 8 vectors of values / unit.
enum class FloatDecode { kNibbles, kSignedBytes, kGather };

template <FloatDecode D>
AVX2 inline void decode_row(const uint8_t* row, const __m256i& nibble_lut, int bits, const float* table, __m256* v) {
  if constexpr (D == FloatDecode::kNibbles) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    const __m256i lo = _mm256_and_si256(bytes, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
    // first: columns 0..15 (lane 0) and 32..47 (lane 1); second: 16..31 and 48..63
    const __m256i first = _mm256_shuffle_epi8(nibble_lut, _mm256_unpacklo_epi8(lo, hi));
    const __m256i second = _mm256_shuffle_epi8(nibble_lut, _mm256_unpackhi_epi8(lo, hi));
    const __m128i parts[4] = {_mm256_castsi256_si128(first), _mm256_castsi256_si128(second),
                              _mm256_extracti128_si256(first, 1), _mm256_extracti128_si256(second, 1)};
    for (int p = 0; p < 4; ++p) {
      v[2 * p] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[p]));
      v[2 * p + 1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(parts[p], 8)));
    }
  } else if constexpr (D == FloatDecode::kSignedBytes) {
    const __m128i shift = _mm_cvtsi32_si128(32 - bits);
    for (int q = 0; q < 8; ++q) {
      __m256i i = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * q)));
      i = _mm256_sra_epi32(_mm256_sll_epi32(i, shift), shift);
      v[q] = _mm256_cvtepi32_ps(i);
    }
  } else {
    for (int q = 0; q < 8; ++q) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 8 * q)));
      v[q] = _mm256_i32gather_ps(table, idx, 4);
    }
  }
}

// Float route, columns [n0, n0 + 64): per weight block, sum_k x_k (value_kn / u) by FMA, then times 2^(Ew-127) u.
template <FloatDecode D>
AVX2 void float_columns(const int8_t* nibble_values32, int bits, const float* table, const PackedWeight& w,
                        const float* x, int64_t block, const float* weight_scale, int64_t n0, float* y) {
  const bool packed4 = D == FloatDecode::kNibbles;
  const __m256i lut = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(nibble_values32));
  __m256 out[8];
  for (auto& v : out) v = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < w.k; k0 += block) {
    const int64_t k1 = std::min(k0 + block, w.k);
    __m256 acc[8];
    for (auto& v : acc) v = _mm256_setzero_ps();
    for (int64_t k = k0; k < k1; ++k) {
      const uint8_t* row = packed4 ? w.codes + (k * w.n + n0) / 2 : w.codes + k * w.n + n0;
      _mm_prefetch(reinterpret_cast<const char*>(row) + (packed4 ? kNibblePrefetch : kBytePrefetch), _MM_HINT_T0);
      __m256 v[8];
      decode_row<D>(row, lut, bits, table, v);
      const __m256 xk = _mm256_broadcast_ss(x + k);
      for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(xk, v[q], acc[q]);
    }
    const uint8_t* e = w.exponents + (k0 / block) * w.n + n0;
    for (int q = 0; q < 8; ++q) {
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e + 8 * q)));
      out[q] = _mm256_add_ps(out[q], _mm256_mul_ps(acc[q], _mm256_i32gather_ps(weight_scale, idx, 4)));
    }
  }
  for (int q = 0; q < 8; ++q) _mm256_storeu_ps(y + n0 + 8 * q, out[q]);
}

// Integer GEMM: R rows x 32 columns over the byte pairs [p0, p1) of an unpacked panel (64 bytes per pair: lanes
// 0..15 columns 2i, lanes 16..31 columns 2i + 1), added to the int32 accumulators iacc[R][32] (same lane order).
template <int R>
AVX2 void gemm_rows(const uint8_t* panel, const int8_t* const* codes, int64_t p0, int64_t p1, int pairs_per_flush,
                    int32_t* iacc) {
  for (int64_t p = p0; p < p1;) {
    __m256i acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
    const int64_t p_end = std::min(p1, p + pairs_per_flush);
    for (; p < p_end; ++p) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + 64 * p));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panel + 64 * p + 32));
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int16_t pair;
        std::memcpy(&pair, codes[r] + 2 * p, sizeof pair);
        const __m256i a = _mm256_set1_epi16(pair);
        acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(b0, a));
        acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(b1, a));
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m256i* out = reinterpret_cast<__m256i*>(iacc + 32 * r + 16 * h);
        _mm256_storeu_si256(out, _mm256_add_epi32(_mm256_loadu_si256(out),
                                                  _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[r][h]))));
        _mm256_storeu_si256(out + 1, _mm256_add_epi32(_mm256_loadu_si256(out + 1),
                                                      _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[r][h], 1))));
      }
    }
  }
}

// facc[r][lane] += float(iacc[r][lane] - correction[r]) * ws[lane] * act_scale[r]; iacc reset.
template <int R>
AVX2 void gemm_scale(int32_t* iacc, const int32_t* correction, const float* act_scale, const float* ws, float* facc) {
  for (int r = 0; r < R; ++r) {
    const __m256i corr = _mm256_set1_epi32(correction[r]);
    const __m256 as = _mm256_set1_ps(act_scale[r]);
    for (int q = 0; q < 4; ++q) {
      __m256i* i = reinterpret_cast<__m256i*>(iacc + 32 * r + 8 * q);
      const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_loadu_si256(i), corr)),
                                     _mm256_loadu_ps(ws + 8 * q));
      float* f = facc + 32 * r + 8 * q;
      _mm256_storeu_ps(f, _mm256_add_ps(_mm256_loadu_ps(f), _mm256_mul_ps(v, as)));
      _mm256_storeu_si256(i, _mm256_setzero_si256());
    }
  }
}

// Rows k, k+1 of 32 packed 4-bit columns (16 bytes each) -> 64 bytes of (w + offset) pairs in panel lane order.
AVX2 void unpack_pair(const uint8_t* lut32, const uint8_t* ra, const uint8_t* rb, uint8_t* out) {
  const __m256i lut = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lut32));
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ra));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rb));
  const __m256i v = _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));  // byte j of both rows
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_shuffle_epi8(lut, _mm256_and_si256(v, low4)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32),
                      _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low4)));
}

template <int R>
void gemm_tile(const uint8_t* panel, const float* ws, const ActivationCodes* rows, int64_t segments, int64_t segment,
               int offset, int pairs_per_flush, float* facc) {
  alignas(32) int32_t iacc[R * 32] = {};
  const int8_t* codes[R];
  for (int r = 0; r < R; ++r) codes[r] = rows[r].codes.data();
  int32_t correction[R];
  float act_scale[R];
  for (int64_t s = 0; s < segments; ++s) {
    gemm_rows<R>(panel, codes, s * segment / 2, (s + 1) * segment / 2, pairs_per_flush, iacc);
    for (int r = 0; r < R; ++r) {
      correction[r] = offset * rows[r].segment_sum[s];
      act_scale[r] = rows[r].segment_scale[s];
    }
    gemm_scale<R>(iacc, correction, act_scale, ws + 32 * s, facc);
  }
}

// ---- AVX-512 VNNI integer GEMM: quads (w_k .. w_k+3 + offset) of one column per 32-bit lane, vpdpbusd multiplies
// them with the broadcast activation quad and adds to int32 (exact, no int16 stage). A panel quad is 128 bytes:
// two zmm of 16 columns each (lane_column below gives the column of a lane).
#define VNNI __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))

bool cpu_has_avx512_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// Column (0..31) of lane (0..31) of a quad panel: zmm 0 holds columns 2i, zmm 1 columns 2i + 1, with i = 0..3,
// 8..11, 4..7, 12..15 over its four 128-bit quarters (the order the unpacks produce).
inline int quad_lane_column(int lane) {
  static constexpr int kI[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
  return 2 * kI[lane % 16] + lane / 16;
}

// Column of each lane of a quad panel of 8-bit codes: the unpacks of unpack_byte_quad order a zmm's four 128-bit
// quarters as columns 0..3, 16..19, 4..7, 20..23 (zmm 0) and 8..11, 24..27, 12..15, 28..31 (zmm 1).
inline int byte_quad_lane_column(int lane) {
  static constexpr int kBase[2][4] = {{0, 16, 4, 20}, {8, 24, 12, 28}};
  return kBase[lane / 16][(lane % 16) / 4] + lane % 4;
}

// Rows k .. k+3 of 32 int8 codes -> 128 bytes of quads (code + 128, unsigned) in byte_quad_lane_column order.
AVX2 void unpack_byte_quad(const uint8_t* const* rows, uint8_t* out) {
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256i r[4];
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[i])), flip);
  }
  const __m256i a = _mm256_unpacklo_epi8(r[0], r[1]), b = _mm256_unpacklo_epi8(r[2], r[3]);
  const __m256i c = _mm256_unpackhi_epi8(r[0], r[1]), d = _mm256_unpackhi_epi8(r[2], r[3]);
  __m256i* o = reinterpret_cast<__m256i*>(out);
  _mm256_storeu_si256(o, _mm256_unpacklo_epi16(a, b));
  _mm256_storeu_si256(o + 1, _mm256_unpackhi_epi16(a, b));
  _mm256_storeu_si256(o + 2, _mm256_unpacklo_epi16(c, d));
  _mm256_storeu_si256(o + 3, _mm256_unpackhi_epi16(c, d));
}

// Rows k .. k+3 of 32 packed 4-bit columns -> 128 bytes of quads in quad_lane_column order.
AVX2 void unpack_quad(const uint8_t* lut32, const uint8_t* const* rows, uint8_t* out) {
  alignas(32) uint8_t pairs[2][64];
  unpack_pair(lut32, rows[0], rows[1], pairs[0]);
  unpack_pair(lut32, rows[2], rows[3], pairs[1]);
  for (int h = 0; h < 2; ++h) {  // h = 0: columns 2i (E), 1: columns 2i + 1 (O)
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs[0] + 32 * h));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pairs[1] + 32 * h));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * h), _mm256_unpacklo_epi16(a, b));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 64 * h + 32), _mm256_unpackhi_epi16(a, b));
  }
}

template <int R>
VNNI void vnni_tile(const uint8_t* panel, const float* ws, const ActivationCodes* rows, int64_t segments,
                    int64_t segment, int offset, const int* lane_column, float* y, int64_t ldy, int64_t cols) {
  const int8_t* codes[R];
  for (int r = 0; r < R; ++r) codes[r] = rows[r].codes.data();
  __m512 out[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) out[r][0] = out[r][1] = _mm512_setzero_ps();
  for (int64_t s = 0; s < segments; ++s) {
    // the sums start at -offset * (sum of the segment's activation codes), the offset's share: exact integers
    __m512i acc[R][2];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_set1_epi32(-offset * rows[r].segment_sum[s]);
    for (int64_t q = s * segment / 4, q1 = (s + 1) * segment / 4; q < q1; ++q) {
      const __m512i b0 = _mm512_loadu_si512(panel + 128 * q);
      const __m512i b1 = _mm512_loadu_si512(panel + 128 * q + 64);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        int32_t quad;
        std::memcpy(&quad, codes[r] + 4 * q, sizeof quad);
        const __m512i a = _mm512_set1_epi32(quad);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b0, a);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b1, a);
      }
    }
    const __m512 w0 = _mm512_loadu_ps(ws + 32 * s), w1 = _mm512_loadu_ps(ws + 32 * s + 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 as = _mm512_set1_ps(rows[r].segment_scale[s]);
      const __m512 v0 = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), w0);
      const __m512 v1 = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), w1);
      out[r][0] = _mm512_add_ps(out[r][0], _mm512_mul_ps(v0, as));
      out[r][1] = _mm512_add_ps(out[r][1], _mm512_mul_ps(v1, as));
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(64) float lanes[32];
    _mm512_store_ps(lanes, out[r][0]);
    _mm512_store_ps(lanes + 16, out[r][1]);
    for (int lane = 0; lane < 32; ++lane) {
      const int c = lane_column[lane];
      if (c < cols) y[r * ldy + c] = lanes[lane];
    }
  }
}
#undef VNNI
#undef AVX2
#else
bool cpu_has_avx2_fma() { return false; }
bool cpu_has_avx512_vnni() { return false; }
#endif

}  // namespace

GemvKernel::GemvKernel(const MxFormat& weight_format, const MxFormat* act_format, float act_prescale)
    : weight_(weight_format),
      act_elem_(nullptr),
      act_block_(0),
      act_prescale_(act_prescale),
      packed4_(weight_format.elem->storage == CodeStorage::kInt4 || weight_format.elem->storage == CodeStorage::kUInt4),
      integer_(false),
      vector_(cpu_has_avx2_fma() && isa_cap() >= Isa::kAvx2),
      vnni_(vector_ && cpu_has_avx512_vnni() && isa_cap() >= Isa::kAvx512Vnni),
      segment_(weight_format.block_size),
      nibble_offset_(0) {
  const ElemFormat& elem = *weight_.elem;
  const DequantizeTables tables = make_dequantize_tables(elem);
  unit_exp_ = elem.emin - elem.mbits;
  unit_ = pow2f(unit_exp_);
  const int codes = packed4_ ? 16 : 256;
  bool integer_values = packed4_ || elem.integer_codes;  // MXFP6/8 bytes are not small integers
  int lowest = 0, highest = 0;
  for (int c = 0; c < 256; ++c) {
    weight_value_[c] = tables.element[c] / unit_;  // exact: a power-of-two division of a value on the grid
    weight_scale_[c] = tables.scale[c] * unit_;    // exact: 2^(c - 127 + emin - mbits) >= 2^-149 for every format
    const float v = weight_value_[c];
    const bool fits = v == std::nearbyint(v) && v >= -128.0f && v <= 127.0f;  // false for NaN
    if (c < codes && !fits) integer_values = false;
    weight_int_[c] = fits ? static_cast<int8_t>(v) : 0;
    if (c < codes && fits) {
      lowest = std::min(lowest, static_cast<int>(v));
      highest = std::max(highest, static_cast<int>(v));
    }
  }
  if (packed4_) {
    for (int c = 0; c < 16; ++c) {
      if (!integer_values) throw std::logic_error(std::string("MXMatMul: 4-bit values of ") + elem.family +
                                                  " are not small integers");
      nibble_value_[c] = nibble_value_[16 + c] = weight_int_[c];
      nibble_offset_ = -lowest;
      nibble_lut_[c] = nibble_lut_[16 + c] = static_cast<uint8_t>(weight_int_[c] + nibble_offset_);
    }
    (void)highest;
  } else {
    std::memset(nibble_value_, 0, sizeof nibble_value_);
    std::memset(nibble_lut_, 0, sizeof nibble_lut_);
  }
  byte_int8_ = !packed4_ && elem.integer_codes;
  if (act_format != nullptr && act_format->elem->integer_codes && integer_values) {
    integer_ = true;
    act_elem_ = act_format->elem;
    act_block_ = act_format->block_size;
    segment_ = std::min(act_block_, weight_.block_size);
  }
}

void GemvKernel::quantize_row(const float* x, int64_t k, ActivationCodes& out) const {
  const int64_t segments = (k + segment_ - 1) / segment_;
  out.codes.assign(segments * segment_, 0);
  std::vector<float> block_scales((k + act_block_ - 1) / act_block_);
  quantize_codes(*act_elem_, x, k, act_block_, out.codes.data(), block_scales.data(), act_prescale_);
  out.segment_scale.resize(segments);
  out.segment_sum.resize(segments);
  for (int64_t s = 0; s < segments; ++s) {
    out.segment_scale[s] = block_scales[(s * segment_) / act_block_];
    int32_t sum = 0;
    for (int64_t i = s * segment_; i < (s + 1) * segment_; ++i) sum += out.codes[i];
    out.segment_sum[s] = sum;
  }
}

int GemvKernel::code_at(const PackedWeight& w, int64_t k, int64_t n) const {
  const int64_t i = k * w.n + n;
  return packed4_ ? (w.codes[i >> 1] >> (4 * (i & 1))) & 0xF : w.codes[i];
}

// Same sums as the vector kernels, in the same order: bit for bit their result.
void GemvKernel::integer_portable(const PackedWeight& w, const ActivationCodes& a, float* y, int64_t n0,
                                  int64_t n1) const {
  for (int64_t c0 = n0; c0 < n1; c0 += kGemvColumns) {
    const int64_t cols = std::min(kGemvColumns, n1 - c0);
    float out[kGemvColumns] = {};
    for (int64_t s = 0, k0 = 0; k0 < w.k; ++s, k0 += segment_) {
      const int64_t k1 = std::min(k0 + segment_, w.k);
      int32_t acc[kGemvColumns] = {};
      for (int64_t k = k0; k < k1; ++k) {
        const int32_t ak = a.codes[k];
        if (ak == 0) continue;
        for (int64_t j = 0; j < cols; ++j) acc[j] += ak * weight_int_[code_at(w, k, c0 + j)];
      }
      const uint8_t* e = w.exponents + (k0 / weight_.block_size) * w.n + c0;
      for (int64_t j = 0; j < cols; ++j) {
        out[j] += static_cast<float>(acc[j]) * weight_scale_[e[j]] * a.segment_scale[s];
      }
    }
    std::memcpy(y + c0, out, cols * sizeof(float));
  }
}

void GemvKernel::float_portable(const PackedWeight& w, const float* x, float* y, int64_t n0, int64_t n1) const {
  const int64_t block = weight_.block_size;
  for (int64_t c0 = n0; c0 < n1; c0 += kGemvColumns) {
    const int64_t cols = std::min(kGemvColumns, n1 - c0);
    float out[kGemvColumns] = {};
    for (int64_t k0 = 0; k0 < w.k; k0 += block) {
      const int64_t k1 = std::min(k0 + block, w.k);
      float acc[kGemvColumns] = {};
      for (int64_t k = k0; k < k1; ++k) {
        const float xk = x[k];
        for (int64_t j = 0; j < cols; ++j) acc[j] += xk * weight_value_[code_at(w, k, c0 + j)];
      }
      const uint8_t* e = w.exponents + (k0 / block) * w.n + c0;
      for (int64_t j = 0; j < cols; ++j) out[j] += acc[j] * weight_scale_[e[j]];
    }
    std::memcpy(y + c0, out, cols * sizeof(float));
  }
}

void GemvKernel::gemm_panel(const PackedWeight& w, const ActivationCodes* rows, int64_t m, int64_t n0,
                            float* y) const {
#ifdef MXONNX_AVX2_GEMV
  const int64_t segments = (w.k + segment_ - 1) / segment_, pairs = segments * segment_ / 2;
  const int64_t cols = std::min(kGemmColumns, w.n - n0);
  std::vector<uint8_t> panel(pairs * 64);
  std::vector<float> ws(segments * 32);
  auto column = [](int lane) { return lane < 16 ? 2 * lane : 2 * (lane - 16) + 1; };
  // unpack: vector for whole 32-column panels of rows that start on a byte, else code by code
  const bool vector_unpack = cols == kGemmColumns && !(w.n & 1);
  if (vnni_ && segment_ % 4 == 0) {
    gemm_panel_vnni(w, rows, m, n0, y);
    return;
  }
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t k = 2 * p;
    uint8_t* out = panel.data() + 64 * p;
    if (vector_unpack && k + 1 < w.k) {
      const uint8_t* ra = w.codes + (k * w.n + n0) / 2;
      unpack_pair(nibble_lut_, ra, ra + w.n / 2, out);
      continue;
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t c = column(lane);
      for (int64_t d = 0; d < 2; ++d) {
        const bool valid = k + d < w.k && c < cols;
        out[2 * lane + d] = valid ? nibble_lut_[code_at(w, k + d, n0 + c)] : static_cast<uint8_t>(nibble_offset_);
      }
    }
  }
  for (int64_t s = 0; s < segments; ++s) {
    const uint8_t* e = w.exponents + (s * segment_ / weight_.block_size) * w.n + n0;
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t c = column(lane);
      ws[32 * s + lane] = c < cols ? weight_scale_[e[c]] : 0.0f;
    }
  }
  const int highest = *std::max_element(nibble_lut_, nibble_lut_ + 16);
  const int flush = std::max(1, 32767 / (2 * kMaxActCode * std::max(1, highest)));
  constexpr int64_t kRows = 4;  // 8 int16 accumulators + 2 panel vectors + 4 broadcasts: no spill in 16 ymm
  alignas(32) float facc[kRows * 32];
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    const int64_t rs = std::min(kRows, m - r0);
    std::fill(facc, facc + kRows * 32, 0.0f);
    switch (rs) {
      case 4: gemm_tile<4>(panel.data(), ws.data(), rows + r0, segments, segment_, nibble_offset_, flush, facc); break;
      case 3: gemm_tile<3>(panel.data(), ws.data(), rows + r0, segments, segment_, nibble_offset_, flush, facc); break;
      case 2: gemm_tile<2>(panel.data(), ws.data(), rows + r0, segments, segment_, nibble_offset_, flush, facc); break;
      default: gemm_tile<1>(panel.data(), ws.data(), rows + r0, segments, segment_, nibble_offset_, flush, facc); break;
    }
    for (int64_t r = 0; r < rs; ++r) {
      float* out = y + (r0 + r) * w.n + n0;
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t c = column(lane);
        if (c < cols) out[c] = facc[32 * r + lane];
      }
    }
  }
#else
  (void)w, (void)rows, (void)m, (void)n0, (void)y;
  throw std::logic_error("MXMatMul: integer GEMM without AVX2");
#endif
}

void GemvKernel::gemm_panel_vnni(const PackedWeight& w, const ActivationCodes* rows, int64_t m, int64_t n0,
                                 float* y) const {
#ifdef MXONNX_AVX2_GEMV
  const int64_t segments = (w.k + segment_ - 1) / segment_, quads = segments * segment_ / 4;
  const int64_t cols = std::min(kGemmColumns, w.n - n0);
  const bool vector_unpack = cols == kGemmColumns && !(w.n & 1);
  std::vector<uint8_t> panel(quads * 128 + 64);
  std::vector<float> ws(segments * 32);
  int lane_column[32];
  for (int lane = 0; lane < 32; ++lane) lane_column[lane] = packed4_ ? quad_lane_column(lane) : byte_quad_lane_column(lane);
  const int offset = packed4_ ? nibble_offset_ : 128;
  for (int64_t q = 0; q < quads; ++q) {
    const int64_t k = 4 * q;
    uint8_t* out = panel.data() + 128 * q;
    if (!packed4_) {
      if (cols == kGemmColumns && k + 3 < w.k) {
        const uint8_t* r0 = w.codes + k * w.n + n0;
        const uint8_t* quad_rows[4] = {r0, r0 + w.n, r0 + 2 * w.n, r0 + 3 * w.n};
        unpack_byte_quad(quad_rows, out);
        continue;
      }
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t c = lane_column[lane];
        for (int64_t d = 0; d < 4; ++d) {
          const bool valid = k + d < w.k && c < cols;
          out[4 * lane + d] = static_cast<uint8_t>((valid ? weight_int_[code_at(w, k + d, n0 + c)] : 0) + 128);
        }
      }
      continue;
    }
    if (vector_unpack && k + 3 < w.k) {
      const uint8_t* r0 = w.codes + (k * w.n + n0) / 2;
      const uint8_t* quad_rows[4] = {r0, r0 + w.n / 2, r0 + w.n, r0 + 3 * w.n / 2};
      unpack_quad(nibble_lut_, quad_rows, out);
      continue;
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t c = quad_lane_column(lane);
      for (int64_t d = 0; d < 4; ++d) {
        const bool valid = k + d < w.k && c < cols;
        out[4 * lane + d] = valid ? nibble_lut_[code_at(w, k + d, n0 + c)] : static_cast<uint8_t>(nibble_offset_);
      }
    }
  }
  for (int64_t s = 0; s < segments; ++s) {
    const uint8_t* e = w.exponents + (s * segment_ / weight_.block_size) * w.n + n0;
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t c = lane_column[lane];
      ws[32 * s + lane] = c < cols ? weight_scale_[e[c]] : 0.0f;
    }
  }
  constexpr int64_t kRows = 8;  // 16 int32 + 16 float accumulators, 2 panel vectors: 32 zmm with the broadcast
  for (int64_t r0 = 0; r0 < m; r0 += kRows) {
    float* out = y + r0 * w.n + n0;
    const ActivationCodes* tile = rows + r0;
    const uint8_t* p = panel.data();
    switch (std::min(kRows, m - r0)) {
      case 8: vnni_tile<8>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      case 7: vnni_tile<7>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      case 6: vnni_tile<6>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      case 5: vnni_tile<5>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      case 4: vnni_tile<4>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      case 3: vnni_tile<3>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      case 2: vnni_tile<2>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
      default: vnni_tile<1>(p, ws.data(), tile, segments, segment_, offset, lane_column, out, w.n, cols); break;
    }
  }
#else
  (void)w, (void)rows, (void)m, (void)n0, (void)y;
#endif
}

void GemvKernel::multiply(const PackedWeight& w, const ActivationCodes* a, const float* x, float* y, int64_t n_begin,
                          int64_t n_end) const {
  int64_t n = n_begin;
#ifdef MXONNX_AVX2_GEMV
  const bool aligned = n_begin % kGemvColumns == 0 && !(packed4_ && (w.n & 1));
  if (vector_ && aligned) {
    const int bits = weight_.elem->bits;
    const int64_t vector_end = n + (n_end - n) / kGemvColumns * kGemvColumns;
    if (integer_ && vector_end > n) {
      if (packed4_) {
        const int highest = *std::max_element(nibble_lut_, nibble_lut_ + 16);
        const int pairs = std::max(1, 32767 / (2 * kMaxActCode * std::max(1, highest)));
        int_nibbles(nibble_lut_, nibble_offset_, pairs, w, *a, segment_, weight_.block_size, weight_scale_,
                    unit_exp_, n, vector_end, y);
      } else {
        int_bytes(bits, w, *a, segment_, weight_.block_size, weight_scale_, unit_exp_, n, vector_end, y);
      }
      n = vector_end;
    }
    for (; !integer_ && n + kGemvColumns <= n_end; n += kGemvColumns) {
      if (packed4_) {
        float_columns<FloatDecode::kNibbles>(nibble_value_, bits, weight_value_, w, x, weight_.block_size,
                                             weight_scale_, n, y);
      } else if (byte_int8_) {
        float_columns<FloatDecode::kSignedBytes>(nibble_value_, bits, weight_value_, w, x, weight_.block_size,
                                                 weight_scale_, n, y);
      } else {
        float_columns<FloatDecode::kGather>(nibble_value_, bits, weight_value_, w, x, weight_.block_size,
                                            weight_scale_, n, y);
      }
    }
  }
#endif
  if (n < n_end) {
    if (integer_) {
      integer_portable(w, *a, y, n, n_end);
    } else {
      float_portable(w, x, y, n, n_end);
    }
  }
}

}  // namespace mxonnx
