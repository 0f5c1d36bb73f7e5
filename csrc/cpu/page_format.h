// The page format's per-token arithmetic, shared by the CPU kernels
// (packed_attention.cpp, unpack.cpp): a token's codes -> floats, its bf16
// parameters, and the Hadamard rotation of rotated forms.  Page format:
// vllm_kvshrink/storage/paged.py and vllm_kvshrink/kernels/quant.py (PagedForm).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace kvshrink_cpu {

constexpr int PARAM_BYTES = 8;  // per token: k scale, k zero, v scale, v zero (bf16)

// Sylvester Hadamard matrix of order 16, unnormalised: H16[k][e] = (-1)^popcount(k & e).
struct Hadamard16 {
  alignas(64) float m[16][16];
  Hadamard16() {
    for (int k = 0; k < 16; ++k)
      for (int e = 0; e < 16; ++e) m[k][e] = (__builtin_popcount(k & e) & 1) ? -1.0f : 1.0f;
  }
};
static const Hadamard16 HADAMARD16;

// Orthonormal Hadamard rotation of one row in place: x <- x @ H, H the
// Sylvester matrix / sqrt(d) (vllm_kvshrink/kernels/hadamard.py); d a power of
// two, at least 16 (both kernels check it).  H_d = H_(d/16) (x) H_16, so the
// first four butterfly stages are one 16 x 16 product per 16-float chunk and
// the rest are butterflies between chunks, both loops the compiler vectorises.
inline void hadamard_row(float* __restrict x, int d) {
  for (int c = 0; c < d; c += 16) {
    alignas(64) float acc[16] = {};
    for (int k = 0; k < 16; ++k) {
      const float xk = x[c + k];
#pragma omp simd
      for (int e = 0; e < 16; ++e) acc[e] += xk * HADAMARD16.m[k][e];
    }
    std::memcpy(x + c, acc, sizeof(acc));
  }
  for (int h = 16; h < d; h *= 2)
    for (int i = 0; i < d; i += 2 * h) {
#pragma omp simd
      for (int j = i; j < i + h; ++j) {
        const float a = x[j], b = x[j + h];
        x[j] = a + b;
        x[j + h] = a - b;
      }
    }
  const float norm = 1.0f / std::sqrt(float(d));
#pragma omp simd
  for (int e = 0; e < d; ++e) x[e] *= norm;
}

inline float bf16_bits(const uint8_t* p) {
  uint16_t b;
  std::memcpy(&b, p, 2);
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One token's codes -> D floats: x = code * scale + zero.
template <int BITS>
inline void dequant_row(const uint8_t* __restrict codes, float scale, float zero,
                        float* __restrict out, int d) {
  constexpr int PER = 8 / BITS;
  constexpr unsigned MASK = (1u << BITS) - 1u;
  const int nb = d / PER;
#pragma omp simd
  for (int b = 0; b < nb; ++b) {
    const unsigned x = codes[b];
    for (int j = 0; j < PER; ++j)
      out[b * PER + j] = float((x >> (j * BITS)) & MASK) * scale + zero;
  }
}

// 2-bit codes: a byte -> its four codes as four bytes (one table load per
// byte), then a plain u8 -> float loop the compiler vectorises.
struct Expand2 {
  uint32_t t[256];
  Expand2() {
    for (unsigned x = 0; x < 256; ++x) {
      uint32_t w = 0;
      for (unsigned j = 0; j < 4; ++j) w |= ((x >> (2 * j)) & 3u) << (8 * j);
      t[x] = w;
    }
  }
};
static const Expand2 EXPAND2;

inline void dequant_row2(const uint8_t* __restrict codes, float scale, float zero,
                         float* __restrict out, int d) {
  uint8_t q[256];
  for (int b = 0; b < d / 4; ++b) std::memcpy(q + 4 * b, &EXPAND2.t[codes[b]], 4);
#pragma omp simd
  for (int e = 0; e < d; ++e) out[e] = float(q[e]) * scale + zero;
}

#if defined(__AVX2__)
// AVX2: eight codes at a time straight from the page -- one code word
// broadcast to eight lanes, a per-lane shift and mask (2 and 4 bits) or a
// widening load (8 bits) -- so no byte buffer is written and read back.
template <int BITS>
inline void dequant_avx2(const uint8_t* __restrict codes, float scale, float zero,
                         float* __restrict out, int d) {
  const __m256 s = _mm256_set1_ps(scale), z = _mm256_set1_ps(zero);
  const __m256i shift = BITS == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                                  : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
  for (int e = 0; e < d; e += 8) {
    const uint8_t* c = codes + e * BITS / 8;
    __m256i q;
    if (BITS == 8) {
      int64_t w;
      std::memcpy(&w, c, 8);
      q = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(w));
    } else {
      int32_t w = 0;
      std::memcpy(&w, c, BITS);  // 2 bytes of 2-bit codes, 4 of 4-bit ones
      q = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(w), shift), mask);
    }
    _mm256_storeu_ps(out + e, _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), s, z));
  }
}
#endif

#if defined(__AVX512F__)
// AVX-512: sixteen codes per step (d is a multiple of 16).  8-bit codes by a
// widening load, then code * scale + zero.  2- and 4-bit codes take one of at
// most sixteen values per token, so those values are formed once per token
// (a table, fma(code, scale, zero): the same float each code gets above) and
// each lane looks its value up (vpermps reads an index's low four bits): a
// 4-bit code word is spread over the lanes and shifted into place, a 2-bit
// one shifted likewise, its table repeating every four entries so the next
// code's bits above the index's low two are ignored.  No integer-to-float
// conversion and no multiply per element.
template <int BITS>
inline void dequant_avx512(const uint8_t* __restrict codes, float scale, float zero,
                           float* __restrict out, int d) {
  const __m512 s = _mm512_set1_ps(scale), z = _mm512_set1_ps(zero);
  if (BITS == 8) {
    for (int e = 0; e < d; e += 16) {
      const __m512i q =
          _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + e)));
      _mm512_storeu_ps(out + e, _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), s, z));
    }
    return;
  }
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i code = BITS == 4 ? lane : _mm512_and_si512(lane, _mm512_set1_epi32(3));
  const __m512 table = _mm512_fmadd_ps(_mm512_cvtepi32_ps(code), s, z);
  if (BITS == 4) {
    // lanes 0-7 take the low code dword, 8-15 the high one; lane i shifted by 4 (i % 8)
    const __m512i half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    const __m512i shift = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20,
                                            24, 28);
    for (int e = 0; e < d; e += 16) {
      const __m512i w = _mm512_castsi128_si512(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + e / 2)));
      const __m512i q = _mm512_srlv_epi32(_mm512_permutexvar_epi32(half, w), shift);
      _mm512_storeu_ps(out + e, _mm512_permutexvar_ps(q, table));
    }
  } else {
    const __m512i shift = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                            28, 30);
    for (int e = 0; e < d; e += 16) {
      int32_t w;
      std::memcpy(&w, codes + e / 4, 4);
      const __m512i q = _mm512_srlv_epi32(_mm512_set1_epi32(w), shift);
      _mm512_storeu_ps(out + e, _mm512_permutexvar_ps(q, table));
    }
  }
}
#endif

inline void dequant(int bits, const uint8_t* codes, float scale, float zero, float* out,
                    int d) {
  switch (bits) {
#if defined(__AVX512F__)
    case 2: dequant_avx512<2>(codes, scale, zero, out, d); break;
    case 4: dequant_avx512<4>(codes, scale, zero, out, d); break;
    default: dequant_avx512<8>(codes, scale, zero, out, d); break;
#elif defined(__AVX2__)
    case 2: dequant_avx2<2>(codes, scale, zero, out, d); break;
    case 4: dequant_avx2<4>(codes, scale, zero, out, d); break;
    default: dequant_avx2<8>(codes, scale, zero, out, d); break;
#else
    case 2: dequant_row2(codes, scale, zero, out, d); break;
    case 4: dequant_row<4>(codes, scale, zero, out, d); break;
    default: dequant_row<8>(codes, scale, zero, out, d); break;
#endif
  }
}

}  // namespace kvshrink_cpu
