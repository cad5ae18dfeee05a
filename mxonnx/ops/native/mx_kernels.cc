// MX kernels: the arithmetic of mxonnx/formats.py (_e8m0_codes, _round_to_grid, element_values) in float32
// bit operations, written as plain loops over contiguous memory so that the compiler vectorises them.
#include "mx_kernels.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace mxonnx {

namespace {

constexpr uint32_t kAbsMask = 0x7fffffffu;
constexpr uint32_t kExponentMask = 0x7f800000u;
constexpr int64_t kColumnChunk = 256;  // columns of a strided block row handled at once (stack buffers)
const float kNaN = std::numeric_limits<float>::quiet_NaN();

// The element loops get an AVX2 clone picked at load time (QDQ 2-3x faster than the SSE2 baseline on x86-64).
// MXONNX_NO_VECTOR_CLONES (the sanitizer build) keeps only the baseline, so that the tests cover it too.
#if defined(__x86_64__) && !defined(__clang__) && !defined(MXONNX_NO_VECTOR_CLONES)
#define MXONNX_VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MXONNX_VECTOR_CLONES
#endif

// Constants of Q_elem for one element format.
struct Grid {
  float min_norm;  // 2^emin
  float rounder;   // 1.5 * 2^(23 - mbits): times 2^e, adding and subtracting it rounds to a multiple of 2^(e - mbits)
  float max_norm;

  explicit Grid(const ElemFormat& elem)
      : min_norm(pow2f(elem.emin)), rounder(1.5f * pow2f(23 - elem.mbits)), max_norm(elem.max_norm) {}
};

// Q_elem(v) = clamp(round_half_even(v / s) * s, +-max_norm), s = 2^(max(floor(log2|v|), emin) - mbits).
// With C = 1.5 * 2^23 * s, v + C lies in [2^23 s, 2^24 s) where the float32 spacing is s, so the addition rounds
// v to a multiple of s half to even and the subtraction is exact (|v| < 2^(mbits+1) s). NaN stays NaN.
inline float round_to_grid(float v, const Grid& grid) {
  float c = bits_float(float_bits(v) & kExponentMask);  // 2^floor(log2|v|); 0 below 2^-126
  c = c < grid.min_norm ? grid.min_norm : c;
  c *= grid.rounder;
  v = (v + c) - c;
  v = v < -grid.max_norm ? -grid.max_norm : v;
  return v > grid.max_norm ? grid.max_norm : v;
}

// The pre-scale p of a format and f = fl(1 / p) (1 and 1: the plain OCP rule).
struct Prescale {
  float p;
  float f;

  explicit Prescale(float prescale) : p(prescale), f(1.0f / prescale) {}
};

// (fl(2^-E p), fl(2^E f)) of a block from the bit pattern of its max|x|: E + 127 = max(F - emax, 0) for the exponent
// field F (exact floor(log2) for normals; zero and subnormal maxima clamp to E = -127 either way). F = 255 (NaN/Inf):
// NaN. `value_factor` false leaves f out of the scale (quantize_codes: the caller applies it).
struct BlockScale {
  float inverse;
  float scale;
};

inline BlockScale block_scale(uint32_t absmax_bits, int emax, const Prescale& prescale, bool value_factor = true) {
  const int field = static_cast<int>(absmax_bits >> 23);
  if (field == 255) return {kNaN, kNaN};
  const int code = std::max(field - emax, 0);
  return {pow2f(127 - code) * prescale.p, pow2f(code - 127) * (value_factor ? prescale.f : 1.0f)};
}

// One contiguous block of `len` elements (block axis last).
MXONNX_VECTOR_CLONES void qdq_contiguous_block(const Grid& grid, int emax, const Prescale& prescale, const float* x,
                                               float* y, int64_t len) {
  uint32_t absmax = 0;
  for (int64_t i = 0; i < len; ++i) absmax = std::max(absmax, float_bits(x[i]) & kAbsMask);
  const BlockScale s = block_scale(absmax, emax, prescale);
  for (int64_t i = 0; i < len; ++i) y[i] = round_to_grid(x[i] * s.inverse, grid) * s.scale;
}

// `rows` rows of `cols` columns with row stride `stride`: one block per column (block axis not last).
MXONNX_VECTOR_CLONES void qdq_strided_blocks(const Grid& grid, int emax, const Prescale& prescale, const float* x,
                                             float* y, int64_t rows, int64_t cols, int64_t stride) {
  uint32_t absmax[kColumnChunk];
  float inverse[kColumnChunk], scale[kColumnChunk];
  std::fill(absmax, absmax + cols, 0u);
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * stride;
    for (int64_t c = 0; c < cols; ++c) absmax[c] = std::max(absmax[c], float_bits(row[c]) & kAbsMask);
  }
  for (int64_t c = 0; c < cols; ++c) {
    const BlockScale s = block_scale(absmax[c], emax, prescale);
    inverse[c] = s.inverse;
    scale[c] = s.scale;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* in = x + r * stride;
    float* out = y + r * stride;
    for (int64_t c = 0; c < cols; ++c) out[c] = round_to_grid(in[c] * inverse[c], grid) * scale[c];
  }
}

// Element values of the `count` codes from flat index `first` (4-bit codes: two per byte, low nibble first).
MXONNX_VECTOR_CLONES void decode_elements(const DequantizeTables& tables, bool packed4, const uint8_t* codes,
                                          int64_t first, int64_t count, float* out) {
  if (!packed4) {
    for (int64_t j = 0; j < count; ++j) out[j] = tables.element[codes[first + j]];
    return;
  }
  int64_t j = 0;
  if (first & 1) out[j++] = tables.element[codes[first >> 1] >> 4];
  for (; j + 1 < count; j += 2) std::memcpy(out + j, tables.nibble_pair[codes[(first + j) >> 1]], 2 * sizeof(float));
  if (j < count) out[j] = tables.element[codes[(first + j) >> 1] & 0xF];
}

// One contiguous block as integer codes (see quantize_codes); returns the block's scale.
MXONNX_VECTOR_CLONES float codes_contiguous_block(const Grid& grid, int emax, const Prescale& prescale, float unit,
                                                  const float* x, int8_t* codes, int64_t len) {
  uint32_t absmax = 0;
  for (int64_t i = 0; i < len; ++i) absmax = std::max(absmax, float_bits(x[i]) & kAbsMask);
  const BlockScale s = block_scale(absmax, emax, prescale, false);
  if (s.scale != s.scale) {
    std::fill(codes, codes + len, int8_t{0});
    return kNaN;
  }
  const float inverse_unit = 1.0f / unit;  // a power of two: exact
  for (int64_t i = 0; i < len; ++i) {
    codes[i] = static_cast<int8_t>(static_cast<int>(round_to_grid(x[i] * s.inverse, grid) * inverse_unit));
  }
  return s.scale * unit;
}

}  // namespace

void quantize_codes(const ElemFormat& elem, const float* x, int64_t n, int64_t block, int8_t* codes, float* scales,
                    float prescale) {
  const Grid grid(elem);
  const Prescale pre(prescale);
  const float unit = pow2f(elem.emin - elem.mbits);
  for (int64_t first = 0, b = 0; first < n; first += block, ++b) {
    scales[b] = codes_contiguous_block(grid, elem.emax, pre, unit, x + first, codes + first,
                                       std::min(block, n - first));
  }
}

void quantize_dequantize(const ElemFormat& elem, const BlockLayout& layout, const float* x, float* y,
                         int64_t begin, int64_t end, float prescale) {
  const Grid grid(elem);
  const Prescale pre(prescale);
  const int64_t nb = layout.blocks_per_row();
  for (int64_t t = begin; t < end; ++t) {
    const int64_t o = t / nb, first = (t % nb) * layout.block;
    const int64_t len = std::min(layout.block, layout.n - first);
    const int64_t offset = (o * layout.n + first) * layout.inner;
    if (layout.inner == 1) {
      qdq_contiguous_block(grid, elem.emax, pre, x + offset, y + offset, len);
      continue;
    }
    for (int64_t c = 0; c < layout.inner; c += kColumnChunk) {
      const int64_t cols = std::min(kColumnChunk, layout.inner - c);
      qdq_strided_blocks(grid, elem.emax, pre, x + offset + c, y + offset + c, len, cols, layout.inner);
    }
  }
}

DequantizeTables make_dequantize_tables(const ElemFormat& elem, float prescale) {
  DequantizeTables tables;
  const float factor = Prescale(prescale).f;
  const int d = elem.bits, mbits = elem.mbits;
  for (int byte = 0; byte < 256; ++byte) {
    const int code = byte & ((1 << d) - 1);
    float value;
    if (elem.integer_codes) {
      const int k = code >= (1 << (d - 1)) ? code - (1 << d) : code;
      value = static_cast<float>(k) * pow2f(-mbits);
    } else {
      const int magnitude = code & ((1 << (d - 1)) - 1);
      const int field = magnitude >> mbits, mantissa = magnitude & ((1 << mbits) - 1);
      const int exponent = std::max(field, 1) + elem.emin - 1;  // field 0: subnormal, exponent of field 1
      value = static_cast<float>((field > 0 ? (1 << mbits) : 0) + mantissa) * pow2f(exponent - mbits);
      if (value > elem.max_norm) value = kNaN;  // Inf/NaN encodings
      if (code >> (d - 1)) value = -value;
    }
    tables.element[byte] = value;
    tables.scale[byte] = byte == 255 ? kNaN : pow2f(byte - 127) * factor;
  }
  for (int byte = 0; byte < 256; ++byte) {
    tables.nibble_pair[byte][0] = tables.element[byte & 0xF];
    tables.nibble_pair[byte][1] = tables.element[byte >> 4];
  }
  return tables;
}

MXONNX_VECTOR_CLONES void dequantize(const DequantizeTables& tables, bool packed4, const BlockLayout& layout,
                                     const uint8_t* codes, const uint8_t* exponents, float* w, int64_t begin,
                                     int64_t end) {
  const int64_t nb = layout.blocks_per_row(), inner = layout.inner;
  float scale[kColumnChunk];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t o = t / nb, first = (t % nb) * layout.block;
    const int64_t len = std::min(layout.block, layout.n - first);
    const int64_t offset = (o * layout.n + first) * inner;
    const uint8_t* e = exponents + t * inner;
    if (inner == 1) {
      decode_elements(tables, packed4, codes, offset, len, w + offset);
      const float s = tables.scale[*e];
      for (int64_t i = 0; i < len; ++i) w[offset + i] *= s;
      continue;
    }
    for (int64_t c = 0; c < inner; c += kColumnChunk) {
      const int64_t cols = std::min(kColumnChunk, inner - c);
      for (int64_t j = 0; j < cols; ++j) scale[j] = tables.scale[e[c + j]];
      for (int64_t r = 0; r < len; ++r) {
        float* out = w + offset + r * inner + c;
        decode_elements(tables, packed4, codes, offset + r * inner + c, cols, out);
        for (int64_t j = 0; j < cols; ++j) out[j] *= scale[j];
      }
    }
  }
}

}  // namespace mxonnx
