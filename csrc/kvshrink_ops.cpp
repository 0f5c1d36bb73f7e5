// Torch binding of the CUDA kernels: ops under torch.ops.kvshrink_cuda, built
// by vllm_kvshrink/kernels/cuda_ext.py (torch.utils.cpp_extension) only where
// torch has CUDA.  The Python wrappers there build the K/V views and check
// arguments with clear messages; the checks here are the last line.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kvshrink_kernels.h"

namespace kvshrink {
namespace {

KVStrides strides_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 5, "expected a [L, num_blocks, H, block_size, D] view, got ",
              t.sizes());
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.stride(4)};
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

FloatType float_type(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kHalf: return FloatType::kFloat16;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kFloat: return FloatType::kFloat32;
    default: TORCH_CHECK(false, name, " has dtype ", t, "; allowed: float16, bfloat16, float32");
  }
  return FloatType::kFloat32;
}

// k, v: [L, num_blocks, H, block_size, D] views of one cache (raw copies).
void compact_kv(at::Tensor k, at::Tensor v, const at::Tensor& src_table,
                const at::Tensor& src_index, const at::Tensor& dst_table, bool staged) {
  TORCH_CHECK(k.is_cuda() && v.is_cuda(), "k and v must be CUDA tensors");
  TORCH_CHECK(k.sizes() == v.sizes() && k.scalar_type() == v.scalar_type(),
              "k and v must have the same shape and dtype");
  TORCH_CHECK(src_index.dim() == 3 && src_index.size(0) == k.size(0) &&
                  src_index.size(1) == k.size(2),
              "src_index must be [L, H, K], got ", src_index.sizes());
  const auto index_type = src_index.scalar_type();
  TORCH_CHECK(index_type == at::kInt || index_type == at::kLong,
              "src_index must be int32 or int64, got ", index_type);
  TORCH_CHECK(src_table.scalar_type() == index_type && dst_table.scalar_type() == index_type,
              "src_table, src_index and dst_table must share one integer dtype");
  TORCH_CHECK(src_table.is_contiguous() && dst_table.is_contiguous(),
              "block tables must be contiguous");
  const c10::cuda::CUDAGuard guard(k.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  CompactArgs a{};
  a.src_table = src_table.data_ptr();
  a.src_index = src_index.data_ptr();
  a.dst_table = dst_table.data_ptr();
  a.si_layer = src_index.stride(0);
  a.si_head = src_index.stride(1);
  a.si_keep = src_index.stride(2);
  a.index_is_int64 = index_type == at::kLong;
  a.n_layers = k.size(0);
  a.n_heads = k.size(2);
  a.block_size = k.size(3);
  a.head_dim = k.size(4);
  a.n_keep = src_index.size(2);
  a.element_size = static_cast<int>(k.element_size());
  TORCH_CHECK(a.element_size == 1 || a.element_size == 2 || a.element_size == 4,
              "cache element size must be 1, 2 or 4 bytes, got ", a.element_size);
  if (!staged) {
    a.src_k = a.dst_k = k.data_ptr();
    a.src_v = a.dst_v = v.data_ptr();
    a.sk = a.dk = strides_of(k);
    a.sv = a.dv = strides_of(v);
    a.src_paged = a.dst_paged = a.ordered = true;
    check_cuda(launch_compact(a, stream), "compact_kv");
    return;
  }
  // Gather into [L, H, K, 2, D], then scatter: correct for any overlap.
  auto tmp = at::empty({a.n_layers, a.n_heads, a.n_keep, 2, a.head_dim}, k.options());
  auto tmp_v = tmp.select(3, 1);
  const KVStrides ts{tmp.stride(0), 0, tmp.stride(1), tmp.stride(2), tmp.stride(4)};
  a.ordered = false;
  a.src_k = k.data_ptr();
  a.src_v = v.data_ptr();
  a.sk = strides_of(k);
  a.sv = strides_of(v);
  a.dst_k = tmp.data_ptr();
  a.dst_v = tmp_v.data_ptr();
  a.dk = a.dv = ts;
  a.src_paged = true;
  a.dst_paged = false;
  check_cuda(launch_compact(a, stream), "compact_kv gather");
  a.src_k = tmp.data_ptr();
  a.src_v = tmp_v.data_ptr();
  a.sk = a.sv = ts;
  a.dst_k = k.data_ptr();
  a.dst_v = v.data_ptr();
  a.dk = strides_of(k);
  a.dv = strides_of(v);
  a.src_paged = false;
  a.dst_paged = true;
  check_cuda(launch_compact(a, stream), "compact_kv scatter");
}

void check_quant(int64_t bits, int64_t group_size, int64_t n_c) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits=", bits, " is not allowed; use 2, 4 or 8");
  TORCH_CHECK(group_size > 0 && group_size % (8 / bits) == 0 && n_c % group_size == 0,
              "group_size=", group_size, " must divide the grouped axis (", n_c,
              ") and be a multiple of ", 8 / bits);
}

// x: [A, R, C] (any strides), groups along C.
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t bits,
                                                        int64_t group_size,
                                                        at::ScalarType param_dtype) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3, "x must be a 3-d CUDA tensor, got ", x.sizes());
  check_quant(bits, group_size, x.size(2));
  const c10::cuda::CUDAGuard guard(x.device());
  auto packed = at::empty({x.size(0), x.size(1), x.size(2) * bits / 8}, x.options().dtype(at::kByte));
  auto params = x.options().dtype(param_dtype);
  auto scale = at::empty({x.size(0), x.size(1), x.size(2) / group_size}, params);
  auto zero = at::empty_like(scale);
  QuantArgs a{};
  a.x = x.data_ptr();
  a.packed = packed.data_ptr<uint8_t>();
  a.scale = scale.data_ptr();
  a.zero = zero.data_ptr();
  a.n_a = x.size(0);
  a.n_r = x.size(1);
  a.n_c = x.size(2);
  a.s_a = x.stride(0);
  a.s_r = x.stride(1);
  a.s_c = x.stride(2);
  a.bits = static_cast<int>(bits);
  a.group_size = static_cast<int>(group_size);
  a.x_type = float_type(x.scalar_type(), "x");
  a.param_type = float_type(param_dtype, "param_dtype");
  check_cuda(launch_quantize(a, c10::cuda::getCurrentCUDAStream()), "quantize");
  return {packed, scale, zero};
}

at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& scale, const at::Tensor& zero,
                      int64_t bits, int64_t group_size, at::ScalarType dtype, bool channel) {
  TORCH_CHECK(packed.is_cuda() && packed.dim() == 3 && packed.scalar_type() == at::kByte &&
                  packed.is_contiguous(),
              "packed must be a contiguous 3-d uint8 CUDA tensor");
  const int64_t n_c = packed.size(2) * 8 / bits;
  check_quant(bits, group_size, n_c);
  TORCH_CHECK(scale.is_contiguous() && zero.is_contiguous() &&
                  scale.scalar_type() == zero.scalar_type() &&
                  scale.sizes() == zero.sizes() && scale.size(2) == n_c / group_size,
              "scale and zero must be contiguous [A, R, C / group_size] of one dtype");
  const c10::cuda::CUDAGuard guard(packed.device());
  const int64_t n_a = packed.size(0), n_r = packed.size(1);
  auto out = channel ? at::empty({n_a, n_c, n_r}, packed.options().dtype(dtype))
                     : at::empty({n_a, n_r, n_c}, packed.options().dtype(dtype));
  auto view = channel ? out.transpose(1, 2) : out;
  QuantArgs a{};
  a.out = view.data_ptr();
  a.packed = packed.data_ptr<uint8_t>();
  a.scale = scale.data_ptr();
  a.zero = zero.data_ptr();
  a.n_a = n_a;
  a.n_r = n_r;
  a.n_c = n_c;
  a.s_a = view.stride(0);
  a.s_r = view.stride(1);
  a.s_c = view.stride(2);
  a.bits = static_cast<int>(bits);
  a.group_size = static_cast<int>(group_size);
  a.x_type = float_type(dtype, "dtype");
  a.param_type = float_type(scale.scalar_type(), "scale");
  check_cuda(launch_dequantize(a, c10::cuda::getCurrentCUDAStream()), "dequantize");
  return out;
}

}  // namespace
}  // namespace kvshrink

TORCH_LIBRARY(kvshrink_cuda, m) {
  m.def("compact_kv(Tensor(a!) k, Tensor(b!) v, Tensor src_table, Tensor src_index, "
        "Tensor dst_table, bool staged) -> ()");
  m.def("quantize(Tensor x, int bits, int group_size, ScalarType param_dtype) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("dequantize(Tensor packed, Tensor scale, Tensor zero, int bits, int group_size, "
        "ScalarType dtype, bool channel) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvshrink_cuda, CUDA, m) {
  m.impl("compact_kv", &kvshrink::compact_kv);
  m.impl("quantize", &kvshrink::quantize);
  m.impl("dequantize", &kvshrink::dequantize);
}
