// Packed pages back to float K/V: torch.ops.kvshrink_cpu.unpack_pages, built
// with packed_attention.cpp by vllm_kvshrink/kernels/cpu_ext.py.  Semantics:
// vllm_kvshrink/kernels/quant.py (unpack()), which the tests compare it with;
// what a tier event reads of the tokens a request holds packed.
//
// pages [A, P, region bytes]: A rows (layer x KV head), each P pages of one
// form holding `capacity` tokens each (full but the last); the first n tokens
// of every row come out as keys / values [A, n, D] float32, rotated back for
// a rotated form.  One token per iteration, rows x tokens split over threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "page_format.h"

namespace kvshrink_cpu {
namespace {

void unpack_pages(at::Tensor keys, at::Tensor values, const at::Tensor& pages, int64_t n,
                  int64_t k_bits, int64_t v_bits, int64_t rotate, int64_t capacity,
                  int64_t k_off, int64_t v_off, int64_t p_off) {
  TORCH_CHECK(pages.device().is_cpu() && pages.scalar_type() == at::kByte &&
                  pages.is_contiguous() && pages.dim() == 3,
              "pages must be a contiguous [A, P, region_bytes] CPU uint8 tensor, got ",
              pages.scalar_type(), " ", pages.sizes());
  for (const at::Tensor* t : {&keys, &values})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat &&
                    t->is_contiguous() && t->dim() == 3 && t->size(0) == pages.size(0) &&
                    t->size(1) == n,
                "keys / values must be contiguous [A, n, D] CPU float32 tensors, got ",
                t->scalar_type(), " ", t->sizes());
  const int64_t a_rows = pages.size(0), p = pages.size(1), rb = pages.size(2);
  const int64_t d = keys.size(2);
  TORCH_CHECK(values.size(2) == d && d >= 16 && d <= 256 && (d & (d - 1)) == 0,
              "head dim must be a power of two in [16, 256], got ", d);
  for (int64_t bits : {k_bits, v_bits})
    TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, got ", bits);
  const int64_t kb = d * k_bits / 8, vb = d * v_bits / 8;
  TORCH_CHECK(capacity > 0 && n >= 0 && n <= p * capacity,
              n, " tokens do not fit ", p, " pages of ", capacity);
  TORCH_CHECK(k_off >= 0 && k_off + capacity * kb <= v_off && v_off + capacity * vb <= p_off &&
                  p_off + capacity * PARAM_BYTES <= rb,
              "form offsets outside the region of ", rb, " bytes");
  const uint8_t* base = pages.data_ptr<uint8_t>();
  float* ko = keys.data_ptr<float>();
  float* vo = values.data_ptr<float>();
  const int di = int(d);
  at::parallel_for(0, a_rows * n, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t a = i / n, t = i % n;
      const int64_t s = t % capacity;
      const uint8_t* page = base + (a * p + t / capacity) * rb;
      const uint8_t* par = page + p_off + s * PARAM_BYTES;
      float* kr = ko + i * d;
      float* vr = vo + i * d;
      dequant(int(k_bits), page + k_off + s * kb, bf16_bits(par), bf16_bits(par + 2), kr, di);
      dequant(int(v_bits), page + v_off + s * vb, bf16_bits(par + 4), bf16_bits(par + 6), vr,
              di);
      if (rotate) {
        hadamard_row(kr, di);
        hadamard_row(vr, di);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvshrink_cpu, m) {
  m.def(
      "unpack_pages(Tensor(a!) keys, Tensor(b!) values, Tensor pages, int n, int k_bits, "
      "int v_bits, int rotate, int capacity, int k_off, int v_off, int p_off) -> ()");
}

TORCH_LIBRARY_IMPL(kvshrink_cpu, CPU, m) { m.impl("unpack_pages", &unpack_pages); }

}  // namespace kvshrink_cpu
