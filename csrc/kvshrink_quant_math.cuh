// Arithmetic and addressing of the vectorised quantization kernels, as
// __host__ __device__ functions: the kernels in kvshrink_kernels.cu call them
// on the GPU, and tests/cuda/quant_vector_host.cu calls the same functions on
// the CPU (lane by lane) so that the index maths and the rounding are checked
// against the PyTorch reference without a GPU.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace kvshrink {
namespace quant {

__host__ __device__ inline float to_float(__half x) { return __half2float(x); }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline float to_float(float x) { return x; }

template <typename T> __host__ __device__ inline T from_float(float x);
template <> __host__ __device__ inline __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __host__ __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __host__ __device__ inline float from_float<float>(float x) { return x; }

// IEEE division, round to nearest even (the host's '/' is that already).
__host__ __device__ inline float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

// Product and sum without FMA contraction, so that dequantization gives the
// reference's bits (torch multiplies, then adds).
__host__ __device__ inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

__host__ __device__ inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// Rounded parameters of one group from its min and max, as the reference:
// zero = P(min), scale = P((max - min) / qmax), 1 where that is 0.
template <typename P, int BITS>
__host__ __device__ inline void group_params(float mn, float mx, P* zero_p, P* scale_p) {
  constexpr float kQmax = static_cast<float>((1 << BITS) - 1);
  *zero_p = from_float<P>(mn);
  P s = from_float<P>(div_rn(mx - mn, kQmax));
  if (!(to_float(s) > 0.0f)) s = from_float<P>(1.0f);
  *scale_p = s;
}

// Code of one value: clamp(round_half_even((v - zero) / scale), 0, qmax).
template <int BITS>
__host__ __device__ inline uint32_t code(float v, float zero, float scale) {
  constexpr float kQmax = static_cast<float>((1 << BITS) - 1);
  return static_cast<uint32_t>(fminf(fmaxf(rintf(div_rn(v - zero, scale)), 0.0f), kQmax));
}

// The vectorised layout: a group of G contiguous elements is read by
// L = G * sizeof(T) / 16 lanes, lane i holding elements [i*E, (i+1)*E) with
// E = 16 / sizeof(T), i.e. one 16-byte load.  Its E codes are E*BITS/8 bytes
// of the packed row, written as one word (code e at bit e*BITS, which is the
// little-endian packing of the reference).
template <typename T>
struct Lanes {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
};

template <typename T, int BITS>
struct Word {
  static constexpr int kBytes = Lanes<T>::kElems * BITS / 8;  // 1, 2, 4 or 8
};

// Element offset of a lane's first element, and byte offset of its packed
// word, for unit = row * n_groups + g (the index of scale / zero too).
struct VectorAddress {
  int64_t x;       // in elements of x (quantize) / out (dequantize)
  int64_t packed;  // in bytes
};

template <typename T, int BITS>
__host__ __device__ inline VectorAddress vector_address(int64_t unit, int lane, int64_t n_r,
                                                        int64_t n_c, int64_t group_size,
                                                        int64_t s_a, int64_t s_r) {
  const int64_t n_groups = n_c / group_size;
  const int64_t row = unit / n_groups;
  const int64_t g = unit % n_groups;
  const int64_t first = g * group_size + static_cast<int64_t>(lane) * Lanes<T>::kElems;
  VectorAddress a;
  a.x = (row / n_r) * s_a + (row % n_r) * s_r + first;  // contiguous axis: stride 1
  a.packed = row * (n_c * BITS / 8) + first * BITS / 8;
  return a;
}

// Packs a lane's E codes into its word.
template <typename T, int BITS>
__host__ __device__ inline uint64_t pack_lane(const float* v, float zero, float scale) {
  uint64_t word = 0;
  for (int e = 0; e < Lanes<T>::kElems; ++e) {
    word |= static_cast<uint64_t>(code<BITS>(v[e], zero, scale)) << (e * BITS);
  }
  return word;
}

// Unpacks a lane's word: x = q * scale + zero, in the output type.
template <typename T, int BITS>
__host__ __device__ inline void unpack_lane(uint64_t word, float scale, float zero, T* out) {
  constexpr uint64_t kMask = (1u << BITS) - 1;
  for (int e = 0; e < Lanes<T>::kElems; ++e) {
    const float q = static_cast<float>((word >> (e * BITS)) & kMask);
    out[e] = from_float<T>(add_rn(mul_rn(q, scale), zero));
  }
}

}  // namespace quant
}  // namespace kvshrink
