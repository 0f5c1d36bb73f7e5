// The quantizer on CPU tensors: torch.ops.kvshrink_cpu.quantize_groups (and the
// one-pass round trip and the Hadamard rotation of rows beside it), built
// with packed_attention.cpp by vllm_kvshrink/kernels/cpu_lib.py.  Semantics:
// vllm_kvshrink/kernels/reference.py (quantize_ref), which the tests compare
// it with bit for bit; quant.quantize runs it for bf16 parameters, so both
// paths' integer forms and the pages a tier event writes (quant.pack_tokens)
// hold these codes.  Per group of G values, in fp32 as the reference:
//   zero = bf16(min), scale = bf16((max - min) / qmax), 1 where it is 0,
//   q = clamp(round_half_even((x - zero) / scale), 0, qmax),
// G / (8 / bits) bytes of codes, element j of a byte in bits [j*bits, (j+1)*bits).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "page_format.h"

namespace kvshrink_cpu {
namespace {

inline uint16_t bf16_of(float x) {
  const c10::BFloat16 b(x);  // round to nearest even, as torch's .to(bfloat16)
  uint16_t u;
  std::memcpy(&u, &b, 2);
  return u;
}

// One group's bf16 zero point (its min) and scale ((max - min) / qmax, 1
// where that rounds to 0 or less), as bits and as floats.
struct Params {
  uint16_t sb, zb;
  float sf, zf;
};

inline Params group_params(const float* __restrict x, int d, int qmax) {
  float mn = x[0], mx = x[0];
  for (int e = 1; e < d; ++e) {
    mn = x[e] < mn ? x[e] : mn;
    mx = x[e] > mx ? x[e] : mx;
  }
  Params p;
  p.zb = bf16_of(mn);
  p.sb = bf16_of((mx - mn) / float(qmax));
  p.sf = bf16_bits(reinterpret_cast<const uint8_t*>(&p.sb));
  if (!(p.sf > 0.0f)) {
    p.sb = bf16_of(1.0f);
    p.sf = 1.0f;
  }
  p.zf = bf16_bits(reinterpret_cast<const uint8_t*>(&p.zb));
  return p;
}

inline float code_of(float x, const Params& p, int qmax) {
  const float q = std::nearbyint((x - p.zf) / p.sf);
  return q < 0.0f ? 0.0f : (q > float(qmax) ? float(qmax) : q);
}

// One group's D values -> codes (D * bits / 8 bytes) and its bf16 scale and zero.
void quantize_row(const float* __restrict x, int d, int bits, uint8_t* __restrict codes,
                  uint16_t* scale_out, uint16_t* zero_out) {
  const int qmax = (1 << bits) - 1;
  const Params p = group_params(x, d, qmax);
  const int per = 8 / bits;
  for (int b = 0; b < d / per; ++b) {
    unsigned byte = 0;
    for (int j = 0; j < per; ++j) byte |= unsigned(code_of(x[b * per + j], p, qmax)) << (j * bits);
    codes[b] = uint8_t(byte);
  }
  *scale_out = p.sb;
  *zero_out = p.zb;
}

// The checks the ops share: rows x [M, G] on the CPU (float32, or bf16 where
// bf16_ok), the bit widths, and an output shaped like x in float32.
void check_rows(const at::Tensor& x, bool bf16_ok) {
  TORCH_CHECK(x.device().is_cpu() &&
                  (x.scalar_type() == at::kFloat ||
                   (bf16_ok && x.scalar_type() == at::kBFloat16)) &&
                  x.is_contiguous() && x.dim() == 2,
              "x must be a contiguous [M, G] CPU ", bf16_ok ? "float32 or bfloat16" : "float32",
              " tensor, got ", x.scalar_type(), " ", x.sizes());
}

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, got ", bits);
}

void check_out_like(const at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.sizes() == x.sizes(),
              "out must be a contiguous float32 tensor shaped like x");
}

// Rows of one group each: x [M, G] float32 ->
// packed [M, G * bits / 8] uint8, scale and zero [M] bf16 (as int16 bits),
// what quant.quantize returns for any axis once its groups are rows.
void quantize_groups(at::Tensor packed, at::Tensor scale, at::Tensor zero, const at::Tensor& x,
                     int64_t bits) {
  check_rows(x, false);
  check_bits(bits);
  const int64_t m = x.size(0), g = x.size(1);
  TORCH_CHECK(g > 0 && g % (8 / bits) == 0, "a group of ", g, " is not whole bytes at ",
              bits, " bits");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.dim() == 2 && packed.size(0) == m && packed.size(1) == g * bits / 8,
              "packed must be a contiguous [M, G * bits / 8] uint8 tensor");
  for (const at::Tensor* t : {&scale, &zero})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->numel() == m,
                "scale / zero must be contiguous bf16 tensors of M elements");
  const float* xp = x.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  uint16_t* sp = reinterpret_cast<uint16_t*>(scale.data_ptr());
  uint16_t* zp = reinterpret_cast<uint16_t*>(zero.data_ptr());
  const int64_t pb = g * bits / 8;
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      quantize_row(xp + i * g, int(g), int(bits), pp + i * pb, sp + i, zp + i);
  });
}

// One group's values as its codes give them back: code * scale + zero, the
// product rounded before the sum, as the reference's dequantize_ref (a fused
// multiply-add would round once and differ in the last bit).
__attribute__((optimize("fp-contract=off")))
void roundtrip_row(const float* __restrict x, int d, int bits, float* __restrict out) {
  const int qmax = (1 << bits) - 1;
  const Params p = group_params(x, d, qmax);
  for (int e = 0; e < d; ++e) {
    const float y = code_of(x[e], p, qmax) * p.sf;
    out[e] = y + p.zf;
  }
}

// Rows of one group each: x [M, G] float32 -> out [M, G] float32, what
// dequantizing quantize_groups' codes in float32 gives, without the codes.
void roundtrip_groups(at::Tensor out, const at::Tensor& x, int64_t bits) {
  check_rows(x, false);
  check_bits(bits);
  check_out_like(out, x);
  const int64_t m = x.size(0), g = x.size(1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) roundtrip_row(xp + i * g, int(g), int(bits), op + i * g);
  });
}

// Rows x [M, D] float32 or bf16 -> out [M, D] float32, each Hadamard-rotated
// by hadamard_row, the rotation the packed kernel and unpack_pages apply:
// hadamard.rotate runs it on CPU tensors, so the pages a tier event writes,
// the research path's values and the references rotate alike.
void hadamard_rows(at::Tensor out, const at::Tensor& x) {
  check_rows(x, true);
  const int64_t m = x.size(0), d = x.size(1);
  TORCH_CHECK(d >= 16 && d <= 1024 && (d & (d - 1)) == 0,
              "D must be a power of two from 16 to 1024, got ", d);
  check_out_like(out, x);
  float* op = out.data_ptr<float>();
  auto rows = [&](const auto* xp) {
    at::parallel_for(0, m, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        float* o = op + i * d;
        for (int64_t e = 0; e < d; ++e) o[e] = float(xp[i * d + e]);
        hadamard_row(o, int(d));
      }
    });
  };
  if (x.scalar_type() == at::kFloat)
    rows(x.data_ptr<float>());
  else
    rows(x.data_ptr<c10::BFloat16>());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kvshrink_cpu, m) {
  m.def(
      "quantize_groups(Tensor(a!) packed, Tensor(b!) scale, Tensor(c!) zero, Tensor x, "
      "int bits) -> ()");
  m.def("roundtrip_groups(Tensor(a!) out, Tensor x, int bits) -> ()");
  m.def("hadamard_rows(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(kvshrink_cpu, CPU, m) {
  m.impl("quantize_groups", &quantize_groups);
  m.impl("roundtrip_groups", &roundtrip_groups);
  m.impl("hadamard_rows", &hadamard_rows);
}

}  // namespace kvshrink_cpu
