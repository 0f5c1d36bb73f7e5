// Launchers of the CUDA kernels in kvshrink_kernels.cu.  Plain C++ types only,
// so the .cu file compiles with nvcc alone (no torch headers); the torch
// binding is kvshrink_ops.cpp.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvshrink {

// Element strides of a K or V view [L, num_blocks, H, block_size, D]
// (layer, block, head, token, dim).  For a staging buffer the block stride is
// unused and tokens are addressed by their output index.
struct KVStrides {
  int64_t layer, block, head, token, dim;
};

struct CompactArgs {
  void* src_k;
  void* src_v;
  void* dst_k;
  void* dst_v;
  KVStrides sk, sv, dk, dv;
  const void* src_table;
  const void* src_index;  // [L, H, K]
  const void* dst_table;
  int64_t si_layer, si_head, si_keep;  // src_index strides
  bool index_is_int64;                 // src_index and both tables
  int64_t n_layers, n_heads, n_keep, block_size, head_dim;
  int element_size;  // bytes: 1, 2 or 4 (raw copies)
  bool src_paged, dst_paged;
  bool ordered;  // one block per (layer, head), chunks in ascending order
};

// Returns cudaSuccess or the launch error.
cudaError_t launch_compact(const CompactArgs& args, cudaStream_t stream);

enum class FloatType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct QuantArgs {
  const void* x;       // quantize: input [A, R, C] (strided)
  void* out;           // dequantize: output [A, R, C] (strided)
  uint8_t* packed;     // quantize: output; dequantize: input  [A, R, C*bits/8]
  void* scale;         // [A, R, C / group_size], contiguous
  void* zero;
  int64_t n_a, n_r, n_c;
  int64_t s_a, s_r, s_c;  // strides of x (quantize) or out (dequantize)
  int bits, group_size;
  FloatType x_type, param_type;
};

cudaError_t launch_quantize(const QuantArgs& args, cudaStream_t stream);
cudaError_t launch_dequantize(const QuantArgs& args, cudaStream_t stream);

}  // namespace kvshrink
