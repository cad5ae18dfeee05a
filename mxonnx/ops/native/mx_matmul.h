// The GEMM of the fused MXMatMul op against a packed MX weight, free of onnxruntime types.
//
//   Y[M, N] = X[M, K] · W[K, N],   W = MXDequantize(codes, exponents, weight format, axis 0)
//
// W is never materialised: each work item decodes panels of W (kPanelRows x kPanelColumns) into a float scratch
// buffer, bit for bit the values MXDequantize would write, and multiplies them with a register-blocked kernel
// (6 rows x 16 columns of FMA accumulators on AVX2+FMA, plain loops otherwise). Only the summation order differs
// from MatMul(X, MXDequantize(...)): every output is a sequential sum over k.
#pragma once

#include <cstdint>

#include "mx_format.h"
#include "mx_kernels.h"

namespace mxonnx {

// MXDequantize's inputs for a [k, n] weight along axis 0: codes row-major (4-bit codes two per byte over the flat
// index, low nibble first), exponents [ceil(k / block), n] E8M0 bytes.
struct PackedWeight {
  const uint8_t* codes;
  const uint8_t* exponents;
  int64_t k;
  int64_t n;
};

constexpr int64_t kPanelColumns = 64;  // columns of W per work item (4 strips of 16)
constexpr int64_t kPanelRows = 128;    // rows of W decoded at once: 32 KiB of floats, L1-sized
constexpr int64_t kTileRows = 96;      // rows of X per work item (a multiple of the 6-row micro-kernel)

class MatMulKernel {
 public:
  explicit MatMulKernel(const MxFormat& weight_format);

  // Work items: a grid of row tiles (kTileRows rows of X) by column panels (kPanelColumns columns of W), so that
  // prefill (large M) splits over rows and columns and decode (M = 1) over columns.
  static int64_t row_tiles(int64_t m) { return (m + kTileRows - 1) / kTileRows; }
  static int64_t column_panels(int64_t n) { return (n + kPanelColumns - 1) / kPanelColumns; }

  // Y rows [m_begin, m_end), columns of panel `panel`, of Y[M, N] = X[M, K] · W (X and Y row-major).
  void multiply_tile(const PackedWeight& w, const float* x, float* y, int64_t m_begin, int64_t m_end,
                     int64_t panel) const;

 private:
  // How a row of 64 codes becomes floats on the vector path (value = integer * 2^(emin - mbits) for the first two).
  enum class Decode { kNibbleTable, kSignedBits, kGather };

  void decode_panel(const PackedWeight& w, int64_t k0, int64_t rows, int64_t n0, int64_t cols, float* panel) const;

  MxFormat format_;
  bool packed4_;
  bool vector_;        // AVX2 + FMA available (and not compiled out)
  Decode decode_;
  float unit_;         // 2^(emin - mbits) for the integer decodes, else 1
  float value_[256];   // element value / unit_ per stored code byte (4-bit: per nibble)
  float scale_[256];   // 2^(c - 127) * unit_ per E8M0 code c (NaN at 255)
  int8_t nibble_[16];  // integer value per 4-bit code (kNibbleTable)
};

}  // namespace mxonnx
