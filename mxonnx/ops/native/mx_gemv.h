// Matrix-vector products of the fused MXMatMul op (decode, M = 1) against a packed MX weight, free of onnxruntime
// types. Every row of X is handled on its own: y[N] = x[K] · W[K, N], W = MXDequantize(codes, exponents, axis 0).
//
// Integer route (activation format MXINT, weight values integer multiples of one unit that fit in int8: MXINT2..8,
// MXFP4): the row is quantized once into int8 codes a_k and one E8M0 exponent per activation block, and for every
// segment of S = min(activation block, weight block) rows of W (where both exponents are constant)
//
//     y[n] += (sum_{k in segment} a_k · w_kn) · 2^(Ea - 127) u_a · 2^(Ew[n] - 127) u_w
//
// with w_kn the integer weight codes (u_a, u_w the element units 2^(emin - mbits)). The integer sum is exact; its
// conversion to float is exact (|sum| <= 2^24 for every block size up to 1024); the two power-of-two scalings are
// exact barring underflow below 2^-149. So each segment term equals the exact sum of the reference products
// MXQDQ(x)_k · MXDequantize(W)_kn, and the result differs from MatMul(MXQDQ(x), MXDequantize(W)) only by the order
// of the float32 sums: |y - y_ref| <= (K + K / S) · 2^-24 · sum_k |xq_k w_kn| (first order).
//
// Float route (weight-only models, and activation formats or weights outside the integer route): the packed codes
// of W are decoded in registers to their values / unit, multiplied with x by FMA within each weight block, and the
// block sums scaled by 2^(Ew - 127) u_w (exact), so again only the summation order differs from the reference.
//
// Both routes read W's codes once per row and never write a decoded weight panel. AVX2 + FMA kernels are chosen at
// run time (__builtin_cpu_supports, capped by $MXONNX_NATIVE_ISA), and an AVX-512 VNNI GEMM for prefill; a portable
// C++ path computes the same sums elsewhere and on column tails. On the integer route every path gives the same
// bits: the segment sums are exact integers and the float operations on them happen in the same order.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "mx_format.h"
#include "mx_matmul.h"

namespace mxonnx {

// One row of activations as integer codes: codes zero-padded to a whole number of segments, and per segment the
// float scale 2^(Ea - 127) u_a (NaN when the activation block holds NaN/Inf) and the sum of its codes.
struct ActivationCodes {
  std::vector<int8_t> codes;
  std::vector<float> segment_scale;
  std::vector<int32_t> segment_sum;
};

constexpr int64_t kGemvColumns = 64;  // columns of W per vector step (and per unit of work)
constexpr int64_t kGemmColumns = 32;  // columns of W per panel of the integer GEMM

class GemvKernel {
 public:
  // act_format nullptr: X is taken as is (float route). act_prescale: the activation format's pre-scale p, which
  // quantize_row applies to the codes (its segment scales leave out f = 1 / p: the caller multiplies y by it).
  GemvKernel(const MxFormat& weight_format, const MxFormat* act_format, float act_prescale = 1.0f);

  bool integer_route() const { return integer_; }
  // Segment length S of the integer route (rows of W sharing both exponents); the float route uses the weight block.
  int64_t segment() const { return segment_; }

  // Integer route: the codes of one activation row x[K] (call once per row, share between column ranges).
  void quantize_row(const float* x, int64_t k, ActivationCodes& out) const;

  // Integer GEMM for many rows (prefill).
  // 4-bit weights (AVX2 or VNNI), MXINT8 weights on VNNI (AVX2 maddubs would saturate on 8-bit pairs).
  bool integer_gemm() const {
    return integer_ && vector_ && (packed4_ || (vnni_ && weight_.elem->bits == 8 && segment_ % 4 == 0));
  }
  // Y[m, n] for the columns [n0, n0 + kGemmColumns) of every row (Y row-major [m, w.n]; columns past w.n are not
  // written): the panel's codes are unpacked once into (w_k + offset, w_k+1 + offset) byte pairs and reused by
  // every row tile (4 rows x 32 columns of int16 maddubs accumulators). Same sums as multiply, so the same error bound.
  void gemm_panel(const PackedWeight& w, const ActivationCodes* rows, int64_t m, int64_t n0, float* y) const;

  // y[n] for n in [n_begin, n_end) of one row. Integer route: `a` from quantize_row; float route: `x` the row.
  void multiply(const PackedWeight& w, const ActivationCodes* a, const float* x, float* y, int64_t n_begin,
                int64_t n_end) const;

 private:
  void integer_portable(const PackedWeight& w, const ActivationCodes& a, float* y, int64_t n0, int64_t n1) const;
  void float_portable(const PackedWeight& w, const float* x, float* y, int64_t n0, int64_t n1) const;
  void gemm_panel_vnni(const PackedWeight& w, const ActivationCodes* rows, int64_t m, int64_t n0, float* y) const;
  int code_at(const PackedWeight& w, int64_t k, int64_t n) const;

  MxFormat weight_;
  const ElemFormat* act_elem_;  // nullptr: float route
  int64_t act_block_;
  float act_prescale_;
  bool packed4_;
  bool integer_;
  bool vector_;
  bool vnni_;  // AVX-512 VNNI available and allowed (isa_cap)
  int64_t segment_;
  int nibble_offset_;          // integer 4-bit route: u = value + offset >= 0 (maddubs takes unsigned weights)
  int8_t weight_int_[256];     // integer route: weight value / u_w per stored code (4-bit: per nibble)
  uint8_t nibble_lut_[32];     // integer 4-bit route: value + offset per nibble, twice (pshufb in both lanes)
  int8_t nibble_value_[32];    // float 4-bit route: value / u_w per nibble, twice (integers for every 4-bit format)
  float weight_value_[256];    // float route: value / unit per stored code (NaN codes stay NaN)
  float weight_scale_[256];    // 2^(e - 127) * unit per E8M0 code (NaN at 255)
  float unit_;                 // the weight unit of weight_value_
  int unit_exp_;               // u_w = 2^unit_exp_
  bool byte_int8_;             // 8-bit storage whose byte read as int8 is the value / unit (MXINT5..8)
};

}  // namespace mxonnx
