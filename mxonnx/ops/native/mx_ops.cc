// onnxruntime CPU kernels of the com.mxonnx domain (version 1: MXQuantizeDequantize, MXDequantize, MXMatMul,
// BlockHadamard, GroupAttention) and the library entry point RegisterCustomOps.
//
// Built against headers only (ORT_API_MANUAL_INIT): every onnxruntime call goes through the OrtApi table handed
// to RegisterCustomOps, so the library links no onnxruntime. Kernels return an OrtStatus for every failure (bad
// attribute, type or shape): no exception crosses into onnxruntime. Work is split over onnxruntime's intra-op
// thread pool (KernelContext_ParallelFor), so a session's thread setting bounds the kernels too.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#undef ORT_API_MANUAL_INIT

#include <algorithm>
#include <cctype>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "mx_attention.h"
#include "mx_format.h"
#include "mx_gemv.h"
#include "mx_kernels.h"
#include "mx_matmul.h"

namespace mxonnx {
namespace {

constexpr const char* kDomain = "com.mxonnx";
// INT4/UINT4 postdate the 1.17 headers; the values are ONNX TensorProto's, which onnxruntime shares.
constexpr auto kTensorUInt4 = static_cast<ONNXTensorElementDataType>(21);
constexpr auto kTensorInt4 = static_cast<ONNXTensorElementDataType>(22);
constexpr int64_t kElementsPerTask = 1 << 15;  // smallest share of work worth handing to another thread
constexpr int64_t kGemvMaxRows = 8;            // MXMatMul with at most this many rows of X: row by row (mx_gemv.h)
constexpr int64_t kGemvSplits = 4;             // column ranges per row of a GEMV (tasks for the thread pool)

[[noreturn]] void invalid(const std::string& message) {
  throw Ort::Exception(std::string(message), ORT_INVALID_ARGUMENT);
}

struct CodeType {
  ONNXTensorElementDataType onnx;
  const char* name;
};

CodeType code_type(CodeStorage storage) {
  switch (storage) {
    case CodeStorage::kInt4: return {kTensorInt4, "int4"};
    case CodeStorage::kInt8: return {ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8, "int8"};
    case CodeStorage::kUInt4: return {kTensorUInt4, "uint4"};
    case CodeStorage::kUInt8: break;
  }
  return {ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, "uint8"};
}

// Runs `body`, turning any exception into an OrtStatus (nullptr on success).
template <typename Body>
OrtStatusPtr guarded(Body&& body) {
  try {
    body();
    return nullptr;
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "unknown error in an MX kernel");
  }
}

// An attribute read by `get` (an OrtApi KernelInfoGetAttribute_* entry), `fallback` when absent.
template <typename T, typename Getter>
T attribute_or(const OrtKernelInfo* info, const char* name, T fallback, Getter get) {
  T value{};
  if (OrtStatus* status = get(info, name, &value)) {
    Ort::GetApi().ReleaseStatus(status);
    return fallback;
  }
  return value;
}

int64_t int_attribute_or(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  return attribute_or<int64_t>(info, name, fallback, Ort::GetApi().KernelInfoGetAttribute_int64);
}

float float_attribute_or(const OrtKernelInfo* info, const char* name, float fallback) {
  return attribute_or<float>(info, name, fallback, Ort::GetApi().KernelInfoGetAttribute_float);
}

// A pre-scale attribute (mxonnx.formats: p in (0.5, 1], default 1).
float prescale_attribute(const OrtKernelInfo* info, const char* op, const char* name) {
  const float p = float_attribute_or(info, name, 1.0f);
  if (!(p > 0.5f && p <= 1.0f)) invalid(std::string(op) + ": " + name + " " + std::to_string(p) + " is outside (0.5, 1]");
  return p;
}

MxFormat format_attribute(const OrtKernelInfo* info, const char* op, const char* attribute = "format") {
  std::string name;
  try {
    name = Ort::ConstKernelInfo(info).GetAttribute<std::string>(attribute);
  } catch (const Ort::Exception&) {
    invalid(std::string(op) + ": missing string attribute '" + attribute + "'");
  }
  try {
    return parse_mx_format(name);
  } catch (const std::invalid_argument& e) {
    invalid(std::string(op) + ": " + e.what());
  }
}

// An optional format attribute: absent or "none" (any case) -> nullptr.
std::unique_ptr<MxFormat> optional_format_attribute(const OrtKernelInfo* info, const char* op, const char* attribute) {
  std::string name;
  try {
    name = Ort::ConstKernelInfo(info).GetAttribute<std::string>(attribute);
  } catch (const Ort::Exception&) {
    return nullptr;
  }
  std::string key = name;
  std::transform(key.begin(), key.end(), key.begin(), [](unsigned char c) { return std::tolower(c); });
  if (key == "none") return nullptr;
  return std::make_unique<MxFormat>(format_attribute(info, op, attribute));
}

// `shape` viewed as [outer, n, inner] around `axis` (negative counts from the end).
BlockLayout block_layout(const std::vector<int64_t>& shape, int64_t axis, int64_t block, const char* op) {
  const auto rank = static_cast<int64_t>(shape.size());
  if (axis < -rank || axis >= rank) {
    invalid(std::string(op) + ": axis " + std::to_string(axis) + " is out of range for rank " + std::to_string(rank));
  }
  if (axis < 0) axis += rank;
  BlockLayout layout{1, shape[axis], 1, block};
  for (int64_t i = 0; i < axis; ++i) layout.outer *= shape[i];
  for (int64_t i = axis + 1; i < rank; ++i) layout.inner *= shape[i];
  return layout;
}

// Calls work(begin, end) over [0, units), split into tasks of about kElementsPerTask elements on the intra-op pool.
template <typename Work>
void parallel_for(OrtKernelContext* context, int64_t units, int64_t elements_per_unit, Work& work) {
  const int64_t per_task = std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, elements_per_unit));
  const int64_t tasks = (units + per_task - 1) / per_task;
  if (tasks <= 1) {
    work(0, units);
    return;
  }
  struct Split {
    Work* work;
    int64_t units, per_task;
  } split{&work, units, per_task};
  auto run_task = [](void* data, size_t task) {
    const auto* s = static_cast<const Split*>(data);
    const int64_t begin = static_cast<int64_t>(task) * s->per_task;
    (*s->work)(begin, std::min(begin + s->per_task, s->units));
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(context, run_task, static_cast<size_t>(tasks), 0, &split));
}

// The element types of MXDequantize's inputs (also MXMatMul's codes and exponents).
void check_weight_types(const MxFormat& format, const Ort::TensorTypeAndShapeInfo& codes,
                        const Ort::TensorTypeAndShapeInfo& exponents, const char* op) {
  const CodeType expected = code_type(format.elem->storage);
  if (codes.GetElementType() != expected.onnx) {
    invalid(std::string(op) + ": codes of " + format.elem->family + " must be " + expected.name);
  }
  if (exponents.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    invalid(std::string(op) + ": exponents must be uint8");
  }
}

// MXQuantizeDequantize(X float32; format, axis=-1, prescale=1) -> Y float32, Y = quantize_dequantize(X, format, axis)
// with the format's pre-scale.
struct QuantizeDequantizeKernel {
  MxFormat format;
  int64_t axis;
  float prescale;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue x = ctx.GetInput(0);
      const auto info = x.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
        invalid("MXQuantizeDequantize: X must be float32");
      }
      const std::vector<int64_t> shape = info.GetShape();
      const BlockLayout layout = block_layout(shape, axis, format.block_size, "MXQuantizeDequantize");
      Ort::UnownedValue y = ctx.GetOutput(0, shape);
      if (info.GetElementCount() == 0) return;
      const float* in = x.GetTensorData<float>();
      float* out = y.GetTensorMutableData<float>();
      auto work = [&](int64_t begin, int64_t end) {
        quantize_dequantize(*format.elem, layout, in, out, begin, end, prescale);
      };
      parallel_for(context, layout.block_rows(), layout.block * layout.inner, work);
    });
  }
};

// MXDequantize(codes, exponents uint8; format, axis=0, prescale=1) -> W float32, W = dequantize(codes, exponents,
// format, axis): element * fl(2^E f), the pre-scale's f = fl(1 / p) folded into the E8M0 table.
struct DequantizeKernel {
  MxFormat format;
  int64_t axis;
  DequantizeTables tables;

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue codes = ctx.GetInput(0), exponents = ctx.GetInput(1);
      const auto code_info = codes.GetTensorTypeAndShapeInfo(), exp_info = exponents.GetTensorTypeAndShapeInfo();
      check_weight_types(format, code_info, exp_info, "MXDequantize");
      const std::vector<int64_t> shape = code_info.GetShape();
      const BlockLayout layout = block_layout(shape, axis, format.block_size, "MXDequantize");
      std::vector<int64_t> expected = shape;
      expected[axis < 0 ? axis + shape.size() : axis] = layout.blocks_per_row();
      if (exp_info.GetShape() != expected) {
        invalid("MXDequantize: exponents shape does not match codes shape, format and axis");
      }
      Ort::UnownedValue w = ctx.GetOutput(0, shape);
      if (code_info.GetElementCount() == 0) return;
      const bool packed4 = format.elem->storage == CodeStorage::kInt4 || format.elem->storage == CodeStorage::kUInt4;
      const auto* code_bytes = static_cast<const uint8_t*>(codes.GetTensorRawData());
      const auto* exp_bytes = exponents.GetTensorData<uint8_t>();
      float* out = w.GetTensorMutableData<float>();
      auto work = [&](int64_t begin, int64_t end) {
        dequantize(tables, packed4, layout, code_bytes, exp_bytes, out, begin, end);
      };
      parallel_for(context, layout.block_rows(), layout.block * layout.inner, work);
    });
  }
};

// MXMatMul(X float32 [..., K], codes [K, N], exponents uint8 [ceil(K/b), N]; weight_format, act_format="none",
//   weight_prescale=1, act_prescale=1) -> Y float32 [..., N],  Y = MatMul(MXQuantizeDequantize(X, act_format, -1,
//   act_prescale), MXDequantize(codes, exponents, weight_format, 0, weight_prescale)), the weight decoded panel by
//   panel inside the GEMM (mx_matmul.h).
// Pre-scales: the kernels sum with the plain power-of-two scales (activation codes from the pre-scaled values) and
// Y is multiplied once at the end by F = fl(f_w f_a) (integer route) or f_w (float route, whose activations are
// already dequantized with f_a), f = fl(1 / p). Against the reference, which rounds each dequantized value
// element * fl(2^E f) once, this adds 4 units of 2^-24 to the bound of mx_gemv.h (two roundings of F and its
// product, two of the reference's values): |y - y_ref| <= (S_f + K / S + 6) 2^-24 sum_k |xq_k w_kn|.
struct FusedMatMulKernel {
  MatMulKernel gemm;
  MxFormat weight_format;
  std::unique_ptr<MxFormat> act_format;  // nullptr: X enters the GEMM as is
  GemvKernel gemv;
  float integer_factor;  // F of the integer route
  float float_factor;    // f_w of the float route
  float act_prescale;    // p_a of the float route's activation quantizer

  static void scale_output(float* y, int64_t count, float factor) {
    if (factor == 1.0f) return;
    for (int64_t i = 0; i < count; ++i) y[i] *= factor;
  }

  // Y[m, n] row by row (GemvKernel::multiply), each row split into kGemvSplits ranges of whole kGemvColumns units
  // (tasks of the thread pool; few and wide, so that each reads long runs of every weight row). Integer route:
  // `rows` the activation codes of each row; float route: `x` the (quantized) rows.
  void multiply_rows(OrtKernelContext* context, const PackedWeight& w, const ActivationCodes* rows, const float* x,
                     float* y, int64_t m) const {
    const int64_t units = (w.n + kGemvColumns - 1) / kGemvColumns;
    const int64_t splits = std::min(units, kGemvSplits);
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / splits, part = t % splits;
        const int64_t n0 = units * part / splits * kGemvColumns;
        const int64_t n1 = std::min(units * (part + 1) / splits * kGemvColumns, w.n);
        gemv.multiply(w, rows ? rows + r : nullptr, x ? x + r * w.k : nullptr, y + r * w.n, n0, n1);
      }
    };
    parallel_for(context, m * splits, (w.n / splits + 1) * w.k, work);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue x = ctx.GetInput(0), codes = ctx.GetInput(1), exponents = ctx.GetInput(2);
      const auto x_info = x.GetTensorTypeAndShapeInfo();
      const auto code_info = codes.GetTensorTypeAndShapeInfo(), exp_info = exponents.GetTensorTypeAndShapeInfo();
      if (x_info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) invalid("MXMatMul: X must be float32");
      check_weight_types(weight_format, code_info, exp_info, "MXMatMul");
      const std::vector<int64_t> x_shape = x_info.GetShape(), w_shape = code_info.GetShape();
      if (w_shape.size() != 2) invalid("MXMatMul: codes must be a 2-D weight [K, N]");
      const int64_t k = w_shape[0], n = w_shape[1];
      if (x_shape.empty() || x_shape.back() != k) {
        invalid("MXMatMul: the last dimension of X (" + (x_shape.empty() ? std::string("none") :
                std::to_string(x_shape.back())) + ") differs from the rows of the weight (" + std::to_string(k) + ")");
      }
      const std::vector<int64_t> expected{(k + weight_format.block_size - 1) / weight_format.block_size, n};
      if (exp_info.GetShape() != expected) {
        invalid("MXMatMul: exponents shape does not match codes shape and weight_format");
      }
      std::vector<int64_t> y_shape(x_shape.begin(), x_shape.end() - 1);
      y_shape.push_back(n);
      Ort::UnownedValue y = ctx.GetOutput(0, y_shape);
      const int64_t m = k == 0 ? 0 : static_cast<int64_t>(x_info.GetElementCount()) / k;
      float* out = y.GetTensorMutableData<float>();
      if (m * n == 0) {
        std::fill(out, out + static_cast<int64_t>(y.GetTensorTypeAndShapeInfo().GetElementCount()), 0.0f);
        return;
      }
      const float* in = x.GetTensorData<float>();
      const PackedWeight w{static_cast<const uint8_t*>(codes.GetTensorRawData()), exponents.GetTensorData<uint8_t>(),
                           k, n};
      if (m <= kGemvMaxRows && gemv.integer_route()) {
        std::vector<ActivationCodes> rows(m);
        for (int64_t r = 0; r < m; ++r) gemv.quantize_row(in + r * k, k, rows[r]);
        multiply_rows(context, w, rows.data(), nullptr, out, m);
        scale_output(out, m * n, integer_factor);
        return;
      }
      if (gemv.integer_gemm()) {
        std::vector<ActivationCodes> rows(m);
        auto quantize = [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) gemv.quantize_row(in + r * k, k, rows[r]);
        };
        parallel_for(context, m, k, quantize);
        auto multiply = [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p) gemv.gemm_panel(w, rows.data(), m, p * kGemmColumns, out);
        };
        parallel_for(context, (n + kGemmColumns - 1) / kGemmColumns, m * kGemmColumns * k, multiply);
        scale_output(out, m * n, integer_factor);
        return;
      }
      std::vector<float> quantized;
      if (act_format) {
        quantized.resize(m * k);
        const BlockLayout layout{m, k, 1, act_format->block_size};
        auto qdq = [&](int64_t begin, int64_t end) {
          quantize_dequantize(*act_format->elem, layout, in, quantized.data(), begin, end, act_prescale);
        };
        parallel_for(context, layout.block_rows(), layout.block, qdq);
        in = quantized.data();
      }
      if (m <= kGemvMaxRows) {
        multiply_rows(context, w, nullptr, in, out, m);
        scale_output(out, m * n, float_factor);
        return;
      }
      const int64_t panels = MatMulKernel::column_panels(n), tiles = MatMulKernel::row_tiles(m);
      auto multiply = [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t row = (t / panels) * kTileRows;
          gemm.multiply_tile(w, in, out, row, std::min(row + kTileRows, m), t % panels);
        }
      };
      parallel_for(context, tiles * panels, std::min(m, kTileRows) * kPanelColumns * k, multiply);
      scale_output(out, m * n, float_factor);
    });
  }
};

// BlockHadamard(X float32; block) -> Y float32: every block of `block` elements along the last axis times
// H_block / sqrt(block), as a fast Walsh-Hadamard transform (stages h = 1, 2, .., block/2, then one product by
// fl(1/sqrt(block))): the same float32 operations as the function body (mxonnx/ops/hadamard.py), bit for bit.
struct BlockHadamardKernel {
  int64_t block;
  float scale;

  static void transform(float* x, int64_t block, float scale) {
    for (int64_t h = 1; h < block; h *= 2) {
      for (int64_t i = 0; i < block; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = x[j], c = x[j + h];
          x[j] = a + c;
          x[j + h] = a - c;
        }
      }
    }
    for (int64_t j = 0; j < block; ++j) x[j] *= scale;
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue x = ctx.GetInput(0);
      const auto info = x.GetTensorTypeAndShapeInfo();
      if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) invalid("BlockHadamard: X must be float32");
      const std::vector<int64_t> shape = info.GetShape();
      if (shape.empty() || shape.back() % block != 0) {
        invalid("BlockHadamard: the last dimension of X is not a multiple of block " + std::to_string(block));
      }
      Ort::UnownedValue y = ctx.GetOutput(0, shape);
      const auto count = static_cast<int64_t>(info.GetElementCount());
      if (count == 0) return;
      const float* in = x.GetTensorData<float>();
      float* out = y.GetTensorMutableData<float>();
      auto work = [&](int64_t begin, int64_t end) {
        std::copy(in + begin * block, in + end * block, out + begin * block);
        for (int64_t r = begin; r < end; ++r) transform(out + r * block, block, scale);
      };
      parallel_for(context, count / block, block, work);
    });
  }
};

// GroupAttention(q [B, S, H D], k, v [B, S, KV D], past_key, past_value [B, KV, P, D], attention_bias [B or 1, 1, S,
//   P + S]; num_heads H, kv_num_heads KV, scale) -> O [B, S, H D], present_key, present_value [B, KV, P + S, D]
// (mx_attention.h; the function body is mxonnx/ops/attention.py). Three passes over the thread pool: the caches
// per (b, kv), the key range of every query row, then the attention per (b, kv, block of positions).
struct GroupAttentionKernel {
  int64_t heads, kv_heads;
  AttentionKernel kernel;

  static std::vector<int64_t> shape_of(const Ort::ConstValue& value, size_t rank, const char* name) {
    const auto info = value.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      invalid(std::string("GroupAttention: ") + name + " must be float32");
    }
    std::vector<int64_t> shape = info.GetShape();
    if (shape.size() != rank) {
      invalid(std::string("GroupAttention: ") + name + " must have rank " + std::to_string(rank) + ", got " +
              std::to_string(shape.size()));
    }
    return shape;
  }

  static void expect(bool ok, const std::string& message) {
    if (!ok) invalid("GroupAttention: " + message);
  }

  OrtStatusPtr ComputeV2(OrtKernelContext* context) {
    return guarded([&] {
      Ort::KernelContext ctx(context);
      const Ort::ConstValue q = ctx.GetInput(0), k = ctx.GetInput(1), v = ctx.GetInput(2);
      const Ort::ConstValue past_key = ctx.GetInput(3), past_value = ctx.GetInput(4), bias = ctx.GetInput(5);
      const auto qs = shape_of(q, 3, "q"), ks = shape_of(k, 3, "k"), vs = shape_of(v, 3, "v");
      const auto pks = shape_of(past_key, 4, "past_key"), pvs = shape_of(past_value, 4, "past_value");
      const auto bs = shape_of(bias, 4, "attention_bias");
      expect(qs[2] % heads == 0, "the last dimension of q (" + std::to_string(qs[2]) + ") is not num_heads (" +
                                     std::to_string(heads) + ") times a head size");
      const int64_t batch = qs[0], seq = qs[1], hd = qs[2] / heads, past = pks[2];
      const std::vector<int64_t> kv_shape{batch, seq, kv_heads * hd}, cache{batch, kv_heads, past, hd};
      expect(ks == kv_shape && vs == kv_shape, "k and v must be [batch, seq, kv_num_heads * head_size] like q");
      expect(pks == cache && pvs == cache, "past_key and past_value must be [batch, kv_num_heads, past, head_size]");
      expect((bs[0] == batch || bs[0] == 1) && bs[1] == 1 && bs[2] == seq && bs[3] == past + seq,
             "attention_bias must be [batch or 1, 1, seq, past + seq]");
      const AttentionDims d{batch, seq, past, heads, kv_heads, hd, bs[0] == 1 && batch != 1};
      Ort::UnownedValue out = ctx.GetOutput(0, qs);
      const std::vector<int64_t> present{batch, kv_heads, past + seq, hd};
      Ort::UnownedValue present_key = ctx.GetOutput(1, present), present_value = ctx.GetOutput(2, present);
      if (batch * kv_heads * (past + seq) * hd == 0) return;
      const AttentionTensors t{q.GetTensorData<float>(), k.GetTensorData<float>(), v.GetTensorData<float>(),
                               past_key.GetTensorData<float>(), past_value.GetTensorData<float>(),
                               bias.GetTensorData<float>(), out.GetTensorMutableData<float>(),
                               present_key.GetTensorMutableData<float>(), present_value.GetTensorMutableData<float>()};
      auto copy = [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) kernel.copy_caches(d, t, u / kv_heads, u % kv_heads);
      };
      parallel_for(context, batch * kv_heads, 2 * (past + seq) * hd, copy);
      if (seq == 0) return;
      std::vector<std::pair<int64_t, int64_t>> ranges(batch * seq);
      auto scan = [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) ranges[u] = AttentionKernel::key_range(d, t, u / seq, u % seq);
      };
      parallel_for(context, batch * seq, past + seq, scan);
      const int64_t blocks = (seq + AttentionKernel::kBlockPositions - 1) / AttentionKernel::kBlockPositions;
      auto attend = [&](int64_t begin, int64_t end) {
        for (int64_t u = begin; u < end; ++u) {
          const int64_t b = u / (kv_heads * blocks), kv = u / blocks % kv_heads;
          const int64_t i0 = u % blocks * AttentionKernel::kBlockPositions;
          kernel.attend(d, t, ranges, b, kv, i0, std::min(seq, i0 + AttentionKernel::kBlockPositions));
        }
      };
      const int64_t positions = std::min(seq, AttentionKernel::kBlockPositions);
      parallel_for(context, batch * kv_heads * blocks, 2 * positions * (heads / kv_heads) * (past + seq) * hd, attend);
    });
  }
};

struct BlockHadamardOp : Ort::CustomOpBase<BlockHadamardOp, BlockHadamardKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] {
      const int64_t block = int_attribute_or(info, "block", 0);
      if (block < 1 || (block & (block - 1)) != 0) invalid("BlockHadamard: block must be a power of two");
      *kernel = new BlockHadamardKernel{block, static_cast<float>(1.0 / std::sqrt(static_cast<double>(block)))};
    });
  }
  const char* GetName() const { return "BlockHadamard"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct QuantizeDequantizeOp : Ort::CustomOpBase<QuantizeDequantizeOp, QuantizeDequantizeKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] {
      *kernel = new QuantizeDequantizeKernel{format_attribute(info, GetName()), int_attribute_or(info, "axis", -1),
                                             prescale_attribute(info, GetName(), "prescale")};
    });
  }
  const char* GetName() const { return "MXQuantizeDequantize"; }
  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct DequantizeOp : Ort::CustomOpBase<DequantizeOp, DequantizeKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] {
      const MxFormat format = format_attribute(info, GetName());
      *kernel = new DequantizeKernel{format, int_attribute_or(info, "axis", 0),
                                     make_dequantize_tables(*format.elem, prescale_attribute(info, GetName(), "prescale"))};
    });
  }
  const char* GetName() const { return "MXDequantize"; }
  size_t GetInputTypeCount() const { return 2; }
  // codes: int4, int8, uint4 or uint8 depending on the format (checked at run time).
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct MatMulOp : Ort::CustomOpBase<MatMulOp, FusedMatMulKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] {
      const MxFormat weights = format_attribute(info, GetName(), "weight_format");
      std::unique_ptr<MxFormat> acts = optional_format_attribute(info, GetName(), "act_format");
      const float weight_prescale = prescale_attribute(info, GetName(), "weight_prescale");
      const float act_prescale = acts ? prescale_attribute(info, GetName(), "act_prescale") : 1.0f;
      GemvKernel gemv(weights, acts.get(), act_prescale);
      const float weight_factor = 1.0f / weight_prescale, act_factor = 1.0f / act_prescale;
      *kernel = new FusedMatMulKernel{MatMulKernel(weights), weights, std::move(acts), std::move(gemv),
                                      weight_factor * act_factor, weight_factor, act_prescale};
    });
  }
  const char* GetName() const { return "MXMatMul"; }
  size_t GetInputTypeCount() const { return 3; }
  // X float32, codes int4/int8/uint4/uint8 depending on weight_format (checked at run time), exponents uint8.
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
                      : index == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

struct GroupAttentionOp : Ort::CustomOpBase<GroupAttentionOp, GroupAttentionKernel, true> {
  OrtStatusPtr CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return guarded([&] {
      const int64_t heads = int_attribute_or(info, "num_heads", 0), kv_heads = int_attribute_or(info, "kv_num_heads", 0);
      if (heads < 1 || kv_heads < 1 || heads % kv_heads != 0) {
        invalid("GroupAttention: num_heads and kv_num_heads must be positive, num_heads a multiple of kv_num_heads");
      }
      const float scale = float_attribute_or(info, "scale", std::numeric_limits<float>::quiet_NaN());
      if (!std::isfinite(scale)) invalid("GroupAttention: needs a finite float attribute 'scale'");
      *kernel = new GroupAttentionKernel{heads, kv_heads, AttentionKernel(scale)};
    });
  }
  const char* GetName() const { return "GroupAttention"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

const QuantizeDequantizeOp kQuantizeDequantizeOp;
const DequantizeOp kDequantizeOp;
const MatMulOp kMatMulOp;
const BlockHadamardOp kBlockHadamardOp;
const GroupAttentionOp kGroupAttentionOp;

}  // namespace
}  // namespace mxonnx

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::Global<void>::api_ = api_base->GetApi(ORT_API_VERSION);
  return mxonnx::guarded([&] {
    // Sessions keep pointers into the domain: it lives as long as the library.
    static std::mutex mutex;
    static std::vector<Ort::CustomOpDomain> domains;
    Ort::CustomOpDomain domain{mxonnx::kDomain};
    domain.Add(&mxonnx::kQuantizeDequantizeOp);
    domain.Add(&mxonnx::kDequantizeOp);
    domain.Add(&mxonnx::kMatMulOp);
    domain.Add(&mxonnx::kBlockHadamardOp);
    domain.Add(&mxonnx::kGroupAttentionOp);
    Ort::UnownedSessionOptions(options).Add(domain);
    std::lock_guard<std::mutex> lock(mutex);
    domains.push_back(std::move(domain));
  });
}
