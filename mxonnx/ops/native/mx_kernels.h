// Array kernels of the MX ops, free of onnxruntime types so that they can be reused (fused MatMul, tests).
//
// A tensor is viewed as [outer, n, inner] around the block axis: blocks are `block` consecutive indices along n
// (the last one padded with zeros, which never changes a block maximum). Each kernel works on a half-open range
// of work units so that the caller can split it over threads.
#pragma once

#include <cstdint>

#include "mx_format.h"

namespace mxonnx {

struct BlockLayout {
  int64_t outer;
  int64_t n;
  int64_t inner;
  int64_t block;

  int64_t blocks_per_row() const { return (n + block - 1) / block; }
  // Work units of both kernels: one block row (outer index, block index) of `inner` columns.
  int64_t block_rows() const { return outer * blocks_per_row(); }
};

// MXQuantizeDequantize on block rows [begin, end):
//   E = clamp(floor(log2 max|x|) - emax, -127, 127) per block (all-zero block: -127; NaN/Inf in it: all NaN)
//   y = clamp(round_half_even(v / s) * s, +-max_norm) * 2^E,  v = x / 2^E,  s = 2^(max(floor(log2|v|), emin) - mbits)
// (OCP MX v1.0; Sharify et al. 2024, Eq. 1-2). Zeros come out as +0, as in mxonnx.formats.
// Pre-scale p (mxonnx.formats, arXiv 2601.09555): v = x * fl(2^-E p) and y = Q(v) * fl(2^E f), f = fl(1 / p);
// p = 1 multiplies by 1 (the plain OCP values bit for bit).
void quantize_dequantize(const ElemFormat& elem, const BlockLayout& layout, const float* x, float* y,
                         int64_t begin, int64_t end, float prescale = 1.0f);

// MXQuantizeDequantize of one row x[n] along its length, as integer codes (integer_codes formats only):
//   codes[i] = Q_elem(x_i / 2^E) / u  (exact integers, u = 2^(emin - mbits)),  scales[b] = 2^E_b * u
// so that codes[i] * scales[i / block] is bit for bit quantize_dequantize's y_i. A block holding NaN/Inf gets scale
// NaN and codes 0 (quantize_dequantize makes it all NaN). With a pre-scale p the codes are those of Q(x * fl(2^-E p))
// and the scales stay 2^E * u: the caller multiplies by f = fl(1 / p) once at the end.
void quantize_codes(const ElemFormat& elem, const float* x, int64_t n, int64_t block, int8_t* codes, float* scales,
                    float prescale = 1.0f);

// Decoding tables of one format: element value per stored code byte (masked to d bits; MXFP patterns above
// max_norm are NaN), the two values of a byte of packed 4-bit codes (low nibble first) and 2^(c - 127) per
// E8M0 code c (NaN at 255), times f = fl(1 / p) for a pre-scale p (MXDequantize's values element * fl(2^E f)).
struct DequantizeTables {
  float element[256];
  float nibble_pair[256][2];
  float scale[256];
};
DequantizeTables make_dequantize_tables(const ElemFormat& elem, float prescale = 1.0f);

// MXDequantize on block rows [begin, end): w = element(code) * 2^(exponent - 127), exponents of shape
// [outer, blocks_per_row, inner]. 4-bit codes are packed two per byte, low nibble first, over the flat index.
void dequantize(const DequantizeTables& tables, bool packed4, const BlockLayout& layout, const uint8_t* codes,
                const uint8_t* exponents, float* w, int64_t begin, int64_t end);

}  // namespace mxonnx
