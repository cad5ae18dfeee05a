// GEMM against packed MX weights: panel decoding (table, nibble shuffle, sign extension or gather) and
// register-blocked multiply micro-kernels. See mx_matmul.h for the contract.
#include "mx_matmul.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>

#if defined(__x86_64__) && !defined(__clang__) && !defined(MXONNX_NO_VECTOR_CLONES)
#define MXONNX_AVX2_GEMM 1
#include <immintrin.h>
#endif

namespace mxonnx {

namespace {

constexpr int64_t kStrip = 16;                            // columns per micro-kernel strip
constexpr int64_t kStrips = kPanelColumns / kStrip;
constexpr int64_t kStripStride = kPanelRows * kStrip;     // a decoded panel is [kStrips][kPanelRows][kStrip]
constexpr int64_t kPanelFloats = kStrips * kStripStride;
constexpr int64_t kMicroRows = 6;

// Where column j (0..63) of panel row r goes.
inline int64_t panel_index(int64_t r, int64_t j) { return (j / kStrip) * kStripStride + r * kStrip + j % kStrip; }

// C[R][16 S] (row stride kPanelColumns) += X[R][kc] (row stride ldx) · B, B the S strips of a decoded panel.
// Every output is a sequential sum over k, whatever R and S are.
struct PortableMicroKernel {
  template <int R, int S>
  static void run(const float* x, int64_t ldx, const float* b, int64_t kc, float* c) {
    for (int64_t k = 0; k < kc; ++k) {
      for (int r = 0; r < R; ++r) {
        const float a = x[r * ldx + k];
        for (int s = 0; s < S; ++s) {
          const float* bk = b + s * kStripStride + k * kStrip;
          float* cr = c + r * kPanelColumns + s * kStrip;
          for (int j = 0; j < kStrip; ++j) cr[j] += a * bk[j];
        }
      }
    }
  }
};

#ifdef MXONNX_AVX2_GEMM
struct Avx2MicroKernel {
  // 2 S accumulators of 8 floats per row, kept in registers over the whole panel (R = 6, S = 1: 12 of 16 ymm).
  template <int R, int S>
  __attribute__((target("avx2,fma"))) static void run(const float* x, int64_t ldx, const float* b, int64_t kc,
                                                      float* c) {
    constexpr int Q = 2 * S;
    __m256 acc[R][Q];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int q = 0; q < Q; ++q) acc[r][q] = _mm256_loadu_ps(c + r * kPanelColumns + 8 * q);
    for (int64_t k = 0; k < kc; ++k) {
      __m256 bk[Q];
#pragma GCC unroll 16
      for (int q = 0; q < Q; ++q) bk[q] = _mm256_loadu_ps(b + (q / 2) * kStripStride + k * kStrip + 8 * (q % 2));
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(x + r * ldx + k);
#pragma GCC unroll 16
        for (int q = 0; q < Q; ++q) acc[r][q] = _mm256_fmadd_ps(a, bk[q], acc[r][q]);
      }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int q = 0; q < Q; ++q) _mm256_storeu_ps(c + r * kPanelColumns + 8 * q, acc[r][q]);
  }
};

// Eight integers (low 8 bytes of `ints`, signed) times the eight scales -> out.
__attribute__((target("avx2,fma"))) inline void store_scaled(__m128i ints, const float* scale, float* out) {
  const __m256 values = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(ints));
  _mm256_storeu_ps(out, _mm256_mul_ps(values, _mm256_loadu_ps(scale)));
}

// 64 packed 4-bit codes (32 bytes, low nibble first) -> integer table lookup (pshufb) -> scaled floats.
__attribute__((target("avx2,fma"))) void decode_nibbles(const int8_t* table, const uint8_t* src, const float* scale,
                                                         float* panel, int64_t r) {
  const __m128i lut = _mm_loadu_si128(reinterpret_cast<const __m128i*>(table));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int h = 0; h < 2; ++h) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * h));
    const __m128i lo = _mm_and_si128(bytes, low4), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low4);
    const __m128i first = _mm_shuffle_epi8(lut, _mm_unpacklo_epi8(lo, hi));
    const __m128i second = _mm_shuffle_epi8(lut, _mm_unpackhi_epi8(lo, hi));
    const int64_t j = 32 * h;
    store_scaled(first, scale + j, panel + panel_index(r, j));
    store_scaled(_mm_srli_si128(first, 8), scale + j + 8, panel + panel_index(r, j + 8));
    store_scaled(second, scale + j + 16, panel + panel_index(r, j + 16));
    store_scaled(_mm_srli_si128(second, 8), scale + j + 24, panel + panel_index(r, j + 24));
  }
}

// 64 byte codes holding a d-bit two's-complement integer in their low bits (MXINT5..8) -> scaled floats.
__attribute__((target("avx2,fma"))) void decode_signed_bits(int bits, const uint8_t* src, const float* scale,
                                                             float* panel, int64_t r) {
  const __m128i shift = _mm_cvtsi32_si128(32 - bits);
  for (int64_t j = 0; j < kPanelColumns; j += 8) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
    v = _mm256_sra_epi32(_mm256_sll_epi32(v, shift), shift);
    _mm256_storeu_ps(panel + panel_index(r, j), _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_loadu_ps(scale + j)));
  }
}

// 64 byte codes (MXFP6/MXFP8 bit patterns) -> 256-entry value table (gather) -> scaled floats.
__attribute__((target("avx2,fma"))) void decode_gather(const float* table, const uint8_t* src, const float* scale,
                                                        float* panel, int64_t r) {
  for (int64_t j = 0; j < kPanelColumns; j += 8) {
    const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + j)));
    const __m256 v = _mm256_i32gather_ps(table, idx, 4);
    _mm256_storeu_ps(panel + panel_index(r, j), _mm256_mul_ps(v, _mm256_loadu_ps(scale + j)));
  }
}

bool cpu_has_avx2_fma() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool cpu_has_avx2_fma() { return false; }
#endif

// acc[rows][kPanelColumns] += X[rows][kc] · panel: 6-row micro-kernels over each strip, the remaining rows with
// wider strips (1 row: the 4 strips at once, 8 independent accumulators; 2 rows: 2 strips).
template <class Micro>
void multiply_panel(const float* x, int64_t ldx, int64_t rows, const float* panel, int64_t kc, float* acc) {
  int64_t r = 0;
  auto strips = [&](auto micro, int64_t width) {
    for (int64_t s = 0; s < kStrips; s += width) micro(x + r * ldx, ldx, panel + s * kStripStride, kc,
                                                      acc + r * kPanelColumns + s * kStrip);
  };
  for (; r + kMicroRows <= rows; r += kMicroRows) strips(Micro::template run<6, 1>, 1);
  switch (rows - r) {
    case 5: strips(Micro::template run<5, 1>, 1); break;
    case 4: strips(Micro::template run<4, 1>, 1); break;
    case 3: strips(Micro::template run<3, 1>, 1); break;
    case 2: strips(Micro::template run<2, 2>, 2); break;
    case 1: strips(Micro::template run<1, 4>, 4); break;
    default: break;
  }
}

}  // namespace

MatMulKernel::MatMulKernel(const MxFormat& weight_format)
    : format_(weight_format),
      packed4_(weight_format.elem->storage == CodeStorage::kInt4 || weight_format.elem->storage == CodeStorage::kUInt4),
      vector_(cpu_has_avx2_fma() && isa_cap() >= Isa::kAvx2) {
  const ElemFormat& elem = *format_.elem;
  const DequantizeTables tables = make_dequantize_tables(elem);
  decode_ = packed4_ ? Decode::kNibbleTable : elem.integer_codes ? Decode::kSignedBits : Decode::kGather;
  unit_ = decode_ == Decode::kGather ? 1.0f : pow2f(elem.emin - elem.mbits);
  for (int c = 0; c < 256; ++c) {
    value_[c] = tables.element[c] / unit_;  // exact: a power-of-two division of a value on the element grid
    scale_[c] = tables.scale[c] * unit_;    // exact: 2^(c - 127 + emin - mbits) >= 2^-133
  }
  for (int c = 0; c < 16; ++c) {
    nibble_[c] = static_cast<int8_t>(value_[c]);
    if (packed4_ && static_cast<float>(nibble_[c]) != value_[c]) {
      throw std::logic_error(std::string("MXMatMul: 4-bit values of ") + elem.family + " are not small integers");
    }
  }
}

// Panel rows [k0, k0 + rows) x columns [n0, n0 + cols) of W, decoded into `panel` (columns >= cols are zero).
// value_[code] * scale_[exponent] equals MXDequantize's element * 2^(exponent - 127) bit for bit.
void MatMulKernel::decode_panel(const PackedWeight& w, int64_t k0, int64_t rows, int64_t n0, int64_t cols,
                                float* panel) const {
  float scale[kPanelColumns] = {};
  int64_t scale_block = -1;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t k = k0 + r, block = k / format_.block_size, flat = k * w.n + n0;
    if (block != scale_block) {
      const uint8_t* e = w.exponents + block * w.n + n0;
      for (int64_t j = 0; j < cols; ++j) scale[j] = scale_[e[j]];
      scale_block = block;
    }
#ifdef MXONNX_AVX2_GEMM
    if (vector_ && cols == kPanelColumns && !(packed4_ && (flat & 1))) {
      switch (decode_) {
        case Decode::kNibbleTable: decode_nibbles(nibble_, w.codes + flat / 2, scale, panel, r); continue;
        case Decode::kSignedBits: decode_signed_bits(format_.elem->bits, w.codes + flat, scale, panel, r); continue;
        case Decode::kGather: decode_gather(value_, w.codes + flat, scale, panel, r); continue;
      }
    }
#endif
    for (int64_t j = 0; j < kPanelColumns; ++j) {
      float v = 0.0f;
      if (j < cols) {
        const int64_t i = flat + j;
        const int code = packed4_ ? (w.codes[i >> 1] >> (4 * (i & 1))) & 0xF : w.codes[i];
        v = value_[code] * scale[j];
      }
      panel[panel_index(r, j)] = v;
    }
  }
}

void MatMulKernel::multiply_tile(const PackedWeight& w, const float* x, float* y, int64_t m_begin, int64_t m_end,
                                 int64_t panel) const {
  const int64_t rows = m_end - m_begin, n0 = panel * kPanelColumns;
  const int64_t cols = std::min(kPanelColumns, w.n - n0);
  std::unique_ptr<float[]> scratch(new float[kPanelFloats + rows * kPanelColumns]);
  float* decoded = scratch.get();
  float* acc = decoded + kPanelFloats;
  std::fill(acc, acc + rows * kPanelColumns, 0.0f);
  for (int64_t k0 = 0; k0 < w.k; k0 += kPanelRows) {
    const int64_t kc = std::min(kPanelRows, w.k - k0);
    decode_panel(w, k0, kc, n0, cols, decoded);
    const float* xk = x + m_begin * w.k + k0;
#ifdef MXONNX_AVX2_GEMM
    if (vector_) {
      multiply_panel<Avx2MicroKernel>(xk, w.k, rows, decoded, kc, acc);
      continue;
    }
#endif
    multiply_panel<PortableMicroKernel>(xk, w.k, rows, decoded, kc, acc);
  }
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(y + (m_begin + r) * w.n + n0, acc + r * kPanelColumns, cols * sizeof(float));
  }
}

}  // namespace mxonnx
