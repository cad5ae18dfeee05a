// MX element formats: the C++ mirror of ELEMENT_FORMATS in mxonnx/formats.py (the normative reference).
//
// One row per element type; every kernel consumes only a row and a block size, with no per-format branches.
// MXINTd is the minifloat grid with emin = emax = 0 and d - 2 mantissa bits (values k / 2^(d-2)).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

namespace mxonnx {

// Storage of one element code inside an ONNX tensor (MXDequantize's `codes` input).
enum class CodeStorage { kInt4, kInt8, kUInt4, kUInt8 };

struct ElemFormat {
  const char* family;  // format name before "-{b}"
  int bits;            // d = 1 + ebits + mbits
  int ebits;
  int mbits;           // trailing mantissa bits
  int emax;            // unbiased exponent of the largest normal
  int emin;            // unbiased exponent of the smallest normal
  float max_norm;      // largest finite value (E4M3: 448, its all-ones pattern is NaN)
  bool integer_codes;  // codes are two's-complement k (MXINT) rather than sign|exponent|mantissa (MXFP)
  CodeStorage storage;
};

inline constexpr ElemFormat kElemFormats[] = {
    {"mxint2", 2, 1, 0, 0, 0, 1.0f, true, CodeStorage::kInt4},
    {"mxint3", 3, 1, 1, 0, 0, 1.5f, true, CodeStorage::kInt4},
    {"mxint4", 4, 1, 2, 0, 0, 1.75f, true, CodeStorage::kInt4},
    {"mxint5", 5, 1, 3, 0, 0, 1.875f, true, CodeStorage::kInt8},
    {"mxint6", 6, 1, 4, 0, 0, 1.9375f, true, CodeStorage::kInt8},
    {"mxint7", 7, 1, 5, 0, 0, 1.96875f, true, CodeStorage::kInt8},
    {"mxint8", 8, 1, 6, 0, 0, 1.984375f, true, CodeStorage::kInt8},
    {"mxfp8e4m3", 8, 4, 3, 8, -6, 448.0f, false, CodeStorage::kUInt8},
    {"mxfp8e5m2", 8, 5, 2, 15, -14, 57344.0f, false, CodeStorage::kUInt8},
    {"mxfp6e3m2", 6, 3, 2, 4, -2, 28.0f, false, CodeStorage::kUInt8},
    {"mxfp6e2m3", 6, 2, 3, 2, 0, 7.5f, false, CodeStorage::kUInt8},
    {"mxfp4", 4, 2, 1, 2, 0, 6.0f, false, CodeStorage::kUInt4},
};

struct MxFormat {
  const ElemFormat* elem;
  int64_t block_size;  // a power of two in 2..1024
};

// Parses "mxint4-128", "MXFP8E4M3-32", ...; throws std::invalid_argument with one line naming the valid forms.
MxFormat parse_mx_format(const std::string& name);

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// 2^k as a float for k in -149..127 (exact; subnormal below -126).
inline float pow2f(int k) {
  return k >= -126 ? bits_float(static_cast<uint32_t>(k + 127) << 23) : bits_float(1u << (k + 149));
}

// Highest instruction set the kernels may use, read when a kernel is created: $MXONNX_NATIVE_ISA = "portable",
// "avx2" or "avx512vnni" (unset: the best the CPU has). Tests use it to run every path on one machine.
enum class Isa { kPortable = 0, kAvx2 = 1, kAvx512Vnni = 2 };
Isa isa_cap();

}  // namespace mxonnx
