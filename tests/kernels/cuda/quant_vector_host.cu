// Runs the vectorised quantization kernels' per-lane code on the CPU.
//
// The kernels in csrc/kvshrink_kernels.cu (quantize_vector_kernel,
// dequantize_vector_kernel) are built from the __host__ __device__ functions
// of csrc/kvshrink_quant_math.cuh: addressing, group parameters, packing.  This
// program calls exactly those functions lane by lane, with the group's min /
// max reduced over its lanes (what the kernel does with shuffles), so that
// tests/test_kernels_cuda.py can compare the result with the PyTorch
// reference on a machine without a GPU.
//
// stdin: int32 header {x_type, param_type, bits, n_a, n_r, n_c, group_size}
// (types: 0 fp16, 1 bf16, 2 fp32), then x [n_a, n_r, n_c] contiguous.
// stdout: packed, scale, zero (param type), dequantized x (x type), raw.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "kvshrink_quant_math.cuh"

using namespace kvshrink::quant;

template <typename T, typename P, int BITS>
int run(int64_t n_a, int64_t n_r, int64_t n_c, int64_t group_size) {
  constexpr int kElems = Lanes<T>::kElems;
  const int64_t n = n_a * n_r * n_c;
  std::vector<T> x(n), out(n);
  if (fread(x.data(), sizeof(T), n, stdin) != static_cast<size_t>(n)) return 2;
  if ((group_size * static_cast<int64_t>(sizeof(T))) % 16 != 0) return 3;
  const int lanes = static_cast<int>(group_size * sizeof(T) / 16);
  const int64_t n_units = n_a * n_r * (n_c / group_size);
  const int64_t s_a = n_r * n_c, s_r = n_c;
  std::vector<uint8_t> packed(n * BITS / 8, 0);
  std::vector<P> scale(n_units), zero(n_units);
  std::vector<float> v(static_cast<size_t>(lanes) * kElems);
  for (int64_t unit = 0; unit < n_units; ++unit) {
    for (int lane = 0; lane < lanes; ++lane) {  // each lane's 16-byte load
      const VectorAddress a = vector_address<T, BITS>(unit, lane, n_r, n_c, group_size, s_a, s_r);
      for (int e = 0; e < kElems; ++e) v[lane * kElems + e] = to_float(x[a.x + e]);
    }
    float mn = v[0], mx = v[0];  // min / max over the lanes (shuffles on the GPU)
    for (const float f : v) {
      mn = fminf(mn, f);
      mx = fmaxf(mx, f);
    }
    P zero_p, scale_p;
    group_params<P, BITS>(mn, mx, &zero_p, &scale_p);
    scale[unit] = scale_p;
    zero[unit] = zero_p;
    for (int lane = 0; lane < lanes; ++lane) {
      const VectorAddress a = vector_address<T, BITS>(unit, lane, n_r, n_c, group_size, s_a, s_r);
      const uint64_t word =
          pack_lane<T, BITS>(&v[lane * kElems], to_float(zero_p), to_float(scale_p));
      for (int b = 0; b < Word<T, BITS>::kBytes; ++b) {  // little-endian store of the word
        packed[a.packed + b] = static_cast<uint8_t>(word >> (8 * b));
      }
    }
  }
  for (int64_t unit = 0; unit < n_units; ++unit) {
    for (int lane = 0; lane < lanes; ++lane) {
      const VectorAddress a = vector_address<T, BITS>(unit, lane, n_r, n_c, group_size, s_a, s_r);
      uint64_t word = 0;
      for (int b = 0; b < Word<T, BITS>::kBytes; ++b) {
        word |= static_cast<uint64_t>(packed[a.packed + b]) << (8 * b);
      }
      unpack_lane<T, BITS>(word, to_float(scale[unit]), to_float(zero[unit]), &out[a.x]);
    }
  }
  fwrite(packed.data(), 1, packed.size(), stdout);
  fwrite(scale.data(), sizeof(P), scale.size(), stdout);
  fwrite(zero.data(), sizeof(P), zero.size(), stdout);
  fwrite(out.data(), sizeof(T), out.size(), stdout);
  return 0;
}

template <typename T, typename P>
int by_bits(int bits, int64_t a, int64_t r, int64_t c, int64_t g) {
  switch (bits) {
    case 2: return run<T, P, 2>(a, r, c, g);
    case 4: return run<T, P, 4>(a, r, c, g);
    case 8: return run<T, P, 8>(a, r, c, g);
  }
  return 4;
}

template <typename T>
int by_param(int p, int bits, int64_t a, int64_t r, int64_t c, int64_t g) {
  switch (p) {
    case 0: return by_bits<T, __half>(bits, a, r, c, g);
    case 1: return by_bits<T, __nv_bfloat16>(bits, a, r, c, g);
    case 2: return by_bits<T, float>(bits, a, r, c, g);
  }
  return 4;
}

int main() {
  int32_t h[7];
  if (fread(h, sizeof(int32_t), 7, stdin) != 7) return 2;
  switch (h[0]) {
    case 0: return by_param<__half>(h[1], h[2], h[3], h[4], h[5], h[6]);
    case 1: return by_param<__nv_bfloat16>(h[1], h[2], h[3], h[4], h[5], h[6]);
    case 2: return by_param<float>(h[1], h[2], h[3], h[4], h[5], h[6]);
  }
  return 4;
}
