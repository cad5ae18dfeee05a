// GroupAttention: grouped-query attention with an additive mask over a KV cache (the kernel of com.mxonnx
// GroupAttention, mxonnx/ops/attention.py):
//
//   present = concat(past, new) along the sequence, per KV head
//   O[b, i, h] = sum_j w_ij V[b, h / G, j],  w_i = softmax_j(scale * q[b, i, h] . K[b, h / G, j] + bias[b, 0, i, j])
//
// G = heads / kv_heads query heads per KV head; a row whose weights are NaN (every bias -inf, or a non-finite score)
// gives O = 0, the export's guard Where(IsNaN(w), 0, w).
//
// Work: keys whose bias is -inf are skipped: each query row attends only to [first, last] of its keys with a finite
// bias (any key outside has weight exp(-inf) = 0 exactly, so for finite q, k, v this is exact); the rows are taken
// three at a time (the G query heads of one position are adjacent), scores of a tile of rows x 4 keys as dot
// products along head_dim, a max-subtracted softmax, then the weighted sum of V rows, scaled once by 1 / sum.
//
// Vector path (AVX2 + FMA, head_dim a multiple of 8, the weighted sums of head_dim 64 in AVX-512F where the CPU has
// it; chosen at run time, capped by $MXONNX_NATIVE_ISA): exp is
// evaluated as 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2, p the degree-7 Taylor polynomial (truncation < 2^-27), with
// relative error <= 2^-21 for x in [-87.3, 0] and 0 below (where exp(x) < 2^-126); the portable path uses std::exp.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace mxonnx {

struct AttentionDims {
  int64_t batch, seq, past, heads, kv_heads, head_dim;
  bool bias_broadcast;  // attention_bias has batch 1
  int64_t total() const { return past + seq; }
  int64_t group() const { return heads / kv_heads; }
};

struct AttentionTensors {
  const float *q, *k, *v, *past_key, *past_value, *bias;
  float *out, *present_key, *present_value;
};

class AttentionKernel {
 public:
  static constexpr int64_t kBlockPositions = 16;  // query positions per task of attend()

  explicit AttentionKernel(float scale);

  // present[b, kv] = concat(past[b, kv], new[b, :, kv, :]) for keys and values.
  void copy_caches(const AttentionDims& d, const AttentionTensors& t, int64_t b, int64_t kv) const;
  // [first, last + 1) of the keys with a finite bias in row (b, i); (0, 0) when there is none.
  static std::pair<int64_t, int64_t> key_range(const AttentionDims& d, const AttentionTensors& t, int64_t b, int64_t i);
  // O of the query heads of KV head kv, batch entry b, positions [i0, i1); `ranges` from key_range per (b, i).
  void attend(const AttentionDims& d, const AttentionTensors& t, const std::vector<std::pair<int64_t, int64_t>>& ranges,
              int64_t b, int64_t kv, int64_t i0, int64_t i1) const;
  bool vector() const { return vector_; }

 private:
  float scale_;
  bool vector_;
  bool wide_;  // AVX-512F weighted sums (head_dim 64), capped by $MXONNX_NATIVE_ISA = avx512vnni
};

}  // namespace mxonnx
